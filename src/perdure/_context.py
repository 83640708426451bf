"""The ``ctx`` a workflow receives: journaled steps and deterministic helpers."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, overload

import msgspec

from ._durable import ChildHandle, DurableFuture, DurablePromise, SignalWait, Timer
from ._errors import (
    Cancelled,
    ConfigurationError,
    ConflictError,
    JournalDecodeError,
    NonDeterminismError,
    Parked,
    PerdureError,
    SerializationError,
    StorageError,
    Suspended,
    TerminalError,
)
from ._hooks import StepFailure, StepInfo, fire
from ._journal import Replay, describe
from ._retry import NO_RETRY, RetryPolicy
from ._serde import is_coroutine_function, return_hint
from .storage._records import (
    Attempt,
    EntryKind,
    IdempotentResult,
    JournalEntry,
    Write,
)

if TYPE_CHECKING:
    from ._runtime import Runtime
    from ._saga import Saga

T = TypeVar("T")

# A call's outcome is the callee's: retrying would attach to the same callee.
_ONCE = NO_RETRY

LiveGuard = Callable[[str, int, str], BaseException]
"""Given (invocation id, journal index, step name) of a step about to run
live, the reason to stop instead."""


def completed_message_guard(invocation_id: str, index: int, name: str) -> BaseException:
    """Replaying a completed message: a step past its journal is non-determinism."""
    return NonDeterminismError(
        invocation_id, index, "no entry (the message completed)", f"step {name!r}"
    )


def _seconds(value: timedelta | float, what: str) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{what} must be a timedelta or a number of seconds, not {value!r}")
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"{what} must not be negative, not {value!r}")
    return seconds


def _with_timeout(rt: Runtime, name: str, fn: Callable[..., Any], seconds: float) -> Any:
    """``fn`` as an async function whose every call fails after ``seconds``."""
    is_async = is_coroutine_function(fn)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        try:
            if is_async:
                async with asyncio.timeout(seconds):
                    return await fn(*args, **kwargs)
            ctx = contextvars.copy_context()
            future = rt.pool.submit(functools.partial(ctx.run, fn, *args, **kwargs))
            return await asyncio.wait_for(asyncio.shield(future), seconds)
        except TimeoutError:
            raise TimeoutError(f"step {name!r} did not finish within {seconds:g}s") from None

    timed.__annotations__ = {"return": return_hint(fn)}
    return timed


_current_step: contextvars.ContextVar[StepInfo] = contextvars.ContextVar("perdure_step")
_current_context: contextvars.ContextVar[Context] = contextvars.ContextVar("perdure_context")


def current_step() -> StepInfo:
    """The step running now; call it inside a function passed to ``ctx.run``.

    >>> async def charge(ctx, amount):
    ...     return await ctx.run("charge", lambda: provider.charge(
    ...         amount, idempotency_key=current_step().key))
    """
    try:
        return _current_step.get()
    except LookupError:
        raise RuntimeError(
            "current_step() is only available inside a function passed to ctx.run()"
        ) from None


def current_context() -> Context:
    """The context of the invocation running now."""
    try:
        return _current_context.get()
    except LookupError:
        raise RuntimeError("no Perdure invocation is running in this context") from None


class Context:
    """What a workflow does durably. Passed as the first argument, ``ctx``.

    Every operation on it takes the next journal index: on replay the recorded
    outcome comes back without running anything; live, the outcome is durable
    before the call returns.
    """

    __slots__ = (
        "_cancel",
        "_cancel_delivered",
        "_children",
        "_closing",
        "_deadline",
        "_live_guard",
        "_now",
        "_partition",
        "_random",
        "_replay",
        "_rt",
        "_signals_taken",
        "_unflushed",
        "_woken",
        "can_park",
        "invocation_id",
        "key",
        "workflow_name",
    )

    def __init__(
        self,
        runtime: Runtime,
        invocation_id: str,
        workflow_name: str,
        replay: Replay,
        started_at: float,
        *,
        key: str | None = None,
        live_guard: LiveGuard | None = None,
        deadline: float | None = None,
        cancel_reason: str | None = None,
        can_park: bool = True,
        partition: int = 0,
    ) -> None:
        self._rt = runtime
        self.key = key
        """The actor's key, in an actor handler."""
        self._live_guard = live_guard
        self.invocation_id = invocation_id
        self.workflow_name = workflow_name
        self._replay = replay
        self._now = started_at
        self._random: random.Random | None = None
        self._deadline = deadline
        self._cancel = cancel_reason
        self._cancel_delivered = False
        self._children: list[str] = []
        self._closing: BaseException | None = None
        self._signals_taken: dict[str, int] = {}
        self._unflushed: list[DurableFuture[Any]] = []
        self._woken: asyncio.Event | None = None
        self.can_park = can_park
        """False in an actor handler: its waits hold the mailbox, in memory."""
        self._partition = partition

    @property
    def replaying(self) -> bool:
        """True while the handler re-runs code whose outcomes are journaled."""
        return self._replay.replaying

    # -- deterministic helpers ---------------------------------------------------

    def now(self) -> datetime:
        """The time of the latest durable point (UTC), identical on replay."""
        return datetime.fromtimestamp(self._now, UTC)

    def random(self) -> random.Random:
        """A random generator seeded by the invocation id: same sequence on replay."""
        if self._random is None:
            self._random = random.Random(self.invocation_id)
        return self._random

    def uuid4(self) -> uuid.UUID:
        """A random UUID that is the same on replay."""
        return uuid.UUID(int=self.random().getrandbits(128), version=4)

    def step_key(self) -> str:
        """The running step's stable key; see :func:`current_step`."""
        return current_step().key

    # -- calls to actors and workflows -------------------------------------------

    def actor(self, actor_type: Any, key: str) -> CallableActor:
        """Address an actor from this handler; see :class:`CallableActor`."""
        return CallableActor(self, self._rt.actor(actor_type), key)

    def start(
        self, workflow: Any, /, *args: Any, timeout: timedelta | None = None, **kwargs: Any
    ) -> ChildHandle[Any]:
        """Start a child workflow; await the handle (or gather it) for its result.

        The child's id is ``<this invocation's id>:<journal index>``, the same
        on every replay, so a replayed parent attaches to the child it started
        instead of starting another. A cancelled parent cancels its children;
        the child's deadline is the sooner of ``timeout`` and the parent's.
        """
        from ._client import prepare_invocation

        wf = self._rt.workflow(workflow)
        index, entry, _ = self._take(EntryKind.CALL, wf.name)
        child_id = f"{self.invocation_id}:{index}"
        prepared = None
        if entry is None:
            deadline = self._deadline
            if timeout is not None:
                own = self._rt.clock.now() + _seconds(timeout, "timeout")
                deadline = own if deadline is None else min(deadline, own)
            prepared = prepare_invocation(
                self._rt,
                wf,
                args,
                kwargs,
                child_id,
                child_id,
                parent_id=self.invocation_id,
                deadline=deadline,
                partition=self._partition,
            )
        handle: ChildHandle[Any] = ChildHandle(self, index, wf, prepared, entry is not None)
        if entry is None:
            self._unflushed.append(handle)
        self._children.append(child_id)
        return handle

    async def call(
        self, workflow: Any, /, *args: Any, timeout: timedelta | None = None, **kwargs: Any
    ) -> Any:
        """Run a child workflow and return its result (``await ctx.start(...)``).

        A child that fails raises :class:`InvocationFailedError` here, with
        the child's error as its cause.
        """
        return await self.start(workflow, *args, timeout=timeout, **kwargs)

    # -- durable waits ---------------------------------------------------------------

    def sleep(self, delay: timedelta | float) -> Timer:
        """A durable timer: ``await ctx.sleep(timedelta(days=7))``.

        The wake-up time is journaled. A long sleep parks the invocation (no
        task, no memory, only a row) and it resumes on time, also across a
        restart; one that came due while the process was down fires at once.
        """
        return self._timer(self._rt.clock.now() + _seconds(delay, "delay"))

    def sleep_until(self, when: datetime) -> Timer:
        """A durable timer that fires at ``when`` (an aware datetime)."""
        if not isinstance(when, datetime) or when.tzinfo is None:
            raise TypeError(f"sleep_until needs a timezone-aware datetime, not {when!r}")
        return self._timer(when.timestamp())

    def _timer(self, when: float) -> Timer:
        index, entry, _ = self._take(EntryKind.TIMER, "sleep")
        if entry is not None:
            try:
                when = float(self._rt.codec.decode(entry.payload, None))
            except (ValueError, TypeError) as exc:
                raise Suspended(JournalDecodeError(self.invocation_id, index, str(exc))) from None
        timer = Timer(self, index, when, entry is not None)
        if entry is None:
            self._unflushed.append(timer)
        return timer

    def promise(self, name: str = "promise", *, type: Any = None) -> DurablePromise[Any]:
        """A durable promise: hand ``p.id`` out, then ``await p`` for the value
        that ``client.resolve_promise(p.id, value)`` gives it (``type``: what
        to decode the value as). A rejected promise raises its error here."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a promise name must be a non-empty string, not {name!r}")
        index, entry, _ = self._take(EntryKind.PROMISE, name)
        promise: DurablePromise[Any] = DurablePromise(self, index, name, type, entry is not None)
        if entry is None:
            self._unflushed.append(promise)
        return promise

    def signal(self, name: str, *, type: Any = None) -> SignalWait[Any]:
        """The next signal named ``name`` sent to this invocation
        (``handle.signal(name, value)``); await it for the value."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a signal name must be a non-empty string, not {name!r}")
        index, entry, _ = self._take(EntryKind.SIGNAL, name)
        wait: SignalWait[Any] = SignalWait(self, index, name, type, entry is not None)
        if entry is None:
            self._unflushed.append(wait)
        return wait

    async def gather(self, *futures: DurableFuture[Any]) -> list[Any]:
        """Wait for every future; their results in argument order. The first
        failure observed is raised (the others keep running)."""
        self._check_futures(futures)
        await self._wait(futures, first=False)
        return [f.result() for f in futures]

    async def select(self, *futures: DurableFuture[Any]) -> tuple[int, Any]:
        """Wait for the first future to finish: ``(its position, its result)``.

        >>> i, value = await ctx.select(ctx.promise("approval"), ctx.sleep(timedelta(hours=1)))
        """
        self._check_futures(futures)
        if not futures:
            raise ValueError("ctx.select needs at least one durable future")
        winner = await self._wait(futures, first=True)
        assert winner is not None
        return futures.index(winner), winner.result()

    async def publish(self, name: str, value: Any) -> None:
        """Publish a value that ``handle.query(name)`` reads (the latest wins)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a query name must be a non-empty string, not {name!r}")
        index, entry, _ = self._take(EntryKind.PUBLISH, name)
        if entry is not None:
            self._now = entry.created_at
            return
        await self._before_live()
        what = f"published value {name!r} of invocation {self.invocation_id}"
        payload, tag = self._rt.codec.encode(value, what)
        now = self._rt.clock.now()
        await self._commit(
            Write(entries=(self._entry(index, EntryKind.PUBLISH, name, payload, tag, now),))
        )
        self._now = now

    def saga(self) -> Saga:
        """Compensations that undo this workflow's steps if it fails; see :class:`Saga`."""
        from ._saga import Saga

        return Saga(self)

    # -- the wait machinery -------------------------------------------------------------

    def _check_futures(self, futures: Sequence[Any]) -> None:
        for f in futures:
            if not isinstance(f, DurableFuture) or f._ctx is not self:
                raise TypeError(
                    f"{f!r} is not a durable future of this invocation: pass what ctx.sleep, "
                    "ctx.start, ctx.promise or ctx.signal returned"
                )

    async def _await_one(self, future: DurableFuture[T]) -> T:
        await self._wait((future,), first=False)
        return future.result()

    def _notify(self) -> None:
        """Something this invocation may be waiting for happened."""
        if self._woken is not None:
            self._woken.set()

    async def _wait(
        self, futures: Sequence[DurableFuture[Any]], *, first: bool
    ) -> DurableFuture[Any] | None:
        """Settle ``futures`` (all of them, or the first): replayed outcomes
        from the journal, then live ones as they arrive, each journaled."""
        if self._unflushed:
            await self._flush()
        if first:
            for f in futures:
                if f._outcome is not None:
                    return f
        pending = [f for f in futures if f._outcome is None]
        # Outcomes the journal recorded, in the order they were observed.
        while pending:
            entry = self._replay.peek()
            if entry is None:
                break
            labels = {f.label: f for f in pending}
            if entry.kind is EntryKind.COMPLETE and entry.name in labels:
                self._replay.take(EntryKind.COMPLETE, entry.name)
                done = labels[entry.name]
                done.settle(entry)
                pending.remove(done)
                self._now = entry.created_at
                if first or not done._outcome or not done._outcome[0]:
                    return done
                continue
            if entry.kind is EntryKind.CANCEL:
                self._take(EntryKind.CANCEL, "cancel")  # raises the cancellation
            raise Suspended(
                NonDeterminismError(
                    self.invocation_id,
                    self._replay.next_index,
                    describe(entry.kind, entry.name),
                    "the outcome of " + ", ".join(repr(f) for f in pending),
                )
            )
        while pending:
            await self._before_live()
            if self._woken is not None:
                self._woken.clear()
            found: list[tuple[DurableFuture[Any], Any]] = []
            for f in pending:
                try:
                    probe = await f.probe()
                except (StorageError, JournalDecodeError) as exc:
                    raise Suspended(exc) from None
                if probe is not None:
                    found.append((f, probe))
                    if first:
                        break
            if not found:
                await self._idle(pending)
                continue
            now = self._rt.clock.now()
            entries = []
            for f, (ok, payload, tag) in found:
                index, _, _ = self._take(EntryKind.COMPLETE, f.label)
                entries.append(
                    self._entry(index, EntryKind.COMPLETE, f.label, payload, tag, now, ok=ok)
                )
            await self._commit(Write(entries=tuple(entries)))
            self._now = now
            for (f, _), e in zip(found, entries, strict=True):
                f.settle(e)
                pending.remove(f)
            self._replay_point()
            failed = next((f for f, _ in found if f._outcome and not f._outcome[0]), None)
            if first or failed is not None:
                return failed or found[0][0]
        return None

    async def _idle(self, pending: list[DurableFuture[Any]]) -> None:
        """Nothing is there yet: wait in memory, or park the invocation."""
        rt = self._rt
        waits: list[Awaitable[Any]] = []
        notifies = False
        for f in pending:
            how = f.watch()
            if how is True:
                notifies = True
            elif how is not False:
                waits.append(how)
        deadline = None if self._cancel_delivered else self._deadline
        if deadline is not None:
            left = deadline - rt.clock.now()
            if left <= rt.timer_lead or not self.can_park or waits or notifies:
                waits.append(rt.clock.sleep(max(0.0, left)))
                deadline = None
        if not waits and not notifies and self.can_park:
            wake = min((f.wake_at for f in pending if f.wake_at is not None), default=None)
            if deadline is not None:
                wake = deadline if wake is None else min(wake, deadline)
            self._closing = Parked(wake)
            raise self._closing
        if self._woken is None:
            self._woken = asyncio.Event()
        tasks = [asyncio.ensure_future(w) for w in waits]
        tasks.append(asyncio.ensure_future(self._woken.wait()))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    async def _flush(self) -> None:
        """Journal the creation of the futures made since the last durable point."""
        made, self._unflushed = self._unflushed, []
        children = [f for f in made if isinstance(f, ChildHandle)]
        try:
            if len(children) == 1:
                await children[0].before_creation()
            elif children:
                await asyncio.gather(*(c.before_creation() for c in children))
        except (StorageError, ConflictError) as exc:
            raise Suspended(exc) from None
        now = self._rt.clock.now()
        await self._commit(
            Write(
                entries=tuple(f.creation_entry(now) for f in made),
                promises=tuple(f.record(now) for f in made if isinstance(f, DurablePromise)),
            )
        )
        for f in made:
            f.created = True
        self._now = now
        self._replay_point()

    async def _before_live(self) -> None:
        """What every live durable point does first: journal the futures
        created since the last one, and deliver a pending cancellation."""
        if self._unflushed:
            await self._flush()
        if self._cancel_delivered:
            return
        reason, timeout = self._cancel, False
        if reason is None and self._deadline is not None:
            if self._rt.clock.now() < self._deadline:
                return
            reason, timeout = "timed out (its deadline passed)", True
        if reason is None:
            return
        index, _, _ = self._take(EntryKind.CANCEL, "cancel")
        payload, _ = self._rt.codec.encode({"reason": reason, "timeout": timeout}, "a cancellation")
        now = self._rt.clock.now()
        await self._commit(
            Write(entries=(self._entry(index, EntryKind.CANCEL, "cancel", payload, None, now),))
        )
        self._now = now
        await self._deliver_cancel(reason, timeout)

    async def _deliver_cancel(self, reason: str, timeout: bool) -> None:
        self._cancel_delivered = True
        if self._children:
            await self._rt.cancel_children(self._children, f"cancelled with its parent ({reason})")
        raise Cancelled(reason, timeout=timeout)

    def _replay_point(self) -> None:
        """In always-replay mode, restart from the journal after each durable point."""
        if self._rt.always_replay and self.can_park:
            self._closing = Parked(self._rt.clock.now())
            raise self._closing

    def _entry(
        self,
        index: int,
        kind: EntryKind,
        name: str,
        payload: bytes,
        tag: str | None,
        now: float,
        *,
        ok: bool = True,
    ) -> JournalEntry:
        return JournalEntry(
            invocation_id=self.invocation_id,
            index=index,
            kind=kind,
            name=name,
            ok=ok,
            payload=payload,
            type_tag=tag,
            attempts=1,
            created_at=now,
        )

    def _take(self, kind: EntryKind, name: str) -> tuple[int, JournalEntry | None, int]:
        """Claim the next journal index for a durable operation."""
        if self._closing is not None:
            raise self._closing  # parked: code in a finally block must not go on
        try:
            index, entry, failed = self._replay.take(kind, name)
        except NonDeterminismError as exc:
            raise Suspended(exc) from None
        if entry is not None:
            if entry.kind is EntryKind.CANCEL and kind is not EntryKind.CANCEL:
                self._now = entry.created_at
                try:
                    record = self._rt.codec.decode(entry.payload, None)
                    reason, timeout = str(record["reason"]), bool(record["timeout"])
                except (ValueError, TypeError, KeyError) as exc:
                    raise Suspended(
                        JournalDecodeError(self.invocation_id, index, str(exc))
                    ) from None
                self._cancel_delivered = True
                raise Cancelled(reason, timeout=timeout)
        elif self._live_guard is not None:
            raise Suspended(self._live_guard(self.invocation_id, index, name))
        return index, entry, failed

    # -- steps -------------------------------------------------------------------

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> T: ...

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., T],
        *args: Any,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> T: ...

    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as a journaled step and return its result.

        Sync functions run in the runtime's thread pool, async ones are
        awaited. Failures are retried by ``retry`` (the runtime's default if
        None); :class:`TerminalError` stops retrying. With
        ``idempotency_key``, the result is stored under ``(name, key)`` and
        any later step using the same name and key, in any invocation, gets
        it back without calling ``fn``. With ``timeout``, an attempt that takes
        longer fails with TimeoutError (and is retried by ``retry``); a sync
        function cannot be interrupted, so its thread runs on, but its result
        is dropped.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"ctx.run: the step name must be a non-empty string, not {name!r}")
        if not callable(fn):
            raise TypeError(f"ctx.run({name!r}): {fn!r} is not callable")
        if self._closing is None and self._live_guard is None:
            # The hot path of _take: no cancellation can be recorded ahead of
            # a live step, so only a replayed entry needs looking at.
            try:
                index, entry, failed = self._replay.take(EntryKind.STEP, name)
            except NonDeterminismError as exc:
                raise Suspended(exc) from None
            if entry is not None and entry.kind is EntryKind.CANCEL:
                self._replay.rewind(index)
                index, entry, failed = self._take(EntryKind.STEP, name)
        else:
            # Replay only (rebuilding state, a dry-run fork): _take stops a live step.
            index, entry, failed = self._take(EntryKind.STEP, name)
        if entry is not None:
            self._now = entry.created_at
            rt = self._rt
            rt.stats.steps_replayed += 1
            if rt.hooks.step_replayed is not None:
                fire(
                    rt.hooks.step_replayed,
                    StepInfo(
                        invocation_id=self.invocation_id,
                        index=index,
                        name=name,
                        attempt=entry.attempts,
                    ),
                )
            return self._outcome(entry, fn)
        if self._unflushed or self._cancel is not None or self._deadline is not None:
            await self._before_live()
        if timeout is not None:
            fn = _with_timeout(self._rt, name, fn, _seconds(timeout, "timeout"))
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise TypeError(
                    f"ctx.run({name!r}): idempotency_key must be a non-empty string, "
                    f"not {idempotency_key!r}"
                )
            lock = self._rt._idempotency_lock(name, idempotency_key)
            async with lock:
                return await self._run_idempotent(
                    index, name, fn, args, kwargs, retry, idempotency_key, failed
                )
        return await self._run_live(index, name, fn, args, kwargs, retry, failed, None)

    async def _run_idempotent(
        self,
        index: int,
        name: str,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: RetryPolicy | None,
        key: str,
        failed: int,
    ) -> T:
        try:
            stored = await self._rt.store.get_idempotent_result(name, key)
        except StorageError as exc:
            raise Suspended(exc) from None
        if stored is None:
            return await self._run_live(index, name, fn, args, kwargs, retry, failed, key)
        entry = JournalEntry(
            invocation_id=self.invocation_id,
            index=index,
            kind=EntryKind.STEP,
            name=name,
            ok=stored.ok,
            payload=stored.payload,
            type_tag=stored.type_tag,
            attempts=0,
            created_at=self._rt.clock.now(),
        )
        await self._commit(Write(entries=(entry,)))
        self._now = entry.created_at
        self._rt.stats.steps_deduplicated += 1
        deduplicated: T = self._outcome(entry, fn)
        return deduplicated

    async def _run_live(
        self,
        index: int,
        name: str,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: RetryPolicy | None,
        failed: int,
        idempotency_key: str | None,
    ) -> T:
        rt = self._rt
        policy = retry if retry is not None else rt.default_retry
        hooks = rt.hooks
        is_async = is_coroutine_function(fn)
        attempt = failed + 1
        while True:
            info = StepInfo(
                invocation_id=self.invocation_id, index=index, name=name, attempt=attempt
            )
            fire(hooks.before_step, info)
            try:
                value = await self._call(fn, args, kwargs, info, is_async)
            except TerminalError as exc:
                await self._record_error(index, name, attempt, exc)
            except Exception as exc:
                if attempt >= policy.max_attempts:
                    await self._record_error(index, name, attempt, exc)
                now = rt.clock.now()
                await self._commit(
                    Write(
                        attempts=(
                            Attempt(
                                invocation_id=self.invocation_id,
                                index=index,
                                attempt=attempt,
                                error=rt.codec.encode_error(exc),
                                created_at=now,
                            ),
                        )
                    )
                )
                rt.stats.step_retries += 1
                if hooks.step_failed is not None:
                    fire(hooks.step_failed, StepFailure(step=info, error=exc, retrying=True))
                await rt.clock.sleep(policy.delay(attempt))
                attempt += 1
                continue
            break
        try:
            what = f"step {name!r} of invocation {self.invocation_id}"
            payload, tag = rt.codec.encode(value, what)
            result: T = rt.codec.roundtrip(value, payload, tag, return_hint(fn), what)
        except SerializationError as exc:
            await self._record_error(index, name, attempt, exc)
        now = rt.clock.now()
        entry = JournalEntry(
            invocation_id=self.invocation_id,
            index=index,
            kind=EntryKind.STEP,
            name=name,
            ok=True,
            payload=payload,
            type_tag=tag,
            attempts=attempt,
            created_at=now,
        )
        idem = None
        if idempotency_key is not None:
            idem = IdempotentResult(
                scope=name,
                key=idempotency_key,
                ok=True,
                payload=payload,
                type_tag=tag,
                invocation_id=self.invocation_id,
                created_at=now,
            )
        await self._commit(Write(entries=(entry,), idempotent=idem))
        self._now = now
        rt.stats.steps_executed += 1
        fire(hooks.after_step, info)
        if rt.always_replay:
            self._replay_point()
        return result

    async def _call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        info: StepInfo,
        is_async: bool,
    ) -> Any:
        token = _current_step.set(info)
        try:
            if is_async:
                return await fn(*args, **kwargs)
            ctx = contextvars.copy_context()
            value = await self._rt.pool.submit(functools.partial(ctx.run, fn, *args, **kwargs))
            if inspect.isawaitable(value):  # a lambda that returns a coroutine
                value = await value
            return value
        finally:
            _current_step.reset(token)

    async def _record_error(self, index: int, name: str, attempts: int, exc: Exception) -> NoReturn:
        rt = self._rt
        now = rt.clock.now()
        entry = JournalEntry(
            invocation_id=self.invocation_id,
            index=index,
            kind=EntryKind.STEP,
            name=name,
            ok=False,
            payload=rt.codec.encode_error(exc),
            type_tag=None,
            attempts=attempts,
            created_at=now,
        )
        await self._commit(Write(entries=(entry,)))
        self._now = now
        rt.stats.steps_executed += 1
        if rt.hooks.step_failed is not None:
            info = StepInfo(
                invocation_id=self.invocation_id, index=index, name=name, attempt=attempts
            )
            fire(rt.hooks.step_failed, StepFailure(step=info, error=exc, retrying=False))
        raise exc

    async def _commit(self, write: Write) -> None:
        try:
            if self._rt.nodes is not None:
                write = msgspec.structs.replace(write, fence=self._rt.fence(self._partition))
            await self._rt.store.commit(write)
        except (StorageError, ConflictError) as exc:
            # Not the workflow's fault: leave the invocation unfinished.
            raise Suspended(exc) from None

    def _outcome(self, entry: JournalEntry, fn: Callable[..., Any]) -> Any:
        codec = self._rt.codec
        if not entry.ok:
            try:
                error = codec.decode_error(entry.payload)
            except (ValueError, TypeError, KeyError) as exc:
                raise Suspended(
                    JournalDecodeError(self.invocation_id, entry.index, str(exc))
                ) from None
            raise error
        try:
            return codec.decode(entry.payload, entry.type_tag, return_hint(fn))
        except (ValueError, TypeError, AttributeError, ImportError, PerdureError) as exc:
            raise Suspended(JournalDecodeError(self.invocation_id, entry.index, str(exc))) from None


class CallableActor:
    """An actor as seen from inside a handler: messages sent through it are
    journaled steps, so a replayed caller does not send twice and the actor
    deduplicates a re-sent message by the caller's step key."""

    __slots__ = ("_ctx", "_definition", "key")

    def __init__(self, ctx: Context, definition: Any, key: str) -> None:
        self._ctx = ctx
        self._definition = definition
        self.key = key

    def _check_not_self(self) -> None:
        if self._ctx.key == self.key and self._ctx.workflow_name.partition(".")[0] == (
            self._definition.name
        ):
            raise ConfigurationError(
                f"actor {self._definition.name}/{self.key} cannot ask itself: its mailbox is "
                "busy with the message asking"
            )

    async def ask(self, handler: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Send a message and wait for the reply, as one journaled step."""
        self._check_not_self()
        definition, key, rt = self._definition, self.key, self._ctx._rt
        target = definition.handler(handler)

        async def ask_actor() -> Any:
            return await rt.send_from_step(
                definition,
                key,
                handler,
                args,
                kwargs,
                idempotency_key=current_step().key,
                reply=True,
            )

        ask_actor.__annotations__ = {"return": target.return_hint}
        return await self._ctx.run(f"ask {target.name} {key}", ask_actor, retry=_ONCE)

    async def tell(
        self, handler: Any, /, *args: Any, delay: timedelta | None = None, **kwargs: Any
    ) -> str | None:
        """Send a message without waiting, as one journaled step.

        Returns the message's invocation id (None for a plain actor). With
        ``delay``, it is delivered once the delay has passed (the id is then
        the delivery's).
        """
        definition, key, rt = self._definition, self.key, self._ctx._rt
        target = definition.handler(handler)
        if delay is not None:

            async def tell_later() -> str:
                try:
                    rec = await rt.send_later(
                        definition,
                        key,
                        handler,
                        args,
                        kwargs,
                        delay,
                        idempotency_key=current_step().key,
                    )
                except StorageError as exc:
                    raise Suspended(exc) from None  # not the step's outcome: retried
                return rec.id

            return await self._ctx.run(f"tell {target.name} {key} later", tell_later, retry=_ONCE)

        async def tell_actor() -> str | None:
            sent: str | None = await rt.send_from_step(
                definition,
                key,
                handler,
                args,
                kwargs,
                idempotency_key=current_step().key,
                reply=False,
            )
            return sent

        return await self._ctx.run(f"tell {target.name} {key}", tell_actor, retry=_ONCE)


class PlainContext:
    """The ``ctx`` of an actor without durability: nothing is journaled."""

    __slots__ = ("_rt", "key")

    def __init__(self, runtime: Runtime, key: str) -> None:
        self._rt = runtime
        self.key = key

    @property
    def replaying(self) -> bool:
        return False

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._rt.clock.now(), UTC)

    def random(self) -> random.Random:
        return random.Random()

    def uuid4(self) -> uuid.UUID:
        return uuid.uuid4()

    async def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` now (sync functions in the thread pool); nothing is recorded."""
        kwargs.pop("retry", None)
        kwargs.pop("idempotency_key", None)
        if is_coroutine_function(fn):
            value: T = await fn(*args, **kwargs)  # type: ignore[misc]
            return value
        ctx = contextvars.copy_context()
        result: T = await self._rt.pool.submit(functools.partial(ctx.run, fn, *args, **kwargs))
        return result
