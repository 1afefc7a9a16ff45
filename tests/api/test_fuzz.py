"""Property-based fuzzing of the REST API from its OpenAPI document (schemathesis) against a real daemon:
no input makes it answer 5xx or crash, with an admin key and with a tenant's. Bounded (examples per
operation): about 20 s per store and key here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tartarus.paths import REPO_ROOT
from tests.api.conftest import Api

pytestmark = pytest.mark.vm  # a create with a valid template restores a real VM

EXAMPLES_PER_OPERATION = 30


# The committed document, which a unit test keeps identical to what the daemon serves. Not fuzzed:
# pulling an image, which would send generated references to whatever registry host they name (tests
# reach loopback only); tests/images/test_api.py covers it against a local registry.
schema = schemathesis.openapi.from_path(REPO_ROOT / "docs" / "openapi.json").exclude(
    path="/v1/images", method="POST"
)


@pytest.fixture(params=["admin", "tenant"])
def fuzz_key(request: pytest.FixtureRequest, api: Api) -> Iterator[str]:
    """An admin key (reaches every operation) and a tenant key (exercises the refusals); the sandboxes
    the fuzzed creates started are destroyed after each test (the leak check holds every test to it)."""
    # Fuzzed creates run as a tenant with a small quota, which bounds the VMs they can start.
    tenant = "local" if request.param == "admin" else "fuzzed"
    with api.client(api.admin_key) as c:
        quota = {"max_sandboxes": 2, "max_vcpus": 2, "max_memory_mib": 1024}
        c.put(f"/v1/tenants/{tenant}/quota", json=quota).raise_for_status()
    yield api.admin_key if request.param == "admin" else api.new_key(tenant)
    with api.client(api.admin_key) as c:
        for sandbox in c.get("/v1/sandboxes").json()["sandboxes"]:
            c.delete(f"/v1/sandboxes/{sandbox['id']}")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_makes_the_api_fail(case: schemathesis.Case[Any], api: Api, fuzz_key: str) -> None:
    response = case.call(base_url=api.url, headers={"Authorization": f"Bearer {fuzz_key}"}, timeout=120)
    case.validate_response(response, checks=[not_a_server_error])
    # Errors keep the documented body shape.
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        assert set(response.json()) == {"error"}, response.text


def test_daemon_still_serves_after_fuzzing(api: Api) -> None:
    assert httpx.get(f"{api.url}/v1/health", timeout=10).status_code == 200
