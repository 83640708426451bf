"""Several nodes on one store, in one process: partitions balanced by leases,
work routed to its owner, failover when a node dies, and fencing of a paused
("zombie") node. Time is a fake clock that moves only when a test says so.

The same behaviour across real processes and PostgreSQL is in
tests/test_nodes_pg.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import perdure
from perdure import NodeConfig, Status
from perdure._nodes import partition_of
from perdure.storage import MemoryStore
from perdure.testing import FakeClock
from test_primitives import until

TTL = 3.0
CONFIG: dict[str, Any] = {
    "partitions": 8,
    "lease_ttl": timedelta(seconds=TTL),
    "renew_every": timedelta(seconds=1),
}

CALLS: dict[str, int] = {}


def effect(name: str) -> str:
    CALLS[name] = CALLS.get(name, 0) + 1
    return name


@perdure.workflow
async def two_steps(ctx: perdure.Context, tag: str) -> str:
    await ctx.run("one", effect, f"{tag}:one")
    await ctx.run("two", effect, f"{tag}:two")
    return tag


@dataclass
class Count:
    n: int = 0


class Counter(perdure.Actor[Count]):
    durability = perdure.DurabilityFacet(checkpoint_every=1)

    async def add(self, ctx: perdure.Context, k: int) -> int:
        self.state.n += k
        return self.state.n


def node(store: MemoryStore, clock: FakeClock, name: str, **kw: Any) -> perdure.Runtime:
    return perdure.Runtime(
        store,
        workflows=[two_steps],
        actors=[Counter],
        clock=clock,
        node=NodeConfig(node_id=name, **CONFIG),  # type: ignore[arg-type]
        **kw,
    )


async def tick(clock: FakeClock, seconds: float, steps: int = 4) -> None:
    """Move time on in steps, letting the nodes renew and poll in between."""
    for _ in range(steps):
        clock.advance(seconds / steps)
        for _ in range(20):
            await asyncio.sleep(0)


async def crash(rt: perdure.Runtime) -> None:
    """The node's process dies: nothing more is written, leases are not given back."""
    assert rt.nodes is not None
    await rt.nodes.stop()
    await rt.timers.stop()
    tasks = [a.task for a in rt._activations.values()] + list(rt._tasks.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    rt.nodes.owned = {}
    rt._started = False


async def test_two_nodes_share_the_partitions_and_run_each_others_work() -> None:
    store, clock = MemoryStore(), FakeClock(autojump=False)
    async with node(store, clock, "a") as a:
        assert a.nodes is not None
        assert len(a.nodes.owned) == 8
        async with node(store, clock, "b") as b:
            assert b.nodes is not None
            await tick(clock, 2)  # a gives back its extra half; b takes it
            assert len(a.nodes.owned) == 4
            assert len(b.nodes.owned) == 4
            assert not set(a.nodes.owned) & set(b.nodes.owned)
            # Started on either node, each runs where its partition is owned.
            handles = [
                await (a if i % 2 else b).client.start(two_steps, f"w{i}") for i in range(20)
            ]
            for i, h in enumerate(handles):
                got = await asyncio.wait_for(
                    perdure.InvocationHandle(a, h.id, h.target).result(), 10
                )
                assert got == f"w{i}"
                assert CALLS[f"w{i}:one"] == CALLS[f"w{i}:two"] == 1
            owners = {
                a.nodes.node_id if r.partition in a.nodes.owned else b.nodes.node_id
                for r in await a.client.list(workflow="two_steps", limit=None)
            }
            assert owners == {"a", "b"}
            # An actor is reached from both nodes and lives on one.
            totals = [await n.client.actor(Counter, "c").ask(Counter.add, 1) for n in (a, b, a, b)]
            assert totals == [1, 2, 3, 4]
        # b stopped cleanly and gave its leases back: a has them all again.
        await tick(clock, 2)
        assert len(a.nodes.owned) == 8


async def test_a_dead_nodes_work_resumes_on_another_after_its_lease_expires(gate: Any) -> None:
    store, clock = MemoryStore(), FakeClock(autojump=False)

    @perdure.workflow(name="gated_flow")
    async def gated_flow(ctx: perdure.Context, tag: str) -> str:
        await ctx.run("before", effect, f"{tag}:before")
        await ctx.run("gate", gate.wait)
        await ctx.run("after", effect, f"{tag}:after")
        return tag

    a = node(store, clock, "a")
    a.register(gated_flow)
    await a.start()
    handle = await a.client.start(gated_flow, "dead")
    await gate.until_reached(handle)
    await crash(a)
    gate.open()
    async with node(store, clock, "b") as b:
        b.register(gated_flow)
        assert b.nodes is not None
        assert b.nodes.owned == {}  # a's leases have not expired yet
        await tick(clock, TTL + 1)
        assert len(b.nodes.owned) == 8
        assert (
            await asyncio.wait_for(
                perdure.InvocationHandle(b, handle.id, "gated_flow").result(), 10
            )
            == "dead"
        )
        assert CALLS["dead:before"] == 1  # committed before the crash: not run again
        assert CALLS["dead:after"] == 1
        leases = await store.list_leases()
        assert {lease.owner for lease in leases} == {"b"}
        assert all(lease.epoch == 2 for lease in leases)  # each taken over once


async def test_a_paused_node_is_fenced_out_when_its_lease_was_taken_over(gate: Any) -> None:
    store, clock = MemoryStore(), FakeClock(autojump=False)

    @perdure.workflow(name="zombie_flow")
    async def zombie_flow(ctx: perdure.Context, tag: str) -> str:
        await ctx.run("gate", gate.wait)
        await ctx.run("after", effect, f"{tag}:after")
        return tag

    async with node(store, clock, "zombie") as a:
        a.register(zombie_flow)
        assert a.nodes is not None
        handle = await a.client.start(zombie_flow, "z")
        await gate.until_reached(handle)
        await a.nodes.stop()  # paused: it stops renewing, its task waits in the gate
        async with node(store, clock, "b") as b:
            b.register(zombie_flow)
            assert b.nodes is not None
            await tick(clock, TTL + 1)
            assert len(b.nodes.owned) == 8
            # b resumed the invocation; it waits in the gate too. Open it: both go on.
            gate.open()
            gate._never.set()
            result = await asyncio.wait_for(
                perdure.InvocationHandle(b, handle.id, "zombie_flow").result(), 10
            )
            assert result == "z"

            async def zombie_stopped() -> bool:
                return a.stopped_reason(handle.id) is not None

            await until(zombie_stopped, "the zombie's write to be refused")
            fenced = a.stopped_reason(handle.id)
            assert isinstance(fenced, perdure.FencedError)
            assert fenced.partition not in a.nodes.owned  # it stopped working on it
            journal = await store.read_journal(handle.id)
            steps = [e.name for e in journal if e.kind.value == "step"]
            assert steps == ["gate", "after"]  # each written once, by b
            assert CALLS["z:after"] == 1
            assert (await store.get_invocation(handle.id)).status is Status.COMPLETED  # type: ignore[union-attr]


def test_node_settings_are_checked() -> None:
    with pytest.raises(perdure.ConfigurationError, match="half of lease_ttl"):
        NodeConfig(lease_ttl=timedelta(seconds=1), renew_every=timedelta(seconds=1))
    with pytest.raises(perdure.ConfigurationError, match="partitions"):
        NodeConfig(partitions=0)


async def test_a_caller_on_one_node_hears_at_once_of_an_end_on_another() -> None:
    store, clock = MemoryStore(), FakeClock(autojump=False)
    async with node(store, clock, "a") as a, node(store, clock, "b") as b:
        assert a.nodes is not None
        assert b.nodes is not None
        await tick(clock, 2)  # the partitions are shared out
        assert a.nodes.owned
        assert b.nodes.owned
        # Started on a, for a partition that b holds: b runs it, and its end
        # is announced, so a's caller does not wait for its 1 s poll.
        tags = {(await a.client.start(two_steps, f"x{i}")).id: f"x{i}" for i in range(40)}
        remote = [i for i in tags if partition_of(i, 8) in b.nodes.owned]
        assert remote
        for invocation_id in remote:
            handle = perdure.InvocationHandle(a, invocation_id, "two_steps")
            assert await asyncio.wait_for(handle.result(), 0.5) == tags[invocation_id]
