"""Shared fixtures: every backend-agnostic test runs over every store.

``store_url`` is parametrized over ``memory://``, a SQLite file in the
test's ``tmp_path`` and a fresh schema in the PostgreSQL database that
``PERDURE_PG_DSN`` names (default ``postgresql://postgres@127.0.0.1:5432/test``;
the schema is dropped after the test). ``backend`` turns it into what a
:class:`perdure.Runtime` takes, so that a test can stop a runtime and start a
new one on the same data (a restart): for SQLite a new runtime opens the same
file, for PostgreSQL the same schema, for memory it is handed the same
:class:`perdure.storage.MemoryStore` object.

An unreachable PostgreSQL fails the PostgreSQL tests, with a message saying
what to do. ``PERDURE_SKIP_PG=1`` skips them instead.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import perdure
from perdure.storage import MemoryStore, Store
from perdure.storage._postgres import drop_schema
from perdure.testing import FakeClock

BACKENDS = ["memory", "sqlite", "postgres"]
PG_DSN = os.environ.get("PERDURE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
_pg_unreachable: list[str | None] = []  # the reason, checked once per session


def check_postgres() -> None:
    """Skip the test with PERDURE_SKIP_PG=1; fail it if PostgreSQL is unreachable."""
    if os.environ.get("PERDURE_SKIP_PG") == "1":
        pytest.skip("PERDURE_SKIP_PG=1: the PostgreSQL tests are skipped")
    if not _pg_unreachable:
        try:
            import psycopg

            with psycopg.connect(PG_DSN, connect_timeout=5, autocommit=True) as conn:
                conn.execute("SELECT 1")
            _pg_unreachable.append(None)
        except Exception as exc:
            _pg_unreachable.append(f"{type(exc).__name__}: {exc}")
    reason = _pg_unreachable[0]
    if reason is not None:
        pytest.fail(
            f"PostgreSQL at {PG_DSN} is unreachable ({reason}). Start it (.ci/run does), point "
            "PERDURE_PG_DSN at a server, or set PERDURE_SKIP_PG=1 to skip the PostgreSQL tests.",
            pytrace=False,
        )


def postgres_url(schema: str | None = None) -> str:
    """A store URL on ``PERDURE_PG_DSN`` with a fresh (or the given) schema."""
    schema = schema or f"perdure_test_{uuid.uuid4().hex}"
    return f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={schema}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema's store URL; the schema is dropped afterwards."""
    check_postgres()
    url = postgres_url()
    try:
        yield url
    finally:
        drop_schema(url)


def pg_query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` run in the schema of the store URL; none if its tables do not exist."""
    import psycopg

    from perdure.storage._postgres import parse_url

    conninfo, schema, _ = parse_url(url)
    with psycopg.connect(conninfo, options=f"-c search_path={schema}") as conn:
        try:
            return conn.execute(sql).fetchall()
        except psycopg.errors.UndefinedTable:  # nothing was ever opened there
            return []


@pytest.fixture(params=["sqlite", "postgres"])
def journal_store(request: pytest.FixtureRequest) -> str | None:
    """Where a crash test's worker keeps its journal: None for journal.db in its directory."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/x.db"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Backend:
    """What a test passes to ``Runtime(...)``, again and again across restarts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.kind = (
            "memory"
            if url.startswith("memory")
            else "postgres"
            if url.startswith("postgres")
            else "sqlite"
        )
        self._memory = MemoryStore() if self.kind == "memory" else None

    @property
    def path(self) -> str:
        assert self.kind == "sqlite"
        return self.url.removeprefix("sqlite:///")

    def store(self) -> str | Store:
        return self._memory if self._memory is not None else self.url

    def runtime(self, workflows: list[Any], **kwargs: Any) -> perdure.Runtime:
        kwargs.setdefault("clock", FakeClock())
        return perdure.Runtime(self.store(), workflows=workflows, **kwargs)


@pytest.fixture
def backend(store_url: str) -> Backend:
    return Backend(store_url)


class Gate:
    """A step function that blocks forever until ``open()``; ``reached`` tells it got there.

    Stopping the runtime cancels the blocked step, which leaves the invocation
    unfinished with everything before the gate journaled: a crash, in-process.
    """

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.is_open = False
        self.passed = 0
        self.waiting = 0
        self._never = asyncio.Event()

    def open(self) -> None:
        self.is_open = True

    async def wait(self) -> str:
        if not self.is_open:
            self.reached.set()
            self.waiting += 1
            await self._never.wait()
        self.passed += 1
        return "passed"

    async def until_reached(self, handle: perdure.InvocationHandle[Any]) -> None:
        """Wait for the gate; fail at once if the invocation ends before it."""
        reached = asyncio.ensure_future(self.reached.wait())
        result = asyncio.ensure_future(handle.result())
        try:
            async with asyncio.timeout(30):
                done, _ = await asyncio.wait({reached, result}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (reached, result):
                f.cancel()
            await asyncio.gather(reached, result, return_exceptions=True)
        if reached not in done:
            raise AssertionError(f"the invocation ended before reaching the gate: {result!r}")


@pytest.fixture
def gate() -> Gate:
    return Gate()


def attach(
    rt: perdure.Runtime, handle: perdure.InvocationHandle[Any]
) -> perdure.InvocationHandle[Any]:
    """A handle on ``rt`` to an invocation started on an earlier runtime."""
    return perdure.InvocationHandle(rt, handle.id, handle.target)
