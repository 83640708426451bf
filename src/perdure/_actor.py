"""Actors: keyed state, one message at a time, durable when they opt in.

An actor type is a class; an instance is addressed by (type, key), created
on its first message and dropped when idle. Its handlers are the ``async
def`` methods the class defines, each taking ``ctx`` and the message.

Without a :class:`DurabilityFacet` an actor lives in memory only: no
journal, no store writes, no serialization. With one, every message is an
invocation with a journal, the actor's message log records their order, and
its state is rebuilt after a crash from the latest checkpoint plus a replay
of the messages after it, in replay mode, so that no external call is made.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import inspect
import logging
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import msgspec

from ._errors import ConfigurationError, FencedError, JournalDecodeError, PerdureError
from ._workflow import Workflow
from .storage._records import Checkpoint, InvocationRecord, Status

if TYPE_CHECKING:
    from ._runtime import Runtime

log = logging.getLogger("perdure.actor")

S = TypeVar("S")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DurabilityFacet:
    """Opt-in durability for an actor type.

    ``checkpoint_every``: store the state with every N-th message (1 = with
    every message), in the same transaction as that message's completion.
    ``retain_checkpoints``: how many checkpoints to keep per actor; recovery
    falls back to an older one if the newest is corrupt.
    ``state_version``: bump it when the state's shape changes incompatibly;
    a checkpoint of another version is not loaded (full replay instead).
    ``compact_journal``: delete the journals of messages older than the
    oldest retained checkpoint. Saves space; time travel then reaches back
    only to that checkpoint, and if every retained checkpoint becomes
    unreadable the state cannot be rebuilt (a clear error, not a wrong state).
    """

    checkpoint_every: int = 100
    retain_checkpoints: int = 2
    state_version: int = 1
    compact_journal: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.compact_journal, bool):
            raise ConfigurationError("DurabilityFacet.compact_journal must be a bool")
        for name in ("checkpoint_every", "retain_checkpoints", "state_version"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"DurabilityFacet.{name} must be an int >= 1, not {value!r}"
                )


class Actor(Generic[S]):
    """Base class of actors. ``self.key`` is the instance's key, ``self.state``
    its state, built by :meth:`initial_state` (the state type's no-argument
    constructor by default).

    >>> @dataclasses.dataclass
    ... class Balance:
    ...     cents: int = 0
    >>> class Account(Actor[Balance]):
    ...     durability = DurabilityFacet(checkpoint_every=100)
    ...     async def deposit(self, ctx, cents: int) -> int:
    ...         self.state.cents += cents
    ...         return self.state.cents
    """

    durability: ClassVar[DurabilityFacet | None] = None
    state_type: ClassVar[Any] = None
    actor_name: ClassVar[str | None] = None

    def __init__(self, key: str) -> None:
        self.key = key
        self.state: S = self.initial_state()

    def initial_state(self) -> S:
        state_type = type(self).state_type
        if state_type is None:
            raise ConfigurationError(
                f"actor {type(self).__qualname__} has no state type: subclass Actor[StateType], "
                "set state_type, or override initial_state()"
            )
        state: S = state_type()
        return state

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("state_type") is None:
            for base in getattr(cls, "__orig_bases__", ()):
                if typing.get_origin(base) is Actor:
                    (arg,) = typing.get_args(base)
                    if not isinstance(arg, TypeVar):
                        cls.state_type = arg


class ActorDef:
    """What the runtime knows of an actor type: its name, handlers, facet."""

    def __init__(self, cls: type[Actor[Any]]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise ConfigurationError(f"{cls!r} is not an actor: subclass perdure.Actor")
        self.cls = cls
        self.name = cls.actor_name or cls.__qualname__
        self.facet = cls.durability
        if self.facet is not None and not isinstance(self.facet, DurabilityFacet):
            raise ConfigurationError(f"actor {self.name}: durability must be a DurabilityFacet")
        self.handlers: dict[str, Workflow[Any, Any]] = {}
        for klass in reversed(cls.__mro__):
            if klass in (Actor, Generic, object):
                continue
            for attr, value in vars(klass).items():
                if attr.startswith("_") or not inspect.iscoroutinefunction(value):
                    continue
                self.handlers[attr] = Workflow(
                    value, f"{self.name}.{attr}", leading=2, kind="actor handler"
                )
        if not self.handlers:
            raise ConfigurationError(
                f"actor {self.name} has no handlers: define 'async def name(self, ctx, msg)'"
            )

    @property
    def durable(self) -> bool:
        return self.facet is not None

    def handler(self, target: str | Callable[..., Any]) -> Workflow[Any, Any]:
        name = target if isinstance(target, str) else getattr(target, "__name__", None)
        found = self.handlers.get(name) if isinstance(name, str) else None
        if found is None:
            known = ", ".join(sorted(self.handlers))
            raise ConfigurationError(
                f"actor {self.name} has no handler {name or target!r} (handlers: {known})"
            )
        return found


@dataclasses.dataclass(slots=True)
class _Pending:
    """A durable message waiting in an activation's mailbox."""

    record: InvocationRecord
    handler: Workflow[Any, Any]
    journal: list[Any]
    attempts: list[Any]
    decoded: tuple[list[Any], dict[str, Any]] | None
    # Resolved with the message's outcome, so that callers waiting for a
    # message still in the mailbox need not poll the store.
    done: asyncio.Future[Any]


class Activation:
    """One live actor instance and its mailbox.

    Durable messages are processed strictly in log order. The first thing an
    activation does is rebuild its state from the store and resume any
    message that was in flight when the process stopped.
    """

    def __init__(self, rt: Runtime, definition: ActorDef, key: str) -> None:
        self.rt = rt
        self.definition = definition
        self.key = key
        self.instance: Actor[Any] = definition.cls(key)
        self.mailbox: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[bool] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.next_seq = 0  # durable: the next log position to hand out
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.since_checkpoint = 0
        self.stopped: BaseException | None = None
        self.sending = 0  # sends between seq assignment and posting: keep alive
        self.plain_context: Any = None
        self.task = asyncio.create_task(self._run(), name=f"perdure-actor:{definition.name}/{key}")

    # -- durable -------------------------------------------------------------

    async def _load(self) -> None:
        """Rebuild state; queue the messages that were in flight."""
        rt, d = self.rt, self.definition
        self.next_seq = await rt.store.last_actor_seq(d.name, self.key) + 1
        state = await rebuild(rt, d, self.key, upto_seq=None)
        self.instance = state.instance
        self.since_checkpoint = state.since_checkpoint
        unfinished = state.unfinished
        if unfinished:
            journals = await rt.store.read_journals([r.id for r in unfinished])
            for rec in unfinished:
                journal, attempts = journals[rec.id]
                handler = d.handler(rec.target.rpartition(".")[2])
                self.mailbox.append(
                    _Pending(rec, handler, journal, attempts, None, rt._queue_waiter(rec.id))
                )
        rt.stats.actors_recovered += 1

    def checkpoint_for(self, seq: int) -> Checkpoint | None:
        """The checkpoint to write with message ``seq``, if one is due."""
        facet = self.definition.facet
        assert facet is not None
        self.since_checkpoint += 1
        if self.since_checkpoint < facet.checkpoint_every:
            return None
        self.since_checkpoint = 0
        payload, tag = self.rt.codec.encode(
            self.instance.state, f"state of actor {self.definition.name}/{self.key}"
        )
        return Checkpoint(
            actor_type=self.definition.name,
            actor_key=self.key,
            seq=seq,
            state=payload,
            type_tag=tag,
            checksum=hashlib.sha256(payload).hexdigest(),
            state_version=facet.state_version,
            created_at=self.rt.clock.now(),
        )

    async def _run(self) -> None:
        try:
            await self._serve()
        except Exception as exc:
            # A bug, not a handler's error (those are outcomes): callers must
            # not wait forever on a mailbox that nobody empties.
            log.exception("actor %s/%s failed", self.definition.name, self.key)
            self.stop(exc)
            self.rt._forget_activation(self)

    async def _serve(self) -> None:
        try:
            if self.definition.durable:
                await self._load()
            self.ready.set_result(None)
        except BaseException as exc:
            self.ready.set_exception(exc)
            self.stopped = exc
            self.rt._forget_activation(self)
            if not isinstance(exc, Exception):
                raise
            log.error("actor %s/%s cannot start: %s", self.definition.name, self.key, exc)
            return
        loop = asyncio.get_running_loop()
        while True:
            if not self.mailbox:
                # Wait on a bare future that post() resolves: a task and a
                # timer per wait would cost more than a plain actor's message.
                self.last_active = loop.time()
                self._waiter = loop.create_future()
                if self._idle_timer is None:
                    self._arm_idle_timer(self.rt.actor_idle_seconds)
                idle = await self._waiter
                self._waiter = None
                if idle:
                    self.rt._forget_activation(self)
                    return
                continue
            item = self.mailbox.popleft()
            if isinstance(item, _Pending):
                if not await self._handle_durable(item):
                    return
                if self.stopped is not None:  # stopped from outside while it ran
                    self.rt._forget_activation(self)
                    return
                continue
            handler, args, kwargs, future = item
            ctx = self.plain_context
            if ctx is None:
                ctx = self.plain_context = self.rt._plain_context(self)
            try:
                value = await handler.method(self.instance, ctx, *args, **kwargs)
            except Exception as exc:
                if future is None:
                    log.error(
                        "actor %s/%s: a told message failed: %r",
                        self.definition.name,
                        self.key,
                        exc,
                    )
                elif not future.done():
                    future.set_exception(exc)
                continue
            if future is not None and not future.done():
                future.set_result(value)

    def _arm_idle_timer(self, delay: float) -> None:
        self._idle_timer = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        """Deactivate if nothing arrived for the idle time; else look again later."""
        self._idle_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # busy: the next wait re-arms the timer
        left = self.last_active + self.rt.actor_idle_seconds - asyncio.get_running_loop().time()
        if left > 0 or self.sending or self.mailbox:
            self._arm_idle_timer(max(left, 0.001))
            return
        waiter.set_result(True)

    async def _handle_durable(self, item: _Pending) -> bool:
        rt = self.rt
        outcome = await rt._run_actor_message(self, item)
        if outcome.status is Status.COMPLETED:
            return True
        if outcome.status in (Status.FAILED, Status.CANCELLED):
            # The handler may have changed the state before it raised: the
            # state is what the completed messages made it, so rebuild it.
            try:
                state = await rebuild(rt, self.definition, self.key, upto_seq=None)
            except PerdureError as exc:
                self.stop(exc)
                return False
            self.instance = state.instance
            self.since_checkpoint = state.since_checkpoint
            return True
        assert outcome.error is not None
        self.stop(outcome.error)
        return False

    def stop(self, reason: BaseException) -> None:
        """Stop the mailbox: later messages must not overtake a stuck one.
        Their callers learn why. A message in flight finishes first; then the
        next message activates the actor again, from the store."""
        from ._runtime import Outcome

        self.stopped = reason
        for item in self.mailbox:
            if isinstance(item, _Pending):
                self.rt._mark_stopped(item.record.id, reason)
                self.rt._settle_queued(item, Outcome(Status.RUNNING, error=reason))
            else:
                future = item[3]
                if not future.done():
                    future.set_exception(reason)
        self.mailbox.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)  # idle: end now
        if self.task is asyncio.current_task() or not self.ready.done():
            self.rt._forget_activation(self)
        log.error("actor %s/%s stopped: %s", self.definition.name, self.key, reason)

    def abandon(self) -> None:
        """This node lost the actor's partition: stop at once, writing nothing
        more (its writes are fenced anyway). The new owner resumes the
        messages; callers here wait for them in the store."""
        from ._runtime import Outcome

        self.stopped = FencedError(self.rt.actor_partition(self.definition.name, self.key), 0, None)
        self.task.cancel()
        for item in self.mailbox:
            if isinstance(item, _Pending):
                self.rt._settle_queued(item, Outcome(Status.RUNNING))
        self.mailbox.clear()
        self.rt._forget_activation(self)

    def post(self, item: Any) -> None:
        self.mailbox.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)


@dataclasses.dataclass(slots=True)
class RebuiltState:
    instance: Actor[Any]
    last_seq: int
    since_checkpoint: int
    unfinished: list[InvocationRecord]
    checkpoint_seq: int
    replayed: int


async def rebuild(
    rt: Runtime,
    definition: ActorDef,
    key: str,
    *,
    upto_seq: int | None,
    use_checkpoints: bool = True,
) -> RebuiltState:
    """An actor's state after message ``upto_seq`` (all, if None).

    Starts from the newest readable checkpoint at or before it, then replays
    the completed messages after it in replay mode: handlers run again, but
    every step's outcome comes from the journal. Failed messages are skipped.
    Unfinished ones are returned for the caller to resume. Without
    ``use_checkpoints``, every message is replayed (to measure what
    checkpoints save).
    """
    facet = definition.facet
    assert facet is not None
    instance = definition.cls(key)
    start = 0
    checkpoints = (
        await rt.store.read_checkpoints(
            definition.name, key, at_or_before=upto_seq, limit=facet.retain_checkpoints
        )
        if use_checkpoints
        else []
    )
    for cp in checkpoints:
        problem = _checkpoint_problem(rt, definition, cp)
        if problem is None:
            instance.state = rt.codec.decode(cp.state, cp.type_tag, definition.cls.state_type)
            start = cp.seq
            break
        log.warning(
            "actor %s/%s: checkpoint at message %d is unusable (%s); falling back",
            definition.name,
            key,
            cp.seq,
            problem,
        )
    messages = await rt.store.list_actor_messages(
        definition.name, key, after_seq=start, upto_seq=upto_seq
    )
    finished = [m for m in messages if m.status is Status.COMPLETED]
    journals = await rt.store.read_journals([m.id for m in finished])
    replayed = 0
    for rec in finished:
        handler = definition.handler(rec.target.rpartition(".")[2])
        journal, attempts = journals[rec.id]
        if not journal:
            raise JournalDecodeError(
                rec.id,
                0,
                f"the journal of message {rec.actor_seq} of actor {definition.name}/{key} was "
                "compacted (DurabilityFacet.compact_journal) and no readable checkpoint covers "
                "it, so this state cannot be rebuilt",
            )
        await rt._replay_actor_message(instance, handler, rec, journal, attempts)
        replayed += 1
    last = messages[-1].actor_seq if messages else start
    unfinished = [m for m in messages if not m.status.finished]
    return RebuiltState(instance, last or 0, len(finished), unfinished, start, replayed)


def _checkpoint_problem(rt: Runtime, definition: ActorDef, cp: Checkpoint) -> str | None:
    facet = definition.facet
    assert facet is not None
    if cp.state_version != facet.state_version:
        return f"state version {cp.state_version}, the code's is {facet.state_version}"
    if hashlib.sha256(cp.state).hexdigest() != cp.checksum:
        return "checksum mismatch"
    try:
        rt.codec.decode(cp.state, cp.type_tag, definition.cls.state_type)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        return f"cannot be decoded: {exc}"
    return None


def state_diff(before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    """What changed between two states: ``{"path.to.field": (before, after)}``.

    States are compared as their JSON form (dataclasses, Structs and pydantic
    models by field, dicts by key, lists by position).
    """
    changes: dict[str, tuple[Any, Any]] = {}
    _diff(_plain(before), _plain(after), "", changes)
    return changes


_MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    return msgspec.to_builtins(value)


def _diff(a: Any, b: Any, path: str, out: dict[str, tuple[Any, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}" if path else str(k), out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out[path or "."] = (a, b)
