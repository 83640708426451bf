"""The runtime: runs invocations, recovers them, owns the store."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import msgspec

from ._actor import Activation, Actor, ActorDef, _Pending
from ._clock import Clock, SystemClock
from ._context import (
    Context,
    LiveGuard,
    PlainContext,
    _current_context,
    completed_message_guard,
)
from ._errors import (
    Cancelled,
    ConfigurationError,
    ConflictError,
    FencedError,
    ForkStoppedError,
    IdempotencyConflictError,
    InvocationCancelledError,
    InvocationStoppedError,
    JournalDecodeError,
    NonDeterminismError,
    NotFoundError,
    Parked,
    PerdureError,
    SerializationError,
    StorageError,
    Suspended,
    UnknownWorkflowError,
)
from ._hooks import BatchCommit, Hooks, InvocationEnd, InvocationInfo, fire
from ._journal import Replay
from ._nodes import LeaseKeeper, NodeConfig, partition_of
from ._pool import StepPool
from ._retry import RetryPolicy
from ._schedule import INTERNAL_WORKFLOWS, Schedule, schedule_link
from ._serde import Codec
from ._timers import TimerService
from ._workflow import Workflow, as_workflow
from .storage import DEFAULT_URL, Store, open_store
from .storage._records import (
    UNFINISHED,
    Attempt,
    CancelRequest,
    EntryKind,
    Fence,
    InvocationRecord,
    JournalEntry,
    Resolution,
    SignalRecord,
    Status,
    StatusChange,
    Wake,
    Write,
)

log = logging.getLogger("perdure.runtime")

DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
DEFAULT_RETRY = RetryPolicy()


@dataclasses.dataclass(slots=True)
class RuntimeStats:
    """Counters of what this runtime did since it started."""

    steps_executed: int = 0
    steps_replayed: int = 0
    steps_deduplicated: int = 0
    step_retries: int = 0
    invocations_started: int = 0
    invocations_completed: int = 0
    invocations_failed: int = 0
    invocations_suspended: int = 0
    invocations_recovered: int = 0
    actors_recovered: int = 0
    actor_messages_replayed: int = 0
    recovery_seconds: float = 0.0
    invocations_parked: int = 0
    invocations_resumed: int = 0
    invocations_cancelled: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How an invocation's run in this process ended."""

    status: Status
    value: Any = None
    error: BaseException | None = None
    # A completed invocation's encoded result, for a parent reading it.
    payload: bytes | None = None
    type_tag: str | None = None


class Runtime:
    """Runs durable workflows on a store.

    >>> async with Runtime("sqlite:///payments.db", workflows=[process_payment]) as rt:
    ...     result = await rt.client.run(process_payment, request, idempotency_key="pay-1")

    On start it resumes every unfinished invocation from its journal.
    Only one runtime may run on a SQLite file at a time.
    """

    def __init__(
        self,
        store: str | Store = DEFAULT_URL,
        *,
        workflows: Iterable[Workflow[Any, Any] | Callable[..., Awaitable[Any]]] = (),
        default_retry: RetryPolicy = DEFAULT_RETRY,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        clock: Clock | None = None,
        hooks: Hooks | None = None,
        max_step_threads: int = 64,
        recover: bool = True,
        actors: Iterable[type[Actor[Any]]] = (),
        actor_idle_seconds: float = 60.0,
        timer_lead: timedelta = timedelta(seconds=3),
        always_replay: bool = False,
        schedules: Iterable[Schedule] = (),
        node: NodeConfig | None = None,
    ) -> None:
        from ._client import Client

        if not isinstance(default_retry, RetryPolicy):
            raise ConfigurationError(f"default_retry must be a RetryPolicy, not {default_retry!r}")
        if not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
            raise ConfigurationError(
                f"max_payload_bytes must be a positive int, not {max_payload_bytes!r}"
            )
        if not isinstance(timer_lead, timedelta) or timer_lead < timedelta(0):
            raise ConfigurationError(
                f"timer_lead must be a non-negative timedelta, not {timer_lead!r}"
            )
        self.hooks = hooks or Hooks()
        if isinstance(store, str):
            batch_hook = self.hooks.before_batch_commit
            # One runtime per store, unless it is one node of several on a
            # shared database: then the leases divide the work.
            shared = node is not None and store.lower().startswith("postgres")
            store = open_store(
                store,
                exclusive=not shared,
                before_commit=None if batch_hook is None else functools.partial(fire, batch_hook),
                after_commit=self._after_batch_commit,
            )
        elif not isinstance(store, Store):
            raise ConfigurationError(
                f"store must be a URL string or a perdure.storage.Store, not {type(store).__name__}"
            )
        self.store: Store = store
        self.default_retry = default_retry
        self.codec = Codec(max_payload_bytes=max_payload_bytes)
        self.clock: Clock = clock or SystemClock()
        self.stats = RuntimeStats()
        # Per-runtime state of optional add-ons (perdure.observability), by name.
        self.extensions: dict[str, Any] = {}
        self.client = Client(self)
        self._recover = recover
        self._max_step_threads = max_step_threads
        self._pool: StepPool | None = None
        self._workflows: dict[str, Workflow[Any, Any]] = {}
        for wf in (*INTERNAL_WORKFLOWS, *workflows):
            self.register(wf)
        self.schedules: dict[str, Schedule] = {}
        for schedule in schedules:
            if not isinstance(schedule, Schedule):
                raise ConfigurationError(f"schedules must be perdure.Schedule, not {schedule!r}")
            if schedule.key in self.schedules:
                raise ConfigurationError(
                    f"two schedules are named {schedule.key!r}; give one another name="
                )
            self.register(schedule.workflow)
            self.schedules[schedule.key] = schedule
        self._actors: dict[str, ActorDef] = {}
        for cls in actors:
            self.register_actor(cls)
        self.actor_idle_seconds = actor_idle_seconds
        self._activations: dict[tuple[str, str], Activation] = {}
        self._queued: dict[str, asyncio.Future[Outcome]] = {}
        # Set in a fork's sandbox runtime: what stops a step from running live.
        self._live_guard: LiveGuard | None = None
        self._tasks: dict[str, asyncio.Task[Outcome]] = {}
        # Invocations that stopped unfinished in this process, and why.
        self._stopped: dict[str, BaseException] = {}
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # A sleep due within the lead waits in memory; the timer service
        # resumes a parked invocation this long before it is due.
        self.timer_lead = timer_lead.total_seconds()
        # Testing: after every durable point, restart the invocation from its
        # journal, so that non-deterministic code fails at once.
        self.always_replay = always_replay
        self.timers = TimerService(self)
        if node is not None and not isinstance(node, NodeConfig):
            raise ConfigurationError(f"node must be a perdure.NodeConfig, not {node!r}")
        # Several nodes on one store: this node runs the partitions it leases.
        self.nodes = None if node is None else LeaseKeeper(self, node)
        self.partitions = 1 if node is None else node.partitions
        # The contexts of the invocations running here, to wake their waits.
        self._contexts: dict[str, Context] = {}
        # Invocations woken while they ran here: if one parks, look at once.
        self._notified: set[str] = set()
        # Cancellations that arrived before the invocation's context existed.
        self._early_cancels: dict[str, str] = {}
        # Callers waiting for an invocation that is parked here to finish.
        self._finish_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._started = False

    # -- registration ------------------------------------------------------------

    def register(
        self, wf: Workflow[Any, Any] | Callable[..., Awaitable[Any]]
    ) -> Workflow[Any, Any]:
        """Register a workflow (before or after start)."""
        definition = as_workflow(wf)
        existing = self._workflows.get(definition.name)
        if existing is not None and existing.fn is not definition.fn:
            raise ConfigurationError(
                f"two different workflows are registered as {definition.name!r}; "
                "give one another name with @workflow(name=...)"
            )
        self._workflows[definition.name] = definition
        return definition

    def register_actor(self, cls: type[Actor[Any]]) -> ActorDef:
        """Register an actor type (before or after start)."""
        definition = ActorDef(cls)
        existing = self._actors.get(definition.name)
        if existing is not None and existing.cls is not cls:
            raise ConfigurationError(
                f"two different actor types are registered as {definition.name!r}; "
                "set actor_name on one of them"
            )
        self._actors[definition.name] = definition
        return definition

    def actor(self, target: str | type[Actor[Any]]) -> ActorDef:
        """The registered actor type for a name or class."""
        name = target if isinstance(target, str) else getattr(target, "actor_name", None)
        if name is None and isinstance(target, type):
            name = target.__qualname__
        found = self._actors.get(name) if isinstance(name, str) else None
        if found is None:
            known = ", ".join(sorted(self._actors)) or "none"
            raise UnknownWorkflowError(
                f"no actor type named {name or target!r} is registered with this runtime "
                f"(registered: {known}); pass it in Runtime(actors=[...])"
            )
        return found

    def workflow(self, target: str | Workflow[Any, Any] | Callable[..., Any]) -> Workflow[Any, Any]:
        """The registered workflow for a name or definition."""
        name = target if isinstance(target, str) else getattr(target, "name", None)
        if name is None and callable(target):
            name = getattr(target, "__qualname__", None)
        wf = self._workflows.get(name) if isinstance(name, str) else None
        if wf is None:
            known = ", ".join(sorted(self.workflows)) or "none"
            raise UnknownWorkflowError(
                f"no workflow named {name or target!r} is registered with this runtime "
                f"(registered: {known}); pass it in Runtime(workflows=[...])"
            )
        return wf

    @property
    def workflows(self) -> dict[str, Workflow[Any, Any]]:
        """The registered workflows, without Perdure's own (``perdure.*``)."""
        return {n: w for n, w in self._workflows.items() if not n.startswith("perdure.")}

    @property
    def actors(self) -> dict[str, ActorDef]:
        """The registered actor types, by name."""
        return dict(self._actors)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and resume unfinished invocations."""
        if self._started:
            return
        await self.store.open()
        if self.nodes is not None:
            self.store.on_wake(self._woken_elsewhere)
        self._pool = StepPool(asyncio.get_running_loop(), self._max_step_threads)
        self._started = True
        if self._recover:
            try:
                if self.nodes is None:
                    await self.recover()
                    self.timers.start()
                else:
                    self.timers.start()
                    await self.nodes.start()  # takes partitions over, resuming their work
            except BaseException:
                await self.stop()
                raise
            try:
                for schedule in self.schedules.values():
                    await schedule_link(self, schedule, schedule.next_after(self.clock.now()))
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        """Stop running invocations (they resume on the next start) and close."""
        if not self._started:
            return
        self._started = False
        if self.nodes is not None:
            await self.nodes.stop()
        await self.timers.stop()
        tasks = [a.task for a in self._activations.values()] + list(self._tasks.values())
        self._activations.clear()
        for waiter in self._queued.values():
            waiter.cancel()
        self._queued.clear()
        for waiters in self._finish_waiters.values():
            for w in waiters:
                w.cancel()
        self._finish_waiters.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.nodes is not None and self.nodes.owned:
            await self.nodes.release()
        await self.store.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def pool(self) -> StepPool:
        """The threads that run sync steps."""
        if self._pool is None:
            raise ConfigurationError("the runtime is not started: use 'async with Runtime(...)'")
        return self._pool

    def _check_started(self) -> None:
        if not self._started:
            raise ConfigurationError(
                "the runtime is not started: use 'async with Runtime(...) as rt' "
                "or await rt.start()"
            )

    async def recover(self, partitions: Sequence[int] | None = None) -> int:
        """Resume every unfinished invocation (of ``partitions``) from its journal;
        return how many."""
        began = time.perf_counter()
        records = await self.store.list_invocations(statuses=UNFINISHED, partitions=partitions)
        runnable: list[tuple[InvocationRecord, Workflow[Any, Any]]] = []
        actors: set[tuple[str, str]] = set()
        for rec in records:
            if rec.id in self._tasks or rec.status is Status.SUSPENDED:
                continue  # the suspended resume when due: the timer service
            if rec.actor_type is not None and rec.actor_key is not None:
                if rec.actor_type in self._actors:
                    actors.add((rec.actor_type, rec.actor_key))
                else:
                    self._suspended(
                        rec,
                        UnknownWorkflowError(
                            f"invocation {rec.id} cannot resume: actor type {rec.actor_type!r} "
                            "is not registered with this runtime; register it and restart"
                        ),
                    )
                continue
            wf = self._workflows.get(rec.target)
            if wf is None:
                self._suspended(
                    rec,
                    UnknownWorkflowError(
                        f"invocation {rec.id} cannot resume: workflow {rec.target!r} is not "
                        "registered with this runtime; register it and restart"
                    ),
                )
                continue
            runnable.append((rec, wf))
        resumed = await self._relaunch(runnable)
        for actor_type, key in sorted(actors):
            activation = self.activation(self._actors[actor_type], key)
            try:
                await asyncio.shield(activation.ready)
            except Exception as exc:
                # This actor cannot resume (a handler was removed, a journal
                # is unreadable): its messages stop, the runtime goes on.
                for rec in records:
                    if rec.actor_type == actor_type and rec.actor_key == key:
                        self._suspended(rec, exc)
        self.stats.invocations_recovered += resumed
        self.stats.recovery_seconds = time.perf_counter() - began
        if resumed:
            log.info(
                "resumed %d unfinished invocations in %.3fs", resumed, self.stats.recovery_seconds
            )
        return resumed

    # -- invocations -------------------------------------------------------------

    async def submit(
        self,
        target: str | Workflow[Any, Any] | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        invocation_id: str | None = None,
        timeout: timedelta | None = None,
        partition: int | None = None,
        parent_id: str | None = None,
    ) -> tuple[InvocationRecord, bool]:
        """Record and start an invocation. Returns (record, created)."""
        from ._client import prepare_invocation

        self._check_started()
        wf = self.workflow(target)
        deadline = None
        if timeout is not None:
            if not isinstance(timeout, timedelta) or timeout <= timedelta(0):
                raise TypeError(f"timeout must be a positive timedelta, not {timeout!r}")
            deadline = self.clock.now() + timeout.total_seconds()
        rec, entry, decoded = prepare_invocation(
            self,
            wf,
            args,
            kwargs,
            idempotency_key,
            invocation_id,
            deadline=deadline,
            partition=partition,
            parent_id=parent_id,
        )
        return await self.create(wf, rec, entry, decoded)

    async def create(
        self,
        wf: Workflow[Any, Any],
        rec: InvocationRecord,
        entry: JournalEntry,
        decoded: tuple[list[Any], dict[str, Any]],
    ) -> tuple[InvocationRecord, bool]:
        """Record a prepared invocation and start it. Returns (record, created)."""
        self._check_started()
        if not self.owns(rec.partition):
            # Another node runs this partition: record it as due now, for its owner.
            rec = msgspec.structs.replace(rec, status=Status.SUSPENDED, wake_at=rec.created_at)
        stored, created = await self.store.create_invocation(rec, entry)
        if not created and stored.input_hash != rec.input_hash:
            raise IdempotencyConflictError(
                f"idempotency key {rec.idempotency_key!r} of workflow {wf.name!r} was already "
                f"used by invocation {stored.id} with a different input; use a new key "
                "for a different request"
            )
        if created and stored.status is not Status.SUSPENDED:
            self.stats.invocations_started += 1
            if self.hooks.invocation_created is not None:
                fire(self.hooks.invocation_created, stored)
            self._launch(stored, wf, [entry], [], decoded)
        return stored, created

    # -- partitions (several nodes) ------------------------------------------------

    def _woken_elsewhere(self, partition: int | None, finished: str | None) -> None:
        """The store says something in ``partition`` became due (maybe by
        another node), maybe because the invocation ``finished`` did: whoever
        waits for that one here looks again at once."""
        if not self._started:
            return
        if finished is not None:
            self._wake_finish_waiters(finished)
        if partition is not None and self.owns(partition):
            self.timers.kick()

    def owns(self, partition: int) -> bool:
        """Whether this node runs ``partition`` (a single node runs them all)."""
        return self.nodes is None or partition in self.nodes.owned

    def fence(self, partition: int) -> Fence | None:
        """What a write of ``partition``'s work must carry (None on a single node)."""
        return None if self.nodes is None else self.nodes.fence(partition)

    def actor_partition(self, actor_type: str, key: str) -> int:
        return partition_of(f"{actor_type}/{key}", self.partitions)

    async def take_over(self, partitions: Sequence[int]) -> None:
        """This node now holds ``partitions``: resume their unfinished work."""
        await self.recover(partitions)
        self.timers.kick()

    async def retry_stopped(self) -> int:
        """Relaunch what stopped here on a storage error (a full disk, the
        database went away) and is still ours: workflows go on from their
        journals, and an actor whose mailbox stopped is activated again (it
        reloads and resumes its unfinished messages). The timer service calls
        this once the store answers again. Returns how many were relaunched."""
        stopped = [
            i
            for i, reason in self._stopped.items()
            if isinstance(reason, StorageError) and i not in self._tasks
        ]
        if not stopped:
            return 0
        runnable = []
        actors: set[tuple[str, str]] = set()
        for invocation_id in stopped:
            rec = await self.store.get_invocation(invocation_id)
            if rec is None or rec.status.finished or not self.owns(rec.partition):
                self._stopped.pop(invocation_id, None)  # done, or another node's now
                continue
            if rec.actor_type is not None and rec.actor_key is not None:
                self._stopped.pop(invocation_id, None)
                if rec.actor_type in self._actors:
                    actors.add((rec.actor_type, rec.actor_key))
                continue
            wf = self._workflows.get(rec.target)
            if wf is not None and rec.status is not Status.SUSPENDED:
                runnable.append((rec, wf))
        launched = await self._relaunch(runnable)
        for actor_type, key in sorted(actors):
            self.activation(self._actors[actor_type], key)
        return launched + len(actors)

    def drop_partitions(self, partitions: set[int]) -> None:
        """This node lost ``partitions``: stop their work here, writing nothing.
        The new owner resumes it from the journal."""
        for invocation_id, ctx in list(self._contexts.items()):
            if ctx._partition in partitions:
                task = self._tasks.get(invocation_id)
                if task is not None:
                    task.cancel()
        for (actor_type, key), activation in list(self._activations.items()):
            if self.actor_partition(actor_type, key) in partitions:
                activation.abandon()

    # -- suspension, wake-ups, cancellation ----------------------------------------

    async def resume(self, records: Sequence[InvocationRecord]) -> int:
        """Resume suspended invocations that are due: claim them, replay them."""
        mine = [r for r in records if r.id not in self._tasks]
        runnable: list[tuple[InvocationRecord, Workflow[Any, Any]]] = []
        for rec in mine:
            wf = self._workflows.get(rec.target)
            if wf is None:
                # Leave it suspended, but not due again and again.
                log.error(
                    "invocation %s cannot resume: workflow %r is not registered with this "
                    "runtime; register it and restart",
                    rec.id,
                    rec.target,
                )
                self._suspended(rec, UnknownWorkflowError(f"workflow {rec.target!r} is unknown"))
                await self.store.commit(
                    Write(
                        status=StatusChange(
                            invocation_id=rec.id,
                            status=Status.SUSPENDED,
                            updated_at=self.clock.now(),
                            last_error=f"workflow {rec.target!r} is not registered",
                        )
                    )
                )
                continue
            runnable.append((rec, wf))
        if not runnable:
            return 0
        now = self.clock.now()
        claims = [
            self.store.commit(
                Write(
                    status=StatusChange(invocation_id=r.id, status=Status.RUNNING, updated_at=now),
                    fence=self.fence(r.partition),
                )
            )
            for r, _ in runnable
        ]
        outcomes = await asyncio.gather(*claims, return_exceptions=True)
        claimed = []
        for (rec, wf), outcome in zip(runnable, outcomes, strict=True):
            if isinstance(outcome, FencedError) and self.nodes is not None:
                self.nodes.lost(outcome.partition)
            elif isinstance(outcome, BaseException):
                log.error("invocation %s could not be resumed: %s", rec.id, outcome)
            else:
                claimed.append((rec, wf))
        runnable = claimed
        self.stats.invocations_resumed += len(runnable)
        return await self._relaunch(runnable)

    async def _relaunch(
        self, runnable: Sequence[tuple[InvocationRecord, Workflow[Any, Any]]]
    ) -> int:
        """Read the journals of ``runnable`` in bulk and run each from its
        journal; one that cannot be decoded stops alone. Returns how many run."""
        journals = await self._read_journals([rec.id for rec, _ in runnable])
        launched = 0
        for rec, wf in runnable:
            found = journals[rec.id]
            if isinstance(found, JournalDecodeError):
                self._suspended(rec, found)
                continue
            self._launch(rec, wf, found[0], found[1], None)
            launched += 1
        return launched

    def notify(self, invocation_id: str) -> None:
        """Something an invocation may wait for happened (the store already
        recorded its wake-up): wake it if it waits here, else look for it."""
        ctx = self._contexts.get(invocation_id)
        if ctx is not None:
            self._notified.add(invocation_id)
            ctx._notify()
        else:
            self.timers.kick()

    async def cancel(self, invocation_id: str, reason: str = "cancelled") -> None:
        """Ask an invocation to cancel; delivered at its next durable point."""
        self._check_started()
        if not isinstance(reason, str) or not reason:
            raise TypeError(f"a cancellation reason must be a non-empty string, not {reason!r}")
        await self.store.commit(
            Write(
                cancels=(
                    CancelRequest(invocation_id=invocation_id, reason=reason, at=self.clock.now()),
                )
            )
        )
        ctx = self._contexts.get(invocation_id)
        if ctx is not None:
            if ctx._cancel is None:
                ctx._cancel = reason
        else:
            # Not running here yet, but it may be about to start from a record
            # read before this request committed (the timer service resuming
            # it): the context it gets takes the reason from here.
            self._early_cancels.setdefault(invocation_id, reason)
        self.notify(invocation_id)

    async def cancel_children(self, child_ids: Sequence[str], reason: str) -> None:
        """Cancel the children that have not finished; ignore those that have."""

        async def one(child_id: str) -> None:
            try:
                await self.cancel(child_id, reason)
            except (ConflictError, NotFoundError):
                pass  # finished, or never created

        await asyncio.gather(*(one(c) for c in child_ids))

    async def settle_promise(
        self, promise_id: str, ok: bool, payload: bytes, type_tag: str | None
    ) -> None:
        self._check_started()
        found = await self.store.get_promise(promise_id)
        if found is None:
            raise NotFoundError(
                f"promise {promise_id} does not exist; promise ids are what ctx.promise() "
                "returned (p.id)"
            )
        if ok and found.state == "pending" and found.type_tag is not None:
            self._check_promise_value(found.id, found.type_tag, payload, type_tag)
        await self.store.commit(
            Write(
                resolution=Resolution(
                    promise_id=promise_id,
                    ok=ok,
                    payload=payload,
                    type_tag=type_tag,
                    at=self.clock.now(),
                )
            )
        )
        self.notify(found.invocation_id)

    def _check_promise_value(
        self, promise_id: str, expected: str, payload: bytes, type_tag: str | None
    ) -> None:
        """Refuse a value the waiting workflow could not read back as its type."""
        from ._serde import resolve_name

        try:
            hint = resolve_name(expected)
        except (ImportError, AttributeError):
            return  # the type is not importable here: the workflow's node decides
        try:
            self.codec.decode(payload, type_tag, hint)
        except (ValueError, TypeError, AttributeError, ImportError, PerdureError) as exc:
            raise SerializationError(
                f"promise {promise_id} expects a {getattr(hint, '__qualname__', hint)}, and "
                f"this value does not read back as one ({exc}); nothing was recorded: resolve "
                "it with a value of that type"
            ) from None

    async def send_signal(
        self, invocation_id: str, name: str, payload: bytes, type_tag: str | None
    ) -> int:
        self._check_started()
        seq: int = await self.store.commit(
            Write(
                signal=SignalRecord(
                    invocation_id=invocation_id,
                    name=name,
                    payload=payload,
                    type_tag=type_tag,
                    created_at=self.clock.now(),
                )
            )
        )
        self.notify(invocation_id)
        return seq

    async def _park(self, rec: InvocationRecord, wake_at: float | None) -> Outcome:
        """Record an invocation as suspended until ``wake_at`` (or until woken)."""
        try:
            await self.store.commit(
                Write(
                    status=StatusChange(
                        invocation_id=rec.id,
                        status=Status.SUSPENDED,
                        updated_at=self.clock.now(),
                        wake_at=wake_at,
                    ),
                    fence=self.fence(rec.partition),
                )
            )
        except PerdureError as exc:
            return self._suspended(rec, exc)
        self.stats.invocations_parked += 1
        if rec.id in self._notified:
            self.timers.kick()  # woken while it ran: its wake-up is due now
        self.timers.schedule(wake_at)
        return Outcome(Status.SUSPENDED)

    def finish_waiter(self, invocation_id: str) -> asyncio.Future[None]:
        """A future set when the invocation next finishes or stops here."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finish_waiters.setdefault(invocation_id, []).append(waiter)
        return waiter

    def drop_finish_waiter(self, invocation_id: str, waiter: asyncio.Future[None]) -> None:
        """Forget a waiter whose caller stopped waiting (a poll's timeout, a
        cancellation): kept, it would stay until the invocation finishes."""
        waiter.cancel()
        waiters = self._finish_waiters.get(invocation_id)
        if waiters is None:
            return
        try:
            waiters.remove(waiter)
        except ValueError:
            pass
        if not waiters:
            del self._finish_waiters[invocation_id]

    def _wake_finish_waiters(self, invocation_id: str) -> None:
        for waiter in self._finish_waiters.pop(invocation_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _launch(
        self,
        rec: InvocationRecord,
        wf: Workflow[Any, Any],
        journal: list[JournalEntry],
        attempts: list[Attempt],
        decoded: tuple[list[Any], dict[str, Any]] | None,
        activation: Activation | None = None,
    ) -> asyncio.Task[Outcome]:
        task = asyncio.create_task(
            self._execute(rec, wf, journal, attempts, decoded, activation),
            name=f"perdure:{rec.id}",
        )
        self._tasks[rec.id] = task
        self._stopped.pop(rec.id, None)
        task.add_done_callback(functools.partial(self._forget, rec.id))
        return task

    # -- actors --------------------------------------------------------------------

    def activation(self, definition: ActorDef, key: str) -> Activation:
        """The live instance of an actor, activated on first use."""
        self._check_started()
        found = self._activations.get((definition.name, key))
        if found is None:
            found = Activation(self, definition, key)
            self._activations[(definition.name, key)] = found
        return found

    def _forget_activation(self, activation: Activation) -> None:
        ident = (activation.definition.name, activation.key)
        if self._activations.get(ident) is activation:
            del self._activations[ident]

    def _plain_context(self, activation: Activation) -> PlainContext:
        return PlainContext(self, activation.key)

    async def send_actor(
        self,
        definition: ActorDef,
        key: str,
        handler_name: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        reply: bool,
    ) -> InvocationRecord | asyncio.Future[Any] | None:
        """Deliver a message. Durable: returns its invocation record once it is
        recorded. Plain: returns a future of the reply (None if ``reply`` is
        false)."""
        from ._client import prepare_invocation

        if not definition.durable:
            return self.post_plain(definition, key, handler_name, args, kwargs, reply=reply)
        if not isinstance(key, str) or not key:
            raise TypeError(f"an actor key must be a non-empty string, not {key!r}")
        handler = definition.handler(handler_name)
        if self.nodes is not None:
            partition = self.actor_partition(definition.name, key)
            if not self.owns(partition):
                # Another node runs this actor: hand the message to it, durably.
                from ._schedule import DELIVER_WORKFLOW

                sender = _current_context.get(None)

                handler.check_arguments(args, kwargs)
                rec, _ = await self.submit(
                    DELIVER_WORKFLOW,
                    (
                        definition.name,
                        key,
                        handler.name.rpartition(".")[2],
                        list(args),
                        kwargs,
                        0.0,
                        reply,
                        idempotency_key,
                    ),
                    {},
                    idempotency_key=idempotency_key,
                    partition=partition,
                    # The sending invocation, if any, is its parent: its end
                    # wakes the sender's node at once (no polling).
                    parent_id=None if sender is None else sender.invocation_id,
                )
                return rec
        activation = self.activation(definition, key)
        if activation.stopped is not None and not activation.task.done():
            # Stopped on a storage error, finishing the message in flight:
            # once it has, a new activation reloads the mailbox from the store.
            await asyncio.shield(activation.task)
            activation = self.activation(definition, key)
        activation.sending += 1
        try:
            await asyncio.shield(activation.ready)
            if activation.stopped is not None:
                raise InvocationStoppedError(f"{definition.name}/{key}", activation.stopped)
            seq = activation.next_seq
            activation.next_seq += 1
            rec, entry, decoded = prepare_invocation(
                self,
                handler,
                args,
                kwargs,
                idempotency_key,
                None,
                actor=(definition.name, key, seq),
            )
            # Shielded: a sender cancelled while its message is being recorded
            # (its partition moved, its caller gave up) must not leave a
            # recorded message out of the mailbox, where nothing would run it.
            stored, created = await asyncio.shield(
                self._record_message(activation, handler, rec, entry, decoded)
            )
            if not created and stored.input_hash != rec.input_hash:
                raise IdempotencyConflictError(
                    f"idempotency key {idempotency_key!r} of {handler.name!r} was already used "
                    f"by invocation {stored.id} with a different input; use a new key"
                )
            return stored
        finally:
            activation.sending -= 1

    async def _record_message(
        self,
        activation: Activation,
        handler: Workflow[Any, Any],
        rec: InvocationRecord,
        entry: JournalEntry,
        decoded: tuple[list[Any], dict[str, Any]],
    ) -> tuple[InvocationRecord, bool]:
        """Record a durable message and post it to its actor's mailbox."""
        activation.sending += 1
        try:
            try:
                stored, created = await self.store.create_invocation(rec, entry)
            except StorageError as exc:
                # Whether the message was recorded is unknown, so the mailbox
                # may no longer match the log: a new activation reloads it.
                activation.stop(exc)
                raise
            if not created:
                return stored, False
            self.stats.invocations_started += 1
            if self.hooks.invocation_created is not None:
                fire(self.hooks.invocation_created, stored)
            if activation.stopped is not None:
                # Stopped (or its partition lost) meanwhile: whoever runs the
                # actor next loads the message from the store.
                if not isinstance(activation.stopped, FencedError):
                    self._mark_stopped(stored.id, activation.stopped)
            else:
                activation.post(
                    _Pending(stored, handler, [entry], [], decoded, self._queue_waiter(stored.id))
                )
            return stored, True
        finally:
            activation.sending -= 1

    async def send_later(
        self,
        definition: ActorDef,
        key: str,
        handler_name: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        delay: timedelta,
        *,
        idempotency_key: str | None = None,
    ) -> InvocationRecord:
        """A durable delayed message: delivered (as a tell) once ``delay`` passed."""
        from ._schedule import DELIVER_WORKFLOW

        if not isinstance(delay, timedelta) or delay < timedelta(0):
            raise TypeError(f"delay must be a non-negative timedelta, not {delay!r}")
        if not isinstance(key, str) or not key:
            raise TypeError(f"an actor key must be a non-empty string, not {key!r}")
        handler = definition.handler(handler_name)
        handler.check_arguments(args, kwargs)
        due = self.clock.now() + delay.total_seconds()
        method = handler.name.rpartition(".")[2]
        rec, _ = await self.submit(
            DELIVER_WORKFLOW,
            (definition.name, key, method, list(args), kwargs, due),
            {},
            idempotency_key=idempotency_key,
            partition=self.actor_partition(definition.name, key),
        )
        return rec

    def post_plain(
        self,
        definition: ActorDef,
        key: str,
        handler_name: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        reply: bool,
    ) -> asyncio.Future[Any] | None:
        """Deliver a message to a plain actor: no store, no coroutine."""
        if not isinstance(key, str) or not key:
            raise TypeError(f"an actor key must be a non-empty string, not {key!r}")
        handler = definition.handler(handler_name)
        handler.check_arguments(args, kwargs)
        future = asyncio.get_running_loop().create_future() if reply else None
        self.activation(definition, key).post((handler, args, kwargs, future))
        return future

    async def _run_actor_message(self, activation: Activation, item: _Pending) -> Outcome:
        task = self._launch(
            item.record, item.handler, item.journal, item.attempts, item.decoded, activation
        )
        try:
            outcome = await task
        except asyncio.CancelledError:
            # The actor's partition moved (or the runtime stops): its caller
            # here looks again, in the store if need be.
            self._settle_queued(item, Outcome(Status.RUNNING))
            raise
        self._settle_queued(item, outcome)
        return outcome

    async def send_from_step(
        self,
        definition: ActorDef,
        key: str,
        handler_name: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        idempotency_key: str,
        reply: bool,
    ) -> Any:
        """Send a message from inside a journaled step (an ask, a tell, a
        delivery); with ``reply``, wait for the reply. Returns the reply, or
        the durable message's id, or None (a plain actor's tell).

        A storage error while sending, or a message stopped on one, is not
        the step's outcome: it stops the sending invocation unfinished, and
        it is relaunched once the store answers (the resent message is
        deduplicated by ``idempotency_key``). A message stopped for another
        reason (non-determinism, an unreadable journal) stops it too."""
        try:
            sent = await self.send_actor(
                definition,
                key,
                handler_name,
                args,
                kwargs,
                idempotency_key=idempotency_key,
                reply=reply,
            )
            if not isinstance(sent, InvocationRecord):
                return None if sent is None else await sent
            if not reply:
                return sent.id
            return await self.client_handle(sent).result()
        except StorageError as exc:
            raise Suspended(exc) from None
        except InvocationStoppedError as exc:
            reason = exc.reason if isinstance(exc.reason, StorageError) else exc
            raise Suspended(reason) from None

    def _queue_waiter(self, invocation_id: str) -> asyncio.Future[Outcome]:
        """A future of the outcome of a message waiting in a mailbox."""
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queued[invocation_id] = done
        return done

    def _settle_queued(self, item: _Pending, outcome: Outcome) -> None:
        """Tell whoever waits for a mailbox message how it ended here (RUNNING
        without an error: it moved to another node, look in the store)."""
        if not item.done.done():
            item.done.set_result(outcome)
        self._queued.pop(item.record.id, None)

    async def _replay_actor_message(
        self,
        instance: Actor[Any],
        handler: Workflow[Any, Any],
        rec: InvocationRecord,
        journal: list[JournalEntry],
        attempts: list[Attempt],
    ) -> None:
        """Re-run a completed message against ``instance``, every step from its
        journal: the state changes it made, and no external call."""
        replay = Replay(rec.id, journal, attempts)
        args, kwargs = self._decode_input(rec.id, handler, journal[0])
        ctx = Context(
            self,
            rec.id,
            handler.name,
            replay,
            journal[0].created_at,
            key=rec.actor_key,
            live_guard=completed_message_guard,
        )
        token = _current_context.set(ctx)
        try:
            await handler.method(instance, ctx, *args, **kwargs)
        except Suspended as s:
            raise s.reason from None
        except Exception as exc:
            raise NonDeterminismError(
                rec.id, len(journal) - 1, "the message completed", f"it to raise {exc!r}"
            ) from exc
        finally:
            _current_context.reset(token)
        replay.finish()
        self.stats.actor_messages_replayed += 1

    def client_handle(self, rec: InvocationRecord) -> Any:
        """A handle to ``rec``'s invocation."""
        from ._client import InvocationHandle

        return InvocationHandle[Any](self, rec.id, rec.target)

    def _forget(self, invocation_id: str, task: asyncio.Task[Outcome]) -> None:
        if self.hooks.after_invocation is not None:
            fire(self.hooks.after_invocation, _run_end(invocation_id, task))
        if self._tasks.get(invocation_id) is task:
            del self._tasks[invocation_id]
        self._contexts.pop(invocation_id, None)
        notified = invocation_id in self._notified
        self._notified.discard(invocation_id)
        if not task.cancelled():
            outcome = task.result()
            if outcome.status is not Status.SUSPENDED:
                self._wake_finish_waiters(invocation_id)
            elif notified:
                self.timers.kick()  # woken after it parked: its wake-up is due

    def running(self, invocation_id: str) -> asyncio.Future[Outcome] | None:
        """What to await for an invocation running (or queued) in this process."""
        return self._tasks.get(invocation_id) or self._queued.get(invocation_id)

    async def _execute(
        self,
        rec: InvocationRecord,
        wf: Workflow[Any, Any],
        journal: list[JournalEntry],
        attempts: list[Attempt],
        decoded: tuple[list[Any], dict[str, Any]] | None,
        activation: Activation | None = None,
    ) -> Outcome:
        replay = Replay(rec.id, journal, attempts)
        call = (
            wf.method if activation is None else functools.partial(wf.method, activation.instance)
        )
        try:
            input_entry = journal[0]
            if decoded is None:
                decoded = self._decode_input(rec.id, wf, input_entry)
            args, kwargs = decoded
            early_cancel = self._early_cancels.pop(rec.id, None)
            ctx = Context(
                self,
                rec.id,
                wf.name,
                replay,
                input_entry.created_at,
                key=rec.actor_key,
                live_guard=self._live_guard,
                deadline=rec.deadline,
                cancel_reason=rec.cancel_reason or early_cancel,
                can_park=activation is None,
                partition=rec.partition,
            )
            _current_context.set(ctx)
            self._contexts[rec.id] = ctx
            if self.hooks.before_invocation is not None:
                fire(
                    self.hooks.before_invocation,
                    InvocationInfo(
                        invocation_id=rec.id,
                        target=rec.target,
                        actor_type=rec.actor_type,
                        actor_key=rec.actor_key,
                        parent_id=rec.parent_id,
                        resumed=len(journal) > 1,
                    ),
                )
            try:
                value = await call(ctx, *args, **kwargs)
                if ctx._unflushed:
                    await ctx._flush()  # children started and not awaited
            except Exception as exc:
                return await self._finish(rec, wf, replay, Status.FAILED, None, exc)
            except Cancelled as exc:
                if not ctx._cancel_delivered:
                    raise  # not ours to finish with: a stray Cancelled
                return await self._finish(rec, wf, replay, Status.CANCELLED, None, exc)
            # Check the result reads back before recording it as completed.
            what = f"result of invocation {rec.id}"
            try:
                payload, tag = self.codec.encode(value, what)
                value = self.codec.roundtrip(value, payload, tag, wf.return_hint, what)
            except SerializationError as exc:
                return await self._finish(rec, wf, replay, Status.FAILED, None, exc)
            return await self._finish(
                rec, wf, replay, Status.COMPLETED, (value, payload, tag), None, activation
            )
        except Parked as p:
            return await self._park(rec, p.wake_at)
        except Suspended as s:
            return self._suspended(rec, s.reason)
        except (NonDeterminismError, JournalDecodeError, StorageError) as exc:
            return self._suspended(rec, exc)

    async def _read_journals(
        self, ids: list[str]
    ) -> dict[str, tuple[list[JournalEntry], list[Attempt]] | JournalDecodeError]:
        """Read journals in bulk; if one cannot be decoded, isolate it."""
        try:
            return dict(await self.store.read_journals(ids))
        except JournalDecodeError:
            pass
        found: dict[str, tuple[list[JournalEntry], list[Attempt]] | JournalDecodeError] = {}
        for invocation_id in ids:
            try:
                found[invocation_id] = (await self.store.read_journals([invocation_id]))[
                    invocation_id
                ]
            except JournalDecodeError as exc:
                found[invocation_id] = exc
        return found

    def _decode_input(
        self, invocation_id: str, wf: Workflow[Any, Any], entry: JournalEntry
    ) -> tuple[list[Any], dict[str, Any]]:
        try:
            return self.codec.decode_input(entry.payload, wf.hints, wf.params)
        except (ValueError, TypeError, KeyError, PerdureError) as exc:
            raise JournalDecodeError(invocation_id, entry.index, str(exc)) from None

    async def _finish(
        self,
        rec: InvocationRecord,
        wf: Workflow[Any, Any],
        replay: Replay,
        status: Status,
        success: tuple[Any, bytes, str | None] | None,
        error: BaseException | None,
        activation: Activation | None = None,
    ) -> Outcome:
        index = replay.finish()
        now = self.clock.now()
        if success is not None:
            value, payload, tag = success
        else:
            assert error is not None
            value, payload, tag = None, self.codec.encode_error(error), None
        entry = JournalEntry(
            invocation_id=rec.id,
            index=index,
            kind=EntryKind.OUTPUT,
            name=wf.name,
            ok=success is not None,
            payload=payload,
            type_tag=tag,
            attempts=1,
            created_at=now,
        )
        change = StatusChange(invocation_id=rec.id, status=status, updated_at=now)
        try:
            checkpoint = None
            if activation is not None and success is not None and rec.actor_seq is not None:
                try:
                    checkpoint = activation.checkpoint_for(rec.actor_seq)
                except SerializationError as exc:
                    log.error("actor state not checkpointed (recovery will replay): %s", exc)
            facet = None if checkpoint is None else activation.definition.facet  # type: ignore[union-attr]
            await self.store.commit(
                Write(
                    entries=(entry,),
                    status=change,
                    checkpoint=checkpoint,
                    retain_checkpoints=None if facet is None else facet.retain_checkpoints,
                    compact_journal=facet is not None and facet.compact_journal,
                    wakes=()
                    if rec.parent_id is None
                    else (Wake(invocation_id=rec.parent_id, at=now),),
                    fence=self.fence(rec.partition),
                )
            )
        except (StorageError, PerdureError) as exc:
            return self._suspended(rec, exc)
        fire(self.hooks.after_output, rec.id)
        if rec.parent_id is not None:
            self.notify(rec.parent_id)
        if success is not None:
            self.stats.invocations_completed += 1
            return Outcome(Status.COMPLETED, value=value, payload=payload, type_tag=tag)
        if status is Status.CANCELLED:
            self.stats.invocations_cancelled += 1
            assert isinstance(error, Cancelled)
            return Outcome(
                Status.CANCELLED,
                error=InvocationCancelledError(rec.id, rec.target, error.reason),
            )
        self.stats.invocations_failed += 1
        return Outcome(Status.FAILED, error=error)

    def _after_batch_commit(self, size: int, seconds: float) -> None:
        if self.hooks.after_batch_commit is not None:
            fire(self.hooks.after_batch_commit, BatchCommit(size=size, seconds=seconds))

    def stopped_reason(self, invocation_id: str) -> BaseException | None:
        """Why an invocation stopped unfinished in this process, if it did."""
        return self._stopped.get(invocation_id)

    def _suspended(self, rec: InvocationRecord, reason: BaseException) -> Outcome:
        if isinstance(reason, FencedError) and self.nodes is not None:
            self.nodes.lost(reason.partition)
        self.stats.invocations_suspended += 1
        self._mark_stopped(rec.id, reason)
        self._wake_finish_waiters(rec.id)
        level = logging.DEBUG if isinstance(reason, ForkStoppedError) else logging.ERROR
        log.log(level, "invocation %s (%s) stopped unfinished: %s", rec.id, rec.target, reason)
        return Outcome(Status.RUNNING, error=reason)

    def _mark_stopped(self, invocation_id: str, reason: BaseException) -> None:
        self._stopped[invocation_id] = reason
        if isinstance(reason, StorageError):
            self.timers.retry_later()  # relaunched once the store answers

    def _idempotency_lock(self, scope: str, key: str) -> asyncio.Lock:
        lock = self._locks.get((scope, key))
        if lock is None:
            lock = asyncio.Lock()
            self._locks[(scope, key)] = lock
        return lock


_OUTCOMES = {
    Status.COMPLETED: "completed",
    Status.FAILED: "failed",
    Status.CANCELLED: "cancelled",
    Status.SUSPENDED: "suspended",
}


def _run_end(invocation_id: str, task: asyncio.Task[Outcome]) -> InvocationEnd:
    """What ``after_invocation`` is told about a finished run's task."""
    if task.cancelled():
        return InvocationEnd(invocation_id=invocation_id, outcome="interrupted")
    error = task.exception()
    if error is not None:
        return InvocationEnd(invocation_id=invocation_id, outcome="stopped", error=error)
    outcome = task.result()
    return InvocationEnd(
        invocation_id=invocation_id,
        outcome=_OUTCOMES.get(outcome.status, "stopped"),
        error=outcome.error,
    )
