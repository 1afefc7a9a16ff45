"""What a restarted daemon makes of the `.<id>.waking` directories a wake cut short left (the file logic
of `capture.recover_wakes`; tests/vm/test_hibernation_crash.py and test_served_crash.py kill real daemons)."""

from __future__ import annotations

from pathlib import Path

from tartarus.sandbox import capture
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.saved import GVISOR_IMAGE, META


def _waking(layout: Layout, sandbox_id: str, *files: str) -> Path:
    path = layout.sandboxes / f".{sandbox_id}.waking"
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text(name)
    return path


def test_a_wake_whose_guest_never_ran_goes_back_to_hibernation(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    _waking(layout, "sb-1", META, "memory.state", "layer.ext4")
    assert capture.recover_wakes(layout) == (["sb-1"], [])
    back = layout.hibernated / "sb-1"
    assert sorted(p.name for p in back.iterdir()) == sorted([META, "layer.ext4", "memory.state"])
    assert (back / "layer.ext4").read_text() == "layer.ext4"  # the same files, not copies of nothing
    assert not list(layout.sandboxes.iterdir())


def test_a_wake_whose_guest_may_have_run_is_lost(tmp_path: Path) -> None:
    """Its memory saved sandbox is older than its layer: restoring both would give the guest a disk that
    changed under its page cache."""
    layout = Layout(tmp_path)
    _waking(layout, "sb-2", META, "memory.state", "layer.ext4", capture.RESUMED)
    _waking(layout, "sb-3", META, "memory.state", capture.RESUMED)  # its layer already moved to the VMM
    assert capture.recover_wakes(layout) == ([], ["sb-2", "sb-3"])
    assert not list(layout.sandboxes.iterdir())
    assert not layout.hibernated.exists()


def test_an_incomplete_waking_directory_is_never_published(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    _waking(layout, "sb-4", META, "memory.state")
    assert capture.recover_wakes(layout) == ([], ["sb-4"])
    assert not (layout.hibernated / "sb-4").exists()


def test_other_directories_are_left_to_the_reaper(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    (layout.sandboxes / "sb-5").mkdir(parents=True)
    assert capture.recover_wakes(layout) == ([], [])
    assert (layout.sandboxes / "sb-5").exists()


def test_a_gvisor_wake_cut_short_goes_back_to_hibernation_whole(tmp_path: Path) -> None:
    """A runsc image is never written by the sandbox restored from it: whatever step the daemon died
    at, the waking directory is still the sandbox. Without its image it is not."""
    layout = Layout(tmp_path)
    waking = _waking(layout, "sb-6", META)
    (waking / GVISOR_IMAGE).mkdir()
    (waking / GVISOR_IMAGE / "pages.img").write_text("pages")
    _waking(layout, "sb-7", META)
    assert capture.recover_wakes(layout) == (["sb-6"], ["sb-7"])
    assert (layout.hibernated / "sb-6" / GVISOR_IMAGE / "pages.img").read_text() == "pages"
    assert not list(layout.sandboxes.iterdir())
