"""The timer service: resumes suspended invocations when they are due.

A suspended invocation is a row with a ``wake_at`` time (a timer, a
deadline) or none (it waits for a promise, a signal, a child). Whatever
wakes it (a resolved promise, a signal, a finished child, a cancellation)
sets ``wake_at`` to now in the same transaction. This loop asks the store
for the rows due within ``timer_lead`` and resumes them by replay; the lead
lets an invocation replay up to its sleep before the sleep is due, so it
wakes on time even when thousands come due at once.

It keeps only the soonest known wake-up time in memory, so a million
sleeping invocations cost a million rows and nothing else.

It also brings back what stopped on a storage error (the disk was full,
the database went away): once the store answers again, those invocations
and actors go on from their journals, after 1 s, then 2, 4, ... up to 30 s
while the errors go on.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

from ._errors import PerdureError

if TYPE_CHECKING:
    from ._runtime import Runtime

log = logging.getLogger("perdure.timers")

_BATCH = 1000
_RETRY_SECONDS = 1.0  # after a storage error
_MAX_RETRY_SECONDS = 30.0


class TimerService:
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._kick = asyncio.Event()
        self._next: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # When to relaunch what stopped on storage errors, and how many
        # relaunches in a row found something to relaunch (the backoff).
        self._retry_at: float | None = None
        self._retries = 0
        self._last_retry = -math.inf

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="perdure:timers")

    async def stop(self) -> None:
        if self._task is not None:
            # The flag and the kick end the loop even if a driver swallowed
            # the cancellation (psycopg's pool can, while it hands out a
            # connection).
            self._stopping = True
            self._kick.set()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def schedule(self, at: float | None) -> None:
        """An invocation was suspended until ``at`` (None: until woken);
        look again if that is sooner than what the loop waits for."""
        if at is not None and (self._next is None or at < self._next):
            self._next = at
            self._kick.set()

    def kick(self) -> None:
        """Something may have become due now: look at once."""
        self._kick.set()

    def retry_later(self) -> None:
        """Something stopped on a storage error: relaunch it once the store answers."""
        if self._retry_at is None:
            now = self._rt.clock.now()
            if now - self._last_retry > 2 * _MAX_RETRY_SECONDS:
                self._retries = 0  # a new outage, not the same one going on
            delay = min(_RETRY_SECONDS * 2**self._retries, _MAX_RETRY_SECONDS)
            self._retry_at = now + delay
            self._kick.set()

    async def _retry_stopped(self) -> None:
        if self._retry_at is None or self._rt.clock.now() < self._retry_at:
            return
        self._retry_at = None
        self._last_retry = self._rt.clock.now()
        try:
            relaunched = await self._rt.retry_stopped()
        except PerdureError as exc:
            log.error("timer service: relaunching what stopped on a storage error: %s", exc)
            self._retries += 1
            self.retry_later()  # the store failed again: try again later
            return
        self._retries = self._retries + 1 if relaunched else 0

    async def _run(self) -> None:
        rt = self._rt
        clock = rt.clock
        while not self._stopping:
            # Awake and about to read the store: until it has, any schedule()
            # kicks, so that a wake-up committed during the read is not missed.
            self._kick.clear()
            self._next = None
            parts = None if rt.nodes is None else sorted(rt.nodes.owned)
            try:
                due = await rt.store.due_invocations(
                    clock.now() + rt.timer_lead, limit=_BATCH, partitions=parts
                )
                if due:
                    await rt.resume(due)
                    if len(due) == _BATCH:
                        continue
                self._next = await rt.store.next_wake_at(partitions=parts)
                await self._retry_stopped()  # the store answers: go on with what it stopped
            except PerdureError as exc:
                log.error("timer service: %s; retrying in %.0fs", exc, _RETRY_SECONDS)
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            except Exception:
                log.exception("timer service failed; retrying in %.0fs", _RETRY_SECONDS)
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            if self._kick.is_set():
                continue
            waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._kick.wait())]
            if rt.nodes is not None:
                # Other nodes record work and wake-ups for this one: look again soon.
                poll = rt.nodes.config.poll_every.total_seconds()
                self._next = min(self._next or math.inf, clock.now() + rt.timer_lead + poll)
            if self._retry_at is not None:
                self._next = min(self._next or math.inf, self._retry_at + rt.timer_lead)
            if self._next is not None:
                delay = self._next - rt.timer_lead - clock.now()
                if delay <= 0:
                    # Due, but still running here (it is parking): look again soon.
                    await asyncio.sleep(0.001)
                    waits[0].cancel()
                    continue
                waits.append(asyncio.ensure_future(clock.sleep(delay)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
