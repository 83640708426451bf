"""The ``ctx`` a workflow receives: journaled steps and deterministic helpers."""

from __future__ import annotations

import contextvars
import functools
import inspect
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ._errors import (
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
from ._retry import RetryPolicy
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

T = TypeVar("T")

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

    __slots__ = ("_now", "_random", "_replay", "_rt", "invocation_id", "workflow_name")

    def __init__(
        self,
        runtime: Runtime,
        invocation_id: str,
        workflow_name: str,
        replay: Replay,
        started_at: float,
    ) -> None:
        self._rt = runtime
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

    # -- steps -------------------------------------------------------------------

    async def run(
        self,
        name: str,
        fn: Callable[..., T],
        *args: Any,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> T:
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
        if entry is not None:
            self._now = entry.created_at
            self._rt.stats.steps_replayed += 1
            replayed: T = self._outcome(entry, fn)
            return replayed
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
