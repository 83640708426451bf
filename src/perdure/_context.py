"""The ``ctx`` a workflow receives: journaled steps and deterministic helpers."""

from __future__ import annotations

import contextvars
import functools
import inspect
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, overload

from ._errors import (
    ConfigurationError,
    ConflictError,
    JournalDecodeError,
    NonDeterminismError,
    PerdureError,
    SerializationError,
    StorageError,
    Suspended,
    TerminalError,
)
from ._hooks import StepInfo, fire
from ._journal import Replay
from ._retry import NO_RETRY, RetryPolicy
from ._serde import is_coroutine_function, return_hint
from .storage._records import (
    Attempt,
    EntryKind,
    IdempotentResult,
    InvocationRecord,
    JournalEntry,
    Write,
)

if TYPE_CHECKING:
    from ._runtime import Runtime

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
        "_live_guard",
        "_now",
        "_random",
        "_replay",
        "_rt",
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

    async def call(self, workflow: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run a child workflow and return its result, as one journaled step.

        The child's idempotency key is this step's key: a replayed or retried
        caller attaches to the same child instead of starting another.
        """
        wf = self._rt.workflow(workflow)

        async def call_child() -> Any:
            rec, _ = await self._rt.submit(wf, args, kwargs, idempotency_key=current_step().key)
            return await self._rt.client_handle(rec).result()

        call_child.__annotations__ = {"return": wf.return_hint}
        return await self.run(f"call {wf.name}", call_child, retry=_ONCE)

    async def start(self, workflow: Any, /, *args: Any, **kwargs: Any) -> str:
        """Start a child workflow without waiting; return its invocation id."""
        wf = self._rt.workflow(workflow)

        async def start_child() -> str:
            rec, _ = await self._rt.submit(wf, args, kwargs, idempotency_key=current_step().key)
            return rec.id

        return await self.run(f"start {wf.name}", start_child, retry=_ONCE)

    # -- steps -------------------------------------------------------------------

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
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
        **kwargs: Any,
    ) -> T: ...

    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as a journaled step and return its result.

        Sync functions run in the runtime's thread pool, async ones are
        awaited. Failures are retried by ``retry`` (the runtime's default if
        None); :class:`TerminalError` stops retrying. With
        ``idempotency_key``, the result is stored under ``(name, key)`` and
        any later step using the same name and key, in any invocation, gets
        it back without calling ``fn``.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"ctx.run: the step name must be a non-empty string, not {name!r}")
        if not callable(fn):
            raise TypeError(f"ctx.run({name!r}): {fn!r} is not callable")
        try:
            index, entry, failed = self._replay.take(EntryKind.STEP, name)
        except NonDeterminismError as exc:
            raise Suspended(exc) from None
        if entry is None and self._live_guard is not None:
            # Replay only (rebuilding state, a dry-run fork): nothing may run live.
            raise Suspended(self._live_guard(self.invocation_id, index, name))
        if entry is not None:
            self._now = entry.created_at
            self._rt.stats.steps_replayed += 1
            return self._outcome(entry, fn)
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
        raise exc

    async def _commit(self, write: Write) -> None:
        try:
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
            sent = await rt.send_actor(
                definition,
                key,
                handler,
                args,
                kwargs,
                idempotency_key=current_step().key,
                reply=True,
            )
            if isinstance(sent, InvocationRecord):
                return await rt.client_handle(sent).result()
            assert sent is not None
            return await sent

        ask_actor.__annotations__ = {"return": target.return_hint}
        return await self._ctx.run(f"ask {target.name} {key}", ask_actor, retry=_ONCE)

    async def tell(self, handler: Any, /, *args: Any, **kwargs: Any) -> str | None:
        """Send a message without waiting, as one journaled step.

        Returns the message's invocation id (None for a plain actor).
        """
        definition, key, rt = self._definition, self.key, self._ctx._rt
        target = definition.handler(handler)

        async def tell_actor() -> str | None:
            sent = await rt.send_actor(
                definition,
                key,
                handler,
                args,
                kwargs,
                idempotency_key=current_step().key,
                reply=False,
            )
            return sent.id if isinstance(sent, InvocationRecord) else None

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
