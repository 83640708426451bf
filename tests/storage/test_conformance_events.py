"""The event half of the ``perdure.storage.Store`` contract, on every backend:
wake-ups and due invocations, promises, signals, cancellation requests and
children. The fixtures and record builders are test_conformance.py's.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import msgspec
import pytest

from perdure import ConflictError, NotFoundError
from perdure.storage import (
    CancelRequest,
    EntryKind,
    InvocationRecord,
    PromiseRecord,
    Resolution,
    SignalRecord,
    SQLiteStore,
    Status,
    StatusChange,
    Store,
    Wake,
    Write,
)
from perdure.storage._sqlite import _MIGRATIONS, SCHEMA_VERSION

from .test_conformance import created, entry, input_entry, invocation, make_store, store

__all__ = ["store"]  # the fixture, shared with test_conformance.py


async def status(
    store: Store, rec: InvocationRecord, to: Status, wake_at: float | None = None
) -> None:
    await store.commit(
        Write(
            status=StatusChange(invocation_id=rec.id, status=to, updated_at=2000.0, wake_at=wake_at)
        )
    )


async def suspended(store: Store, wake_at: float | None = None, **kwargs: Any) -> InvocationRecord:
    rec = await created(store, **kwargs)
    await status(store, rec, Status.SUSPENDED, wake_at)
    return rec


async def wake_of(store: Store, rec: InvocationRecord) -> float | None:
    got = await store.get_invocation(rec.id)
    assert got is not None
    return got.wake_at


async def wake(store: Store, rec: InvocationRecord, at: float) -> Any:
    return await store.commit(Write(wakes=(Wake(invocation_id=rec.id, at=at),)))


def promise(owner: InvocationRecord, index: int = 1, *, name: str = "approval") -> PromiseRecord:
    return PromiseRecord(
        id=f"{owner.id}:{index}",
        invocation_id=owner.id,
        name=name,
        state="pending",
        payload=None,
        type_tag=None,
        created_at=1500.0,
    )


async def promised(store: Store, owner: InvocationRecord, index: int = 1) -> PromiseRecord:
    """A promise journaled and recorded in one write, as a workflow creates it."""
    p = promise(owner, index)
    await store.commit(
        Write(
            entries=(entry(owner.id, index, kind=EntryKind.PROMISE, name=p.name),),
            promises=(p,),
        )
    )
    return p


def resolution(p: PromiseRecord | str, *, ok: bool = True, at: float = 1600.0) -> Resolution:
    return Resolution(
        promise_id=p if isinstance(p, str) else p.id,
        ok=ok,
        payload=b'"yes"' if ok else b'{"type":"x:TerminalError","message":"no"}',
        type_tag="app:Decision" if ok else None,
        at=at,
    )


def sig(owner: InvocationRecord | str, name: str = "add", n: int = 1) -> SignalRecord:
    return SignalRecord(
        invocation_id=owner if isinstance(owner, str) else owner.id,
        name=name,
        payload=str(n).encode(),
        type_tag=None,
        created_at=1700.0 + n,
    )


def cancel(
    owner: InvocationRecord | str, reason: str = "asked", at: float = 1800.0
) -> CancelRequest:
    return CancelRequest(
        invocation_id=owner if isinstance(owner, str) else owner.id, reason=reason, at=at
    )


# -- wake-ups and due invocations ------------------------------------------------------------


async def test_due_invocations_are_the_suspended_ones_due_soonest_first(store: Store) -> None:
    later = await suspended(store, 30.0)
    soonest = await suspended(store, 10.0)
    middle = await suspended(store, 20.0)
    await suspended(store, None)  # waits to be woken: never due by itself
    running = await created(store)
    await wake(store, running, 5.0)  # a pending wake-up, but it is running
    done = await suspended(store, 1.0)
    await status(store, done, Status.COMPLETED)

    async def due(before: float, **kwargs: Any) -> list[str]:
        return [r.id for r in await store.due_invocations(before, **kwargs)]

    assert await due(25.0) == [soonest.id, middle.id]
    assert await due(100.0) == [soonest.id, middle.id, later.id]
    assert await due(20.0) == [soonest.id, middle.id]  # due at exactly ``before``
    assert await due(9.99) == []
    assert await due(100.0, limit=2) == [soonest.id, middle.id]
    assert await due(100.0, limit=1) == [soonest.id]
    got = await store.due_invocations(15.0)
    assert [(r.status, r.wake_at) for r in got] == [(Status.SUSPENDED, 10.0)]


async def test_next_wake_at_is_the_soonest_of_the_suspended(store: Store) -> None:
    assert await store.next_wake_at() is None
    await suspended(store, None)
    assert await store.next_wake_at() is None
    running = await created(store)
    await wake(store, running, 1.0)  # running: not a parked wake-up
    assert await store.next_wake_at() is None
    a = await suspended(store, 50.0)
    b = await suspended(store, 40.0)
    assert await store.next_wake_at() == 40.0
    await status(store, b, Status.RUNNING)  # resumed: its wake-up is gone
    assert await store.next_wake_at() == 50.0
    await status(store, a, Status.COMPLETED)
    assert await store.next_wake_at() is None


@pytest.mark.parametrize(
    ("pending", "asked", "kept"),
    [
        pytest.param(None, None, None, id="none-none"),
        pytest.param(None, 70.0, 70.0, id="none-then-timer"),
        pytest.param(50.0, None, 50.0, id="woken-then-waits"),
        pytest.param(50.0, 100.0, 50.0, id="woken-sooner-than-timer"),
        pytest.param(50.0, 20.0, 20.0, id="timer-sooner-than-wake"),
    ],
)
async def test_suspending_keeps_a_sooner_pending_wake(
    store: Store, pending: float | None, asked: float | None, kept: float | None
) -> None:
    """A wake-up that raced with the suspension (it committed while the
    invocation was still running) is not lost."""
    rec = await created(store)
    if pending is not None:
        await wake(store, rec, pending)
        assert await wake_of(store, rec) == pending
    await status(store, rec, Status.SUSPENDED, asked)
    assert await wake_of(store, rec) == kept
    got = await store.get_invocation(rec.id)
    assert got is not None
    assert (got.status, got.updated_at) == (Status.SUSPENDED, 2000.0)


async def test_a_wake_racing_a_suspension_in_one_group_commit_is_kept(store: Store) -> None:
    for wake_first in (True, False):
        rec = await created(store)
        suspend = Write(
            status=StatusChange(
                invocation_id=rec.id, status=Status.SUSPENDED, updated_at=2.0, wake_at=100.0
            )
        )
        woken = Write(wakes=(Wake(invocation_id=rec.id, at=5.0),))
        writes = (woken, suspend) if wake_first else (suspend, woken)
        await asyncio.gather(*(store.commit(w) for w in writes))
        assert await wake_of(store, rec) == 5.0
        assert [r.id for r in await store.due_invocations(10.0)] == [rec.id]
        await status(store, rec, Status.COMPLETED)


@pytest.mark.parametrize("to", [Status.RUNNING, Status.PENDING, Status.COMPLETED, Status.FAILED])
async def test_any_other_status_clears_the_pending_wake(store: Store, to: Status) -> None:
    rec = await suspended(store, 30.0)
    await wake(store, rec, 10.0)
    assert await wake_of(store, rec) == 10.0
    await status(store, rec, to, wake_at=99.0)  # wake_at means nothing here
    assert await wake_of(store, rec) is None
    assert await store.due_invocations(1e9) == []


async def test_a_wake_only_moves_the_wake_up_sooner(store: Store) -> None:
    rec = await suspended(store, 30.0)
    assert await wake(store, rec, 50.0) is None
    assert await wake_of(store, rec) == 30.0
    await wake(store, rec, 10.0)
    assert await wake_of(store, rec) == 10.0
    waiting = await suspended(store, None)
    await wake(store, waiting, 70.0)
    assert await wake_of(store, waiting) == 70.0
    got = await store.get_invocation(waiting.id)
    assert got is not None
    assert got.status is Status.SUSPENDED  # woken, not claimed


async def test_a_wake_for_a_finished_or_unknown_invocation_is_ignored(store: Store) -> None:
    done = await created(store)
    await status(store, done, Status.COMPLETED)
    before = await store.get_invocation(done.id)
    neighbour = await suspended(store, None)
    await store.commit(
        Write(
            wakes=(
                Wake(invocation_id=done.id, at=1.0),
                Wake(invocation_id="no-such-invocation", at=1.0),
                Wake(invocation_id=neighbour.id, at=3.0),
            )
        )
    )
    assert await store.get_invocation(done.id) == before
    assert await store.get_invocation("no-such-invocation") is None
    assert await wake_of(store, neighbour) == 3.0  # the rest of the write applied
    assert [r.id for r in await store.due_invocations(1e9)] == [neighbour.id]


# -- promises ------------------------------------------------------------------------------


async def test_a_promise_is_recorded_with_its_creation_entry(store: Store) -> None:
    owner = await created(store)
    p = await promised(store, owner)
    assert await store.get_promise(p.id) == p
    assert await store.get_promise("no-such-promise") is None
    assert [e.kind for e in await store.read_journal(owner.id)] == [
        EntryKind.INPUT,
        EntryKind.PROMISE,
    ]


async def test_a_taken_promise_id_is_a_conflict_and_writes_nothing(store: Store) -> None:
    owner = await created(store)
    p = await promised(store, owner)
    clash = msgspec.structs.replace(p, name="other", created_at=1.0)
    with pytest.raises(ConflictError):
        await store.commit(Write(entries=(entry(owner.id, 2),), promises=(clash,)))
    assert await store.get_promise(p.id) == p
    assert (
        len(await store.read_journal(owner.id)) == 2
    )  # the entry of the rejected write is not kept


async def test_two_promises_with_one_id_in_one_write_are_a_conflict(store: Store) -> None:
    owner = await created(store)
    p = promise(owner)
    with pytest.raises(ConflictError):
        await store.commit(
            Write(
                promises=(p, msgspec.structs.replace(p, name="twin")), entries=(entry(owner.id, 1),)
            )
        )
    assert await store.get_promise(p.id) is None
    assert len(await store.read_journal(owner.id)) == 1


async def test_a_promise_of_an_unknown_invocation_is_a_conflict(store: Store) -> None:
    ghost = invocation()
    with pytest.raises(ConflictError):
        await store.commit(Write(promises=(promise(ghost),)))
    assert await store.get_promise(promise(ghost).id) is None


@pytest.mark.parametrize("ok", [True, False], ids=["resolve", "reject"])
async def test_settling_a_promise_records_it_and_wakes_its_owner(store: Store, ok: bool) -> None:
    owner = await created(store)
    p = await promised(store, owner)
    await status(store, owner, Status.SUSPENDED)  # parked on the promise
    settle = resolution(p, ok=ok, at=1600.0)
    assert await store.commit(Write(resolution=settle)) is None
    got = await store.get_promise(p.id)
    assert got == msgspec.structs.replace(
        p,
        state="resolved" if ok else "rejected",
        payload=settle.payload,
        type_tag=settle.type_tag,
        resolved_at=1600.0,
    )
    assert await wake_of(store, owner) == 1600.0
    assert [r.id for r in await store.due_invocations(1600.0)] == [owner.id]


async def test_a_promise_settles_once(store: Store) -> None:
    owner = await created(store)
    p = await promised(store, owner)
    await store.commit(Write(resolution=resolution(p)))
    settled = await store.get_promise(p.id)
    for again in (resolution(p, at=9.0), resolution(p, ok=False, at=9.0)):
        with pytest.raises(ConflictError, match="already resolved"):
            await store.commit(Write(resolution=again, entries=(entry(owner.id, 2),)))
    assert await store.get_promise(p.id) == settled
    assert len(await store.read_journal(owner.id)) == 2
    rejected = await promised(store, owner, 3)
    await store.commit(Write(resolution=resolution(rejected, ok=False)))
    with pytest.raises(ConflictError, match="already rejected"):
        await store.commit(Write(resolution=resolution(rejected)))


async def test_settling_an_unknown_promise_is_not_found(store: Store) -> None:
    owner = await created(store)
    with pytest.raises(NotFoundError):
        await store.commit(
            Write(resolution=resolution("no-such-promise"), entries=(entry(owner.id, 1),))
        )
    assert len(await store.read_journal(owner.id)) == 1


# -- signals -------------------------------------------------------------------------------


async def test_signals_are_numbered_per_invocation_and_the_commit_returns_the_seq(
    store: Store,
) -> None:
    a = await created(store)
    b = await created(store)
    assert await store.commit(Write(signal=sig(a, "add", 1))) == 1
    assert await store.commit(Write(signal=sig(a, "other", 2))) == 2
    assert await store.commit(Write(signal=sig(b, "add", 3))) == 1
    assert await store.commit(Write(signal=sig(a, "add", 4))) == 3
    got = await store.read_signals(a.id, "add")
    assert got == [
        msgspec.structs.replace(sig(a, "add", 1), seq=1),
        msgspec.structs.replace(sig(a, "add", 4), seq=3),
    ]
    assert [s.seq for s in await store.read_signals(a.id, "other")] == [2]
    assert [s.seq for s in await store.read_signals(b.id, "add")] == [1]
    assert await store.read_signals(b.id, "other") == []
    assert await store.read_signals("no-such-invocation", "add") == []


async def test_concurrent_signals_get_distinct_seqs_in_arrival_order(store: Store) -> None:
    rec = await created(store)
    seqs = await asyncio.gather(
        *(store.commit(Write(signal=sig(rec, "add", n))) for n in range(10))
    )
    assert sorted(seqs) == list(range(1, 11))
    got = await store.read_signals(rec.id, "add")
    assert [s.seq for s in got] == list(range(1, 11))
    # each commit returned the seq its own signal was stored under
    assert {s.payload: s.seq for s in got} == {str(n).encode(): seqs[n] for n in range(10)}


async def test_a_signal_wakes_a_suspended_invocation(store: Store) -> None:
    rec = await suspended(store, None)
    await store.commit(Write(signal=sig(rec, "add", 5)))
    assert await wake_of(store, rec) == sig(rec, "add", 5).created_at
    assert [r.id for r in await store.due_invocations(1e9)] == [rec.id]


async def test_a_signal_to_an_unknown_or_finished_invocation_is_refused(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.commit(Write(signal=sig("no-such-invocation")))
    done = await created(store)
    await store.commit(Write(signal=sig(done, "add", 1)))
    await status(store, done, Status.COMPLETED)
    with pytest.raises(ConflictError, match="completed"):
        await store.commit(Write(signal=sig(done, "add", 2), entries=(entry(done.id, 1),)))
    assert [s.seq for s in await store.read_signals(done.id, "add")] == [1]
    assert len(await store.read_journal(done.id)) == 1


# -- cancellation requests -------------------------------------------------------------------


async def test_a_cancel_records_the_first_reason_and_wakes(store: Store) -> None:
    rec = await suspended(store, 5000.0)
    await store.commit(Write(cancels=(cancel(rec, "first", at=1800.0),)))
    got = await store.get_invocation(rec.id)
    assert got is not None
    assert (got.cancel_reason, got.wake_at, got.status) == ("first", 1800.0, Status.SUSPENDED)
    await store.commit(Write(cancels=(cancel(rec, "second", at=1700.0),)))
    got = await store.get_invocation(rec.id)
    assert got is not None
    assert (got.cancel_reason, got.wake_at) == ("first", 1700.0)
    # a running invocation: the reason is kept for its next durable point
    running = await created(store)
    await asyncio.gather(
        *(store.commit(Write(cancels=(cancel(running, r),))) for r in ("one", "two", "three"))
    )
    got = await store.get_invocation(running.id)
    assert got is not None
    assert got.cancel_reason == "one"
    assert got.status is Status.RUNNING


async def test_several_cancels_in_one_write(store: Store) -> None:
    children = [await suspended(store, None) for _ in range(3)]
    await store.commit(Write(cancels=tuple(cancel(c, "with its parent") for c in children)))
    for c in children:
        got = await store.get_invocation(c.id)
        assert got is not None
        assert (got.cancel_reason, got.wake_at) == ("with its parent", 1800.0)


async def test_a_cancel_of_an_unknown_or_finished_invocation_is_refused(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.commit(Write(cancels=(cancel("no-such-invocation"),)))
    for finished in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
        rec = await created(store)
        await status(store, rec, finished)
        with pytest.raises(ConflictError, match=f"already {finished.value}"):
            await store.commit(Write(cancels=(cancel(rec),), entries=(entry(rec.id, 1),)))
        got = await store.get_invocation(rec.id)
        assert got is not None
        assert got.cancel_reason is None
        assert len(await store.read_journal(rec.id)) == 1


# -- children --------------------------------------------------------------------------------


def child(parent: InvocationRecord, index: int, created_at: float) -> InvocationRecord:
    return msgspec.structs.replace(
        invocation(id=f"{parent.id}:{index}", created_at=created_at),
        parent_id=parent.id,
        deadline=9000.0 + index,
    )


async def test_list_children_oldest_first(store: Store) -> None:
    parent = await created(store)
    other = await created(store)
    made = {}
    for index, at in ((3, 1003.0), (1, 1001.0), (2, 1002.0)):
        rec = child(parent, index, at)
        assert await store.create_invocation(rec, input_entry(rec)) == (rec, True)
        made[index] = rec
    stranger = child(other, 1, 1000.0)
    await store.create_invocation(stranger, input_entry(stranger))
    got = await store.list_children(parent.id)
    assert got == [made[1], made[2], made[3]]
    assert [(r.parent_id, r.deadline) for r in got] == [(parent.id, 9001.0 + i) for i in range(3)]
    assert await store.list_children(other.id) == [stranger]
    assert await store.list_children(made[1].id) == []
    assert await store.list_children("no-such-invocation") == []


# -- one group commit, good and bad writes -------------------------------------------------------


async def test_a_failing_event_write_fails_alone_in_its_group_commit(store_url: str) -> None:
    batch_sizes: list[int] = []
    store = make_store(store_url, before_commit=batch_sizes.append)
    await store.open()
    try:
        owners = [await created(store) for _ in range(6)]
        pending = [await promised(store, o) for o in owners[:3]]
        settled = await promised(store, owners[3])
        await store.commit(Write(resolution=resolution(settled)))
        done = owners[5]
        await status(store, done, Status.COMPLETED)
        batch_sizes.clear()

        good = [
            Write(resolution=resolution(p), entries=(entry(p.invocation_id, 2),)) for p in pending
        ]
        good.append(Write(signal=sig(owners[4], "add", 1)))
        good.append(Write(cancels=(cancel(owners[4]),)))
        good.append(Write(signal=sig(owners[4], "add", 2)))
        bad = [
            Write(resolution=resolution(settled, ok=False), entries=(entry(owners[3].id, 2),)),
            Write(signal=sig(done), entries=(entry(done.id, 1),)),
            Write(resolution=resolution("no-such-promise")),
        ]
        writes = [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4], bad[2], good[5]]
        results = await asyncio.gather(*(store.commit(w) for w in writes), return_exceptions=True)
        by_write = dict(zip(map(id, writes), results, strict=True))
        if "sqlite" in store_url:
            assert max(batch_sizes) == len(writes), batch_sizes  # one group commit

        assert isinstance(by_write[id(bad[0])], ConflictError)
        assert isinstance(by_write[id(bad[1])], ConflictError)
        assert isinstance(by_write[id(bad[2])], NotFoundError)
        assert [by_write[id(w)] for w in good] == [None, None, None, 1, None, 2]
        # the neighbours committed
        for p in pending:
            got = await store.get_promise(p.id)
            assert got is not None
            assert got.state == "resolved"
            assert len(await store.read_journal(p.invocation_id)) == 3
        assert [s.seq for s in await store.read_signals(owners[4].id, "add")] == [1, 2]
        rec = await store.get_invocation(owners[4].id)
        assert rec is not None
        assert rec.cancel_reason == "asked"
        # the failed writes left nothing
        got = await store.get_promise(settled.id)
        assert got is not None
        assert got.state == "resolved"
        assert len(await store.read_journal(owners[3].id)) == 2
        assert await store.read_signals(done.id, "add") == []
        assert len(await store.read_journal(done.id)) == 1
    finally:
        await store.close()


# -- migration --------------------------------------------------------------------------------


async def test_sqlite_migrates_a_version_2_database(tmp_path: Any) -> None:
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    try:
        for script in _MIGRATIONS[:2]:
            conn.executescript(script)
        conn.execute("PRAGMA user_version=2")
        columns = (
            "id, target, input_hash, idempotency_key, status, created_at, updated_at, "
            "last_error, actor_type, actor_key, actor_seq"
        )
        conn.execute(
            f"INSERT INTO invocations ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "old-wf",
                "wf",
                "hash-old",
                "key-old",
                "suspended",
                10.0,
                11.0,
                None,
                None,
                None,
                None,
            ),
        )
        conn.execute(
            f"INSERT INTO invocations ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old-msg", "Counter.add", "h", None, "completed", 12.0, 13.0, None, "Counter", "a", 1),
        )
        conn.execute(
            "INSERT INTO journal (invocation_id, idx, kind, name, ok, payload, type_tag, "
            "attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old-wf", 0, "input", "wf", 1, b'{"args":[]}', None, 1, 10.0),
        )
        conn.commit()
    finally:
        conn.close()

    old_wf = InvocationRecord(
        id="old-wf",
        target="wf",
        input_hash="hash-old",
        idempotency_key="key-old",
        status=Status.SUSPENDED,
        created_at=10.0,
        updated_at=11.0,
    )
    async with SQLiteStore(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION >= 3
        for rec_id in ("old-wf", "old-msg"):
            got = await store.get_invocation(rec_id)
            assert got is not None
            assert got.parent_id is got.wake_at is got.deadline is got.cancel_reason is None
        assert await store.get_invocation("old-wf") == old_wf
        got = await store.get_invocation("old-msg")
        assert got is not None
        assert (got.actor_type, got.actor_key, got.actor_seq) == ("Counter", "a", 1)
        assert [e.name for e in await store.read_journal("old-wf")] == ["wf"]
        # an old suspended row has no wake-up: it is not due, and nothing is next
        assert await store.due_invocations(1e9) == []
        assert await store.next_wake_at() is None
        assert await store.list_children("old-wf") == []
        # the new columns and tables work on the migrated file
        await wake(store, old_wf, 20.0)
        assert [r.id for r in await store.due_invocations(20.0)] == ["old-wf"]
        p = promise(old_wf)
        await store.commit(Write(promises=(p,)))
        await store.commit(Write(resolution=resolution(p)))
        got_p = await store.get_promise(p.id)
        assert got_p is not None
        assert got_p.state == "resolved"
        assert await store.commit(Write(signal=sig(old_wf))) == 1
        await store.commit(Write(cancels=(cancel(old_wf),)))
        kid = child(old_wf, 1, 30.0)
        await store.create_invocation(kid, input_entry(kid))
        assert await store.list_children("old-wf") == [kid]
    # reopening migrates nothing again
    async with SQLiteStore(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION
        got = await store.get_invocation("old-wf")
        assert got is not None
        assert got.cancel_reason == "asked"
