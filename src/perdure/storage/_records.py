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
    invocation_id: str
    status: Status
    updated_at: float
    last_error: str | None = None


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
