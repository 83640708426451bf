"""What tests need: a fake clock, an in-memory runtime, and harnesses that
crash and replay workflows on purpose.

>>> async with testing.runtime(workflows=[wf]) as rt:      # memory://, FakeClock
...     assert await rt.client.run(wf, 1) == 2

With a :class:`FakeClock`, time is skipped: retry back-offs and durable
sleeps take no real time (a workflow that sleeps a week finishes at once).
``FakeClock(autojump=False)`` moves only when the test calls ``advance``.

``runtime(..., always_replay=True)`` replays every invocation from the top
after each of its durable points, so code that is not deterministic fails at
once with :class:`perdure.NonDeterminismError` instead of after a crash in
production. :func:`crash_at_every_point` runs a workflow once per journal
position, crashing there and recovering, and checks that the result and the
side effects match an uncrashed run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ._hooks import Hooks as Hooks
from ._hooks import StepInfo as StepInfo

__all__ = [
    "CrashPoint",
    "CrashReport",
    "FakeClock",
    "Hooks",
    "SimulatedCrash",
    "StepInfo",
    "crash_at_every_point",
    "runtime",
]


_JUMP_AFTER = 0.0005  # real seconds an autojumping clock lets other work run first


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

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Wait until the clock reaches ``seconds`` from now: from this call,
        not from when the wait is first awaited (a task that starts later
        still wakes on time)."""
        self.slept.append(seconds)
        if seconds <= 0:
            return asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        if self.autojump:
            # Jump a moment later, to the soonest sleep: the others wait their
            # turn, so sleeps end in the order of their times.
            loop.call_later(_JUMP_AFTER, self._jump)
        return future

    def _jump(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # cancelled
        if self._sleepers:
            self.advance(max(0.0, self._sleepers[0][0] - self._now))


def runtime(
    *,
    workflows: Iterable[Any] = (),
    actors: Iterable[Any] = (),
    clock: Any = None,
    always_replay: bool = False,
    store: Any = None,
    **options: Any,
) -> Any:
    """A :class:`perdure.Runtime` on an in-memory store with a :class:`FakeClock`."""
    from ._runtime import Runtime
    from .storage import MemoryStore

    return Runtime(
        store if store is not None else MemoryStore(),
        workflows=workflows,
        actors=actors,
        clock=clock if clock is not None else FakeClock(),
        always_replay=always_replay,
        **options,
    )


class SimulatedCrash(BaseException):
    """The process "dies" here: the write being committed is lost, and so is
    everything after it."""


class _Crasher:
    """Lets ``allowed`` commits through, then fails every later one."""

    def __init__(self, allowed: int | None) -> None:
        self.allowed = allowed
        self.commits = 0
        self.crashed = asyncio.Event()

    def __call__(self, _writes: int) -> None:
        if self.allowed is not None and self.commits >= self.allowed:
            self.crashed.set()
            raise SimulatedCrash(f"crash before commit {self.commits + 1}")
        self.commits += 1


@dataclasses.dataclass(frozen=True)
class CrashPoint:
    """One crashed-and-recovered run: crashed before commit ``commit + 1``."""

    commit: int
    result: Any
    effects: Any
    ok: bool
    problem: str = ""


@dataclasses.dataclass(frozen=True)
class CrashReport:
    """What :func:`crash_at_every_point` found. ``ok`` when every point recovered
    to the uncrashed result and side effects."""

    result: Any
    effects: Any
    commits: int
    points: tuple[CrashPoint, ...]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.points)

    @property
    def failures(self) -> list[CrashPoint]:
        return [p for p in self.points if not p.ok]

    def check(self) -> None:
        """Raise AssertionError naming every point that did not recover."""
        if not self.ok:
            lines = [f"  crash before commit {p.commit + 1}: {p.problem}" for p in self.failures]
            raise AssertionError(
                f"{len(self.failures)} of {len(self.points)} crash points did not recover "
                f"to the uncrashed result {self.result!r} / effects {self.effects!r}:\n"
                + "\n".join(lines)
            )


async def crash_at_every_point(
    workflow: Any,
    /,
    *args: Any,
    workflows: Iterable[Any] = (),
    actors: Iterable[Any] = (),
    effects: Callable[[], Any] | None = None,
    reset: Callable[[], None] | None = None,
    timeout: float = 30.0,
    **kwargs: Any,
) -> CrashReport:
    """Run ``workflow(*args, **kwargs)`` uncrashed, then once per commit it
    made, crashing just before that commit and recovering in a new runtime on
    the same (in-memory) data, as a restarted process would.

    ``effects()`` snapshots the side effects (e.g. charges by idempotency
    key) and ``reset()`` clears them before each run: every recovered run
    must end with the same result and the same effects as the uncrashed one,
    so an external call that ran again after a crash must have been
    deduplicated by its step key. Call :meth:`CrashReport.check` to assert.
    """
    from ._client import InvocationHandle
    from ._errors import InvocationFailedError
    from .storage import MemoryStore

    registered = [workflow, *[w for w in workflows if w is not workflow]]
    actor_types = list(actors)
    key = "crash-at-every-point"

    async def outcome(handle: InvocationHandle[Any]) -> Any:
        try:
            return ("ok", await asyncio.wait_for(handle.result(), timeout))
        except InvocationFailedError as exc:  # its message names the invocation id
            cause = exc.cause if exc.cause is not None else exc
            return ("error", type(exc).__name__, type(cause).__name__, str(cause))
        except Exception as exc:
            return ("error", type(exc).__name__, str(exc))

    async def run(allowed: int | None) -> tuple[Any, Any, int]:
        if reset is not None:
            reset()
        crasher = _Crasher(allowed)
        store = MemoryStore(before_commit=crasher)
        first = runtime(workflows=registered, actors=actor_types, store=store)
        try:
            await first.start()
            try:
                handle = await first.client.start(workflow, *args, idempotency_key=key, **kwargs)
            except SimulatedCrash:
                handle = None
            if handle is not None:
                done = asyncio.ensure_future(outcome(handle))
                crashed = asyncio.ensure_future(crasher.crashed.wait())
                await asyncio.wait({done, crashed}, return_when=asyncio.FIRST_COMPLETED)
                for f in (done, crashed):
                    f.cancel()
                if allowed is None:
                    return await done, None if effects is None else effects(), crasher.commits
        except SimulatedCrash:
            pass
        finally:
            try:
                await first.stop()
            except SimulatedCrash:
                pass
        # The restarted process: same data, no crash, the client retries.
        crasher.allowed = None
        second = runtime(workflows=registered, actors=actor_types, store=store)
        async with second:
            handle = await second.client.start(workflow, *args, idempotency_key=key, **kwargs)
            result = await outcome(handle)
        return result, None if effects is None else effects(), crasher.commits

    expected, expected_effects, commits = await run(None)
    points = []
    for n in range(commits):
        result, seen, _ = await run(n)
        problems = []
        if result != expected:
            problems.append(f"result {result!r}")
        if seen != expected_effects:
            problems.append(f"effects {seen!r}")
        points.append(
            CrashPoint(
                commit=n,
                result=result,
                effects=seen,
                ok=not problems,
                problem=", ".join(problems),
            )
        )
    return CrashReport(
        result=expected, effects=expected_effects, commits=commits, points=tuple(points)
    )
