"""Template snapshots in the object store (issue 16): a node that lacks one fetches it, rather than
cold-booting every sandbox of the template or building a snapshot of its own.

A snapshot is stored as the capture `snapshot-<key>`, its key the hash of everything it depends on
(template, kernel, agent, QEMU, accelerator: `snapshots.snapshot.snapshot_key`), so a node fetches only
a snapshot taken from exactly its own inputs. Fetching one also matters beyond start time: a hibernation
or checkpoint holds only the pages its sandbox changed, so it restores only over the very same snapshot
*build* (`stored.fingerprint`); nodes that fetched one build share it, nodes that each built their own
cannot move sandboxes between them.

An agent uploads the snapshots it holds and the store lacks (in the background, after it joined), and
fetches the ones its templates lack before it registers, so it announces them for the placement bonus;
a wake or a checkpoint's copy over a snapshot the node lacks fetches it then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tartarus.bootfiles.cache import cached
from tartarus.cluster.manifest import manifest_key
from tartarus.cluster.statestore import StateStore
from tartarus.errors import Conflict, TartarusError
from tartarus.snapshots.snapshot import Snapshot, find_snapshot, snapshot_key
from tartarus.templates.built import Template, list_templates

log = logging.getLogger(__name__)

PREFIX = "snapshot-"


def capture_of(key: str) -> str:
    return PREFIX + key


@dataclass
class Transferred:
    """Bytes this node moved to and from the object store (metrics), by what they were."""

    sent: dict[str, int]
    fetched: dict[str, int]

    def add_sent(self, kind: str, n: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + n

    def add_fetched(self, kind: str, n: int) -> None:
        self.fetched[kind] = self.fetched.get(kind, 0) + n


class SnapshotSync:
    def __init__(self, state: StateStore, transferred: Transferred) -> None:
        self.state = state
        self.transferred = transferred

    def stored(self, key: str) -> bool:
        return self.state.objects.exists(manifest_key(capture_of(key)))

    def upload(self, snapshot: Snapshot) -> bool:
        """Store the snapshot unless the store has it; whether this call stored it."""
        if self.stored(snapshot.key):
            return False
        files = [(p.name, p) for p in sorted(snapshot.path.iterdir()) if p.is_file() and p.name[0] != "."]
        t0 = time.perf_counter()
        try:
            stats = self.state.upload(capture_of(snapshot.key), files)
        except Conflict:
            return False  # another node stored it meanwhile: the same inputs, another build
        self.transferred.add_sent("snapshot", stats.sent_bytes)
        log.info(
            "uploaded snapshot %s of template %s (%d bytes sent, %.1f s)",
            snapshot.key,
            snapshot.template,
            stats.sent_bytes,
            time.perf_counter() - t0,
        )
        return True

    def fetch(self, template: Template) -> Snapshot | None:
        """The template's snapshot: this node's, else fetched from the store; None if neither has it."""
        found = find_snapshot(template)
        if found is not None or not template.snapshotted:
            return found
        key = snapshot_key(template)
        if not self.stored(key):
            return None
        t0 = time.perf_counter()
        fetched: list[int] = []

        def download(out: Path) -> None:
            fetched.append(self.state.download(capture_of(key), out).fetched_bytes)

        path = cached("snapshots", key, download)
        if fetched:
            self.transferred.add_fetched("snapshot", fetched[0])
            log.info(
                "fetched snapshot %s of template %s from the object store (%d bytes, %.1f s): not built here",
                key,
                template.name,
                fetched[0],
                time.perf_counter() - t0,
            )
        return Snapshot.load(path)

    def fetch_missing(self) -> list[str]:
        """Fetch every built template's missing snapshot the store has; the templates that got one."""
        got = []
        for template in list_templates():
            if not template.snapshotted or find_snapshot(template) is not None:
                continue
            try:
                if self.fetch(template) is not None:
                    got.append(template.name)
            except (TartarusError, OSError) as e:
                log.warning("could not fetch the snapshot of template %s: %s", template.name, e)
        return got

    def upload_held(self) -> list[str]:
        """Upload every snapshot of this node's templates the store lacks; the templates uploaded."""
        sent = []
        for template in list_templates():
            snapshot = find_snapshot(template) if template.snapshotted else None
            if snapshot is None:
                continue
            try:
                if self.upload(snapshot):
                    sent.append(template.name)
            except (TartarusError, OSError) as e:
                log.warning("could not upload the snapshot of template %s: %s", template.name, e)
        return sent
