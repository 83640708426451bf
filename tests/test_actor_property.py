"""Property: a crashed-and-recovered durable actor ends where an uncrashed one does.

For a random sequence of messages to two actors (deposits, withdrawals that
fail when the balance would go negative, and messages that always fail
after their external call), a random checkpoint interval and a random crash
point, the runtime is stopped either between two messages or while a
message is blocked in a step (with later messages of the same actor queued
behind it), then restarted; the rest of the messages are sent to the new
runtime. The replies, the final states (live and rebuilt by another
restart) are those of a plain model, and every external call was made
exactly once per step key.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import shutil
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import perdure
from conftest import Gate, attach, check_postgres, postgres_url
from perdure import DurabilityFacet, InvocationFailedError, TerminalError, current_step
from perdure.storage import MemoryStore
from perdure.storage._postgres import drop_schema
from perdure.testing import FakeClock

KEYS = ("a", "b")


class World:
    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.effects: dict[str, tuple[str, int]] = {}
        self.gate = Gate()


WORLD = World()


def external(actor_key: str, cents: int) -> int:
    key = current_step().key
    WORLD.calls[key] += 1
    WORLD.effects.setdefault(key, (actor_key, cents))
    return cents


async def gate_wait() -> str:
    return await WORLD.gate.wait()


def explode() -> None:
    raise TerminalError("boom")


@dataclasses.dataclass
class Balance:
    cents: int = 0
    history: list[int] = dataclasses.field(default_factory=list)


class PropAccount(perdure.Actor[Balance]):
    actor_name = "PropAccount"
    durability = DurabilityFacet(checkpoint_every=1)

    async def deposit(self, ctx: Any, cents: int, block: bool = False) -> int:
        got = await ctx.run("ext", external, self.key, cents)
        self.state.cents += got
        if block:
            await ctx.run("gate", gate_wait)
        self.state.history.append(got)
        return self.state.cents

    async def withdraw(self, ctx: Any, cents: int, block: bool = False) -> int:
        got = await ctx.run("ext", external, self.key, -cents)
        self.state.cents += got
        self.state.history.append(got)
        if block:
            await ctx.run("gate", gate_wait)
        if self.state.cents < 0:
            raise ValueError("insufficient funds")
        return self.state.cents

    async def boom(self, ctx: Any, cents: int, block: bool = False) -> int:
        got = await ctx.run("ext", external, self.key, cents)
        self.state.cents += got
        self.state.history.append(got)
        if block:
            await ctx.run("gate", gate_wait)
        await ctx.run("explode", explode)
        return self.state.cents

    async def summary(self, ctx: Any) -> list[int]:
        return [self.state.cents, *self.state.history]


def account_class(every: int) -> type[PropAccount]:
    return type(
        f"PropAccount{every}",
        (PropAccount,),
        {"durability": DurabilityFacet(checkpoint_every=every), "actor_name": "PropAccount"},
    )


CLASSES = {every: account_class(every) for every in (1, 2, 3, 1000)}

Op = tuple[str, str, int]  # (actor key, handler, cents)
FAILED = "failed"


def model(ops: list[Op]) -> tuple[list[Any], dict[str, list[int]]]:
    """The replies and final summaries of an uncrashed run."""
    balance = dict.fromkeys(KEYS, 0)
    history: dict[str, list[int]] = {k: [] for k in KEYS}
    replies: list[Any] = []
    for key, kind, cents in ops:
        if kind == "deposit":
            balance[key] += cents
            history[key].append(cents)
            replies.append(balance[key])
        elif kind == "withdraw" and balance[key] >= cents:
            balance[key] -= cents
            history[key].append(-cents)
            replies.append(balance[key])
        else:
            replies.append(FAILED)
    return replies, {k: [balance[k], *history[k]] for k in KEYS}


async def reply_of(awaitable: Any) -> Any:
    try:
        return await awaitable
    except InvocationFailedError as exc:
        cause = exc.cause
    if not isinstance(cause, ValueError | TerminalError):
        raise AssertionError(f"unexpected failure: {cause!r}")
    return FAILED


async def scenario(
    store: Any, cls: type[PropAccount], ops: list[Op], crash_at: int, mode: str
) -> tuple[list[Any], dict[str, list[int]], list[perdure.InvocationRecord]]:
    replies: dict[int, Any] = {}
    in_flight: list[tuple[int, perdure.InvocationHandle[Any]]] = []

    def runtime() -> perdure.Runtime:
        return perdure.Runtime(store, actors=[cls], clock=FakeClock())

    async with runtime() as rt:
        for i, (key, kind, cents) in enumerate(ops[:crash_at]):
            replies[i] = await reply_of(rt.client.actor(cls, key).ask(kind, cents))
        if mode == "in-flight" and crash_at < len(ops):
            key, kind, cents = ops[crash_at]
            ref = rt.client.actor(cls, key)
            blocked = await ref.tell(kind, cents, block=True)
            assert blocked is not None
            in_flight.append((crash_at, blocked))
            queued = [i for i in range(crash_at + 1, len(ops)) if ops[i][0] == key][:2]
            for i in queued:
                handle = await ref.tell(ops[i][1], ops[i][2])
                assert handle is not None
                in_flight.append((i, handle))
            await WORLD.gate.until_reached(blocked)
            event(f"stopped with {len(in_flight)} message(s) in flight")
    WORLD.gate.open()
    async with runtime() as rt:
        for i, handle in in_flight:
            replies[i] = await reply_of(attach(rt, handle).result())
        for i, (key, kind, cents) in enumerate(ops):
            if i >= crash_at and i not in replies:
                replies[i] = await reply_of(rt.client.actor(cls, key).ask(kind, cents))
        live = {k: await rt.client.actor(cls, k).ask("summary") for k in KEYS}
    async with runtime() as rt:
        rebuilt = {k: await rt.client.actor(cls, k).ask("summary") for k in KEYS}
        assert rt.stats.steps_executed == 0
        records = [r for r in await rt.client.list(limit=None) if r.actor_key is not None]
    assert rebuilt == live
    return [replies[i] for i in range(len(ops))], live, records


ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(KEYS),
        st.sampled_from(["deposit", "deposit", "withdraw", "withdraw", "boom"]),
        st.integers(1, 40),
    ),
    min_size=1,
    max_size=10,
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Op], int, str, int]:
    ops = draw(ops_strategy)
    mode = draw(st.sampled_from(["restart", "in-flight"]))
    crash_at = draw(st.integers(0, len(ops) - (mode == "in-flight")))
    every = draw(st.sampled_from(sorted(CLASSES)))
    return ops, crash_at, mode, every


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
@settings(
    max_examples=int(os.environ.get("ACTOR_PROPERTY_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases())
def test_recovered_actor_state_equals_uncrashed_state(
    kind: str, case: tuple[list[Op], int, str, int]
) -> None:
    global WORLD
    ops, crash_at, mode, every = case
    WORLD = World()
    directory = tempfile.mkdtemp(prefix="perdure-actor-prop-")
    store: Any = f"sqlite:///{directory}/x.db"
    if kind == "memory":
        store = MemoryStore()
    elif kind == "postgres":
        check_postgres()
        store = postgres_url()  # a fresh schema for every example
    try:
        replies, summaries, records = asyncio.run(
            scenario(store, CLASSES[every], ops, crash_at, mode)
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if kind == "postgres":
            drop_schema(store)
    expected_replies, expected_summaries = model(ops)
    assert replies == expected_replies
    assert summaries == expected_summaries

    # one external call per message, exactly once per step key
    assert len(WORLD.calls) == len(ops)
    assert set(WORLD.calls.values()) == {1}, WORLD.calls
    signed = {"deposit": 1, "withdraw": -1, "boom": 1}
    for key in KEYS:
        seen = sum(c for k, c in WORLD.effects.values() if k == key)
        assert seen == sum(signed[kd] * c for k, kd, c in ops if k == key)

    # the log: every message recorded once, in order, and finished
    for key in KEYS:
        seqs = [r.actor_seq for r in records if r.actor_key == key]
        assert sorted(seqs) == list(range(1, len(seqs) + 1))
    statuses = collections.Counter(
        r.status.value for r in records if not r.target.endswith(".summary")
    )
    assert set(statuses) <= {"completed", "failed"}
    assert statuses["failed"] == expected_replies.count(FAILED)
