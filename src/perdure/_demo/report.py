"""How ``perdure demo`` shows itself: progress on stderr, the summary table.

The figures and checks are :func:`perdure._demo.demo.summarize`'s; this
module only presents them.
"""

from __future__ import annotations

import math
import os
import sys
from typing import IO, Any, Protocol

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


# -- output ----------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _accounts_rows(table: Any, s: dict[str, Any]) -> None:
    table.add_row("[cyan]accounts (durable actors)[/cyan]", "", "")
    states = s.get("account_states", {}).values()
    messages = [a["messages"] for a in states] or [0]
    table.add_row(
        "accounts",
        str(s["accounts"]),
        f"one actor per customer, {min(messages)}..{max(messages)} messages each, "
        f"{s['account_checkpoints']} checkpoints",
    )
    table.add_row(
        "balances",
        "correct" if s["accounts_correct"] else "WRONG",
        "sum and count of the customer's payments, each credited once",
    )
    table.add_row(
        "messages at the crash",
        str(s["account_messages_at_crash"]),
        f"{s['account_messages_in_flight_at_crash']} in flight; "
        f"{s['account_messages_handled_not_journaled_at_crash']} handled, "
        "the payment's ask not journaled",
    )
    table.add_row(
        "activations after restart",
        str(s["actors_recovered"]),
        f"{s['actors_recovered_at_restart']} by recover(), "
        f"{s['account_messages_resumed']} messages resumed in them",
    )
    table.add_row(
        "rebuild: checkpoint + replay",
        f"{s['actor_recovery_checkpoint_ms']:.1f} ms",
        f"all accounts; {s['actor_messages_replayed_checkpoint']} messages replayed",
    )
    table.add_row(
        "rebuild: full replay",
        f"{s['actor_recovery_full_ms']:.1f} ms",
        f"all accounts; {s['actor_messages_replayed_full']} messages replayed",
    )


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
    table.add_row(
        "journaled",
        str(s["steps_journaled"]),
        f"{s.get('steps_per_payment', 4)} per payment: validate, charge, record, ask Account",
    )
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
    if "accounts" in s:
        _accounts_rows(table, s)
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
            "exactly once, although the worker was killed mid-batch"
            + (
                f"; every one of the {s['accounts']} account balances is exact."
                if s.get("accounts")
                else "."
            )
        )
    else:
        console.print("[bold red]FAILED[/bold red]: an invariant does not hold (see above).")
    if s["directory"]:
        console.print(f"[dim]files kept in {s['directory']}[/dim]")
