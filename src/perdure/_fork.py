"""Fork: re-run an invocation from a prefix of its journal, against the
current code, in a sandbox, to debug a change. The original is untouched.

The sandbox is a separate runtime on an in-memory store holding a copy of
the journal prefix. Steps in the prefix are replayed from it. By default the
fork stops before the first step that would run live (so no external call
is made) and says which step that is; with ``live=True`` it goes on and
runs them, in the sandbox.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import msgspec

from ._errors import ForkStoppedError, NotFoundError
from ._hooks import Hooks
from .storage._memory import MemoryStore
from .storage._records import EntryKind, JournalEntry, Status, Write

if TYPE_CHECKING:
    from ._runtime import Runtime


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ForkResult:
    """What a fork did.

    ``status``: "completed", "failed", "stopped" (a dry run reached a live
    step: ``stopped_at`` names it) or "diverged" (the code no longer matches
    the prefix: ``error`` is the NonDeterminismError).
    """

    invocation_id: str
    status: str
    value: Any = None
    error: BaseException | None = None
    stopped_at: tuple[int, str] | None = None
    journal: tuple[JournalEntry, ...] = ()
    replayed: int = 0
    executed: int = 0


async def fork(
    rt: Runtime, invocation_id: str, *, upto: int | None = None, live: bool = False
) -> ForkResult:
    """Re-run ``invocation_id`` with its journal entries before index ``upto``
    (all but the output if None) against the code registered in ``rt``."""
    from ._actor import rebuild
    from ._runtime import Runtime

    rec = await rt.store.get_invocation(invocation_id)
    if rec is None:
        raise NotFoundError(f"invocation {invocation_id} does not exist")
    journal = await rt.store.read_journal(invocation_id)
    prefix = [
        e for e in journal if e.kind is not EntryKind.OUTPUT and (upto is None or e.index < upto)
    ]
    if not prefix or prefix[0].kind is not EntryKind.INPUT:
        raise ValueError(f"fork of {invocation_id}: the prefix must keep the input (upto >= 1)")
    sandbox = Runtime(
        MemoryStore(),
        workflows=list(rt.workflows.values()),
        actors=[d.cls for d in rt._actors.values()],
        default_retry=rt.default_retry,
        max_payload_bytes=rt.codec.max_payload_bytes,
        clock=rt.clock,
        hooks=Hooks(),
        recover=False,
    )
    if not live:
        sandbox._live_guard = ForkStoppedError
    async with sandbox:
        copy = msgspec.structs.replace(rec, idempotency_key=None, status=Status.RUNNING)
        await sandbox.store.create_invocation(copy, prefix[0])
        if len(prefix) > 1:
            await sandbox.store.commit(Write(entries=tuple(prefix[1:])))
        activation: Any = None
        if rec.actor_type is not None and rec.actor_key is not None:
            definition = rt.actor(rec.actor_type)
            handler = definition.handler(rec.target.rpartition(".")[2])
            before = (rec.actor_seq or 1) - 1
            state = await rebuild(rt, definition, rec.actor_key, upto_seq=before)
            activation = _ForkActivation(state.instance)
        else:
            handler = sandbox.workflow(rec.target)
        outcome = await sandbox._launch(copy, handler, prefix, [], None, activation)
        entries = tuple(await sandbox.store.read_journal(rec.id))
        stats = sandbox.stats
    error = outcome.error
    if outcome.status is Status.COMPLETED:
        status = "completed"
    elif outcome.status is Status.FAILED:
        status = "failed"
    elif isinstance(error, ForkStoppedError):
        status = "stopped"
    else:
        status = "diverged"
    return ForkResult(
        invocation_id=invocation_id,
        status=status,
        value=outcome.value,
        error=error,
        stopped_at=(error.index, error.step) if isinstance(error, ForkStoppedError) else None,
        journal=entries,
        replayed=stats.steps_replayed,
        executed=stats.steps_executed,
    )


class _ForkActivation:
    """Just enough of an activation to run one message against a state."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance

    def checkpoint_for(self, seq: int) -> None:
        return None
