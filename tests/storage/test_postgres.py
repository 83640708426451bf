"""What only the PostgreSQL store does: schemas, reconnecting, several stores on one schema.

The contract itself is checked in test_conformance.py, on every backend.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import perdure
from perdure import ConfigurationError, RuntimeLockedError, StorageError
from perdure.storage import PostgresStore, Store, Write, open_store
from perdure.storage._postgres import SCHEMA_VERSION, drop_schema, parse_url, redact
from perdure.testing import FakeClock

from .test_conformance import created, entry, input_entry, invocation


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(parse_url(url)[0], autocommit=True)


def terminate_store_connections(url: str) -> int:
    """Kill every server connection of the stores on ``url``'s schema, as a restart would."""
    schema = parse_url(url)[1]
    with _connect(url) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (f"perdure/{schema}",),
        ).fetchall()
    return len(rows)


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_tables_live_in_the_url_schema(pg_store: PostgresStore, pg_url: str) -> None:
    schema = parse_url(pg_url)[1]
    assert pg_store.schema == schema
    await created(pg_store)
    with _connect(pg_url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
            "ORDER BY table_name",
            (schema,),
        ).fetchall()
        versions = conn.execute(
            f"SELECT version FROM {schema}.perdure_schema ORDER BY 1"
        ).fetchall()
        assert conn.execute(f"SELECT count(*) FROM {schema}.invocations").fetchone() == (1,)
    assert [t for (t,) in tables] == [
        "attempts",
        "checkpoints",
        "idempotent_results",
        "invocations",
        "journal",
        "leases",
        "nodes",
        "perdure_schema",
        "promises",
        "signals",
    ]
    assert [v for (v,) in versions] == list(range(1, SCHEMA_VERSION + 1))
    assert await pg_store.schema_version() == SCHEMA_VERSION


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    async with open_store(pg_url):
        pass
    with _connect(pg_url) as conn:
        conn.execute(f"INSERT INTO {parse_url(pg_url)[1]}.perdure_schema (version) VALUES (99)")
    with pytest.raises(ConfigurationError, match=r"schema version 99.*upgrade Perdure"):
        await open_store(pg_url).open()


async def test_several_stores_open_one_new_schema_at_once(pg_url: str) -> None:
    stores = [open_store(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        # Like several nodes: one idempotency key makes exactly one invocation.
        records = [invocation(key="shared", created_at=1000.0 + i) for i in range(len(stores))]
        results = await asyncio.gather(
            *(s.create_invocation(r, input_entry(r)) for s, r in zip(stores, records, strict=True))
        )
        assert sum(was_created for _, was_created in results) == 1
        assert len({stored.id for stored, _ in results}) == 1
        assert len(await stores[0].list_invocations()) == 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_an_unreachable_server_is_a_storage_error_saying_what_to_do() -> None:
    store = open_store("postgresql://postgres:secret@127.0.0.1:1/test?schema=nowhere")
    with pytest.raises(StorageError, match=r"cannot connect.*running") as info:
        await store.open()
    assert "secret" not in str(info.value)
    assert store.url == "postgresql://postgres:***@127.0.0.1:1/test?schema=nowhere"


def test_url_options() -> None:
    conninfo, schema, label = parse_url("postgres://u:pw@h:5/db?sslmode=disable&schema=s_1")
    assert (conninfo, schema) == ("postgres://u:pw@h:5/db?sslmode=disable", "s_1")
    assert label == "postgres://u:***@h:5/db?sslmode=disable&schema=s_1"
    assert parse_url("postgresql://h/db")[1] == "public"
    assert redact("postgresql://h/db") == "postgresql://h/db"
    assert (
        redact("postgresql://h/db?password=pw&schema=s")
        == "postgresql://h/db?password=***&schema=s"
    )
    assert redact("host=h password='a b' dbname=d") == "host=h password=*** dbname=d"
    assert redact("host=h password=pw") == "host=h password=***"
    store = PostgresStore("host=h password=pw dbname=d", schema="s")
    assert store.url == "host=h password=*** dbname=d"
    assert store.schema == "s"
    for bad in ("Upper", "1st", "pg_x", "a-b", "x" * 64, ""):
        with pytest.raises(ConfigurationError, match="not a valid schema name"):
            open_store(f"postgresql://h/db?schema={bad}")
    with pytest.raises(ConfigurationError, match="bogus"):
        open_store("postgresql://h/db?bogus=1&schema=s")


async def test_the_url_options_reach_the_server(pg_url: str) -> None:
    url = pg_url + "&options=-c%20statement_timeout%3D4321&application_name=mine"
    async with open_store(url) as store:
        assert isinstance(store, PostgresStore)
        await created(store)
        rows = await store._read("SHOW statement_timeout", ())
        assert rows == [("4321ms",)]
        rows = await store._read("SELECT current_schema(), current_setting('application_name')", ())
        assert rows == [(parse_url(pg_url)[1], "mine")]


def test_without_psycopg_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'perdure\[postgres\]'"):
        open_store("postgresql://h/db")
    with pytest.raises(ConfigurationError, match=r"pip install 'perdure\[postgres\]'"):
        perdure.Runtime("postgresql://h/db")
    # The other stores do not need it.
    assert open_store("memory://").url == "memory://"


# -- reconnecting ---------------------------------------------------------------------


async def test_writes_and_reads_go_on_while_server_connections_die(
    pg_store: PostgresStore, pg_url: str
) -> None:
    recs = [await created(pg_store) for _ in range(30)]
    rounds = 40
    killed: list[int] = []
    # Kills at least 100 ms apart: a retry (a new connection, the batch again:
    # a few ms, tens on a loaded machine) that is cut off too fails for good,
    # as it should.
    spacing = asyncio.Lock()
    loop = asyncio.get_running_loop()
    last_kill = [0.0]

    async def kill() -> None:
        async with spacing:
            await asyncio.sleep(max(0.0, last_kill[0] + 0.1 - loop.time()))
            killed.append(await asyncio.to_thread(terminate_store_connections, pg_url))
            last_kill[0] = loop.time()

    async def kill_now_and_then() -> None:  # at any moment: mid-batch, mid-read
        for _ in range(5):
            await asyncio.sleep(0.02)
            await kill()

    async def write_rounds() -> None:
        for i in range(1, rounds + 1):
            await asyncio.gather(
                *(pg_store.commit(Write(entries=(entry(r.id, i, name=f"s{i}"),))) for r in recs)
            )
            assert [e.index for e in await pg_store.read_journal(recs[i % len(recs)].id)][-1] == i
            if i % 10 == 0:  # between batches: the next one finds its connection dead
                await kill()

    await asyncio.gather(kill_now_and_then(), write_rounds())
    assert sum(killed) >= 8  # the writer and the readers were really cut off
    assert pg_store.reconnects >= 3  # after rounds 10, 20 and 30 at least
    # Every write is there exactly once (a retried batch that had committed
    # would have been a ConflictError).
    found = await pg_store.read_journals([r.id for r in recs])
    for r in recs:
        journal, _ = found[r.id]
        assert [e.index for e in journal] == list(range(rounds + 1))
        assert [e.name for e in journal[1:]] == [f"s{i}" for i in range(1, rounds + 1)]


async def test_a_commit_cut_off_before_it_committed_is_retried_once(pg_url: str) -> None:
    kills = itertools.count()

    def cut_off_the_first_batch(_n: int) -> None:
        # After the batch's rows are written, before its COMMIT: the server
        # side of the writer connection goes away.
        if next(kills) == 1:
            assert terminate_store_connections(pg_url) >= 1

    store = open_store(pg_url, before_commit=cut_off_the_first_batch)
    await store.open()
    try:
        rec = invocation()
        await store.create_invocation(rec, input_entry(rec))  # batch 0
        await store.commit(Write(entries=(entry(rec.id, 1, name="once"),)))  # 1, then 2
        assert isinstance(store, PostgresStore)
        assert store.reconnects == 1
        assert [e.name for e in await store.read_journal(rec.id)] == ["wf", "once"]
        await store.commit(Write(entries=(entry(rec.id, 2, name="after"),)))
        assert [e.name for e in await store.read_journal(rec.id)] == ["wf", "once", "after"]
    finally:
        await store.close()


async def test_a_write_that_fails_twice_is_a_storage_error_and_the_store_goes_on(
    pg_url: str,
) -> None:
    fail = [False]

    def cut_off(_n: int) -> None:
        if fail[0]:
            terminate_store_connections(pg_url)

    store = open_store(pg_url, before_commit=cut_off)
    await store.open()
    try:
        rec = await created(store)
        fail[0] = True
        with pytest.raises(StorageError, match="connection"):
            await store.commit(Write(entries=(entry(rec.id, 1, name="lost"),)))
        fail[0] = False
        assert [e.name for e in await store.read_journal(rec.id)] == ["wf"]
        await store.commit(Write(entries=(entry(rec.id, 1, name="kept"),)))
        assert [e.name for e in await store.read_journal(rec.id)] == ["wf", "kept"]
    finally:
        await store.close()


@perdure.workflow(name="pg_counted")
async def counted(ctx: perdure.Context, n: int) -> int:
    total = 0
    for i in range(5):
        total += await ctx.run(f"step-{i}", _count_call, n, i)
    return total


CALLS: dict[tuple[int, int], int] = {}


async def _count_call(n: int, i: int) -> int:
    CALLS[(n, i)] = CALLS.get((n, i), 0) + 1
    await asyncio.sleep(0)
    return n * 10 + i


async def test_workflows_finish_exactly_once_while_server_connections_die(pg_url: str) -> None:
    CALLS.clear()
    killed: list[int] = []
    async with perdure.Runtime(pg_url, workflows=[counted], clock=FakeClock()) as rt:
        runs = asyncio.gather(*(rt.client.run(counted, n) for n in range(300)))
        while not runs.done() or len(killed) < 3:
            killed.append(await asyncio.to_thread(terminate_store_connections, pg_url))
            await asyncio.sleep(0.1)
        assert await runs == [n * 50 + 10 for n in range(300)]
        store = rt.store
        assert isinstance(store, PostgresStore)
        assert store.reconnects >= 1
    assert sum(killed) >= 3
    calls = dict(CALLS)
    assert calls == {(n, i): 1 for n in range(300) for i in range(5)}


async def test_an_in_doubt_commit_is_decided_by_its_transaction_id(
    pg_store: PostgresStore, pg_url: str
) -> None:
    with _connect(pg_url) as conn:
        with conn.transaction():
            committed = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        conn.execute("BEGIN")
        aborted = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        conn.execute("ROLLBACK")
    assert committed is not None
    assert aborted is not None
    committer = pg_store._writer()
    assert await committer._resolve(committed[0]) is True
    assert await committer._resolve(aborted[0]) is False
    # Not a transaction of this server (here: one in the future): cannot be told.
    assert await committer._resolve(str(int(committed[0]) + 10**9)) is None
    await created(pg_store)  # the writer connection still works


def test_driver_errors_map_to_perdure_errors() -> None:
    from psycopg import errors

    from perdure import ConflictError, StorageFullError
    from perdure.storage._postgres_batch import is_connection_lost, map_error

    label = "postgresql://h/db"
    full = map_error(errors.DiskFull("could not extend file: No space left on device"), label)
    assert isinstance(full, StorageFullError)
    assert "Free disk space" in str(full)
    assert type(map_error(errors.UniqueViolation("dup"), label)) is ConflictError
    assert type(map_error(errors.ForeignKeyViolation("fk"), label)) is ConflictError
    lost = map_error(errors.AdminShutdown("terminating connection"), label)
    assert type(lost) is StorageError
    assert "server is running" in str(lost)
    assert is_connection_lost(errors.AdminShutdown("terminating connection"), None)
    assert not is_connection_lost(errors.UniqueViolation("dup"), None)
    other = map_error(errors.SyntaxError("near x"), label)
    assert type(other) is StorageError
    assert label in str(other)


async def test_a_server_older_than_13_is_refused(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(psycopg.ConnectionInfo, "server_version", property(lambda _: 120017))
    with pytest.raises(ConfigurationError, match="PostgreSQL 12; Perdure needs 13 or newer"):
        await open_store(pg_url).open()


async def test_a_commit_whose_reply_was_lost_is_found_committed_and_not_redone(
    pg_store: PostgresStore, pg_url: str
) -> None:
    from psycopg import errors

    rec = await created(pg_store)
    committer = pg_store._writer()
    conn: Any = committer._conn
    assert conn is not None
    execute = conn.execute
    armed = [True]

    async def commit_then_die(query: Any, *args: Any, **kwargs: Any) -> Any:
        cur = await execute(query, *args, **kwargs)
        if query == "COMMIT" and armed[0]:
            # The COMMIT went through; the reply is what gets lost.
            armed[0] = False
            await asyncio.to_thread(terminate_store_connections, pg_url)
            raise errors.AdminShutdown("terminating connection due to administrator command")
        return cur

    conn.execute = commit_then_die
    await pg_store.commit(Write(entries=(entry(rec.id, 1, name="once"),)))
    assert not armed[0]
    assert pg_store.reconnects == 0  # decided by its transaction id, not written again
    assert [e.name for e in await pg_store.read_journal(rec.id)] == ["wf", "once"]
    await pg_store.commit(Write(entries=(entry(rec.id, 2, name="after"),)))
    assert [e.name for e in await pg_store.read_journal(rec.id)] == ["wf", "once", "after"]


# -- one runtime per schema -----------------------------------------------------------


@perdure.workflow(name="pg_locked")
async def locked_wf(ctx: perdure.Context, n: int) -> int:
    return await ctx.run("n", lambda: n)


async def test_a_second_runtime_on_the_same_schema_is_locked_out(pg_url: str) -> None:
    async with perdure.Runtime(pg_url, workflows=[locked_wf], clock=FakeClock()) as first:
        second = perdure.Runtime(pg_url, workflows=[locked_wf], clock=FakeClock())
        with pytest.raises(RuntimeLockedError, match="another Perdure runtime") as info:
            await second.start()
        assert parse_url(pg_url)[1] in str(info.value)
        assert "pg_terminate_backend(" in str(info.value)
        await second.stop()
        assert await first.client.run(locked_wf, 1) == 1
        # The writer reconnects after its connection died, and takes the lock again.
        terminate_store_connections(pg_url)
        assert await first.client.run(locked_wf, 2) == 2
        with pytest.raises(RuntimeLockedError):
            await perdure.Runtime(pg_url, workflows=[locked_wf], clock=FakeClock()).start()
    # Another schema is another store.
    other = postgres_url_in_schema(pg_url, "_other")
    try:
        async with perdure.Runtime(other, clock=FakeClock()):
            pass
    finally:
        drop_schema(other)
    async with perdure.Runtime(pg_url, workflows=[locked_wf], clock=FakeClock()) as third:
        assert await third.client.run(locked_wf, 3) == 3
        assert len(await third.client.list()) == 3


def postgres_url_in_schema(url: str, suffix: str) -> str:
    from perdure.storage._postgres import with_schema

    return with_schema(url, parse_url(url)[1] + suffix)


async def test_a_runtime_that_lost_its_lock_cannot_write(pg_url: str) -> None:
    first = open_store(pg_url, exclusive=True)
    await first.open()
    other: Store | None = None
    try:
        rec = await created(first)
        terminate_store_connections(pg_url)
        # While the first store is disconnected, another takes the schema.
        other = open_store(pg_url, exclusive=True)
        await other.open()
        with pytest.raises(RuntimeLockedError):
            await first.commit(Write(entries=(entry(rec.id, 1, name="lost"),)))
        await other.close()
        other = None
        await first.commit(Write(entries=(entry(rec.id, 1, name="kept"),)))
        assert [e.name for e in await first.read_journal(rec.id)] == ["wf", "kept"]
    finally:
        await first.close()
        if other is not None:
            await other.close()
