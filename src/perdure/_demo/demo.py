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
the provider's and the ledger's files.

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
from typing import IO, Any, Protocol

from .worker import LEDGER_FILE, PROVIDER_FILE, STORE_FILE, payment_id

MARKER_FILE = ".perdure-demo"
STEP_NAMES = ("validate", "charge", "record")
# How far an invocation in flight had got: its last committed step.
_PROGRESS = {"validate": "validated", "charge": "charged", "record": "recorded"}


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

    def kill_threshold(self) -> int:
        """Live step runs after which the first worker is killed (at the next
        instant when payments are mid-way). Steps, not completed payments,
        measure the progress: a batch no larger than the concurrency runs in
        lockstep and completes all at once, with no mid-way instant after
        its first completion."""
        steps = len(STEP_NAMES) * self.payments
        return max(1, min(steps - 1, math.ceil(steps * self.kill_at)))


# -- progress ----------------------------------------------------------------------


class Progress(Protocol):
    """Where the demo reports progress (stderr: stdout carries the summary)."""

    def phase(self, description: str, completed: int) -> None: ...
    def advance(self, completed: int) -> None: ...
    def note(self, message: str) -> None: ...


class NoProgress:
    def phase(self, description: str, completed: int) -> None:
        pass

    def advance(self, completed: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass


class PlainProgress:
    """Progress as plain lines, for a stream that is not a terminal."""

    def __init__(self, total: int, file: IO[str] | None = None, every: float = 0.1) -> None:
        self._total = total
        self._file = file
        self._step = max(1, math.ceil(total * every))
        self._description = ""
        self._next = self._step

    def _print(self, text: str) -> None:
        print(f"perdure demo: {text}", file=self._file or sys.stderr, flush=True)

    def phase(self, description: str, completed: int) -> None:
        self._description = description
        self._next = (completed // self._step + 1) * self._step
        self._print(f"{description}: {completed}/{self._total} completed")

    def advance(self, completed: int) -> None:
        if completed >= self._next or completed == self._total:
            self._print(f"{self._description}: {completed}/{self._total} completed")
            self._next = (completed // self._step + 1) * self._step

    def note(self, message: str) -> None:
        self._print(message)


class RichProgress:
    """A rich progress bar; use as a context manager."""

    def __init__(self, total: int, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("{task.description:<20}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("payments completed"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=20,
        )
        self._task = self._bar.add_task("starting", total=total)

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def phase(self, description: str, completed: int) -> None:
        self._bar.update(self._task, description=description, completed=completed)

    def advance(self, completed: int) -> None:
        self._bar.update(self._task, completed=completed)

    def note(self, message: str) -> None:
        from rich.markup import escape

        self._bar.console.print(f"[dim]{escape(message)}[/dim]", highlight=False)


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

    @classmethod
    def read(cls, directory: Path) -> Snapshot:
        store = directory / STORE_FILE
        provider = directory / PROVIDER_FILE
        ledger = directory / LEDGER_FILE
        steps: dict[str, dict[int, str]] = {}
        for inv, idx, name in _query(
            store, "SELECT invocation_id, idx, name FROM journal WHERE kind = 'step'"
        ):
            steps.setdefault(inv, {})[idx] = name
        charge_rows = _query(
            provider, "SELECT idempotency_key, payment_id, transaction_id FROM charges"
        )
        return cls(
            invocations={
                i: (k, s)
                for i, k, s in _query(store, "SELECT id, idempotency_key, status FROM invocations")
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
        )

    def with_status(self, *statuses: str) -> list[str]:
        return [i for i, (_, s) in self.invocations.items() if s in statuses]

    def step_keys(self) -> set[tuple[str, int]]:
        return {(inv, idx) for inv, entries in self.steps.items() for idx in entries}

    def charge_step_keys(self) -> set[str]:
        return {
            f"{inv}:{idx}"
            for inv, entries in self.steps.items()
            for idx, name in entries.items()
            if name == "charge"
        }


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
                    "WHERE status IN ('pending', 'running', 'suspended')"
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
            inv, idx, _name = rest.split(" ")
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
    progress = progress or NoProgress()
    directory, temporary = prepare_directory(options.directory)
    began = time.monotonic()
    try:
        threshold = options.kill_threshold()
        first = WorkerRun(number=1)
        progress.phase("worker 1 running", 0)
        progress.note(
            f"work directory {directory}; worker 1 processes {options.payments} payments, "
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
                f"{options.payments - len(crash.invocations)} not yet submitted"
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
        "min_charges_per_key": min(charge_counts),
        "max_charges_per_key": max(charge_counts),
        "charges": len(final.charges),
        "provider_calls": sum(calls),
        "max_provider_calls_per_key": max(calls, default=0),
        "provider_calls_deduplicated": sum(calls) - len(final.charges),
        "ledger_rows": len(final.ledger),
        "max_ledger_writes_per_row": max((w for _, w in final.ledger.values()), default=0),
        "ledger_matches_provider": ledger_matches,
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
    }
    summary["checks"] = checks
    summary["ok"] = all(checks.values())
    summary["definitions"] = DEFINITIONS
    return summary


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
    "sigstop_checks": "times the parent froze worker 1 (SIGSTOP) to check that payments were "
    "mid-way before the SIGKILL; it resumes it (SIGCONT) when none is",
}


# -- output ----------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def render(summary: dict[str, Any], file: IO[str] | None = None) -> None:
    """Print the summary as a rich table, then the checks."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(file=file, highlight=False, width=110)
    s = summary
    table = Table(
        title="Perdure payment demo: worker killed with SIGKILL mid-batch, then restarted",
        title_justify="left",
        show_header=False,
        box=None,
        padding=(0, 2),
    )
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(style="dim")

    def section(name: str) -> None:
        table.add_row(f"[cyan]{name}[/cyan]", "", "")

    section("batch")
    table.add_row("payments", str(s["payments"]), f"at most {s['concurrency']} in flight")
    table.add_row(
        "completed", str(s["completed"]), f"{s['failed']} failed, {s['unfinished']} unfinished"
    )
    section("crash")
    table.add_row(
        "worker 1 killed",
        "yes" if s["crashed"] else "NO",
        f"pid {s['worker1_pid']}, returncode {s['worker1_returncode']}; "
        "frozen mid-way by SIGSTOP first",
    )
    table.add_row("completed at the crash", str(s["completed_at_crash"]), "durable in the store")
    by_progress = ", ".join(f"{n} {k}" for k, n in s["in_flight_at_crash_by_progress"].items())
    table.add_row("in flight at the crash", str(s["in_flight_at_crash"]), by_progress)
    table.add_row("not yet submitted", str(s["not_submitted_at_crash"]), "")
    table.add_row(
        "charged, not journaled",
        str(s["charged_but_not_journaled_at_crash"]),
        "the provider had charged; the charge step had not committed",
    )
    section("recovery")
    table.add_row(
        "resumed invocations",
        str(s["resumed"]),
        f"then {s['new_after_restart']} new payments; {s['attached_after_restart']} "
        "re-submissions attached by key",
    )
    table.add_row(
        "time to recover",
        _ms(s["recovery_seconds"]),
        "worker restart -> every payment in flight at the crash completed",
    )
    table.add_row("  process start", _ms(s["worker_startup_seconds"]), "1. interpreter and imports")
    table.add_row("  store open", _ms(s["store_open_seconds"]), "2. Runtime.start()")
    table.add_row(
        "  resume and finish",
        _ms(s["resume_seconds"]),
        f"3. incl. stats.recovery_seconds {_ms(s['runtime_recovery_seconds'])}: find, relaunch",
    )
    section("steps")
    table.add_row(
        "executed",
        str(s["steps_executed"]),
        f"live step runs: worker 1 {s['steps_executed_worker1']}, "
        f"worker 2 {s['steps_executed_worker2']}",
    )
    table.add_row(
        "replayed from the journal",
        str(s["steps_replayed"]),
        f"by worker 2, not run again ({s['steps_replayable_at_crash']} were journaled for them)",
    )
    table.add_row(
        "re-executed",
        str(s["steps_reexecuted"]),
        "were running at the kill, not committed: ran again",
    )
    table.add_row("committed, run again", str(s["committed_steps_rerun"]), "must be 0")
    table.add_row("journaled", str(s["steps_journaled"]), "3 per payment")
    section("effects")
    table.add_row(
        "charges per payment",
        f"{s['min_charges_per_key']}..{s['max_charges_per_key']}",
        f"min..max; {s['charges']} charges in all",
    )
    table.add_row(
        "provider calls per key",
        f"max {s['max_provider_calls_per_key']}",
        f"{s['provider_calls']} calls, {s['provider_calls_deduplicated']} repeats "
        "deduplicated by the step key",
    )
    table.add_row(
        "ledger rows",
        str(s["ledger_rows"]),
        ("match the provider's charges" if s["ledger_matches_provider"] else "DO NOT MATCH")
        + f"; max {s['max_ledger_writes_per_row']} writes per row (upsert)",
    )
    table.add_row("total time", _ms(s["total_seconds"]), "both workers and the checks")
    console.print(table)
    console.print()
    for name, ok in s["checks"].items():
        mark = "[green]✓[/green]" if ok else "[bold red]✗[/bold red]"
        console.print(f"  {mark} {name}")
    console.print()
    if s["ok"]:
        console.print(
            f"[bold green]OK[/bold green]: all {s['payments']} payments completed, each charged "
            "exactly once, although the worker was killed mid-batch."
        )
    else:
        console.print("[bold red]FAILED[/bold red]: an invariant does not hold (see above).")
    if s["directory"]:
        console.print(f"[dim]files kept in {s['directory']}[/dim]")
