"""Unit tests of the pure replay state machine, ``perdure._journal.Replay``: no I/O."""

from __future__ import annotations

import pytest

from perdure import NonDeterminismError
from perdure._journal import Replay, describe
from perdure.storage import Attempt, EntryKind, JournalEntry

INV = "inv-1"


def entry(index: int, name: str = "s", kind: EntryKind = EntryKind.STEP) -> JournalEntry:
    return JournalEntry(
        invocation_id=INV,
        index=index,
        kind=kind,
        name=name,
        ok=True,
        payload=b"null",
        type_tag=None,
        attempts=1,
        created_at=0.0,
    )


def attempt(index: int, n: int) -> Attempt:
    return Attempt(invocation_id=INV, index=index, attempt=n, error=b"{}", created_at=0.0)


INPUT = entry(0, "wf", EntryKind.INPUT)


def test_fresh_invocation_is_live_from_index_1() -> None:
    replay = Replay(INV, [INPUT])
    assert replay.replaying is False
    assert replay.take(EntryKind.STEP, "a") == (1, None, 0)
    assert replay.take(EntryKind.STEP, "b") == (2, None, 0)
    assert replay.finish() == 3


def test_no_entries_at_all() -> None:
    replay = Replay(INV)
    assert replay.replaying is False
    assert replay.take(EntryKind.STEP, "a") == (1, None, 0)
    assert replay.invocation_id == INV


def test_recorded_entries_are_returned_in_order_then_live() -> None:
    a, b = entry(1, "a"), entry(2, "b")
    replay = Replay(INV, [INPUT, b, a])  # any order in
    assert replay.replaying is True
    assert replay.take(EntryKind.STEP, "a") == (1, a, 0)
    assert replay.replaying is True
    assert replay.take(EntryKind.STEP, "b") == (2, b, 0)
    assert replay.replaying is False
    assert replay.take(EntryKind.STEP, "c") == (3, None, 0)
    assert replay.finish() == 4


def test_name_mismatch_is_nondeterminism() -> None:
    replay = Replay(INV, [INPUT, entry(1, "charge")])
    with pytest.raises(NonDeterminismError) as info:
        replay.take(EntryKind.STEP, "refund")
    err = info.value
    assert (err.invocation_id, err.index) == (INV, 1)
    assert err.expected == "step 'charge'"
    assert err.actual == "step 'refund'"
    assert INV in str(err)
    assert "entry 1" in str(err)


def test_kind_mismatch_is_nondeterminism() -> None:
    replay = Replay(INV, [INPUT, entry(1, "x", EntryKind.OUTPUT)])
    with pytest.raises(NonDeterminismError) as info:
        replay.take(EntryKind.STEP, "x")
    assert info.value.expected == "output 'x'"
    assert info.value.actual == "step 'x'"


def test_mismatch_later_in_the_journal() -> None:
    replay = Replay(INV, [INPUT, entry(1, "a"), entry(2, "b"), entry(3, "c")])
    replay.take(EntryKind.STEP, "a")
    replay.take(EntryKind.STEP, "b")
    with pytest.raises(NonDeterminismError) as info:
        replay.take(EntryKind.STEP, "d")
    assert info.value.index == 3


def test_gaps_are_live_while_later_entries_replay() -> None:
    # Concurrent steps can commit out of order: 1 and 3 recorded, 2 not.
    one, three = entry(1, "p1"), entry(3, "p3")
    replay = Replay(INV, [INPUT, one, three])
    assert replay.take(EntryKind.STEP, "p1") == (1, one, 0)
    assert replay.take(EntryKind.STEP, "p2") == (2, None, 0)
    assert replay.replaying is True  # entry 3 still lies ahead
    assert replay.take(EntryKind.STEP, "p3") == (3, three, 0)
    assert replay.replaying is False
    assert replay.finish() == 4


def test_a_gap_is_not_checked_against_names() -> None:
    replay = Replay(INV, [INPUT, entry(2, "b")])
    assert replay.take(EntryKind.STEP, "anything") == (1, None, 0)
    with pytest.raises(NonDeterminismError):
        replay.take(EntryKind.STEP, "not-b")


def test_finish_with_unreplayed_entries_is_nondeterminism() -> None:
    replay = Replay(INV, [INPUT, entry(1, "a"), entry(3, "c"), entry(2, "b")])
    replay.take(EntryKind.STEP, "a")
    with pytest.raises(NonDeterminismError) as info:
        replay.finish()
    assert info.value.index == 2  # the first one left behind
    assert info.value.expected == "step 'b'"
    assert info.value.actual == "the workflow to return"


def test_finish_ignores_a_recorded_output() -> None:
    output = entry(2, "wf", EntryKind.OUTPUT)
    replay = Replay(INV, [INPUT, entry(1, "a"), output])
    replay.take(EntryKind.STEP, "a")
    assert replay.finish() == 2


def test_failed_attempts_are_counted_per_index() -> None:
    attempts = [attempt(1, 2), attempt(2, 1), attempt(1, 1), attempt(1, 3)]
    replay = Replay(INV, [INPUT], attempts)
    assert replay.take(EntryKind.STEP, "a") == (1, None, 3)
    assert replay.take(EntryKind.STEP, "b") == (2, None, 1)
    assert replay.take(EntryKind.STEP, "c") == (3, None, 0)


def test_attempts_are_the_highest_recorded_not_the_count() -> None:
    # A lost row (or a deduplicated one) must not make attempts restart lower.
    replay = Replay(INV, [INPUT], [attempt(1, 4), attempt(1, 2)])
    assert replay.take(EntryKind.STEP, "a")[2] == 4


def test_attempts_alongside_a_recorded_entry() -> None:
    a = entry(1, "a")
    replay = Replay(INV, [INPUT, a], [attempt(1, 1), attempt(1, 2)])
    assert replay.take(EntryKind.STEP, "a") == (1, a, 2)


def test_record_makes_a_live_entry_known() -> None:
    replay = Replay(INV, [INPUT])
    index, found, _ = replay.take(EntryKind.STEP, "a")
    assert found is None
    replay.record(entry(index, "a"))
    assert replay.replaying is False
    replay.record(entry(5, "later"))
    assert replay.replaying is True
    with pytest.raises(NonDeterminismError):
        replay.finish()


def test_entries_are_not_mutated_or_copied() -> None:
    entries = [INPUT, entry(1, "a")]
    replay = Replay(INV, iter(entries))  # any iterable, read once
    assert replay.take(EntryKind.STEP, "a")[1] is entries[1]
    assert entries == [INPUT, entry(1, "a")]


def test_describe() -> None:
    assert describe(EntryKind.STEP, "charge") == "step 'charge'"
    assert describe("custom", "x") == "custom 'x'"
