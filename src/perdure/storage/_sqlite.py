"""The embedded SQLite store: one file, WAL, group commit.

Writes go through :class:`GroupCommitter` (see ``_sqlite_batch``): one
transaction and one fsync per batch of concurrent writes. Reads run on a
reader thread with their own connection, which WAL lets proceed while a
batch commits.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from .._errors import ConfigurationError, JournalDecodeError, RuntimeLockedError, StorageError
from ._base import AfterCommit, BeforeCommit, Store
from ._records import (
    Attempt,
    Checkpoint,
    EntryKind,
    IdempotentResult,
    InvocationRecord,
    JournalEntry,
    Lease,
    PromiseRecord,
    SignalRecord,
    Status,
    Write,
)
from ._sqlite_batch import (
    CHECKPOINT_COLUMNS,
    INVOCATION_COLUMNS,
    JOURNAL_COLUMNS,
    GroupCommitter,
    acquire_leases,
    checkpoint_from_row,
    invocation_from_row,
    map_error,
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
        invocation_id TEXT NOT NULL REFERENCES invocations (id),
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
        invocation_id TEXT NOT NULL REFERENCES invocations (id),
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
    # version 2: durable actors. A message to an actor is an invocation with
    # its place in the actor's message log; checkpoints hold actor state.
    """
    ALTER TABLE invocations ADD COLUMN actor_type TEXT;
    ALTER TABLE invocations ADD COLUMN actor_key TEXT;
    ALTER TABLE invocations ADD COLUMN actor_seq INTEGER;
    CREATE UNIQUE INDEX invocations_by_actor ON invocations (actor_type, actor_key, actor_seq)
        WHERE actor_type IS NOT NULL;
    DROP INDEX invocations_by_key;
    CREATE UNIQUE INDEX invocations_by_key
        ON invocations (target, coalesce(actor_key, ''), idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE checkpoints (
        actor_type TEXT NOT NULL,
        actor_key TEXT NOT NULL,
        seq INTEGER NOT NULL,
        state BLOB NOT NULL,
        type_tag TEXT,
        checksum TEXT NOT NULL,
        state_version INTEGER NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (actor_type, actor_key, seq)
    );
    """,
    # version 3: durable timers, promises, signals, children, cancellation.
    """
    ALTER TABLE invocations ADD COLUMN parent_id TEXT;
    ALTER TABLE invocations ADD COLUMN wake_at REAL;
    ALTER TABLE invocations ADD COLUMN deadline REAL;
    ALTER TABLE invocations ADD COLUMN cancel_reason TEXT;
    CREATE INDEX invocations_wake ON invocations (wake_at)
        WHERE status = 'suspended' AND wake_at IS NOT NULL;
    CREATE INDEX invocations_children ON invocations (parent_id)
        WHERE parent_id IS NOT NULL;
    CREATE TABLE promises (
        id TEXT PRIMARY KEY,
        invocation_id TEXT NOT NULL REFERENCES invocations (id),
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        payload BLOB,
        type_tag TEXT,
        created_at REAL NOT NULL,
        resolved_at REAL
    ) WITHOUT ROWID;
    CREATE TABLE signals (
        invocation_id TEXT NOT NULL REFERENCES invocations (id),
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        payload BLOB NOT NULL,
        type_tag TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (invocation_id, seq)
    ) WITHOUT ROWID;
    """,
    # version 4: partitions and their leases (several nodes on one store).
    """
    ALTER TABLE invocations ADD COLUMN part INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE leases (
        part INTEGER PRIMARY KEY,
        owner TEXT,
        epoch INTEGER NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        alive_until REAL NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)
_MAX_BATCH = 2048


def _entry(row: Sequence[Any]) -> JournalEntry:
    try:
        kind = EntryKind(row[2])
        if row[4] not in (0, 1) or not isinstance(row[5], bytes):
            raise ValueError(f"ok={row[4]!r} and a {type(row[5]).__name__} payload")
    except ValueError as exc:
        raise JournalDecodeError(row[0], row[1], f"the row is malformed ({exc})") from None
    return JournalEntry(
        invocation_id=row[0],
        index=row[1],
        kind=kind,
        name=row[3],
        ok=bool(row[4]),
        payload=row[5],
        type_tag=row[6],
        attempts=row[7],
        created_at=row[8],
    )


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
        after_commit: AfterCommit | None = None,
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
        self._after_commit = after_commit
        self._committer: GroupCommitter | None = None
        self._write_conn: sqlite3.Connection | None = None
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
        try:
            conn = await asyncio.to_thread(self._open_writer)
        except BaseException:
            self._release_lock()
            raise
        self._write_conn = conn
        self._committer = GroupCommitter(
            conn, self._loop, self.path, self._before_commit, self._after_commit
        )
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="perdure-sqlite-reader")
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            await self._committer.close()
            self._committer = None
        if self._write_conn is not None:
            self._write_conn.close()
            self._write_conn = None
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
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(
                f"SQLite store {self.path}: cannot create the lock file {lock_path} "
                f"({exc.strerror}). Put the database in a writable directory."
            ) from None
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
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=5.0,
            cached_statements=512,
        )
        try:
            if writer:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise StorageError(
                        f"SQLite store {self.path}: could not switch to WAL mode (got {mode})"
                    )
                conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
                conn.execute("PRAGMA foreign_keys=ON")
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

    def _open_writer(self) -> sqlite3.Connection:
        try:
            conn = self._connect(writer=True)
        except sqlite3.Error as exc:
            raise map_error(exc, self.path) from None
        try:
            self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise map_error(exc, self.path) from None
        except BaseException:
            conn.close()
            raise
        return conn

    async def schema_version(self) -> int:
        row = await self._read("PRAGMA user_version", ())
        return int(row[0][0])

    # -- writer thread ---------------------------------------------------------

    def _writer(self) -> GroupCommitter:
        if self._closed or self._committer is None:
            raise StorageError(
                f"SQLite store {self.path} is closed; open it (or the Runtime) first"
            )
        return self._committer

    async def create_invocation(
        self, invocation: InvocationRecord, input_entry: JournalEntry
    ) -> tuple[InvocationRecord, bool]:
        if (
            invocation.actor_type is not None
            or invocation.actor_key is not None
            or invocation.actor_seq is not None
        ) and (
            invocation.actor_type is None
            or invocation.actor_key is None
            or invocation.actor_seq is None
        ):
            raise ValueError(
                f"invocation {invocation.id}: actor_type, actor_key and actor_seq must be "
                "all set or all None"
            )
        result: tuple[InvocationRecord, bool] = await self._writer().submit(
            (invocation, input_entry), None
        )
        return result

    async def commit(self, write: Write) -> Any:
        return await self._writer().submit(None, write)

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
            f"SELECT {INVOCATION_COLUMNS} FROM invocations WHERE id = ?", (invocation_id,)
        )
        return invocation_from_row(rows[0]) if rows else None

    async def find_invocation(
        self, target: str, idempotency_key: str, *, actor_key: str | None = None
    ) -> InvocationRecord | None:
        rows = await self._read(
            f"SELECT {INVOCATION_COLUMNS} FROM invocations "
            "WHERE target = ? AND coalesce(actor_key, '') = ? AND idempotency_key = ?",
            (target, actor_key or "", idempotency_key),
        )
        return invocation_from_row(rows[0]) if rows else None

    async def list_invocations(
        self,
        *,
        statuses: Sequence[Status] | None = None,
        target: str | None = None,
        limit: int | None = None,
        partitions: Sequence[int] | None = None,
    ) -> list[InvocationRecord]:
        where: list[str] = []
        params: list[Any] = []
        if partitions is not None:
            where.append(_in_parts(partitions))
        if statuses is not None:
            values = [Status(s).value for s in statuses]
            where.append(f"status IN ({', '.join('?' * len(values))})")
            params.extend(values)
        if target is not None:
            where.append("target = ?")
            params.append(target)
        sql = f"SELECT {INVOCATION_COLUMNS} FROM invocations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [invocation_from_row(r) for r in await self._read(sql, params)]

    async def read_journal(self, invocation_id: str) -> list[JournalEntry]:
        rows = await self._read(
            f"SELECT {JOURNAL_COLUMNS} FROM journal WHERE invocation_id = ? ORDER BY idx",
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

    async def list_actor_messages(
        self,
        actor_type: str,
        actor_key: str,
        *,
        after_seq: int = 0,
        upto_seq: int | None = None,
    ) -> list[InvocationRecord]:
        sql = (
            f"SELECT {INVOCATION_COLUMNS} FROM invocations "
            "WHERE actor_type = ? AND actor_key = ? AND actor_seq > ?"
        )
        params: list[Any] = [actor_type, actor_key, after_seq]
        if upto_seq is not None:
            sql += " AND actor_seq <= ?"
            params.append(upto_seq)
        sql += " ORDER BY actor_seq"
        return [invocation_from_row(r) for r in await self._read(sql, params)]

    async def last_actor_seq(self, actor_type: str, actor_key: str) -> int:
        rows = await self._read(
            "SELECT max(actor_seq) FROM invocations WHERE actor_type = ? AND actor_key = ?",
            (actor_type, actor_key),
        )
        return int(rows[0][0] or 0)

    async def read_checkpoints(
        self,
        actor_type: str,
        actor_key: str,
        *,
        at_or_before: int | None = None,
        limit: int = 3,
    ) -> list[Checkpoint]:
        sql = f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE actor_type = ? AND actor_key = ?"
        params: list[Any] = [actor_type, actor_key]
        if at_or_before is not None:
            sql += " AND seq <= ?"
            params.append(at_or_before)
        # A negative LIMIT means no limit to SQLite; here it means none.
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(max(limit, 0))
        return [checkpoint_from_row(r) for r in await self._read(sql, params)]

    async def list_actors(self, actor_type: str | None = None) -> list[tuple[str, str]]:
        if actor_type is None:
            rows = await self._read(
                "SELECT DISTINCT actor_type, actor_key FROM invocations "
                "WHERE actor_type IS NOT NULL ORDER BY actor_type, actor_key",
                (),
            )
        else:
            rows = await self._read(
                "SELECT DISTINCT actor_type, actor_key FROM invocations "
                "WHERE actor_type = ? ORDER BY actor_key",
                (actor_type,),
            )
        return [(r[0], r[1]) for r in rows]

    async def read_journals(
        self, invocation_ids: Sequence[str]
    ) -> dict[str, tuple[list[JournalEntry], list[Attempt]]]:
        found: dict[str, tuple[list[JournalEntry], list[Attempt]]] = {
            i: ([], []) for i in invocation_ids
        }
        ids = list(found)
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for row in await self._read(
                f"SELECT {JOURNAL_COLUMNS} FROM journal WHERE invocation_id IN ({marks}) "
                "ORDER BY invocation_id, idx",
                chunk,
            ):
                found[row[0]][0].append(_entry(row))
            for row in await self._read(
                "SELECT invocation_id, idx, attempt, error, created_at FROM attempts "
                f"WHERE invocation_id IN ({marks}) ORDER BY invocation_id, idx, attempt",
                chunk,
            ):
                found[row[0]][1].append(
                    Attempt(
                        invocation_id=row[0],
                        index=row[1],
                        attempt=row[2],
                        error=row[3],
                        created_at=row[4],
                    )
                )
        return found

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

    # -- timers, promises, signals, children -------------------------------------

    async def due_invocations(
        self, before: float, *, limit: int = 1000, partitions: Sequence[int] | None = None
    ) -> list[InvocationRecord]:
        parts = "" if partitions is None else " AND " + _in_parts(partitions)
        rows = await self._read(
            f"SELECT {INVOCATION_COLUMNS} FROM invocations WHERE status = 'suspended' "
            f"AND wake_at IS NOT NULL AND wake_at <= ?{parts} ORDER BY wake_at LIMIT ?",
            (before, limit),
        )
        return [invocation_from_row(r) for r in rows]

    async def next_wake_at(self, *, partitions: Sequence[int] | None = None) -> float | None:
        parts = "" if partitions is None else " AND " + _in_parts(partitions)
        rows = await self._read(
            "SELECT min(wake_at) FROM invocations WHERE status = 'suspended' "
            f"AND wake_at IS NOT NULL{parts}",
            (),
        )
        value = rows[0][0]
        return None if value is None else float(value)

    async def count_suspended(self) -> tuple[int, int]:
        rows = await self._read(
            "SELECT count(*), count(wake_at) FROM invocations WHERE status = 'suspended'", ()
        )
        return int(rows[0][0]), int(rows[0][1])

    async def get_promise(self, promise_id: str) -> PromiseRecord | None:
        rows = await self._read(
            "SELECT id, invocation_id, name, state, payload, type_tag, created_at, resolved_at "
            "FROM promises WHERE id = ?",
            (promise_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return PromiseRecord(
            id=r[0],
            invocation_id=r[1],
            name=r[2],
            state=r[3],
            payload=r[4],
            type_tag=r[5],
            created_at=r[6],
            resolved_at=r[7],
        )

    async def read_signals(self, invocation_id: str, name: str) -> list[SignalRecord]:
        rows = await self._read(
            "SELECT invocation_id, name, payload, type_tag, created_at, seq FROM signals "
            "WHERE invocation_id = ? AND name = ? ORDER BY seq",
            (invocation_id, name),
        )
        return [
            SignalRecord(
                invocation_id=r[0],
                name=r[1],
                payload=r[2],
                type_tag=r[3],
                created_at=r[4],
                seq=r[5],
            )
            for r in rows
        ]

    async def list_children(self, parent_id: str) -> list[InvocationRecord]:
        rows = await self._read(
            f"SELECT {INVOCATION_COLUMNS} FROM invocations WHERE parent_id = ? "
            "ORDER BY created_at, id",
            (parent_id,),
        )
        return [invocation_from_row(r) for r in rows]

    # -- leases ----------------------------------------------------------------------

    async def acquire_leases(
        self, node: str, *, partitions: int, ttl: float, now: float
    ) -> dict[int, int]:
        held: dict[int, int] = await self._writer().submit(
            None,
            None,
            lambda conn: acquire_leases(conn, node, partitions, ttl, now),
        )
        return held

    async def release_leases(self, node: str) -> None:
        def release(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE leases SET owner = NULL WHERE owner = ?", (node,))
            conn.execute("DELETE FROM nodes WHERE node = ?", (node,))

        await self._writer().submit(None, None, release)

    async def list_leases(self) -> list[Lease]:
        rows = await self._read(
            "SELECT part, owner, epoch, expires_at FROM leases ORDER BY part", ()
        )
        return [Lease(partition=r[0], owner=r[1], epoch=r[2], expires_at=r[3]) for r in rows]


def _in_parts(partitions: Sequence[int]) -> str:
    """An SQL condition on the partition column (ints only: safe to inline)."""
    values = ",".join(str(int(p)) for p in partitions)
    return f"part IN ({values})" if values else "0"
