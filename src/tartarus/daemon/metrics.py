"""Prometheus metrics of one daemon: latency histograms and gauges read from the manager at scrape time.

Names are stable and documented in docs/metrics.md. Each app has its own registry, so several daemons (or
test apps) in one process never collide.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tartarus.daemon.pools import ReadyStats

# `*_created` timestamp series only double the output; Prometheus does not need them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Sandbox operations under TCG take from milliseconds (exec) to a minute (cold boot).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# The admission decision (policy rules + quarantine verdict + placement) takes microseconds.
_ADMISSION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01)
# A cached image answers in milliseconds (one manifest request); a conversion takes seconds to minutes.
_CONVERT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# States reported even when no sandbox is in them, so dashboards see a 0 rather than a gap.
BASE_STATES = ("running", "failed")


class _SandboxGauges(Collector):
    def __init__(
        self,
        states: Callable[[], Iterable[str]],
        pooled: Callable[[], int],
        quarantined: Callable[[], int],
        ready: Callable[[], ReadyStats],
    ) -> None:
        self._states = states
        self._pooled = pooled
        self._quarantined = quarantined
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        counts = Counter({state: 0 for state in BASE_STATES})
        counts.update(self._states())
        sandboxes = GaugeMetricFamily(
            "tartarus_sandboxes", "Sandboxes this daemon holds, by state", labels=["state"]
        )
        for state, n in sorted(counts.items()):
            sandboxes.add_metric([state], n)
        yield sandboxes
        yield GaugeMetricFamily(
            "tartarus_pool_vmms", "Pre-started VMMs waiting in the restore pools", value=self._pooled()
        )
        ready = self._ready()
        yield GaugeMetricFamily(
            "tartarus_ready_sandboxes",
            "Ready sandboxes (restored, warmed) waiting for a create",
            value=ready.size,
        )
        yield CounterMetricFamily(
            "tartarus_ready_pool_hits", "Creates served by a ready sandbox", value=ready.hits
        )
        yield CounterMetricFamily(
            "tartarus_ready_pool_misses",
            "Creates of a template with a ready pool that restored instead (pool empty, another shape, "
            "a quarantine verdict)",
            value=ready.misses,
        )
        yield GaugeMetricFamily(
            "tartarus_sandboxes_quarantined", "Running sandboxes under quarantine", value=self._quarantined()
        )


class Metrics:
    def __init__(
        self,
        states: Callable[[], Iterable[str]],
        pooled: Callable[[], int],
        quarantined: Callable[[], int] = lambda: 0,
        ready: Callable[[], ReadyStats] = lambda: ReadyStats(0, 0, 0),
    ) -> None:
        self.registry = CollectorRegistry()
        self.create_seconds = Histogram(
            "tartarus_sandbox_create_seconds",
            "Create request admitted to sandbox ready, by how it was made and what runs it",
            ["method", "backend"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.overhead_seconds = Histogram(
            "tartarus_sandbox_create_api_overhead_seconds",
            "Server time of a create request beyond the runtime's own (auth, quota, store, audit)",
            buckets=_OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.exec_seconds = Histogram(
            "tartarus_exec_seconds",
            "Exec request to the command's exit (the whole streamed response)",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "tartarus_http_request_duration_seconds",
            "REST API request latency to the end of the response, by route",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.requests = PromCounter(
            "tartarus_http_requests",
            "REST API requests answered, by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.quota_rejections = PromCounter(
            "tartarus_quota_rejections",
            "Creates refused because a tenant quota would be exceeded",
            ["tenant"],
            registry=self.registry,
        )
        self.expired = PromCounter(
            "tartarus_sandboxes_expired",
            "Sandboxes destroyed because their timeout passed",
            registry=self.registry,
        )
        self.image_convert_seconds = Histogram(
            "tartarus_image_convert_seconds",
            "POST /v1/images: OCI reference to a bootable root filesystem, by whether it was cached",
            ["cache"],
            buckets=_CONVERT_BUCKETS,
            registry=self.registry,
        )
        for cache in ("hit", "miss"):  # both series from the start: a dashboard sees 0, not a gap
            self.image_convert_seconds.labels(cache)
        # The runtime's own operations, reported by the manager through `observe`.
        self.operation_seconds = {
            "wake": Histogram(
                "tartarus_wake_seconds",
                "Wake of a hibernated sandbox: no process held to its guest answering",
                buckets=_BUCKETS,
                registry=self.registry,
            ),
            "hibernate": Histogram(
                "tartarus_hibernate_seconds",
                "Hibernation: pause to the sandbox on disk and its VMM process gone",
                buckets=_BUCKETS,
                registry=self.registry,
            ),
            "admission": Histogram(
                "tartarus_admission_seconds",
                "Admission decision: policy rules, quarantine verdict and placement (in process)",
                buckets=_ADMISSION_BUCKETS,
                registry=self.registry,
            ),
        }
        self.registry.register(_SandboxGauges(states, pooled, quarantined, ready))

    def observe(self, operation: str, seconds: float) -> None:
        self.operation_seconds[operation].observe(seconds)
