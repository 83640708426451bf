"""Scheduled workflows (cron) and delayed messages to actors, over every
store, under a fake clock that moves only when the test says so."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import perdure
from conftest import Backend
from perdure import Status
from perdure.testing import FakeClock
from test_primitives import until

HOUR = 3600.0
# 2023-11-14 22:00:00 UTC: a whole hour, so "0 * * * *" fires every HOUR from here.
START = 1_700_000_000.0 - 1_700_000_000.0 % HOUR

RUNS: list[tuple[str, float]] = []


@perdure.workflow
async def hourly_report(ctx: perdure.Context, label: str) -> str:
    RUNS.append((label, ctx.now().timestamp()))
    return label


def report_runs(label: str) -> list[float]:
    return [t for name, t in RUNS if name == label]


async def completed(rt: perdure.Runtime, target: str) -> int:
    return len([r for r in await rt.client.list(workflow=target, limit=None) if r.status.finished])


async def test_a_cron_schedule_fires_once_per_time_and_survives_restarts(backend: Backend) -> None:
    label = f"hourly-{backend.kind}"
    schedule = perdure.Schedule("0 * * * *", hourly_report, label, name=label)
    clock = FakeClock(START + 60, autojump=False)
    async with backend.runtime([], clock=clock, schedules=[schedule]) as rt:
        await asyncio.sleep(0.05)
        assert report_runs(label) == []  # the first fire time is an hour away
        clock.advance(HOUR)

        async def fired_once() -> bool:
            return await completed(rt, "hourly_report") == 1

        await until(fired_once, "the first fire")
    # Restarted twice within the same hour: the chain is not duplicated.
    for _ in range(2):
        async with backend.runtime([], clock=clock, schedules=[schedule]) as rt:
            await asyncio.sleep(0.02)
    assert len(report_runs(label)) == 1
    # Down for three fire times: the missed time fires once, then it goes on.
    clock.advance(3 * HOUR)
    async with backend.runtime([], clock=clock, schedules=[schedule]) as rt:

        async def fired_twice() -> bool:
            return await completed(rt, "hourly_report") == 2

        await until(fired_twice, "the missed fire")
        await asyncio.sleep(0.05)
        assert await completed(rt, "hourly_report") == 2
        clock.advance(HOUR)

        async def fired_thrice() -> bool:
            return await completed(rt, "hourly_report") == 3

        await until(fired_thrice, "the next fire")
        keys = sorted(
            r.idempotency_key or ""
            for r in await rt.client.list(workflow="hourly_report", limit=None)
        )
        assert len(set(keys)) == 3
        assert all(k.startswith(f"cron:{label}:") for k in keys)


def test_a_bad_cron_expression_is_refused_with_what_to_write() -> None:
    with pytest.raises(perdure.ConfigurationError, match="not a valid cron expression"):
        perdure.Schedule("every hour", hourly_report)


def test_two_schedules_with_one_name_are_refused() -> None:
    a = perdure.Schedule("0 * * * *", hourly_report, "a")
    b = perdure.Schedule("30 * * * *", hourly_report, "b")
    with pytest.raises(perdure.ConfigurationError, match="two schedules"):
        perdure.Runtime("memory://", schedules=[a, b])


@dataclass
class Inbox:
    messages: list[str]


class Mailbox(perdure.Actor[Inbox]):
    durability = perdure.DurabilityFacet(checkpoint_every=1)

    def initial_state(self) -> Inbox:
        return Inbox(messages=[])

    async def receive(self, ctx: perdure.Context, text: str) -> int:
        self.state.messages.append(text)
        return len(self.state.messages)


@perdure.workflow
async def remind(ctx: perdure.Context, who: str) -> str:
    await ctx.actor(Mailbox, who).tell(Mailbox.receive, "reminder", delay=timedelta(days=1))
    return "scheduled"


async def test_a_delayed_tell_is_delivered_once_after_its_delay_across_a_restart(
    backend: Backend,
) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([remind], actors=[Mailbox], clock=clock) as rt:
        box = rt.client.actor(Mailbox, "ann")
        handle = await box.tell(Mailbox.receive, "later", delay=timedelta(hours=2))
        assert handle is not None
        assert await rt.client.run(remind, "ann") == "scheduled"
        await asyncio.sleep(0.05)
        assert await box.history() == []
    clock.advance(2 * HOUR + 1)  # the first came due while no process ran
    async with backend.runtime([remind], actors=[Mailbox], clock=clock) as rt:
        box = rt.client.actor(Mailbox, "ann")
        assert await asyncio.wait_for(
            perdure.InvocationHandle(rt, handle.id, handle.target).result(), 10
        )

        async def one_message() -> bool:
            return len(await box.history()) == 1

        await until(one_message, "the first delayed message")
        clock.advance(86400)

        async def two_messages() -> bool:
            history = await box.history()
            return len(history) == 2 and all(m.status is Status.COMPLETED for m in history)

        await until(two_messages, "the second delayed message")
        state: Any = await box.state_at()
        assert state.messages == ["later", "reminder"]


async def test_a_delayed_tell_checks_its_arguments_at_once(backend: Backend) -> None:
    async with backend.runtime([], actors=[Mailbox]) as rt:
        box = rt.client.actor(Mailbox, "bob")
        with pytest.raises(TypeError):
            await box.tell(Mailbox.receive, delay=timedelta(hours=1))
        with pytest.raises(TypeError, match="delay"):
            await box.tell(Mailbox.receive, "x", delay=5)  # type: ignore[arg-type]
