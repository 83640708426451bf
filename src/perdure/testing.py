"""What tests need: a fake clock and the runtime's hook points.

>>> clock = FakeClock()
>>> rt = Runtime("memory://", workflows=[wf], clock=clock)

With a :class:`FakeClock`, time is skipped: retry back-offs and durable
sleeps take no real time (a workflow that sleeps a week finishes at once).
``FakeClock(autojump=False)`` moves only when the test calls ``advance``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from ._hooks import Hooks as Hooks
from ._hooks import StepInfo as StepInfo

__all__ = ["FakeClock", "Hooks", "StepInfo"]


class FakeClock:
    """A clock that only moves when told to, or when something sleeps.

    With ``autojump`` (the default), ``sleep`` advances the time by the
    requested amount and yields once, so a back-off of an hour, or a durable
    sleep of a week, finishes at once. Without it, ``sleep`` waits until
    :meth:`advance` moves the time past its end. ``slept`` records every
    request.
    """

    def __init__(self, start: float = 1_700_000_000.0, *, autojump: bool = True) -> None:
        self._now = start
        self.autojump = autojump
        self.slept: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the time forward, waking the sleeps that end by then."""
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.autojump or seconds <= 0:
            self.advance(max(0.0, seconds))
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        await future
