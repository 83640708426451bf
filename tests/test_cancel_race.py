"""A cancellation that commits while the timer service is resuming the
invocation (after it read the record, before the context exists) is delivered,
not lost: the runtime must not start the invocation from the stale record
alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import perdure
from perdure import Status
from perdure.storage import InvocationRecord, MemoryStore, SQLiteStore, Store
from perdure.testing import FakeClock


class Gate:
    """Holds the next non-empty ``due_invocations`` answer until ``release``."""

    def __init__(self) -> None:
        self.armed = False
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def after_read(self, found: list[InvocationRecord]) -> None:
        if self.armed and found:
            self.armed = False
            self.read.set()
            await self.release.wait()


class GatedMemoryStore(MemoryStore):
    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    async def due_invocations(self, before: float, **kwargs: Any) -> list[InvocationRecord]:
        found = await super().due_invocations(before, **kwargs)
        await self.gate.after_read(found)
        return found


class GatedSQLiteStore(SQLiteStore):
    def __init__(self, path: Path, gate: Gate) -> None:
        super().__init__(path, exclusive=True)
        self.gate = gate

    async def due_invocations(self, before: float, **kwargs: Any) -> list[InvocationRecord]:
        found = await super().due_invocations(before, **kwargs)
        await self.gate.after_read(found)
        return found


@perdure.workflow
async def approval_then_step(ctx: perdure.Context) -> str:
    p = ctx.promise("approval", type=str)
    await ctx.publish("promise", p.id)
    decision = await p
    await ctx.run("after", lambda: None)
    return decision


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_cancel_racing_the_resume_of_a_woken_invocation_is_delivered(
    tmp_path: Path, kind: str
) -> None:
    gate = Gate()
    store: Store = (
        GatedMemoryStore(gate) if kind == "memory" else GatedSQLiteStore(tmp_path / "x.db", gate)
    )
    async with perdure.Runtime(store, workflows=[approval_then_step], clock=FakeClock()) as rt:
        handle = await rt.client.start(approval_then_step)
        async with asyncio.timeout(10):
            while await handle.status() is not Status.SUSPENDED:
                await asyncio.sleep(0.002)
        pid: Any = await handle.query("promise", type=str)
        gate.armed = True
        await rt.client.resolve_promise(pid, "approved")  # wakes it: due now
        await asyncio.wait_for(gate.read.wait(), 10)  # the timer service read its record
        await handle.cancel("changed my mind")  # committed before the resume starts it
        gate.release.set()
        with pytest.raises(perdure.InvocationCancelledError, match="changed my mind"):
            await asyncio.wait_for(handle.result(), 10)
        journal = await rt.client.journal(handle.id)
        assert [e.kind.value for e in journal].count("cancel") == 1
        assert not any(e.name == "after" for e in journal)
