"""Crash tests of the durable primitives with real processes.

A child process (tests/crash/primitives_worker.py) runs one scenario on a
SQLite store: sleepers, promises, signals, a cancellation, a fan-out, a saga,
a parent with a deadline.
It is SIGKILLed (by the test once every invocation is parked, or by itself at
a chosen step), something may happen while no process runs (a promise is
resolved, a signal sent, a cancellation asked, by a short-lived helper
process that runs no workflows; or a deadline passes), and a fresh worker
recovers. Then:

- every invocation ends as in an uncrashed run of the same scenario;
- a sleeper wakes on time across the kill: never before the wake-up time its
  journal holds, and not much after it (timers that came due while no
  process ran fire at once);
- what happened while down is delivered after the restart;
- no committed step runs again: the external side is called again only for
  a step whose result had not committed, and then with the same step key;
  every effect (a refund, a cleanup, a child's work) happens exactly once.

The time bounds are generous (the machine is shared): "on time" is
"not before, and less than two seconds late".
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "crash" / "primitives_worker.py"
SCENARIOS = ("sleep", "promise", "signal", "cancel", "fanout", "saga", "deadline")
PROCESS_TIMEOUT = 60.0
LATE = 2.0  # how late a timer may fire on a noisy machine


# -- running the worker ------------------------------------------------------------------


def command(directory: Path, mode: str, scenario: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-W", "error", str(WORKER), "--dir", str(directory), "--mode", mode]
    return [*cmd, "--scenario", scenario, *extra]


def describe(directory: Path, what: str, returncode: int | None) -> str:
    err = directory / "stderr.log"
    text = err.read_text() if err.exists() else ""
    return f"worker {what}: exit code {returncode}\nstderr:\n{text}"


def run(directory: Path, mode: str, scenario: str, *extra: str) -> int:
    """Run a worker to its end (or its own SIGKILL); its exit code."""
    with (directory / "stderr.log").open("a") as err:
        try:
            done = subprocess.run(
                command(directory, mode, scenario, *extra),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=PROCESS_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(describe(directory, f"{mode} {scenario} hung", None))
    return done.returncode


def run_until_ready_then_kill(directory: Path, scenario: str, *extra: str) -> dict[str, Any]:
    """Start a crash worker, wait for its READY line, SIGKILL it; what it said."""
    with (directory / "stderr.log").open("a") as err:
        proc = subprocess.Popen(
            command(directory, "crash", scenario, *extra),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        line = read_line(proc, PROCESS_TIMEOUT)
        assert line.startswith("READY "), describe(directory, f"said {line!r}", proc.poll())
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(PROCESS_TIMEOUT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    info: dict[str, Any] = json.loads(line.removeprefix("READY "))
    return info


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return f"nothing within {timeout}s: {data!r}"
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                return f"EOF after {data!r}"
            data += chunk
    return data.decode().strip()


# -- reading the files with sqlite3 ------------------------------------------------------


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    # read-only: the snapshot must not touch the files the recovery opens
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, params).fetchall()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything committed in the store and on the external side."""

    invocations: dict[str, dict[str, Any]]  # id -> the row
    journal: dict[
        str, list[tuple[int, str, str, bool, Any]]
    ]  # id -> [(idx, kind, name, ok, value)]
    calls: list[tuple[str, str]]  # (step key, what), in call order
    effects: dict[str, str]  # step key -> what
    promises: dict[str, tuple[str, str]]  # id -> (state, owner)
    signals: list[tuple[str, int, str]]  # (invocation, seq, name)

    @property
    def steps(self) -> dict[str, str]:
        """Committed step entries: step key -> name."""
        return {
            f"{inv}:{idx}": name
            for inv, entries in self.journal.items()
            for idx, kind, name, _, _ in entries
            if kind == "step"
        }

    def of(self, tag: str) -> str:
        (found,) = [i for i, r in self.invocations.items() if r["idempotency_key"] == tag]
        return found

    def entries(self, inv: str, kind: str, name: str | None = None) -> list[Any]:
        return [e for e in self.journal[inv] if e[1] == kind and (name is None or e[2] == name)]


def snapshot(directory: Path) -> Snapshot:
    db = directory / "journal.db"
    columns = "id, target, idempotency_key, status, parent_id, wake_at, deadline, cancel_reason"
    invocations = {
        row[0]: dict(zip(columns.split(", "), row, strict=True))
        for row in query(db, f"SELECT {columns} FROM invocations")
    }
    journal: dict[str, list[tuple[int, str, str, bool, Any]]] = collections.defaultdict(list)
    for inv, idx, kind, name, ok, payload in query(
        db, "SELECT invocation_id, idx, kind, name, ok, payload FROM journal ORDER BY 1, 2"
    ):
        journal[inv].append((idx, kind, name, bool(ok), json.loads(payload)))
    effects_db = directory / "effects.db"
    calls = [(k, w) for k, w in query(effects_db, "SELECT step_key, what FROM calls ORDER BY seq")]
    effects = dict(query(effects_db, "SELECT step_key, what FROM effects"))
    promises = {
        p: (state, owner)
        for p, state, owner in query(db, "SELECT id, state, invocation_id FROM promises")
    }
    signals = [
        (inv, seq, name)
        for inv, seq, name in query(
            db, "SELECT invocation_id, seq, name FROM signals ORDER BY 1, 2"
        )
    ]
    return Snapshot(invocations, dict(journal), calls, effects, promises, signals)


def load(directory: Path, mode: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / f"results-{mode}.json").read_text())
    return data


# -- the uncrashed reference -------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every scenario run once without a crash (in one process, concurrently)."""
    directory = tmp_path_factory.mktemp("primitives-reference")
    others = [x for s in SCENARIOS[1:] for x in ("--scenario", s)]
    code = run(directory, "reference", SCENARIOS[0], *others, "--seconds", "1.5")
    assert code == 0, describe(directory, "reference", code)
    found = {}
    for scenario in SCENARIOS:
        data = load(directory / scenario, "reference")
        data["snapshot"] = snapshot(directory / scenario)
        found[scenario] = data
    return found


# -- what every scenario checks ----------------------------------------------------------


def shape(entries: list[tuple[int, str, str, bool, Any]]) -> tuple[Any, ...]:
    """A journal's kinds and names, with its completions as a set."""
    ordered = tuple((kind, name) for _, kind, name, _, _ in entries if kind != "complete")
    return ordered, tuple(sorted(name for _, kind, name, _, _ in entries if kind == "complete"))


def check_recovery(
    before: Snapshot, after: Snapshot, recovered: dict[str, Any], reference: dict[str, Any]
) -> None:
    # every invocation ends as in the uncrashed run, none was duplicated
    assert recovered["results"] == reference["results"]
    assert len(after.invocations) == len(reference["snapshot"].invocations)
    assert {r["status"] for r in after.invocations.values()} <= {"completed", "failed", "cancelled"}
    for inv, row in before.invocations.items():
        assert after.invocations[inv]["idempotency_key"] == row["idempotency_key"]
    # each journal as the uncrashed run's, entry kinds and names (outcomes of a
    # gather are journaled in the order they arrived, which may differ)
    ref = reference["snapshot"]
    assert sorted(map(shape, after.journal.values())) == sorted(map(shape, ref.journal.values()))

    # the external side: every effect exactly once, the same effects as uncrashed
    whats = collections.Counter(after.effects.values())
    assert whats == collections.Counter(ref.effects.values())
    assert max(whats.values()) == 1
    # each committed step has its effect under its key, and nothing else does
    assert set(after.effects) == set(after.steps)
    # called again only for a step whose result had not committed, with its key
    assert after.calls[: len(before.calls)] == before.calls
    again = [k for k, _ in after.calls[len(before.calls) :] if k in before.steps]
    assert not again, f"committed steps ran again: {again}"
    per_key = collections.Counter(k for k, _ in after.calls)
    twice = {k for k, n in per_key.items() if n > 1}
    assert max(per_key.values()) <= 2
    assert twice <= {k for k, _ in before.calls} - set(before.steps)


def all_parked(before: Snapshot) -> None:
    assert before.invocations
    assert {r["status"] for r in before.invocations.values()} == {"suspended"}


# -- timers ------------------------------------------------------------------------------


def due_and_woke(snap: Snapshot, inv: str) -> tuple[float, float]:
    ((_, _, _, _, due),) = snap.entries(inv, "timer")
    ((_, _, _, _, woke),) = snap.entries(inv, "step", "woke")
    return float(due), float(woke)


def test_a_sleep_across_a_kill_wakes_on_time(tmp_path: Path, reference: dict[str, Any]) -> None:
    # 2.5 s: longer than the 1 s timer lead, so each sleeper parks as a row
    run_until_ready_then_kill(tmp_path, "sleep", "--seconds", "2.5")
    before = snapshot(tmp_path)
    all_parked(before)
    for inv, row in before.invocations.items():
        ((_, _, _, _, due),) = before.entries(inv, "timer")
        assert row["wake_at"] == pytest.approx(due)
    # restarted at once: every timer is still ahead
    assert time.time() < min(r["wake_at"] for r in before.invocations.values())

    code = run(tmp_path, "recover", "sleep", "--seconds", "2.5")
    assert code == 0, describe(tmp_path, "recover", code)
    recovered = load(tmp_path, "recover")
    after = snapshot(tmp_path)
    check_recovery(before, after, recovered, reference["sleep"])
    for inv in after.invocations:
        due, woke = due_and_woke(after, inv)
        assert due <= woke < due + LATE, (inv, woke - due)
    stats = recovered["stats"]
    assert stats["invocations_recovered"] == 0  # nothing was running: all parked
    assert stats["invocations_resumed"] == len(after.invocations)
    assert stats["steps_replayed"] == len(after.invocations)  # "before" each
    assert stats["steps_executed"] == len(after.invocations)  # "woke" each


def test_a_sleeper_killed_after_it_was_resumed_ahead_of_time_wakes_on_time(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    # A 3 s sleep under a 2 s timer lead: the timer service claims each parked
    # sleeper 2 s early (running again, replayed up to its sleep) and it waits
    # out the rest in memory. The kill comes then: no row says when to wake.
    run_until_ready_then_kill(
        tmp_path, "sleep", "--seconds", "3", "--ready-when", "resumed", "--timer-lead", "2"
    )
    before = snapshot(tmp_path)
    assert before.invocations
    dues = {}
    for inv, row in before.invocations.items():
        assert (row["status"], row["wake_at"]) == ("running", None)
        assert not before.entries(inv, "step", "woke")
        ((_, _, _, _, due),) = before.entries(inv, "timer")
        dues[inv] = due
    assert time.time() < min(dues.values())  # killed before any was due

    code = run(tmp_path, "recover", "sleep", "--seconds", "3")
    assert code == 0, describe(tmp_path, "recover", code)
    recovered = load(tmp_path, "recover")
    after = snapshot(tmp_path)
    check_recovery(before, after, recovered, reference["sleep"])
    for inv in after.invocations:
        due, woke = due_and_woke(after, inv)
        assert due == dues[inv]
        assert due <= woke < due + LATE, (inv, woke - due)
    # running at the kill, so resumed at start (and parked again if due after the lead)
    assert recovered["stats"]["invocations_recovered"] == len(after.invocations)


def test_timers_that_came_due_while_down_fire_at_once(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_until_ready_then_kill(tmp_path, "sleep", "--seconds", "1.5")
    before = snapshot(tmp_path)
    all_parked(before)
    # stay down until every timer is due
    last_due = max(r["wake_at"] for r in before.invocations.values())
    time.sleep(max(0.0, last_due - time.time()) + 0.1)

    code = run(tmp_path, "recover", "sleep", "--seconds", "1.5")
    assert code == 0, describe(tmp_path, "recover", code)
    recovered = load(tmp_path, "recover")
    after = snapshot(tmp_path)
    check_recovery(before, after, recovered, reference["sleep"])
    started = recovered["started_at"]
    assert started > last_due
    for inv in after.invocations:
        due, woke = due_and_woke(after, inv)
        assert due < started <= woke < started + LATE, (inv, woke - started)
    assert recovered["stats"]["invocations_resumed"] == len(after.invocations)


# -- what happens while no process runs --------------------------------------------------


def recover_after_outside(
    tmp_path: Path, scenario: str
) -> tuple[Snapshot, Snapshot, dict[str, Any]]:
    """Kill once parked, act from outside, snapshot, recover."""
    run_until_ready_then_kill(tmp_path, scenario)
    parked = snapshot(tmp_path)
    all_parked(parked)
    # nothing due: they wait for a promise or a signal, or an hour-long timer
    for row in parked.invocations.values():
        assert row["wake_at"] is None or row["wake_at"] > time.time() + 600
    code = run(tmp_path, "outside", scenario)
    assert code == 0, describe(tmp_path, "outside", code)
    # the helper ran nothing: it only recorded what happened, and woke them
    stats = json.loads((tmp_path / "outside.json").read_text())["stats"]
    assert stats["invocations_recovered"] == stats["steps_executed"] == 0
    before = snapshot(tmp_path)
    assert before.journal == parked.journal
    assert before.calls == parked.calls
    for inv, row in before.invocations.items():
        assert row["status"] == "suspended"
        assert row["wake_at"] is not None, f"{inv} was not woken"
        assert row["wake_at"] <= time.time(), f"{inv} was not woken"
    code = run(tmp_path, "recover", scenario)
    assert code == 0, describe(tmp_path, "recover", code)
    return before, snapshot(tmp_path), load(tmp_path, "recover")


def test_a_promise_resolved_while_down_is_delivered_after_restart(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    before, after, recovered = recover_after_outside(tmp_path, "promise")
    # settled while down: two resolved, one rejected
    states = sorted(state for state, _ in before.promises.values())
    assert states == ["rejected", "resolved", "resolved"]
    for pid, (_, owner) in before.promises.items():
        (entry,) = before.entries(owner, "promise")
        assert pid == f"{owner}:{entry[0]}"
    check_recovery(before, after, recovered, reference["promise"])
    assert recovered["results"]["a1"] == {"value": "a1: rejected (declined a1)"}
    assert recovered["results"]["a0"] == {"value": "a0: approved a0"}
    assert recovered["stats"]["invocations_resumed"] == 3


def test_a_signal_sent_while_down_is_delivered_after_restart(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    before, after, recovered = recover_after_outside(tmp_path, "signal")
    # one signal taken before the kill, one sent while down: seq 1 and 2
    for inv in before.invocations:
        assert [(s, n) for i, s, n in before.signals if i == inv] == [(1, "add"), (2, "add")]
    check_recovery(before, after, recovered, reference["signal"])
    assert recovered["results"] == {"c0": {"value": [10, 20]}, "c1": {"value": [11, 21]}}


def test_a_cancellation_asked_while_down_runs_finally_and_compensation_once(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    before, after, recovered = recover_after_outside(tmp_path, "cancel")
    inv = before.of("x0")
    assert before.invocations[inv]["cancel_reason"] == "customer asked"
    check_recovery(before, after, recovered, reference["cancel"])
    assert recovered["results"] == {"x0": {"cancelled": "customer asked"}}
    assert after.invocations[inv]["status"] == "cancelled"
    steps = [name for _, kind, name, _, _ in after.journal[inv] if kind == "step"]
    assert steps == ["charge", "cleanup", "compensate refund"]
    assert len(after.entries(inv, "cancel")) == 1
    assert sorted(after.effects.values()) == ["x0:charge", "x0:cleanup", "x0:refund"]


# -- kills mid-way through a fan-out and a compensation -----------------------------------


@pytest.mark.parametrize(
    "kill",
    [
        pytest.param("after_step:work:3", id="after-3-children"),
        pytest.param("after_call:child 5", id="child-called-not-committed"),
    ],
)
def test_a_kill_mid_fan_out_recovers_every_child_once(
    tmp_path: Path, reference: dict[str, Any], kill: str
) -> None:
    code = run(tmp_path, "crash", "fanout", "--kill", kill)
    assert code == -signal.SIGKILL, describe(tmp_path, "crash", code)
    marker = json.loads((tmp_path / "crash.json").read_text())
    before = snapshot(tmp_path)
    parent = before.of("fan")
    assert before.invocations[parent]["status"] in ("running", "suspended")
    if marker["point"] == "after_step":
        assert marker["key"] in before.steps
    else:
        assert marker["key"] not in before.steps
        assert (marker["key"], "child 5") in before.calls

    code = run(tmp_path, "recover", "fanout")
    assert code == 0, describe(tmp_path, "recover", code)
    recovered = load(tmp_path, "recover")
    after = snapshot(tmp_path)
    check_recovery(before, after, recovered, reference["fanout"])
    children = {i: r for i, r in after.invocations.items() if r["parent_id"] == parent}
    assert sorted(children) == sorted(f"{parent}:{i}" for i in range(1, 9))
    assert {r["status"] for r in children.values()} == {"completed"}
    # each child's work happened once, under that child's step key
    for child in children:
        ((idx, _, _, _, what),) = after.entries(child, "step", "work")
        assert after.effects[f"{child}:{idx}"] == what
    if marker["point"] == "after_call":
        # the one call made twice: its result had not committed; same key
        assert [k for k, w in after.calls if w == "child 5"] == [marker["key"]] * 2


@pytest.mark.parametrize(
    "kill",
    [
        pytest.param("after_step:compensate refund 1:1", id="after-a-refund-committed"),
        pytest.param("after_call:s0:refund 1", id="refund-called-not-committed"),
    ],
)
def test_a_kill_mid_compensation_resumes_it_without_refunding_twice(
    tmp_path: Path, reference: dict[str, Any], kill: str
) -> None:
    code = run(tmp_path, "crash", "saga", "--kill", kill)
    assert code == -signal.SIGKILL, describe(tmp_path, "crash", code)
    marker = json.loads((tmp_path / "crash.json").read_text())
    before = snapshot(tmp_path)
    inv = before.of("s0")
    done = [name for _, kind, name, _, _ in before.journal[inv] if kind == "step"]
    expected = ["charge 0", "charge 1", "charge 2", "record", "compensate refund 2"]
    if marker["point"] == "after_step":
        expected.append("compensate refund 1")
    assert done == expected
    assert before.invocations[inv]["status"] == "running"

    code = run(tmp_path, "recover", "saga")
    assert code == 0, describe(tmp_path, "recover", code)
    recovered = load(tmp_path, "recover")
    after = snapshot(tmp_path)
    check_recovery(before, after, recovered, reference["saga"])
    steps = [name for _, kind, name, _, _ in after.journal[inv] if kind == "step"]
    assert steps == [
        "charge 0",
        "charge 1",
        "charge 2",
        "record",
        "compensate refund 2",
        "compensate refund 1",
        "compensate refund 0",
    ]
    refunds = sorted(w for w in after.effects.values() if "refund" in w)
    assert refunds == ["s0:refund 0", "s0:refund 1", "s0:refund 2"]
    calls = [k for k, w in after.calls if w == "s0:refund 1"]
    if marker["point"] == "after_call":
        assert calls == [marker["key"], marker["key"]]  # re-sent with its key, refunded once
    else:
        assert calls == [marker["key"]]
    stats = recovered["stats"]
    assert stats["steps_replayed"] == len(expected)
    assert stats["steps_executed"] == 7 - len(expected)


# -- a deadline that passes while no process runs --------------------------------------------


def test_a_deadline_that_passed_while_down_cancels_the_parent_and_its_children_once(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_until_ready_then_kill(tmp_path, "deadline")
    before = snapshot(tmp_path)
    all_parked(before)  # the parent and both children
    parent = before.of("d0")
    deadline = before.invocations[parent]["deadline"]
    assert deadline is not None
    children = [i for i, r in before.invocations.items() if r["parent_id"] == parent]
    assert len(children) == 2
    for row in before.invocations.values():
        # the children inherit the deadline; each parks until it, not its hour-long timer
        assert row["deadline"] == deadline
        assert row["wake_at"] == pytest.approx(deadline)
    time.sleep(max(0.0, deadline - time.time()) + 0.1)  # stay down past the deadline

    code = run(tmp_path, "recover", "deadline")
    assert code == 0, describe(tmp_path, "recover", code)
    recovered = load(tmp_path, "recover")
    after = snapshot(tmp_path)
    check_recovery(before, after, recovered, reference["deadline"])
    assert recovered["results"] == {"d0": {"cancelled": "timed out (its deadline passed)"}}
    assert {after.invocations[i]["status"] for i in [parent, *children]} == {"cancelled"}
    # every finally block ran once, after the deadline, not before
    assert sorted(after.effects.values()) == ["d0.0:cleanup", "d0.1:cleanup", "d0:cleanup"]
    for inv in [parent, *children]:
        assert len(after.entries(inv, "cancel")) == 1
        ((at,),) = query(
            tmp_path / "journal.db",
            "SELECT created_at FROM journal WHERE invocation_id = ? AND kind = 'cancel'",
            (inv,),
        )
        assert deadline <= at < recovered["started_at"] + LATE  # at once after the restart
