"""Files API against a real guest: streamed binary round trips, listing, stat, mkdir, remove, rename."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from tartarus.errors import GuestError, InvalidArgument
from tartarus.sdk import AsyncClient, AsyncSandbox, FileInfo, FileList, Sandbox


def test_50_mb_binary_round_trip(sandbox: Sandbox) -> None:
    data = os.urandom(50 * 2**20)
    assert sandbox.files.write("/tmp/blob.bin", data) == len(data)
    in_guest = sandbox.commands.run(["sha256sum", "/tmp/blob.bin"]).stdout.split()[0]
    assert in_guest == hashlib.sha256(data).hexdigest()
    assert sandbox.files.read("/tmp/blob.bin") == data


def test_streamed_upload_from_an_iterator(sandbox: Sandbox) -> None:
    chunks = [os.urandom(300_000) for _ in range(10)]
    sandbox.files.write("/tmp/streamed.bin", iter(chunks))
    assert sandbox.files.read("/tmp/streamed.bin") == b"".join(chunks)


def test_text_and_mode(sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/run.sh", "#!/bin/sh\necho hi from script\n", mode=0o755)
    assert sandbox.commands.run(["/tmp/run.sh"]).stdout == "hi from script\n"
    assert sandbox.files.stat("/tmp/run.sh").mode == 0o755


def test_directory_operations(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("/tmp/d/e/f")
    sandbox.files.write("/tmp/d/e/f/x.txt", b"x")
    sandbox.files.write("/tmp/d/y.txt", b"yy")
    names = {(e.name, e.type) for e in sandbox.files.list("/tmp/d").entries}
    assert names == {("e", "dir"), ("y.txt", "file")}
    assert sandbox.files.stat("/tmp/d/y.txt").size == 2
    sandbox.files.rename("/tmp/d/y.txt", "/tmp/d/z.txt")
    assert not sandbox.files.exists("/tmp/d/y.txt") and sandbox.files.exists("/tmp/d/z.txt")
    with pytest.raises(GuestError):
        sandbox.files.remove("/tmp/d")  # not empty without recursive
    sandbox.files.remove("/tmp/d", recursive=True)
    assert not sandbox.files.exists("/tmp/d")


def test_a_listing_says_when_it_was_cut_short(sandbox: Sandbox, daemon_url: str) -> None:
    sandbox.commands.run("mkdir -p /tmp/many && cd /tmp/many && touch a b c")
    capped = sandbox.files.list("/tmp/many", limit=2)
    assert len(capped.entries) == 2 and capped.truncated is True
    whole = sandbox.files.list("/tmp/many")
    assert [e.name for e in whole.entries] == ["a", "b", "c"] and whole.truncated is False

    async def through_the_async_twin() -> tuple[FileList, FileInfo]:
        async with AsyncClient(daemon_url) as client:
            files = AsyncSandbox(sandbox.info, client).files
            return await files.list("/tmp/many", limit=2), await files.stat("/tmp/many/a")

    listed, stat = asyncio.run(through_the_async_twin())
    assert len(listed.entries) == 2 and listed.truncated is True
    assert (stat.name, stat.type, stat.size) == ("a", "file", 0)


def test_recursive_remove_does_not_follow_symlinks(sandbox: Sandbox) -> None:
    sandbox.commands.run(
        "mkdir -p /tmp/keep /tmp/victim && echo precious > /tmp/keep/f && ln -s /tmp/keep /tmp/victim/link"
    )
    sandbox.files.remove("/tmp/victim", recursive=True)
    assert sandbox.files.read("/tmp/keep/f") == b"precious\n"


def test_symlink_is_reported(sandbox: Sandbox) -> None:
    sandbox.commands.run("ln -sf /etc/hostname /tmp/hn")
    info = sandbox.files.stat("/tmp/hn")
    assert info.type == "symlink" and info.link == "/etc/hostname"


def test_missing_file_errors(sandbox: Sandbox) -> None:
    with pytest.raises(GuestError) as e:
        sandbox.files.read("/no/such/file")
    assert e.value.errno == 2
    assert not sandbox.files.exists("/no/such/file")
    with pytest.raises(GuestError):
        sandbox.files.read("/tmp")  # a directory is not readable as a file


def test_relative_path_refused(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgument):
        sandbox.files.read("etc/passwd")


def test_writes_land_in_the_writable_layer_only(sandbox: Sandbox) -> None:
    sandbox.files.write("/usr/local/marker", b"m")
    mounts = sandbox.commands.run(["cat", "/proc/mounts"]).stdout
    assert "overlay / overlay" in mounts
    assert sandbox.files.read("/usr/local/marker") == b"m"
