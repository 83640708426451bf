"""Group commit for the SQLite store.

Writes from every concurrent invocation queue up on the event loop. The loop
writes a whole batch's rows in one transaction, with one multi-row statement
per table, and a committer thread runs the COMMIT: the fsync, with the GIL
released. Callers are released only after their batch committed. While one
batch commits, the next one gathers.

Why this split: Python's sqlite3 releases the GIL around every statement
step, and a thread that wants it back waits for the busy event loop (up to
a switch interval each time). A writer thread doing all the work paid that
wait a dozen times per batch; here the committer pays it once.

A batch in which one write fails (a journal index already taken) is redone
with a savepoint per write, so the bad write fails alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import (
    ConflictError,
    FencedError,
    NotFoundError,
    PerdureError,
    StorageError,
    StorageFullError,
)
from ._base import AfterCommit, BeforeCommit
from ._records import UNFINISHED, Checkpoint, InvocationRecord, JournalEntry, Status, Write

INVOCATION_COLUMNS = (
    "id, target, input_hash, idempotency_key, status, created_at, updated_at, last_error, "
    "actor_type, actor_key, actor_seq, parent_id, wake_at, deadline, cancel_reason, part"
)
_INVOCATION_WIDTH = 16
CHECKPOINT_COLUMNS = (
    "actor_type, actor_key, seq, state, type_tag, checksum, state_version, created_at"
)
JOURNAL_COLUMNS = "invocation_id, idx, kind, name, ok, payload, type_tag, attempts, created_at"


_INSERT_JOURNAL_HEAD = f"INSERT INTO journal ({JOURNAL_COLUMNS}) VALUES "
_INSERT_INVOCATION_HEAD = f"INSERT INTO invocations ({INVOCATION_COLUMNS}) VALUES "
_INSERT_ATTEMPT_HEAD = (
    "INSERT OR IGNORE INTO attempts (invocation_id, idx, attempt, error, created_at) VALUES "
)
_INSERT_CHECKPOINT_HEAD = f"INSERT OR REPLACE INTO checkpoints ({CHECKPOINT_COLUMNS}) VALUES "
_INSERT_IDEMPOTENT_HEAD = (
    "INSERT OR IGNORE INTO idempotent_results "
    "(scope, key, ok, payload, type_tag, invocation_id, created_at) VALUES "
)
_MAX_VARIABLES = 32766  # SQLite's default limit on ? parameters per statement


def _chunks(rows: list[Any], size: int) -> list[list[Any]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _insert_many(
    conn: sqlite3.Connection,
    head: str,
    width: int,
    rows: list[tuple[Any, ...]],
    suffix: str = "",
) -> None:
    """Insert ``rows`` with as few statements (and GIL hand-offs) as possible."""
    one = "(" + ", ".join("?" * width) + ")"
    for chunk in _chunks(rows, _MAX_VARIABLES // width):
        conn.execute(
            head + ", ".join([one] * len(chunk)) + suffix, [x for row in chunk for x in row]
        )


def map_error(exc: sqlite3.Error, path: str) -> PerdureError:
    """Translate a sqlite3 error into Perdure's own, saying what to do."""
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or "full" in str(exc):
        return StorageFullError(
            f"SQLite store {path}: the disk (or the database's size limit) is full: {exc}. "
            "Free space and restart; everything committed so far is intact."
        )
    if name in {"SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"} or (
        isinstance(exc, sqlite3.OperationalError)
        and ("readonly" in str(exc) or "unable to open" in str(exc))
    ):
        return StorageError(
            f"SQLite store {path}: cannot open or write the database file ({exc}). "
            "Check that the path is a file in a writable directory."
        )
    if name in {"SQLITE_BUSY", "SQLITE_LOCKED"}:
        return StorageError(
            f"SQLite store {path}: the database is locked by another connection ({exc}). "
            "Only one Perdure runtime may write to a SQLite file."
        )
    if name == "SQLITE_CORRUPT" or name == "SQLITE_NOTADB":
        return StorageError(
            f"SQLite store {path}: the file is not a valid database or is corrupt ({exc})."
        )
    return StorageError(f"SQLite store {path}: {type(exc).__name__}: {exc}")


def entry_row(e: JournalEntry) -> tuple[Any, ...]:
    return (
        e.invocation_id,
        e.index,
        e.kind.value,
        e.name,
        int(e.ok),
        e.payload,
        e.type_tag,
        e.attempts,
        e.created_at,
    )


def invocation_from_row(row: Sequence[Any]) -> InvocationRecord:
    return InvocationRecord(
        id=row[0],
        target=row[1],
        input_hash=row[2],
        idempotency_key=row[3],
        status=Status(row[4]),
        created_at=row[5],
        updated_at=row[6],
        last_error=row[7],
        actor_type=row[8],
        actor_key=row[9],
        actor_seq=row[10],
        parent_id=row[11],
        wake_at=row[12],
        deadline=row[13],
        cancel_reason=row[14],
        partition=row[15],
    )


def invocation_row(inv: InvocationRecord) -> tuple[Any, ...]:
    return (
        inv.id,
        inv.target,
        inv.input_hash,
        inv.idempotency_key,
        inv.status.value,
        inv.created_at,
        inv.updated_at,
        inv.last_error,
        inv.actor_type,
        inv.actor_key,
        inv.actor_seq,
        inv.parent_id,
        inv.wake_at,
        inv.deadline,
        inv.cancel_reason,
        inv.partition,
    )


def checkpoint_row(c: Checkpoint) -> tuple[Any, ...]:
    return (
        c.actor_type,
        c.actor_key,
        c.seq,
        c.state,
        c.type_tag,
        c.checksum,
        c.state_version,
        c.created_at,
    )


def checkpoint_from_row(row: Sequence[Any]) -> Checkpoint:
    return Checkpoint(
        actor_type=row[0],
        actor_key=row[1],
        seq=row[2],
        state=row[3],
        type_tag=row[4],
        checksum=row[5],
        state_version=row[6],
        created_at=row[7],
    )


@dataclasses.dataclass(slots=True)
class _Op:
    """One queued write and the future that waits for its commit."""

    create: tuple[InvocationRecord, JournalEntry] | None
    write: Write | None
    future: asyncio.Future[Any]
    # Or: a function run on the connection inside the batch's transaction.
    call: Callable[[sqlite3.Connection], Any] | None = None


_STOP: Any = object()
# A lone write commits on the event loop itself while commits take less than
# this on average; slower disks always commit on the committer thread.
_INLINE_COMMIT_SECONDS = 0.001


class GroupCommitter:
    """Batches the writes of one event loop onto one SQLite connection."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        loop: asyncio.AbstractEventLoop,
        path: str,
        before_commit: BeforeCommit | None,
        after_commit: AfterCommit | None = None,
    ) -> None:
        self._conn = conn
        self._loop = loop
        self._path = path
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._pending: list[_Op] = []
        self._flush_scheduled = False
        self._in_flight = False
        self._drained: asyncio.Future[None] | None = None
        self._commit_seconds = 0.0
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._commit_loop, name="perdure-sqlite-commit", daemon=True
        )
        self._thread.start()

    # -- event loop side -------------------------------------------------------

    def submit(
        self,
        create: tuple[InvocationRecord, JournalEntry] | None,
        write: Write | None,
        call: Callable[[sqlite3.Connection], Any] | None = None,
    ) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        self._pending.append(_Op(create, write, future, call))
        if not self._in_flight and not self._flush_scheduled:
            # Run after the callbacks ready now, so that the writes they make
            # join this batch.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._in_flight or not self._pending:
            return
        batch, self._pending = self._pending, []
        conn = self._conn
        began = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail(batch, map_error(exc, self._path))
            return
        try:
            outcomes = self._write(batch)
            if self._before_commit is not None:
                self._before_commit(len(batch))
        except BaseException as exc:
            conn.execute("ROLLBACK")
            self._fail(batch, map_error(exc, self._path) if isinstance(exc, sqlite3.Error) else exc)
            if not isinstance(exc, Exception):
                raise
            return
        if len(batch) == 1 and self._commit_seconds < _INLINE_COMMIT_SECONDS:
            # A lone write: the loop has nothing else to do, and handing the
            # COMMIT to the committer thread would cost two thread wake-ups
            # (~40 us each here) on top of the fsync.
            committing = time.perf_counter()
            failure = self._commit()
            self._record_commit_time(time.perf_counter() - committing)
            self._committed(batch, outcomes, failure, began)
            return
        self._in_flight = True
        self._jobs.put((batch, outcomes, began))

    def _fail(self, batch: list[_Op], error: BaseException) -> None:
        for op in batch:
            _settle(op.future, False, error)
        self._after_batch()

    def _write(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        conn = self._conn
        conn.execute("SAVEPOINT batch")
        try:
            results = _apply(conn, batch)
            conn.execute("RELEASE batch")
            return [(True, r) for r in results]
        except (sqlite3.Error, PerdureError):
            conn.execute("ROLLBACK TO batch")
            conn.execute("RELEASE batch")
        # Something in the batch failed: redo it write by write.
        outcomes: list[tuple[bool, Any]] = []
        for op in batch:
            conn.execute("SAVEPOINT one")
            try:
                outcomes.append((True, _apply(conn, [op])[0]))
                conn.execute("RELEASE one")
            except (sqlite3.Error, PerdureError) as exc:
                conn.execute("ROLLBACK TO one")
                conn.execute("RELEASE one")
                error = map_error(exc, self._path) if isinstance(exc, sqlite3.Error) else exc
                outcomes.append((False, error))
        return outcomes

    def _committed(
        self,
        batch: list[_Op],
        outcomes: list[tuple[bool, Any]],
        error: BaseException | None,
        began: float,
    ) -> None:
        self._in_flight = False
        if error is None and self._after_commit is not None:
            try:
                self._after_commit(len(batch), time.perf_counter() - began)
            except Exception:
                pass  # observing a commit must not fail it; the hook logs its own
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            if error is not None:
                _settle(op.future, False, error)
            else:
                _settle(op.future, ok, value)
        self._after_batch()

    def _after_batch(self) -> None:
        if self._pending:
            self._flush()
        elif self._drained is not None and not self._in_flight and not self._drained.done():
            self._drained.set_result(None)

    async def close(self) -> None:
        """Commit what is queued, then stop the committer thread."""
        if self._pending or self._in_flight or self._flush_scheduled:
            self._drained = self._loop.create_future()
            if not self._in_flight and not self._flush_scheduled:
                self._flush()
            await self._drained
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # -- committer thread ------------------------------------------------------

    def _commit_loop(self) -> None:
        loop = self._loop
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            batch, outcomes, began = job
            committing = time.perf_counter()
            error = self._commit()
            self._record_commit_time(time.perf_counter() - committing)
            loop.call_soon_threadsafe(self._committed, batch, outcomes, error, began)

    def _commit(self) -> BaseException | None:
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return map_error(exc, self._path)
        return None

    def _record_commit_time(self, seconds: float) -> None:
        # An exponential moving average: a slow disk soon stops inline commits.
        self._commit_seconds += (seconds - self._commit_seconds) * 0.2


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _apply(conn: sqlite3.Connection, batch: list[_Op]) -> list[Any]:
    """Write ``batch`` with one multi-row statement per table; raise on any failure."""
    outcomes: list[Any] = [None] * len(batch)
    journal_rows: list[tuple[Any, ...]] = []
    attempt_rows: list[tuple[Any, ...]] = []
    status_rows: list[tuple[Any, ...]] = []
    idempotent_rows: list[tuple[Any, ...]] = []
    checkpoint_rows: list[tuple[Any, ...]] = []
    prune: list[tuple[str, str, int, bool]] = []
    creates: list[tuple[int, InvocationRecord, JournalEntry]] = []
    for i, op in enumerate(batch):
        if op.create is not None:
            creates.append((i, *op.create))
            continue
        if op.call is not None:
            outcomes[i] = op.call(conn)
            continue
        w = op.write
        assert w is not None
        if w.fence is not None:
            check_fence(conn, w.fence.partition, w.fence.epoch)
        journal_rows.extend(entry_row(e) for e in w.entries)
        attempt_rows.extend(
            (a.invocation_id, a.index, a.attempt, a.error, a.created_at) for a in w.attempts
        )
        if w.status is not None:
            s = w.status
            status_rows.append(
                (s.invocation_id, s.status.value, s.updated_at, s.last_error, s.wake_at)
            )
        if w.idempotent is not None:
            r = w.idempotent
            idempotent_rows.append(
                (r.scope, r.key, int(r.ok), r.payload, r.type_tag, r.invocation_id, r.created_at)
            )
        if w.checkpoint is not None:
            checkpoint_rows.append(checkpoint_row(w.checkpoint))
            if w.retain_checkpoints is not None:
                prune.append(
                    (
                        w.checkpoint.actor_type,
                        w.checkpoint.actor_key,
                        w.retain_checkpoints,
                        w.compact_journal,
                    )
                )
    if creates:
        _create_many(conn, creates, outcomes, journal_rows)
    if journal_rows:
        try:
            _insert_many(conn, _INSERT_JOURNAL_HEAD, 9, journal_rows)
        except sqlite3.IntegrityError as exc:
            first = journal_rows[0]
            if "FOREIGN KEY" in str(exc):
                raise ConflictError(
                    f"invocation {first[0]} (or another in the batch) does not exist"
                ) from None
            raise ConflictError(
                f"invocation {first[0]}: journal index {first[1]} is already recorded ({exc})"
            ) from None
    if attempt_rows:
        try:
            _insert_many(conn, _INSERT_ATTEMPT_HEAD, 5, attempt_rows)
        except sqlite3.IntegrityError:
            raise ConflictError(
                f"invocation {attempt_rows[0][0]} (or another in the batch) does not exist"
            ) from None
    if status_rows:
        _update_statuses(conn, status_rows)
    for i, op in enumerate(batch):
        w = op.write
        if w is not None and (w.wakes or w.promises or w.resolution or w.signal or w.cancels):
            outcomes[i] = _apply_events(conn, w)
    if idempotent_rows:
        _insert_many(conn, _INSERT_IDEMPOTENT_HEAD, 7, idempotent_rows)
    if checkpoint_rows:
        # A later checkpoint of the same (actor, seq), in this batch or
        # before it, replaces the earlier one.
        _insert_many(conn, _INSERT_CHECKPOINT_HEAD, 8, checkpoint_rows)
    for actor_type, actor_key, keep, compact in prune:  # one per checkpoint: every N messages
        conn.execute(
            "DELETE FROM checkpoints WHERE actor_type = ? AND actor_key = ? AND seq NOT IN "
            "(SELECT seq FROM checkpoints WHERE actor_type = ? AND actor_key = ? "
            "ORDER BY seq DESC LIMIT ?)",
            (actor_type, actor_key, actor_type, actor_key, keep),
        )
        if compact:
            covered = (
                "SELECT id FROM invocations WHERE actor_type = ? AND actor_key = ? AND actor_seq "
                "<= (SELECT min(seq) FROM checkpoints WHERE actor_type = ? AND actor_key = ?)"
            )
            ident = (actor_type, actor_key, actor_type, actor_key)
            conn.execute(f"DELETE FROM journal WHERE invocation_id IN ({covered})", ident)
            conn.execute(f"DELETE FROM attempts WHERE invocation_id IN ({covered})", ident)
    return outcomes


def _create_many(
    conn: sqlite3.Connection,
    creates: list[tuple[int, InvocationRecord, JournalEntry]],
    outcomes: list[Any],
    journal_rows: list[tuple[Any, ...]],
) -> None:
    rows = [invocation_row(inv) for _, inv, _ in creates]
    # A taken id, (target, idempotency key) or (actor type, key, seq) makes
    # its row a no-op; which rows went in is read back in one step.
    _insert_many(
        conn, _INSERT_INVOCATION_HEAD, _INVOCATION_WIDTH, rows, suffix=" ON CONFLICT DO NOTHING"
    )
    inserted: set[str] = set()
    for chunk in _chunks([inv.id for _, inv, _ in creates], 4096):
        found = conn.execute(
            "SELECT group_concat(id, ',') FROM invocations WHERE id IN "
            f"({','.join('?' * len(chunk))})",
            chunk,
        ).fetchone()[0]
        if found:
            inserted.update(found.split(","))
    for i, inv, entry in creates:
        if inv.id in inserted:
            outcomes[i] = (inv, True)
            journal_rows.append(entry_row(entry))
            continue
        existing = None
        if inv.idempotency_key is not None:
            row = conn.execute(
                f"SELECT {INVOCATION_COLUMNS} FROM invocations "
                "WHERE target = ? AND coalesce(actor_key, '') = ? AND idempotency_key = ?",
                (inv.target, inv.actor_key or "", inv.idempotency_key),
            ).fetchone()
            existing = None if row is None else invocation_from_row(row)
        if existing is None:
            if inv.actor_type is not None:
                raise ConflictError(
                    f"invocation id {inv.id}, or message {inv.actor_seq} of actor "
                    f"{inv.actor_type}/{inv.actor_key}, is already taken"
                )
            raise ConflictError(f"invocation id {inv.id} is already taken")
        outcomes[i] = (existing, False)


_UNFINISHED_SQL = "(" + ", ".join(f"'{s.value}'" for s in UNFINISHED) + ")"
# A wake-up: resume at ``at``, or sooner if one is already pending.
_WAKE_SQL = (
    "UPDATE invocations SET wake_at = min(coalesce(wake_at, ?1), ?1) "
    f"WHERE id = ?2 AND status IN {_UNFINISHED_SQL}"
)


def _apply_events(conn: sqlite3.Connection, w: Write) -> Any:
    """Promises, signals, cancellations and wake-ups; returns a signal's seq."""
    result: Any = None
    wakes = [(x.at, x.invocation_id) for x in w.wakes]
    if w.promises:
        try:
            _insert_many(
                conn,
                "INSERT INTO promises (id, invocation_id, name, state, payload, type_tag, "
                "created_at, resolved_at) VALUES ",
                8,
                [
                    (
                        p.id,
                        p.invocation_id,
                        p.name,
                        p.state,
                        p.payload,
                        p.type_tag,
                        p.created_at,
                        p.resolved_at,
                    )
                    for p in w.promises
                ],
            )
        except sqlite3.IntegrityError as exc:
            first = w.promises[0]
            if "FOREIGN KEY" in str(exc):
                raise ConflictError(
                    f"invocation {first.invocation_id} (the owner of promise {first.id}) "
                    "does not exist"
                ) from None
            raise ConflictError(f"promise id {first.id} is already taken ({exc})") from None
    r = w.resolution
    if r is not None:
        row = conn.execute(
            "SELECT state, invocation_id FROM promises WHERE id = ?", (r.promise_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"promise {r.promise_id} does not exist")
        if row[0] != "pending":
            raise ConflictError(f"promise {r.promise_id} is already {row[0]}")
        conn.execute(
            "UPDATE promises SET state = ?, payload = ?, type_tag = ?, resolved_at = ? "
            "WHERE id = ?",
            ("resolved" if r.ok else "rejected", r.payload, r.type_tag, r.at, r.promise_id),
        )
        wakes.append((r.at, row[1]))
    sig = w.signal
    if sig is not None:
        _check_unfinished(conn, sig.invocation_id, "signal")
        seq = conn.execute(
            "SELECT coalesce(max(seq), 0) + 1 FROM signals WHERE invocation_id = ?",
            (sig.invocation_id,),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO signals (invocation_id, seq, name, payload, type_tag, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (sig.invocation_id, seq, sig.name, sig.payload, sig.type_tag, sig.created_at),
        )
        wakes.append((sig.created_at, sig.invocation_id))
        result = seq
    for c in w.cancels:
        _check_unfinished(conn, c.invocation_id, "cancel")
        conn.execute(
            "UPDATE invocations SET cancel_reason = coalesce(cancel_reason, ?) WHERE id = ?",
            (c.reason, c.invocation_id),
        )
        wakes.append((c.at, c.invocation_id))
    if wakes:
        conn.executemany(_WAKE_SQL, wakes)
    return result


def check_fence(conn: sqlite3.Connection, partition: int, epoch: int) -> None:
    row = conn.execute("SELECT epoch FROM leases WHERE part = ?", (partition,)).fetchone()
    if row is None or row[0] != epoch:
        raise FencedError(partition, epoch, None if row is None else row[0])


def acquire_leases(
    conn: sqlite3.Connection, node: str, partitions: int, ttl: float, now: float
) -> dict[int, int]:
    """The Store.acquire_leases transaction, on SQLite."""
    conn.execute(
        "INSERT INTO nodes (node, alive_until) VALUES (?, ?) "
        "ON CONFLICT (node) DO UPDATE SET alive_until = excluded.alive_until",
        (node, now + ttl),
    )
    live = conn.execute("SELECT count(*) FROM nodes WHERE alive_until > ?", (now,)).fetchone()[0]
    want = math.ceil(partitions / max(live, 1))
    held: dict[int, int] = {}
    mine = conn.execute(
        "SELECT part, epoch FROM leases WHERE owner = ? ORDER BY part", (node,)
    ).fetchall()
    for part, epoch in mine:
        if len(held) < want and part < partitions:
            conn.execute("UPDATE leases SET expires_at = ? WHERE part = ?", (now + ttl, part))
            held[part] = epoch
        else:
            conn.execute(
                "UPDATE leases SET owner = NULL, expires_at = ? WHERE part = ?", (now, part)
            )
    if len(held) < want:
        rows = dict(
            conn.execute(
                "SELECT part, epoch FROM leases WHERE part < ? AND "
                "(owner IS NULL OR expires_at <= ?)",
                (partitions, now),
            ).fetchall()
        )
        known = {r[0] for r in conn.execute("SELECT part FROM leases").fetchall()}
        for part in range(partitions):
            if len(held) >= want:
                break
            if part in held:
                continue
            if part not in known:
                conn.execute(
                    "INSERT INTO leases (part, owner, epoch, expires_at) VALUES (?, ?, 1, ?)",
                    (part, node, now + ttl),
                )
                held[part] = 1
            elif part in rows:
                conn.execute(
                    "UPDATE leases SET owner = ?, epoch = epoch + 1, expires_at = ? WHERE part = ?",
                    (node, now + ttl, part),
                )
                held[part] = rows[part] + 1
    return held


def _check_unfinished(conn: sqlite3.Connection, invocation_id: str, what: str) -> None:
    row = conn.execute("SELECT status FROM invocations WHERE id = ?", (invocation_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"invocation {invocation_id} does not exist")
    if Status(row[0]).finished:
        raise ConflictError(f"cannot {what} invocation {invocation_id}: it is already {row[0]}")


def _update_statuses(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    wanted = len({r[0] for r in rows})
    changed = 0
    for chunk in _chunks(rows, 2000):
        # To suspended: keep a pending wake-up that is sooner (it raced with
        # the suspension); to any other status: clear it.
        cur = conn.execute(
            "UPDATE invocations SET status = v.column2, updated_at = v.column3, "
            "last_error = v.column4, wake_at = CASE WHEN v.column2 != 'suspended' THEN NULL "
            "WHEN invocations.wake_at IS NULL THEN v.column5 WHEN v.column5 IS NULL "
            "THEN invocations.wake_at ELSE min(invocations.wake_at, v.column5) END FROM (VALUES "
            + ",".join(["(?, ?, ?, ?, ?)"] * len(chunk))
            + ") AS v WHERE invocations.id = v.column1",
            [x for row in chunk for x in row],
        )
        changed += cur.rowcount
    if changed != wanted:
        raise ConflictError(
            f"invocation {rows[0][0]} (or another in its batch) does not exist; "
            "cannot set its status"
        )
