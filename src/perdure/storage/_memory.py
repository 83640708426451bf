"""An in-memory store with the same contract as the durable ones, for tests."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from .._errors import ConflictError, FencedError, NotFoundError, StorageError
from ._base import BeforeCommit, Store
from ._records import (
    Attempt,
    Checkpoint,
    IdempotentResult,
    InvocationRecord,
    JournalEntry,
    Lease,
    PromiseRecord,
    SignalRecord,
    Status,
    Write,
)

SCHEMA_VERSION = 4  # the SQLite schema version whose contract this store follows


class MemoryStore(Store):
    """Keeps everything in dicts; gone when the process ends."""

    def __init__(self, *, before_commit: BeforeCommit | None = None) -> None:
        self.url = "memory://"
        self._before_commit = before_commit
        self._opens = 0
        self._invocations: dict[str, InvocationRecord] = {}
        self._by_key: dict[tuple[str, str, str], str] = {}
        self._journal: dict[str, dict[int, JournalEntry]] = {}
        self._attempts: dict[str, list[Attempt]] = {}
        self._idempotent: dict[tuple[str, str], IdempotentResult] = {}
        # (actor type, actor key) -> actor seq -> invocation id
        self._actors: dict[tuple[str, str], dict[int, str]] = {}
        self._checkpoints: dict[tuple[str, str], dict[int, Checkpoint]] = {}
        self._promises: dict[str, PromiseRecord] = {}
        self._signals: dict[str, list[SignalRecord]] = {}
        self._leases: dict[int, Lease] = {}
        self._nodes: dict[str, float] = {}  # node -> alive until
        self._wake_listeners: list[Callable[[int | None, str | None], None]] = []

    # Several runtimes may share one memory store (nodes, in tests): it stays
    # open until each that opened it has closed it.
    async def open(self) -> None:
        self._opens += 1

    async def close(self) -> None:
        self._opens = max(0, self._opens - 1)

    def _check_open(self) -> None:
        if not self._opens:
            raise StorageError("the memory store is closed; open it (or the Runtime) first")

    async def schema_version(self) -> int:
        self._check_open()
        return SCHEMA_VERSION

    async def create_invocation(
        self, invocation: InvocationRecord, input_entry: JournalEntry
    ) -> tuple[InvocationRecord, bool]:
        self._check_open()
        actor = _actor_of(invocation)
        if invocation.idempotency_key is not None:
            existing = self._by_key.get(
                (invocation.target, invocation.actor_key or "", invocation.idempotency_key)
            )
            if existing is not None:
                return self._invocations[existing], False
        if invocation.id in self._invocations:
            raise ConflictError(f"invocation id {invocation.id} is already taken")
        if actor is not None and actor[2] in self._actors.get(actor[:2], {}):
            raise ConflictError(
                f"message {actor[2]} of actor {actor[0]}/{actor[1]} is already taken"
            )
        if self._before_commit is not None:
            self._before_commit(1)
        self._invocations[invocation.id] = invocation
        if actor is not None:
            self._actors.setdefault(actor[:2], {})[actor[2]] = invocation.id
        if invocation.idempotency_key is not None:
            self._by_key[
                (invocation.target, invocation.actor_key or "", invocation.idempotency_key)
            ] = invocation.id
        self._journal[invocation.id] = {input_entry.index: input_entry}
        if invocation.status is Status.SUSPENDED and invocation.wake_at is not None:
            self._tell(invocation.partition)
        return invocation, True

    def on_wake(self, callback: Callable[[int | None, str | None], None]) -> None:
        self._wake_listeners.append(callback)

    def _tell(self, partition: int | None, finished: str | None = None) -> None:
        for listener in self._wake_listeners:
            listener(partition, finished)

    async def commit(self, write: Write) -> Any:
        self._check_open()
        if write.fence is not None:
            self._check_fence(write.fence.partition, write.fence.epoch)
        # Validate everything first, so that a rejected write changes nothing.
        seen: set[tuple[str, int]] = set()
        for owner in {e.invocation_id for e in write.entries} | {
            a.invocation_id for a in write.attempts
        }:
            if owner not in self._journal:
                raise ConflictError(f"invocation {owner} does not exist")
        for e in write.entries:
            journal = self._journal[e.invocation_id]
            if e.index in journal or (e.invocation_id, e.index) in seen:
                raise ConflictError(
                    f"invocation {e.invocation_id}: journal index {e.index} is already recorded"
                )
            seen.add((e.invocation_id, e.index))
        change = write.status
        if change is not None and change.invocation_id not in self._invocations:
            raise ConflictError(f"invocation {change.invocation_id} does not exist")
        promise_ids: set[str] = set()
        for p in write.promises:
            if p.id in self._promises or p.id in promise_ids:
                raise ConflictError(f"promise id {p.id} is already taken")
            promise_ids.add(p.id)
            if p.invocation_id not in self._invocations:
                raise ConflictError(f"invocation {p.invocation_id} does not exist")
        settle = write.resolution
        if settle is not None:
            promise = self._promises.get(settle.promise_id)
            if promise is None:
                raise NotFoundError(f"promise {settle.promise_id} does not exist")
            if promise.state != "pending":
                raise ConflictError(f"promise {settle.promise_id} is already {promise.state}")
        if write.signal is not None:
            self._check_unfinished(write.signal.invocation_id, "signal")
        for cancel in write.cancels:
            self._check_unfinished(cancel.invocation_id, "cancel")
        if self._before_commit is not None:
            self._before_commit(1)
        for e in write.entries:
            self._journal[e.invocation_id][e.index] = e
        for a in write.attempts:
            attempts = self._attempts.setdefault(a.invocation_id, [])
            if not any(x.index == a.index and x.attempt == a.attempt for x in attempts):
                attempts.append(a)
        if change is not None:
            current = self._invocations[change.invocation_id]
            wake_at = None
            if change.status is Status.SUSPENDED:
                pending = [t for t in (current.wake_at, change.wake_at) if t is not None]
                wake_at = min(pending, default=None)
            self._invocations[change.invocation_id] = msgspec.structs.replace(
                current,
                status=change.status,
                updated_at=change.updated_at,
                last_error=change.last_error,
                wake_at=wake_at,
            )
        result = self._apply_events(write)
        if change is not None and change.status.finished and self._wake_listeners:
            self._tell(None, change.invocation_id)  # for its waiters on other nodes
        r = write.idempotent
        if r is not None:
            self._idempotent.setdefault((r.scope, r.key), r)
        c = write.checkpoint
        if c is not None:
            kept = self._checkpoints.setdefault((c.actor_type, c.actor_key), {})
            kept[c.seq] = c
            if write.retain_checkpoints is not None:
                for seq in sorted(kept, reverse=True)[write.retain_checkpoints :]:
                    del kept[seq]
                if write.compact_journal and kept:
                    covered = min(kept)
                    for rec in self._invocations.values():
                        if (
                            rec.actor_type == c.actor_type
                            and rec.actor_key == c.actor_key
                            and rec.actor_seq is not None
                            and rec.actor_seq <= covered
                        ):
                            self._journal[rec.id] = {}
                            self._attempts.pop(rec.id, None)
        return result

    def _check_fence(self, partition: int, epoch: int) -> None:
        lease = self._leases.get(partition)
        if lease is None or lease.epoch != epoch:
            raise FencedError(partition, epoch, None if lease is None else lease.epoch)

    async def acquire_leases(
        self, node: str, *, partitions: int, ttl: float, now: float
    ) -> dict[int, int]:
        self._check_open()
        self._nodes[node] = now + ttl
        live = sum(1 for until in self._nodes.values() if until > now)
        want = math.ceil(partitions / live)
        held: dict[int, int] = {}
        for p in sorted(p for p, lease in self._leases.items() if lease.owner == node):
            lease = self._leases[p]
            if len(held) < want and p < partitions:
                self._leases[p] = msgspec.structs.replace(lease, expires_at=now + ttl)
                held[p] = lease.epoch
            else:
                self._leases[p] = msgspec.structs.replace(lease, owner=None, expires_at=now)
        for p in range(partitions):
            if len(held) >= want:
                break
            if p in held:
                continue
            found = self._leases.get(p)
            if found is None or found.owner is None or found.expires_at <= now:
                epoch = 1 if found is None else found.epoch + 1
                self._leases[p] = Lease(partition=p, owner=node, epoch=epoch, expires_at=now + ttl)
                held[p] = epoch
        return held

    async def release_leases(self, node: str) -> None:
        self._check_open()
        self._nodes.pop(node, None)
        for p, lease in list(self._leases.items()):
            if lease.owner == node:
                self._leases[p] = msgspec.structs.replace(lease, owner=None)

    async def list_leases(self) -> list[Lease]:
        self._check_open()
        return [self._leases[p] for p in sorted(self._leases)]

    def _check_unfinished(self, invocation_id: str, what: str) -> None:
        rec = self._invocations.get(invocation_id)
        if rec is None:
            raise NotFoundError(f"invocation {invocation_id} does not exist")
        if rec.status.finished:
            raise ConflictError(
                f"cannot {what} invocation {invocation_id}: it is already {rec.status.value}"
            )

    def _apply_events(self, write: Write) -> Any:
        """Promises, signals, cancellations, wake-ups (validated already)."""
        if not (write.wakes or write.promises or write.resolution or write.signal or write.cancels):
            return None
        result: Any = None
        wakes = [(w.invocation_id, w.at) for w in write.wakes]
        # A finished child wakes its parent: say which child, for its waiters.
        status = write.status
        child = status.invocation_id if status is not None and status.status.finished else None
        for p in write.promises:
            self._promises[p.id] = p
        r = write.resolution
        if r is not None:
            promise = self._promises[r.promise_id]
            self._promises[r.promise_id] = msgspec.structs.replace(
                promise,
                state="resolved" if r.ok else "rejected",
                payload=r.payload,
                type_tag=r.type_tag,
                resolved_at=r.at,
            )
            wakes.append((promise.invocation_id, r.at))
        sig = write.signal
        if sig is not None:
            signals = self._signals.setdefault(sig.invocation_id, [])
            result = len(signals) + 1
            signals.append(msgspec.structs.replace(sig, seq=result))
            wakes.append((sig.invocation_id, sig.created_at))
        for cancel in write.cancels:
            rec = self._invocations[cancel.invocation_id]
            if rec.cancel_reason is None:
                self._invocations[cancel.invocation_id] = msgspec.structs.replace(
                    rec, cancel_reason=cancel.reason
                )
            wakes.append((cancel.invocation_id, cancel.at))
        for invocation_id, at in wakes:
            found = self._invocations.get(invocation_id)
            if found is None or found.status.finished:
                continue
            if found.wake_at is None or at < found.wake_at:
                self._invocations[invocation_id] = msgspec.structs.replace(found, wake_at=at)
            self._tell(found.partition, child)
        return result

    async def get_invocation(self, invocation_id: str) -> InvocationRecord | None:
        self._check_open()
        return self._invocations.get(invocation_id)

    async def find_invocation(
        self, target: str, idempotency_key: str, *, actor_key: str | None = None
    ) -> InvocationRecord | None:
        self._check_open()
        found = self._by_key.get((target, actor_key or "", idempotency_key))
        return None if found is None else self._invocations[found]

    async def list_invocations(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        target: str | None = None,
        limit: int | None = None,
        partitions: Sequence[int] | None = None,
    ) -> list[InvocationRecord]:
        self._check_open()
        rows = sorted(self._invocations.values(), key=lambda r: (r.created_at, r.id))
        if partitions is not None:
            parts = set(partitions)
            rows = [r for r in rows if r.partition in parts]
        if statuses is not None:
            wanted = set(statuses)
            rows = [r for r in rows if r.status in wanted]
        if target is not None:
            rows = [r for r in rows if r.target == target]
        return rows if limit is None else rows[:limit]

    async def read_journal(self, invocation_id: str) -> list[JournalEntry]:
        self._check_open()
        journal = self._journal.get(invocation_id, {})
        return [journal[i] for i in sorted(journal)]

    async def read_attempts(self, invocation_id: str) -> list[Attempt]:
        self._check_open()
        return sorted(self._attempts.get(invocation_id, []), key=lambda a: (a.index, a.attempt))

    async def list_actor_messages(
        self,
        actor_type: str,
        actor_key: str,
        *,
        after_seq: int = 0,
        upto_seq: int | None = None,
    ) -> list[InvocationRecord]:
        self._check_open()
        log = self._actors.get((actor_type, actor_key), {})
        return [
            self._invocations[log[seq]]
            for seq in sorted(log)
            if seq > after_seq and (upto_seq is None or seq <= upto_seq)
        ]

    async def last_actor_seq(self, actor_type: str, actor_key: str) -> int:
        self._check_open()
        return max(self._actors.get((actor_type, actor_key), {}), default=0)

    async def read_checkpoints(
        self,
        actor_type: str,
        actor_key: str,
        *,
        at_or_before: int | None = None,
        limit: int = 3,
    ) -> list[Checkpoint]:
        self._check_open()
        found = self._checkpoints.get((actor_type, actor_key), {})
        seqs = sorted((s for s in found if at_or_before is None or s <= at_or_before), reverse=True)
        return [found[s] for s in seqs[: max(limit, 0)]]

    async def list_actors(self, actor_type: str | None = None) -> list[tuple[str, str]]:
        self._check_open()
        return sorted(
            actor
            for actor, log in self._actors.items()
            if log and (actor_type is None or actor[0] == actor_type)
        )

    async def get_idempotent_result(self, scope: str, key: str) -> IdempotentResult | None:
        self._check_open()
        return self._idempotent.get((scope, key))

    async def due_invocations(
        self, before: float, *, limit: int = 1000, partitions: Sequence[int] | None = None
    ) -> list[InvocationRecord]:
        self._check_open()
        parts = None if partitions is None else set(partitions)
        due = [
            r
            for r in self._invocations.values()
            if r.status is Status.SUSPENDED
            and r.wake_at is not None
            and r.wake_at <= before
            and (parts is None or r.partition in parts)
        ]
        due.sort(key=lambda r: (r.wake_at or 0.0, r.id))
        return due[:limit]

    async def next_wake_at(self, *, partitions: Sequence[int] | None = None) -> float | None:
        self._check_open()
        parts = None if partitions is None else set(partitions)
        return min(
            (
                r.wake_at
                for r in self._invocations.values()
                if r.status is Status.SUSPENDED
                and r.wake_at is not None
                and (parts is None or r.partition in parts)
            ),
            default=None,
        )

    async def get_promise(self, promise_id: str) -> PromiseRecord | None:
        self._check_open()
        return self._promises.get(promise_id)

    async def read_signals(self, invocation_id: str, name: str) -> list[SignalRecord]:
        self._check_open()
        return [s for s in self._signals.get(invocation_id, []) if s.name == name]

    async def list_children(self, parent_id: str) -> list[InvocationRecord]:
        self._check_open()
        return sorted(
            (r for r in self._invocations.values() if r.parent_id == parent_id),
            key=lambda r: (r.created_at, r.id),
        )


def _actor_of(invocation: InvocationRecord) -> tuple[str, str, int] | None:
    """The (actor type, key, seq) of an actor message, None for any other invocation."""
    t, k, n = invocation.actor_type, invocation.actor_key, invocation.actor_seq
    if t is None and k is None and n is None:
        return None
    if t is None or k is None or n is None:
        raise ValueError(
            f"invocation {invocation.id}: actor_type, actor_key and actor_seq must be "
            f"all set or all None (got {t!r}, {k!r}, {n!r})"
        )
    return t, k, n
