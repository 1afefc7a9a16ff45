"""The daemon's state dir is its own (issue 14, defect 3): no file or directory under it gives group or
other any access, whatever made it (the daemon, its threads, QEMU), an older version's state dir is
tightened on start, and a sandbox's env is in no record in plaintext, only sealed."""

from __future__ import annotations

import contextlib
import secrets
import stat
from pathlib import Path

import pytest

from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tartarus.runtime import jail
from tartarus.sdk import Client, Sandbox
from tests.api.conftest import tcp_daemon

pytestmark = pytest.mark.vm

# Guest RAM and disks: the env is in them as the guest holds it (they are private files like the rest).
GUEST_DATA = {"memory.state", "layer.ext4", "rw.ext4"}


def _open_to_others(state: Path) -> list[str]:
    """Every path under `state` (itself included) whose mode gives group or other any bit; a pinned
    template file may give its group (the VMM group, no user's: docs/security.md, 1a) read or write."""
    found = []
    vmm_group = jail.uid_range().shared_gid
    for path in [state, *state.rglob("*")]:
        st = path.lstat()
        mode = st.st_mode
        template = "pins" in path.relative_to(state).parts and st.st_gid == vmm_group
        if not stat.S_ISLNK(mode) and mode & (0o007 if template else 0o077):
            found.append(f"{path.relative_to(state)} {stat.filemode(mode)}")
    return found


def _holding(state: Path, needle: bytes) -> list[str]:
    """The files under `state`, guest RAM and disks aside, whose bytes contain `needle`."""
    found = []
    for path in state.rglob("*"):
        guest = path.name in GUEST_DATA or "pins" in path.relative_to(state).parts
        if path.is_file() and not path.is_symlink() and not guest and needle in path.read_bytes():
            found.append(str(path.relative_to(state)))
    return found


def _echo(sb: Sandbox, var: str) -> str:
    result = sb.commands.run(["sh", "-c", f'printf %s "${var}"'])
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.fixture
def old_state(tmp_path: Path) -> Path:
    """A state dir as an older version left it: world-readable directories and files."""
    state = tmp_path / "state"
    (state / "hibernated").mkdir(parents=True)
    (state / "node-id").write_text("older-node\n")
    for path in (state, state / "hibernated", state / "node-id"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return state


def _daemon(state: Path, *, keep_on_stop: bool) -> contextlib.AbstractContextManager[str]:
    app = create_app(state, DaemonConfig(pool_size=0, live_restore=True, keep_on_stop=keep_on_stop))
    return tcp_daemon(state, None, app)


def test_state_dir_is_private_and_env_is_sealed(old_state: Path) -> None:
    state = old_state
    secret = "tartarus-test-secret-" + secrets.token_hex(8)
    made: list[Sandbox] = []
    with _daemon(state, keep_on_stop=True) as url, Client(url, _key(state)) as client:
        assert _open_to_others(state) == []  # tightened on start, before any sandbox
        try:
            sb = Sandbox.create("python-ds", env={"SECRET_VALUE": secret}, client=client)
            made.append(sb)
            assert _echo(sb, "SECRET_VALUE") == secret
            checkpoint = sb.snapshot()
            sb.hibernate()
            fork = Sandbox.create(from_snapshot=checkpoint.id, client=client)
            made.append(fork)
            assert _echo(fork, "SECRET_VALUE") == secret  # the checkpoint's record gave the env back

            # A running sandbox (the fork: sandbox.json), a hibernated one and a checkpoint, on disk.
            records = [
                state / "sandboxes" / fork.id / "sandbox.json",
                state / "hibernated" / sb.id / "image.json",
                state / "checkpoints" / checkpoint.id / "image.json",
            ]
            assert all(path.exists() for path in records)
            assert _open_to_others(state) == []
            assert _holding(state, secret.encode()) == []

            sb.wake()
            assert _echo(sb, "SECRET_VALUE") == secret  # the hibernation record gave the env back
        except BaseException:
            for handle in made:  # this daemon keeps its sandboxes when it stops
                with contextlib.suppress(Exception):
                    handle.kill()
            raise

    # A restarted daemon takes both over from their sealed descriptors, env and all (and destroys them
    # when it stops).
    with _daemon(state, keep_on_stop=False) as url:
        again = [Sandbox.connect(handle.id, url=url, api_key=_key(state)) for handle in made]
        try:
            for handle in again:
                assert _echo(handle, "SECRET_VALUE") == secret
            assert _open_to_others(state) == []
            assert _holding(state, secret.encode()) == []
        finally:
            for handle in again:
                handle.kill()


def _key(state: Path) -> str:
    return (state / "admin.key").read_text().strip()
