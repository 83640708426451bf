"""Crash tests with real processes.

A child process (tests/crash/worker.py) runs a batch of payment workflows on a
SQLite store (or a PostgreSQL schema) and SIGKILLs itself at one durable point
for one payment. The
test snapshots the committed state right after the kill, starts a fresh
worker that recovers and re-submits the same payments with the same
idempotency keys, and checks the outcome against the snapshot and against an
uncrashed reference run:

- the child really died of SIGKILL, at the point asked for;
- every invocation completes, with the result an uncrashed run gives;
- no step committed before the crash runs again, and every step that had not
  committed runs exactly once in the recovery;
- the provider is called again only for a charge whose result had not
  committed, and then with the same step key; every payment is charged once
  and has one ledger row;
- the recovered runtime's counters match what the journal said.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import pg_query

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "crash" / "worker.py"
N = 30
TARGET = "p-017"
STEPS = ("validate", "charge", "record")
PROCESS_TIMEOUT = 60.0

Key = tuple[str, int]  # (invocation id, journal index): what a step key is made of


# -- running the worker -----------------------------------------------------------


@dataclasses.dataclass
class Exit:
    pid: int
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit code {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def spawn(directory: Path, mode: str, *extra: str, store: str | None = None) -> Exit:
    if store is not None:
        extra = (*extra, "--store", store)
    cmd = [
        sys.executable,
        "-W",
        "error",
        str(WORKER),
        "--dir",
        str(directory),
        "--mode",
        mode,
        "--n",
        str(N),
        *extra,
    ]
    with subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"worker {mode} {extra} hung for {PROCESS_TIMEOUT}s\n{err}")
    return Exit(proc.pid, proc.returncode, out, err)


def read_events(directory: Path, phase: str) -> list[dict[str, Any]]:
    lines = (directory / "events.log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["phase"] == phase]


def started_steps(events: list[dict[str, Any]]) -> list[Key]:
    return [(e["inv"], e["idx"]) for e in events if e["event"] == "start"]


# -- reading the files with sqlite3 ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything committed in the store, the provider and the ledger."""

    invocations: dict[str, tuple[str, str]]  # id -> (idempotency key, status)
    steps: dict[Key, str]  # committed step entries -> step name
    journal: dict[str, list[tuple[int, str, str]]]  # id -> [(index, kind, name)]
    calls: list[tuple[str, str]]  # provider calls in order: (idempotency key, payment)
    charges: dict[str, tuple[str, str]]  # provider charges: key -> (payment, transaction)
    ledger: list[tuple[str, str, int]]  # (payment, transaction, writes)

    def invocation_of(self, payment: str) -> str:
        (inv,) = [i for i, (key, _) in self.invocations.items() if key == payment]
        return inv

    def unfinished(self) -> set[str]:
        return {i for i, (_, status) in self.invocations.items() if status != "completed"}

    def step_key(self, inv: str, name: str) -> Key | None:
        found = [k for k, n in self.steps.items() if k[0] == inv and n == name]
        return found[0] if found else None


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    # read-only: the snapshot must not touch the files the recovery opens
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def _query_store(directory: Path, store: str | None, sql: str) -> list[tuple[Any, ...]]:
    if store is None:
        return _query(directory / "journal.db", sql)
    return pg_query(store, sql)


def snapshot(directory: Path, store: str | None = None) -> Snapshot:
    journal: dict[str, list[tuple[int, str, str]]] = collections.defaultdict(list)
    steps: dict[Key, str] = {}
    for inv, idx, kind, name in _query_store(
        directory,
        store,
        "SELECT invocation_id, idx, kind, name FROM journal ORDER BY invocation_id, idx",
    ):
        journal[inv].append((idx, kind, name))
        if kind == "step":
            steps[(inv, idx)] = name
    invocations = {
        i: (k, s)
        for i, k, s in _query_store(
            directory, store, "SELECT id, idempotency_key, status FROM invocations"
        )
    }
    provider = directory / "provider.db"
    calls = [
        (k, p)
        for k, p in _query(provider, "SELECT idempotency_key, payment_id FROM calls ORDER BY seq")
    ]
    charges = {
        k: (p, t)
        for k, p, t in _query(
            provider, "SELECT idempotency_key, payment_id, transaction_id FROM charges"
        )
    }
    ledger = _query(
        directory / "ledger.db", "SELECT payment_id, transaction_id, writes FROM ledger"
    )
    return Snapshot(invocations, steps, dict(journal), calls, charges, ledger)


def split_key(key: str) -> Key:
    inv, idx = key.rsplit(":", 1)
    return inv, int(idx)


def check_consistent(snap: Snapshot) -> None:
    """Each journal is a prefix of input, validate, charge, record, output."""
    expected = [(0, "input", "process_payment")]
    expected += [(i + 1, "step", name) for i, name in enumerate(STEPS)]
    expected += [(4, "output", "process_payment")]
    assert set(snap.journal) == set(snap.invocations)
    for inv, entries in snap.journal.items():
        assert entries == expected[: len(entries)], inv
        completed = snap.invocations[inv][1] == "completed"
        assert completed == (entries[-1][1] == "output"), (inv, entries)


# -- the uncrashed reference -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    results: dict[str, dict[str, Any]]
    stats: dict[str, Any]
    final: Snapshot

    def shape(self, payment: str) -> dict[str, Any]:
        """A result with the invocation-specific parts checked and taken out."""
        r = self.results[payment]
        inv = r["invocation_id"]
        assert self.final.invocation_of(payment) == inv
        charge = self.final.step_key(inv, "charge")
        assert charge is not None
        key = f"{charge[0]}:{charge[1]}"
        # the transaction id is the provider's, for this payment's charge step key
        assert self.final.charges[key] == (payment, r["transaction_id"])
        assert r["transaction_id"] == f"tx_{payment}_{key[-12:]}"
        return {
            "type": r["type"],
            "payment_id": r["payment_id"],
            "status": r["status"],
            "charge_index": charge[1],
            "transaction_id": r["transaction_id"].replace(key[-12:], "<step key>"),
        }


def load_run(directory: Path, mode: str, store: str | None = None) -> Run:
    data = json.loads((directory / f"results-{mode}.json").read_text())
    return Run(data["results"], data["stats"], snapshot(directory, store))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    directory = tmp_path_factory.mktemp("reference")
    done = spawn(directory, "reference")
    assert done.returncode == 0, done.describe()
    run = load_run(directory, "reference")
    assert sorted(run.results) == [f"p-{i:03d}" for i in range(N)]
    assert run.stats["steps_executed"] == 3 * N
    assert run.stats["steps_replayed"] == 0
    assert len(run.final.calls) == N
    check_consistent(run.final)
    return run


# -- the crash scenarios ---------------------------------------------------------


CRASH_POINTS = [
    pytest.param("before_step", "charge", id="before-step"),
    pytest.param("after_charge", "charge", id="after-external-call-before-commit"),
    pytest.param("after_step", "charge", id="between-steps"),
    pytest.param("after_output", "charge", id="after-output-before-read"),
    pytest.param("batch_commit", "charge", id="mid-group-commit-batch"),
]


@pytest.mark.parametrize(("point", "step"), CRASH_POINTS)
def test_sigkill_then_recover(
    tmp_path: Path, reference: Run, point: str, step: str, journal_store: str | None
) -> None:
    store = journal_store
    # 1. run until the worker kills itself at the chosen point
    crashed = spawn(
        tmp_path, "crash", "--point", point, "--payment", TARGET, "--step", step, store=store
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.describe()
    marker = json.loads((tmp_path / "crash.json").read_text())
    assert marker["point"] == point
    assert marker["pid"] == crashed.pid  # it was this child, at this point

    # 2. what had committed when it died
    before = snapshot(tmp_path, store)
    check_consistent(before)
    crash_events = read_events(tmp_path, "crash")
    seen_committed = {(e["inv"], e["idx"]) for e in crash_events if e["event"] == "committed"}
    assert seen_committed <= set(before.steps), "a step reported committed was lost"
    seen_output = {e["inv"] for e in crash_events if e["event"] == "output"}
    assert all(before.invocations[i][1] == "completed" for i in seen_output)
    check_crash_point(point, marker, before, crash_events)

    # 3. a fresh process recovers and re-submits everything
    recovered = spawn(tmp_path, "recover", store=store)
    assert recovered.returncode == 0, recovered.describe()
    run = load_run(tmp_path, "recover", store)
    after = run.final
    check_consistent(after)

    # every invocation completed, none duplicated, the old ones kept their ids
    assert sorted(run.results) == sorted(reference.results)
    assert len(after.invocations) == N
    assert all(status == "completed" for _, status in after.invocations.values())
    for inv, (payment, _) in before.invocations.items():
        assert run.results[payment]["invocation_id"] == inv

    # ... with the result an uncrashed run gives
    for payment in reference.results:
        assert run.shape(payment) == reference.shape(payment), payment

    # no committed step ran again; every other step ran exactly once
    again = started_steps(read_events(tmp_path, "recover"))
    rerun = set(again) & set(before.steps)
    assert not rerun, f"committed steps ran again: {sorted(rerun)}"
    assert collections.Counter(again) == collections.Counter(set(after.steps) - set(before.steps))

    # the provider was called again only for uncommitted charges, with their key
    new_calls = after.calls[len(before.calls) :]
    assert after.calls[: len(before.calls)] == before.calls
    for key, payment in new_calls:
        assert split_key(key) not in before.steps, f"committed charge {key} was re-sent"
        assert after.steps[split_key(key)] == "charge"
        assert after.invocation_of(payment) == split_key(key)[0]
    keys_per_payment = collections.defaultdict(set)
    for key, payment in after.calls:
        keys_per_payment[payment].add(key)
    for payment, keys in keys_per_payment.items():
        charge = after.step_key(after.invocation_of(payment), "charge")
        assert charge is not None
        assert keys == {f"{charge[0]}:{charge[1]}"}, payment

    # every payment charged exactly once, one ledger row each
    per_payment = collections.Counter(p for p, _ in after.charges.values())
    assert per_payment == dict.fromkeys(reference.results, 1)
    ledger = {p: t for p, t, _ in after.ledger}
    assert len(after.ledger) == N
    assert ledger == {p: r["transaction_id"] for p, r in run.results.items()}

    # the counters agree with the journal as it was at the crash
    unfinished = before.unfinished()
    replayable = sum(1 for inv, _ in before.steps if inv in unfinished)
    stats = run.stats
    assert stats["steps_replayed"] == replayable
    assert stats["steps_executed"] == 3 * N - len(before.steps)
    assert stats["invocations_recovered"] == len(unfinished)
    assert stats["invocations_started"] == N - len(before.invocations)
    assert stats["invocations_suspended"] == 0
    assert stats["invocations_failed"] == 0
    if point != "after_output":
        # the chosen invocation was cut mid-way, with steps behind it
        assert before.invocation_of(TARGET) in unfinished
        assert stats["steps_replayed"] > 0

    check_recovered_target(point, marker, before, after)


def check_crash_point(
    point: str, marker: dict[str, Any], before: Snapshot, events: list[dict[str, Any]]
) -> None:
    """The snapshot shows the crash happened where it was asked to."""
    if point == "batch_commit":
        assert marker["size"] >= 3
        # the batch's writes are all missing: every one was waiting on a step
        # that ran (or an output of an invocation whose steps all committed)
        ran_uncommitted = set(started_steps(events)) - set(before.steps)
        done_not_output = {
            i for i in before.unfinished() if len(before.journal[i]) == 1 + len(STEPS)
        }
        assert len(ran_uncommitted) + len(done_not_output) >= marker["size"]
        return
    inv = before.invocation_of(TARGET)
    charge_calls = [k for k, p in before.calls if p == TARGET]
    if point == "before_step":
        assert (marker["inv"], marker["name"]) == (inv, "charge")
        assert before.step_key(inv, "validate") is not None
        assert before.step_key(inv, "charge") is None
        assert charge_calls == []
    elif point == "after_charge":
        assert split_key(marker["key"])[0] == inv
        assert before.step_key(inv, "charge") is None
        assert charge_calls == [marker["key"]]
    elif point == "after_step":
        assert (marker["inv"], marker["name"]) == (inv, "charge")
        assert before.step_key(inv, "charge") == (inv, marker["idx"])
        assert before.step_key(inv, "record") is None
    elif point == "after_output":
        assert marker["inv"] == inv
        assert before.invocations[inv][1] == "completed"
    else:
        raise AssertionError(point)


def check_recovered_target(
    point: str, marker: dict[str, Any], before: Snapshot, after: Snapshot
) -> None:
    """What the chosen payment's recovery looked like at each point."""
    if point == "batch_commit":
        return
    inv = before.invocation_of(TARGET)
    charge = after.step_key(inv, "charge")
    assert charge is not None
    calls = [k for k, p in after.calls if p == TARGET]
    if point == "after_charge":
        # the one case an external call is made twice: same key, charged once
        assert calls == [marker["key"], marker["key"]]
    else:
        assert calls == [f"{charge[0]}:{charge[1]}"]
