"""Prometheus metrics of the cluster roles (docs/metrics.md, "Cluster").

A gateway exports its placement decisions, the calls it proxies, its reconciler, and the cluster's nodes
as the database has them at scrape time (every gateway reports the same nodes: a dashboard takes the max).
An agent exports its lease beside the daemon's own metrics. Both are scraped with an admin API key, like
`serve`; an agent answers /metrics even while its lease lapsed, when it matters most.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tartarus.cluster.db import Connection
from tartarus.cluster.errors import NoCapacity
from tartarus.cluster.lease import LeaseKeeper
from tartarus.cluster.model import Admin, Demand, NodeState, NodeView, Reservation
from tartarus.cluster.placement import Placer

# A placement decision is a few PostgreSQL round trips: tenths of a millisecond to tens under contention.
PLACEMENT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Proxied calls range from a lookup (milliseconds) to a cold boot or a long exec stream (minutes).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
NODE_STATES = ("up", "lapsed", "lost")  # lapsed: registered up, but its lease is not renewed
WEBSOCKET = "WEBSOCKET"


def node_state(node: NodeView) -> str:
    if node.state == NodeState.LOST:
        return "lost"
    return "up" if node.healthy else "lapsed"


class _Nodes(Collector):
    """The cluster's nodes as the last scrape read them (set just before rendering, under the lock)."""

    def __init__(self) -> None:
        self.nodes: list[NodeView] = []

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "tartarus_cluster_nodes", "Registered nodes by state and admin state", labels=["state", "admin"]
        )
        counts = {(s, a.value): 0 for s in NODE_STATES for a in Admin}
        for node in self.nodes:
            counts[node_state(node), node.admin.value] += 1
        for (state, admin), n in sorted(counts.items()):
            states.add_metric([state, admin], n)
        yield states
        placed = GaugeMetricFamily(
            "tartarus_cluster_node_sandboxes",
            "Sandboxes placed on each node (running or reserved), out of its slots",
            labels=["node"],
        )
        slots = GaugeMetricFamily(
            "tartarus_cluster_node_slots", "Sandbox slots of each node", labels=["node"]
        )
        for node in self.nodes:
            placed.add_metric([node.name], node.used.slots)
            slots.add_metric([node.name], node.capacity.slots)
        yield placed
        yield slots


class _Reconciling(Collector):
    def __init__(self, metrics: GatewayMetrics, interval_s: float) -> None:
        self._metrics = metrics
        self._interval_s = interval_s

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        # The leader sweeps every interval; one missed pass is not yet a lost election.
        leading = time.monotonic() - m.last_sweep < 3 * self._interval_s
        yield GaugeMetricFamily(
            "tartarus_gateway_reconciler_leader",
            "1 while this gateway holds the reconciler election (it swept recently)",
            value=int(leading),
        )
        yield CounterMetricFamily(
            "tartarus_gateway_reconciler_passes", "Reconciler passes this gateway ran", value=m.passes
        )
        yield CounterMetricFamily(
            "tartarus_cluster_nodes_lost",
            "Nodes this gateway's reconciler declared lost (lease lapsed past the grace period)",
            value=m.nodes_lost,
        )


class GatewayMetrics:
    def __init__(self, reconcile_interval_s: float = 2.0) -> None:
        self.registry = CollectorRegistry()
        self.placement_seconds = Histogram(
            "tartarus_placement_seconds",
            "Placement decision (candidates, scoring, node lock, reservation), by outcome",
            ["outcome"],
            buckets=PLACEMENT_BUCKETS,
            registry=self.registry,
        )
        self.node_refusals = PromCounter(
            "tartarus_gateway_node_refusals",
            "Creates a node's agent refused or failed (another node is tried)",
            ["node"],
            registry=self.registry,
        )
        self.requests = PromCounter(
            "tartarus_gateway_requests",
            "Requests the gateway answered (placed, proxied or refused), by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "tartarus_gateway_request_duration_seconds",
            "Gateway request latency to the end of the (proxied, streamed) response, by route",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        for outcome in ("reserved", "no_capacity"):  # a dashboard sees 0, not a gap
            self.placement_seconds.labels(outcome)
        self.passes = 0
        self.nodes_lost = 0
        self.last_sweep = float("-inf")
        self._nodes = _Nodes()
        self._lock = threading.Lock()
        self.registry.register(self._nodes)
        self.registry.register(_Reconciling(self, reconcile_interval_s))

    def swept(self, lost: int) -> None:
        """From the reconciler thread, after each pass it ran as the elected one."""
        self.passes += 1
        self.nodes_lost += lost
        self.last_sweep = time.monotonic()

    def render(self, nodes: list[NodeView]) -> bytes:
        with self._lock:
            self._nodes.nodes = nodes
            return generate_latest(self.registry)


class TimedPlacer(Placer):
    """The gateway's Placer: each placement decision (`reserve`) timed, by outcome."""

    def __init__(self, conn: Connection, metrics: GatewayMetrics, *, reservation_s: float) -> None:
        super().__init__(conn, reservation_s=reservation_s)
        self._metrics = metrics

    def reserve(self, demand: Demand, exclude: frozenset[str] = frozenset()) -> Reservation:
        started = time.perf_counter()
        outcome = "error"
        try:
            reservation = super().reserve(demand, exclude)
            outcome = "reserved"
            return reservation
        except NoCapacity:
            outcome = "no_capacity"
            raise
        finally:
            self._metrics.placement_seconds.labels(outcome).observe(time.perf_counter() - started)


class CountRequests:
    """ASGI middleware: each request's route template, status and time to the end of its response."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"] if scope["type"] == "http" else WEBSOCKET
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if status == 0:
                if message["type"] in ("http.response.start", "websocket.http.response.start"):
                    status = int(message["status"])
                elif message["type"] == "websocket.accept":
                    status = 101
                elif message["type"] == "websocket.close":
                    status = 403
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(method, route, str(status or 500)).inc()
            self.metrics.request_seconds.labels(method, route).observe(time.perf_counter() - started)


class LeaseMetrics(Collector):
    """An agent's lease: renewals and failed renewals, fences, whether it holds, its epoch."""

    def __init__(self, keeper: LeaseKeeper, fenced: Callable[[], int]) -> None:
        self._keeper = keeper
        self._fenced = fenced

    def collect(self) -> Iterable[Metric]:
        keeper = self._keeper
        lease = keeper.lease
        yield CounterMetricFamily(
            "tartarus_node_lease_renewals", "Lease renewals the database accepted", value=keeper.renewals
        )
        yield CounterMetricFamily(
            "tartarus_node_lease_renewal_failures",
            "Lease renewals that did not reach the database or failed there (the lease may still hold)",
            value=keeper.failures,
        )
        yield CounterMetricFamily(
            "tartarus_node_fenced",
            "Renewals refused: the lease lapsed or a newer epoch replaced it (the agent re-registers)",
            value=self._fenced(),
        )
        yield GaugeMetricFamily(
            "tartarus_node_lease_held",
            "1 while the lease certainly holds (the agent takes work)",
            value=int(keeper.holds()),
        )
        yield GaugeMetricFamily(
            "tartarus_node_epoch",
            "This node's registration epoch (its fencing token)",
            value=0 if lease is None else lease.epoch,
        )


class TransferMetrics(Collector):
    """Bytes an agent moved to and from the object store (compressed, as sent or fetched), by what they
    were: hibernation, checkpoint, snapshot."""

    def __init__(self, sent: Callable[[], dict[str, int]], fetched: Callable[[], dict[str, int]]) -> None:
        self._sent = sent
        self._fetched = fetched

    def collect(self) -> Iterable[Metric]:
        for name, doc, values in (
            ("tartarus_node_store_sent_bytes", "Bytes uploaded to the object store", self._sent()),
            ("tartarus_node_store_fetched_bytes", "Bytes downloaded from the object store", self._fetched()),
        ):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, n in sorted(values.items()):
                family.add_metric([kind], n)
            yield family
