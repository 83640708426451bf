"""The client: start invocations and read their status and results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import msgspec

from ._errors import (
    ConfigurationError,
    InvocationCancelledError,
    InvocationFailedError,
    InvocationStoppedError,
    JournalDecodeError,
    NotFoundError,
    SerializationError,
)
from ._ids import new_id
from ._serde import input_hash
from ._workflow import Workflow
from .storage._records import EntryKind, InvocationRecord, JournalEntry, Status

if TYPE_CHECKING:
    from ._fork import ForkResult
    from ._runtime import Runtime

R = TypeVar("R")


def prepare_invocation(
    rt: Runtime,
    wf: Workflow[Any, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    idempotency_key: str | None,
    invocation_id: str | None,
    *,
    actor: tuple[str, str, int] | None = None,
    parent_id: str | None = None,
    deadline: float | None = None,
    partition: int | None = None,
) -> tuple[InvocationRecord, JournalEntry, tuple[list[Any], dict[str, Any]]]:
    """Check and encode a new invocation; nothing is written yet."""
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or not idempotency_key
    ):
        raise TypeError(f"idempotency_key must be a non-empty string, not {idempotency_key!r}")
    if invocation_id is not None and (not isinstance(invocation_id, str) or not invocation_id):
        raise TypeError(f"invocation_id must be a non-empty string, not {invocation_id!r}")
    wf.check_arguments(args, kwargs)
    what = f"input of {wf.kind} {wf.name!r}"
    payload = rt.codec.encode_input(args, kwargs, what)
    try:
        decoded = rt.codec.decode_input(payload, wf.hints, wf.params)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        raise SerializationError(
            f"{what} does not match the workflow's type hints: {exc}"
        ) from None
    now = rt.clock.now()
    invocation_id = invocation_id or new_id()
    if partition is None:
        from ._nodes import partition_of

        key = invocation_id if actor is None else f"{actor[0]}/{actor[1]}"
        partition = partition_of(key, rt.partitions)
    rec = InvocationRecord(
        id=invocation_id,
        target=wf.name,
        input_hash=input_hash(payload),
        idempotency_key=idempotency_key,
        status=Status.RUNNING,
        created_at=now,
        updated_at=now,
        actor_type=None if actor is None else actor[0],
        actor_key=None if actor is None else actor[1],
        actor_seq=None if actor is None else actor[2],
        parent_id=parent_id,
        deadline=deadline,
        partition=partition,
    )
    entry = JournalEntry(
        invocation_id=rec.id,
        index=0,
        kind=EntryKind.INPUT,
        name=wf.name,
        ok=True,
        payload=payload,
        type_tag=None,
        attempts=1,
        created_at=now,
    )
    return rec, entry, decoded


def _parked(task: asyncio.Future[Any]) -> bool:
    """The run that ``task`` was ended by parking (its invocation is suspended)."""
    return (
        task.done()
        and not task.cancelled()
        and task.exception() is None
        and task.result().status is Status.SUSPENDED
    )


class InvocationHandle(Generic[R]):
    """A started invocation: its id, its status and (awaitable) result."""

    __slots__ = ("_rt", "id", "target")

    def __init__(self, runtime: Runtime, invocation_id: str, target: str) -> None:
        self._rt = runtime
        self.id = invocation_id
        self.target = target

    def __repr__(self) -> str:
        return f"<InvocationHandle {self.id} {self.target!r}>"

    async def status(self) -> Status:
        """The invocation's current status."""
        return (await self.record()).status

    async def record(self) -> InvocationRecord:
        """The invocation's stored record: target, status, idempotency key, times, actor."""
        rec = await self._rt.store.get_invocation(self.id)
        if rec is None:
            raise NotFoundError(f"invocation {self.id} does not exist")
        return rec

    async def result(self, *, timeout: float | None = None) -> R:
        """Wait for the invocation to finish and return its result.

        Raises :class:`InvocationFailedError` (the cause attached) if it
        failed, and the reason if it stopped unfinished in this process
        (non-determinism, storage failure): it resumes on the next start.
        """
        async with asyncio.timeout(timeout):
            while True:
                task = self._rt.running(self.id)
                if task is None or _parked(task):
                    return await self._result_from_store()
                try:
                    outcome = await asyncio.shield(task)
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if task.cancelled() and not (current and current.cancelling()):
                        if self._rt._started and self._rt.running(self.id) is not task:
                            continue  # its partition moved: the new owner finishes it
                        raise InvocationStoppedError(self.id, None) from None
                    raise
                if outcome.status is Status.SUSPENDED or (
                    outcome.status is Status.RUNNING and outcome.error is None
                ):
                    continue  # parked, or its partition moved: wait for it to finish
                if outcome.status is Status.COMPLETED:
                    value: R = outcome.value
                    return value
                assert outcome.error is not None
                if outcome.status is Status.FAILED:
                    raise InvocationFailedError(self.id, self.target, outcome.error)
                if outcome.status is Status.CANCELLED:
                    raise outcome.error
                raise InvocationStoppedError(self.id, outcome.error)

    async def cancel(self, reason: str = "cancelled") -> None:
        """Cancel the invocation: :class:`perdure.Cancelled` is raised inside
        it at its next durable point (its ``finally`` blocks and compensations
        run) and its children are cancelled too. Asking again while it winds
        down changes nothing; a finished invocation raises ConflictError."""
        await self._rt.cancel(self.id, reason)

    async def signal(self, name: str, value: Any = None) -> None:
        """Send the signal ``name`` with ``value``; the invocation receives it
        with ``await ctx.signal(name)``. Signals of one name arrive in order;
        a signal sent before the invocation waits for it is kept."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a signal name must be a non-empty string, not {name!r}")
        payload, tag = self._rt.codec.encode(value, f"signal {name!r} to invocation {self.id}")
        await self._rt.send_signal(self.id, name, payload, tag)

    async def query(self, name: str, *, type: Any = None) -> Any:
        """The latest value the invocation published with ``ctx.publish(name, ...)``."""
        if await self._rt.store.get_invocation(self.id) is None:
            raise NotFoundError(f"invocation {self.id} does not exist")
        journal = await self._rt.store.read_journal(self.id)
        for entry in reversed(journal):
            if entry.kind is EntryKind.PUBLISH and entry.name == name:
                try:
                    return self._rt.codec.decode(entry.payload, entry.type_tag, type)
                except (ValueError, TypeError, AttributeError, ImportError) as exc:
                    raise JournalDecodeError(self.id, entry.index, str(exc)) from None
        raise NotFoundError(f"invocation {self.id} has published nothing named {name!r}")

    async def _result_from_store(self) -> R:
        store = self._rt.store
        # Nodes of a shared store announce every finish, so the poll is only
        # a fallback for an announcement lost with a connection.
        delay = 1.0 if self._rt.nodes is not None else 0.005
        while True:
            # Waiting before reading: a finish in between is not missed. A
            # finish here, or on another node of a shared store (which
            # announces it), sets the waiter; the poll is for the rest.
            waiter = self._rt.finish_waiter(self.id)
            try:
                rec = await store.get_invocation(self.id)
                if rec is None:
                    raise NotFoundError(f"invocation {self.id} does not exist")
                if rec.status.finished:
                    break
                task = self._rt.running(self.id)
                if task is not None and not _parked(task):  # it was resumed meanwhile
                    return await self.result()
                reason = self._rt.stopped_reason(self.id)
                if reason is not None:
                    raise InvocationStoppedError(self.id, reason)
                await asyncio.wait((waiter,), timeout=delay)
            finally:
                self._rt.drop_finish_waiter(self.id, waiter)
            delay = min(delay * 2, 1.0)
        journal = await store.read_journal(self.id)
        output = journal[-1] if journal and journal[-1].kind is EntryKind.OUTPUT else None
        if output is None:
            raise JournalDecodeError(self.id, len(journal), "the finished invocation has no output")
        codec = self._rt.codec
        if rec.status is Status.CANCELLED:
            summary = codec.error_summary(output.payload)
            raise InvocationCancelledError(
                self.id, self.target, str(summary.get("message", "cancelled"))
            )
        if not output.ok:
            raise InvocationFailedError(self.id, self.target, codec.decode_error(output.payload))
        wf = self._rt.workflows.get(rec.target)
        try:
            result: R = codec.decode(
                output.payload, output.type_tag, wf.return_hint if wf else None
            )
        except (ValueError, TypeError, AttributeError, ImportError) as exc:
            raise JournalDecodeError(self.id, output.index, str(exc)) from None
        return result


class ActorRef:
    """The address of one actor instance: its type and key.

    >>> account = rt.client.actor(Account, "alice")
    >>> balance = await account.ask(Account.deposit, 500)
    """

    __slots__ = ("_definition", "_rt", "key")

    def __init__(self, runtime: Runtime, definition: Any, key: str) -> None:
        self._rt = runtime
        self._definition = definition
        self.key = key

    def __repr__(self) -> str:
        return f"<ActorRef {self._definition.name}/{self.key}>"

    async def ask(
        self,
        handler: str | Callable[..., Any],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Send a message and wait for the handler's reply."""
        if not self._definition.durable:
            reply = self._rt.post_plain(
                self._definition, self.key, handler, args, kwargs, reply=True
            )
            assert reply is not None
            return await reply
        sent = await self._rt.send_actor(
            self._definition,
            self.key,
            handler,
            args,
            kwargs,
            idempotency_key=idempotency_key,
            reply=True,
        )
        if isinstance(sent, InvocationRecord):
            return await InvocationHandle[Any](self._rt, sent.id, sent.target).result()
        assert sent is not None
        return await sent

    async def tell(
        self,
        handler: str | Callable[..., Any],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        delay: timedelta | None = None,
        **kwargs: Any,
    ) -> InvocationHandle[Any] | None:
        """Send a message without waiting for it to be handled.

        For a durable actor, returns once the message is recorded, with a
        handle to its invocation; for a plain actor, returns None at once.
        With ``delay``, the message is recorded now and delivered once the
        delay has passed, also across restarts; the handle is the delivery's.
        """
        if delay is not None:
            rec = await self._rt.send_later(
                self._definition,
                self.key,
                handler,
                args,
                kwargs,
                delay,
                idempotency_key=idempotency_key,
            )
            return InvocationHandle(self._rt, rec.id, rec.target)
        sent = await self._rt.send_actor(
            self._definition,
            self.key,
            handler,
            args,
            kwargs,
            idempotency_key=idempotency_key,
            reply=False,
        )
        if isinstance(sent, InvocationRecord):
            return InvocationHandle(self._rt, sent.id, sent.target)
        return None

    # -- time travel (durable actors) ------------------------------------------

    def _durable(self) -> Any:
        if not self._definition.durable:
            raise ConfigurationError(
                f"actor {self._definition.name} keeps no history: give it a DurabilityFacet"
            )
        return self._definition

    async def history(self) -> list[InvocationRecord]:
        """Every message this actor received, in the order it handled them."""
        return await self._rt.store.list_actor_messages(self._durable().name, self.key)

    async def state_at(self, seq: int | None = None) -> Any:
        """The state after message ``seq`` of the history (the latest if None).

        Rebuilt from the nearest checkpoint plus a replay of the messages
        after it: handlers run again, every step comes from the journal, no
        external call is made and nothing is written.
        """
        from ._actor import rebuild

        if seq is not None and (not isinstance(seq, int) or seq < 0):
            raise ValueError(f"seq must be a message's position (>= 0), not {seq!r}")
        rebuilt = await rebuild(self._rt, self._durable(), self.key, upto_seq=seq)
        return rebuilt.instance.state

    async def diff(self, before: int, after: int | None = None) -> dict[str, tuple[Any, Any]]:
        """What changed in the state between message ``before`` and ``after``."""
        from ._actor import state_diff

        return state_diff(await self.state_at(before), await self.state_at(after))


class Client:
    """Starts workflows and finds invocations. Get one from ``runtime.client``."""

    async def fork(
        self, invocation_id: str, *, upto: int | None = None, live: bool = False
    ) -> ForkResult:
        """Re-run an invocation from its journal entries before ``upto`` against
        the current code, in a sandbox; the original is not touched.

        Without ``live``, the fork stops before the first step that is not in
        the prefix (no external call is made) and reports it.
        """
        from ._fork import fork

        return await fork(self._rt, invocation_id, upto=upto, live=live)

    async def resolve_promise(self, promise_id: str, value: Any = None) -> None:
        """Resolve a durable promise (``ctx.promise()``'s ``p.id``) with ``value``.

        The workflow waiting for it resumes, also if it was resolved while no
        process ran it. An unknown promise raises NotFoundError, one already
        settled ConflictError: a promise settles once.
        """
        payload, tag = self._rt.codec.encode(value, f"value of promise {promise_id}")
        await self._rt.settle_promise(promise_id, True, payload, tag)

    async def reject_promise(self, promise_id: str, message: str) -> None:
        """Reject a durable promise: its ``await`` raises ``TerminalError(message)``."""
        from ._errors import TerminalError

        payload = self._rt.codec.encode_error(TerminalError(message))
        await self._rt.settle_promise(promise_id, False, payload, None)

    async def cancel(self, invocation_id: str, reason: str = "cancelled") -> None:
        """Cancel an invocation; see :meth:`InvocationHandle.cancel`."""
        await self._rt.cancel(invocation_id, reason)

    async def journal(self, invocation_id: str) -> list[JournalEntry]:
        """An invocation's journal, entry by entry (time travel)."""
        if await self._rt.store.get_invocation(invocation_id) is None:
            raise NotFoundError(f"invocation {invocation_id} does not exist")
        return await self._rt.store.read_journal(invocation_id)

    def actor(self, actor_type: Any, key: str) -> ActorRef:
        """The address of the actor of ``actor_type`` (class or name) with ``key``."""
        return ActorRef(self._rt, self._rt.actor(actor_type), key)

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    @overload
    async def start(
        self,
        workflow: Workflow[Any, R],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> InvocationHandle[R]: ...

    @overload
    async def start(
        self,
        workflow: str | Callable[..., Any],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> InvocationHandle[Any]: ...

    async def start(
        self,
        workflow: Any,
        /,
        *args: Any,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: timedelta | None = None,
        **kwargs: Any,
    ) -> InvocationHandle[Any]:
        """Start ``workflow(*args, **kwargs)`` durably and return its handle.

        Returns once the invocation is recorded. With ``idempotency_key``, a
        second start with the same key (concurrent or later) attaches to the
        first invocation instead of starting another; the same key with a
        different input raises :class:`IdempotencyConflictError`. With
        ``timeout``, the invocation is cancelled if it has not finished by
        then (its children inherit the deadline).
        """
        rec, _ = await self._rt.submit(
            workflow,
            args,
            kwargs,
            idempotency_key=idempotency_key,
            invocation_id=invocation_id,
            timeout=timeout,
        )
        return InvocationHandle(self._rt, rec.id, rec.target)

    @overload
    async def run(
        self,
        workflow: Workflow[Any, R],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> R: ...

    @overload
    async def run(
        self,
        workflow: str | Callable[..., Any],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> Any: ...

    async def run(
        self, workflow: Any, /, *args: Any, idempotency_key: str | None = None, **kwargs: Any
    ) -> Any:
        """Start a workflow and wait for its result."""
        handle = await self.start(workflow, *args, idempotency_key=idempotency_key, **kwargs)
        return await handle.result()

    async def get(self, invocation_id: str) -> InvocationHandle[Any]:
        """A handle to an existing invocation; raises NotFoundError if none."""
        rec = await self._rt.store.get_invocation(invocation_id)
        if rec is None:
            raise NotFoundError(f"invocation {invocation_id} does not exist")
        return InvocationHandle(self._rt, rec.id, rec.target)

    async def list(
        self,
        *,
        status: Status | str | None = None,
        workflow: str | None = None,
        limit: int | None = 100,
    ) -> list[InvocationRecord]:
        """Invocations, oldest first, filtered by status and workflow name."""
        try:
            statuses = None if status is None else [Status(status)]
        except ValueError:
            known = ", ".join(s.value for s in Status)
            raise ValueError(f"unknown status {status!r}; use one of: {known}") from None
        return await self._rt.store.list_invocations(
            statuses=statuses, target=workflow, limit=limit
        )

    async def wait_idle(self, *, timeout: float | None = None) -> None:
        """Wait until no invocation is running in this process."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            tasks = [t for t in self._rt._tasks.values() if not t.done()]
            if not tasks:
                return
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise TimeoutError("invocations are still running")
            await asyncio.wait(tasks, timeout=remaining)
