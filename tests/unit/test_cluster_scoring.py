"""The placement scoring formula and filters alone (pure functions, no database)."""

from __future__ import annotations

import pytest

from tartarus.cluster.model import Demand, Resources
from tartarus.cluster.scoring import ORIGIN_BONUS, TEMPLATE_BONUS, Candidate, eligible, fits, rank, score
from tartarus.errors import InvalidArgument

NOTHING = Resources()
CAP = Resources(vcpus=8, memory_mib=8192, disk_mib=10000, slots=10)


def node(
    name: str,
    used: Resources = NOTHING,
    labels: set[str] | None = None,
    templates: set[str] | None = None,
) -> Candidate:
    return Candidate(name, f"{name}:1", 1, CAP, used, frozenset(labels or ()), frozenset(templates or ()))


def demand(**kw: object) -> Demand:
    base: dict[str, object] = {
        "sandbox_id": "sb1",
        "vcpus": 2,
        "memory_mib": 1024,
        "disk_mib": 0,
        "template": "py",
    }
    return Demand(**{**base, **kw})  # type: ignore[arg-type]


def test_score_is_the_dominant_share_after_placing() -> None:
    # memory dominates: (4096 + 1024) / 8192 = 0.625 > vCPUs (2 + 2) / 8 = 0.5 > slots 4 / 10
    used = Resources(vcpus=2, memory_mib=4096, slots=3)
    assert score(node("a", used), demand()) == pytest.approx(0.625)


def test_template_and_origin_bonuses_subtract_in_load_units() -> None:
    plain = score(node("a"), demand())
    assert score(node("a", templates={"py"}), demand()) == pytest.approx(plain - TEMPLATE_BONUS)
    assert score(node("a"), demand(origin="a")) == pytest.approx(plain - ORIGIN_BONUS)
    assert score(node("b"), demand(origin="a")) == pytest.approx(plain)


def test_locality_wins_between_similar_loads_but_not_over_a_much_emptier_node() -> None:
    similar = [node("busy", Resources(memory_mib=1024, slots=1), templates={"py"}), node("empty")]
    assert rank(similar, demand())[0].candidate.name == "busy"
    crowded = [node("full-ish", Resources(memory_mib=6144, slots=6), templates={"py"}), node("empty")]
    assert rank(crowded, demand())[0].candidate.name == "empty"


def test_nodes_without_room_are_left_out() -> None:
    full = node("full", Resources(vcpus=7, memory_mib=100, slots=1))
    assert not fits(full, demand())
    assert [r.candidate.name for r in rank([full, node("ok")], demand())] == ["ok"]
    no_slot = node("slots", Resources(slots=10))
    assert rank([no_slot], demand()) == []


def test_quarantine_only_on_quarantine_nodes_and_they_take_nothing_else() -> None:
    q, plain = node("q", labels={"quarantine"}), node("plain")
    assert eligible(q, demand(quarantine=True)) and not eligible(plain, demand(quarantine=True))
    assert eligible(plain, demand()) and not eligible(q, demand())


def test_required_labels_must_all_be_present() -> None:
    gpu = node("gpu", labels={"gpu", "ssd"})
    assert eligible(gpu, demand(labels=frozenset({"gpu"})))
    assert not eligible(node("x", labels={"ssd"}), demand(labels=frozenset({"gpu"})))


def test_ties_break_by_name_so_the_choice_is_deterministic() -> None:
    assert [r.candidate.name for r in rank([node("b"), node("a"), node("c")], demand())] == ["a", "b", "c"]


def test_bad_demands_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        demand(vcpus=0)
    with pytest.raises(InvalidArgument):
        demand(sandbox_id="../etc")
    with pytest.raises(InvalidArgument):
        Resources(vcpus=-1)
