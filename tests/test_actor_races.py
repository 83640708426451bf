"""Races around a durable actor's mailbox: a sender cancelled while its
message is being recorded, and a node losing an actor's partition while a
caller waits for a message in flight. Neither may leave a recorded message
that nothing runs, or a caller waiting forever."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import perdure
from perdure import NodeConfig, Status
from perdure.storage import MemoryStore
from perdure.testing import FakeClock
from test_primitives import until


@dataclass
class Sum:
    n: int = 0


class Adder(perdure.Actor[Sum]):
    durability = perdure.DurabilityFacet(checkpoint_every=1)

    async def add(self, ctx: perdure.Context, k: int) -> int:
        self.state.n += k
        return self.state.n


class GatedAdder(perdure.Actor[Sum]):
    durability = perdure.DurabilityFacet(checkpoint_every=1)
    gate: asyncio.Event | None = None

    async def add(self, ctx: perdure.Context, k: int) -> int:
        gate = type(self).gate
        assert gate is not None
        await ctx.run("wait", gate.wait)
        self.state.n += k
        return self.state.n


async def test_a_sender_cancelled_while_its_message_is_recorded_still_gets_it_run(
    store_url: str,
) -> None:
    async with perdure.Runtime(store_url, actors=[Adder], clock=FakeClock()) as rt:
        entered, release = asyncio.Event(), asyncio.Event()
        create = rt.store.create_invocation

        async def slow_create(*args: Any, **kwargs: Any) -> Any:
            # The write goes ahead; the sender's wait for it is what is slow.
            write = asyncio.ensure_future(create(*args, **kwargs))
            entered.set()
            await release.wait()
            return await write

        rt.store.create_invocation = slow_create  # type: ignore[method-assign]
        sender = asyncio.ensure_future(rt.client.actor(Adder, "a").tell(Adder.add, 5))
        await entered.wait()
        sender.cancel()  # the caller gives up while the message is being recorded
        release.set()
        ref = rt.client.actor(Adder, "a")

        async def handled() -> bool:
            history = await ref.history()
            return [m.status for m in history] == [Status.COMPLETED]

        await until(handled, "the recorded message to be handled")
        assert (await ref.state_at()).n == 5
        rt.store.create_invocation = create  # type: ignore[method-assign]
        assert await ref.ask(Adder.add, 1) == 6


async def test_a_caller_waiting_on_a_message_whose_partition_moves_gets_the_reply() -> None:
    store, clock = MemoryStore(), FakeClock(autojump=False)
    GatedAdder.gate = asyncio.Event()
    config = NodeConfig(
        node_id="a",
        partitions=4,
        lease_ttl=timedelta(seconds=3),
        renew_every=timedelta(seconds=1),
    )
    async with perdure.Runtime(store, actors=[GatedAdder], clock=clock, node=config) as rt:
        assert rt.nodes is not None
        ref = rt.client.actor(GatedAdder, "g")
        first = asyncio.ensure_future(ref.ask(GatedAdder.add, 1))  # in flight, in the gate
        second = asyncio.ensure_future(ref.ask(GatedAdder.add, 2))  # queued behind it

        async def both_recorded() -> bool:
            return len(await ref.history()) == 2

        await until(both_recorded, "both messages")
        # The node loses the actor's partition (a write was fenced): its
        # activation stops at once, writing nothing more ...
        rt.nodes.lost(rt.actor_partition("GatedAdder", "g"))
        assert rt._activations == {}
        GatedAdder.gate.set()
        # ... and once it holds the partition again (the next renewal), it
        # resumes both messages from the store, and both callers hear back.
        for _ in range(3):
            clock.advance(1)
            await asyncio.sleep(0.01)
        assert sorted(await asyncio.wait_for(asyncio.gather(first, second), 10)) == [1, 3]
        assert (await ref.state_at()).n == 3
