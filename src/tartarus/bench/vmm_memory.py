"""What a VMM's host memory is made of, from `/proc/PID/smaps`: guest RAM, TCG code, heap, binaries.

PSS splits a page between the processes that map it (the template's memory file and QEMU's libraries
are shared by every sandbox of a host); `private` is what this VMM alone holds, what an extra sandbox
costs once enough share the rest. Page tables are kernel memory outside PSS, so they are counted apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S{4}) \S+ \S+ \S+\s*(.*)$")


@dataclass(frozen=True)
class Usage:
    pss_kib: int = 0
    private_kib: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.pss_kib + other.pss_kib, self.private_kib + other.private_kib)


@dataclass(frozen=True)
class VmmMemory:
    """One VMM's (or, summed, several VMMs') host memory by what it holds."""

    guest_ram: Usage = Usage()  # the memory file's pages: the template's shared, the guest's own writes
    tcg_code: Usage = Usage()  # TCG's translation buffer (the one executable anonymous mapping)
    heap: Usage = Usage()  # brk heap and anonymous mappings: malloc arenas, QEMU's buffers, stacks
    binaries: Usage = Usage()  # QEMU and its libraries: text shared, relocated data private
    other: Usage = Usage()
    page_tables_kib: int = 0  # VmPTE: not in PSS

    def __add__(self, other: VmmMemory) -> VmmMemory:
        return VmmMemory(
            self.guest_ram + other.guest_ram,
            self.tcg_code + other.tcg_code,
            self.heap + other.heap,
            self.binaries + other.binaries,
            self.other + other.other,
            self.page_tables_kib + other.page_tables_kib,
        )

    @property
    def total(self) -> Usage:
        return self.guest_ram + self.tcg_code + self.heap + self.binaries + self.other


def _category(perms: str, name: str, guest_ram: Path) -> str:
    if name == str(guest_ram):
        return "guest_ram"
    if not name or name == "[heap]" or name == "[stack]" or name.startswith("[anon"):
        return "tcg_code" if "x" in perms and name != "[stack]" else "heap"
    if name.startswith("/"):
        return "binaries"
    return "other"


def parse(smaps: str, status: str, guest_ram: Path) -> VmmMemory:
    """The breakdown of one process from its smaps and status texts; `guest_ram` is the file its guest
    RAM maps (mirrored at the same path inside a jail)."""
    pss: dict[str, int] = {}
    private: dict[str, int] = {}
    category = "other"
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header is not None:
            category = _category(header[1], header[2], guest_ram)
            continue
        key, _, value = line.partition(":")
        if key == "Pss":
            pss[category] = pss.get(category, 0) + int(value.split()[0])
        elif key in ("Private_Clean", "Private_Dirty"):
            private[category] = private.get(category, 0) + int(value.split()[0])
    pte = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmPTE:")), 0)

    def usage(name: str) -> Usage:
        return Usage(pss.get(name, 0), private.get(name, 0))

    return VmmMemory(
        usage("guest_ram"), usage("tcg_code"), usage("heap"), usage("binaries"), usage("other"), pte
    )


def read(pid: int, guest_ram: Path) -> VmmMemory:
    proc = Path(f"/proc/{pid}")
    return parse((proc / "smaps").read_text(), (proc / "status").read_text(), guest_ram)
