"""An agent's lease loop: renew every lease/3 seconds, and know locally when the lease may have lapsed.

The database decides fencing, but a partitioned agent cannot hear it. So the keeper also keeps a local
deadline on the monotonic clock: the moment a renewal was *sent* plus the lease length. The database set
the expiry from its own now() after receiving the request, so the local deadline is never later than the
database's (clock rates being equal); once it passes, `holds()` is False and the agent must stop taking
work even before it can reach the database to be told it is fenced. When the database refuses a renewal
(Fenced), `on_fenced` runs once and the keeper stops: the agent reconciles and calls `rejoin`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import psycopg

from tartarus.cluster.db import Connection, connect
from tartarus.cluster.errors import ClusterUnavailable, Fenced
from tartarus.cluster.membership import DEFAULT_LEASE_S, Membership
from tartarus.cluster.model import Lease, NodeSpec, Registration

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        url: str,
        spec: NodeSpec,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        on_fenced: Callable[[Fenced], None] = lambda e: None,
    ) -> None:
        self.url = url
        self.spec = spec
        self.lease_s = lease_s
        self.on_fenced = on_fenced
        self._conn: Connection | None = None
        self._lease: Lease | None = None
        self._deadline = 0.0  # monotonic
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0
        self.failures = 0  # renewals that did not reach the database or failed there (metrics)

    def join(self, running: Iterable[str] = ()) -> Registration:
        """Register (a new epoch) and start renewing in the background."""
        self.stop()
        sent = time.monotonic()
        registration = Membership(self._connection(), lease_s=self.lease_s).register(self.spec, running)
        with self._lock:
            self._lease = registration.lease
            self._deadline = sent + self.lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.spec.name}", daemon=True)
        self._thread.start()
        return registration

    rejoin = join  # after reconciling a fence: same call, a new epoch

    @property
    def lease(self) -> Lease | None:
        return self._lease

    def holds(self) -> bool:
        """True while the lease is certainly still valid in the database: take work only then."""
        with self._lock:
            return self._lease is not None and time.monotonic() < self._deadline

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            # A renewal stuck on a cut connection fails within a renewal interval, so the keeper
            # reconnects and hears it was fenced as soon as the network heals.
            interval = max(1.0, self.lease_s / 3)
            self._conn = connect(self.url, timeout_s=interval, unacked_s=interval)
        return self._conn

    def _run(self) -> None:
        interval = self.lease_s / 3
        while not self._stop.wait(interval):
            lease = self._lease
            assert lease is not None
            sent = time.monotonic()
            try:
                renewed = Membership(self._connection(), lease_s=self.lease_s).renew(lease)
            except Fenced as e:
                with self._lock:
                    self._lease = None
                log.warning("%s", e.message)
                self.on_fenced(e)
                return
            except (ClusterUnavailable, psycopg.Error) as e:
                # Keep trying: the lease may still be valid; holds() turns False at the local deadline.
                log.warning("lease renewal for %s failed: %s", lease.node, e)
                self.failures += 1
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                continue
            with self._lock:
                self._lease = renewed
                self._deadline = sent + self.lease_s
            self.renewals += 1
