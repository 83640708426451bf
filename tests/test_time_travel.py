"""Time travel reads back every past state exactly as it was live."""

from __future__ import annotations

import copy
import dataclasses

import pytest

import perdure
from perdure.testing import FakeClock

calls: list[str] = []


def fee(key: str, cents: int) -> int:
    calls.append(key)
    return cents // 10


@dataclasses.dataclass
class Ledger:
    cents: int = 0
    fees: int = 0
    entries: list[str] = dataclasses.field(default_factory=list)


class Book(perdure.Actor[Ledger]):
    durability = perdure.DurabilityFacet(checkpoint_every=4)

    async def post(self, ctx: perdure.Context, label: str, cents: int) -> Ledger:
        charged = await ctx.run("fee", fee, self.key, cents)
        self.state.cents += cents - charged
        self.state.fees += charged
        self.state.entries.append(label)
        return copy.deepcopy(self.state)

    async def refuse(self, ctx: perdure.Context) -> None:
        self.state.entries.append("never kept")
        raise perdure.TerminalError("refused")


@pytest.mark.parametrize("restart", [False, True], ids=["same-runtime", "after-restart"])
async def test_state_at_every_message_equals_the_live_state(store_url: str, restart: bool) -> None:
    store = perdure.storage.open_store(store_url)
    live: dict[int, Ledger] = {0: Ledger()}
    async with perdure.Runtime(store, actors=[Book], clock=FakeClock()) as rt:
        book = rt.client.actor(Book, "b")
        for i in range(1, 15):
            if i % 5 == 0:
                with pytest.raises(perdure.InvocationFailedError):
                    await book.ask(Book.refuse)
                live[i] = live[i - 1]
            else:
                live[i] = await book.ask(Book.post, f"e{i}", i * 100)
        if not restart:
            await check(book, live)
    if restart:
        async with perdure.Runtime(store, actors=[Book], clock=FakeClock()) as rt:
            await check(rt.client.actor(Book, "b"), live)


async def check(book: perdure.ActorRef, live: dict[int, Ledger]) -> None:
    before = len(calls)
    history = await book.history()
    assert [m.actor_seq for m in history] == list(range(1, 15))
    for seq, state in live.items():
        assert await book.state_at(seq) == state, f"state after message {seq}"
    assert await book.state_at() == live[14]
    # Lists of different lengths change as a whole.
    assert await book.diff(3, 4) == {
        "cents": (live[3].cents, live[4].cents),
        "fees": (live[3].fees, live[4].fees),
        "entries": (live[3].entries, live[4].entries),
    }
    assert await book.diff(5, 5) == {}
    assert len(calls) == before, "time travel made an external call"
