"""What tests need: a fake clock and the runtime's hook points.

>>> clock = FakeClock()
>>> rt = Runtime("memory://", workflows=[wf], clock=clock)

With a :class:`FakeClock`, retry back-offs take no real time: ``sleep``
moves the fake time forward and returns at once.
"""

from __future__ import annotations

import asyncio

from ._hooks import Hooks as Hooks
from ._hooks import StepInfo as StepInfo

__all__ = ["FakeClock", "Hooks", "StepInfo"]


class FakeClock:
    """A clock that only moves when told to, or when something sleeps.

    ``sleep`` advances the time by the requested amount and yields once, so
    a back-off of an hour finishes at once. ``slept`` records every request.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self.slept: list[float] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
