"""Workflow semantics, over every backend (``backend`` fixture, tests/conftest.py).

A "restart" is simulated in-process: the workflow blocks on a ``Gate`` step,
the runtime is stopped (which cancels it, leaving the invocation unfinished
with everything before the gate journaled), and a new runtime is started on
the same store with the gate open.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pydantic
import pytest

import perdure
from conftest import Backend, Gate, attach
from perdure import (
    ConfigurationError,
    IdempotencyConflictError,
    InvocationFailedError,
    InvocationStoppedError,
    NonDeterminismError,
    RetryPolicy,
    Status,
    TerminalError,
    current_step,
)
from perdure.storage import EntryKind
from perdure.testing import FakeClock, Hooks

# -- module-level types: recorded type tags must be importable ----------------------


@dataclasses.dataclass
class Charge:
    id: str
    amount_cents: int


class Parcel(msgspec.Struct):
    id: str
    weight_kg: float


class Customer(pydantic.BaseModel):
    name: str
    tags: list[str]


class PaymentDeclinedError(Exception):
    pass


class CodedError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def make_dataclass() -> Charge:
    return Charge("ch-1", 1999)


def make_dataclass_unannotated():  # type: ignore[no-untyped-def]
    return Charge("ch-2", 5)


def make_struct() -> Parcel:
    return Parcel("p-1", 2.5)


def make_pydantic() -> Customer:
    return Customer(name="Ada", tags=["vip", "eu"])


def make_list_of_dataclasses() -> list[Charge]:
    return [Charge("a", 1), Charge("b", 2)]


def make_dict_of_structs() -> dict[str, Parcel]:
    return {"x": Parcel("x", 1.0), "y": Parcel("y", 0.5)}


def make_datetime() -> datetime:
    return datetime(2024, 5, 17, 12, 30, 15, 123456, tzinfo=UTC)


def make_decimal() -> Decimal:
    return Decimal("19.99")


def make_tuple() -> tuple[int, str]:
    return (1, "one")


def make_json():  # type: ignore[no-untyped-def]
    return {"a": [1, 2.5, "x", None, True], "b": {"c": False, "d": []}}


def make_str():  # type: ignore[no-untyped-def]
    return "hello ünïcode"


def make_int():  # type: ignore[no-untyped-def]
    return 2**100  # beyond 64 bits


def make_float():  # type: ignore[no-untyped-def]
    return 0.1


def make_bool():  # type: ignore[no-untyped-def]
    return False


def make_none():  # type: ignore[no-untyped-def]
    return None


def make_list():  # type: ignore[no-untyped-def]
    return [1, "2", [3.0]]


VALUE_CASES: dict[str, tuple[Callable[[], Any], type]] = {
    "dataclass": (make_dataclass, Charge),
    "dataclass-unannotated": (make_dataclass_unannotated, Charge),
    "msgspec-struct": (make_struct, Parcel),
    "pydantic-model": (make_pydantic, Customer),
    "list-of-dataclasses": (make_list_of_dataclasses, list),
    "dict-of-structs": (make_dict_of_structs, dict),
    "datetime": (make_datetime, datetime),
    "decimal": (make_decimal, Decimal),
    "tuple": (make_tuple, tuple),
    "json": (make_json, dict),
    "str": (make_str, str),
    "int": (make_int, int),
    "float": (make_float, float),
    "bool": (make_bool, bool),
    "none": (make_none, type(None)),
    "list": (make_list, list),
}


def counted(fn: Callable[..., Any], calls: list[str]) -> Callable[..., Any]:
    """``fn``, appending its name to ``calls`` on each call (annotations kept)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(fn.__name__)
        return fn(*args, **kwargs)

    return wrapper


async def crash_at_gate(
    backend: Backend, wf: perdure.Workflow[Any, Any], gate: Gate, *args: Any, **kwargs: Any
) -> perdure.InvocationHandle[Any]:
    """Start ``wf`` on a fresh runtime, wait until it blocks on ``gate``, stop the runtime."""
    async with backend.runtime([wf]) as rt:
        handle = await rt.client.start(wf, *args, **kwargs)
        await gate.until_reached(handle)
        assert await handle.status() is Status.RUNNING
    return handle


# -- steps and replay ---------------------------------------------------------------


async def test_steps_are_journaled_and_results_returned(backend: Backend) -> None:
    def double(x: int) -> int:
        return 2 * x

    async def add(x: int, y: int) -> int:
        await asyncio.sleep(0)
        return x + y

    @perdure.workflow(name="arith")
    async def arith(ctx: perdure.Context, x: int) -> dict[str, int]:
        a = await ctx.run("double", double, x)
        b = await ctx.run("add", add, a, y=1)
        c = await ctx.run("lambda", lambda: b * 10)
        return {"a": a, "b": b, "c": c}

    async with backend.runtime([arith]) as rt:
        handle = await rt.client.start(arith, 4)
        assert await handle.result() == {"a": 8, "b": 9, "c": 90}
        assert await handle.status() is Status.COMPLETED
        assert await rt.client.run(arith, 1) == {"a": 2, "b": 3, "c": 30}
        journal = await rt.store.read_journal(handle.id)
        assert [(e.index, e.kind, e.name) for e in journal] == [
            (0, EntryKind.INPUT, "arith"),
            (1, EntryKind.STEP, "double"),
            (2, EntryKind.STEP, "add"),
            (3, EntryKind.STEP, "lambda"),
            (4, EntryKind.OUTPUT, "arith"),
        ]
        assert all(e.ok for e in journal)
        assert [e.attempts for e in journal[1:4]] == [1, 1, 1]
        completed = await rt.client.list(workflow="arith", status="completed")
        assert len(completed) == 2
        assert completed[0].id == handle.id  # oldest first
        assert rt.stats.steps_executed == 6
        assert rt.stats.steps_replayed == 0


async def test_replay_after_restart_returns_recorded_results_without_rerunning(
    backend: Backend, gate: Gate
) -> None:
    calls: list[str] = []

    def charge(amount: int) -> Charge:
        calls.append("charge")
        return Charge(f"ch-{amount}", amount)

    @perdure.workflow(name="replay")
    async def wf(ctx: perdure.Context, amount: int) -> str:
        receipt = await ctx.run("charge", charge, amount)
        await ctx.run("gate", gate.wait)
        return f"{receipt.id}/{receipt.amount_cents}"

    handle = await crash_at_gate(backend, wf, gate, 1999)
    assert calls == ["charge"]

    gate.open()
    async with backend.runtime([wf]) as rt:
        assert await attach(rt, handle).result() == "ch-1999/1999"
        assert calls == ["charge"]  # replayed, not called again
        assert gate.passed == 1
        assert rt.stats.invocations_recovered == 1
        assert rt.stats.steps_replayed == 1
        assert await attach(rt, handle).status() is Status.COMPLETED
        journal = await rt.store.read_journal(handle.id)
        assert [e.name for e in journal] == ["replay", "charge", "gate", "replay"]

    # A completed invocation never runs again.
    async with backend.runtime([wf]) as rt:
        assert rt.stats.invocations_recovered == 0
        assert await (await rt.client.get(handle.id)).result() == "ch-1999/1999"
    assert calls == ["charge"]


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
async def test_step_result_types_round_trip_on_replay(
    backend: Backend, gate: Gate, case: str
) -> None:
    make, expected_type = VALUE_CASES[case]
    seen: list[Any] = []
    calls: list[str] = []

    @perdure.workflow(name="types")
    async def wf(ctx: perdure.Context) -> None:
        seen.append(await ctx.run("value", counted(make, calls)))
        await ctx.run("gate", gate.wait)

    handle = await crash_at_gate(backend, wf, gate)
    gate.open()
    async with backend.runtime([wf]) as rt:
        await attach(rt, handle).result()
    live, replayed = seen
    assert calls == [make.__name__]
    assert type(live) is expected_type
    assert type(replayed) is expected_type
    assert live == make()
    assert replayed == live
    if isinstance(live, list) and live and isinstance(live[0], Charge):
        assert all(type(x) is Charge for x in replayed)
    if isinstance(live, dict) and live and isinstance(next(iter(live.values())), Parcel):
        assert all(type(x) is Parcel for x in replayed.values())
    if isinstance(live, datetime):
        assert replayed.tzinfo is not None


async def test_workflow_result_keeps_its_type_from_the_store(backend: Backend) -> None:
    @perdure.workflow(name="typed-result")
    async def wf(ctx: perdure.Context) -> list[Charge]:
        return await ctx.run("make", make_list_of_dataclasses)

    async with backend.runtime([wf]) as rt:
        handle = await rt.client.start(wf)
        live = await handle.result()
    async with backend.runtime([wf]) as rt:
        stored = await (await rt.client.get(handle.id)).result()
    assert live == stored == make_list_of_dataclasses()
    assert all(type(x) is Charge for x in stored)


async def test_workflow_input_is_decoded_to_its_annotated_types(
    backend: Backend, gate: Gate
) -> None:
    seen: list[Any] = []

    @perdure.workflow(name="typed-input")
    async def wf(ctx: perdure.Context, charge: Charge, when: datetime, *, parcel: Parcel) -> str:
        seen.append((charge, when, parcel))
        await ctx.run("gate", gate.wait)
        return charge.id

    args = (Charge("c", 1), make_datetime())
    handle = await crash_at_gate(backend, wf, gate, *args, parcel=Parcel("p", 1.0))
    gate.open()
    async with backend.runtime([wf]) as rt:
        assert await attach(rt, handle).result() == "c"
    assert seen[0] == seen[1] == (*args, Parcel("p", 1.0))
    assert [type(x) for x in seen[1]] == [Charge, datetime, Parcel]


@pytest.mark.parametrize(
    "error",
    [
        PaymentDeclinedError("card 4242 declined"),
        CodedError(402, "insufficient funds"),
        TerminalError("do not retry"),
        ValueError("bad value"),
        KeyError("missing"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_recorded_errors_are_reraised_on_replay(
    backend: Backend, gate: Gate, error: Exception
) -> None:
    seen: list[Exception] = []
    calls: list[str] = []

    def fail() -> None:
        calls.append("fail")
        raise error

    @perdure.workflow(name="errors")
    async def wf(ctx: perdure.Context) -> str:
        try:
            await ctx.run("fail", fail, retry=RetryPolicy(max_attempts=1))
        except Exception as exc:
            seen.append(exc)
        await ctx.run("gate", gate.wait)
        return "handled"

    handle = await crash_at_gate(backend, wf, gate)
    gate.open()
    async with backend.runtime([wf]) as rt:
        assert await attach(rt, handle).result() == "handled"
        step = (await rt.store.read_journal(handle.id))[1]
        assert (step.name, step.ok) == ("fail", False)
    assert calls == ["fail"]
    live, replayed = seen
    assert live is error
    assert type(replayed) is type(error)
    assert str(replayed) == str(error)
    assert replayed.args == error.args


# -- non-determinism ----------------------------------------------------------------


def _two_step_workflow(
    gate: Gate, first: str, *, with_gate: bool = True
) -> perdure.Workflow[[], str]:
    @perdure.workflow(name="evolving")
    async def wf(ctx: perdure.Context) -> str:
        await ctx.run(first, lambda: 1)
        if with_gate:
            await ctx.run("gate", gate.wait)
        return "done"

    return wf


async def test_changed_step_name_raises_nondeterminism_and_leaves_invocation_unfinished(
    backend: Backend, gate: Gate
) -> None:
    original = _two_step_workflow(gate, "charge")
    handle = await crash_at_gate(backend, original, gate)
    gate.open()

    changed = _two_step_workflow(gate, "charge-v2")
    async with backend.runtime([changed]) as rt:
        with pytest.raises(InvocationStoppedError) as info:
            await attach(rt, handle).result()
        assert info.value.invocation_id == handle.id
        err = info.value.__cause__
        assert isinstance(err, NonDeterminismError)
        assert info.value.reason is err
        assert err.invocation_id == handle.id
        assert err.index == 1
        assert err.expected == "step 'charge'"
        assert err.actual == "step 'charge-v2'"
        message = str(err)
        for part in (handle.id, "entry 1", "'charge'", "'charge-v2'"):
            assert part in message
        await rt.client.wait_idle()
        assert await attach(rt, handle).status() is Status.RUNNING
        # Asking again later, once it has stopped, gives the same answer.
        with pytest.raises(InvocationStoppedError) as again:
            await (await rt.client.get(handle.id)).result(timeout=10)
        assert isinstance(again.value.__cause__, NonDeterminismError)
        assert await rt.client.list(status=Status.FAILED) == []
        assert [e.name for e in await rt.store.read_journal(handle.id)] == ["evolving", "charge"]
        assert rt.stats.invocations_suspended == 1
    assert gate.passed == 0

    # Deploying the original code again finishes it.
    async with backend.runtime([original]) as rt:
        assert await attach(rt, handle).result() == "done"
    assert gate.passed == 1


async def test_workflow_returning_before_its_journal_ends_is_nondeterminism(
    backend: Backend, gate: Gate
) -> None:
    handle = await crash_at_gate(backend, _two_step_workflow(gate, "first"), gate)
    async with backend.runtime([_two_step_workflow(gate, "first", with_gate=False)]) as rt:
        # The gate step was never recorded, so returning before it is fine...
        assert await attach(rt, handle).result() == "done"

    gate2 = Gate()
    handle = await crash_at_gate(backend, _three_step_workflow(gate2, third=True), gate2)
    async with backend.runtime([_three_step_workflow(gate2, third=False)]) as rt:
        # ... but skipping a recorded step is not.
        with pytest.raises(InvocationStoppedError) as info:
            await attach(rt, handle).result()
        err = info.value.__cause__
        assert isinstance(err, NonDeterminismError)
        assert err.index == 2
        assert err.expected == "step 'second'"
        assert err.actual == "the workflow to return"
        await rt.client.wait_idle()
        assert await attach(rt, handle).status() is Status.RUNNING


def _three_step_workflow(gate: Gate, *, third: bool) -> perdure.Workflow[[], str]:
    @perdure.workflow(name="shrinking")
    async def wf(ctx: perdure.Context) -> str:
        await ctx.run("first", lambda: 1)
        if third:
            await ctx.run("second", lambda: 2)
            await ctx.run("third", gate.wait)
        return "done"

    return wf


# -- retries ------------------------------------------------------------------------


async def test_retry_until_success_journals_attempts_and_backs_off(
    backend: Backend, clock: FakeClock
) -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(current_step().attempt)
        if len(calls) < 3:
            raise ConnectionError(f"attempt {len(calls)} failed")
        return "ok"

    policy = RetryPolicy(max_attempts=3, initial_interval=timedelta(seconds=2), backoff_factor=3.0)

    @perdure.workflow(name="retry-ok")
    async def wf(ctx: perdure.Context) -> str:
        return await ctx.run("flaky", flaky, retry=policy)

    async with backend.runtime([wf], clock=clock) as rt:
        handle = await rt.client.start(wf)
        assert await handle.result() == "ok"
        assert calls == [1, 2, 3]
        assert clock.slept == [2.0, 6.0]
        attempts = await rt.store.read_attempts(handle.id)
        assert [(a.index, a.attempt) for a in attempts] == [(1, 1), (1, 2)]
        errors = [rt.codec.error_summary(a.error) for a in attempts]
        assert [e["message"] for e in errors] == ["attempt 1 failed", "attempt 2 failed"]
        assert all(e["type"].endswith(":ConnectionError") for e in errors)
        step = (await rt.store.read_journal(handle.id))[1]
        assert (step.ok, step.attempts) == (True, 3)
        assert rt.stats.step_retries == 2


async def test_backoff_is_capped_by_max_interval(backend: Backend, clock: FakeClock) -> None:
    policy = RetryPolicy(
        max_attempts=5,
        initial_interval=timedelta(seconds=1),
        backoff_factor=10.0,
        max_interval=timedelta(seconds=30),
    )

    def always_fails() -> None:
        raise ConnectionError("down")

    @perdure.workflow(name="capped")
    async def wf(ctx: perdure.Context) -> None:
        await ctx.run("down", always_fails, retry=policy)

    async with backend.runtime([wf], clock=clock) as rt:
        with pytest.raises(InvocationFailedError):
            await rt.client.run(wf)
    assert clock.slept == [1.0, 10.0, 30.0, 30.0]


async def test_exhausted_retries_fail_the_workflow_with_the_original_error(
    backend: Backend, clock: FakeClock
) -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise CodedError(503, "service unavailable")

    @perdure.workflow(name="retry-fail")
    async def wf(ctx: perdure.Context) -> None:
        await ctx.run("broken", broken, retry=RetryPolicy(max_attempts=3))

    async with backend.runtime([wf], clock=clock) as rt:
        handle = await rt.client.start(wf)
        with pytest.raises(InvocationFailedError) as info:
            await handle.result()
        assert type(info.value.__cause__) is CodedError
        assert info.value.__cause__.args == (503, "service unavailable")
        assert info.value.invocation_id == handle.id
        assert len(calls) == 3
        assert len(clock.slept) == 2
        assert await handle.status() is Status.FAILED
        assert len(await rt.store.read_attempts(handle.id)) == 2
        step = (await rt.store.read_journal(handle.id))[1]
        assert (step.ok, step.attempts) == (False, 3)


async def test_default_retry_policy_of_the_runtime_applies(backend: Backend) -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("no")

    @perdure.workflow(name="default-retry")
    async def wf(ctx: perdure.Context) -> None:
        await ctx.run("broken", broken)

    async with backend.runtime([wf], default_retry=RetryPolicy(max_attempts=4)) as rt:
        with pytest.raises(InvocationFailedError):
            await rt.client.run(wf)
    assert len(calls) == 4


async def test_terminal_error_is_not_retried(backend: Backend, clock: FakeClock) -> None:
    calls: list[int] = []

    def declined() -> None:
        calls.append(1)
        raise TerminalError("card declined")

    @perdure.workflow(name="terminal")
    async def wf(ctx: perdure.Context) -> None:
        await ctx.run("declined", declined, retry=RetryPolicy(max_attempts=5))

    async with backend.runtime([wf], clock=clock) as rt:
        handle = await rt.client.start(wf)
        with pytest.raises(InvocationFailedError) as info:
            await handle.result()
        assert type(info.value.__cause__) is TerminalError
        assert str(info.value.__cause__) == "card declined"
        assert calls == [1]
        assert clock.slept == []
        assert await rt.store.read_attempts(handle.id) == []


async def test_attempts_resume_counting_after_a_restart(backend: Backend, gate: Gate) -> None:
    seen: list[tuple[int, str]] = []
    policy = RetryPolicy(max_attempts=3)

    async def flaky() -> str:
        info = current_step()
        seen.append((info.attempt, info.key))
        if info.attempt == 1:
            raise ConnectionError("first try fails")
        if not gate.is_open:  # crash during the second attempt
            await gate.wait()
        if info.attempt == 2:
            raise ConnectionError("second try fails")
        return f"ok on attempt {info.attempt}"

    @perdure.workflow(name="resume-attempts")
    async def wf(ctx: perdure.Context) -> str:
        return await ctx.run("flaky", flaky, retry=policy)

    handle = await crash_at_gate(backend, wf, gate)
    assert [a for a, _ in seen] == [1, 2]
    gate.open()
    async with backend.runtime([wf]) as rt:
        assert await attach(rt, handle).result() == "ok on attempt 3"
        attempts = await rt.store.read_attempts(handle.id)
        assert [a.attempt for a in attempts] == [1, 2]
        assert (await rt.store.read_journal(handle.id))[1].attempts == 3
    assert [a for a, _ in seen] == [1, 2, 2, 3]
    assert len({key for _, key in seen}) == 1


async def test_attempt_budget_spans_restarts(backend: Backend, gate: Gate) -> None:
    calls: list[int] = []

    async def broken() -> None:
        calls.append(current_step().attempt)
        if len(calls) == 2 and not gate.is_open:
            await gate.wait()
        raise ConnectionError("down")

    @perdure.workflow(name="budget")
    async def wf(ctx: perdure.Context) -> None:
        await ctx.run("broken", broken, retry=RetryPolicy(max_attempts=3))

    handle = await crash_at_gate(backend, wf, gate)
    gate.open()
    async with backend.runtime([wf]) as rt:
        with pytest.raises(InvocationFailedError):
            await attach(rt, handle).result()
    # Attempt 2 was cut short by the crash and ran again; never more than 3 in all.
    assert calls == [1, 2, 2, 3]


async def test_restart_resumes_every_unfinished_invocation(backend: Backend, gate: Gate) -> None:
    calls: list[int] = []

    def work(n: int) -> int:
        calls.append(n)
        return n * n

    @perdure.workflow(name="bulk")
    async def wf(ctx: perdure.Context, n: int) -> int:
        sq = await ctx.run("square", work, n)
        await ctx.run("gate", gate.wait)
        return sq + 1

    async with backend.runtime([wf]) as rt:
        handles = [await rt.client.start(wf, n) for n in range(20)]
        async with asyncio.timeout(30):
            while gate.waiting < 20:
                await asyncio.sleep(0)
    assert sorted(calls) == list(range(20))
    gate.open()
    async with backend.runtime([wf]) as rt:
        assert rt.stats.invocations_recovered == 20
        results = await asyncio.gather(*(attach(rt, h).result() for h in handles))
    assert results == [n * n + 1 for n in range(20)]
    assert sorted(calls) == list(range(20))
    assert gate.passed == 20


async def test_waiting_caller_learns_when_the_runtime_stops(backend: Backend, gate: Gate) -> None:
    @perdure.workflow(name="stopped")
    async def wf(ctx: perdure.Context) -> str:
        await ctx.run("gate", gate.wait)
        return "done"

    rt = backend.runtime([wf])
    await rt.start()
    try:
        handle = await rt.client.start(wf)
        await gate.until_reached(handle)
        waiter = asyncio.ensure_future(handle.result())
        await asyncio.sleep(0)
    finally:
        await rt.stop()
    with pytest.raises(InvocationStoppedError) as info:
        await waiter
    assert info.value.invocation_id == handle.id
    assert info.value.reason is None


# -- step keys and deterministic helpers --------------------------------------------


async def test_step_key_is_stable_across_retries_and_restarts(backend: Backend, gate: Gate) -> None:
    keys: list[tuple[str, str]] = []

    def a() -> str:
        keys.append(("a", current_step().key))
        return "a"

    async def b() -> str:
        keys.append(("b", current_step().key))
        if sum(1 for name, _ in keys if name == "b") == 1:
            raise ConnectionError("retry me")
        return "b"

    async def c() -> str:
        keys.append(("c", current_step().key))
        return await gate.wait()

    @perdure.workflow(name="keys")
    async def wf(ctx: perdure.Context, n: int) -> str:
        await ctx.run("a", a)
        await ctx.run("b", b, retry=RetryPolicy(max_attempts=2))
        await ctx.run("c", c)
        return "done"

    handle = await crash_at_gate(backend, wf, gate, 1)
    first_run = list(keys)
    assert [name for name, _ in first_run] == ["a", "b", "b", "c"]
    gate.open()
    async with backend.runtime([wf]) as rt:
        assert await attach(rt, handle).result() == "done"
        other = await rt.client.start(wf, 2)
        await other.result()
    # a and b were replayed, c ran again with the same key.
    assert keys[:4] == first_run
    assert keys[4] == ("c", first_run[3][1])
    by_step = {name: {k for n, k in first_run if n == name} for name in "abc"}
    assert all(len(v) == 1 for v in by_step.values())
    assert len(set.union(*by_step.values())) == 3
    # Another invocation's steps have other keys.
    assert not {k for _, k in keys[5:]} & set.union(*by_step.values())
    assert all(handle.id in k for _, k in first_run)


async def test_current_step_outside_a_step_raises() -> None:
    with pytest.raises(RuntimeError, match=r"ctx\.run"):
        current_step()


async def test_now_random_and_uuid_are_identical_on_replay(backend: Backend, gate: Gate) -> None:
    observed: list[tuple[Any, ...]] = []
    clock = FakeClock(start=1_700_000_000.0)

    def slow_step() -> int:
        clock.advance(60)
        return 1

    @perdure.workflow(name="determinism")
    async def wf(ctx: perdure.Context) -> None:
        t0 = ctx.now()
        r0 = ctx.random().random()
        u0 = ctx.uuid4()
        await ctx.run("slow", slow_step)
        t1 = ctx.now()
        r1 = ctx.random().randint(0, 10**9)
        u1 = ctx.uuid4()
        observed.append((t0, r0, u0, t1, r1, u1))
        await ctx.run("gate", gate.wait)

    async with backend.runtime([wf], clock=clock) as rt:
        handle = await rt.client.start(wf)
        await gate.until_reached(handle)

    gate.open()
    later = FakeClock(start=1_800_000_000.0)
    async with backend.runtime([wf], clock=later) as rt:
        await attach(rt, handle).result()

    live, replayed = observed
    assert live == replayed
    t0, _, u0, t1, _, u1 = live
    assert t0 == datetime.fromtimestamp(1_700_000_000.0, UTC)
    assert t1 - t0 == timedelta(seconds=60)
    assert u0 != u1
    assert u0.version == 4


async def test_random_differs_between_invocations(backend: Backend) -> None:
    @perdure.workflow(name="rand")
    async def wf(ctx: perdure.Context) -> str:
        return str(ctx.uuid4())

    async with backend.runtime([wf]) as rt:
        assert len({await rt.client.run(wf) for _ in range(5)}) == 5


# -- invocation idempotency ---------------------------------------------------------


async def test_same_idempotency_key_concurrently_and_later_is_one_invocation(
    backend: Backend,
) -> None:
    body_runs: list[str] = []
    charges: list[str] = []

    async def charge(order: str) -> Charge:
        charges.append(order)
        await asyncio.sleep(0)
        return Charge(f"tx-{order}", 100)

    @perdure.workflow(name="idem-inv")
    async def wf(ctx: perdure.Context, order: str) -> Charge:
        body_runs.append(order)
        return await ctx.run("charge", charge, order)

    async with backend.runtime([wf]) as rt:
        handles = await asyncio.gather(
            *(rt.client.start(wf, "o-1", idempotency_key="order-1") for _ in range(20))
        )
        assert len({h.id for h in handles}) == 1
        results = await asyncio.gather(*(h.result() for h in handles))
        assert results == [Charge("tx-o-1", 100)] * 20
        assert all(type(r) is Charge for r in results)

        ran = await asyncio.gather(
            *(rt.client.run(wf, "o-1", idempotency_key="order-1") for _ in range(5))
        )
        assert ran == [Charge("tx-o-1", 100)] * 5
        assert body_runs == ["o-1"]
        assert charges == ["o-1"]
        assert [r.id for r in await rt.client.list()] == [handles[0].id]
        assert rt.stats.invocations_started == 1

    # ... and after a restart too.
    async with backend.runtime([wf]) as rt:
        again = await rt.client.start(wf, "o-1", idempotency_key="order-1")
        assert again.id == handles[0].id
        assert await again.result() == Charge("tx-o-1", 100)
    assert body_runs == ["o-1"]


async def test_same_idempotency_key_with_other_input_is_a_conflict(backend: Backend) -> None:
    @perdure.workflow(name="idem-conflict")
    async def wf(ctx: perdure.Context, amount: int) -> int:
        return amount

    @perdure.workflow(name="idem-other")
    async def other(ctx: perdure.Context, amount: int) -> int:
        return -amount

    async with backend.runtime([wf, other]) as rt:
        first = await rt.client.start(wf, 100, idempotency_key="k")
        with pytest.raises(IdempotencyConflictError) as info:
            await rt.client.start(wf, 200, idempotency_key="k")
        assert first.id in str(info.value)
        assert "'k'" in str(info.value)
        with pytest.raises(IdempotencyConflictError):
            await rt.client.run(wf, amount=100, idempotency_key="k")  # kwargs != args
        # The same key under another workflow is another invocation.
        assert await rt.client.run(other, 200, idempotency_key="k") == -200
        assert await first.result() == 100
        assert len(await rt.client.list(workflow="idem-conflict")) == 1


async def test_step_idempotency_key_reuses_the_stored_result_across_invocations(
    backend: Backend,
) -> None:
    calls: list[str] = []

    async def charge(card: str) -> Charge:
        calls.append(card)
        await asyncio.sleep(0)
        return Charge(f"tx-{card}", 1999)

    @perdure.workflow(name="step-idem")
    async def wf(ctx: perdure.Context, order: str, card: str) -> Charge:
        return await ctx.run("charge", charge, card, idempotency_key=f"card-{card}")

    async with backend.runtime([wf]) as rt:
        first = await rt.client.start(wf, "o-1", "4242")
        assert await first.result() == Charge("tx-4242", 1999)
        second = await rt.client.start(wf, "o-2", "4242")
        result = await second.result()
        assert result == Charge("tx-4242", 1999)
        assert type(result) is Charge
        assert calls == ["4242"]
        assert rt.stats.steps_deduplicated == 1
        step = (await rt.store.read_journal(second.id))[1]
        assert (step.name, step.ok) == ("charge", True)

        # Concurrent invocations with one step key: still one call.
        results = await asyncio.gather(*(rt.client.run(wf, f"c-{i}", "5555") for i in range(5)))
        assert results == [Charge("tx-5555", 1999)] * 5
        assert calls == ["4242", "5555"]

    # The stored result is durable.
    async with backend.runtime([wf]) as rt:
        assert await rt.client.run(wf, "o-3", "4242") == Charge("tx-4242", 1999)
    assert calls == ["4242", "5555"]


async def test_caller_chosen_invocation_id(backend: Backend) -> None:
    @perdure.workflow(name="named-id")
    async def wf(ctx: perdure.Context, n: int) -> int:
        return await ctx.run("n", lambda: n)

    async with backend.runtime([wf]) as rt:
        handle = await rt.client.start(wf, 1, invocation_id="order-42")
        assert handle.id == "order-42"
        assert await handle.result() == 1
        with pytest.raises(perdure.ConflictError, match="order-42"):
            await rt.client.start(wf, 2, invocation_id="order-42")
        assert await (await rt.client.get("order-42")).result() == 1
        assert len(await rt.client.list()) == 1


async def test_result_of_an_invocation_this_runtime_cannot_run_does_not_hang(
    backend: Backend, gate: Gate
) -> None:
    @perdure.workflow(name="orphan")
    async def wf(ctx: perdure.Context) -> None:
        await ctx.run("gate", gate.wait)

    handle = await crash_at_gate(backend, wf, gate)
    async with backend.runtime([]) as rt:
        with pytest.raises(perdure.PerdureError):
            await (await rt.client.get(handle.id)).result(timeout=0.2)


# -- failures -----------------------------------------------------------------------


async def test_workflow_raising_fails_the_invocation(backend: Backend) -> None:
    body_runs: list[int] = []

    @perdure.workflow(name="raises")
    async def wf(ctx: perdure.Context) -> None:
        body_runs.append(1)
        await ctx.run("fine", lambda: 1)
        raise PaymentDeclinedError("card 4242 declined")

    async with backend.runtime([wf]) as rt:
        handle = await rt.client.start(wf)
        with pytest.raises(InvocationFailedError) as info:
            await handle.result()
        assert type(info.value.__cause__) is PaymentDeclinedError
        assert str(info.value.__cause__) == "card 4242 declined"
        assert info.value.invocation_id == handle.id
        assert info.value.target == "raises"
        assert "card 4242 declined" in str(info.value)
        assert await handle.status() is Status.FAILED
        output = (await rt.store.read_journal(handle.id))[-1]
        assert (output.kind, output.ok) == (EntryKind.OUTPUT, False)
        assert rt.stats.invocations_failed == 1

    async with backend.runtime([wf]) as rt:
        with pytest.raises(InvocationFailedError) as info:
            await (await rt.client.get(handle.id)).result()
        assert type(info.value.__cause__) is PaymentDeclinedError
        assert str(info.value.__cause__) == "card 4242 declined"
        assert await rt.client.list(status="failed") != []
    assert body_runs == [1]


async def test_workflow_catching_a_step_error_can_complete(backend: Backend) -> None:
    @perdure.workflow(name="catches")
    async def wf(ctx: perdure.Context) -> str:
        try:
            await ctx.run("declined", _raise_declined)
        except PaymentDeclinedError as exc:
            reason = str(exc)
            return await ctx.run("fallback", lambda: f"fallback after {reason}")
        return "unreachable"

    async with backend.runtime([wf]) as rt:
        assert await rt.client.run(wf) == "fallback after no"


def _raise_declined() -> None:
    raise PaymentDeclinedError("no")


# -- concurrency inside a workflow ---------------------------------------------------


async def test_concurrent_steps_with_gather_are_journaled_and_replayed(
    backend: Backend, gate: Gate
) -> None:
    calls: list[int] = []

    async def part(i: int) -> int:
        calls.append(i)
        for _ in range(5 - i):  # later parts finish first
            await asyncio.sleep(0)
        return i * 10

    def sync_part(i: int) -> int:
        calls.append(i)
        return i * 10

    @perdure.workflow(name="fan-out")
    async def wf(ctx: perdure.Context) -> list[int]:
        parts = await asyncio.gather(
            *(ctx.run(f"part-{i}", part if i % 2 else sync_part, i) for i in range(6))
        )
        await ctx.run("gate", gate.wait)
        return list(parts)

    handle = await crash_at_gate(backend, wf, gate)
    assert sorted(calls) == list(range(6))
    gate.open()
    async with backend.runtime([wf]) as rt:
        assert await attach(rt, handle).result() == [0, 10, 20, 30, 40, 50]
        journal = await rt.store.read_journal(handle.id)
        assert [e.name for e in journal[1:7]] == [f"part-{i}" for i in range(6)]
        assert [e.index for e in journal] == list(range(9))
    assert sorted(calls) == list(range(6))  # nothing ran twice


async def test_many_concurrent_invocations(backend: Backend) -> None:
    @perdure.workflow(name="many")
    async def wf(ctx: perdure.Context, n: int) -> int:
        a = await ctx.run("a", lambda: n)
        b = await ctx.run("b", _double, a)
        return b

    async with backend.runtime([wf]) as rt:
        results = await asyncio.gather(*(rt.client.run(wf, i) for i in range(100)))
        assert results == [2 * i for i in range(100)]
        assert len(await rt.client.list(status=Status.COMPLETED, limit=None)) == 100


async def _double(x: int) -> int:
    return 2 * x


# -- SyncRuntime --------------------------------------------------------------------


@perdure.workflow(name="sync-wf")
async def sync_wf(ctx: perdure.Context, x: int) -> Charge:
    return await ctx.run("make", lambda: Charge(f"c-{x}", x))


def test_sync_runtime_works_without_an_event_loop(store_url: str) -> None:
    with perdure.SyncRuntime(store_url, workflows=[sync_wf], clock=FakeClock()) as rt:
        assert rt.run(sync_wf, 3) == Charge("c-3", 3)
        handle = rt.start_workflow(sync_wf, 4, idempotency_key="k")
        assert handle.result() == Charge("c-4", 4)
        assert rt.start_workflow(sync_wf, 4, idempotency_key="k").id == handle.id
        assert rt.get(handle.id).status() is Status.COMPLETED
        assert rt.run("sync-wf", 5) == Charge("c-5", 5)


async def test_sync_runtime_refuses_inside_a_running_loop(store_url: str) -> None:
    with pytest.raises(ConfigurationError, match="running event loop"):
        perdure.SyncRuntime(store_url, workflows=[sync_wf])


def test_sync_runtime_calls_refuse_inside_a_running_loop(store_url: str) -> None:
    with perdure.SyncRuntime(store_url, workflows=[sync_wf], clock=FakeClock()) as rt:

        async def inside() -> None:
            with pytest.raises(ConfigurationError, match="running event loop"):
                rt.start()

        asyncio.run(inside())
        assert rt.run(sync_wf, 1) == Charge("c-1", 1)


def test_sync_runtime_refusal_inside_a_loop_leaks_no_coroutine(store_url: str) -> None:
    with perdure.SyncRuntime(store_url, workflows=[sync_wf], clock=FakeClock()) as rt:

        async def inside() -> list[warnings.WarningMessage]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    rt.run(sync_wf, 1)
                except ConfigurationError:
                    pass
                gc.collect()
            return caught

        caught = asyncio.run(inside())
    assert [str(w.message) for w in caught] == []


def test_sync_runtime_not_started_raises() -> None:
    rt = perdure.SyncRuntime("memory://", workflows=[sync_wf])
    with pytest.raises(ConfigurationError, match="not started"):
        rt.run(sync_wf, 1)


# -- hooks ----------------------------------------------------------------------------


async def test_hooks_see_live_steps_only(backend: Backend, gate: Gate) -> None:
    before: list[tuple[str, int]] = []
    after: list[str] = []
    outputs: list[str] = []
    hooks = Hooks(
        before_step=lambda info: before.append((info.name, info.attempt)),
        after_step=lambda info: after.append(info.name),
        after_output=outputs.append,
    )

    @perdure.workflow(name="hooked")
    async def wf(ctx: perdure.Context) -> None:
        await ctx.run("a", lambda: 1)
        await ctx.run("gate", gate.wait)

    async with backend.runtime([wf], hooks=hooks) as rt:
        handle = await rt.client.start(wf)
        await gate.until_reached(handle)
    assert before == [("a", 1), ("gate", 1)]
    assert after == ["a"]
    gate.open()
    async with backend.runtime([wf], hooks=hooks) as rt:
        await attach(rt, handle).result()
    assert before == [("a", 1), ("gate", 1), ("gate", 1)]
    assert after == ["a", "gate"]
    assert outputs == [handle.id]


async def test_a_raising_hook_is_logged_and_ignored(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from perdure.testing import Hooks

    def boom(_: object) -> None:
        raise RuntimeError("metrics backend down")

    @perdure.workflow(name="hooked")
    async def wf(ctx: perdure.Context, x: int) -> int:
        return await ctx.run("double", lambda: x * 2)

    hooks = Hooks(before_step=boom, after_step=boom, after_output=boom, before_batch_commit=boom)
    async with perdure.Runtime(store_url, workflows=[wf], clock=FakeClock(), hooks=hooks) as rt:
        handle = await rt.client.start(wf, 21)
        assert await handle.result() == 42
        assert await handle.status() is Status.COMPLETED
    assert "metrics backend down" in caplog.text
