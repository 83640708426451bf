"""A storage outage in the middle of a run: the store refuses writes for a
while (a full disk, a database restarting), then answers again. What stopped
on its errors goes on by itself in the same runtime, from the journals,
without a restart, and nothing runs twice.

The outage is injected in front of a real store: its writes raise
:class:`perdure.StorageError` while it lasts, as the stores do when their
database goes away. tests/test_nodes_pg.py restarts a real PostgreSQL server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import perdure
from perdure import Status, StorageError
from perdure.storage import EntryKind, Store
from perdure.storage._records import Write
from perdure.testing import FakeClock
from test_primitives import until


class Outage:
    """Makes ``store``'s writes that match ``hits`` (and, unless ``hits`` is
    given, its invocation creations) fail while ``on``."""

    def __init__(
        self, store: Store, hits: Callable[[Write], bool] | None = None, *, reads: bool = False
    ) -> None:
        self.on = False
        self.refused = 0
        self._hits = hits
        commit, create, get = store.commit, store.create_invocation, store.get_invocation
        if reads:  # reading an invocation's record fails too

            async def failing_get(invocation_id: str) -> Any:
                self._check(None)
                return await get(invocation_id)

            store.get_invocation = failing_get  # type: ignore[method-assign]

        async def failing_commit(write: Write) -> Any:
            self._check(write)
            return await commit(write)

        async def failing_create(*args: Any, **kwargs: Any) -> Any:
            self._check(None)
            return await create(*args, **kwargs)

        store.commit = failing_commit  # type: ignore[method-assign]
        store.create_invocation = failing_create  # type: ignore[method-assign]

    def _check(self, write: Write | None) -> None:
        if self.on and (self._hits is None or (write is not None and self._hits(write))):
            self.refused += 1
            raise StorageError("the database went away (an injected outage)")


async def test_a_workflow_stopped_by_an_outage_goes_on_once_the_store_answers(
    store_url: str,
) -> None:
    gate = asyncio.Event()
    calls: list[str] = []

    def effect(name: str) -> str:
        calls.append(name)
        return name

    @perdure.workflow(name="outage-steps")
    async def wf(ctx: perdure.Context) -> str:
        await ctx.run("one", effect, "one")
        await ctx.run("wait", gate.wait)
        await ctx.run("two", effect, "two")
        return "done"

    async with perdure.Runtime(store_url, workflows=[wf], clock=FakeClock()) as rt:
        outage = Outage(rt.store)
        handle = await rt.client.start(wf)
        await until(lambda: _has_step(rt, handle.id, "one"), "the first step")
        outage.on = True
        gate.set()  # the wait step ends, and its result cannot be written
        await until(_async(lambda: rt.stopped_reason(handle.id) is not None), "the stop")
        assert isinstance(rt.stopped_reason(handle.id), StorageError)
        assert await handle.status() is Status.RUNNING
        outage.on = False
        await until(_async(lambda: _status(rt, handle.id, Status.COMPLETED)), "the relaunch")
        assert await handle.result() == "done"
        assert calls == ["one", "two"]  # the first step was not run again
        assert outage.refused >= 1


async def test_a_relaunch_that_meets_the_outage_again_is_tried_again(store_url: str) -> None:
    gate = asyncio.Event()

    @perdure.workflow(name="outage-twice")
    async def wf(ctx: perdure.Context) -> str:
        await ctx.run("wait", gate.wait)
        return "done"

    async with perdure.Runtime(store_url, workflows=[wf], clock=FakeClock()) as rt:
        outage = Outage(rt.store, reads=True)
        handle = await rt.client.start(wf)
        outage.on = True
        gate.set()
        await until(_async(lambda: rt.stopped_reason(handle.id) is not None), "the stop")
        # The relaunch itself fails while the outage lasts (it reads the
        # record first), and is tried again, later and later.
        await until(_async(lambda: outage.refused >= 3), "relaunches meeting the outage")
        outage.on = False
        await until(_async(lambda: _status(rt, handle.id, Status.COMPLETED)), "the relaunch")
        assert await handle.result() == "done"


@dataclass
class Total:
    n: int = 0
    messages: int = 0


class Tally(perdure.Actor[Total]):
    durability = perdure.DurabilityFacet(checkpoint_every=1)

    async def add(self, ctx: perdure.Context, k: int) -> int:
        self.state.n += k
        self.state.messages += 1
        return self.state.n


def _actor_output(write: Write) -> bool:
    return any(e.kind is EntryKind.OUTPUT and e.name == "Tally.add" for e in write.entries)


async def test_an_actor_stopped_by_an_outage_answers_its_askers_once_the_store_answers(
    store_url: str,
) -> None:
    gate = asyncio.Event()

    @perdure.workflow(name="outage-ask")
    async def asker(ctx: perdure.Context, k: int) -> int:
        await ctx.run("wait", gate.wait)
        n: int = await ctx.actor(Tally, "t").ask(Tally.add, k)
        return n

    async with perdure.Runtime(
        store_url, workflows=[asker], actors=[Tally], clock=FakeClock()
    ) as rt:
        # Only the actor's completions fail: its first message stops the
        # mailbox, the second waits behind it and is stopped with it.
        outage = Outage(rt.store, _actor_output)
        outage.on = True
        handles = [await rt.client.start(asker, k) for k in (1, 10)]
        gate.set()
        await until(
            _async(lambda: all(rt.stopped_reason(h.id) is not None for h in handles)),
            "both askers to stop on the outage",
        )
        assert outage.refused >= 1
        outage.on = False
        for h in handles:
            await until(_async(lambda h=h: _status(rt, h.id, Status.COMPLETED)), "an asker")
        assert sorted([await h.result() for h in handles]) in ([1, 11], [10, 11])
        state = await rt.client.actor(Tally, "t").state_at()
        assert (state.n, state.messages) == (11, 2)
        history = await rt.client.actor(Tally, "t").history()
        assert [m.status for m in history] == [Status.COMPLETED, Status.COMPLETED]


def _async(check: Callable[[], Any]) -> Callable[[], Any]:
    async def run() -> bool:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        return bool(value)

    return run


async def _status(rt: perdure.Runtime, invocation_id: str, status: Status) -> bool:
    rec = await rt.store.get_invocation(invocation_id)
    return rec is not None and rec.status is status


async def _has_step(rt: perdure.Runtime, invocation_id: str, name: str) -> bool:
    return any(e.name == name for e in await rt.store.read_journal(invocation_id))
