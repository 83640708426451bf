"""The records that cross the storage contract.

They are msgspec Structs: several are built per step, and a Struct builds
about five times faster than a frozen dataclass. ``gc=False``: they hold
only immutable values, so the cycle collector need not track them, and at
thousands of steps a second that tracking costs real throughput.
"""

from __future__ import annotations

import enum

import msgspec


class Status(enum.StrEnum):
    """Where an invocation is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    SUSPENDED = "suspended"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
UNFINISHED = (Status.PENDING, Status.RUNNING, Status.SUSPENDED)


class EntryKind(enum.StrEnum):
    """The kind of a journal entry."""

    INPUT = "input"
    STEP = "step"
    OUTPUT = "output"
    # A durable future's creation: a timer (payload: wake-up time), a child
    # invocation (payload: its id), a promise (payload: its id), a wait for a
    # signal (payload: the signal's name).
    TIMER = "timer"
    CALL = "call"
    PROMISE = "promise"
    SIGNAL = "signal"
    # A durable future's outcome as the workflow observed it; ``name`` is the
    # index of the future's creation entry. Recording the order in which
    # outcomes arrived is what makes gather and select replay the same way.
    COMPLETE = "complete"
    # A cancellation (or a deadline) delivered at this durable point.
    CANCEL = "cancel"
    # A value published for read-only queries (name: the query's name).
    PUBLISH = "publish"


class InvocationRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One call of a handler."""

    id: str
    target: str
    input_hash: str
    idempotency_key: str | None
    status: Status
    created_at: float
    updated_at: float
    last_error: str | None = None
    # For a message to a durable actor: the actor and the message's position
    # in that actor's message log (1, 2, 3...), which is the order in which
    # its messages are handled and replayed.
    actor_type: str | None = None
    actor_key: str | None = None
    actor_seq: int | None = None
    # The invocation that started this one as its child: woken when this
    # one finishes.
    parent_id: str | None = None
    # A suspended invocation resumes at this time (None: when woken).
    wake_at: float | None = None
    # Cancelled at this time (a timeout), if it has not finished.
    deadline: float | None = None
    # Set when cancellation was requested; delivered at the next durable point.
    cancel_reason: str | None = None
    # Which partition of the work it belongs to; on several nodes, the node
    # holding the partition's lease runs it. A child is in its parent's.
    partition: int = 0


class JournalEntry(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One numbered entry of an invocation's journal.

    ``ok`` tells whether ``payload`` is a value (True) or an encoded error.
    ``attempts`` counts the executions that led to this entry.
    """

    invocation_id: str
    index: int
    kind: EntryKind
    name: str
    ok: bool
    payload: bytes
    type_tag: str | None
    attempts: int
    created_at: float


class Attempt(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A failed execution of a step that is going to be retried."""

    invocation_id: str
    index: int
    attempt: int
    error: bytes
    created_at: float


class IdempotentResult(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A side effect's result stored under (scope, key) across invocations."""

    scope: str
    key: str
    ok: bool
    payload: bytes
    type_tag: str | None
    invocation_id: str
    created_at: float


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A durable actor's state after the message with log position ``seq``.

    ``checksum`` is the SHA-256 hex digest of ``state``; ``state_version`` is
    the actor class's version of its state schema when it was written.
    """

    actor_type: str
    actor_key: str
    seq: int
    state: bytes
    type_tag: str | None
    checksum: str
    state_version: int
    created_at: float


class StatusChange(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A new status. To SUSPENDED, ``wake_at`` is when to resume (None: when
    woken); a wake-up recorded earlier and still pending is kept if it is
    sooner, so that a wake that raced with the suspension is not lost. Any
    other status clears the pending wake-up."""

    invocation_id: str
    status: Status
    updated_at: float
    last_error: str | None = None
    wake_at: float | None = None


class Wake(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Resume an unfinished invocation at ``at`` (or sooner if already due)."""

    invocation_id: str
    at: float


class PromiseRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A durable promise owned by one invocation, resolved from outside.

    ``state`` is "pending", "resolved" or "rejected"; ``payload`` holds the
    value (resolved) or the encoded error (rejected).
    """

    id: str
    invocation_id: str
    name: str
    state: str
    payload: bytes | None
    type_tag: str | None
    created_at: float
    resolved_at: float | None = None


class Resolution(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Settle a pending promise and wake its owner. Conflicts if it is not
    pending; NotFound if there is no such promise."""

    promise_id: str
    ok: bool
    payload: bytes
    type_tag: str | None
    at: float


class SignalRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A named signal sent to an invocation; ``seq`` orders an invocation's
    signals (the store assigns it: 1, 2, 3...)."""

    invocation_id: str
    name: str
    payload: bytes
    type_tag: str | None
    created_at: float
    seq: int = 0


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Ask an unfinished invocation to cancel, and wake it. A finished one
    conflicts; asking again keeps the first reason."""

    invocation_id: str
    reason: str
    at: float


class Lease(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A node's ownership of a partition until ``expires_at``.

    ``epoch`` grows by one whenever another node takes the partition over;
    every write of an owner carries the epoch it holds (a :class:`Fence`), so
    a node that lost the lease cannot write any more.
    """

    partition: int
    owner: str | None
    epoch: int
    expires_at: float


class Fence(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A write is valid only while ``partition``'s lease still has ``epoch``."""

    partition: int
    epoch: int


class Write(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Everything one commit records, atomically: all of it or none of it."""

    entries: tuple[JournalEntry, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    status: StatusChange | None = None
    idempotent: IdempotentResult | None = None
    checkpoint: Checkpoint | None = None
    # With a checkpoint: keep only this many of the actor's newest checkpoints,
    # and with compact_journal, delete the journals (and failed attempts) of
    # the actor's messages up to the oldest checkpoint kept.
    retain_checkpoints: int | None = None
    compact_journal: bool = False
    wakes: tuple[Wake, ...] = ()
    promises: tuple[PromiseRecord, ...] = ()
    resolution: Resolution | None = None
    signal: SignalRecord | None = None
    cancels: tuple[CancelRequest, ...] = ()
    # Checked before anything is written: a stale epoch fails the write alone
    # (perdure.FencedError) and writes nothing.
    fence: Fence | None = None
