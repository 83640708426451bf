"""Points where tests and observability (``perdure.observability``) watch the runtime."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

if TYPE_CHECKING:
    from .storage._records import InvocationRecord

log = logging.getLogger("perdure.hooks")
T = TypeVar("T")


class StepInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The step that is running: pass ``key`` to external APIs.

    ``key`` is identical across retries, replays and process restarts, so an
    external API that deduplicates by it makes the step effectively-once.
    """

    invocation_id: str
    index: int
    name: str
    attempt: int

    @property
    def key(self) -> str:
        return f"{self.invocation_id}:{self.index}"


class InvocationInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An invocation about to run in this process (``before_invocation``).

    ``resumed`` is True when the run starts by replaying journaled entries: a
    recovered, resumed (after a park) or always-replay run.
    """

    invocation_id: str
    target: str
    actor_type: str | None = None
    actor_key: str | None = None
    parent_id: str | None = None
    resumed: bool = False


class InvocationEnd(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """How an invocation's run in this process ended (``after_invocation``).

    ``outcome`` is ``completed``, ``failed`` or ``cancelled`` (final),
    ``suspended`` (parked, resumes later), ``stopped`` (left unfinished by an
    error that is not the workflow's, ``error`` says which) or ``interrupted``
    (its task was cancelled: the runtime stopped).
    """

    invocation_id: str
    outcome: str
    error: BaseException | None = None


class StepFailure(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A live step attempt raised (``step_failed``); ``retrying``: another
    attempt follows, else the error is the step's recorded outcome."""

    step: StepInfo
    error: BaseException
    retrying: bool


class BatchCommit(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A storage batch committed (``after_batch_commit``): how many writes
    it held and how long its transaction took, in seconds."""

    size: int
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Hooks:
    """Callbacks fired at the runtime's durable points. Keep them cheap.

    A hook that raises is logged and ignored: observing the runtime must not
    change what it does.

    ``before_step``: a step is about to run live (not replayed).
    ``after_step``: a step's outcome has committed.
    ``after_output``: an invocation's output has committed.
    ``before_batch_commit``: a storage batch is written but not committed
    (bound when a store is opened from a URL: set it in ``Runtime(hooks=)``).

    Observability (each fired only if set, so an unset hook costs a check):
    ``invocation_created``: a new invocation was recorded; fired in the
    caller's context (the one that started it), before it runs.
    ``before_invocation``: a run of an invocation starts, in its own task,
    before the handler is called.
    ``after_invocation``: that run ended (done-callback of its task).
    ``step_replayed``: a step's recorded outcome came back from the journal.
    ``step_failed``: a live step attempt raised (after the failure committed).
    ``after_batch_commit``: a SQLite group-commit batch committed (stores
    opened from a URL; the memory store has no batches).
    """

    before_step: Callable[[StepInfo], None] | None = None
    after_step: Callable[[StepInfo], None] | None = None
    after_output: Callable[[str], None] | None = None
    before_batch_commit: Callable[[int], None] | None = None
    invocation_created: Callable[[InvocationRecord], None] | None = None
    before_invocation: Callable[[InvocationInfo], None] | None = None
    after_invocation: Callable[[InvocationEnd], None] | None = None
    step_replayed: Callable[[StepInfo], None] | None = None
    step_failed: Callable[[StepFailure], None] | None = None
    after_batch_commit: Callable[[BatchCommit], None] | None = None


def chain(first: Hooks, second: Hooks) -> Hooks:
    """Hooks that call ``first``'s, then ``second``'s; each one's errors are
    logged and ignored on their own, so one observer cannot stop another."""
    merged: dict[str, Any] = {}
    for field in dataclasses.fields(Hooks):
        a, b = getattr(first, field.name), getattr(second, field.name)
        merged[field.name] = a if b is None else b if a is None else _both(a, b)
    return Hooks(**merged)


def _both(a: Callable[[Any], None], b: Callable[[Any], None]) -> Callable[[Any], None]:
    def both(arg: Any) -> None:
        fire(a, arg)
        fire(b, arg)

    return both


def fire(hook: Callable[[T], None] | None, arg: T) -> None:
    """Call ``hook(arg)`` if set; log and swallow what it raises."""
    if hook is None:
        return
    try:
        hook(arg)
    except Exception:
        log.exception("hook %r raised; ignored", hook)
