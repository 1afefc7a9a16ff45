"""A capture's manifest: which files it holds and the chunks each is made of, as one JSON object.

Written after all its chunks, so a manifest that exists never names a missing chunk; parsed strictly,
since a manifest comes back from a shared store: a bad one is refused before anything is written locally.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tartarus.cluster.chunks import ChunkRef
from tartarus.cluster.errors import ManifestInvalid
from tartarus.errors import InvalidArgument

FORMAT = 1
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a plain file name: never a path


def check_capture(capture: str) -> str:
    if not _FILE.match(capture):
        raise InvalidArgument(
            f"a capture id must be a plain name of letters, digits, '.', '_', '-': {capture!r}"
        )
    return capture


def manifest_key(capture: str) -> str:
    return f"manifests/{check_capture(capture)}.json"


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    chunks: tuple[ChunkRef, ...]

    def __post_init__(self) -> None:
        if not _FILE.match(self.name):
            raise InvalidArgument(f"a captured file must have a plain name, not {self.name!r}")
        if sum(c.size for c in self.chunks) != self.size:
            raise InvalidArgument(f"file {self.name}: its chunks do not add up to its size {self.size}")


@dataclass(frozen=True)
class Manifest:
    capture: str
    chunk_size: int
    files: tuple[FileEntry, ...]

    def __post_init__(self) -> None:
        check_capture(self.capture)
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"capture {self.capture} names a file twice")

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "capture": self.capture,
            "chunk_size": self.chunk_size,
            "files": [
                {"name": f.name, "size": f.size, "chunks": [[c.digest, c.size] for c in f.chunks]}
                for f in self.files
            ],
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        try:
            doc: Any = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ManifestInvalid(f"not a format-{FORMAT} capture manifest")
            files = tuple(
                FileEntry(
                    name=_str(f["name"]),
                    size=_int(f["size"]),
                    chunks=tuple(ChunkRef(_str(d), _int(n)) for d, n in f["chunks"]),
                )
                for f in doc["files"]
            )
            return cls(capture=_str(doc["capture"]), chunk_size=_int(doc["chunk_size"]), files=files)
        except ManifestInvalid:
            raise
        except (ValueError, KeyError, TypeError, InvalidArgument) as e:
            message = e.message if isinstance(e, InvalidArgument) else f"{type(e).__name__}: {e}"
            raise ManifestInvalid(f"invalid capture manifest: {message}") from e

    @property
    def chunk_refs(self) -> set[ChunkRef]:
        return {c for f in self.files for c in f.chunks}


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value
