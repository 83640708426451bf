"""Durable futures: timers, child invocations, promises and signals.

Each future is created at a journal index (its creation entry: ``timer``,
``call``, ``promise`` or ``signal``) and completes when the workflow observes
its outcome, which is journaled as a ``complete`` entry whose name is the
creation index. Because the order in which outcomes were observed is in the
journal, ``gather`` and ``select`` take the same branch on replay.

Ids are deterministic: a promise's and a child's id is
``<invocation id>:<creation index>``, the same on every replay, so an id
handed out before a crash still names the same promise after it.

While a workflow waits for something that is not there yet, it either waits
in memory (a timer due within the runtime's ``timer_lead``, a child running
in this process) or parks: the invocation is recorded as suspended, its task
and memory are released, and it resumes by replay when it is woken.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._errors import (
    InvocationCancelledError,
    InvocationFailedError,
    JournalDecodeError,
)
from .storage._records import EntryKind, JournalEntry, PromiseRecord, Status

if TYPE_CHECKING:
    from ._context import Context
    from ._workflow import Workflow

T = TypeVar("T")

Probe = tuple[bool, bytes, "str | None"]
"""A live outcome: (ok, payload, type tag); a failure's payload is an encoded error."""

_NULL = b"null"


class DurableFuture(Generic[T]):
    """Something a workflow awaits durably. Await it, or pass several to
    ``ctx.gather`` / ``ctx.select``."""

    __slots__ = ("_ctx", "_hint", "_outcome", "created", "index")
    kind: EntryKind

    def __init__(self, ctx: Context, index: int, hint: Any, created: bool) -> None:
        self._ctx = ctx
        self.index = index
        self._hint = hint
        self.created = created  # the creation entry is journaled
        self._outcome: tuple[bool, Any] | None = None

    @property
    def label(self) -> str:
        """The name of this future's completion entry."""
        return str(self.index)

    def __await__(self) -> Generator[Any, None, T]:
        return self._ctx._await_one(self).__await__()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at journal index {self.index}>"

    # -- what each kind defines ---------------------------------------------------

    def creation_entry(self, now: float) -> JournalEntry:
        ctx = self._ctx
        return JournalEntry(
            invocation_id=ctx.invocation_id,
            index=self.index,
            kind=self.kind,
            name=self.entry_name(),
            ok=True,
            payload=self.creation_payload(),
            type_tag=None,
            attempts=1,
            created_at=now,
        )

    def entry_name(self) -> str:
        raise NotImplementedError

    def creation_payload(self) -> bytes:
        return _NULL

    async def before_creation(self) -> None:
        """Work to do before the creation entry commits (a child's record)."""

    async def probe(self) -> Probe | None:
        """The outcome if it is there now, else None."""
        raise NotImplementedError

    def watch(self) -> Awaitable[Any] | bool:
        """How to wait for it in memory: an awaitable, True if it will wake
        the context by itself, or False if only a wake-up from outside (or
        parking) will do."""
        return False

    @property
    def wake_at(self) -> float | None:
        """When a parked invocation must wake up for this future."""
        return None

    def settle(self, entry: JournalEntry) -> None:
        """Take the outcome from its completion entry (live or replayed)."""
        ctx = self._ctx
        codec = ctx._rt.codec
        try:
            if entry.ok:
                self._outcome = (True, codec.decode(entry.payload, entry.type_tag, self._hint))
            else:
                self._outcome = (False, self.error(entry.payload))
        except (ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
            from ._errors import Suspended

            raise Suspended(JournalDecodeError(ctx.invocation_id, entry.index, str(exc))) from None

    def error(self, payload: bytes) -> BaseException:
        return self._ctx._rt.codec.decode_error(payload)

    def result(self) -> T:
        assert self._outcome is not None
        ok, value = self._outcome
        if not ok:
            raise value
        result: T = value
        return result


class Timer(DurableFuture[None]):
    """A durable sleep: ``await ctx.sleep(timedelta(days=7))``."""

    __slots__ = ("when",)
    kind = EntryKind.TIMER

    def __init__(self, ctx: Context, index: int, when: float, created: bool) -> None:
        super().__init__(ctx, index, None, created)
        self.when = when

    def entry_name(self) -> str:
        return "sleep"

    def creation_payload(self) -> bytes:
        return self._ctx._rt.codec.encode(self.when, "a timer")[0]

    async def probe(self) -> Probe | None:
        return (True, _NULL, None) if self._ctx._rt.clock.now() >= self.when else None

    def watch(self) -> Awaitable[Any] | bool:
        ctx = self._ctx
        left = self.when - ctx._rt.clock.now()
        if left <= ctx._rt.timer_lead or not ctx.can_park:
            return ctx._rt.clock.sleep(max(left, 0.0))
        return False

    @property
    def wake_at(self) -> float | None:
        return self.when


class ChildHandle(DurableFuture[T]):
    """A child invocation started by ``ctx.start``; await it for its result."""

    __slots__ = ("_prepared", "_task", "_watched", "workflow")
    kind = EntryKind.CALL

    def __init__(
        self,
        ctx: Context,
        index: int,
        workflow: Workflow[Any, Any],
        prepared: Any,
        created: bool,
    ) -> None:
        super().__init__(ctx, index, workflow.return_hint, created)
        self.workflow = workflow
        # (record, input entry, decoded input) until the child is created
        self._prepared = prepared
        self._task: Any = None
        self._watched = False

    @property
    def id(self) -> str:
        """The child's invocation id (deterministic: the same on replay)."""
        return f"{self._ctx.invocation_id}:{self.index}"

    def entry_name(self) -> str:
        return self.workflow.name

    def creation_payload(self) -> bytes:
        return self._ctx._rt.codec.encode(self.id, "a child id")[0]

    async def before_creation(self) -> None:
        if self._prepared is not None:
            rec, entry, decoded = self._prepared
            stored, _ = await self._ctx._rt.create(self.workflow, rec, entry, decoded)
            self._prepared = None
            self._task = self._ctx._rt.running(stored.id)

    async def probe(self) -> Probe | None:
        rt = self._ctx._rt
        task = self._task or rt.running(self.id)
        if task is not None:
            self._task = task
            if not task.done():
                return None
            if not task.cancelled() and task.exception() is None:
                outcome = task.result()
                if outcome.status is Status.COMPLETED and outcome.payload is not None:
                    return (True, outcome.payload, outcome.type_tag)
            self._task = None  # read what it left in the store
        rec = await rt.store.get_invocation(self.id)
        if rec is None or not rec.status.finished:
            return None
        journal = await rt.store.read_journal(self.id)
        output = journal[-1] if journal and journal[-1].kind is EntryKind.OUTPUT else None
        if output is None:
            raise JournalDecodeError(self.id, len(journal), "the finished child has no output")
        return (output.ok, output.payload, output.type_tag)

    def watch(self) -> Awaitable[Any] | bool:
        task = self._task
        if task is None or task.done():
            return False
        if not self._watched:
            self._watched = True
            ctx = self._ctx
            task.add_done_callback(lambda _t: ctx._notify())
        return True

    def error(self, payload: bytes) -> BaseException:
        codec = self._ctx._rt.codec
        summary = codec.error_summary(payload)
        if str(summary.get("type", "")).endswith(":Cancelled"):
            return InvocationCancelledError(
                self.id, self.workflow.name, str(summary.get("message", "cancelled"))
            )
        return InvocationFailedError(self.id, self.workflow.name, codec.decode_error(payload))


class DurablePromise(DurableFuture[T]):
    """A promise resolved from outside (``client.resolve_promise(p.id, v)``).

    Hand its ``id`` out (in a step: an email, a webhook URL), then await it.
    A value that arrives while the process is down is kept and delivered
    when the invocation resumes.
    """

    __slots__ = ("name",)
    kind = EntryKind.PROMISE

    def __init__(self, ctx: Context, index: int, name: str, hint: Any, created: bool) -> None:
        super().__init__(ctx, index, hint, created)
        self.name = name

    @property
    def id(self) -> str:
        return f"{self._ctx.invocation_id}:{self.index}"

    def entry_name(self) -> str:
        return self.name

    def creation_payload(self) -> bytes:
        return self._ctx._rt.codec.encode(self.id, "a promise id")[0]

    def record(self, now: float) -> PromiseRecord:
        # While pending, type_tag names the type the workflow expects, so that
        # a resolution with a value of another type is refused up front.
        hint = self._hint
        expected = None
        if isinstance(hint, type) and "<locals>" not in hint.__qualname__:
            expected = f"{hint.__module__}:{hint.__qualname__}"
        return PromiseRecord(
            id=self.id,
            invocation_id=self._ctx.invocation_id,
            name=self.name,
            state="pending",
            payload=None,
            type_tag=expected,
            created_at=now,
        )

    async def probe(self) -> Probe | None:
        found = await self._ctx._rt.store.get_promise(self.id)
        if found is None or found.state == "pending" or found.payload is None:
            return None
        return (found.state == "resolved", found.payload, found.type_tag)


class SignalWait(DurableFuture[T]):
    """The next signal named ``name`` sent to this invocation."""

    __slots__ = ("name", "nth")
    kind = EntryKind.SIGNAL

    def __init__(self, ctx: Context, index: int, name: str, hint: Any, created: bool) -> None:
        super().__init__(ctx, index, hint, created)
        self.name = name
        self.nth = -1  # which of the signals of this name it receives, once known

    def entry_name(self) -> str:
        return self.name

    async def probe(self) -> Probe | None:
        ctx = self._ctx
        taken = ctx._signals_taken.get(self.name, 0)
        signals = await ctx._rt.store.read_signals(ctx.invocation_id, self.name)
        if len(signals) <= taken:
            return None
        found = signals[taken]
        return (True, found.payload, found.type_tag)

    def settle(self, entry: JournalEntry) -> None:
        ctx = self._ctx
        self.nth = ctx._signals_taken.get(self.name, 0)
        ctx._signals_taken[self.name] = self.nth + 1
        super().settle(entry)
