"""perdure.testing: the in-memory runtime, the fake clock, always-replay and
the crash-at-every-point harness, including that each can fail."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest

import perdure
from perdure import testing


class Provider:
    """A fake payment provider; ``dedup`` makes it honour idempotency keys."""

    def __init__(self, *, dedup: bool) -> None:
        self.dedup = dedup
        self.charges: Counter[str] = Counter()
        self.refunds: Counter[str] = Counter()
        self._seen: set[str] = set()

    def reset(self) -> None:
        self.charges.clear()
        self.refunds.clear()
        self._seen.clear()

    def charge(self, payment: str) -> str:
        key = perdure.current_step().key
        if not (self.dedup and key in self._seen):
            self._seen.add(key)
            self.charges[payment] += 1
        return f"tx-{payment}"

    def refund(self, tx: str) -> None:
        key = perdure.current_step().key
        if not (self.dedup and key in self._seen):
            self._seen.add(key)
            self.refunds[tx] += 1

    def effects(self) -> dict[str, dict[str, int]]:
        return {"charges": dict(self.charges), "refunds": dict(self.refunds)}


GOOD = Provider(dedup=True)
BAD = Provider(dedup=False)


@perdure.workflow
async def child_record(ctx: perdure.Context, tx: str) -> str:
    return await ctx.run("record", lambda: f"recorded {tx}")


def make_payment(provider: Provider, name: str) -> perdure.Workflow[..., str]:
    @perdure.workflow(name=name)
    async def payment(ctx: perdure.Context, pid: str) -> str:
        await ctx.run("validate", lambda: None)
        tx = await ctx.run("charge", provider.charge, pid)
        await ctx.sleep(timedelta(days=1))
        recorded = await ctx.call(child_record, tx)
        approval = ctx.start(child_record, "audit")
        which, _ = await ctx.select(approval, ctx.sleep(timedelta(hours=1)))
        return f"{recorded} ({which})"

    return payment


good_payment = make_payment(GOOD, "good_payment")
bad_payment = make_payment(BAD, "bad_payment")


async def test_crash_at_every_point_recovers_a_payment_with_timers_and_children() -> None:
    report = await testing.crash_at_every_point(
        good_payment, "p1", workflows=[child_record], effects=GOOD.effects, reset=GOOD.reset
    )
    report.check()
    assert report.result == ("ok", "recorded tx-p1 (0)")
    assert report.effects == {"charges": {"p1": 1}, "refunds": {}}
    assert report.commits >= 8  # every durable point was a crash point
    assert len(report.points) == report.commits


async def test_crash_at_every_point_catches_a_step_that_is_not_idempotent() -> None:
    report = await testing.crash_at_every_point(
        bad_payment, "p2", workflows=[child_record], effects=BAD.effects, reset=BAD.reset
    )
    assert not report.ok
    # The crash that loses the charge's commit, after the provider charged.
    assert any(p.effects["charges"] == {"p2": 2} for p in report.failures)
    with pytest.raises(AssertionError, match="did not recover"):
        report.check()


@perdure.workflow
async def saga_flow(ctx: perdure.Context, pid: str) -> str:
    async with ctx.saga() as saga:
        tx = await ctx.run("charge", GOOD.charge, pid)
        saga.on_failure("refund", GOOD.refund, tx)
        await ctx.run("record", _reject, tx)
    return tx


def _reject(tx: str) -> None:
    raise perdure.TerminalError(f"ledger rejected {tx}")


async def test_a_saga_recovers_at_every_point_and_refunds_once() -> None:
    report = await testing.crash_at_every_point(
        saga_flow, "p3", effects=GOOD.effects, reset=GOOD.reset
    )
    report.check()
    assert report.result[0] == "error"
    assert report.effects == {"charges": {"p3": 1}, "refunds": {"tx-p3": 1}}


async def test_the_testing_runtime_skips_time() -> None:
    @perdure.workflow(name="weekly")
    async def weekly(ctx: perdure.Context) -> str:
        await ctx.sleep(timedelta(weeks=1))
        return "a week later"

    async with testing.runtime(workflows=[weekly]) as rt:
        assert await asyncio.wait_for(rt.client.run(weekly), 5) == "a week later"


async def test_the_fake_clock_without_autojump_waits_for_advance() -> None:
    clock = testing.FakeClock(autojump=False)
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(10)
        woke.append(clock.now())

    task = asyncio.ensure_future(sleeper())
    await asyncio.sleep(0)
    clock.advance(9)
    await asyncio.sleep(0)
    assert woke == []
    clock.advance(1)
    await task
    assert woke == [clock.now()]
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1)


async def test_a_fake_sleep_counts_from_the_call_not_from_when_it_is_first_awaited() -> None:
    clock = testing.FakeClock(autojump=False)
    late = asyncio.ensure_future(clock.sleep(5))  # the task has not run yet
    clock.advance(5)
    await asyncio.sleep(0)
    assert late.done()
    early = asyncio.ensure_future(clock.sleep(5))
    clock.advance(4.9)
    await asyncio.sleep(0)
    assert not early.done()
    clock.advance(0.1)
    await asyncio.sleep(0)
    assert early.done()
