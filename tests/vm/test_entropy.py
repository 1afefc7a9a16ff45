"""The host's fresh seed reaches each restored clone.

Clones of one snapshot share its RNG state; the host sends each one 64 fresh random bytes in CONFIGURE
and the agent mixes them in and reseeds. The clones' outputs would differ anyway (clock, the kernel's own
reseed), so distinct outputs prove nothing about the seed: this test watches the CONFIGURE frames the
host writes to the agent across two real restores and the agent's answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from tartarus.runtime.agent import AgentClient
from tartarus.runtime.protocol import HEADER, HEADER_SIZE, F, Fields, FieldValue, T
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.templates.built import Template


def test_each_restore_sends_a_fresh_seed_the_agent_accepts(
    python_ds: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds: list[bytes | None] = []  # the ENTROPY field of each CONFIGURE frame, as written
    answered: list[T] = []  # CONFIGURE calls the agent answered OK (an error raises instead)
    send, call = AgentClient._send, AgentClient._call

    async def spy_send(self: AgentClient, data: bytes) -> None:
        length, _id, type_, _flags, _reserved = HEADER.unpack_from(data)
        if type_ == T.CONFIGURE:
            seeds.append(Fields.decode(data[HEADER_SIZE : HEADER_SIZE + length]).get_bytes(F.ENTROPY))
        await send(self, data)

    async def spy_call(self: AgentClient, type_: T, items: Sequence[tuple[F, FieldValue]] = ()) -> Fields:
        fields = await call(self, type_, items)
        if type_ == T.CONFIGURE:
            answered.append(type_)
        return fields

    monkeypatch.setattr(AgentClient, "_send", spy_send)
    monkeypatch.setattr(AgentClient, "_call", spy_call)
    snapshot = ensure_snapshot(python_ds)

    async def main() -> None:
        for _ in range(2):
            sandbox = await Sandbox.restore(snapshot, python_ds, tmp_path)
            await sandbox.destroy()

    asyncio.run(main())
    assert len(seeds) == 2 and len(answered) == 2, (seeds, answered)
    first, second = seeds
    assert first is not None and second is not None, "CONFIGURE carried no seed"
    assert len(first) >= 32 and len(second) >= 32, "a seed shorter than the CRNG's 256 bits"
    assert first != second, "the same seed twice: not fresh"
    for seed in (first, second):
        assert len(set(seed)) > 8, f"a seed of {len(set(seed))} distinct bytes is no seed: {seed.hex()}"
