"""Actors: keyed state, one message at a time; durable ones survive restarts.

Every test runs over every store (``store_url``: memory, SQLite, PostgreSQL). A
restart is a new runtime on the same data (``Backend``); an in-flight
message is one blocked in a step (``Gate``) when the runtime stops.

The external call (``external``) counts how often it is made per step key,
so that a test can assert that rebuilding an actor's state after a restart
made no external call again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import sqlite3
from typing import Any, ClassVar

import pytest

import perdure
from conftest import Backend, Gate, attach
from perdure import (
    ConfigurationError,
    DurabilityFacet,
    IdempotencyConflictError,
    InvocationFailedError,
    SerializationError,
    Status,
    UnknownWorkflowError,
    current_step,
)

# -- the external world ------------------------------------------------------------


class External:
    """An external API that records each call by the step key it was made with."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.effects: dict[str, tuple[str, int]] = {}

    def call(self, actor_key: str, cents: int) -> int:
        key = current_step().key
        self.calls[key] += 1
        self.effects.setdefault(key, (actor_key, cents))
        return cents

    def total(self, actor_key: str) -> int:
        """What the external side saw for one actor, deduplicated by step key."""
        return sum(c for k, c in self.effects.values() if k == actor_key)


EXT = External()
GATE = Gate()
RENDEZVOUS: dict[str, asyncio.Event] = {}
ACTIVE: collections.Counter[str] = collections.Counter()
MAX_ACTIVE: collections.Counter[str] = collections.Counter()


def external(actor_key: str, cents: int) -> int:
    return EXT.call(actor_key, cents)


async def gate_wait() -> str:
    return await GATE.wait()


@pytest.fixture(autouse=True)
def fresh_world() -> None:
    global EXT, GATE
    EXT = External()
    GATE = Gate()
    RENDEZVOUS.clear()
    ACTIVE.clear()
    MAX_ACTIVE.clear()


@pytest.fixture
def gate() -> Gate:  # the conftest fixture, but the one the actors use
    return GATE


# -- actors ----------------------------------------------------------------------


@dataclasses.dataclass
class Balance:
    cents: int = 0
    history: list[int] = dataclasses.field(default_factory=list)


class InsufficientFundsError(Exception):
    pass


class Account(perdure.Actor[Balance]):
    durability = DurabilityFacet(checkpoint_every=3)

    async def deposit(self, ctx: Any, cents: int) -> int:
        got = await ctx.run("ext", external, self.key, cents)
        self.state.cents += got
        self.state.history.append(got)
        return self.state.cents

    async def withdraw(self, ctx: Any, cents: int) -> int:
        got = await ctx.run("ext", external, self.key, -cents)
        # the state changes before the check: a failed message must not keep it
        self.state.cents += got
        self.state.history.append(got)
        if self.state.cents < 0:
            raise InsufficientFundsError(f"{self.key}: {self.state.cents}")
        return self.state.cents

    async def slow_deposit(self, ctx: Any, cents: int) -> int:
        got = await ctx.run("ext", external, self.key, cents)
        self.state.cents += got
        await ctx.run("gate", gate_wait)
        self.state.history.append(got)
        return self.state.cents

    async def balance(self, ctx: Any) -> int:
        return self.state.cents

    async def get_history(self, ctx: Any) -> list[int]:
        return list(self.state.history)


class Account1(Account):
    durability = DurabilityFacet(checkpoint_every=1)


class AccountFull(Account):
    durability = DurabilityFacet(checkpoint_every=1000)


class Tally(perdure.Actor[Balance]):
    """A plain (in-memory) actor."""

    async def add(self, ctx: Any, n: int) -> int:
        ACTIVE[self.key] += 1
        MAX_ACTIVE[self.key] = max(MAX_ACTIVE[self.key], ACTIVE[self.key])
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            got = await ctx.run("ext", lambda: n)
            self.state.cents += got
            self.state.history.append(got)
            return self.state.cents
        finally:
            ACTIVE[self.key] -= 1

    async def fail(self, ctx: Any) -> None:
        raise InsufficientFundsError(f"{self.key} refuses")

    async def meet(self, ctx: Any, other: str) -> str:
        """Waits for the other key's actor: only works if keys run concurrently."""
        RENDEZVOUS.setdefault(self.key, asyncio.Event()).set()
        await asyncio.wait_for(RENDEZVOUS.setdefault(other, asyncio.Event()).wait(), 5)
        return self.key

    async def get_history(self, ctx: Any) -> list[int]:
        return list(self.state.history)


class DurableMeet(perdure.Actor[Balance]):
    durability = DurabilityFacet()

    async def meet(self, ctx: Any, other: str) -> str:
        RENDEZVOUS.setdefault(self.key, asyncio.Event()).set()
        await asyncio.wait_for(RENDEZVOUS.setdefault(other, asyncio.Event()).wait(), 5)
        return self.key


def runtime(backend: Backend, *actors: type[perdure.Actor[Any]], **kw: Any) -> perdure.Runtime:
    return backend.runtime([], actors=list(actors), **kw)


def assert_calls_once() -> None:
    assert EXT.calls, "no external call was made"
    assert set(EXT.calls.values()) == {1}, EXT.calls


async def messages(rt: perdure.Runtime, key: str | None = None) -> list[Any]:
    recs = [r for r in await rt.client.list(limit=None) if r.actor_key is not None]
    if key is not None:
        recs = [r for r in recs if r.actor_key == key]
    return sorted(recs, key=lambda r: (r.actor_type, r.actor_key, r.actor_seq))


# -- definitions and errors -----------------------------------------------------


def test_state_type_is_inferred_from_the_generic_argument() -> None:
    assert Account.state_type is Balance
    assert Account1.state_type is Balance
    assert Account("k").state == Balance()
    assert Account("k").key == "k"


def test_initial_state_without_a_state_type() -> None:
    class NoType(perdure.Actor):  # type: ignore[type-arg]
        async def go(self, ctx: Any) -> None:
            pass

    with pytest.raises(ConfigurationError, match="no state type"):
        NoType("k")

    class Custom(perdure.Actor[dict[str, int]]):
        def initial_state(self) -> dict[str, int]:
            return {"n": 1}

        async def go(self, ctx: Any) -> None:
            pass

    assert Custom("k").state == {"n": 1}


def test_bad_definitions() -> None:
    class NoHandlers(perdure.Actor[Balance]):
        def sync_method(self) -> None:
            pass

    with pytest.raises(ConfigurationError, match="no handlers"):
        perdure.Runtime("memory://", actors=[NoHandlers])
    with pytest.raises(ConfigurationError, match="not an actor"):
        perdure.Runtime("memory://", actors=[Balance])  # type: ignore[list-item]
    for bad in (0, -1, 1.5, "3"):
        with pytest.raises(ConfigurationError, match="checkpoint_every"):
            DurabilityFacet(checkpoint_every=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="state_version"):
        DurabilityFacet(state_version=0)

    class Other(perdure.Actor[Balance]):
        actor_name = "Account"

        async def go(self, ctx: Any) -> None:
            pass

    with pytest.raises(ConfigurationError, match="two different actor types"):
        perdure.Runtime("memory://", actors=[Account, Other])

    class BadFacet(perdure.Actor[Balance]):
        durability: ClassVar[Any] = {"checkpoint_every": 3}

        async def go(self, ctx: Any) -> None:
            pass

    with pytest.raises(ConfigurationError, match="DurabilityFacet"):
        perdure.Runtime("memory://", actors=[BadFacet])


@pytest.mark.parametrize("cls", [Account, Tally])
async def test_unknown_handler_type_and_bad_key(store_url: str, cls: Any) -> None:
    async with perdure.Runtime(store_url, actors=[cls]) as rt:
        ref = rt.client.actor(cls, "alice")
        with pytest.raises(ConfigurationError, match=r"no handler 'nope'.*get_history"):
            await ref.ask("nope")
        with pytest.raises(ConfigurationError, match="no handler"):
            await ref.tell("nope")
        with pytest.raises(UnknownWorkflowError, match="no actor type named 'Ghost'"):
            rt.client.actor("Ghost", "alice")
        with pytest.raises(UnknownWorkflowError, match="AccountFull"):
            rt.client.actor(AccountFull, "alice")
        for bad in ("", 5, None):
            with pytest.raises(TypeError, match="actor key"):
                await rt.client.actor(cls, bad).ask("get_history")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await ref.ask("get_history", 1, 2, 3)
        assert await ref.ask("get_history") == []


async def test_durable_message_input_is_checked_against_hints(store_url: str) -> None:
    async with perdure.Runtime(store_url, actors=[Account]) as rt:
        ref = rt.client.actor(Account, "alice")
        with pytest.raises(SerializationError):
            await ref.ask(Account.deposit, "five")
        with pytest.raises(TypeError, match="idempotency_key"):
            await ref.ask(Account.deposit, 5, idempotency_key="")
        assert await ref.ask(Account.deposit, 5) == 5


async def test_not_started(store_url: str) -> None:
    rt = perdure.Runtime(store_url, actors=[Account, Tally])
    with pytest.raises(ConfigurationError, match="not started"):
        await rt.client.actor(Tally, "a").ask(Tally.add, 1)
    with pytest.raises(ConfigurationError, match="not started"):
        await rt.client.actor(Account, "a").ask(Account.deposit, 1)


# -- plain actors -----------------------------------------------------------------


async def test_plain_actor_one_message_at_a_time_in_order(backend: Backend) -> None:
    async with runtime(backend, Tally) as rt:
        ref = rt.client.actor(Tally, "alice")
        replies = await asyncio.gather(*(ref.ask(Tally.add, n) for n in range(1, 21)))
        assert replies == [sum(range(1, n + 1)) for n in range(1, 21)]
        assert await ref.ask("get_history") == list(range(1, 21))
        assert MAX_ACTIVE["alice"] == 1
        assert await ref.tell(Tally.add, 100) is None
        assert await ref.ask(Tally.add, 0) == 310


async def test_plain_actor_keys_run_concurrently(store_url: str) -> None:
    async with perdure.Runtime(store_url, actors=[Tally]) as rt:
        a, b = rt.client.actor(Tally, "a"), rt.client.actor(Tally, "b")
        assert await asyncio.gather(a.ask(Tally.meet, "b"), b.ask(Tally.meet, "a")) == ["a", "b"]


async def test_plain_actor_writes_nothing_to_the_store(backend: Backend) -> None:
    async with runtime(backend, Tally) as rt:
        refs = [rt.client.actor(Tally, k) for k in ("a", "b", "c")]
        for i in range(5):
            for ref in refs:
                await ref.ask(Tally.add, i)
                await ref.tell(Tally.add, 1)
        with pytest.raises(InsufficientFundsError):
            await refs[0].ask(Tally.fail)
        assert await refs[0].ask("get_history") == [0, 1, 1, 1, 2, 1, 3, 1, 4, 1]
        assert await rt.client.list(limit=None) == []
        assert await rt.store.list_actors() == []
        if backend.kind == "memory":
            store: Any = rt.store
            assert store._invocations == {}
            assert store._journal == {}
            assert store._checkpoints == {}
            assert store._actors == {}
    if backend.kind == "sqlite":
        with contextlib.closing(sqlite3.connect(backend.path)) as conn:
            for table in ("invocations", "journal", "checkpoints", "idempotent_results"):
                with contextlib.suppress(sqlite3.OperationalError):
                    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM invocations").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM checkpoints").fetchone() == (0,)
    if backend.kind == "postgres":
        import psycopg

        from perdure.storage._postgres import parse_url

        conninfo, schema, _ = parse_url(backend.url)
        with psycopg.connect(conninfo) as pg:
            for table in ("invocations", "journal", "checkpoints", "idempotent_results"):
                assert pg.execute(f"SELECT count(*) FROM {schema}.{table}").fetchone() == (0,)


async def test_plain_actor_errors_propagate_and_later_messages_proceed(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with perdure.Runtime(store_url, actors=[Tally]) as rt:
        ref = rt.client.actor(Tally, "alice")
        await ref.ask(Tally.add, 1)
        with pytest.raises(InsufficientFundsError, match="alice refuses"):
            await ref.ask(Tally.fail)
        with caplog.at_level(logging.ERROR, logger="perdure.actor"):
            assert await ref.tell(Tally.fail) is None
            assert await ref.ask(Tally.add, 2) == 3
        assert any("told message failed" in r.getMessage() for r in caplog.records)


async def test_plain_actor_state_lives_in_memory_only(backend: Backend) -> None:
    async with runtime(backend, Tally) as rt:
        assert await rt.client.actor(Tally, "alice").ask(Tally.add, 5) == 5
    async with runtime(backend, Tally) as rt:
        assert await rt.client.actor(Tally, "alice").ask("get_history") == []


# -- durable actors: live ------------------------------------------------------------


async def test_durable_messages_are_invocations(backend: Backend) -> None:
    async with runtime(backend, Account) as rt:
        alice = rt.client.actor(Account, "alice")
        bob = rt.client.actor(Account, "bob")
        assert await alice.ask(Account.deposit, 5) == 5
        assert await alice.ask("deposit", 7) == 12
        handle = await bob.tell(Account.deposit, 3)
        assert isinstance(handle, perdure.InvocationHandle)
        assert handle.target == "Account.deposit"
        assert await handle.result() == 3
        assert await handle.status() is Status.COMPLETED
        assert await alice.ask(Account.balance) == 12
        recs = await messages(rt)
        assert [(r.target, r.actor_type, r.actor_key, r.actor_seq) for r in recs] == [
            ("Account.deposit", "Account", "alice", 1),
            ("Account.deposit", "Account", "alice", 2),
            ("Account.balance", "Account", "alice", 3),
            ("Account.deposit", "Account", "bob", 1),
        ]
        assert {r.status for r in recs} == {Status.COMPLETED}
        assert [r.actor_key for r in await rt.client.list(workflow="Account.deposit")] == [
            "alice",
            "alice",
            "bob",
        ]
        assert await rt.store.list_actors("Account") == [("Account", "alice"), ("Account", "bob")]
        assert (await rt.client.get(handle.id)).target == "Account.deposit"
    assert_calls_once()
    assert EXT.total("alice") == 12
    assert EXT.total("bob") == 3


async def test_durable_messages_are_handled_in_log_order(backend: Backend) -> None:
    async with runtime(backend, Account) as rt:
        refs = {k: rt.client.actor(Account, k) for k in ("a", "b", "c")}
        amounts = list(range(1, 31))
        live: dict[str, list[int]] = {}
        handles = await asyncio.gather(
            *(refs[k].tell(Account.deposit, n) for n in amounts for k in refs)
        )
        await asyncio.gather(*(h.result() for h in handles if h is not None))
        for key, ref in refs.items():
            recs = [r for r in await messages(rt, key) if r.target == "Account.deposit"]
            assert [r.actor_seq for r in recs] == list(range(1, 31))
            # the order of the log is the order the messages were applied in
            by_id = {
                h.id: n for h, n in zip(handles, [n for n in amounts for _ in refs], strict=False)
            }
            logged = [by_id[r.id] for r in recs]
            history = await ref.ask(Account.get_history)
            assert history == logged
            assert sorted(history) == amounts
            live[key] = history
    async with runtime(backend, Account) as rt:
        for key in ("a", "b", "c"):
            assert await rt.client.actor(Account, key).ask(Account.get_history) == live[key]
    assert_calls_once()


async def test_durable_order_survives_restart(backend: Backend) -> None:
    async with runtime(backend, AccountFull) as rt:
        ref = rt.client.actor(AccountFull, "a")
        handles = await asyncio.gather(*(ref.tell(AccountFull.deposit, n) for n in range(1, 21)))
        await asyncio.gather(*(h.result() for h in handles if h is not None))
        live = await ref.ask(AccountFull.get_history)
    async with runtime(backend, AccountFull) as rt:
        assert await rt.client.actor(AccountFull, "a").ask(AccountFull.get_history) == live
        assert rt.stats.actor_messages_replayed == 21
        assert rt.stats.steps_executed == 0
    assert_calls_once()


async def test_durable_keys_run_concurrently(store_url: str) -> None:
    async with perdure.Runtime(store_url, actors=[DurableMeet]) as rt:
        a, b = rt.client.actor(DurableMeet, "a"), rt.client.actor(DurableMeet, "b")
        assert await asyncio.gather(a.ask(DurableMeet.meet, "b"), b.ask(DurableMeet.meet, "a")) == [
            "a",
            "b",
        ]


async def test_durable_one_message_at_a_time(backend: Backend, gate: Gate) -> None:
    async with runtime(backend, Account) as rt:
        ref = rt.client.actor(Account, "a")
        slow = await ref.tell(Account.slow_deposit, 10)
        assert slow is not None
        fast = await ref.tell(Account.deposit, 1)
        assert fast is not None
        await gate.until_reached(slow)
        for _ in range(20):
            await asyncio.sleep(0)
        assert await fast.status() is Status.RUNNING
        assert len(EXT.calls) == 1  # the second message has not started
        other = rt.client.actor(Account, "b")
        assert await other.ask(Account.deposit, 5) == 5  # another key is not blocked


# -- durable actors: restarts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "replayed"), [(Account1, 0), (Account, 1), (AccountFull, 7)], ids=["1", "3", "1000"]
)
async def test_restart_rebuilds_state_without_external_calls(
    backend: Backend, cls: Any, replayed: int
) -> None:
    amounts = [5, 7, 11, 13, 17, 19, 23]
    async with runtime(backend, cls) as rt:
        alice = rt.client.actor(cls, "alice")
        for n in amounts:
            await alice.ask(cls.deposit, n)
        await rt.client.actor(cls, "bob").ask(cls.deposit, 100)
    calls = dict(EXT.calls)
    async with runtime(backend, cls) as rt:
        assert rt.stats.actors_recovered == 0  # nothing was unfinished
        assert await rt.client.actor(cls, "alice").ask(cls.get_history) == amounts
        assert rt.stats.actor_messages_replayed == replayed
        assert await rt.client.actor(cls, "bob").ask(cls.balance) == 100
        assert rt.stats.steps_executed == 0
        assert await rt.client.actor(cls, "alice").ask(cls.deposit, 1) == sum(amounts) + 1
        seqs = [r.actor_seq for r in await messages(rt, "alice")]
        assert seqs == list(range(1, len(amounts) + 3))
    assert {k: v for k, v in EXT.calls.items() if k in calls} == calls
    assert_calls_once()
    assert EXT.total("alice") == sum(amounts) + 1


@pytest.mark.parametrize("cls", [Account1, Account, AccountFull], ids=["1", "3", "1000"])
async def test_same_state_whatever_the_checkpoint_interval(backend: Backend, cls: Any) -> None:
    ops = [("deposit", 50), ("withdraw", 20), ("withdraw", 100), ("deposit", 5)] * 3
    replies: list[Any] = []
    async with runtime(backend, cls) as rt:
        ref = rt.client.actor(cls, "k")
        for name, n in ops:
            try:
                replies.append(await ref.ask(name, n))
            except InvocationFailedError as exc:
                replies.append(f"failed: {type(exc.cause).__name__}")
    failed = "failed: InsufficientFundsError"
    assert replies == [50, 30, failed, 35, 85, 65, failed, 70, 120, 100, 0, 5]
    for _ in range(2):
        async with runtime(backend, cls) as rt:
            ref = rt.client.actor(cls, "k")
            assert await ref.ask(cls.get_history) == [50, -20, 5] * 2 + [50, -20, -100, 5]
            assert await ref.ask(cls.balance) == 5
    assert_calls_once()


async def test_idle_activation_is_rebuilt_from_the_store(backend: Backend) -> None:
    async with runtime(backend, Account, actor_idle_seconds=0.01) as rt:
        ref = rt.client.actor(Account, "a")
        for n in (1, 2, 3, 4):
            await ref.ask(Account.deposit, n)
            await asyncio.sleep(0.05)
            assert ("Account", "a") not in rt._activations
        assert await ref.ask(Account.get_history) == [1, 2, 3, 4]
    assert_calls_once()


# -- failed messages ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Account1, Account, AccountFull], ids=["1", "3", "1000"])
async def test_failed_message_is_recorded_and_its_state_change_discarded(
    backend: Backend, cls: Any
) -> None:
    async with runtime(backend, cls) as rt:
        ref = rt.client.actor(cls, "a")
        assert await ref.ask(cls.deposit, 10) == 10
        with pytest.raises(InvocationFailedError) as info:
            await ref.ask(cls.withdraw, 50)
        assert isinstance(info.value.cause, InsufficientFundsError)
        assert info.value.target == f"{cls.__qualname__}.withdraw"
        assert await ref.ask(cls.balance) == 10
        assert await ref.ask(cls.get_history) == [10]
        handle = await ref.tell(cls.deposit, 5)
        assert handle is not None
        assert await handle.result() == 15
        assert [r.status for r in await messages(rt)] == [
            Status.COMPLETED,
            Status.FAILED,
            Status.COMPLETED,
            Status.COMPLETED,
            Status.COMPLETED,
        ]
        # the failed message is the last one before the restart, too
        with pytest.raises(InvocationFailedError):
            await ref.ask(cls.withdraw, 16)
    async with runtime(backend, cls) as rt:
        ref = rt.client.actor(cls, "a")
        assert await ref.ask(cls.get_history) == [10, 5]
        assert await ref.ask(cls.withdraw, 15) == 0
    assert_calls_once()


# -- in-flight messages ---------------------------------------------------------------


@pytest.mark.parametrize("cls", [Account1, Account, AccountFull], ids=["1", "3", "1000"])
async def test_in_flight_message_resumes_first_after_restart(
    backend: Backend, gate: Gate, cls: Any
) -> None:
    async with runtime(backend, cls) as rt:
        ref = rt.client.actor(cls, "a")
        assert await ref.ask(cls.deposit, 1) == 1
        slow = await ref.tell(cls.slow_deposit, 10)
        queued = await ref.tell(cls.deposit, 100)
        assert slow is not None
        assert queued is not None
        await gate.until_reached(slow)
        assert len(EXT.calls) == 2
    gate.open()
    assert gate.passed == 0
    async with runtime(backend, cls) as rt:
        assert rt.stats.actors_recovered == 1
        ref = rt.client.actor(cls, "a")
        newer = await ref.tell(cls.deposit, 1000)
        assert newer is not None
        assert await attach(rt, slow).result() == 11
        assert await attach(rt, queued).result() == 111
        assert await newer.result() == 1111
        assert await ref.ask(cls.get_history) == [1, 10, 100, 1000]
        assert [r.actor_seq for r in await messages(rt)] == [1, 2, 3, 4, 5]
        assert {r.status for r in await messages(rt)} == {Status.COMPLETED}
    assert gate.passed == 1
    assert_calls_once()
    assert EXT.total("a") == 1111
    async with runtime(backend, cls) as rt:
        assert await rt.client.actor(cls, "a").ask(cls.balance) == 1111
    assert_calls_once()


async def test_in_flight_message_that_then_fails(backend: Backend, gate: Gate) -> None:
    class Risky(Account):
        durability = DurabilityFacet(checkpoint_every=2)

        async def slow_withdraw(self, ctx: Any, cents: int) -> int:
            got = await ctx.run("ext", external, self.key, -cents)
            self.state.cents += got
            await ctx.run("gate", gate_wait)
            if self.state.cents < 0:
                raise InsufficientFundsError(self.key)
            self.state.history.append(got)
            return self.state.cents

    async with runtime(backend, Risky) as rt:
        ref = rt.client.actor(Risky, "a")
        await ref.ask(Risky.deposit, 5)
        slow = await ref.tell(Risky.slow_withdraw, 50)
        assert slow is not None
        await ref.tell(Risky.deposit, 7)
        await gate.until_reached(slow)
    gate.open()
    async with runtime(backend, Risky) as rt:
        with pytest.raises(InvocationFailedError):
            await attach(rt, slow).result()
        ref = rt.client.actor(Risky, "a")
        assert await ref.ask(Risky.get_history) == [5, 7]
        assert await ref.ask(Risky.balance) == 12
    assert_calls_once()


# -- idempotency ------------------------------------------------------------------------


async def test_idempotency_key_deduplicates(backend: Backend) -> None:
    async with runtime(backend, Account) as rt:
        ref = rt.client.actor(Account, "a")
        assert await ref.ask(Account.deposit, 5, idempotency_key="d1") == 5
        assert await ref.ask(Account.deposit, 5, idempotency_key="d1") == 5
        first = await ref.tell(Account.deposit, 7, idempotency_key="d2")
        again = await ref.tell(Account.deposit, 7, idempotency_key="d2")
        assert first is not None
        assert again is not None
        assert first.id == again.id
        assert await again.result() == 12
        with pytest.raises(IdempotencyConflictError):
            await ref.ask(Account.deposit, 6, idempotency_key="d1")
        concurrent = await asyncio.gather(
            *(ref.ask(Account.deposit, 1, idempotency_key="d3") for _ in range(5))
        )
        assert concurrent == [13] * 5
        assert await ref.ask(Account.get_history) == [5, 7, 1]
    async with runtime(backend, Account) as rt:
        ref = rt.client.actor(Account, "a")
        assert await ref.ask(Account.deposit, 5, idempotency_key="d1") == 5
        assert await ref.ask(Account.get_history) == [5, 7, 1]
        deposits = [r for r in await messages(rt) if r.target == "Account.deposit"]
        assert [r.idempotency_key for r in deposits] == ["d1", "d2", "d3"]
    assert_calls_once()


async def test_idempotency_key_is_per_actor_instance(backend: Backend) -> None:
    """Regression: the key was scoped to the handler, so bob's deposit with
    alice's key returned alice's invocation (or raised a conflict)."""
    async with runtime(backend, Account) as rt:
        alice = rt.client.actor(Account, "alice")
        bob = rt.client.actor(Account, "bob")
        assert await alice.ask(Account.deposit, 5, idempotency_key="d1") == 5
        assert await bob.ask(Account.deposit, 7, idempotency_key="d1") == 7
        assert await bob.ask(Account.deposit, 7, idempotency_key="d1") == 7
        assert await bob.ask(Account.balance) == 7
        assert [r.actor_key for r in await messages(rt) if r.target == "Account.deposit"] == [
            "alice",
            "bob",
        ]
    async with runtime(backend, Account) as rt:
        bob = rt.client.actor(Account, "bob")
        assert await bob.ask(Account.deposit, 7, idempotency_key="d1") == 7
        with pytest.raises(IdempotencyConflictError):
            await bob.ask(Account.deposit, 8, idempotency_key="d1")
        assert await rt.client.actor(Account, "alice").ask(Account.get_history) == [5]
        assert await bob.ask(Account.get_history) == [7]
    assert_calls_once()


# -- checkpoints ------------------------------------------------------------------------


def corrupt_checkpoints(path: str, *, newest_only: bool) -> list[int]:
    """Flip bytes in the stored state of checkpoints; return their seqs."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT actor_type, actor_key, seq, state FROM checkpoints ORDER BY seq DESC"
        ).fetchall()
        assert rows, "no checkpoint was written"
        if newest_only:
            rows = rows[:1]
        for actor_type, actor_key, seq, state in rows:
            flipped = bytes(b ^ 0x5A for b in state[:4]) + bytes(state[4:])
            conn.execute(
                "UPDATE checkpoints SET state = ? WHERE actor_type = ? AND actor_key = ? "
                "AND seq = ?",
                (flipped, actor_type, actor_key, seq),
            )
        conn.commit()
    return [r[2] for r in rows]


@pytest.mark.parametrize("newest_only", [False, True], ids=["all", "newest"])
async def test_corrupt_checkpoint_falls_back(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, newest_only: bool
) -> None:
    backend = Backend(f"sqlite:///{tmp_path}/x.db")
    amounts = [3, 1, 4, 1, 5, 9, 2]
    async with runtime(backend, Account) as rt:
        ref = rt.client.actor(Account, "a")
        for n in amounts:
            await ref.ask(Account.deposit, n)
    corrupted = corrupt_checkpoints(backend.path, newest_only=newest_only)
    assert corrupted[0] == 6
    with caplog.at_level(logging.WARNING, logger="perdure.actor"):
        async with runtime(backend, Account) as rt:
            assert await rt.client.actor(Account, "a").ask(Account.get_history) == amounts
            # all bad: full replay; newest bad: from the one at 3
            assert rt.stats.actor_messages_replayed == (4 if newest_only else 7)
            assert rt.stats.steps_executed == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint at message 6" in w and "checksum" in w for w in warnings), warnings
    assert len(warnings) == len(corrupted)
    assert_calls_once()


async def test_undecodable_checkpoint_with_a_valid_checksum(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib

    backend = Backend(f"sqlite:///{tmp_path}/x.db")
    async with runtime(backend, Account1) as rt:
        ref = rt.client.actor(Account1, "a")
        for n in (1, 2):
            await ref.ask(Account1.deposit, n)
    with contextlib.closing(sqlite3.connect(backend.path)) as conn:
        bad = b"\xff\x00not a state"
        conn.execute(
            "UPDATE checkpoints SET state = ?, checksum = ?",
            (bad, hashlib.sha256(bad).hexdigest()),
        )
        conn.commit()
    with caplog.at_level(logging.WARNING, logger="perdure.actor"):
        async with runtime(backend, Account1) as rt:
            assert await rt.client.actor(Account1, "a").ask(Account1.get_history) == [1, 2]
    assert any("cannot be decoded" in r.getMessage() for r in caplog.records)
    assert_calls_once()


class VersionedV1(Account):
    actor_name = "Versioned"
    durability = DurabilityFacet(checkpoint_every=1, state_version=1)


class VersionedV2(Account):
    actor_name = "Versioned"
    durability = DurabilityFacet(checkpoint_every=1, state_version=2)


async def test_changed_state_version_ignores_old_checkpoints(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    async with runtime(backend, VersionedV1) as rt:
        ref = rt.client.actor(VersionedV1, "a")
        for n in (1, 2, 3):
            await ref.ask(VersionedV1.deposit, n)
        assert (await messages(rt))[0].target == "Versioned.deposit"
    with caplog.at_level(logging.WARNING, logger="perdure.actor"):
        async with runtime(backend, VersionedV2) as rt:
            ref = rt.client.actor(VersionedV2, "a")
            assert await ref.ask(VersionedV2.get_history) == [1, 2, 3]
            assert rt.stats.actor_messages_replayed == 3
    assert any("state version 1" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="perdure.actor"):
        async with runtime(backend, VersionedV2) as rt:
            ref = rt.client.actor(VersionedV2, "a")
            assert await ref.ask(VersionedV2.get_history) == [1, 2, 3]
            assert rt.stats.actor_messages_replayed == 0  # the v2 checkpoint of the query
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert_calls_once()


async def test_checkpoints_are_written_every_n_messages(backend: Backend) -> None:
    async with runtime(backend, Account) as rt:
        ref = rt.client.actor(Account, "a")
        for n in range(1, 8):
            await ref.ask(Account.deposit, n)
        found = await rt.store.read_checkpoints("Account", "a", limit=100)
        assert [c.seq for c in found][:2] == [6, 3]
        assert found[0].state_version == 1


async def test_old_checkpoints_are_pruned(backend: Backend) -> None:
    """Regression: retain_checkpoints was only a read limit; none was deleted."""
    async with runtime(backend, Account1) as rt:
        ref = rt.client.actor(Account1, "a")
        for n in range(1, 11):
            await ref.ask(Account1.deposit, n)
        found = await rt.store.read_checkpoints("Account1", "a", limit=100)
        assert [c.seq for c in found] == [10, 9]
    async with runtime(backend, Account1) as rt:
        assert await rt.client.actor(Account1, "a").ask(Account1.balance) == 55
        assert rt.stats.actor_messages_replayed == 0
    assert_calls_once()


# -- recovery problems --------------------------------------------------------------


class Renamed(perdure.Actor[Balance]):
    """Account after a deploy that removed the ``slow_deposit`` handler."""

    actor_name = "Account"
    durability = DurabilityFacet(checkpoint_every=3)

    async def deposit(self, ctx: Any, cents: int) -> int:
        got = await ctx.run("ext", external, self.key, cents)
        self.state.cents += got
        self.state.history.append(got)
        return self.state.cents


async def _leave_in_flight(backend: Backend, gate: Gate) -> None:
    async with runtime(backend, Account) as rt:
        await rt.client.actor(Account, "b").ask(Account.deposit, 2)
        ref = rt.client.actor(Account, "a")
        await ref.ask(Account.deposit, 1)
        slow = await ref.tell(Account.slow_deposit, 10)
        assert slow is not None
        await gate.until_reached(slow)


async def test_unregistered_actor_type_does_not_block_start(
    backend: Backend, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    await _leave_in_flight(backend, gate)
    with caplog.at_level(logging.ERROR):
        async with runtime(backend, Tally) as rt:
            assert await rt.client.actor(Tally, "a").ask(Tally.add, 1) == 1
            (stuck,) = await rt.client.list(status=Status.RUNNING)
            assert isinstance(rt.stopped_reason(stuck.id), UnknownWorkflowError)
    assert any("actor type 'Account'" in r.getMessage() for r in caplog.records)
    gate.open()
    async with runtime(backend, Account) as rt:
        assert await rt.client.actor(Account, "a").ask(Account.get_history) == [1, 10]
    assert_calls_once()


async def test_removed_handler_of_in_flight_message_does_not_block_start(
    backend: Backend, gate: Gate
) -> None:
    """Regression: Runtime.start() raised when one actor with an unfinished
    message could not be activated (its handler was removed)."""
    await _leave_in_flight(backend, gate)
    async with runtime(backend, Renamed) as rt:
        assert await rt.client.actor(Renamed, "b").ask(Renamed.deposit, 3) == 5
        with pytest.raises(perdure.PerdureError, match="slow_deposit"):
            await rt.client.actor(Renamed, "a").ask(Renamed.deposit, 3)
    gate.open()
    async with runtime(backend, Account) as rt:  # the handler is back: it resumes
        assert await rt.client.actor(Account, "a").ask(Account.get_history) == [1, 10]
        assert await rt.client.actor(Account, "b").ask(Account.get_history) == [2, 3]
    assert_calls_once()
