"""The image cache: warm pulls, concurrent pulls doing the work once, ls/rm/prune, and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tartarus.images import testing as t
from tartarus.images.api import pull, to_template
from tartarus.images.cache import ImageCache
from tartarus.images.errors import ImageNotFound, UnsafeLayer
from tests.images.conftest import Images

TARTARUS = Path(sys.executable).parent / "tartarus"


def test_a_second_pull_is_a_cache_hit(images: Images, store: ImageCache) -> None:
    first = pull(images.small, store=store)
    phases: list[str] = []
    t0 = time.perf_counter()
    second = pull(images.small, store=store, progress=lambda phase, done, total: phases.append(phase))
    elapsed = time.perf_counter() - t0
    assert second == first
    assert phases == ["resolve", "done"]  # nothing downloaded, applied or built
    assert elapsed < 0.5, f"warm pull took {elapsed:.3f} s"
    # The same image under another name (by digest) shares the build and records the name.
    pinned = f"{images.small.rsplit(':', 1)[0]}@{first.manifest_digest}"
    third = pull(pinned, store=store)
    assert third.rootfs == first.rootfs and set(third.refs) == {images.small, pinned}


def test_concurrent_pulls_of_one_image_build_it_once(images: Images, store: ImageCache) -> None:
    builds: list[str] = []
    results: list[Path] = []
    failures: list[BaseException] = []
    start = threading.Barrier(3)

    def one() -> None:
        try:
            start.wait()
            build = pull(
                images.docker,
                store=store,
                progress=lambda phase, done, total: builds.append(phase) if phase == "build" else None,
            )
            results.append(build.rootfs)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert len(results) == 3 and len(set(results)) == 1
    assert builds == ["build"], "the filesystem was built more than once"
    assert len(list(store.builds.iterdir())) == 1


def test_ls_rm_prune(images: Images, store: ImageCache) -> None:
    small = pull(images.small, store=store)
    zstd = pull(images.zstd, store=store)
    assert [b.manifest_digest for b in store.all()] == [small.manifest_digest, zstd.manifest_digest]
    blobs_before = {p.name for p in (store.blobs / "sha256").iterdir()}
    assert {
        d.partition(":")[2] for d in (*small.layers, small.config_digest, small.manifest_digest)
    } <= blobs_before
    (store.tmp / "crashed-pull").mkdir()  # what a killed pull leaves behind
    assert store.prune().blobs == 0  # everything is still in use
    assert not (store.tmp / "crashed-pull").exists()
    removed = store.remove(images.small)
    assert [b.manifest_digest for b in removed] == [small.manifest_digest]
    assert not small.rootfs.exists() and zstd.rootfs.exists()
    report = store.prune()
    assert report.blobs == 3 and report.bytes > 0  # small's manifest and two layers; the config is shared
    left = {p.name for p in (store.blobs / "sha256").iterdir()}
    assert {d.partition(":")[2] for d in (*zstd.layers, zstd.config_digest, zstd.manifest_digest)} <= left
    with pytest.raises(ImageNotFound, match="no converted image matches"):
        store.remove(images.small)
    assert store.remove(zstd.manifest_digest[7:19])  # by digest prefix
    assert store.all() == []


def test_template_from_a_build(images: Images, store: ImageCache) -> None:
    build = pull(images.small, store=store)
    template = to_template(build, "small")
    assert (template.name, template.rootfs, template.fstype) == ("small", build.rootfs, "ext4")
    assert template.env["GREETING"] == "hello world" and template.workdir == "/home/user"
    assert template.key == build.rootfs.parent.name


def test_a_failed_pull_cleans_up_and_a_retry_works(images: Images, store: ImageCache, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    writer = t.LayoutWriter(layout)
    good = writer.layer(t.tar_bytes([t.file("a", b"a")]))
    bad = writer.layer(t.tar_bytes([t.hardlink("b", "missing")]))
    writer.image([good, bad], tag="bad")
    with pytest.raises(UnsafeLayer, match=r"'b'.*does not exist"):
        pull(f"oci:{layout}:bad", store=store)
    assert not list(store.builds.iterdir()) and not list(store.tmp.iterdir())
    assert pull(images.small, store=store).rootfs.exists()


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TARTARUS_CACHE_DIR": str(cache)}
    return subprocess.run(
        [str(TARTARUS), "image", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli(images: Images, tmp_path: Path) -> None:
    pulled = _cli("pull", images.small, cache=tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    rootfs = Path(pulled.stdout.strip())
    assert rootfs.is_file() and rootfs.parent.parent == tmp_path / "images" / "builds"
    listed = json.loads(_cli("ls", "--json", cache=tmp_path).stdout)
    assert [entry["refs"] for entry in listed] == [[images.small]]
    table = _cli("ls", cache=tmp_path)
    assert "ext4" in table.stdout and "linux/amd64" in table.stdout
    missing = _cli("pull", images.small.replace(":1", ":nope"), cache=tmp_path)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    removed = _cli("rm", images.small, cache=tmp_path)
    assert removed.returncode == 0 and not rootfs.exists()
    pruned = _cli("prune", cache=tmp_path)
    assert pruned.returncode == 0 and "removed 4 blobs" in pruned.stdout, pruned.stdout


def _children(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields["PPid"]) == pid:
                found.add(int(status.parent.name))
    return found


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling for another process's state change


def test_a_killed_pull_leaves_no_mount_loop_device_or_process(python_ref: str, store: ImageCache) -> None:
    code = (
        "import sys; from pathlib import Path; from tartarus.images.api import pull; "
        "from tartarus.images.cache import ImageCache; pull(sys.argv[1], store=ImageCache(Path(sys.argv[2])))"
    )

    def images() -> list[Path]:
        return list(store.tmp.glob("*/rootfs.ext4")) if store.tmp.exists() else []

    child = subprocess.Popen([sys.executable, "-c", code, python_ref, str(store.root)])
    try:
        _wait_for(lambda: bool(images()), "the worker to create its staging filesystem")
        image = images()[0]
        workers = _children(child.pid)
        assert workers, "no conversion worker is running"
    finally:
        child.kill()
        child.wait()
    _wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "the worker to die with its parent"
    )
    _wait_for(
        lambda: (
            not subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()
        ),
        "the loop device to be released",
    )
    assert str(image.parent) not in Path("/proc/self/mountinfo").read_text()
    assert not list(store.builds.iterdir())
    assert store.prune().tmp_entries == 1 and not list(store.tmp.iterdir())
