"""Group commit for the PostgreSQL store.

Writes from every concurrent invocation queue up on the event loop, exactly
as for SQLite (``_sqlite_batch``): one batch at a time is written in one
transaction on the writer connection, with one statement per table whose
rows travel as arrays (``INSERT ... SELECT FROM unnest(...)``, whose constant
text the server prepares once), and callers are released only after the
COMMIT. While one batch commits, the next one gathers. The arrays are sent
in binary (``%b``): psycopg quotes text-format array elements one by one in
Python, which made a batch of 256 writes take twice as long.

A batch in which one write fails (a journal index already taken) is rolled
back and redone with a savepoint per write, so the bad write fails alone.

A batch whose connection dies is retried once on a new connection if it
cannot have committed. If the connection died during COMMIT, the outcome is
looked up by transaction id (``pg_xact_status``) on a new connection: a
committed batch succeeds, an aborted one is retried once, and one that
cannot be decided surfaces :class:`perdure.StorageError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._errors import (
    ConflictError,
    FencedError,
    NotFoundError,
    PerdureError,
    StorageError,
    StorageFullError,
)
from ._base import BeforeCommit
from ._records import Checkpoint, InvocationRecord, JournalEntry, Status, Write

if TYPE_CHECKING:
    import psycopg

    Connection = psycopg.AsyncConnection[tuple[Any, ...]]

INVOCATION_COLUMNS = (
    "id, target, input_hash, idempotency_key, status, created_at, updated_at, last_error, "
    "actor_type, actor_key, actor_seq, parent_id, wake_at, deadline, cancel_reason, part"
)
_INVOCATION_WIDTH = 16
CHECKPOINT_COLUMNS = (
    "actor_type, actor_key, seq, state, type_tag, checksum, state_version, created_at"
)
JOURNAL_COLUMNS = "invocation_id, idx, kind, name, ok, payload, type_tag, attempts, created_at"

_CREATE = f"""
WITH v AS (
    SELECT * FROM unnest(
        %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::float8[],
        %b::float8[], %b::text[], %b::text[], %b::text[], %b::int8[], %b::text[],
        %b::float8[], %b::float8[], %b::text[], %b::int4[]
    ) WITH ORDINALITY AS v ({INVOCATION_COLUMNS}, ord)
), inserted AS (
    INSERT INTO invocations ({INVOCATION_COLUMNS})
    SELECT {INVOCATION_COLUMNS} FROM v ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id
), input_entries AS (
    INSERT INTO journal ({JOURNAL_COLUMNS})
    SELECT e.* FROM unnest(
        %b::text[], %b::int8[], %b::text[], %b::text[], %b::bool[], %b::bytea[], %b::text[],
        %b::int8[], %b::float8[]
    ) AS e ({JOURNAL_COLUMNS})
    JOIN inserted ON inserted.id = e.invocation_id
)
SELECT id FROM inserted
"""
_INSERT_JOURNAL = (
    f"INSERT INTO journal ({JOURNAL_COLUMNS}) SELECT * FROM unnest("
    "%b::text[], %b::int8[], %b::text[], %b::text[], %b::bool[], %b::bytea[], %b::text[], "
    "%b::int8[], %b::float8[])"
)
_INSERT_ATTEMPTS = (
    "INSERT INTO attempts (invocation_id, idx, attempt, error, created_at) SELECT * FROM "
    "unnest(%b::text[], %b::int8[], %b::int8[], %b::bytea[], %b::float8[]) "
    "ON CONFLICT DO NOTHING"
)
# To suspended: keep a pending wake-up that is sooner (it raced with the
# suspension); to any other status: clear it.
_UPDATE_STATUSES = (
    "UPDATE invocations AS i SET status = v.status, updated_at = v.updated_at, "
    "last_error = v.last_error, wake_at = CASE WHEN v.status <> 'suspended' THEN NULL "
    "WHEN i.wake_at IS NULL THEN v.wake_at WHEN v.wake_at IS NULL THEN i.wake_at "
    "ELSE least(i.wake_at, v.wake_at) END "
    "FROM unnest(%b::text[], %b::text[], %b::float8[], %b::text[], %b::float8[]) "
    "AS v (id, status, updated_at, last_error, wake_at) WHERE i.id = v.id"
)
_WAKE = (
    "UPDATE invocations SET wake_at = least(coalesce(wake_at, %s), %s) "
    "WHERE id = %s AND status IN ('pending', 'running', 'suspended') RETURNING part"
)
_INSERT_IDEMPOTENT = (
    "INSERT INTO idempotent_results (scope, key, ok, payload, type_tag, invocation_id, "
    "created_at) SELECT * FROM unnest(%b::text[], %b::text[], %b::bool[], %b::bytea[], "
    "%b::text[], %b::text[], %b::float8[]) ON CONFLICT DO NOTHING"
)
_UPSERT_CHECKPOINTS = (
    f"INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) SELECT * FROM unnest("
    "%b::text[], %b::text[], %b::int8[], %b::bytea[], %b::text[], %b::text[], %b::int8[], "
    "%b::float8[]) ON CONFLICT (actor_type, actor_key, seq) DO UPDATE SET "
    "state = excluded.state, type_tag = excluded.type_tag, checksum = excluded.checksum, "
    "state_version = excluded.state_version, created_at = excluded.created_at"
)
_PRUNE_CHECKPOINTS = (
    "DELETE FROM checkpoints WHERE actor_type = %s AND actor_key = %s AND seq NOT IN "
    "(SELECT seq FROM checkpoints WHERE actor_type = %s AND actor_key = %s "
    "ORDER BY seq DESC LIMIT %s)"
)
_COVERED = (
    "SELECT id FROM invocations WHERE actor_type = %s AND actor_key = %s AND actor_seq "
    "<= (SELECT min(seq) FROM checkpoints WHERE actor_type = %s AND actor_key = %s)"
)
_FIND_BY_KEY = (
    f"SELECT {INVOCATION_COLUMNS} FROM invocations "
    "WHERE target = %s AND coalesce(actor_key, '') = %s AND idempotency_key = %s"
)
_BEGIN = "BEGIN; SELECT pg_current_xact_id()::text"


# -- text that PostgreSQL can hold ------------------------------------------------
#
# A PostgreSQL text value cannot contain NUL, which Python strings (and
# SQLite) can. Text written by users (names, keys, errors) is stored with
# NUL as \x01\x01 and \x01 as \x01\x02: reversible, and it keeps the byte
# order that the "C" collation sorts by. Text without either is unchanged.


def enc(s: str) -> str:
    if "\x00" in s or "\x01" in s:
        return s.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")
    return s


def enc_opt(s: str | None) -> str | None:
    return None if s is None else enc(s)


def dec(s: Any) -> Any:
    if s is not None and "\x01" in s:
        return s.replace("\x01\x01", "\x00").replace("\x01\x02", "\x01")
    return s


# -- rows ------------------------------------------------------------------------


def entry_row(e: JournalEntry) -> tuple[Any, ...]:
    return (
        enc(e.invocation_id),
        e.index,
        e.kind.value,
        enc(e.name),
        e.ok,
        e.payload,
        enc_opt(e.type_tag),
        e.attempts,
        e.created_at,
    )


def invocation_row(inv: InvocationRecord) -> tuple[Any, ...]:
    return (
        enc(inv.id),
        enc(inv.target),
        inv.input_hash,
        enc_opt(inv.idempotency_key),
        inv.status.value,
        inv.created_at,
        inv.updated_at,
        enc_opt(inv.last_error),
        enc_opt(inv.actor_type),
        enc_opt(inv.actor_key),
        inv.actor_seq,
        enc_opt(inv.parent_id),
        inv.wake_at,
        inv.deadline,
        enc_opt(inv.cancel_reason),
        inv.partition,
    )


def invocation_from_row(row: Sequence[Any]) -> InvocationRecord:
    return InvocationRecord(
        id=dec(row[0]),
        target=dec(row[1]),
        input_hash=row[2],
        idempotency_key=dec(row[3]),
        status=Status(row[4]),
        created_at=row[5],
        updated_at=row[6],
        last_error=dec(row[7]),
        actor_type=dec(row[8]),
        actor_key=dec(row[9]),
        actor_seq=row[10],
        parent_id=dec(row[11]),
        wake_at=row[12],
        deadline=row[13],
        cancel_reason=dec(row[14]),
        partition=row[15],
    )


def checkpoint_row(c: Checkpoint) -> tuple[Any, ...]:
    return (
        enc(c.actor_type),
        enc(c.actor_key),
        c.seq,
        c.state,
        enc_opt(c.type_tag),
        enc(c.checksum),
        c.state_version,
        c.created_at,
    )


def checkpoint_from_row(row: Sequence[Any]) -> Checkpoint:
    return Checkpoint(
        actor_type=dec(row[0]),
        actor_key=dec(row[1]),
        seq=row[2],
        state=row[3],
        type_tag=dec(row[4]),
        checksum=dec(row[5]),
        state_version=row[6],
        created_at=row[7],
    )


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to one list per column: the arrays that ``unnest`` takes apart."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


# -- errors ----------------------------------------------------------------------


def is_connection_lost(exc: BaseException, conn: Connection | None) -> bool:
    """Whether ``exc`` means the connection is gone (server restart, terminated backend).

    A terminated backend's last word is an error (57P01 admin_shutdown) that
    arrives before the socket closes, so the connection may not look broken
    yet: the error's class tells too.
    """
    import psycopg

    if not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return False
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate.startswith(("08", "57P")):
        return True
    return conn is None or conn.closed or conn.broken


def one_line(exc: BaseException) -> str:
    """libpq's multi-line messages on one line."""
    return " ".join(str(exc).split())


def map_error(exc: BaseException, label: str) -> PerdureError:
    """Translate a psycopg error into Perdure's own, saying what to do."""
    import psycopg
    from psycopg import errors

    if isinstance(exc, PerdureError):
        return exc
    if isinstance(exc, errors.DiskFull | errors.OutOfMemory | errors.InsufficientResources):
        return StorageFullError(
            f"PostgreSQL store {label}: the server has no space left ({exc}). "
            "Free disk space on the database server; everything committed so far is intact."
        )
    if isinstance(exc, errors.UniqueViolation):
        return ConflictError(f"PostgreSQL store {label}: the row is already recorded ({exc})")
    if isinstance(exc, errors.ForeignKeyViolation):
        return ConflictError(
            f"PostgreSQL store {label}: the invocation it belongs to does not exist ({exc})"
        )
    if isinstance(exc, psycopg.IntegrityError):
        return ConflictError(f"PostgreSQL store {label}: {exc}")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return StorageError(
            f"PostgreSQL store {label}: the connection to the server failed ({one_line(exc)}). "
            "Check that the server is running and reachable; the store reconnects on its "
            "next use."
        )
    return StorageError(f"PostgreSQL store {label}: {type(exc).__name__}: {exc}")


# -- the committer ---------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Op:
    """One queued write and the future that waits for its commit."""

    create: tuple[InvocationRecord, JournalEntry] | None
    write: Write | None
    future: asyncio.Future[Any]
    # Or: a function run on the connection inside the batch's transaction.
    call: Callable[[Connection], Awaitable[Any]] | None = None


class _ConnectionLostError(Exception):
    """The writer connection died; ``xid`` is set if it died during COMMIT."""

    def __init__(self, cause: BaseException, xid: str | None, outcomes: list[Any]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.xid = xid
        self.outcomes = outcomes


class _Txn:
    """The transaction id of the batch's current transaction."""

    __slots__ = ("xid",)

    def __init__(self) -> None:
        self.xid = ""


Connect = Callable[[], Awaitable["Connection"]]
# How long an in-doubt COMMIT's transaction may still show as in progress
# (its backend is being torn down) before it counts as undecided.
_IN_DOUBT_WAIT_SECONDS = 2.0


class GroupCommitter:
    """Batches the writes of one event loop onto one PostgreSQL connection."""

    def __init__(
        self,
        connect: Connect,
        loop: asyncio.AbstractEventLoop,
        label: str,
        before_commit: BeforeCommit | None,
    ) -> None:
        self._connect = connect
        self._loop = loop
        self._label = label
        self._before_commit = before_commit
        self._conn: Connection | None = None
        self._pending: list[_Op] = []
        self._flush_scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self.reconnects = 0
        # NOTIFY each finished invocation, for its waiters on other nodes.
        self.announce_finished = False

    def adopt(self, conn: Connection) -> None:
        """Write on ``conn`` (already open) until it dies."""
        self._conn = conn

    # -- queueing ----------------------------------------------------------------

    def submit(
        self,
        create: tuple[InvocationRecord, JournalEntry] | None,
        write: Write | None,
        call: Callable[[Connection], Awaitable[Any]] | None = None,
    ) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        self._pending.append(_Op(create, write, future, call))
        if self._task is None and not self._flush_scheduled:
            # Run after the callbacks ready now, so that the writes they make
            # join this batch.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._task is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._task = self._loop.create_task(self._run(batch))
        self._task.add_done_callback(self._after_batch)

    def _after_batch(self, _task: asyncio.Task[None]) -> None:
        self._task = None
        if self._pending:
            self._flush()
        elif self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def close(self, last: Callable[[Connection], Awaitable[None]] | None = None) -> None:
        """Commit what is queued, run ``last`` on the connection, then close it."""
        if self._pending or self._task is not None or self._flush_scheduled:
            self._drained = self._loop.create_future()
            if self._task is None and not self._flush_scheduled:
                self._flush()
            await self._drained
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if last is not None and not conn.closed and not conn.broken:
                await last(conn)
        finally:
            await conn.close()

    # -- one batch ---------------------------------------------------------------

    async def _run(self, batch: list[_Op]) -> None:
        try:
            await self._run_once_or_twice(batch)
        except BaseException as exc:
            # Whatever happened, no caller is left waiting.
            _fail(batch, map_error(exc, self._label) if isinstance(exc, Exception) else exc)
            if not isinstance(exc, Exception):
                raise

    async def _run_once_or_twice(self, batch: list[_Op]) -> None:
        retried = False
        while True:
            try:
                outcomes = await self._attempt(batch)
            except _ConnectionLostError as lost:
                if lost.xid is not None:
                    committed = await self._resolve(lost.xid)
                    if committed:
                        _settle_all(batch, lost.outcomes)
                        return
                    if committed is None:
                        _fail(
                            batch,
                            StorageError(
                                f"PostgreSQL store {self._label}: the connection died during "
                                f"COMMIT ({one_line(lost.cause)}), and whether the writes were "
                                "recorded cannot be told. Check that the server is running; on "
                                "restart the runtime resumes from what was recorded."
                            ),
                        )
                        return
                if retried:
                    _fail(batch, map_error(lost.cause, self._label))
                    return
                retried = True
                self.reconnects += 1
                continue
            except BaseException as exc:
                _fail(batch, map_error(exc, self._label) if isinstance(exc, Exception) else exc)
                if not isinstance(exc, Exception):
                    raise
                return
            _settle_all(batch, outcomes)
            return

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._conn = None
        if conn is not None:
            await conn.close()
        self._conn = await self._connect()
        return self._conn

    async def _attempt(self, batch: list[_Op]) -> list[Any]:
        """Write and commit ``batch`` once; the outcome of each write, in order."""
        import psycopg

        conn = await self._connection()
        txn = _Txn()
        outcomes: list[Any] = []
        committing = False
        try:
            try:
                await _begin(conn, txn)
                outcomes = await self._write(conn, batch, txn)
                if self._before_commit is not None:
                    self._before_commit(len(batch))
            except BaseException as exc:
                if not is_connection_lost(exc, conn):
                    try:
                        await conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass
                raise
            committing = True
            await conn.execute("COMMIT")
        except psycopg.Error as exc:
            if is_connection_lost(exc, conn):
                self._conn = None
                await conn.close()
                raise _ConnectionLostError(exc, txn.xid if committing else None, outcomes) from exc
            raise map_error(exc, self._label) from None
        return outcomes

    async def _write(self, conn: Connection, batch: list[_Op], txn: _Txn) -> list[Any]:
        import psycopg

        try:
            results = await _apply(conn, batch, self._label, self.announce_finished)
            return [(True, r) for r in results]
        except (psycopg.Error, PerdureError) as exc:
            if is_connection_lost(exc, conn):
                raise
        # Something in the batch failed: redo it write by write.
        await conn.execute("ROLLBACK")
        await _begin(conn, txn)
        outcomes: list[Any] = []
        for op in batch:
            await conn.execute("SAVEPOINT one")
            try:
                outcomes.append(
                    (True, (await _apply(conn, [op], self._label, self.announce_finished))[0])
                )
                await conn.execute("RELEASE one")
            except (psycopg.Error, PerdureError) as exc:
                if is_connection_lost(exc, conn):
                    raise
                await conn.execute("ROLLBACK TO one")
                await conn.execute("RELEASE one")
                outcomes.append((False, _conflict(exc, op, self._label)))
        return outcomes

    async def _resolve(self, xid: str) -> bool | None:
        """Whether the transaction ``xid`` committed; None if that cannot be told."""
        import psycopg

        try:
            conn = await self._connection()
            deadline = self._loop.time() + _IN_DOUBT_WAIT_SECONDS
            while True:
                cur = await conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,))
                row = await cur.fetchone()
                status = None if row is None else row[0]
                if status == "committed":
                    return True
                if status == "aborted":
                    return False
                if status != "in progress" or self._loop.time() > deadline:
                    return None
                await asyncio.sleep(0.02)
        except (psycopg.Error, PerdureError):  # no connection, or another runtime's now
            return None


async def _begin(conn: Connection, txn: _Txn) -> None:
    cur = await conn.execute(_BEGIN)
    cur.nextset()
    row = await cur.fetchone()
    assert row is not None
    txn.xid = row[0]


def _conflict(exc: BaseException, op: _Op, label: str) -> PerdureError:
    """The error of one write that failed alone, naming what it was about."""
    import psycopg

    if not isinstance(exc, psycopg.IntegrityError):
        return map_error(exc, label)
    if op.create is not None:
        inv = op.create[0]
        return ConflictError(f"invocation id {inv.id} is already taken ({exc})")
    assert op.write is not None
    first = op.write.entries[0] if op.write.entries else None
    if first is None:
        return ConflictError(f"PostgreSQL store {label}: {exc}")
    if isinstance(exc, psycopg.errors.ForeignKeyViolation):
        return ConflictError(f"invocation {first.invocation_id} does not exist")
    return ConflictError(
        f"invocation {first.invocation_id}: a journal index of this write "
        f"(from {first.index}) is already recorded"
    )


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if isinstance(value, asyncio.CancelledError):
        future.cancel()  # the batch's task was cancelled (the loop is closing)
    elif ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _settle_all(batch: list[_Op], outcomes: list[Any]) -> None:
    for op, (ok, value) in zip(batch, outcomes, strict=True):
        _settle(op.future, ok, value)


def _fail(batch: list[_Op], error: BaseException) -> None:
    for op in batch:
        _settle(op.future, False, error)


# -- the statements of one batch -------------------------------------------------


async def _apply(
    conn: Connection, batch: list[_Op], label: str, announce: bool = False
) -> list[Any]:
    """Write ``batch`` with one statement per table; raise on any failure."""
    fences: dict[int, set[int]] = {}
    for op in batch:
        if op.write is not None and op.write.fence is not None:
            fences.setdefault(op.write.fence.partition, set()).add(op.write.fence.epoch)
    if fences:
        # FOR SHARE: a takeover's UPDATE of these leases waits for this batch.
        cur = await conn.execute(
            "SELECT part, epoch FROM leases WHERE part = ANY(%s::int4[]) FOR SHARE",
            (list(fences),),
        )
        current: dict[int, int] = {row[0]: row[1] for row in await cur.fetchall()}
        for part, epochs in fences.items():
            for epoch in epochs:
                if current.get(part) != epoch:
                    raise FencedError(part, epoch, current.get(part))
    outcomes: list[Any] = [None] * len(batch)
    journal_rows: list[tuple[Any, ...]] = []
    attempt_rows: list[tuple[Any, ...]] = []
    statuses: dict[str, tuple[Any, ...]] = {}
    idempotent_rows: list[tuple[Any, ...]] = []
    checkpoints: dict[tuple[str, str, int], tuple[Any, ...]] = {}
    prune: list[tuple[str, str, int, bool]] = []
    creates: list[tuple[int, InvocationRecord, JournalEntry]] = []
    for i, op in enumerate(batch):
        if op.create is not None:
            creates.append((i, *op.create))
            continue
        if op.call is not None:
            outcomes[i] = await op.call(conn)
            continue
        w = op.write
        assert w is not None
        journal_rows.extend(entry_row(e) for e in w.entries)
        attempt_rows.extend(
            (enc(a.invocation_id), a.index, a.attempt, a.error, a.created_at) for a in w.attempts
        )
        if w.status is not None:
            s = w.status
            # The later change of one invocation in a batch wins, as it would
            # have in two transactions.
            statuses[s.invocation_id] = (
                enc(s.invocation_id),
                s.status.value,
                s.updated_at,
                enc_opt(s.last_error),
                s.wake_at,
            )
        if w.idempotent is not None:
            r = w.idempotent
            idempotent_rows.append(
                (
                    enc(r.scope),
                    enc(r.key),
                    r.ok,
                    r.payload,
                    enc_opt(r.type_tag),
                    enc(r.invocation_id),
                    r.created_at,
                )
            )
        if w.checkpoint is not None:
            c = w.checkpoint
            # A later checkpoint of the same (actor, seq) replaces the earlier one.
            checkpoints[(c.actor_type, c.actor_key, c.seq)] = checkpoint_row(c)
            if w.retain_checkpoints is not None:
                prune.append((c.actor_type, c.actor_key, w.retain_checkpoints, w.compact_journal))
    if creates:
        await _create_many(conn, creates, outcomes)
    if journal_rows:
        await conn.execute(_INSERT_JOURNAL, _columns(journal_rows, 9))
    if attempt_rows:
        await conn.execute(_INSERT_ATTEMPTS, _columns(attempt_rows, 5))
    if statuses:
        cur = await conn.execute(_UPDATE_STATUSES, _columns(list(statuses.values()), 5))
        if cur.rowcount != len(statuses):
            raise ConflictError(
                f"invocation {next(iter(statuses))} (or another in its batch) does not exist; "
                "cannot set its status"
            )
    if idempotent_rows:
        await conn.execute(_INSERT_IDEMPOTENT, _columns(idempotent_rows, 7))
    if checkpoints:
        await conn.execute(_UPSERT_CHECKPOINTS, _columns(list(checkpoints.values()), 8))
    for actor_type, actor_key, keep, compact in prune:  # one per checkpoint: every N messages
        ident = (enc(actor_type), enc(actor_key), enc(actor_type), enc(actor_key))
        await conn.execute(_PRUNE_CHECKPOINTS, (*ident, keep))
        if compact:
            await conn.execute(f"DELETE FROM journal WHERE invocation_id IN ({_COVERED})", ident)
            await conn.execute(f"DELETE FROM attempts WHERE invocation_id IN ({_COVERED})", ident)
    # NOTIFY payloads: "partition", or "partition:id" when a finished child
    # wakes its parent (the id tells the child's waiters on any node).
    woken: set[str] = {
        str(inv.partition)
        for _, inv, _ in creates
        if inv.status is Status.SUSPENDED and inv.wake_at is not None
    }
    for i, op in enumerate(batch):
        w = op.write
        if w is not None and (w.wakes or w.promises or w.resolution or w.signal or w.cancels):
            outcomes[i] = await _apply_events(conn, w, woken)
    if announce:
        told = {p.partition(":")[2] for p in woken}
        woken.update(
            f":{invocation_id}"
            for invocation_id, row in statuses.items()
            if Status(row[1]).finished and invocation_id not in told
        )
    if woken:
        # Delivered at COMMIT, to every node listening: the owners look at once.
        await conn.execute(
            "SELECT pg_notify('perdure_' || left(md5(current_schema()), 16), p) "
            "FROM unnest(%s::text[]) AS p",
            (sorted(woken),),
        )
    return outcomes


async def _apply_events(conn: Connection, w: Write, woken: set[str]) -> Any:
    """Promises, signals, cancellations and wake-ups; returns a signal's seq."""
    result: Any = None
    wakes = [(x.at, x.invocation_id) for x in w.wakes]
    for p in w.promises:
        try:
            await conn.execute("SAVEPOINT promise")
            await conn.execute(
                "INSERT INTO promises (id, invocation_id, name, state, payload, type_tag, "
                "created_at, resolved_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    enc(p.id),
                    enc(p.invocation_id),
                    enc(p.name),
                    p.state,
                    p.payload,
                    enc_opt(p.type_tag),
                    p.created_at,
                    p.resolved_at,
                ),
            )
            await conn.execute("RELEASE promise")
        except Exception as exc:
            import psycopg

            if not isinstance(exc, psycopg.IntegrityError):
                raise
            await conn.execute("ROLLBACK TO promise")
            raise ConflictError(
                f"promise id {p.id} is already taken, or its invocation does not exist"
            ) from None
    r = w.resolution
    if r is not None:
        cur = await conn.execute(
            "SELECT state, invocation_id FROM promises WHERE id = %s FOR UPDATE",
            (enc(r.promise_id),),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"promise {r.promise_id} does not exist")
        if row[0] != "pending":
            raise ConflictError(f"promise {r.promise_id} is already {row[0]}")
        await conn.execute(
            "UPDATE promises SET state = %s, payload = %s, type_tag = %s, resolved_at = %s "
            "WHERE id = %s",
            (
                "resolved" if r.ok else "rejected",
                r.payload,
                enc_opt(r.type_tag),
                r.at,
                enc(r.promise_id),
            ),
        )
        wakes.append((r.at, dec(row[1])))
    sig = w.signal
    if sig is not None:
        await _check_unfinished(conn, sig.invocation_id, "signal")
        cur = await conn.execute(
            "INSERT INTO signals (invocation_id, seq, name, payload, type_tag, created_at) "
            "SELECT %s, coalesce(max(seq), 0) + 1, %s, %s, %s, %s FROM signals "
            "WHERE invocation_id = %s RETURNING seq",
            (
                enc(sig.invocation_id),
                enc(sig.name),
                sig.payload,
                enc_opt(sig.type_tag),
                sig.created_at,
                enc(sig.invocation_id),
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        result = row[0]
        wakes.append((sig.created_at, sig.invocation_id))
    for c in w.cancels:
        await _check_unfinished(conn, c.invocation_id, "cancel")
        await conn.execute(
            "UPDATE invocations SET cancel_reason = coalesce(cancel_reason, %s) WHERE id = %s",
            (enc(c.reason), enc(c.invocation_id)),
        )
        wakes.append((c.at, c.invocation_id))
    status = w.status
    child = status.invocation_id if status is not None and status.status.finished else None
    for i, (at, invocation_id) in enumerate(wakes):
        cur = await conn.execute(_WAKE, (at, at, enc(invocation_id)))
        suffix = f":{child}" if child is not None and i < len(w.wakes) else ""
        woken.update(f"{row[0]}{suffix}" for row in await cur.fetchall())
    return result


async def _check_unfinished(conn: Connection, invocation_id: str, what: str) -> None:
    # FOR UPDATE: signals to one invocation take their seqs one at a time.
    cur = await conn.execute(
        "SELECT status FROM invocations WHERE id = %s FOR UPDATE", (enc(invocation_id),)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFoundError(f"invocation {invocation_id} does not exist")
    if Status(row[0]).finished:
        raise ConflictError(f"cannot {what} invocation {invocation_id}: it is already {row[0]}")


async def acquire_leases(
    conn: Connection, node: str, partitions: int, ttl: float, now: float
) -> dict[int, int]:
    """The Store.acquire_leases transaction, on PostgreSQL."""
    await conn.execute(
        "INSERT INTO nodes (node, alive_until) VALUES (%s, %s) "
        "ON CONFLICT (node) DO UPDATE SET alive_until = excluded.alive_until",
        (node, now + ttl),
    )
    cur = await conn.execute("SELECT count(*) FROM nodes WHERE alive_until > %s", (now,))
    row = await cur.fetchone()
    want = math.ceil(partitions / max(1, int(row[0]) if row else 1))
    await conn.execute(
        "INSERT INTO leases (part, owner, epoch, expires_at) "
        "SELECT g, NULL, 0, 0 FROM generate_series(0, %s - 1) AS g ON CONFLICT DO NOTHING",
        (partitions,),
    )
    # Every lease row locked, in order: nodes acquiring at once take turns.
    cur = await conn.execute(
        "SELECT part, owner, epoch, expires_at FROM leases ORDER BY part FOR UPDATE"
    )
    rows = await cur.fetchall()
    held: dict[int, int] = {}
    for part, owner, epoch, _ in rows:
        if owner != node:
            continue
        if len(held) < want and part < partitions:
            await conn.execute(
                "UPDATE leases SET expires_at = %s WHERE part = %s", (now + ttl, part)
            )
            held[part] = epoch
        else:
            await conn.execute(
                "UPDATE leases SET owner = NULL, expires_at = %s WHERE part = %s", (now, part)
            )
    for part, owner, epoch, expires_at in rows:
        if len(held) >= want:
            break
        if part >= partitions or part in held or owner == node:
            continue
        if owner is None or expires_at <= now:
            await conn.execute(
                "UPDATE leases SET owner = %s, epoch = %s, expires_at = %s WHERE part = %s",
                (node, epoch + 1, now + ttl, part),
            )
            held[part] = epoch + 1
    return held


async def _create_many(
    conn: Connection,
    creates: list[tuple[int, InvocationRecord, JournalEntry]],
    outcomes: list[Any],
) -> None:
    # A taken id, (target, idempotency key) or (actor type, key, seq) makes
    # its row a no-op; the statement returns the ids that went in, and the
    # input entries of those go in with them.
    invocations = _columns([invocation_row(inv) for _, inv, _ in creates], _INVOCATION_WIDTH)
    entries = _columns([entry_row(entry) for _, _, entry in creates], 9)
    cur = await conn.execute(_CREATE, [*invocations, *entries])
    inserted = {dec(row[0]) for row in await cur.fetchall()}
    for i, inv, _entry in creates:
        if inv.id in inserted:
            outcomes[i] = (inv, True)
            continue
        existing = None
        if inv.idempotency_key is not None:
            cur = await conn.execute(
                _FIND_BY_KEY,
                (enc(inv.target), enc(inv.actor_key or ""), enc(inv.idempotency_key)),
            )
            row = await cur.fetchone()
            existing = None if row is None else invocation_from_row(row)
        if existing is None:
            if inv.actor_type is not None:
                raise ConflictError(
                    f"invocation id {inv.id}, or message {inv.actor_seq} of actor "
                    f"{inv.actor_type}/{inv.actor_key}, is already taken"
                )
            raise ConflictError(f"invocation id {inv.id} is already taken")
        outcomes[i] = (existing, False)
