"""Shared fixtures. VM tests boot real microVMs (TCG here, KVM where it works) from the built templates."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests import leaks


def qemu_pids(under: Path | None = None) -> set[int]:
    """QEMU processes, optionally only those whose command line references a path below `under`."""
    out = subprocess.run(["pgrep", "-f", "qemu-system-x86_64"], capture_output=True, text=True).stdout
    pids = set()
    for pid in map(int, out.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if under is None or str(under).encode() in cmdline:
            pids.add(pid)
    return pids


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll a condition that another process makes true (a process exiting); False on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


leaks.track_pools()
# In-process daemons that serve many tests: (URL, state dir). Their sandboxes' directories count as
# traces, and a leak is destroyed through them first.
SHARED_DAEMONS: list[tuple[str, Path]] = []


def _check_leaks(request: pytest.FixtureRequest, base: Path, before: set[leaks.Trace], what: str) -> None:
    dirs = [state / "sandboxes" for _, state in SHARED_DAEMONS]
    leaked = leaks.new_traces(before, base, dirs)
    if not leaked:
        return
    leaks.reap(leaked, [url for url, _ in SHARED_DAEMONS])
    report = getattr(request.node, "rep_call", None)
    if report is None or report.passed:  # a failed test's leftovers are its failure's, reaped quietly
        names = sorted(f"{t.kind} {t.name}" for t in leaked)
        pytest.fail(f"{what} left sandboxes behind (reaped now): {names}")


@pytest.fixture(autouse=True)
def no_sandbox_outlives_its_test(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Every test leaves the host as it found it: no new VMM, network namespace, uplink or cgroup of
    this session's sandboxes, and no sandbox left on a shared daemon. Set up after every wider fixture
    (pytest orders by scope), so sandboxes a module's fixture holds are in `before`; a pool's spares
    are not counted. A leak is reaped, and fails the test that left it."""
    base = tmp_path_factory.getbasetemp()
    before = leaks.traces(base, [state / "sandboxes" for _, state in SHARED_DAEMONS])
    yield
    _check_leaks(request, base, before, "the test")


@pytest.fixture(scope="module", autouse=True)
def no_sandbox_outlives_its_module(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The same at module boundaries: what the module's fixtures held must be gone after them."""
    base = tmp_path_factory.getbasetemp()
    before = leaks.traces(base, [state / "sandboxes" for _, state in SHARED_DAEMONS])
    yield
    _check_leaks(request, base, before, f"module {request.module.__name__}")


# Fixtures that boot or restore real VMs: a test that uses one is a VM test wherever it lives.
VM_FIXTURES = frozenset({"daemon_url", "sandbox", "python_ds", "net_daemon", "net_host", "policy_daemon"})
VM_DIR = Path(__file__).parent / "vm"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark VM tests so `-m "not vm"` deselects them: pytest ignores `pytestmark` in a conftest, so
    tests/vm's own marker never applied; a module's `pytestmark` still adds it for its tests."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.path.is_relative_to(VM_DIR) or fixtures & VM_FIXTURES:
            item.add_marker(pytest.mark.vm)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item (for fixtures that act on the test's outcome)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def daemon_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def daemon_url(daemon_state: Path) -> Iterator[str]:
    """A real daemon (uvicorn + FastAPI + manager) serving on a unix socket from a thread."""
    from tartarus.daemon.server import daemon_thread

    uds = daemon_state / "api.sock"
    with daemon_thread(daemon_state, uds):
        SHARED_DAEMONS.append((f"unix://{uds}", daemon_state))
        try:
            yield f"unix://{uds}"
        finally:
            SHARED_DAEMONS.remove((f"unix://{uds}", daemon_state))


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A private PostgreSQL server for the whole session (see tests/pg.py)."""
    from tests.pg import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind the store supports."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'tartarus.db'}"
    from tests.pg import fresh_database

    server: str = request.getfixturevalue("postgres_server_url")
    return fresh_database(server, "t_" + secrets.token_hex(8))
