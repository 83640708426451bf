"""Shared fixtures: every backend-agnostic test runs over every store.

``store_url`` is parametrized over ``memory://`` and a SQLite file in the
test's ``tmp_path``. ``backend`` turns it into what a :class:`perdure.Runtime`
takes, so that a test can stop a runtime and start a new one on the same data
(a restart): for SQLite a new runtime opens the same file, for memory it is
handed the same :class:`perdure.storage.MemoryStore` object.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import perdure
from perdure.storage import MemoryStore, Store
from perdure.testing import FakeClock

BACKENDS = ["memory", "sqlite"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path}/x.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Backend:
    """What a test passes to ``Runtime(...)``, again and again across restarts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.kind = "memory" if url.startswith("memory") else "sqlite"
        self._memory = MemoryStore() if self.kind == "memory" else None

    @property
    def path(self) -> str:
        assert self.kind == "sqlite"
        return self.url.removeprefix("sqlite:///")

    def store(self) -> str | Store:
        return self._memory if self._memory is not None else self.url

    def runtime(self, workflows: list[Any], **kwargs: Any) -> perdure.Runtime:
        kwargs.setdefault("clock", FakeClock())
        return perdure.Runtime(self.store(), workflows=workflows, **kwargs)


@pytest.fixture
def backend(store_url: str) -> Backend:
    return Backend(store_url)


class Gate:
    """A step function that blocks forever until ``open()``; ``reached`` tells it got there.

    Stopping the runtime cancels the blocked step, which leaves the invocation
    unfinished with everything before the gate journaled: a crash, in-process.
    """

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.is_open = False
        self.passed = 0
        self.waiting = 0
        self._never = asyncio.Event()

    def open(self) -> None:
        self.is_open = True

    async def wait(self) -> str:
        if not self.is_open:
            self.reached.set()
            self.waiting += 1
            await self._never.wait()
        self.passed += 1
        return "passed"

    async def until_reached(self, handle: perdure.InvocationHandle[Any]) -> None:
        """Wait for the gate; fail at once if the invocation ends before it."""
        reached = asyncio.ensure_future(self.reached.wait())
        result = asyncio.ensure_future(handle.result())
        try:
            async with asyncio.timeout(30):
                done, _ = await asyncio.wait({reached, result}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (reached, result):
                f.cancel()
            await asyncio.gather(reached, result, return_exceptions=True)
        if reached not in done:
            raise AssertionError(f"the invocation ended before reaching the gate: {result!r}")


@pytest.fixture
def gate() -> Gate:
    return Gate()


def attach(
    rt: perdure.Runtime, handle: perdure.InvocationHandle[Any]
) -> perdure.InvocationHandle[Any]:
    """A handle on ``rt`` to an invocation started on an earlier runtime."""
    return perdure.InvocationHandle(rt, handle.id, handle.target)
