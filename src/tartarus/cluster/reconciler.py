"""The gateway's reconciler loop: campaign for the election, and sweep only while holding it.

Every gateway runs one; the advisory lock makes exactly one of them active, and when that gateway dies
its session ends, the lock is released, and another's next campaign wins. A pass also deletes the
checkpoints past their TTL. `holding()` is asked before
each pass (not remembered) so a holder whose session was cut does not sweep on a stale belief. The sweep
itself is safe to repeat, so the short overlap a takeover can cause does no harm.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from tartarus.cluster import checkpoints
from tartarus.cluster.db import Connection, connect
from tartarus.cluster.election import Election
from tartarus.cluster.errors import ClusterUnavailable
from tartarus.cluster.model import Sweep
from tartarus.cluster.reconcile import DEFAULT_GRACE_S, sweep

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        url: str,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        interval_s: float = 2.0,
        on_sweep: Callable[[Sweep], None] = lambda s: None,
    ) -> None:
        self.url = url
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.on_sweep = on_sweep
        self.election = Election(url, "reconciler")
        self.passes = 0
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.election.release()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def step(self) -> Sweep | None:
        """One campaign and, if elected, one sweep; None when another gateway holds the election."""
        if not self.election.try_acquire():
            return None
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url)
        result = sweep(self._conn, grace_s=self.grace_s)
        expired = checkpoints.expire(self._conn)
        if expired:
            log.info("reconciler: checkpoints past their TTL deleted: %s", expired)
        self.passes += 1
        if result.lost or result.reclaimed:
            log.warning(
                "reconciler: lost nodes %s, reclaimed %d reservation(s)",
                [n.name for n in result.lost],
                len(result.reclaimed),
            )
        self.on_sweep(result)
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except (ClusterUnavailable, psycopg.Error) as e:
                log.warning("reconciler pass failed: %s", e)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            self._stop.wait(self.interval_s)
