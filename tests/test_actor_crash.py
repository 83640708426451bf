"""Crash tests of durable actors with real processes.

A child process (tests/crash/actor_worker.py) sends a plan of deposits to a
few durable ``Account`` actors on a SQLite store (or a PostgreSQL schema) and
SIGKILLs itself at one
durable point. A fresh process recovers (the runtime activates the actors
with unfinished messages) and re-sends the whole plan with the same
idempotency keys. Then:

- every balance and history equals what an uncrashed run gives;
- every deposit is one invocation, completed, in the actor's log in order;
- the bank applied each deposit's effect exactly once (one effect per step
  key); it was called again only for a step whose result had not committed,
  and then with the same step key;
- the recovery ran live only the steps that had not committed.
"""

from __future__ import annotations

import collections
import contextlib
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
WORKER = ROOT / "tests" / "crash" / "actor_worker.py"
N = 24
KEYS = ("k0", "k1", "k2", "k3")
TARGET = "dep-013"
PROCESS_TIMEOUT = 60.0


def plan() -> list[tuple[str, str, int]]:
    return [(f"dep-{i:03d}", KEYS[i % len(KEYS)], 100 + 7 * i) for i in range(N)]


def expected_summaries() -> dict[str, list[int]]:
    history: dict[str, list[int]] = {k: [] for k in KEYS}
    for _, key, cents in plan():
        history[key].append(cents)
    return {k: [sum(h), *h] for k, h in history.items()}


def spawn(
    directory: Path, mode: str, *extra: str, store: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-W", "error", str(WORKER), "--dir", str(directory)]
    cmd += ["--mode", mode, "--n", str(N), *extra]
    if store is not None:
        cmd += ["--store", store]
    try:
        return subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"worker {mode} {extra} hung for {PROCESS_TIMEOUT}s\n{exc.stderr!r}")


def describe(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def snapshot(directory: Path, store: str | None = None) -> dict[str, Any]:
    db = directory / "journal.db"

    def journal(sql: str) -> list[tuple[Any, ...]]:
        return query(db, sql) if store is None else pg_query(store, sql)

    messages = journal(
        "SELECT id, idempotency_key, actor_key, actor_seq, status, target FROM invocations "
        "WHERE actor_type = 'Account' ORDER BY actor_key, actor_seq",
    )
    steps = {
        f"{inv}:{idx}"
        for inv, idx in journal("SELECT invocation_id, idx FROM journal WHERE kind = 'step'")
    }
    calls = [k for (k,) in query(directory / "bank.db", "SELECT step_key FROM calls ORDER BY seq")]
    effects = {
        k: (a, c)
        for k, a, c in query(
            directory / "bank.db", "SELECT step_key, actor_key, cents FROM effects"
        )
    }
    return {"messages": messages, "steps": steps, "calls": calls, "effects": effects}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("actor-reference")
    done = spawn(directory, "reference")
    assert done.returncode == 0, describe(done)
    data = json.loads((directory / "results-reference.json").read_text())
    assert data["summaries"] == expected_summaries()
    assert data["stats"]["steps_executed"] == N
    assert data["stats"]["steps_replayed"] == 0
    assert len(snapshot(directory)["calls"]) == N
    return data


CRASHES = [
    pytest.param("before_step", "3", id="before-step"),
    pytest.param("after_step", "3", id="after-step"),
    pytest.param("after_step", "1", id="after-step-checkpoint-every-1"),
    pytest.param("after_step", "1000", id="after-step-full-replay"),
    pytest.param("after_output", "1", id="after-output"),
    pytest.param("batch_commit", "3", id="mid-batch-commit"),
]


@pytest.mark.parametrize(("point", "every"), CRASHES)
def test_actor_sigkill_then_recover(
    tmp_path: Path, reference: dict[str, Any], point: str, every: str, journal_store: str | None
) -> None:
    store = journal_store
    # 1. run until the worker kills itself
    crashed = spawn(
        tmp_path,
        "crash",
        "--point",
        point,
        "--message",
        TARGET,
        "--checkpoint-every",
        every,
        store=store,
    )
    assert crashed.returncode == -signal.SIGKILL, describe(crashed)
    marker = json.loads((tmp_path / "crash.json").read_text())
    assert marker["point"] == point
    before = snapshot(tmp_path, store)
    unfinished_before = [m for m in before["messages"] if m[4] != "completed"]
    if point in ("before_step", "after_step"):
        (target,) = [m for m in before["messages"] if m[1] == TARGET]
        assert target[0] == marker["inv"]
        assert target[4] == "running"
        assert (marker["key"] in before["steps"]) == (point == "after_step")
        assert (marker["key"] in before["calls"]) == (point == "after_step")
    if point == "after_output":
        (target,) = [m for m in before["messages"] if m[1] == TARGET]
        assert target[4] == "completed"

    # 2. a fresh process recovers and re-sends the plan with the same keys
    recovered = spawn(tmp_path, "recover", "--checkpoint-every", every, store=store)
    assert recovered.returncode == 0, describe(recovered)
    data = json.loads((tmp_path / "results-recover.json").read_text())
    after = snapshot(tmp_path, store)

    # balances and histories as in an uncrashed run
    assert data["summaries"] == reference["summaries"] == expected_summaries()
    actors_with_unfinished = {m[2] for m in unfinished_before}
    assert data["actors_recovered_at_start"] == len(actors_with_unfinished)

    # every deposit is one completed invocation, in plan order in its actor's log
    deposits = [m for m in after["messages"] if m[5] == "Account.deposit"]
    assert sorted(m[1] for m in deposits) == [p[0] for p in plan()]
    assert {m[4] for m in after["messages"]} == {"completed"}
    for key in KEYS:
        logged = [m[1] for m in deposits if m[2] == key]
        assert logged == [p[0] for p in plan() if p[1] == key]
    for m in before["messages"]:  # the messages recorded before the crash kept their ids
        assert m in after["messages"] or (m[0], m[1], m[2], m[3]) in {
            r[:4] for r in after["messages"]
        }

    # the bank: exactly one effect per deposit, each on its step key
    assert len(after["effects"]) == N
    by_actor: dict[str, int] = collections.Counter()
    for actor_key, cents in after["effects"].values():
        by_actor[actor_key] += cents
    assert by_actor == {k: s[0] for k, s in expected_summaries().items()}
    assert set(after["effects"]) == set(after["calls"])
    assert after["steps"] >= set(after["effects"])  # every effect's step committed
    # calls again only for steps whose result had not committed, same key
    assert after["calls"][: len(before["calls"])] == before["calls"]
    repeated = [k for k in after["calls"][len(before["calls"]) :] if k in before["steps"]]
    assert not repeated, f"committed steps called the bank again: {repeated}"
    # (another actor's step may have called the bank and not committed yet
    # when the process died: it calls again with the same key)
    per_key = collections.Counter(after["calls"])
    twice = {k for k, n in per_key.items() if n > 1}
    assert max(per_key.values()) <= 2
    assert twice <= set(before["calls"]) - before["steps"]
    if point in ("before_step", "after_step"):
        assert per_key[marker["key"]] == 1

    # the recovery ran live only what had not committed
    stats = data["stats"]
    assert stats["steps_executed"] == N - len(before["steps"])
    assert stats["invocations_suspended"] == 0
    assert stats["invocations_failed"] == 0
