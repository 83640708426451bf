"""Journal retention for durable actors: DurabilityFacet(compact_journal=True)."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import pytest

import perdure
from perdure import JournalDecodeError
from perdure.storage import open_store
from perdure.testing import FakeClock


@dataclasses.dataclass
class Total:
    cents: int = 0


def credit(cents: int) -> int:
    return cents


class Compacted(perdure.Actor[Total]):
    durability = perdure.DurabilityFacet(
        checkpoint_every=2, retain_checkpoints=2, compact_journal=True
    )

    async def add(self, ctx: perdure.Context, cents: int) -> int:
        self.state.cents += await ctx.run("credit", credit, cents)
        return self.state.cents


class Kept(perdure.Actor[Total]):
    durability = perdure.DurabilityFacet(checkpoint_every=2, retain_checkpoints=2)

    async def add(self, ctx: perdure.Context, cents: int) -> int:
        self.state.cents += await ctx.run("credit", credit, cents)
        return self.state.cents


async def journal_sizes(rt: perdure.Runtime, actor: type[perdure.Actor[Total]]) -> list[int]:
    history = await rt.client.actor(actor, "k").history()
    return [len(await rt.client.journal(m.id)) for m in history]


@pytest.mark.parametrize("actor", [Compacted, Kept], ids=["compacted", "kept"])
async def test_compaction_drops_journals_covered_by_the_oldest_checkpoint(
    tmp_path: Path, actor: type[perdure.Actor[Total]]
) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    async with perdure.Runtime(url, actors=[actor], clock=FakeClock()) as rt:
        ref = rt.client.actor(actor, "k")
        for cents in range(1, 11):
            await ref.ask(actor.add, cents)  # type: ignore[attr-defined]
        sizes = await journal_sizes(rt, actor)
    # Checkpoints after messages 2, 4, ..., 10; the two newest (8, 10) are kept.
    if actor is Compacted:
        assert sizes == [0] * 8 + [3, 3]
    else:
        assert sizes == [3] * 10
    async with perdure.Runtime(url, actors=[actor], clock=FakeClock()) as rt:
        ref = rt.client.actor(actor, "k")
        assert await ref.state_at() == Total(55)
        assert await ref.state_at(9) == Total(45)
        assert await ref.ask(actor.add, 100) == 155  # type: ignore[attr-defined]
        if actor is Compacted:
            with pytest.raises(JournalDecodeError, match="compacted"):
                await ref.state_at(3)
        else:
            assert await ref.state_at(3) == Total(6)


async def test_unreadable_checkpoints_over_a_compacted_journal_are_a_clear_error(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    async with perdure.Runtime(url, actors=[Compacted], clock=FakeClock()) as rt:
        ref = rt.client.actor(Compacted, "k")
        for cents in range(1, 11):
            await ref.ask(Compacted.add, cents)
    with contextlib.closing(sqlite3.connect(f"{tmp_path}/x.db")) as conn:
        conn.execute("UPDATE checkpoints SET checksum = 'bad'")
        conn.commit()
    async with perdure.Runtime(url, actors=[Compacted], clock=FakeClock()) as rt:
        with pytest.raises(JournalDecodeError, match="cannot be rebuilt"):
            await rt.client.actor(Compacted, "k").ask(Compacted.add, 1)
        # Nothing recorded was touched: the invocations are all still there.
        assert len(await rt.client.list(limit=None)) == 10


async def test_memory_store_compacts_the_same_way() -> None:
    store = open_store("memory://")
    async with perdure.Runtime(store, actors=[Compacted], clock=FakeClock()) as rt:
        ref = rt.client.actor(Compacted, "k")
        for cents in range(1, 11):
            await ref.ask(Compacted.add, cents)
        assert await journal_sizes(rt, Compacted) == [0] * 8 + [3, 3]
        assert await ref.state_at() == Total(55)


def test_compact_journal_must_be_a_bool() -> None:
    with pytest.raises(perdure.ConfigurationError, match="compact_journal"):
        perdure.DurabilityFacet(compact_journal="yes")  # type: ignore[arg-type]
