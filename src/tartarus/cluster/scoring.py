"""Which node a sandbox should go to: pure filtering and ranking, so the formula is unit-tested alone.

score = load_after - TEMPLATE_BONUS*[node holds the template snapshot] - ORIGIN_BONUS*[node is the origin]

where load_after is the dominant share after placing: max over vCPUs, memory, disk and slots of
(used + reserved + this sandbox) / capacity. The lowest score wins; ties go to the node name, so the
choice is deterministic for a given state.

Compared with E2B's (reserved + in-flight + 0.5*CPU use) / (4 x CPUs) over K=3 sampled nodes: we count
memory, disk and slots as well as CPUs, because a microVM's memory is what usually runs out first and a
node advertises the vCPUs it is willing to overcommit to rather than getting a fixed x4 here; we rank every
candidate instead of a sample, since the rows come from one indexed query and 64 nodes rank in
microseconds; and concurrent placers spread out because the reservation step skips nodes another placer
has locked (see placement). The bonuses are in units of load: holding the template (restore from a local
snapshot instead of fetching one) is worth 10 % of a node, waking on the origin node (its chunks are
still on local disk) 30 %, so locality wins between similarly loaded nodes but never overloads one.
"""

from __future__ import annotations

from dataclasses import dataclass

from tartarus.cluster.model import QUARANTINE, Demand, Resources

TEMPLATE_BONUS = 0.1
ORIGIN_BONUS = 0.3


@dataclass(frozen=True)
class Candidate:
    """A healthy, schedulable node as the placement query saw it."""

    name: str
    address: str
    epoch: int
    capacity: Resources
    used: Resources
    labels: frozenset[str]
    templates: frozenset[str]


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    score: float


def eligible(node: Candidate, demand: Demand, required: frozenset[str] | None = None) -> bool:
    """Labels match (quarantine capacity serves only quarantine verdicts, and only it serves them)."""
    if not (demand.required_labels if required is None else required) <= node.labels:
        return False
    return demand.quarantine or QUARANTINE not in node.labels


# Plain arithmetic below, not Resources objects: rank() runs these for every node on every placement.


def fits(node: Candidate, demand: Demand) -> bool:
    cap, used = node.capacity, node.used
    return (
        used.vcpus + demand.vcpus <= cap.vcpus
        and used.memory_mib + demand.memory_mib <= cap.memory_mib
        and used.disk_mib + demand.disk_mib <= cap.disk_mib
        and used.slots + 1 <= cap.slots
    )


def _share(used: int, need: int, capacity: int) -> float:
    return (used + need) / capacity if capacity else 1.0


def load_after(capacity: Resources, used: Resources, demand: Demand) -> float:
    load = max(
        _share(used.vcpus, demand.vcpus, capacity.vcpus),
        _share(used.memory_mib, demand.memory_mib, capacity.memory_mib),
        _share(used.slots, 1, capacity.slots),
    )
    if demand.disk_mib:
        load = max(load, _share(used.disk_mib, demand.disk_mib, capacity.disk_mib))
    return load


def score(node: Candidate, demand: Demand) -> float:
    value = load_after(node.capacity, node.used, demand)
    if demand.template in node.templates:
        value -= TEMPLATE_BONUS
    if demand.origin is not None and demand.origin == node.name:
        value -= ORIGIN_BONUS
    return value


def rank(nodes: list[Candidate], demand: Demand) -> list[Ranked]:
    """Eligible nodes with room, best first."""
    required = demand.required_labels
    ranked = [Ranked(n, score(n, demand)) for n in nodes if eligible(n, demand, required) and fits(n, demand)]
    ranked.sort(key=lambda r: (r.score, r.candidate.name))
    return ranked
