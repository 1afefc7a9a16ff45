"""Through the API, a create that takes the pool's pre-started VMM gets it replaced once it has answered
(refills are held only until the response starts; see daemon/pools.py `refills_deferred`)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tartarus.templates.built import get_template
from tests.api.conftest import tcp_daemon
from tests.conftest import wait_until

pytestmark = pytest.mark.vm


def test_a_create_from_the_pool_is_followed_by_a_refill(tmp_path: Path) -> None:
    app = create_app(tmp_path, DaemonConfig(pool_size=1))
    with tcp_daemon(tmp_path, None, app) as url:
        key = (tmp_path / "admin.key").read_text().strip()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            pools = app.state.daemon.manager.pools

            def pooled() -> int:
                """python-ds's spares (/v1/health's `pooled` sums every template's pool)."""
                pool = pools.for_template(get_template("python-ds"))
                return 0 if pool is None else len(pool)

            assert wait_until(lambda: pooled() == 1, timeout=120), "the pool never filled"
            created = c.post("/v1/sandboxes", json={"template": "python-ds"})
            assert created.status_code == 201, created.text
            assert created.json()["timings_ms"]["pooled"] > 0  # it took the pre-started VMM
            assert wait_until(lambda: pooled() == 1, timeout=120), "the pool was not refilled"
            assert c.delete(f"/v1/sandboxes/{created.json()['id']}").status_code == 204
