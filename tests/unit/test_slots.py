"""Host-wide uplink slot claims: distinct under contention, stale ones taken over, releases exact."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tartarus.errors import SandboxFailed
from tartarus.network import netns


@pytest.fixture
def slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(netns, "SLOTS_DIR", tmp_path / "slots")
    monkeypatch.setattr(netns, "SLOTS_LOCK", tmp_path / "slots.lock")
    monkeypatch.setattr(netns, "NETNS_DIR", tmp_path / "netns")
    monkeypatch.setattr(netns, "SLOTS", 8)
    (tmp_path / "netns").mkdir()
    return tmp_path


def _live(root: Path, name: str) -> str:
    (root / "netns" / name).touch()
    return name


def _together(names: list[str], work: object) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            work(name)  # type: ignore[operator]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_claims_and_releases_never_share_a_slot(slots: Path) -> None:
    netns.SLOTS = 64  # a scan can miss a slot freed behind it; leave room, as 16384 do
    names = [_live(slots, f"tartarus-{i}") for i in range(6)]
    held: set[int] = set()
    guard = threading.Lock()

    def churn(name: str) -> None:
        for _ in range(300):
            slot = netns.claim_slot(name)
            with guard:
                assert slot not in held
                held.add(slot)
            assert (slots / "slots" / str(slot)).read_text() == name
            with guard:
                held.discard(slot)
            netns.release_slot(slot, name)

    assert _together(names, churn) == []
    assert list((slots / "slots").iterdir()) == []


def test_concurrent_takeovers_of_stale_slots_never_share_one(slots: Path) -> None:
    (slots / "slots").mkdir()
    for round_ in range(30):
        for i in range(8):
            (slots / "slots" / str(i)).write_text(f"tartarus-dead{i}")
        names = [_live(slots, f"tartarus-r{round_}-{i}") for i in range(8)]
        got: dict[str, int] = {}
        assert _together(names, lambda n, got=got: got.__setitem__(n, netns.claim_slot(n))) == []
        assert sorted(got.values()) == list(range(8))
        for name, slot in got.items():
            assert (slots / "slots" / str(slot)).read_text() == name
        for name in names:
            (slots / "netns" / name).unlink()


def test_a_slot_whose_namespace_is_gone_is_taken_over(slots: Path) -> None:
    for i in range(8):
        (slots / "slots").mkdir(exist_ok=True)
        (slots / "slots" / str(i)).write_text(f"tartarus-dead{i}" if i == 5 else _live(slots, f"live{i}"))
    assert netns.claim_slot(_live(slots, "tartarus-new")) == 5
    assert (slots / "slots" / "5").read_text() == "tartarus-new"
    with pytest.raises(SandboxFailed, match="no free network uplink slot"):
        netns.claim_slot(_live(slots, "tartarus-more"))


def test_release_leaves_another_owners_claim(slots: Path) -> None:
    slot = netns.claim_slot(_live(slots, "tartarus-a"))
    netns.release_slot(slot, "tartarus-b")
    assert (slots / "slots" / str(slot)).read_text() == "tartarus-a"
    netns.release_slot(slot, "tartarus-a")
    assert not (slots / "slots" / str(slot)).exists()
    netns.release_slot(slot, "tartarus-a")  # twice is harmless
