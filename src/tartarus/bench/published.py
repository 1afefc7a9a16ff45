"""Figures from elsewhere that the report sets beside ours: what the original design claimed, and what
comparable systems publish. Each says what it measured and where it comes from; the measured figure it is
set against is named by where it sits in the results (benchmark, path, field), never written here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ours:
    """Where the comparable figure sits in our results, and how to print it."""

    benchmark: str
    path: tuple[str, ...]
    field: str
    label: str
    unit: str = "ms"  # "ms", "s", "MiB", "/s", or "" (a plain number)
    per_core: bool = False  # divided by the machine's cores (for rates published per core)
    context: tuple[str, str] | None = None  # (top-level field, text with {}) the figure depends on


@dataclass(frozen=True)
class Claim:
    figure: str
    measured: str
    ours: Ours


@dataclass(frozen=True)
class Published:
    system: str
    figure: str
    measures: str
    conditions: str
    source: str
    cite: str
    ours: Ours | None


# The four figures of the original design, and what produced each of them.
CLAIMS = (
    Claim(
        "python-ds cold start P99 81 ms",
        "a mocked 50 ms sleep: no VM was started",
        Ours("cold-start", (), "p99_ms", "cold-start P99, sequential"),
    ),
    Claim(
        "OCI → rootfs 10.8 s",
        "a download and untar on a laptop, no filesystem built",
        Ours("image-convert", (), "cold_s", "image-convert cold, median", "s"),
    ),
    Claim(
        "quarantine overhead 0.08 µs",
        "a map lookup, not the confinement itself",
        Ours("quarantine", (), "overhead_p99_ms", "admission decision incl. quarantine verdict, P99"),
    ),
    Claim(
        "wake-from-sleep P99 88 ms",
        "a test with no timing in it",
        Ours("wake", ("sequential", "wake"), "p99_ms", "wake P99, sequential"),
    ),
)

FIRECRACKER_SPEC = (
    "https://github.com/firecracker-microvm/firecracker/blob/"
    "0aad46c68d1c83150ca2123a8e7477458acc92ee/SPECIFICATION.md"
)
FIRECRACKER_SNAPSHOTS = (
    "https://github.com/firecracker-microvm/firecracker/blob/"
    "0151dbcd4f9703fdbc90abb3a295c4c446df5bf1/docs/snapshotting/snapshot-support.md"
)
FIRECRACKER_DESIGN = (
    "https://github.com/firecracker-microvm/firecracker/blob/"
    "4a3e9bd76d9fc57a3538c1aeb7e5687de43a0efa/docs/design.md"
)
# E2B's documentation (e2b.dev/docs), at the commit of its source that was read.
E2B_DOCS = (
    "https://github.com/e2b-dev/E2B/blob/3d4751f7ca13965b07a53ca27101d60c6db8468d/"
    "apps/web/src/app/(docs)/docs/page.mdx"
)
E2B_PERSISTENCE = (
    "https://github.com/e2b-dev/E2B/blob/035195433b658c1c9512705090a13ad28e5b6a97/"
    "apps/web/src/app/(docs)/docs/sandbox/persistence/page.mdx"
)

# Published figures of comparable systems, as their authors state them (bare-metal KVM hosts).
PUBLISHED = (
    Published(
        "Firecracker",
        "≤ 125 ms",
        "InstanceStart API call → guest /sbin/init starts",
        "minimal kernel and rootfs, serial console off, 1 vCPU, 128 MiB; AWS i3.metal",
        FIRECRACKER_SPEC,
        "Firecracker SPECIFICATION.md",
        Ours("boot", (), "p50_ms", "boot to agent answering, P50"),
    ),
    Published(
        "Firecracker",
        "≤ 8 CPU ms (wall clock 6 to 60 ms, typically 12 ms)",
        "VMM process start → API socket available",
        "AWS i3.metal",
        FIRECRACKER_SPEC,
        "Firecracker SPECIFICATION.md",
        None,
    ),
    Published(
        "Firecracker",
        "< 8 ms, P90 5 ms (CI target)",
        "snapshot resume (load + resume of the microVM, no guest work)",
        "2 vCPU, 512 MiB, 1 block and 1 net device; AWS m5d.metal",
        FIRECRACKER_SNAPSHOTS,
        "Firecracker docs: snapshot support",
        Ours(
            "cold-start",
            ("phases_cumulative", "guest_resumed"),
            "p90_ms",
            "cold-start, guest resumed (cumulative), P90",
        ),
    ),
    Published(
        "Firecracker",
        "≤ 5 MiB",
        "VMM memory overhead (guest memory not counted)",
        "1 vCPU, 128 MiB guest",
        FIRECRACKER_SPEC,
        "Firecracker SPECIFICATION.md",
        Ours("density", (), "pss_mib_per_sandbox", "host PSS per idle sandbox, guest memory included", "MiB"),
    ),
    Published(
        "Firecracker",
        "5 microVMs per host core per second",
        "steady creation rate",
        "minimal kernel, 1 vCPU, 128 MiB",
        FIRECRACKER_DESIGN,
        "Firecracker docs: design",
        Ours(
            "throughput",
            (),
            "peak_sandboxes_per_s",
            "peak sandboxes per second per core",
            "/s",
            per_core=True,
        ),
    ),
    Published(
        "E2B",
        "~150 ms",
        "sandbox start",
        "hosted service; client-side conditions not stated",
        E2B_DOCS,
        "E2B documentation (e2b.dev/docs)",
        Ours("cold-start", ("api",), "p50_ms", "cold-start through the REST API, P50"),
    ),
    Published(
        "E2B",
        "about 1 s",
        "resume of a paused sandbox (memory and filesystem)",
        "hosted service, persistence beta",
        E2B_PERSISTENCE,
        "E2B documentation: sandbox persistence",
        Ours(
            "wake",
            ("sequential", "wake"),
            "p50_ms",
            "wake P50, sequential",
            context=("dirty_mib", "the sandbox owning {} MiB"),
        ),
    ),
    Published(
        "E2B",
        "about 4 s per GiB of RAM",
        "pause of a sandbox (memory and filesystem saved)",
        "hosted service, persistence beta",
        E2B_PERSISTENCE,
        "E2B documentation: sandbox persistence",
        Ours(
            "hibernate",
            ("sequential", "hibernate"),
            "p50_ms",
            "hibernate P50, sequential",
            context=("dirty_mib", "the sandbox owning {} MiB"),
        ),
    ),
)
