"""Durable timers, promises, signals, queries, children, cancellation, timeouts
and sagas, over every store, under the fake clock, across restarts (a new
runtime on the same data)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import perdure
from conftest import Backend, attach
from perdure import Status
from perdure.storage import EntryKind
from perdure.testing import FakeClock

WEEK = timedelta(days=7)


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 10.0) -> None:
    """Wait (in small real steps) until ``check()`` holds: progress happens on
    the event loop, not on the fake clock."""
    try:
        async with asyncio.timeout(seconds):
            while not await check():
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _all_suspended(rt: perdure.Runtime) -> bool:
    records = await rt.client.list(limit=None)
    return len(records) == 2 and all(r.status is Status.SUSPENDED for r in records)


async def status_is(handle: perdure.InvocationHandle[Any], status: Status) -> None:
    async def check() -> bool:
        try:
            return await handle.status() is status
        except perdure.NotFoundError:  # a child not created yet
            return False

    await until(check, f"{handle} to become {status}")


def kinds(journal: list[Any]) -> list[str]:
    return [e.kind.value for e in journal]


# -- timers -----------------------------------------------------------------------------


@perdure.workflow
async def sleeper(ctx: perdure.Context, days: int) -> float:
    before = ctx.now()
    await ctx.sleep(timedelta(days=days))
    after = await ctx.run("after", lambda: 1)
    assert after == 1
    return (ctx.now() - before).total_seconds()


async def test_a_week_long_sleep_finishes_at_once_under_the_fake_clock(backend: Backend) -> None:
    clock = FakeClock()
    async with backend.runtime([sleeper], clock=clock) as rt:
        slept = await asyncio.wait_for(rt.client.run(sleeper, 7), 10)
        assert slept >= WEEK.total_seconds()
        handle = (await rt.client.list())[0]
        journal = await rt.client.journal(handle.id)
        assert kinds(journal) == ["input", "timer", "complete", "step", "output"]
        assert rt.stats.invocations_parked == 1  # the week was spent as a row
        assert rt.stats.invocations_resumed == 1


async def test_a_parked_sleep_holds_no_task_and_wakes_after_a_restart(backend: Backend) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([sleeper], clock=clock) as rt:
        handle = await rt.client.start(sleeper, 1)
        await status_is(handle, Status.SUSPENDED)

        async def task_ended() -> bool:  # the row says suspended a moment before
            return rt.running(handle.id) is None

        await until(task_ended, "the parked run's task to end")
        assert rt.stats.invocations_parked == 1
    clock.advance(2 * 86400)  # the timer came due while no process ran
    async with backend.runtime([sleeper], clock=clock) as rt:
        assert await asyncio.wait_for(attach(rt, handle).result(), 10) >= 86400
        assert rt.stats.invocations_resumed == 1


async def test_a_sleep_wakes_on_time_not_before(backend: Backend) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([sleeper], clock=clock) as rt:
        handle = await rt.client.start(sleeper, 1)
        await status_is(handle, Status.SUSPENDED)
        clock.advance(86400 - 5)  # 5 s early: still asleep
        await asyncio.sleep(0.05)
        assert await handle.status() is Status.SUSPENDED
        clock.advance(10)
        assert await asyncio.wait_for(handle.result(), 10) >= 86400


@perdure.workflow
async def short_nap(ctx: perdure.Context) -> str:
    await ctx.sleep(0.5)  # within the timer lead: waits in memory
    return "rested"


async def test_a_short_sleep_waits_in_memory_without_parking(backend: Backend) -> None:
    async with backend.runtime([short_nap]) as rt:
        assert await rt.client.run(short_nap) == "rested"
        assert rt.stats.invocations_parked == 0


@perdure.workflow
async def alarm(ctx: perdure.Context, when: float) -> float:
    await ctx.sleep_until(datetime.fromtimestamp(when, UTC))
    return ctx.now().timestamp()


async def test_sleep_until_a_datetime(backend: Backend) -> None:
    clock = FakeClock()
    async with backend.runtime([alarm], clock=clock) as rt:
        target = clock.now() + 3600
        assert await rt.client.run(alarm, target) >= target


@pytest.mark.parametrize("bad", [-1, "soon", None, float("nan")])
async def test_bad_sleep_durations_are_refused_at_the_call(backend: Backend, bad: Any) -> None:
    @perdure.workflow(name="bad_sleep")
    async def bad_sleep(ctx: perdure.Context) -> None:
        await ctx.sleep(bad)

    async with backend.runtime([bad_sleep]) as rt:
        with pytest.raises(perdure.InvocationFailedError) as info:
            await rt.client.run(bad_sleep)
        assert isinstance(info.value.cause, TypeError | ValueError)
        assert "delay" in str(info.value.cause)


# -- promises -----------------------------------------------------------------------------


@perdure.workflow
async def approval(ctx: perdure.Context, order: str) -> str:
    p = ctx.promise("approval", type=str)
    await ctx.publish("promise", p.id)
    decision = await p
    return f"{order}: {decision}"


async def promise_id(handle: perdure.InvocationHandle[Any]) -> str:
    async def published() -> bool:
        try:
            await handle.query("promise")
        except perdure.NotFoundError:
            return False
        return True

    await until(published, "the promise id to be published")
    found: str = await handle.query("promise", type=str)
    return found


async def test_a_promise_resolved_from_outside_resumes_the_workflow(backend: Backend) -> None:
    async with backend.runtime([approval]) as rt:
        handle = await rt.client.start(approval, "o-1")
        pid = await promise_id(handle)
        assert pid == f"{handle.id}:1"
        await status_is(handle, Status.SUSPENDED)
        await rt.client.resolve_promise(pid, "approved")
        assert await asyncio.wait_for(handle.result(), 10) == "o-1: approved"


async def test_a_promise_resolved_while_no_process_runs_is_delivered_after_restart(
    backend: Backend,
) -> None:
    async with backend.runtime([approval]) as rt:
        handle = await rt.client.start(approval, "o-2")
        pid = await promise_id(handle)
        await status_is(handle, Status.SUSPENDED)
    # A process that runs no workflows (an admin tool, an HTTP front end).
    async with backend.runtime([], recover=False) as admin:
        await admin.client.resolve_promise(pid, "approved later")
    async with backend.runtime([approval]) as rt:
        assert await asyncio.wait_for(attach(rt, handle).result(), 10) == "o-2: approved later"


async def test_a_rejected_promise_raises_in_the_workflow(backend: Backend) -> None:
    async with backend.runtime([approval]) as rt:
        handle = await rt.client.start(approval, "o-3")
        pid = await promise_id(handle)
        await rt.client.reject_promise(pid, "card expired")
        with pytest.raises(perdure.InvocationFailedError) as info:
            await asyncio.wait_for(handle.result(), 10)
        assert isinstance(info.value.cause, perdure.TerminalError)
        assert str(info.value.cause) == "card expired"


async def test_resolving_an_unknown_or_settled_promise_is_a_clear_error(backend: Backend) -> None:
    async with backend.runtime([approval]) as rt:
        with pytest.raises(perdure.NotFoundError, match="promise nope does not exist"):
            await rt.client.resolve_promise("nope", 1)
        handle = await rt.client.start(approval, "o-4")
        pid = await promise_id(handle)
        await rt.client.resolve_promise(pid, "yes")
        with pytest.raises(perdure.ConflictError, match="already resolved"):
            await rt.client.resolve_promise(pid, "no")
        with pytest.raises(perdure.ConflictError, match="already resolved"):
            await rt.client.reject_promise(pid, "no")
        assert await asyncio.wait_for(handle.result(), 10) == "o-4: yes"
        with pytest.raises(perdure.SerializationError):
            await rt.client.resolve_promise(pid, object())


# -- signals and queries -----------------------------------------------------------------


@perdure.workflow
async def collector(ctx: perdure.Context, wanted: int) -> list[int]:
    got: list[int] = []
    while len(got) < wanted:
        value = await ctx.signal("add", type=int)
        got.append(value)
        await ctx.publish("total", sum(got))
    return got


async def test_signals_arrive_in_order_and_early_ones_are_kept(backend: Backend) -> None:
    async with backend.runtime([collector]) as rt:
        handle = await rt.client.start(collector, 3)
        await handle.signal("add", 1)
        await handle.signal("add", 2)  # sent before the workflow waits for it
        await handle.signal("other", 99)  # another name: not taken

        async def total_is_3() -> bool:
            try:
                return await handle.query("total", type=int) == 3
            except perdure.NotFoundError:
                return False

        await until(total_is_3, "two signals handled")
        await handle.signal("add", 3)
        assert await asyncio.wait_for(handle.result(), 10) == [1, 2, 3]
        assert await handle.query("total") == 6


async def test_signals_survive_a_restart(backend: Backend) -> None:
    async with backend.runtime([collector]) as rt:
        handle = await rt.client.start(collector, 2)
        await handle.signal("add", 5)

        async def took_the_first() -> bool:
            try:
                total = await handle.query("total", type=int)
            except perdure.NotFoundError:
                return False
            return total == 5 and await handle.status() is Status.SUSPENDED

        await until(took_the_first, "the first signal taken, waiting for the second")
    async with backend.runtime([], recover=False) as admin:
        await attach(admin, handle).signal("add", 7)
    async with backend.runtime([collector]) as rt:
        assert await asyncio.wait_for(attach(rt, handle).result(), 10) == [5, 7]


async def test_signalling_a_finished_or_unknown_invocation_is_refused(backend: Backend) -> None:
    async with backend.runtime([collector]) as rt:
        handle = await rt.client.start(collector, 1)
        await handle.signal("add", 1)
        assert await asyncio.wait_for(handle.result(), 10) == [1]
        with pytest.raises(perdure.ConflictError, match="already completed"):
            await handle.signal("add", 2)
        ghost = perdure.InvocationHandle(rt, "no-such-id", "collector")
        with pytest.raises(perdure.NotFoundError):
            await ghost.signal("add", 1)
        with pytest.raises(perdure.NotFoundError, match="published nothing"):
            await handle.query("nothing")


# -- children, gather and select ---------------------------------------------------------


@perdure.workflow
async def square(ctx: perdure.Context, n: int) -> int:
    return await ctx.run("square", lambda: n * n)


@perdure.workflow
async def broken(ctx: perdure.Context) -> int:
    raise perdure.TerminalError("child broke")


@perdure.workflow
async def fan_out(ctx: perdure.Context, n: int) -> int:
    children = [ctx.start(square, i) for i in range(n)]
    values = await ctx.gather(*children)
    return sum(values)


async def test_gather_children(backend: Backend) -> None:
    async with backend.runtime([fan_out, square]) as rt:
        assert await rt.client.run(fan_out, 50) == sum(i * i for i in range(50))
        parent = next(r for r in await rt.client.list(limit=None) if r.target == "fan_out")
        children = await rt.store.list_children(parent.id)
        assert len(children) == 50
        assert {c.id for c in children} == {f"{parent.id}:{i}" for i in range(1, 51)}
        assert all(c.status is Status.COMPLETED for c in children)


@perdure.workflow
async def caller(ctx: perdure.Context) -> str:
    value = await ctx.call(square, 7)
    try:
        await ctx.call(broken)
    except perdure.InvocationFailedError as exc:
        return f"{value} then {exc.cause}"
    return "unreachable"


async def test_call_returns_the_result_and_a_failed_child_raises(backend: Backend) -> None:
    async with backend.runtime([caller, square, broken]) as rt:
        assert await rt.client.run(caller) == "49 then child broke"


@perdure.workflow
async def slow_child(ctx: perdure.Context) -> str:
    await ctx.sleep(timedelta(hours=2))
    return "slow"


@perdure.workflow
async def race(ctx: perdure.Context) -> str:
    child = ctx.start(slow_child)
    which, value = await ctx.select(child, ctx.sleep(timedelta(hours=1)))
    if which == 1:
        await ctx.run("timed out", lambda: None)
        return "timeout"
    return str(value)


async def test_select_races_a_child_against_a_timer_and_replays_the_same_branch(
    backend: Backend,
) -> None:
    # Time moves only once both have parked: an autojumping clock could jump
    # to the child's wake-up before the parent (on a slower store) parked.
    clock = FakeClock(autojump=False)
    async with backend.runtime([race, slow_child], clock=clock) as rt:
        handle = await rt.client.start(race)
        await status_is(handle, Status.SUSPENDED)
        await until(lambda: _all_suspended(rt), "the child to park")
        clock.advance(3600)
        assert await asyncio.wait_for(handle.result(), 10) == "timeout"
        journal = await rt.client.journal(handle.id)
    # Replayed from the top (a fork of the whole journal): the same branch.
    async with backend.runtime([race, slow_child], clock=clock) as rt:
        forked = await rt.client.fork(handle.id)
        assert forked.status == "completed", forked
        assert forked.value == "timeout"
    assert [e.name for e in journal if e.kind is EntryKind.COMPLETE] == ["2"]  # the timer


async def test_a_parent_parks_while_its_child_sleeps_and_wakes_when_it_finishes(
    backend: Backend,
) -> None:
    @perdure.workflow(name="patient")
    async def patient(ctx: perdure.Context) -> str:
        return await ctx.call(slow_child)

    clock = FakeClock(autojump=False)
    async with backend.runtime([patient, slow_child], clock=clock) as rt:
        handle = await rt.client.start(patient)
        await status_is(handle, Status.SUSPENDED)
        child = perdure.InvocationHandle(rt, f"{handle.id}:1", "slow_child")
        await status_is(child, Status.SUSPENDED)
    clock.advance(3 * 3600)
    async with backend.runtime([patient, slow_child], clock=clock) as rt:
        assert await asyncio.wait_for(attach(rt, handle).result(), 10) == "slow"


# -- cancellation and timeouts -------------------------------------------------------------


class Effects:
    def __init__(self) -> None:
        self.log: list[str] = []

    def add(self, what: str) -> str:
        self.log.append(what)
        return what


EFFECTS = Effects()


@perdure.workflow
async def cancellable(ctx: perdure.Context, tag: str) -> str:
    try:
        await ctx.run("work", EFFECTS.add, f"{tag}:work")
        await ctx.sleep(WEEK)
        return "finished"
    finally:
        await ctx.run("cleanup", EFFECTS.add, f"{tag}:cleanup")


async def test_cancel_a_parked_workflow_runs_its_finally_block(backend: Backend) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([cancellable], clock=clock) as rt:
        tag = f"c1-{backend.kind}"
        handle = await rt.client.start(cancellable, tag)
        await status_is(handle, Status.SUSPENDED)
        await handle.cancel("customer asked")
        with pytest.raises(perdure.InvocationCancelledError, match="customer asked"):
            await asyncio.wait_for(handle.result(), 10)
        assert await handle.status() is Status.CANCELLED
        assert EFFECTS.log.count(f"{tag}:cleanup") == 1
        journal = await rt.client.journal(handle.id)
        assert kinds(journal) == [
            "input",
            "step",
            "timer",
            "cancel",
            "step",
            "output",
        ]
        # Cancelling a finished invocation is refused; its journal is intact.
        with pytest.raises(perdure.ConflictError, match="already cancelled"):
            await handle.cancel()
        assert len(await rt.client.journal(handle.id)) == len(journal)
    # From the store, after a restart, the outcome is the same.
    async with backend.runtime([cancellable], clock=clock) as rt:
        with pytest.raises(perdure.InvocationCancelledError):
            await attach(rt, handle).result()


async def test_cancelling_twice_delivers_one_cancellation(backend: Backend) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([cancellable], clock=clock) as rt:
        handle = await rt.client.start(cancellable, "c2")
        await status_is(handle, Status.SUSPENDED)
        await asyncio.gather(handle.cancel("first"), handle.cancel("second"))
        with pytest.raises(perdure.InvocationCancelledError, match="first"):
            await asyncio.wait_for(handle.result(), 10)
        journal = await rt.client.journal(handle.id)
        assert kinds(journal).count("cancel") == 1
        with pytest.raises(perdure.NotFoundError):
            await rt.client.cancel("no-such-invocation")


@perdure.workflow
async def parent_of_sleepers(ctx: perdure.Context) -> list[str]:
    return await ctx.gather(ctx.start(slow_child), ctx.start(slow_child))


async def test_cancelling_a_parent_cancels_its_children(backend: Backend) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([parent_of_sleepers, slow_child], clock=clock) as rt:
        handle = await rt.client.start(parent_of_sleepers)
        children = [perdure.InvocationHandle(rt, f"{handle.id}:{i}", "slow_child") for i in (1, 2)]
        for child in children:
            await status_is(child, Status.SUSPENDED)
        await status_is(handle, Status.SUSPENDED)
        await handle.cancel()
        with pytest.raises(perdure.InvocationCancelledError):
            await asyncio.wait_for(handle.result(), 10)
        for child in children:
            with pytest.raises(perdure.InvocationCancelledError, match="with its parent"):
                await asyncio.wait_for(child.result(), 10)


async def test_a_timeout_cancels_the_invocation_and_its_deadline_reaches_children(
    backend: Backend,
) -> None:
    clock = FakeClock()
    async with backend.runtime([parent_of_sleepers, slow_child], clock=clock) as rt:
        handle = await rt.client.start(parent_of_sleepers, timeout=timedelta(minutes=30))
        with pytest.raises(perdure.InvocationCancelledError, match="timed out"):
            await asyncio.wait_for(handle.result(), 10)
        children = await rt.store.list_children(handle.id)
        assert len(children) == 2
        for child in children:
            assert child.deadline is not None
            assert child.deadline <= clock.now()
            with pytest.raises(perdure.InvocationCancelledError):
                await asyncio.wait_for(
                    perdure.InvocationHandle(rt, child.id, child.target).result(), 10
                )


async def test_cancel_while_running_is_delivered_at_the_next_durable_point(
    backend: Backend, gate: Any
) -> None:
    @perdure.workflow(name="gated")
    async def gated(ctx: perdure.Context) -> str:
        await ctx.run("gate", gate.wait)
        await ctx.run("after", EFFECTS.add, "gated:after")
        return "done"

    async with backend.runtime([gated]) as rt:
        handle = await rt.client.start(gated)
        await gate.until_reached(handle)
        await handle.cancel()
        gate.open()
        gate._never.set()
        with pytest.raises(perdure.InvocationCancelledError):
            await asyncio.wait_for(handle.result(), 10)
        assert "gated:after" not in EFFECTS.log
        journal = await rt.client.journal(handle.id)
        assert kinds(journal) == ["input", "step", "cancel", "output"]


async def test_a_step_timeout_fails_the_attempt_and_is_retried(backend: Backend) -> None:
    calls: list[int] = []

    async def slow_then_fast() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(10)
        return "fast"

    @perdure.workflow(name="timed_step")
    async def timed_step(ctx: perdure.Context) -> str:
        return await ctx.run(
            "call",
            slow_then_fast,
            timeout=timedelta(milliseconds=20),
            retry=perdure.RetryPolicy(max_attempts=3),
        )

    async with backend.runtime([timed_step]) as rt:
        assert await asyncio.wait_for(rt.client.run(timed_step), 10) == "fast"
        assert len(calls) == 2


# -- sagas -----------------------------------------------------------------------------------


class Bank:
    def __init__(self) -> None:
        self.charged: list[str] = []
        self.refunded: list[str] = []

    def charge(self, order: str) -> str:
        self.charged.append(order)
        return f"tx-{order}"

    def refund(self, tx: str) -> None:
        self.refunded.append(tx)

    def record(self, tx: str) -> None:
        raise perdure.TerminalError(f"ledger rejected {tx}")


BANK = Bank()


@perdure.workflow
async def saga_payment(ctx: perdure.Context, order: str) -> str:
    async with ctx.saga() as saga:
        tx = await ctx.run("charge", BANK.charge, order)
        saga.on_failure("refund", BANK.refund, tx)
        await ctx.run("record", BANK.record, tx)
    return tx


async def test_a_saga_refunds_the_charge_when_recording_fails(backend: Backend) -> None:
    async with backend.runtime([saga_payment]) as rt:
        order = f"s1-{backend.kind}"
        handle = await rt.client.start(saga_payment, order)
        with pytest.raises(perdure.InvocationFailedError, match=f"ledger rejected tx-{order}"):
            await handle.result()
        assert BANK.refunded.count(f"tx-{order}") == 1
        names = [e.name for e in await rt.client.journal(handle.id) if e.kind is EntryKind.STEP]
        assert names == ["charge", "record", "compensate refund"]


# -- always-replay ------------------------------------------------------------------------------


async def test_always_replay_restarts_after_every_durable_point(backend: Backend) -> None:
    clock = FakeClock()
    async with backend.runtime(
        [caller, square, broken, sleeper], clock=clock, always_replay=True
    ) as rt:
        assert await asyncio.wait_for(rt.client.run(caller), 20) == "49 then child broke"
        assert await asyncio.wait_for(rt.client.run(sleeper, 1), 20) >= 86400
        assert rt.stats.invocations_resumed > 5


async def test_always_replay_catches_code_that_is_not_deterministic(backend: Backend) -> None:
    import random

    @perdure.workflow(name="flaky_names")
    async def flaky_names(ctx: perdure.Context) -> None:
        await ctx.run(f"step-{random.random()}", lambda: 1)
        await ctx.run("second", lambda: 2)

    async with backend.runtime([flaky_names], always_replay=True) as rt:
        with pytest.raises(perdure.InvocationStoppedError) as info:
            await asyncio.wait_for(rt.client.run(flaky_names), 10)
        assert isinstance(info.value.reason, perdure.NonDeterminismError)


# -- actors -------------------------------------------------------------------------------


@dataclass
class Tally:
    count: int = 0


class Snoozer(perdure.Actor[Tally]):
    durability = perdure.DurabilityFacet(checkpoint_every=1)

    async def snooze(self, ctx: perdure.Context, hours: int) -> int:
        await ctx.sleep(timedelta(hours=hours))  # holds the mailbox: waits in memory
        self.state.count += 1
        return self.state.count


async def test_an_actor_handler_sleeps_durably_in_memory(backend: Backend) -> None:
    clock = FakeClock()
    async with backend.runtime([], actors=[Snoozer], clock=clock) as rt:
        ref = rt.client.actor(Snoozer, "s")
        assert await asyncio.wait_for(ref.ask(Snoozer.snooze, 5), 10) == 1
        assert await asyncio.wait_for(ref.ask(Snoozer.snooze, 1), 10) == 2
        assert rt.stats.invocations_parked == 0
        history = await ref.history()
        journal = await rt.client.journal(history[0].id)
        assert kinds(journal) == ["input", "timer", "complete", "output"]


async def test_a_cancelled_actor_message_does_not_stop_the_actor(backend: Backend) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([], actors=[Snoozer], clock=clock) as rt:
        ref = rt.client.actor(Snoozer, "t")
        first = await ref.tell(Snoozer.snooze, 100)
        assert first is not None
        await status_is(first, Status.RUNNING)
        await first.cancel("not needed")
        with pytest.raises(perdure.InvocationCancelledError):
            await asyncio.wait_for(first.result(), 10)
        second = asyncio.ensure_future(ref.ask(Snoozer.snooze, 0))
        assert await asyncio.wait_for(second, 10) == 1  # the cancelled one changed nothing


async def test_a_promise_value_of_the_wrong_type_is_refused_and_nothing_is_recorded(
    backend: Backend,
) -> None:
    async with backend.runtime([approval]) as rt:
        handle = await rt.client.start(approval, "o-5")
        pid = await promise_id(handle)
        with pytest.raises(perdure.SerializationError, match="expects a str"):
            await rt.client.resolve_promise(pid, None)
        with pytest.raises(perdure.SerializationError, match="expects a str"):
            await rt.client.resolve_promise(pid, {"not": "a string"})
        promise = await rt.store.get_promise(pid)
        assert promise is not None
        assert promise.state == "pending"
        await rt.client.resolve_promise(pid, "fine")  # a correct value still settles it
        assert await asyncio.wait_for(handle.result(), 10) == "o-5: fine"
