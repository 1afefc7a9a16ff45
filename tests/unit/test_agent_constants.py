"""The guest agent's C sources and the host's protocol module spell the same protocol twice: read the
numbers out of agent/ and compare them, so a change on one side alone fails here, not inside a guest."""

from __future__ import annotations

import re

from tartarus.bootfiles.initramfs import AGENT_SRC
from tartarus.runtime import protocol
from tartarus.runtime.flow import FRAME_COST
from tartarus.runtime.protocol import INT_FIELDS, F, T
from tartarus.runtime.qemu import AGENT_PORT

HEADER = (AGENT_SRC / "agent.h").read_text()


def _enum(first: str) -> dict[str, int]:
    """The members of the C enum whose first member is `first`, valued as C values them."""
    match = re.search(r"enum \{([^}]*\b" + first + r"\b[^}]*)\}", HEADER)
    assert match, f"no enum starting with {first} in agent.h"
    values: dict[str, int] = {}
    value = -1
    for item in match.group(1).split(","):
        name, _, number = item.strip().partition("=")
        if not name.strip():
            continue
        value = int(number.strip(), 0) if number else value + 1
        values[name.strip()] = value
    return values


def _define(name: str) -> str:
    match = re.search(rf"^#define {name}\s+(.+?)\s*(?:/\*.*)?$", HEADER, re.M)
    assert match, f"no #define {name} in agent.h"
    return match.group(1)


def _c_int(expr: str) -> int:
    shifted = re.fullmatch(r"\((\d+)u? << (\d+)\)", expr)
    return int(shifted.group(1)) << int(shifted.group(2)) if shifted else int(expr, 0)


def test_frame_types_match() -> None:
    agent = {name.removeprefix("T_"): v for name, v in _enum("T_PING").items()}
    assert agent == {t.name: t.value for t in T}


def test_field_tags_match() -> None:
    agent = {name.removeprefix("F_"): v for name, v in _enum("F_ARGV").items() if name != "F_MAX"}
    assert agent == {f.name: f.value for f in F}


def test_integer_fields_match() -> None:
    table = (AGENT_SRC / "frame.c").read_text()
    kinds = dict(re.findall(r"\[F_(\w+)\] = \{ (K_\w+),", table))
    assert set(kinds) == {f.name for f in F}, "every field has a kind in frame.c's table"
    assert {F[name] for name, kind in kinds.items() if kind == "K_INT"} == INT_FIELDS


def test_limits_and_names_match() -> None:
    assert int(_define("PROTO_VERSION")) == protocol.VERSION
    assert _c_int(_define("MAX_PAYLOAD")) == protocol.MAX_PAYLOAD
    assert int(_define("HDR_LEN")) == protocol.HEADER_SIZE
    assert int(_define("PTY_MAX_SIZE")) == protocol.PTY_MAX_SIZE
    assert _define("INPUT_MAX") == f"({protocol.INPUT_MAX // 1024} * 1024)"
    for flag in ("EOF", "KEEP", "PTY", "STDIN", "ATTACHED"):
        assert int(_define(f"FLAG_{flag}")) == getattr(protocol, f"FLAG_{flag}"), flag
    assert int(_define("FRAME_COST")) == FRAME_COST
    assert _define("PORT_NAME") == f'"{AGENT_PORT}"'
