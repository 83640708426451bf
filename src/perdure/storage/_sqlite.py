"""The embedded SQLite store: one file, WAL, group commit.

One writer thread owns the write connection. Every write the event loop
submits goes into a queue; the writer takes everything queued, applies it in
one transaction, commits (one fsync for the whole batch) and only then
releases each caller. If a batch fails, its writes are retried one by one so
that a single bad write fails alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from .._errors import (
    ConfigurationError,
    ConflictError,
    PerdureError,
    RuntimeLockedError,
    StorageError,
    StorageFullError,
)
from ._base import BeforeCommit, Store
from ._records import (
    Attempt,
    EntryKind,
    IdempotentResult,
    InvocationRecord,
    JournalEntry,
    Status,
    Write,
)

Synchronous = Literal["full", "normal", "off"]

_MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE invocations (
        id TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        input_hash TEXT NOT NULL,
        idempotency_key TEXT,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_error TEXT
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX invocations_by_key ON invocations (target, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX invocations_unfinished ON invocations (status)
        WHERE status IN ('pending', 'running', 'suspended');
    CREATE TABLE journal (
        invocation_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        ok INTEGER NOT NULL,
        payload BLOB NOT NULL,
        type_tag TEXT,
        attempts INTEGER NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (invocation_id, idx)
    );
    CREATE TABLE attempts (
        invocation_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        error BLOB NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (invocation_id, idx, attempt)
    ) WITHOUT ROWID;
    CREATE TABLE idempotent_results (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        ok INTEGER NOT NULL,
        payload BLOB NOT NULL,
        type_tag TEXT,
        invocation_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (scope, key)
    );
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)
_MAX_BATCH = 2048

_INVOCATION_COLUMNS = (
    "id, target, input_hash, idempotency_key, status, created_at, updated_at, last_error"
)
_JOURNAL_COLUMNS = "invocation_id, idx, kind, name, ok, payload, type_tag, attempts, created_at"
_INSERT_JOURNAL = f"INSERT INTO journal ({_JOURNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_ATTEMPT = (
    "INSERT OR IGNORE INTO attempts (invocation_id, idx, attempt, error, created_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
_UPDATE_STATUS = "UPDATE invocations SET status = ?, updated_at = ?, last_error = ? WHERE id = ?"
_INSERT_IDEMPOTENT = (
    "INSERT OR IGNORE INTO idempotent_results "
    "(scope, key, ok, payload, type_tag, invocation_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
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


def _invocation(row: Sequence[Any]) -> InvocationRecord:
    return InvocationRecord(
        id=row[0],
        target=row[1],
        input_hash=row[2],
        idempotency_key=row[3],
        status=Status(row[4]),
        created_at=row[5],
        updated_at=row[6],
        last_error=row[7],
    )


def _entry(row: Sequence[Any]) -> JournalEntry:
    return JournalEntry(
        invocation_id=row[0],
        index=row[1],
        kind=EntryKind(row[2]),
        name=row[3],
        ok=bool(row[4]),
        payload=row[5],
        type_tag=row[6],
        attempts=row[7],
        created_at=row[8],
    )


def _entry_row(e: JournalEntry) -> tuple[Any, ...]:
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


@dataclasses.dataclass(slots=True)
class _Op:
    """One queued write and the future that waits for its commit."""

    create: tuple[InvocationRecord, JournalEntry] | None
    write: Write | None
    future: asyncio.Future[Any]


_STOP = object()


class SQLiteStore(Store):
    """A store in one SQLite file.

    ``synchronous="full"`` (the default) makes every commit durable against
    power loss; ``"normal"`` keeps it durable against a process crash but may
    lose the last commits on power loss, in exchange for fewer fsyncs.
    ``exclusive=True`` takes a lock file so that a second runtime on the same
    file fails fast instead of resuming the same invocations twice.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "full",
        exclusive: bool = False,
        before_commit: BeforeCommit | None = None,
    ) -> None:
        if synchronous not in ("full", "normal", "off"):
            raise ConfigurationError(
                f"synchronous={synchronous!r} is not one of 'full', 'normal', 'off'"
            )
        self.path = str(path)
        self.url = f"sqlite:///{self.path}"
        self.synchronous = synchronous
        self.exclusive = exclusive
        self._before_commit = before_commit
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self._closed = True

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        if not self._closed:
            return
        self._check_directory()
        if self.exclusive:
            self._take_lock()
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name="perdure-sqlite-writer", daemon=True
        )
        self._writer.start()
        try:
            await ready
        except BaseException:
            self._writer.join()
            self._release_lock()
            raise
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="perdure-sqlite-reader")
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        writer = self._writer
        if writer is not None:
            await asyncio.to_thread(writer.join)
        if self._reader is not None:
            await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
            self._reader.shutdown(wait=True)
        self._release_lock()

    def _check_directory(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ConfigurationError(
                f"SQLite store {self.path}: the directory {parent} does not exist; create it first"
            )

    def _take_lock(self) -> None:
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeLockedError(
                f"SQLite store {self.path}: another Perdure runtime (pid {holder}) is "
                "running on this file. Stop it first, or use PostgreSQL for several nodes."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=5.0
        )
        try:
            if writer:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise StorageError(
                        f"SQLite store {self.path}: could not switch to WAL mode (got {mode})"
                    )
                conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            else:
                conn.execute("PRAGMA query_only=1")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"SQLite store {self.path} has schema version {version}, newer than this "
                f"Perdure's {SCHEMA_VERSION}: upgrade Perdure to open it"
            )
        for number in range(version, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[number].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def schema_version(self) -> int:
        row = await self._read("PRAGMA user_version", ())
        return int(row[0][0])

    # -- writer thread ---------------------------------------------------------

    def _writer_main(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect(writer=True)
            self._migrate(conn)
        except BaseException as exc:
            error = map_error(exc, self.path) if isinstance(exc, sqlite3.Error) else exc
            loop.call_soon_threadsafe(_settle_one, ready, False, error)
            return
        loop.call_soon_threadsafe(_settle_one, ready, True, None)
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        stopping = False
        try:
            while not stopping:
                first = get()
                if first is _STOP:
                    break
                batch: list[_Op] = [first]  # type: ignore[list-item]
                while len(batch) < _MAX_BATCH:
                    try:
                        op = get_nowait()
                    except queue.Empty:
                        break
                    if op is _STOP:
                        stopping = True
                        break
                    batch.append(op)  # type: ignore[arg-type]
                results = self._apply_batch(conn, batch)
                loop.call_soon_threadsafe(_settle_all, results)
        finally:
            conn.close()

    def _apply_batch(
        self, conn: sqlite3.Connection, batch: list[_Op]
    ) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        try:
            outcomes = self._transaction(conn, batch)
            return [(op.future, True, out) for op, out in zip(batch, outcomes, strict=True)]
        except (sqlite3.Error, PerdureError) as exc:
            if len(batch) == 1:
                error = map_error(exc, self.path) if isinstance(exc, sqlite3.Error) else exc
                return [(batch[0].future, False, error)]
        # Something in the batch failed: retry one by one so it fails alone.
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        for op in batch:
            results.extend(self._apply_batch(conn, [op]))
        return results

    def _transaction(self, conn: sqlite3.Connection, batch: list[_Op]) -> list[Any]:
        outcomes: list[Any] = []
        journal_rows: list[tuple[Any, ...]] = []
        attempt_rows: list[tuple[Any, ...]] = []
        status_rows: list[tuple[Any, ...]] = []
        idempotent_rows: list[tuple[Any, ...]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                if op.create is not None:
                    outcomes.append(self._create(conn, *op.create))
                    continue
                w = op.write
                assert w is not None
                journal_rows.extend(_entry_row(e) for e in w.entries)
                attempt_rows.extend(
                    (a.invocation_id, a.index, a.attempt, a.error, a.created_at) for a in w.attempts
                )
                if w.status is not None:
                    s = w.status
                    status_rows.append(
                        (s.status.value, s.updated_at, s.last_error, s.invocation_id)
                    )
                if w.idempotent is not None:
                    r = w.idempotent
                    idempotent_rows.append(
                        (
                            r.scope,
                            r.key,
                            int(r.ok),
                            r.payload,
                            r.type_tag,
                            r.invocation_id,
                            r.created_at,
                        )
                    )
                outcomes.append(None)
            if journal_rows:
                try:
                    conn.executemany(_INSERT_JOURNAL, journal_rows)
                except sqlite3.IntegrityError as exc:
                    first = journal_rows[0]
                    raise ConflictError(
                        f"invocation {first[0]}: journal index {first[1]} is already "
                        f"recorded ({exc})"
                    ) from None
            if attempt_rows:
                conn.executemany(_INSERT_ATTEMPT, attempt_rows)
            if status_rows:
                cur = conn.executemany(_UPDATE_STATUS, status_rows)
                if cur.rowcount != len(status_rows):
                    raise ConflictError(
                        f"invocation {status_rows[0][3]} does not exist; cannot set its status"
                    )
            if idempotent_rows:
                conn.executemany(_INSERT_IDEMPOTENT, idempotent_rows)
            if self._before_commit is not None:
                self._before_commit(len(batch))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    def _create(
        self, conn: sqlite3.Connection, inv: InvocationRecord, entry: JournalEntry
    ) -> tuple[InvocationRecord, bool]:
        if inv.idempotency_key is not None:
            row = conn.execute(
                f"SELECT {_INVOCATION_COLUMNS} FROM invocations "
                "WHERE target = ? AND idempotency_key = ?",
                (inv.target, inv.idempotency_key),
            ).fetchone()
            if row is not None:
                return _invocation(row), False
        try:
            conn.execute(
                f"INSERT INTO invocations ({_INVOCATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    inv.id,
                    inv.target,
                    inv.input_hash,
                    inv.idempotency_key,
                    inv.status.value,
                    inv.created_at,
                    inv.updated_at,
                    inv.last_error,
                ),
            )
        except sqlite3.IntegrityError:
            raise ConflictError(f"invocation id {inv.id} is already taken") from None
        conn.execute(_INSERT_JOURNAL, _entry_row(entry))
        return inv, True

    def _submit(self, op: _Op) -> asyncio.Future[Any]:
        if self._closed:
            raise StorageError(
                f"SQLite store {self.path} is closed; open it (or the Runtime) first"
            )
        self._queue.put(op)
        return op.future

    async def create_invocation(
        self, invocation: InvocationRecord, input_entry: JournalEntry
    ) -> tuple[InvocationRecord, bool]:
        loop = self._loop
        assert loop is not None, "store is not open"
        result: tuple[InvocationRecord, bool] = await self._submit(
            _Op((invocation, input_entry), None, loop.create_future())
        )
        return result

    async def commit(self, write: Write) -> None:
        loop = self._loop
        if loop is None:
            raise StorageError(f"SQLite store {self.path} is not open")
        await self._submit(_Op(None, write, loop.create_future()))

    # -- reads -----------------------------------------------------------------

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        if self._read_conn is None:
            self._read_conn = self._connect(writer=False)
        try:
            return self._read_conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise map_error(exc, self.path) from None

    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        if self._closed or self._reader is None:
            raise StorageError(
                f"SQLite store {self.path} is closed; open it (or the Runtime) first"
            )
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._query, sql, params
        )

    async def get_invocation(self, invocation_id: str) -> InvocationRecord | None:
        rows = await self._read(
            f"SELECT {_INVOCATION_COLUMNS} FROM invocations WHERE id = ?", (invocation_id,)
        )
        return _invocation(rows[0]) if rows else None

    async def find_invocation(self, target: str, idempotency_key: str) -> InvocationRecord | None:
        rows = await self._read(
            f"SELECT {_INVOCATION_COLUMNS} FROM invocations "
            "WHERE target = ? AND idempotency_key = ?",
            (target, idempotency_key),
        )
        return _invocation(rows[0]) if rows else None

    async def list_invocations(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        target: str | None = None,
        limit: int | None = None,
    ) -> list[InvocationRecord]:
        where: list[str] = []
        params: list[Any] = []
        if statuses is not None:
            values = [Status(s).value for s in statuses]
            where.append(f"status IN ({', '.join('?' * len(values))})")
            params.extend(values)
        if target is not None:
            where.append("target = ?")
            params.append(target)
        sql = f"SELECT {_INVOCATION_COLUMNS} FROM invocations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_invocation(r) for r in await self._read(sql, params)]

    async def read_journal(self, invocation_id: str) -> list[JournalEntry]:
        rows = await self._read(
            f"SELECT {_JOURNAL_COLUMNS} FROM journal WHERE invocation_id = ? ORDER BY idx",
            (invocation_id,),
        )
        return [_entry(r) for r in rows]

    async def read_attempts(self, invocation_id: str) -> list[Attempt]:
        rows = await self._read(
            "SELECT invocation_id, idx, attempt, error, created_at FROM attempts "
            "WHERE invocation_id = ? ORDER BY idx, attempt",
            (invocation_id,),
        )
        return [
            Attempt(invocation_id=r[0], index=r[1], attempt=r[2], error=r[3], created_at=r[4])
            for r in rows
        ]

    async def get_idempotent_result(self, scope: str, key: str) -> IdempotentResult | None:
        rows = await self._read(
            "SELECT scope, key, ok, payload, type_tag, invocation_id, created_at "
            "FROM idempotent_results WHERE scope = ? AND key = ?",
            (scope, key),
        )
        if not rows:
            return None
        r = rows[0]
        return IdempotentResult(
            scope=r[0],
            key=r[1],
            ok=bool(r[2]),
            payload=r[3],
            type_tag=r[4],
            invocation_id=r[5],
            created_at=r[6],
        )


def _settle_one(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _settle_all(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        _settle_one(future, ok, value)
