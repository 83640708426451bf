"""``perdure demo``: a payment batch survives a real SIGKILL of its worker.

The driver (this module, in the parent process) starts a worker process
(:mod:`perdure._demo.worker`) on a fresh work directory and follows the
payments through the worker's event pipe. Once ``kill_at`` of the batch's
steps have run, it kills the worker with SIGKILL at an instant when payments
are mid-way: no cleanup, no flush, no goodbye (the operating system keeps
running, so writes already handed to it survive). To be sure of that
instant it first freezes the worker with SIGSTOP, checks in the store that
some invocations are unfinished, and only then sends SIGKILL (otherwise
SIGCONT, and it tries again a moment later). It then reads what the crash
left behind, read-only, starts a second worker on the same directory, which
resumes the unfinished invocations and re-submits the whole batch with
``idempotency_key=payment_id``, and checks the outcome against the store,
the provider's and the ledger's files. Each payment also credits its
customer's durable ``Account`` actor; worker 2 reports every account's
state once the batch is done (the parent cannot open the store while a
worker holds its lock), and the parent checks it against the batch.

Figures, as the summary defines them:

``steps_executed``
    live executions of step functions in both workers, retries included
    (``Hooks.before_step``, streamed to the parent as they happen so the
    killed worker's count survives the kill);
``steps_replayed``
    steps the second worker returned from the journal instead of running
    them (``RuntimeStats.steps_replayed``);
``steps_reexecuted``
    steps that were running at the kill and had not committed, so ran
    again after the restart; ``committed_steps_rerun`` counts steps that
    had committed and still ran again, and must be 0;
``actor_recovery_checkpoint_ms``, ``actor_recovery_full_ms``
    each payment also credits its customer's durable ``Account`` actor; once
    the batch is done, worker 2 rebuilds every account's state from its
    latest checkpoint plus a replay of the messages after it, then by a full
    replay of its message log, and these are the totals over the accounts
    (fastest of a few runs each); ``actor_messages_replayed_checkpoint`` and
    ``actor_messages_replayed_full`` count the messages each replayed;
``recovery_seconds``
    from the parent restarting the worker process (just before spawning
    it) until every invocation that was unfinished at the crash has
    completed, measured by the worker (interpreter start and imports
    included); ``runtime_recovery_seconds`` is the runtime's own
    ``stats.recovery_seconds``: the time to find the unfinished invocations
    and relaunch them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .report import NoProgress, PlainProgress, Progress, RichProgress, render
from .worker import LEDGER_FILE, PROVIDER_FILE, STORE_FILE, make_payments, payment_id

__all__ = [
    "DemoError",
    "DemoOptions",
    "NoProgress",
    "PlainProgress",
    "Progress",
    "RichProgress",
    "Snapshot",
    "WorkerRun",
    "render",
    "run_demo",
    "summarize",
]

MARKER_FILE = ".perdure-demo"
ACTOR_TYPE = "Account"
# The payment workflow's journaled steps; "account" is the step that asks
# the customer's Account actor (journaled as "ask Account.add_payment <key>").
STEP_NAMES = ("validate", "charge", "record", "account")
_ASK_PREFIX = f"ask {ACTOR_TYPE}."
# How far an invocation in flight had got: its last committed step.
_PROGRESS = {
    "validate": "validated",
    "charge": "charged",
    "record": "recorded",
    "account": "credited",
}


def step_name(journaled: str) -> str:
    """A journaled step's name, the Account step's without its actor key."""
    return "account" if journaled.startswith(_ASK_PREFIX) else journaled


class DemoError(Exception):
    """The demo could not run (bad directory, a worker that would not start)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DemoOptions:
    payments: int = 200
    directory: Path | None = None
    concurrency: int = 32
    charge_latency_ms: float = 5.0
    kill_at: float = 0.4
    timeout: float = 120.0
    # 200 payments over 12 accounts: 16 or 17 messages each, so every
    # account has a checkpoint (every 10 messages) and messages after it.
    customers: int = 12

    def kill_threshold(self) -> int:
        """Live step runs after which the first worker is killed (at the next
        instant when payments are mid-way). Steps, not completed payments,
        measure the progress: a batch no larger than the concurrency runs in
        lockstep and completes all at once, with no mid-way instant after
        its first completion."""
        steps = len(STEP_NAMES) * self.payments
        return max(1, min(steps - 1, math.ceil(steps * self.kill_at)))


# -- what the files say --------------------------------------------------------------


def _connect_readonly(path: Path, timeout: float = 10.0) -> sqlite3.Connection | None:
    if not path.exists():
        return None
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = _connect_readonly(path)
    if conn is None:
        return []
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The durable state of the work directory, read with sqlite3 read-only."""

    # invocation id -> (idempotency key, status)
    invocations: dict[str, tuple[str | None, str]]
    # invocation id -> names of its committed steps, by journal index
    steps: dict[str, dict[int, str]]
    # provider: key -> payment id of each charge; calls per key
    charges: dict[str, str]
    calls: dict[str, int]
    # ledger: payment id -> (transaction id, writes)
    ledger: dict[str, tuple[str, int]]
    # provider: payment id -> transaction id (one row per charge)
    transactions: list[tuple[str, str]]
    # Account messages: invocation id -> (account key, position in the
    # account's log, idempotency key = the asking step's key, status)
    account_messages: dict[str, tuple[str, int, str | None, str]] = dataclasses.field(
        default_factory=dict
    )
    # Account key -> checkpoints retained in the store
    checkpoints: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path) -> Snapshot:
        store = directory / STORE_FILE
        provider = directory / PROVIDER_FILE
        ledger = directory / LEDGER_FILE
        steps: dict[str, dict[int, str]] = {}
        for inv, idx, name in _query(
            store,
            "SELECT j.invocation_id, j.idx, j.name FROM journal j "
            "JOIN invocations i ON i.id = j.invocation_id "
            "WHERE j.kind = 'step' AND i.actor_type IS NULL",
        ):
            steps.setdefault(inv, {})[idx] = step_name(name)
        charge_rows = _query(
            provider, "SELECT idempotency_key, payment_id, transaction_id FROM charges"
        )
        return cls(
            invocations={
                i: (k, s)
                for i, k, s in _query(
                    store,
                    "SELECT id, idempotency_key, status FROM invocations WHERE actor_type IS NULL",
                )
            },
            steps=steps,
            charges={key: pid for key, pid, _ in charge_rows},
            calls=dict(_query(provider, "SELECT idempotency_key, count(*) FROM calls GROUP BY 1")),
            ledger={
                pid: (tx, writes)
                for pid, tx, writes in _query(
                    ledger, "SELECT payment_id, transaction_id, writes FROM ledger"
                )
            },
            transactions=[(pid, tx) for _, pid, tx in charge_rows],
            account_messages={
                i: (key, seq, k, s)
                for i, key, seq, k, s in _query(
                    store,
                    "SELECT id, actor_key, actor_seq, idempotency_key, status FROM invocations "
                    f"WHERE actor_type = '{ACTOR_TYPE}'",
                )
            },
            checkpoints=dict(
                _query(
                    store,
                    "SELECT actor_key, count(*) FROM checkpoints "
                    f"WHERE actor_type = '{ACTOR_TYPE}' GROUP BY 1",
                )
            ),
        )

    def with_status(self, *statuses: str) -> list[str]:
        return [i for i, (_, s) in self.invocations.items() if s in statuses]

    def step_keys(self) -> set[tuple[str, int]]:
        return {(inv, idx) for inv, entries in self.steps.items() for idx in entries}

    def step_keys_named(self, name: str) -> set[str]:
        """The step keys (``invocation:index``) of the committed steps ``name``."""
        return {
            f"{inv}:{idx}"
            for inv, entries in self.steps.items()
            for idx, step in entries.items()
            if step == name
        }

    def charge_step_keys(self) -> set[str]:
        return self.step_keys_named("charge")


# -- the worker processes -------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class WorkerRun:
    number: int
    pid: int = 0
    returncode: int | None = None
    killed: bool = False
    timed_out: bool = False
    stops: int = 0
    completed_when_killed: int = 0
    steps_when_killed: int = 0
    live_steps: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    completions: int = 0
    attached: int = 0
    events: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    log_path: Path | None = None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])


def _worker_env() -> dict[str, str]:
    """The parent's environment, with this copy of perdure importable."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)


def _kill_mid_flight(proc: subprocess.Popen[bytes], directory: Path) -> int:
    """SIGKILL the worker if payments are mid-way; return how many (0: not killed).

    The worker is first frozen with SIGSTOP, which it cannot catch or delay,
    so that the parent can check in the store that invocations are really in
    flight at the instant of the kill; if none is, the worker continues
    (SIGCONT) and the parent tries again at its next event. A frozen process
    does nothing, so killing it is the same as killing it at the instant it
    froze.
    """
    os.kill(proc.pid, signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):  # it had already exited: waitpid reaped it
        proc.returncode = os.waitstatus_to_exitcode(status)
        return 0
    try:
        conn = _connect_readonly(directory / STORE_FILE, timeout=0.5)
        if conn is None:
            in_flight = 0
        else:
            try:
                in_flight = conn.execute(
                    "SELECT count(*) FROM invocations "
                    "WHERE status IN ('pending', 'running', 'suspended') AND actor_type IS NULL"
                ).fetchone()[0]
            finally:
                conn.close()
    except sqlite3.Error:  # e.g. frozen while holding a lock: try again later
        in_flight = 0
    if in_flight:
        os.kill(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGCONT)
    return int(in_flight)


def _run_worker(
    options: DemoOptions,
    directory: Path,
    run: WorkerRun,
    progress: Progress,
    completed_before: int,
    *,
    kill_after: int | None = None,
    restarted_at: float | None = None,
) -> WorkerRun:
    cmd = [
        sys.executable,
        "-m",
        "perdure._demo.worker",
        "--dir",
        str(directory),
        "--payments",
        str(options.payments),
        "--customers",
        str(options.customers),
        "--concurrency",
        str(options.concurrency),
        "--charge-latency-ms",
        str(options.charge_latency_ms),
    ]
    if restarted_at is not None:
        cmd += ["--restarted-at", repr(restarted_at)]
    run.log_path = directory / f"worker-{run.number}.log"
    with open(run.log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                cmd,
                bufsize=0,  # read what the worker wrote as soon as it is there
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_worker_env(),
            )
        except OSError as exc:
            raise DemoError(f"cannot start the worker ({' '.join(cmd)}): {exc}") from exc
    run.pid = proc.pid

    def expire() -> None:
        run.timed_out = True
        _kill(proc)

    watchdog = threading.Timer(options.timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    # Invocations that started a step and have not completed, as far as the
    # events read so far tell.
    running: set[str] = set()

    def handle(line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "S":
            inv, idx, _name = rest.split(" ", 2)  # "ask Account.add_payment <key>"
            run.live_steps.append((inv, int(idx)))
            running.add(inv)
        elif kind == "D":
            running.discard(rest.partition(" ")[2])
            run.completions += 1
            progress.advance(completed_before + run.completions)
        elif kind == "A":
            run.attached += 1
        elif kind == "E":
            event = json.loads(rest)
            run.events[event["event"]] = event
            if event["event"] == "recovered" and event["recovered"]:
                progress.phase(f"worker {run.number} running", completed_before + run.completions)

    try:
        out = proc.stdout
        assert out is not None
        pending = b""
        with out:
            while chunk := out.read(1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    handle(line.decode(errors="replace"))
                completed = completed_before + run.completions
                if (
                    kill_after is not None
                    and not run.killed
                    and len(run.live_steps) >= kill_after
                    and running
                    and not select.select([out], [], [], 0)[0]  # nothing more to read now
                    and proc.returncode is None
                ):
                    run.stops += 1
                    if _kill_mid_flight(proc, directory):
                        run.killed = True
                        run.completed_when_killed = completed
                        run.steps_when_killed = len(run.live_steps)
        run.returncode = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return run


# -- the demo ------------------------------------------------------------------------


def prepare_directory(path: Path | None) -> tuple[Path, bool]:
    """A fresh, empty work directory; returns (path, temporary).

    A given directory is wiped only if it is empty or a previous demo's
    (it holds the marker file): ``--dir ~`` must not delete a home.
    """
    if path is None:
        return Path(tempfile.mkdtemp(prefix="perdure-demo-")), True
    if path.exists():
        if not path.is_dir():
            raise DemoError(f"--dir {path}: exists and is not a directory")
        entries = list(path.iterdir())
        if entries and not (path / MARKER_FILE).exists():
            raise DemoError(
                f"--dir {path}: the directory is not empty and is not a previous demo's "
                f"(no {MARKER_FILE} file); give an empty or new directory"
            )
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER_FILE).write_text("work directory of 'perdure demo'; wiped on each run\n")
    return path, False


def run_demo(options: DemoOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the demo and return its summary (see :func:`summarize`)."""
    if options.payments < 2:
        raise DemoError("--payments must be at least 2 (the worker is killed mid-batch)")
    if options.customers < 1:
        raise DemoError("--customers must be at least 1")
    progress = progress or NoProgress()
    directory, temporary = prepare_directory(options.directory)
    began = time.monotonic()
    try:
        threshold = options.kill_threshold()
        first = WorkerRun(number=1)
        progress.phase("worker 1 running", 0)
        progress.note(
            f"work directory {directory}; worker 1 processes {options.payments} payments "
            f"of {min(options.customers, options.payments)} customers' accounts, "
            f"{options.concurrency} at a time; SIGKILL once {threshold} of their "
            f"{len(STEP_NAMES) * options.payments} steps have run"
        )
        _run_worker(options, directory, first, progress, 0, kill_after=threshold)
        _check_worker_started(first)
        crash = Snapshot.read(directory)
        completed_at_crash = len(crash.with_status("completed"))
        in_flight = crash.with_status("pending", "running", "suspended")
        if first.returncode == -signal.SIGKILL:
            progress.note(
                f"worker 1 (pid {first.pid}) killed by SIGKILL: {completed_at_crash} payments "
                f"completed, {len(in_flight)} invocations in flight, "
                f"{options.payments - len(crash.invocations)} not yet submitted; "
                f"{len(crash.account_messages)} account messages, "
                f"{sum(1 for m in crash.account_messages.values() if m[3] in _UNFINISHED)} "
                "of them unfinished"
            )
        else:
            progress.note(
                f"worker 1 (pid {first.pid}) was NOT killed: it exited with "
                f"returncode {first.returncode}"
            )

        second = WorkerRun(number=2)
        progress.phase("worker 2 recovering", completed_at_crash)
        restarted_at = time.monotonic()
        _run_worker(
            options, directory, second, progress, completed_at_crash, restarted_at=restarted_at
        )
        _check_worker_started(second)
        if second.returncode != 0:
            progress.note(
                f"worker 2 (pid {second.pid}) exited with returncode {second.returncode}:\n"
                f"{second.log_tail()}"
            )
        elif "finished" in second.events:
            fin = second.events["finished"]
            progress.note(
                f"worker 2 (pid {second.pid}) resumed {fin['resumed']} invocations, all "
                f"completed {fin['recovery_seconds'] * 1000:.0f} ms after the restart; "
                f"then {fin['created']} new payments and {fin['attached']} attached"
            )
            accounts = second.events.get("accounts", {}).get("accounts", [])
            if accounts:
                progress.note(
                    f"worker 2 rebuilt {len(accounts)} accounts: "
                    f"{_ms_text(sum(a['rebuild_checkpoint_seconds'] for a in accounts))} from "
                    "checkpoints + replay, "
                    f"{_ms_text(sum(a['rebuild_full_seconds'] for a in accounts))} by full replay"
                )
        final = Snapshot.read(directory)
        return summarize(
            options,
            directory=None if temporary else directory,
            threshold=threshold,
            first=first,
            second=second,
            crash=crash,
            final=final,
            total_seconds=time.monotonic() - began,
        )
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


_UNFINISHED = ("pending", "running", "suspended")


def _ms_text(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _check_worker_started(run: WorkerRun) -> None:
    if run.timed_out:
        raise DemoError(
            f"worker {run.number} (pid {run.pid}) did not finish in time and was killed\n"
            f"{run.log_tail()}"
        )
    if "resumed" not in run.events and not run.killed:
        raise DemoError(
            f"worker {run.number} (pid {run.pid}) failed to start "
            f"(returncode {run.returncode}):\n{run.log_tail()}"
        )


def summarize(
    options: DemoOptions,
    *,
    directory: Path | None,
    threshold: int,
    first: WorkerRun,
    second: WorkerRun,
    crash: Snapshot,
    final: Snapshot,
    total_seconds: float,
) -> dict[str, Any]:
    """The demo's figures and checks, as one JSON-ready dict."""
    payments = options.payments
    ids = [payment_id(i) for i in range(1, payments + 1)]

    # The crash.
    unfinished_at_crash = crash.with_status("pending", "running", "suspended")
    in_flight_by_steps: Counter[str] = Counter()
    for inv in unfinished_at_crash:
        done = [crash.steps.get(inv, {})[i] for i in sorted(crash.steps.get(inv, {}))]
        in_flight_by_steps[_PROGRESS[done[-1]] if done else "no step committed"] += 1
    order = ["no step committed", *_PROGRESS.values()]
    charged_not_journaled = sorted(set(crash.charges) - crash.charge_step_keys())

    # Steps.
    crash_steps = crash.step_keys()
    first_live = set(first.live_steps)
    second_live = second.live_steps
    committed_rerun = sum(1 for key in second_live if key in crash_steps)
    reexecuted = sum(1 for key in second_live if key in first_live and key not in crash_steps)
    expected_replays = sum(len(crash.steps.get(inv, {})) for inv in unfinished_at_crash)
    stats: dict[str, Any] = second.events.get("finished", {}).get("stats", {})
    fin = second.events.get("finished", {})
    resumed_event = second.events.get("resumed", {})

    # Effects.
    charges_per_payment = Counter(final.charges.values())
    charge_counts = [charges_per_payment.get(pid, 0) for pid in ids]
    calls = list(final.calls.values())
    provider_tx = dict(final.transactions)
    ledger_matches = all(
        pid in final.ledger and final.ledger[pid][0] == provider_tx.get(pid) for pid in ids
    )
    keys = Counter(k for k, _ in final.invocations.values())

    accounts, account_checks = _accounts(options, crash, final, second)

    completed = len(final.with_status("completed"))
    summary: dict[str, Any] = {
        "payments": payments,
        "completed": completed,
        "failed": len(final.with_status("failed", "cancelled")),
        "unfinished": len(final.with_status("pending", "running", "suspended")),
        "invocations": len(final.invocations),
        "crashed": first.returncode == -signal.SIGKILL,
        "worker1_pid": first.pid,
        "worker1_returncode": first.returncode,
        "worker2_pid": second.pid,
        "worker2_returncode": second.returncode,
        "kill_after_steps": threshold,
        "steps_when_killed": first.steps_when_killed,
        "completed_when_killed": first.completed_when_killed,
        "sigstop_checks": first.stops,
        "completed_at_crash": len(crash.with_status("completed")),
        "in_flight_at_crash": len(unfinished_at_crash),
        "in_flight_at_crash_by_progress": {
            k: in_flight_by_steps[k] for k in order if in_flight_by_steps[k]
        },
        "not_submitted_at_crash": payments - len(crash.invocations),
        "charged_but_not_journaled_at_crash": len(charged_not_journaled),
        "resumed": resumed_event.get("resumed"),
        "attached_after_restart": second.attached,
        "new_after_restart": fin.get("created"),
        "steps_executed": len(first.live_steps) + len(second_live),
        "steps_executed_worker1": len(first.live_steps),
        "steps_executed_worker2": len(second_live),
        "steps_replayed": stats.get("steps_replayed"),
        "steps_replayable_at_crash": expected_replays,
        "steps_reexecuted": reexecuted,
        "committed_steps_rerun": committed_rerun,
        "steps_journaled": sum(len(v) for v in final.steps.values()),
        "steps_per_payment": len(STEP_NAMES),
        "min_charges_per_key": min(charge_counts),
        "max_charges_per_key": max(charge_counts),
        "charges": len(final.charges),
        "provider_calls": sum(calls),
        "max_provider_calls_per_key": max(calls, default=0),
        "provider_calls_deduplicated": sum(calls) - len(final.charges),
        "ledger_rows": len(final.ledger),
        "max_ledger_writes_per_row": max((w for _, w in final.ledger.values()), default=0),
        "ledger_matches_provider": ledger_matches,
        **accounts,
        "recovery_seconds": fin.get("recovery_seconds"),
        "runtime_recovery_seconds": resumed_event.get("runtime_recovery_seconds"),
        "worker_startup_seconds": fin.get("startup_seconds"),
        "store_open_seconds": fin.get("open_seconds"),
        "resume_seconds": fin.get("resume_seconds"),
        "total_seconds": total_seconds,
        "charge_latency_ms": options.charge_latency_ms,
        "concurrency": options.concurrency,
        "directory": None if directory is None else str(directory),
    }
    checks = {
        "worker 1 was killed by SIGKILL": summary["crashed"],
        "the crash landed with invocations in flight": summary["in_flight_at_crash"] > 0,
        "worker 2 finished cleanly": second.returncode == 0,
        "every unfinished invocation was resumed": summary["resumed"] == len(unfinished_at_crash),
        "every payment completed": completed == payments,
        "one invocation per payment": (
            len(final.invocations) == payments and set(keys) == set(ids) and max(keys.values()) == 1
        ),
        "every payment charged exactly once": summary["min_charges_per_key"] == 1
        and summary["max_charges_per_key"] == 1
        and len(final.charges) == payments,
        "no committed step ran again": committed_rerun == 0,
        "every journaled step of a resumed invocation was replayed": (
            summary["steps_replayed"] == expected_replays
        ),
        "every step journaled once": summary["steps_journaled"] == len(STEP_NAMES) * payments,
        "one ledger row per payment, matching its charge": (
            summary["ledger_rows"] == payments and ledger_matches
        ),
        **account_checks,
    }
    summary["checks"] = checks
    summary["ok"] = all(checks.values())
    summary["definitions"] = DEFINITIONS
    return summary


def _accounts(
    options: DemoOptions, crash: Snapshot, final: Snapshot, second: WorkerRun
) -> tuple[dict[str, Any], dict[str, bool]]:
    """The Account actors' figures and checks.

    Expected: each customer's account holds the sum and the count of that
    customer's payments, credited exactly once although the worker was
    killed, and it took one account message per payment, keyed by the
    payment's asking step (so that the re-run of a step cut off by the kill
    attached to the message it had sent instead of sending another).
    """
    expected: dict[str, tuple[int, int]] = {}
    for request in make_payments(options.payments, options.customers):
        cents, count = expected.get(request.customer, (0, 0))
        expected[request.customer] = (cents + request.amount_cents, count + 1)
    reported: list[dict[str, Any]] = second.events.get("accounts", {}).get("accounts", [])
    by_key = {a["key"]: a for a in reported}
    accounts_correct = set(by_key) == set(expected) and all(
        (a["paid_cents"], a["payments"]) == expected[key]
        and a["messages"] == a["completed_messages"] == expected[key][1]
        for key, a in by_key.items()
    )

    # The store's view: one message per payment, keyed by its "account" step.
    messages = final.account_messages.values()
    message_keys = Counter(k for _, _, k, _ in messages)
    at_crash = crash.account_messages.values()
    ask_journaled_at_crash = crash.step_keys_named("account")
    stats: dict[str, Any] = second.events.get("finished", {}).get("stats", {})
    resumed_event = second.events.get("resumed", {})

    figures: dict[str, Any] = {
        "customers": options.customers,
        "accounts": len(reported),
        "accounts_correct": accounts_correct,
        "account_messages": len(final.account_messages),
        "account_messages_completed": sum(1 for *_, s in messages if s == "completed"),
        "max_account_messages_per_payment": max(message_keys.values(), default=0),
        "account_checkpoints": sum(final.checkpoints.values()),
        "account_messages_at_crash": len(crash.account_messages),
        "account_messages_in_flight_at_crash": sum(1 for *_, s in at_crash if s in _UNFINISHED),
        # The actor had handled the message, the asking step had not
        # committed: its re-run after the restart must attach, not re-send.
        "account_messages_handled_not_journaled_at_crash": sum(
            1 for *_, k, s in at_crash if s == "completed" and k not in ask_journaled_at_crash
        ),
        "account_messages_resumed": resumed_event.get("unfinished_account_messages"),
        "actors_recovered_at_restart": resumed_event.get("actors_recovered"),
        "actors_recovered": stats.get("actors_recovered"),
        "actor_recovery_checkpoint_ms": sum(a["rebuild_checkpoint_seconds"] for a in reported)
        * 1000,
        "actor_recovery_full_ms": sum(a["rebuild_full_seconds"] for a in reported) * 1000,
        "actor_messages_replayed_checkpoint": sum(a["replayed_checkpoint"] for a in reported),
        "actor_messages_replayed_full": sum(a["replayed_full"] for a in reported),
        "account_states": {
            a["key"]: {
                "paid_cents": a["paid_cents"],
                "payments": a["payments"],
                "expected_cents": expected.get(a["key"], (None, None))[0],
                "expected_payments": expected.get(a["key"], (None, None))[1],
                "messages": a["messages"],
                "checkpoint_seq": a["checkpoint_seq"],
                "replayed_checkpoint": a["replayed_checkpoint"],
                "replayed_full": a["replayed_full"],
            }
            for a in reported
        },
    }
    checks = {
        "every account's balance equals its payments": accounts_correct,
        "one account message per payment, keyed by its step": (
            len(final.account_messages) == options.payments
            and set(message_keys) == final.step_keys_named("account")
            and figures["max_account_messages_per_payment"] == 1
        ),
        "checkpoint + replay rebuilds the state a full replay does": bool(reported)
        and all(
            a["same_state"] and a["replayed_checkpoint"] <= a["replayed_full"] == a["messages"]
            for a in reported
        ),
    }
    return figures, checks


DEFINITIONS = {
    "steps_executed": "live runs of step functions in both workers (Hooks.before_step), "
    "retries and re-executions included",
    "steps_replayed": "steps the restarted worker returned from the journal instead of running "
    "them (RuntimeStats.steps_replayed)",
    "steps_reexecuted": "steps running at the kill whose result had not committed; they ran "
    "again after the restart",
    "committed_steps_rerun": "steps already committed at the kill that ran again (must be 0)",
    "charges_per_key": "charges the provider holds per payment (the workflow's idempotency key)",
    "provider_calls_per_key": "calls the provider received per step key; a repeat is a charge "
    "made just before the kill and re-sent with the same key after the restart",
    "recovery_seconds": "from the parent restarting the worker process until every invocation "
    "unfinished at the crash has completed, measured in the worker (process start included)",
    "runtime_recovery_seconds": "the runtime's stats.recovery_seconds: finding the unfinished "
    "invocations and relaunching them",
    "in_flight_at_crash": "invocations recorded in the store and not finished when the worker "
    "was killed",
    "accounts_correct": "every customer's Account actor holds the sum and the count of that "
    "customer's payments (read by worker 2 once the batch is done)",
    "account_messages": "messages to the Account actors in the store (invocations of "
    "Account.add_payment), counted apart from the payments' invocations",
    "account_messages_handled_not_journaled_at_crash": "messages the actor had handled when "
    "the worker was killed while the payment's asking step had not committed",
    "actors_recovered": "Account activations in worker 2 (each rebuilds its state from the "
    "store); actors_recovered_at_restart: those activated by Runtime.recover() to resume "
    "messages in flight",
    "actor_recovery_checkpoint_ms": "time to rebuild every account's state from its latest "
    "checkpoint plus the messages after it, summed over the accounts (fastest of 3 runs each)",
    "actor_recovery_full_ms": "the same by replaying every message, without checkpoints",
    "actor_messages_replayed_checkpoint": "messages replayed by the rebuilds from checkpoints; "
    "actor_messages_replayed_full: by the full replays",
    "sigstop_checks": "times the parent froze worker 1 (SIGSTOP) to check that payments were "
    "mid-way before the SIGKILL; it resumes it (SIGCONT) when none is",
}
