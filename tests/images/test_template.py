"""A template from an OCI image in a registry: converted, snapshotted with its own python3 warm, restored."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument, Timeout
from tartarus.runtime.agent import Output
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.templates.build import build_template
from tartarus.templates.built import get_template, remove_template
from tartarus.templates.spec import TemplateSpec
from tartarus.templates.steps import GUEST_CA, BuildStepFailed, host_ca_bundle
from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm


def test_image_template_snapshot_and_restore(python_ref: str, tmp_path: Path) -> None:
    spec = TemplateSpec.model_validate(
        {
            "name": "slim-test",
            "base": {"image": python_ref},
            "env": {"TEMPLATE_VAR": "from-spec"},
            "interpreter": {"preload": ["json"]},
        }
    )
    template = build_template(spec, lambda message: None)
    try:
        assert get_template("slim-test").key == template.key
        assert template.env["TEMPLATE_VAR"] == "from-spec"
        snapshot = ensure_snapshot(template, lambda message: None)

        async def main() -> tuple[str | None, str | None]:
            sb = await Sandbox.restore(snapshot, template, tmp_path)
            try:
                interpreter = await sb.code_interpreter()
                version = (await interpreter.run_code("import sys; sys.version_info[:2]")).result
                preloaded = (await interpreter.run_code("'json' in globals()")).result
                return version, preloaded
            finally:
                await sb.destroy()

        assert asyncio.run(main()) == ("(3, 11)", "True")
        assert not qemu_pids(tmp_path)
    finally:
        remove_template("slim-test")


def test_image_template_refuses_debian_packages(python_ref: str) -> None:
    spec = TemplateSpec.model_validate({"name": "bad", "base": {"image": python_ref}, "packages": ["curl"]})
    with pytest.raises(InvalidArgument, match="packages"):
        build_template(spec, lambda message: None)


@pytest.fixture
def host_http() -> Iterator[tuple[int, bytes]]:
    """A loopback HTTP server; QEMU user networking shows the host's loopback to a guest as 10.0.2.2."""
    payload = b"payload-" + os.urandom(4).hex().encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], payload
    finally:
        server.shutdown()
        server.server_close()


def test_build_steps_run_with_network_and_are_kept(
    python_ref: str, tmp_path: Path, host_http: tuple[int, bytes]
) -> None:
    port, payload = host_http
    fetch = f"import urllib.request as u; open('/opt/fetched', 'wb').write(u.urlopen('http://10.0.2.2:{port}/').read())"
    spec = TemplateSpec.model_validate(
        {
            "name": "steps-test",
            "base": {"image": python_ref},
            "steps": [
                "echo built-by-step > /opt/marker",
                f'python3 -c "{fetch}"',
                'test "$PIP_CERT" = "$SSL_CERT_FILE" && sha256sum < "$SSL_CERT_FILE" > /opt/ca-sum',
            ],
        }
    )
    template = build_template(spec, lambda message: None)
    try:
        checks = f"cat /etc/resolv.conf /opt/ca-sum; test -e {GUEST_CA} || echo no-ca-bundle"

        async def main() -> bytes:
            sb = await Sandbox.boot(template, tmp_path / "sandboxes")
            try:
                process = await sb.agent.exec(["sh", "-c", f"cat /opt/marker /opt/fetched; echo; {checks}"])
                out = b""
                async for event in process.events():
                    if isinstance(event, Output):
                        out += event.data
                return out
            finally:
                await sb.destroy()

        out = asyncio.run(main())
        assert out.startswith(b"built-by-step\n" + payload)
        assert b"10.0.2.3" not in out  # the build's resolver was put back
        assert b"no-ca-bundle" in out  # and the host's CA bundle removed
        host_ca = host_ca_bundle()  # which the steps' TLS clients trusted
        assert host_ca is not None and hashlib.sha256(host_ca).hexdigest().encode() in out
        assert not qemu_pids(tmp_path)
    finally:
        remove_template("steps-test")


def test_a_failing_step_is_a_clear_error(python_ref: str) -> None:
    spec = TemplateSpec.model_validate(
        {"name": "failing-steps", "base": {"image": python_ref}, "steps": ["echo about to fail; exit 3"]}
    )
    with pytest.raises(BuildStepFailed, match=r"(?s)step 1 .*exit status 3.*about to fail"):
        build_template(spec, lambda message: None)


def test_start_command_is_running_in_every_restored_sandbox(python_ref: str, tmp_path: Path) -> None:
    probe = "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/', timeout=2).read()"
    spec = TemplateSpec.model_validate(
        {
            "name": "service-test",
            "base": {"image": python_ref},
            "start": {
                "command": [
                    "python3",
                    "-m",
                    "http.server",
                    "8000",
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    "/etc",
                ],
                "ready": ["python3", "-c", probe],
                "ready_timeout": 120,
            },
        }
    )
    template = build_template(spec, lambda message: None)
    try:
        snapshot = ensure_snapshot(template, lambda message: None)
        assert snapshot.interpreter_pid is None

        async def main() -> list[int | None]:
            codes = []
            for _ in range(2):
                sb = await Sandbox.restore(snapshot, template, tmp_path)
                try:
                    # The server was started before the snapshot: it answers at once, no start-up.
                    check = await sb.agent.exec(["python3", "-c", probe], timeout=30)
                    async for _ in check.events():
                        pass
                    codes.append(check.exit.exit_code if check.exit else None)
                finally:
                    await sb.destroy()
            return codes

        assert asyncio.run(main()) == [0, 0]
        assert not qemu_pids(tmp_path)
    finally:
        remove_template("service-test")


def test_a_ready_check_that_never_passes_times_out(python_ref: str) -> None:
    spec = TemplateSpec.model_validate(
        {
            "name": "never-ready",
            "base": {"image": python_ref},
            "start": {"command": ["sleep", "600"], "ready": ["false"], "ready_timeout": 2},
        }
    )
    template = build_template(spec, lambda message: None)
    try:
        with pytest.raises(Timeout, match="ready check"):
            ensure_snapshot(template, lambda message: None)
    finally:
        remove_template("never-ready")
