"""docs/openapi.json is the API the daemon serves (regenerate: `tartarus openapi -o docs/openapi.json`)."""

from __future__ import annotations

from pathlib import Path

from tartarus.daemon.app import create_app, dumps_openapi
from tartarus.paths import REPO_ROOT


def test_committed_openapi_document_is_up_to_date(tmp_path: Path) -> None:
    committed = (REPO_ROOT / "docs" / "openapi.json").read_text()
    assert dumps_openapi(create_app(tmp_path)) == committed, "run: tartarus openapi -o docs/openapi.json"


def test_every_operation_documents_its_errors(tmp_path: Path) -> None:
    doc = create_app(tmp_path).openapi()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/sandboxes/{sandbox_id}"):
                assert "404" in operation["responses"], f"{method.upper()} {path} does not document 404"
