"""The one storage contract every backend implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

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

BeforeCommit = Callable[[int], None]
"""Called with the number of writes in a batch after they are applied and
before the transaction commits. Used by crash tests; keep it cheap."""


AfterCommit = Callable[[int, float], None]
"""Called on the event loop with the number of writes in a batch and the
seconds its transaction took (BEGIN to the end of COMMIT), after it
committed. Used by metrics; keep it cheap."""


class Store(abc.ABC):
    """Durable storage for invocations, journals and idempotent results.

    Every method is safe to call concurrently from one event loop. A write
    returns only after it is durable; a write that fails leaves nothing of
    itself behind. Driver errors surface as :class:`perdure.StorageError`.
    """

    url: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create or migrate the schema."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release every resource."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The schema version of the open store."""

    @abc.abstractmethod
    async def create_invocation(
        self, invocation: InvocationRecord, input_entry: JournalEntry
    ) -> tuple[InvocationRecord, bool]:
        """Record a new invocation and its input entry, atomically.

        If ``invocation.idempotency_key`` is already used for the same target
        (and, for an actor message, the same actor key), nothing is written
        and the existing record is returned with False.
        A taken invocation id, or a taken (actor type, actor key, actor seq),
        raises :class:`perdure.ConflictError`.
        """

    @abc.abstractmethod
    async def commit(self, write: Write) -> Any:
        """Record ``write`` atomically.

        Raises :class:`perdure.ConflictError` if a journal index is already
        taken. An idempotent result whose (scope, key) is taken is ignored:
        the first one stored wins. A checkpoint replaces one with the same
        (actor type, key, seq); with ``retain_checkpoints`` set, only that many
        of the actor's newest checkpoints are kept, and with
        ``compact_journal`` the journals and attempts of the actor's messages
        up to the oldest kept checkpoint are deleted (their invocation
        records stay).

        Events: ``wakes`` set an unfinished invocation's ``wake_at`` to the
        sooner of its pending wake-up and theirs; ``promises`` are inserted
        (a taken id conflicts); a ``resolution`` settles a pending promise
        (:class:`perdure.NotFoundError` if there is none, ConflictError if it
        is settled) and wakes its owner; a ``signal`` is appended to an
        unfinished invocation's signals with the next ``seq``, which the
        commit returns, and wakes it; ``cancels`` set ``cancel_reason`` (the
        first one stays) and wake. A signal or cancel for an unknown
        invocation raises NotFoundError, for a finished one ConflictError.

        With a ``fence``, the write is made only if the partition's lease
        still has the fence's epoch, else :class:`perdure.FencedError` and
        nothing is written.
        """

    @abc.abstractmethod
    async def get_invocation(self, invocation_id: str) -> InvocationRecord | None: ...

    @abc.abstractmethod
    async def find_invocation(
        self, target: str, idempotency_key: str, *, actor_key: str | None = None
    ) -> InvocationRecord | None:
        """The invocation started with this idempotency key (for an actor
        message: sent to the actor with ``actor_key``)."""

    @abc.abstractmethod
    async def list_invocations(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        target: str | None = None,
        limit: int | None = None,
        partitions: Sequence[int] | None = None,
    ) -> list[InvocationRecord]:
        """Invocations, oldest first, filtered by status, target and partition."""

    @abc.abstractmethod
    async def read_journal(self, invocation_id: str) -> list[JournalEntry]:
        """An invocation's journal entries in index order."""

    @abc.abstractmethod
    async def read_attempts(self, invocation_id: str) -> list[Attempt]:
        """An invocation's failed step attempts, by index then attempt."""

    @abc.abstractmethod
    async def list_actor_messages(
        self,
        actor_type: str,
        actor_key: str,
        *,
        after_seq: int = 0,
        upto_seq: int | None = None,
    ) -> list[InvocationRecord]:
        """An actor's messages with ``after_seq < actor_seq <= upto_seq``, in log order."""

    @abc.abstractmethod
    async def last_actor_seq(self, actor_type: str, actor_key: str) -> int:
        """The highest log position of the actor's messages, 0 if it has none."""

    @abc.abstractmethod
    async def read_checkpoints(
        self,
        actor_type: str,
        actor_key: str,
        *,
        at_or_before: int | None = None,
        limit: int = 3,
    ) -> list[Checkpoint]:
        """The actor's newest checkpoints with ``seq <= at_or_before``, newest first."""

    @abc.abstractmethod
    async def list_actors(self, actor_type: str | None = None) -> list[tuple[str, str]]:
        """(actor type, key) of every actor with at least one message, sorted."""

    @abc.abstractmethod
    async def due_invocations(
        self, before: float, *, limit: int = 1000, partitions: Sequence[int] | None = None
    ) -> list[InvocationRecord]:
        """Suspended invocations whose ``wake_at <= before``, soonest first."""

    @abc.abstractmethod
    async def next_wake_at(self, *, partitions: Sequence[int] | None = None) -> float | None:
        """The soonest ``wake_at`` of a suspended invocation, None if none has one."""

    # -- leases (several nodes on one store) ------------------------------------------

    @abc.abstractmethod
    async def acquire_leases(
        self, node: str, *, partitions: int, ttl: float, now: float
    ) -> dict[int, int]:
        """In one transaction: record that ``node`` is alive until ``now + ttl``;
        its share is ``ceil(partitions / live nodes)``; renew the leases it
        holds (to ``now + ttl``), give back those over its share, and take
        free or expired ones (a new owner bumps the epoch) up to its share.
        Partitions are ``0..partitions-1``. Returns ``{partition: epoch}``
        held now."""

    @abc.abstractmethod
    async def release_leases(self, node: str) -> None:
        """Give back every lease ``node`` holds and forget it (a clean shutdown)."""

    @abc.abstractmethod
    async def list_leases(self) -> list[Lease]:
        """Every partition's lease, by partition."""

    @abc.abstractmethod
    async def get_promise(self, promise_id: str) -> PromiseRecord | None: ...

    @abc.abstractmethod
    async def read_signals(self, invocation_id: str, name: str) -> list[SignalRecord]:
        """The signals named ``name`` sent to an invocation, in the order they arrived."""

    @abc.abstractmethod
    async def list_children(self, parent_id: str) -> list[InvocationRecord]:
        """The invocations started by ``parent_id`` as its children, oldest first."""

    def on_wake(self, callback: Callable[[int | None, str | None], None]) -> None:
        """Call ``callback(partition, finished)`` when a write of any process
        (any node) makes an invocation of ``partition`` due (a new invocation
        recorded for its owner, a promise, a signal, a cancellation, a
        finished child), or when an invocation finished: ``finished`` is its
        id then, for whoever waits for it (``partition`` is None if nothing
        became due). A store with listeners announces every finish. Backends
        that can tell other processes (PostgreSQL's LISTEN/NOTIFY) do; the
        default tells no one, and nodes fall back on polling."""
        return

    async def read_journals(
        self, invocation_ids: Sequence[str]
    ) -> dict[str, tuple[list[JournalEntry], list[Attempt]]]:
        """Journals and failed attempts of many invocations, for recovery.

        Backends should override this with a bulk read; this default reads
        one invocation at a time.
        """
        found: dict[str, tuple[list[JournalEntry], list[Attempt]]] = {}
        for invocation_id in invocation_ids:
            found[invocation_id] = (
                await self.read_journal(invocation_id),
                await self.read_attempts(invocation_id),
            )
        return found

    async def count_suspended(self) -> tuple[int, int]:
        """(suspended invocations, how many of them have a ``wake_at``), for
        metrics. Backends should override this with a count; this default
        reads the records."""
        found = await self.list_invocations(statuses=(Status.SUSPENDED,))
        return len(found), sum(1 for r in found if r.wake_at is not None)

    @abc.abstractmethod
    async def get_idempotent_result(self, scope: str, key: str) -> IdempotentResult | None: ...

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
