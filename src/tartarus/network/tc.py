"""Traffic shaping of a sandbox's namespace, as `tc -batch` text: pure, so it is unit-tested without a kernel.

Both directions are shaped where they leave the namespace, so no ingress policing (which drops rather
than queues, and needs an IFB device) is involved: guest egress on the uplink (`up0`, towards the host)
and guest ingress on the TAP (`tap0`, towards the guest). A token bucket (tbf) per device: `burst` lets
a tenth of a second (at least 64 KiB, which also covers GSO packets) through at line rate, so the rate
over any longer transfer stays within a few per cent of the limit. An unlimited direction gets a plain
FIFO back, which is also how a quarantine's or a policy's lower rate is undone.
"""

from __future__ import annotations

from tartarus.network.nft import TAP, UPLINK

MIN_BURST = 64 << 10
LATENCY_MS = 50  # the longest a packet may wait in the bucket's queue before it is dropped


def _qdisc(device: str, bytes_per_s: int | None) -> str:
    if bytes_per_s is None:
        return f"qdisc replace dev {device} root pfifo limit 1000"
    if bytes_per_s <= 0:
        raise ValueError(f"a rate must be positive, not {bytes_per_s}")
    burst = max(bytes_per_s // 10, MIN_BURST)
    return (
        f"qdisc replace dev {device} root tbf rate {bytes_per_s * 8}bit burst {burst} latency {LATENCY_MS}ms"
    )


def shaping(egress_bytes_per_s: int | None, ingress_bytes_per_s: int | None) -> str:
    """The namespace's two qdiscs for these rates (None: unlimited)."""
    return _qdisc(UPLINK, egress_bytes_per_s) + "\n" + _qdisc(TAP, ingress_bytes_per_s) + "\n"
