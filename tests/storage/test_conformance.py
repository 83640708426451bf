"""The ``perdure.storage.Store`` contract, checked identically on every backend.

The ``store_url`` fixture (tests/conftest.py) runs each test over
``memory://``, a SQLite file in ``tmp_path`` and a fresh PostgreSQL schema.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from perdure import ConflictError, StorageError
from perdure.storage import (
    Attempt,
    Checkpoint,
    EntryKind,
    IdempotentResult,
    InvocationRecord,
    JournalEntry,
    MemoryStore,
    SQLiteStore,
    Status,
    StatusChange,
    Store,
    Write,
    open_store,
)
from perdure.storage._sqlite import _MIGRATIONS, SCHEMA_VERSION

_ids = itertools.count()


def new_id(prefix: str = "inv") -> str:
    # Zero-padded so that ids sort in creation order, like the runtime's UUIDv7s.
    return f"{prefix}-{next(_ids):08d}"


def invocation(
    id: str | None = None,
    *,
    target: str = "wf",
    key: str | None = None,
    status: Status = Status.RUNNING,
    created_at: float = 1000.0,
    input_hash: str = "hash-a",
) -> InvocationRecord:
    return InvocationRecord(
        id=id or new_id(),
        target=target,
        input_hash=input_hash,
        idempotency_key=key,
        status=status,
        created_at=created_at,
        updated_at=created_at,
    )


def entry(
    invocation_id: str,
    index: int,
    *,
    kind: EntryKind = EntryKind.STEP,
    name: str = "step",
    ok: bool = True,
    payload: bytes = b'"value"',
    type_tag: str | None = None,
    attempts: int = 1,
    created_at: float = 1000.0,
) -> JournalEntry:
    return JournalEntry(
        invocation_id=invocation_id,
        index=index,
        kind=kind,
        name=name,
        ok=ok,
        payload=payload,
        type_tag=type_tag,
        attempts=attempts,
        created_at=created_at,
    )


def input_entry(rec: InvocationRecord) -> JournalEntry:
    return entry(rec.id, 0, kind=EntryKind.INPUT, name=rec.target, payload=b'{"args":[]}')


def attempt(invocation_id: str, index: int, n: int) -> Attempt:
    return Attempt(
        invocation_id=invocation_id,
        index=index,
        attempt=n,
        error=f'{{"attempt":{n}}}'.encode(),
        created_at=1000.0 + n,
    )


def idem(scope: str, key: str, payload: bytes, invocation_id: str) -> IdempotentResult:
    return IdempotentResult(
        scope=scope,
        key=key,
        ok=True,
        payload=payload,
        type_tag=None,
        invocation_id=invocation_id,
        created_at=1000.0,
    )


def message(
    actor_type: str, actor_key: str, seq: int, *, key: str | None = None, created_at: float = 1000.0
) -> InvocationRecord:
    """An invocation that is message ``seq`` of the actor (actor_type, actor_key)."""
    return msgspec.structs.replace(
        invocation(target=f"{actor_type}.handle", key=key, created_at=created_at),
        actor_type=actor_type,
        actor_key=actor_key,
        actor_seq=seq,
    )


def checkpoint(actor_type: str, actor_key: str, seq: int, state: bytes = b'{"n":0}') -> Checkpoint:
    return Checkpoint(
        actor_type=actor_type,
        actor_key=actor_key,
        seq=seq,
        state=state,
        type_tag="app.actors:Counter.State",
        checksum=f"sum-of-{state!r}",
        state_version=3,
        created_at=1000.0 + seq,
    )


def make_store(url: str, **kwargs: Any) -> Store:
    return open_store(url, **kwargs)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = make_store(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def created(store: Store, **kwargs: Any) -> InvocationRecord:
    rec = invocation(**kwargs)
    stored, was_created = await store.create_invocation(rec, input_entry(rec))
    assert was_created
    assert stored == rec
    return rec


def is_memory(store: Store) -> bool:
    return isinstance(store, MemoryStore)


# -- invocations ------------------------------------------------------------------


async def test_create_and_get_invocation(store: Store) -> None:
    rec = invocation(key="k-1")
    stored, was_created = await store.create_invocation(rec, input_entry(rec))
    assert was_created is True
    assert stored == rec
    assert await store.get_invocation(rec.id) == rec
    assert await store.find_invocation(rec.target, "k-1") == rec
    assert await store.read_journal(rec.id) == [input_entry(rec)]
    assert await store.read_attempts(rec.id) == []


async def test_get_unknown_invocation_is_none(store: Store) -> None:
    assert await store.get_invocation("no-such-invocation") is None
    assert await store.find_invocation("wf", "no-such-key") is None
    assert await store.read_journal("no-such-invocation") == []
    assert await store.read_attempts("no-such-invocation") == []
    assert await store.get_idempotent_result("scope", "no-such-key") is None


async def test_same_idempotency_key_returns_existing_record(store: Store) -> None:
    first = await created(store, key="order-7")
    second = invocation(key="order-7", input_hash="hash-b", created_at=2000.0)
    stored, was_created = await store.create_invocation(second, input_entry(second))
    assert was_created is False
    assert stored == first
    # Nothing of the second one was written.
    assert await store.get_invocation(second.id) is None
    assert await store.read_journal(second.id) == []
    assert [r.id for r in await store.list_invocations()] == [first.id]


async def test_same_idempotency_key_under_another_target_is_allowed(store: Store) -> None:
    a = await created(store, target="wf-a", key="shared")
    b = await created(store, target="wf-b", key="shared")
    assert await store.find_invocation("wf-a", "shared") == a
    assert await store.find_invocation("wf-b", "shared") == b


async def test_invocations_without_key_are_independent(store: Store) -> None:
    a = await created(store)
    b = await created(store)
    assert {r.id for r in await store.list_invocations()} == {a.id, b.id}


async def test_duplicate_invocation_id_is_a_conflict(store: Store) -> None:
    first = await created(store)
    clash = msgspec.structs.replace(first, input_hash="other", created_at=5.0)
    with pytest.raises(ConflictError):
        await store.create_invocation(clash, input_entry(clash))
    assert await store.get_invocation(first.id) == first


async def test_concurrent_creates_with_one_key_create_exactly_one(store: Store) -> None:
    records = [invocation(key="concurrent", created_at=1000.0 + i) for i in range(50)]
    results = await asyncio.gather(*(store.create_invocation(r, input_entry(r)) for r in records))
    winners = [stored for stored, was_created in results if was_created]
    assert len(winners) == 1
    winner = winners[0]
    assert {stored.id for stored, _ in results} == {winner.id}
    assert [r.id for r in await store.list_invocations()] == [winner.id]
    assert await store.read_journal(winner.id) == [input_entry(winner)]


# -- commits ----------------------------------------------------------------------


async def test_commit_records_entries_attempts_status_and_idempotent_result(store: Store) -> None:
    rec = await created(store)
    write = Write(
        entries=(entry(rec.id, 1, name="a"), entry(rec.id, 2, name="b", ok=False)),
        attempts=(attempt(rec.id, 1, 1),),
        status=StatusChange(
            invocation_id=rec.id, status=Status.FAILED, updated_at=2000.0, last_error="boom"
        ),
        idempotent=idem("a", "key-1", b'"v"', rec.id),
    )
    await store.commit(write)
    assert [e.index for e in await store.read_journal(rec.id)] == [0, 1, 2]
    assert (await store.read_journal(rec.id))[1:] == list(write.entries)
    assert await store.read_attempts(rec.id) == list(write.attempts)
    got = await store.get_invocation(rec.id)
    assert got is not None
    assert (got.status, got.updated_at, got.last_error) == (Status.FAILED, 2000.0, "boom")
    assert got.created_at == rec.created_at
    assert await store.get_idempotent_result("a", "key-1") == write.idempotent


@pytest.mark.parametrize("duplicate_first", [True, False], ids=["dup-first", "dup-last"])
async def test_commit_with_taken_index_fails_and_writes_nothing(
    store: Store, duplicate_first: bool
) -> None:
    rec = await created(store)
    await store.commit(Write(entries=(entry(rec.id, 1, name="kept"),)))
    before = await store.read_journal(rec.id)

    fresh = (entry(rec.id, 2, name="fresh"), entry(rec.id, 3, name="fresh2"))
    taken = entry(rec.id, 1, name="clash", payload=b'"other"')
    entries = (taken, *fresh) if duplicate_first else (*fresh, taken)
    bad = Write(
        entries=entries,
        attempts=(attempt(rec.id, 4, 1),),
        status=StatusChange(invocation_id=rec.id, status=Status.COMPLETED, updated_at=3000.0),
        idempotent=idem("fresh", "never", b'"x"', rec.id),
    )
    with pytest.raises(ConflictError):
        await store.commit(bad)

    assert await store.read_journal(rec.id) == before
    assert await store.read_attempts(rec.id) == []
    assert await store.get_invocation(rec.id) == rec
    assert await store.get_idempotent_result("fresh", "never") is None
    # The store still works afterwards.
    await store.commit(Write(entries=fresh))
    assert [e.name for e in await store.read_journal(rec.id)] == ["wf", "kept", "fresh", "fresh2"]


async def test_commit_with_the_same_index_twice_in_one_write_is_a_conflict(
    store: Store, request: pytest.FixtureRequest
) -> None:
    rec = await created(store)
    with pytest.raises(ConflictError):
        await store.commit(
            Write(entries=(entry(rec.id, 1, name="one"), entry(rec.id, 1, name="two")))
        )
    assert await store.read_journal(rec.id) == [input_entry(rec)]


async def test_status_change_of_unknown_invocation_is_a_conflict(store: Store) -> None:
    rec = await created(store)
    with pytest.raises(ConflictError):
        await store.commit(
            Write(
                entries=(entry(rec.id, 1),),
                status=StatusChange(
                    invocation_id="no-such-invocation", status=Status.FAILED, updated_at=1.0
                ),
            )
        )
    # The entry of the rejected write was not kept either.
    assert await store.read_journal(rec.id) == [input_entry(rec)]


async def test_entry_of_unknown_invocation_is_a_conflict(
    store: Store, request: pytest.FixtureRequest
) -> None:
    with pytest.raises(ConflictError):
        await store.commit(Write(entries=(entry("no-such-invocation", 1),)))
    assert await store.read_journal("no-such-invocation") == []


async def test_one_bad_write_in_a_group_commit_fails_alone(store_url: str) -> None:
    """Many concurrent commits, one of them bad: only that one fails, and fully."""
    batch_sizes: list[int] = []
    store = make_store(store_url, before_commit=batch_sizes.append)
    await store.open()
    try:
        recs = [await created(store) for _ in range(20)]
        bad_rec = recs[7]
        await store.commit(Write(entries=(entry(bad_rec.id, 1, name="first"),)))
        batch_sizes.clear()

        def good(rec: InvocationRecord) -> Write:
            return Write(
                entries=(entry(rec.id, 1, name="good"), entry(rec.id, 2, name="good2")),
                status=StatusChange(invocation_id=rec.id, status=Status.COMPLETED, updated_at=9.0),
                idempotent=idem("good", rec.id, b'"ok"', rec.id),
            )

        bad = Write(
            entries=(entry(bad_rec.id, 2, name="bad-new"), entry(bad_rec.id, 1, name="bad-dup")),
            attempts=(attempt(bad_rec.id, 3, 1),),
            status=StatusChange(invocation_id=bad_rec.id, status=Status.COMPLETED, updated_at=9.0),
            idempotent=idem("good", bad_rec.id, b'"bad"', bad_rec.id),
        )
        writes = [bad if rec is bad_rec else good(rec) for rec in recs]
        results = await asyncio.gather(*(store.commit(w) for w in writes), return_exceptions=True)

        failed = [(w, r) for w, r in zip(writes, results, strict=True) if r is not None]
        assert len(failed) == 1, failed
        assert failed[0][0] is bad
        assert isinstance(failed[0][1], ConflictError)
        if not store_url.startswith("memory"):
            # They really were one group commit.
            assert max(batch_sizes) == len(writes), batch_sizes

        for rec in recs:
            got = await store.get_invocation(rec.id)
            assert got is not None
            journal = await store.read_journal(rec.id)
            if rec is bad_rec:
                assert got == rec
                assert [e.name for e in journal] == ["wf", "first"]
                assert await store.read_attempts(rec.id) == []
                assert await store.get_idempotent_result("good", rec.id) is None
            else:
                assert got.status is Status.COMPLETED
                assert [e.name for e in journal] == ["wf", "good", "good2"]
                assert await store.get_idempotent_result("good", rec.id) is not None
    finally:
        await store.close()


async def test_store_keeps_working_after_a_before_commit_hook_raises(store_url: str) -> None:
    fail_next = [False]

    def before_commit(_n: int) -> None:
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("hook failed")

    store = make_store(store_url, before_commit=before_commit)
    await store.open()
    try:
        rec = await created(store)
        fail_next[0] = True
        with pytest.raises(Exception, match="hook failed"):
            await asyncio.wait_for(store.commit(Write(entries=(entry(rec.id, 1),))), 1.0)
        await asyncio.wait_for(store.commit(Write(entries=(entry(rec.id, 1, name="b"),))), 1.0)
        assert [e.name for e in await store.read_journal(rec.id)] == ["wf", "b"]
    finally:
        await store.close()


# -- reads ------------------------------------------------------------------------


async def test_read_journal_is_in_index_order(store: Store) -> None:
    rec = await created(store)
    for i in (5, 2, 4):
        await store.commit(Write(entries=(entry(rec.id, i, name=f"s{i}"),)))
    await store.commit(Write(entries=(entry(rec.id, 3, name="s3"), entry(rec.id, 1, name="s1"))))
    journal = await store.read_journal(rec.id)
    assert [e.index for e in journal] == [0, 1, 2, 3, 4, 5]
    assert [e.name for e in journal] == ["wf", "s1", "s2", "s3", "s4", "s5"]
    assert journal[0].kind is EntryKind.INPUT
    assert all(e.kind is EntryKind.STEP for e in journal[1:])


async def test_journal_entry_fields_round_trip(store: Store) -> None:
    rec = await created(store)
    e = entry(
        rec.id,
        1,
        kind=EntryKind.OUTPUT,
        name="ünï-cødé \x00 name",
        ok=False,
        payload=bytes(range(256)),
        type_tag="mod.sub:Outer.Inner",
        attempts=7,
        created_at=1234.5678,
    )
    await store.commit(Write(entries=(e,)))
    got = (await store.read_journal(rec.id))[1]
    assert got == e
    assert type(got.payload) is bytes
    assert got.kind is EntryKind.OUTPUT
    assert got.ok is False


async def test_read_attempts_is_by_index_then_attempt(store: Store) -> None:
    rec = await created(store)
    other = await created(store)
    await store.commit(Write(attempts=(attempt(rec.id, 2, 2), attempt(rec.id, 1, 3))))
    await store.commit(Write(attempts=(attempt(rec.id, 2, 1), attempt(other.id, 1, 1))))
    await store.commit(Write(attempts=(attempt(rec.id, 1, 1), attempt(rec.id, 1, 2))))
    got = await store.read_attempts(rec.id)
    assert [(a.index, a.attempt) for a in got] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    assert got[0] == attempt(rec.id, 1, 1)
    assert [(a.index, a.attempt) for a in await store.read_attempts(other.id)] == [(1, 1)]


async def test_read_journals_reads_many_invocations_at_once(store: Store) -> None:
    a = await created(store)
    b = await created(store)
    await store.commit(
        Write(entries=(entry(a.id, 2), entry(a.id, 1)), attempts=(attempt(a.id, 3, 1),))
    )
    await store.commit(Write(attempts=(attempt(b.id, 1, 2), attempt(b.id, 1, 1))))
    found = await store.read_journals([b.id, "no-such-invocation", a.id])
    assert set(found) == {a.id, b.id, "no-such-invocation"}
    for rec in (a, b):
        assert found[rec.id] == (
            await store.read_journal(rec.id),
            await store.read_attempts(rec.id),
        )
    assert [e.index for e in found[a.id][0]] == [0, 1, 2]
    assert [x.attempt for x in found[b.id][1]] == [1, 2]
    assert found["no-such-invocation"] == ([], [])
    assert await store.read_journals([]) == {}


async def test_list_invocations_filters(store: Store) -> None:
    a = await created(store, target="pay", created_at=1.0)
    b = await created(store, target="ship", created_at=2.0)
    c = await created(store, target="pay", created_at=3.0)
    d = await created(store, target="pay", created_at=4.0)
    await store.commit(
        Write(status=StatusChange(invocation_id=c.id, status=Status.COMPLETED, updated_at=5.0))
    )
    await store.commit(
        Write(status=StatusChange(invocation_id=d.id, status=Status.FAILED, updated_at=5.0))
    )

    async def ids(**kwargs: Any) -> list[str]:
        return [r.id for r in await store.list_invocations(**kwargs)]

    assert await ids() == [a.id, b.id, c.id, d.id]
    assert await ids(target="pay") == [a.id, c.id, d.id]
    assert await ids(target="nope") == []
    assert await ids(statuses=[Status.RUNNING]) == [a.id, b.id]
    assert await ids(statuses=[Status.COMPLETED, Status.FAILED]) == [c.id, d.id]
    assert await ids(statuses=[]) == []
    assert await ids(statuses=[Status.RUNNING], target="pay") == [a.id]
    assert await ids(limit=2) == [a.id, b.id]
    assert await ids(target="pay", limit=2) == [a.id, c.id]
    assert await ids(limit=0) == []
    assert await ids(statuses=[Status.PENDING, Status.RUNNING, Status.SUSPENDED]) == [a.id, b.id]
    rows = await store.list_invocations(statuses=[Status.FAILED])
    assert [(r.id, r.status, r.updated_at) for r in rows] == [(d.id, Status.FAILED, 5.0)]


async def test_list_invocations_is_oldest_first_even_with_caller_chosen_ids(
    store: Store,
) -> None:
    older = await created(store, id="zz-older", created_at=1.0)
    newer = await created(store, id="aa-newer", created_at=2.0)
    assert [r.id for r in await store.list_invocations()] == [older.id, newer.id]


async def test_idempotent_result_first_writer_wins(store: Store) -> None:
    a = await created(store)
    b = await created(store)
    first = idem("charge", "card-1", b'"first"', a.id)
    await store.commit(Write(entries=(entry(a.id, 1),), idempotent=first))
    second = idem("charge", "card-1", b'"second"', b.id)
    await store.commit(Write(entries=(entry(b.id, 1),), idempotent=second))
    assert await store.get_idempotent_result("charge", "card-1") == first
    # The rest of the losing write was kept: only the result is ignored.
    assert len(await store.read_journal(b.id)) == 2
    # Scope and key are both part of the identity.
    assert await store.get_idempotent_result("refund", "card-1") is None
    assert await store.get_idempotent_result("charge", "card-2") is None


async def test_concurrent_idempotent_results_keep_exactly_one(store: Store) -> None:
    recs = [await created(store) for _ in range(10)]
    await asyncio.gather(
        *(
            store.commit(
                Write(
                    entries=(entry(r.id, 1),),
                    idempotent=idem("s", "k", f'"{r.id}"'.encode(), r.id),
                )
            )
            for r in recs
        )
    )
    stored = await store.get_idempotent_result("s", "k")
    assert stored is not None
    assert stored.payload == f'"{stored.invocation_id}"'.encode()
    assert stored.invocation_id in {r.id for r in recs}


async def test_schema_version_is_current(store: Store) -> None:
    assert await store.schema_version() == SCHEMA_VERSION


# -- durable actors ---------------------------------------------------------------


async def created_message(store: Store, *args: Any, **kwargs: Any) -> InvocationRecord:
    rec = message(*args, **kwargs)
    stored, was_created = await store.create_invocation(rec, input_entry(rec))
    assert was_created
    assert stored == rec
    return rec


async def test_actor_fields_round_trip(store: Store) -> None:
    plain = await created(store)
    rec = await created_message(store, "Counter", "ünï/key \x00", 7, key="idem-1")
    assert (rec.actor_type, rec.actor_key, rec.actor_seq) == ("Counter", "ünï/key \x00", 7)
    got = await store.get_invocation(rec.id)
    assert got == rec
    assert got is not None
    assert type(got.actor_seq) is int
    assert await store.find_invocation(rec.target, "idem-1", actor_key=rec.actor_key) == rec
    assert await store.find_invocation(rec.target, "idem-1") is None  # keys are per actor
    assert await store.list_invocations() == [plain, rec]
    assert await store.list_invocations(target=rec.target) == [rec]
    assert plain.actor_type is plain.actor_key is plain.actor_seq is None
    assert await store.get_invocation(plain.id) == plain
    # A status change keeps the actor fields.
    await store.commit(
        Write(status=StatusChange(invocation_id=rec.id, status=Status.COMPLETED, updated_at=5.0))
    )
    got = await store.get_invocation(rec.id)
    assert got == msgspec.structs.replace(rec, status=Status.COMPLETED, updated_at=5.0)


async def test_taken_actor_seq_is_a_conflict(store: Store) -> None:
    first = await created_message(store, "Counter", "a", 1)
    clash = message("Counter", "a", 1, created_at=2000.0)
    with pytest.raises(ConflictError):
        await store.create_invocation(clash, input_entry(clash))
    assert await store.get_invocation(clash.id) is None
    assert await store.read_journal(clash.id) == []
    assert await store.list_actor_messages("Counter", "a") == [first]
    # The same seq under another key or another type is another actor's.
    await created_message(store, "Counter", "b", 1)
    await created_message(store, "Timer", "a", 1)
    await created_message(store, "Counter", "a", 2)


async def test_idempotency_key_is_checked_before_actor_seq(store: Store) -> None:
    first = await created_message(store, "Counter", "a", 1, key="msg-1")
    # Same key: the existing message, even though its seq is taken too.
    again = message("Counter", "a", 1, key="msg-1")
    assert await store.create_invocation(again, input_entry(again)) == (first, False)
    # Same key, another seq: still the existing message, nothing new logged.
    later = message("Counter", "a", 2, key="msg-1")
    assert await store.create_invocation(later, input_entry(later)) == (first, False)
    assert await store.last_actor_seq("Counter", "a") == 1
    # A new key does not excuse a taken seq.
    other = message("Counter", "a", 1, key="msg-2")
    with pytest.raises(ConflictError):
        await store.create_invocation(other, input_entry(other))
    assert await store.find_invocation(other.target, "msg-2") is None


async def test_concurrent_creates_of_one_actor_seq_create_exactly_one(store: Store) -> None:
    records = [message("Counter", "a", 1, created_at=1000.0 + i) for i in range(20)]
    others = [message("Counter", "a", seq) for seq in range(2, 12)]
    results = await asyncio.gather(
        *(store.create_invocation(r, input_entry(r)) for r in [*records, *others]),
        return_exceptions=True,
    )
    ok = [r for r in results[: len(records)] if not isinstance(r, BaseException)]
    assert len(ok) == 1
    assert all(isinstance(r, ConflictError) for r in results[: len(records)] if r not in ok)
    # The other messages of the same group commit went in.
    assert results[len(records) :] == [(r, True) for r in others]
    winner = ok[0]
    assert isinstance(winner, tuple)
    assert await store.list_actor_messages("Counter", "a") == [winner[0], *others]
    assert len(await store.list_invocations()) == 1 + len(others)


async def test_half_set_actor_fields_are_rejected(store: Store) -> None:
    for fields in (
        {"actor_type": "Counter"},
        {"actor_type": "Counter", "actor_key": "a"},
        {"actor_key": "a", "actor_seq": 1},
    ):
        rec = msgspec.structs.replace(invocation(), **fields)
        with pytest.raises(ValueError, match="all set or all None"):
            await store.create_invocation(rec, input_entry(rec))
        assert await store.get_invocation(rec.id) is None
    assert await store.list_actors() == []


async def test_list_actor_messages_is_in_log_order_within_bounds(store: Store) -> None:
    by_seq: dict[int, InvocationRecord] = {}
    # Created out of log order, with creation times against it.
    for n, seq in enumerate((3, 1, 5, 2, 4)):
        by_seq[seq] = await created_message(store, "Counter", "a", seq, created_at=100.0 - n)
    await created_message(store, "Counter", "b", 2)
    await created_message(store, "Timer", "a", 2)
    await created(store)

    async def seqs(**kwargs: Any) -> list[int | None]:
        got = await store.list_actor_messages("Counter", "a", **kwargs)
        assert got == [by_seq[r.actor_seq or 0] for r in got]
        return [r.actor_seq for r in got]

    assert await seqs() == [1, 2, 3, 4, 5]
    assert await seqs(after_seq=2) == [3, 4, 5]
    assert await seqs(upto_seq=4) == [1, 2, 3, 4]
    assert await seqs(after_seq=1, upto_seq=3) == [2, 3]
    assert await seqs(after_seq=2, upto_seq=3) == [3]
    assert await seqs(after_seq=3, upto_seq=3) == []
    assert await seqs(after_seq=5) == []
    assert await seqs(upto_seq=0) == []
    assert await seqs(upto_seq=99) == [1, 2, 3, 4, 5]
    assert await store.list_actor_messages("Counter", "nobody") == []
    assert await store.list_actor_messages("Nothing", "a") == []
    # Messages are read as they are now.
    await store.commit(
        Write(
            status=StatusChange(
                invocation_id=by_seq[2].id, status=Status.FAILED, updated_at=9.0, last_error="x"
            )
        )
    )
    got = await store.list_actor_messages("Counter", "a", after_seq=1, upto_seq=2)
    assert [(r.id, r.status, r.last_error) for r in got] == [(by_seq[2].id, Status.FAILED, "x")]


async def test_last_actor_seq(store: Store) -> None:
    assert await store.last_actor_seq("Counter", "a") == 0
    await created(store)
    assert await store.last_actor_seq("Counter", "a") == 0
    for seq in (2, 9, 4):
        await created_message(store, "Counter", "a", seq)
    await created_message(store, "Counter", "b", 50)
    await created_message(store, "Timer", "a", 60)
    assert await store.last_actor_seq("Counter", "a") == 9
    assert await store.last_actor_seq("Counter", "b") == 50
    assert await store.last_actor_seq("Timer", "a") == 60
    assert await store.last_actor_seq("Timer", "b") == 0


async def test_checkpoint_is_committed_with_its_write(store: Store) -> None:
    rec = await created_message(store, "Counter", "a", 1)
    cp = Checkpoint(
        actor_type="Counter",
        actor_key="a",
        seq=1,
        state=bytes(range(256)),
        type_tag=None,
        checksum="0" * 64,
        state_version=12,
        created_at=1234.5678,
    )
    await store.commit(
        Write(
            entries=(entry(rec.id, 1, kind=EntryKind.OUTPUT),),
            status=StatusChange(invocation_id=rec.id, status=Status.COMPLETED, updated_at=2.0),
            checkpoint=cp,
        )
    )
    got = await store.read_checkpoints("Counter", "a")
    assert got == [cp]
    assert type(got[0].state) is bytes
    assert [e.index for e in await store.read_journal(rec.id)] == [0, 1]
    # A write may hold a checkpoint alone.
    second = checkpoint("Counter", "a", 2)
    await store.commit(Write(checkpoint=second))
    assert await store.read_checkpoints("Counter", "a") == [second, cp]
    assert await store.read_checkpoints("Counter", "b") == []
    assert await store.read_checkpoints("Timer", "a") == []


async def test_failed_write_leaves_no_checkpoint(store: Store) -> None:
    rec = await created_message(store, "Counter", "a", 1)
    await store.commit(Write(entries=(entry(rec.id, 1),), checkpoint=checkpoint("Counter", "a", 1)))
    kept = await store.read_checkpoints("Counter", "a")
    for cp in (checkpoint("Counter", "a", 2), checkpoint("Counter", "a", 1, b"replaced")):
        with pytest.raises(ConflictError):
            await store.commit(Write(entries=(entry(rec.id, 1, name="dup"),), checkpoint=cp))
        assert await store.read_checkpoints("Counter", "a") == kept
    assert await store.read_journal(rec.id) == [input_entry(rec), entry(rec.id, 1)]


async def test_one_bad_write_in_a_group_commit_loses_only_its_checkpoint(
    store: Store,
) -> None:
    recs = [await created_message(store, "Counter", f"k{i}", 1) for i in range(10)]
    bad_rec = recs[3]
    await store.commit(Write(entries=(entry(bad_rec.id, 1),)))
    writes = [
        Write(
            entries=(entry(rec.id, 1, name="dup" if rec is bad_rec else "ok"),),
            checkpoint=checkpoint("Counter", f"k{i}", 1, f"state-{i}".encode()),
        )
        for i, rec in enumerate(recs)
    ]
    results = await asyncio.gather(*(store.commit(w) for w in writes), return_exceptions=True)
    assert [type(r) for r in results] == [
        ConflictError if rec is bad_rec else type(None) for rec in recs
    ]
    for i, rec in enumerate(recs):
        got = await store.read_checkpoints("Counter", f"k{i}")
        if rec is bad_rec:
            assert got == []
        else:
            assert got == [writes[i].checkpoint]


async def test_read_checkpoints_newest_first_with_bounds(store: Store) -> None:
    for seq in (3, 1, 6, 2, 5, 4):
        await store.commit(Write(checkpoint=checkpoint("Counter", "a", seq, f"s{seq}".encode())))
    await store.commit(Write(checkpoint=checkpoint("Counter", "b", 10)))
    await store.commit(Write(checkpoint=checkpoint("Timer", "a", 11)))

    async def seqs(**kwargs: Any) -> list[int]:
        got = await store.read_checkpoints("Counter", "a", **kwargs)
        assert all(c.state == f"s{c.seq}".encode() for c in got)
        return [c.seq for c in got]

    assert await seqs() == [6, 5, 4]
    assert await seqs(limit=10) == [6, 5, 4, 3, 2, 1]
    assert await seqs(limit=1) == [6]
    assert await seqs(limit=0) == []
    assert await seqs(at_or_before=4) == [4, 3, 2]
    assert await seqs(at_or_before=4, limit=1) == [4]
    assert await seqs(at_or_before=2, limit=5) == [2, 1]
    assert await seqs(at_or_before=99) == [6, 5, 4]
    assert await seqs(at_or_before=0) == []
    assert await store.read_checkpoints("Counter", "nobody") == []


async def test_checkpoint_replaces_the_one_with_the_same_seq(store: Store) -> None:
    await store.commit(Write(checkpoint=checkpoint("Counter", "a", 1, b"one")))
    await store.commit(Write(checkpoint=checkpoint("Counter", "a", 2, b"old")))
    newer = msgspec.structs.replace(
        checkpoint("Counter", "a", 2, b"new"), state_version=4, type_tag=None, created_at=9.0
    )
    await store.commit(Write(checkpoint=newer))
    assert [c.state for c in await store.read_checkpoints("Counter", "a")] == [b"new", b"one"]
    assert (await store.read_checkpoints("Counter", "a"))[0] == newer
    # Within one group commit too, the later write wins.
    await asyncio.gather(
        *(
            store.commit(Write(checkpoint=checkpoint("Counter", "a", 3, f"v{i}".encode())))
            for i in range(5)
        )
    )
    got = await store.read_checkpoints("Counter", "a", limit=10)
    assert [(c.seq, c.state) for c in got] == [(3, b"v4"), (2, b"new"), (1, b"one")]


async def test_list_actors(store: Store) -> None:
    assert await store.list_actors() == []
    await created(store)
    for actor_type, key, seq in [
        ("Timer", "z", 1),
        ("Counter", "b", 1),
        ("Counter", "a", 1),
        ("Counter", "a", 2),
        ("Timer", "a", 1),
    ]:
        await created_message(store, actor_type, key, seq)
    # A checkpoint alone does not make an actor.
    await store.commit(Write(checkpoint=checkpoint("Ghost", "g", 1)))
    assert await store.list_actors() == [
        ("Counter", "a"),
        ("Counter", "b"),
        ("Timer", "a"),
        ("Timer", "z"),
    ]
    assert await store.list_actors("Counter") == [("Counter", "a"), ("Counter", "b")]
    assert await store.list_actors(actor_type="Timer") == [("Timer", "a"), ("Timer", "z")]
    assert await store.list_actors("Ghost") == []
    assert await store.list_actors("Nothing") == []


async def test_actor_data_survives_close_and_reopen(store_url: str) -> None:
    first = make_store(store_url)
    await first.open()
    rec = await created_message(first, "Counter", "a", 1)
    cp = checkpoint("Counter", "a", 1)
    await first.commit(Write(entries=(entry(rec.id, 1),), checkpoint=cp))
    await first.close()

    again = first if isinstance(first, MemoryStore) else make_store(store_url)
    await again.open()
    try:
        assert await again.get_invocation(rec.id) == rec
        assert await again.list_actor_messages("Counter", "a") == [rec]
        assert await again.last_actor_seq("Counter", "a") == 1
        assert await again.read_checkpoints("Counter", "a") == [cp]
        assert await again.list_actors() == [("Counter", "a")]
        clash = message("Counter", "a", 1)
        with pytest.raises(ConflictError):
            await again.create_invocation(clash, input_entry(clash))
    finally:
        await again.close()


async def test_sqlite_migrates_a_version_1_database(tmp_path: Any) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_MIGRATIONS[0])
        conn.execute("PRAGMA user_version=1")
        conn.execute(
            "INSERT INTO invocations (id, target, input_hash, idempotency_key, status, "
            "created_at, updated_at, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("old-1", "wf", "hash-old", "key-old", "suspended", 10.0, 11.0, "why"),
        )
        conn.execute(
            "INSERT INTO journal (invocation_id, idx, kind, name, ok, payload, type_tag, "
            "attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old-1", 0, "input", "wf", 1, b'{"args":[]}', None, 1, 10.0),
        )
        conn.commit()
    finally:
        conn.close()

    old = InvocationRecord(
        id="old-1",
        target="wf",
        input_hash="hash-old",
        idempotency_key="key-old",
        status=Status.SUSPENDED,
        created_at=10.0,
        updated_at=11.0,
        last_error="why",
    )
    async with SQLiteStore(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION
        got = await store.get_invocation("old-1")
        assert got == old
        assert got is not None
        assert got.actor_type is got.actor_key is got.actor_seq is None
        assert await store.find_invocation("wf", "key-old") == old
        assert await store.list_invocations() == [old]
        assert [e.name for e in await store.read_journal("old-1")] == ["wf"]
        assert await store.list_actors() == []
        # The new columns, index and table work on the migrated file.
        rec = await created_message(store, "Counter", "a", 1)
        clash = message("Counter", "a", 1)
        with pytest.raises(ConflictError):
            await store.create_invocation(clash, input_entry(clash))
        cp = checkpoint("Counter", "a", 1)
        await store.commit(Write(entries=(entry(rec.id, 1),), checkpoint=cp))
        assert await store.read_checkpoints("Counter", "a") == [cp]
        assert await store.list_actor_messages("Counter", "a") == [rec]
    # Reopening a migrated file migrates nothing again.
    async with SQLiteStore(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION
        assert await store.get_invocation("old-1") == old


# -- lifecycle --------------------------------------------------------------------


async def test_data_survives_close_and_reopen(store_url: str) -> None:
    """SQLite: a new store object on the same file. Memory: the same object reopened."""
    first = make_store(store_url)
    await first.open()
    rec = await created(first, key="k")
    await first.commit(
        Write(
            entries=(entry(rec.id, 1),),
            attempts=(attempt(rec.id, 1, 1),),
            status=StatusChange(invocation_id=rec.id, status=Status.COMPLETED, updated_at=7.0),
            idempotent=idem("s", "k", b"1", rec.id),
        )
    )
    await first.close()

    again = first if isinstance(first, MemoryStore) else make_store(store_url)
    await again.open()
    try:
        got = await again.get_invocation(rec.id)
        assert got is not None
        assert got.status is Status.COMPLETED
        assert await again.find_invocation("wf", "k") == got
        assert [e.index for e in await again.read_journal(rec.id)] == [0, 1]
        assert len(await again.read_attempts(rec.id)) == 1
        assert await again.get_idempotent_result("s", "k") is not None
        assert await again.schema_version() == SCHEMA_VERSION
    finally:
        await again.close()


async def test_open_and_close_are_idempotent(store_url: str) -> None:
    store = make_store(store_url)
    await store.open()
    await store.open()
    rec = await created(store)
    await store.close()
    await store.close()
    await store.open()
    try:
        assert await store.get_invocation(rec.id) == rec
    finally:
        await store.close()


async def test_store_is_an_async_context_manager(store_url: str) -> None:
    async with make_store(store_url) as store:
        rec = await created(store)
        assert await store.get_invocation(rec.id) == rec
    with pytest.raises(StorageError):
        await store.get_invocation(rec.id)


_OPERATIONS = {
    "create_invocation": lambda s: s.create_invocation(invocation(), input_entry(invocation())),
    "commit": lambda s: s.commit(Write(entries=(entry("x", 1),))),
    "get_invocation": lambda s: s.get_invocation("x"),
    "find_invocation": lambda s: s.find_invocation("wf", "k"),
    "list_invocations": lambda s: s.list_invocations(),
    "read_journal": lambda s: s.read_journal("x"),
    "read_attempts": lambda s: s.read_attempts("x"),
    "read_journals": lambda s: s.read_journals(["x"]),
    "get_idempotent_result": lambda s: s.get_idempotent_result("s", "k"),
    "list_actor_messages": lambda s: s.list_actor_messages("t", "k"),
    "last_actor_seq": lambda s: s.last_actor_seq("t", "k"),
    "read_checkpoints": lambda s: s.read_checkpoints("t", "k"),
    "list_actors": lambda s: s.list_actors(),
}


@pytest.mark.parametrize("operation", sorted(_OPERATIONS))
async def test_closed_store_raises_storage_error(store_url: str, operation: str) -> None:
    store = make_store(store_url)
    await store.open()
    await store.close()
    with pytest.raises(StorageError, match=r"closed|not open"):
        await _OPERATIONS[operation](store)


@pytest.mark.parametrize("operation", sorted(_OPERATIONS))
async def test_never_opened_store_raises_storage_error(store_url: str, operation: str) -> None:
    store = make_store(store_url)
    with pytest.raises(StorageError):
        await _OPERATIONS[operation](store)


async def test_sqlite_store_path_and_url(tmp_path: Any) -> None:
    path = tmp_path / "direct.db"
    store = SQLiteStore(path)
    async with store:
        rec = await created(store)
    assert path.exists()
    assert store.url.startswith("sqlite:///")
    async with make_store(f"sqlite:///{path}") as reopened:
        assert await reopened.get_invocation(rec.id) == rec
