"""QMP and agent sockets live in the sandbox's directory, however deep the state dir is."""

from __future__ import annotations

from pathlib import Path

import pytest

from tartarus.runtime.vm import _connect, _listen


@pytest.mark.parametrize("depth", [1, 4])
def test_socket_in_a_directory_of_any_depth(tmp_path: Path, depth: int) -> None:
    workdir = tmp_path.joinpath(*["d" * 40] * depth)  # depth 4: well past a sun_path's 107 bytes
    workdir.mkdir(parents=True)
    path = workdir / "qmp.sock"
    listener = _listen(path)
    client = _connect(path)
    try:
        server, _ = listener.accept()
        client.setblocking(True)
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        server.close()
    finally:
        client.close()
        listener.close()
    assert path.stat().st_mode & 0o777 == 0o600  # root only: QMP is the VM's control plane
