"""The host-memory breakdown of a VMM (`bench density`) from smaps: each mapping counted once, where it
belongs."""

from __future__ import annotations

from pathlib import Path

from tartarus.bench.density import breakdown_mib, checkpoints
from tartarus.bench.vmm_memory import Usage, VmmMemory, parse

RAM = Path("/c/snapshots/abc/memory")


def _mapping(header: str, pss: int, clean: int, dirty: int) -> str:
    return (
        f"{header}\nSize: 999 kB\nRss: {pss + 7} kB\nPss: {pss} kB\nPss_Dirty: {dirty} kB\n"
        f"Shared_Clean: 7 kB\nPrivate_Clean: {clean} kB\nPrivate_Dirty: {dirty} kB\nVmFlags: rd wr mr\n"
    )


SMAPS = "".join(
    [
        _mapping("55d0-55d1 r-xp 00000000 fe:00 12 /usr/bin/qemu-system-x86_64", 1400, 0, 0),
        _mapping("55d1-55d2 rw-p 00001000 fe:00 12 /usr/bin/qemu-system-x86_64", 1200, 0, 1200),
        _mapping("55d3-55d4 rw-p 00000000 00:00 0                          [heap]", 4096, 0, 4096),
        _mapping("7f00-7f01 rw-p 00000000 00:00 0 ", 2000, 0, 2000),
        _mapping("7f01-7f02 rwxp 00000000 00:00 0 ", 10240, 0, 10240),
        _mapping(f"7f02-7f03 rw-p 00000000 fe:00 77 {RAM}", 9000, 0, 2048),
        _mapping("7f03-7f04 r--p 00000000 fe:00 78 /usr/lib/libcapstone.so.4", 1700, 60, 1312),
        _mapping("7ffd-7ffe rw-p 00000000 00:00 0                          [stack]", 44, 0, 44),
        _mapping("7ffe-7fff r-xp 00000000 00:00 0                          [vdso]", 0, 0, 0),
    ]
)
STATUS = "Name:\tqemu-system-x86\nVmRSS:\t 80000 kB\nVmPTE:\t     500 kB\nThreads:\t5\n"


def test_each_mapping_is_counted_once_under_what_it_holds() -> None:
    seen = parse(SMAPS, STATUS, RAM)
    assert seen.guest_ram == Usage(9000, 2048)
    assert seen.tcg_code == Usage(10240, 10240)  # executable and anonymous: TCG's code buffer
    assert seen.heap == Usage(4096 + 2000 + 44, 4096 + 2000 + 44)
    assert seen.binaries == Usage(1400 + 1200 + 1700, 1200 + 60 + 1312)
    assert seen.other == Usage(0, 0)
    assert seen.page_tables_kib == 500
    assert seen.total.pss_kib == 1400 + 1200 + 4096 + 2000 + 10240 + 9000 + 1700 + 44


def test_another_file_at_a_ram_like_path_is_not_guest_ram() -> None:
    seen = parse(SMAPS, STATUS, Path("/c/snapshots/other/memory"))
    assert seen.guest_ram == Usage() and seen.binaries.pss_kib == 1400 + 1200 + 1700 + 9000


def test_vmms_sum_and_break_down_per_sandbox() -> None:
    one = parse(SMAPS, STATUS, RAM)
    two = one + one
    assert two.total == Usage(2 * one.total.pss_kib, 2 * one.total.private_kib)
    assert two.page_tables_kib == 1000
    per = breakdown_mib(two, 2)
    assert per["tcg_code"] == {"pss": 10.0, "private": 10.0}
    assert per["page_tables"] == {"kernel": round(500 / 1024, 2)}
    assert set(per) == {"guest_ram", "tcg_code", "heap", "binaries", "other", "page_tables"}
    assert VmmMemory() + one == one


def test_checkpoints_end_at_the_count_asked_for() -> None:
    assert checkpoints(1) == [1]
    assert checkpoints(40) == [1, 10, 40]
    assert checkpoints(500) == [1, 10, 50, 100, 250, 500]
    assert checkpoints(600) == [1, 10, 50, 100, 250, 500, 600]
