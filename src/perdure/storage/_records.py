"""The records that cross the storage contract."""

from __future__ import annotations

import dataclasses
import enum


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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InvocationRecord:
    """One call of a handler."""

    id: str
    target: str
    input_hash: str
    idempotency_key: str | None
    status: Status
    created_at: float
    updated_at: float
    last_error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class JournalEntry:
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """A failed execution of a step that is going to be retried."""

    invocation_id: str
    index: int
    attempt: int
    error: bytes
    created_at: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class IdempotentResult:
    """A side effect's result stored under (scope, key) across invocations."""

    scope: str
    key: str
    ok: bool
    payload: bytes
    type_tag: str | None
    invocation_id: str
    created_at: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StatusChange:
    invocation_id: str
    status: Status
    updated_at: float
    last_error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Write:
    """Everything one commit records, atomically: all of it or none of it."""

    entries: tuple[JournalEntry, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    status: StatusChange | None = None
    idempotent: IdempotentResult | None = None
