"""Images for tests and benchmarks, made on this machine (the only network is loopback).

- Layers are tar streams built entry by entry with `tarfile` and written into OCI layouts with
  `LayoutWriter` (`tartarus.images.layout`), so tests control every byte of every layer, hostile ones
  included.
- `python_slim_layout()` is the python:3.11-slim equivalent: `debootstrap --variant=minbase
  --include=python3 bookworm`, split into four layers, the last deleting files of the others (opaque
  and plain whiteouts) and adding hard links, a setuid binary, xattrs, a fifo and a device node. The
  tree and the layout are cached under the cache dir, keyed by their inputs (debootstrap takes ~1 min).
- `LocalRegistry` runs Debian's `docker-registry` on 127.0.0.1 (optionally with htpasswd auth);
  `skopeo_copy` pushes layouts into it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tartarus.bootfiles.cache import cached, digest
from tartarus.images.layout import Blob as Blob  # re-exported: tests write layouts with these
from tartarus.images.layout import LayoutWriter as LayoutWriter

EPOCH = 1_700_000_000


# ---- tar entries -------------------------------------------------------------------------------


@dataclass
class Entry:
    """One tar member to write: `TarInfo` fields plus content and xattrs."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = EPOCH
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, str] = field(default_factory=dict)
    size: int | None = None  # override (for crafted archives)

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.mtime = self.mtime
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.size = len(self.data) if self.size is None else self.size
        info.pax_headers = {
            **{f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in self.xattrs.items()},
            **self.pax,
        }
        return info


def file(name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Entry:
    return Entry(name, tarfile.REGTYPE, data, mode, **kw)


def directory(name: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode, **kw)


def symlink(name: str, target: str, **kw: Any) -> Entry:
    return Entry(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)


def hardlink(name: str, target: str, **kw: Any) -> Entry:
    return Entry(name, tarfile.LNKTYPE, linkname=target, **kw)


def whiteout(path: str) -> Entry:
    head, _, base = path.rstrip("/").rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}", mode=0o600)


def opaque(dir_path: str) -> Entry:
    return file(f"{dir_path.rstrip('/')}/.wh..wh..opq", mode=0o600)


def sparse_file(name: str, size: int, regions: list[tuple[int, bytes]], **kw: Any) -> Entry:
    """A GNU PAX 1.0 sparse member: `regions` of data in a file of apparent `size`, holes elsewhere."""
    lines = [str(len(regions))]
    for offset, data in regions:
        lines += [str(offset), str(len(data))]
    sparse_map = ("\n".join(lines) + "\n").encode()
    sparse_map += b"\0" * (-len(sparse_map) % 512)
    pax = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(size),
    }
    return Entry(f"GNUSparseFile.0/{name}", data=sparse_map + b"".join(d for _, d in regions), pax=pax, **kw)


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for entry in entries:
            info = entry.tarinfo()
            tf.addfile(
                info, io.BytesIO(entry.data) if entry.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else None
            )
    return buf.getvalue()


def _tree_info(tf: tarfile.TarFile, path: Path, arcname: str) -> tarfile.TarInfo | None:
    info = tf.gettarinfo(str(path), arcname)
    if info is None:
        return None
    info.uname = info.gname = ""
    headers = dict(info.pax_headers)
    for name in os.listxattr(path, follow_symlinks=False):
        value = os.getxattr(path, name, follow_symlinks=False)
        headers[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = headers
    return info


def tree_tar(tree: Path, out: Path, include: Callable[[str], bool]) -> None:
    """Write the paths of `tree` that `include` accepts (and their parent directories) to a tar file."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        added: set[str] = set()

        def add(rel: str) -> None:
            if rel in added:
                return
            parent = rel.rpartition("/")[0]
            if parent:
                add(parent)
            added.add(rel)
            info = _tree_info(tf, tree / rel, rel)
            if info is None:
                return
            if info.isreg():
                with open(tree / rel, "rb") as f:
                    tf.addfile(info, f)
            else:
                tf.addfile(info)

        for dirpath, dirnames, filenames in os.walk(tree):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, tree)
            for name in sorted(dirnames + filenames):
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if include(rel):
                    add(rel)


# ---- test images -------------------------------------------------------------------------------


def small_image(writer: LayoutWriter, tag: str, compression: str = "gzip", flavour: str = "oci") -> Blob:
    """A two-layer image exercising every entry type, for fast tests."""
    base = tar_bytes(
        [
            directory("./"),
            directory("bin"),
            file("bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
            file("bin/su", b"setuid", 0o4755),
            hardlink("bin/tool-link", "bin/tool"),
            symlink("bin/sh-link", "/bin/tool"),
            directory("etc"),
            file("etc/os-release", b"ID=tartarus-test\n"),
            file("etc/gone", b"deleted by the next layer\n"),
            directory("etc/conf.d"),
            file("etc/conf.d/a", b"a\n"),
            file("etc/conf.d/b", b"b\n"),
            directory("home", 0o755),
            directory("home/user", 0o700, uid=1000, gid=1000),
            file("home/user/notes", b"mine\n", 0o600, uid=1000, gid=1000),
            directory("dev"),
            Entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
            Entry("dev/loop9", tarfile.BLKTYPE, mode=0o660, devmajor=7, devminor=9, gid=6),
            Entry("run-fifo", tarfile.FIFOTYPE, mode=0o644),
            file("xattr-file", b"x", xattrs={"user.tartarus": b"yes", "security.capability": _CAP_NET_RAW}),
            directory("tmp", 0o1777),
        ]
    )
    top = tar_bytes(
        [
            directory("etc", mtime=EPOCH + 10),
            whiteout("etc/gone"),
            opaque("etc/conf.d"),
            file("etc/conf.d/c", b"c\n"),
            file("etc/os-release", b"ID=tartarus-test\nVERSION=2\n"),
            directory("bin/tool-link-dir"),
            file("big-zeros", bytes(3 << 20)),
        ]
    )
    layers = [writer.layer(base, compression, flavour), writer.layer(top, compression, flavour)]
    return writer.image(
        layers,
        tag=tag,
        flavour=flavour,
        config={
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world"],
            "Entrypoint": ["/bin/tool"],
            "Cmd": ["--help"],
            "WorkingDir": "/home/user",
            "User": "1000:1000",
        },
    )


# security.capability v2 granting cap_net_raw (bit 13), permitted + effective.
_CAP_NET_RAW = bytes([0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])


# ---- the python:3.11-slim equivalent -------------------------------------------------------------

PYTHON_TAG = "3.11-slim"
_LAYOUT_VERSION = "python-slim-layout-v1"


def debootstrap_tree() -> Path:
    """Debian bookworm minbase + python3, cached by its inputs (suite, packages, mirror)."""
    from tartarus.templates.debian import debian_mirror, debootstrap

    mirror = debian_mirror()
    args = ["--variant=minbase", "--include=python3", "bookworm"]

    def build(out: Path) -> None:
        debootstrap(args, out / "tree", mirror)

    return cached("test-images/debootstrap", digest(["debootstrap-v1", *args, mirror]), build) / "tree"


def _python_cleanup_layer() -> bytes:
    """Layer 4: deletes files of layers 2 and 3, replaces some of layer 1, adds odd entry types."""
    entries = [
        directory("usr"),
        directory("usr/share"),
        directory("usr/share/doc", mtime=EPOCH),
        opaque("usr/share/doc"),
        file("usr/share/doc/README.tartarus", b"docs removed by layer 4\n"),
        whiteout("usr/share/man"),
        whiteout("usr/share/info"),
        directory("usr/lib"),
        directory("usr/lib/python3.11"),
        whiteout("usr/lib/python3.11/unittest"),
        whiteout("usr/lib/python3.11/pydoc_data"),
        directory("etc"),
        file("etc/hostname", b"tartarus-python\n"),
        file("etc/motd", b"replaced\n"),
        directory("opt"),
        directory("opt/app", uid=1000, gid=1000),
        file("opt/app/main.py", b"print('hi')\n", uid=1000, gid=1000),
        hardlink("opt/app/main-link.py", "opt/app/main.py"),
        file("opt/app/caps", b"cap", 0o755, xattrs={"security.capability": _CAP_NET_RAW, "user.note": b"n"}),
        Entry("opt/app/fifo", tarfile.FIFOTYPE, mode=0o600),
        symlink("opt/app/python", "/usr/bin/python3"),
    ]
    return tar_bytes(entries)


def python_slim_layout() -> Path:
    """The cached OCI layout of the python:3.11-slim equivalent, tagged `3.11-slim`."""
    tree = debootstrap_tree()
    key = digest([_LAYOUT_VERSION, str(tree.parent.name)])

    def build(out: Path) -> None:
        writer = LayoutWriter(out / "layout")
        scratch = out / "scratch"
        scratch.mkdir()

        def in_share(rel: str) -> bool:
            return rel.startswith("usr/share/")

        def in_python(rel: str) -> bool:
            return rel.startswith(("usr/lib/python3.11/", "usr/lib/python3/"))

        splits: list[Callable[[str], bool]] = [
            lambda rel: not in_share(rel) and not in_python(rel),
            in_share,
            in_python,
        ]
        layers = []
        for i, include in enumerate(splits):
            raw = scratch / f"layer{i}.tar"
            tree_tar(tree, raw, include)
            layers.append(writer.layer(raw, "gzip"))
            raw.unlink()
        layers.append(writer.layer(_python_cleanup_layer(), "gzip"))
        writer.image(
            layers,
            tag=PYTHON_TAG,
            config={
                "Env": [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8",
                    "PYTHON_VERSION=3.11",
                ],
                "Cmd": ["python3"],
                "WorkingDir": "/opt/app",
            },
        )
        shutil.rmtree(scratch)

    return cached("test-images/python-slim", key, build) / "layout"


# ---- registry ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    """Debian's docker-registry on 127.0.0.1:<free port>, storing under `root`; optional htpasswd auth."""

    def __init__(self, root: Path, *, user: str | None = None, password: str | None = None) -> None:
        self.root = root
        self.user, self.password = user, password
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.address},
        }
        if self.user is not None:
            assert self.password is not None
            line = subprocess.run(
                ["htpasswd", "-Bbn", self.user, self.password], capture_output=True, text=True, check=True
            ).stdout.strip()
            (self.root / "htpasswd").write_text(line + "\n")
            config["auth"] = {"htpasswd": {"realm": "tartarus-test", "path": str(self.root / "htpasswd")}}
        (self.root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        log = open(self.root / "registry.log", "wb")  # noqa: SIM115 - the registry writes it until stop()
        self.proc = subprocess.Popen(
            ["/usr/bin/docker-registry", "serve", str(self.root / "config.yml")], stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + 15
        with httpx.Client(timeout=1) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"docker-registry exited: {(self.root / 'registry.log').read_text()[-2000:]}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"http://{self.address}/v2/").status_code in (200, 401):
                        return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("docker-registry did not answer within 15 s")
                time.sleep(0.05)  # waiting for the process to listen, not standing in for work

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps a blob (tests corrupt it to check verification)."""
        hex_ = digest.partition(":")[2]
        return self.root / "data" / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def skopeo_copy(
    src: str,
    dest: str,
    *,
    all_platforms: bool = False,
    dest_format: str | None = None,
    creds: str | None = None,
) -> None:
    """`skopeo copy` into the local registry (plain HTTP)."""
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--src-tls-verify=false"]
    if all_platforms:
        cmd.append("--all")
    if dest_format:
        cmd += ["--format", dest_format]
    if creds:
        cmd += ["--dest-creds", creds]
    proc = subprocess.run([*cmd, src, dest], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy {src} {dest} failed: {proc.stderr.strip()[-2000:]}")


@contextlib.contextmanager
def python_registry(root: Path) -> Iterator[tuple[LocalRegistry, str]]:
    """A local registry holding the python:3.11-slim equivalent; yields (registry, image ref)."""
    layout = python_slim_layout()
    with LocalRegistry(root) as registry:
        ref = f"{registry.address}/python:{PYTHON_TAG}"
        skopeo_copy(f"oci:{layout}:{PYTHON_TAG}", f"docker://{ref}")
        yield registry, ref
