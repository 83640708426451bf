"""The payment demo and the ``perdure`` command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import perdure
from perdure import _cli as cli_module
from perdure._cli import main
from perdure._demo import demo as demo_module
from perdure._demo.demo import (
    MARKER_FILE,
    DemoOptions,
    Snapshot,
    WorkerRun,
    summarize,
)
from perdure._demo.worker import make_payments

SRC = str(Path(perdure.__file__).resolve().parents[1])


def _perdure(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC, COLUMNS="120")
    return subprocess.run(
        [sys.executable, "-m", "perdure._cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=110,
        check=False,
    )


def _assert_invariants(summary: dict[str, Any], payments: int) -> None:
    assert summary["payments"] == payments
    assert summary["crashed"] is True
    assert summary["worker1_returncode"] == -signal.SIGKILL
    assert summary["in_flight_at_crash"] > 0
    assert summary["resumed"] == summary["in_flight_at_crash"]
    assert summary["steps_replayed"] > 0
    assert summary["completed"] == payments
    assert summary["min_charges_per_key"] == 1
    assert summary["max_charges_per_key"] == 1
    assert summary["ledger_rows"] == payments
    assert summary["steps_replayed"] == summary["steps_replayable_at_crash"]
    assert summary["committed_steps_rerun"] == 0
    # validate, charge, record, and the step that asks the customer's Account.
    assert summary["steps_per_payment"] == 4
    assert summary["steps_journaled"] == 4 * payments
    # Every step ran live at least once; only steps cut off by the kill ran twice.
    assert summary["steps_executed"] == 4 * payments + summary["steps_reexecuted"]
    assert summary["steps_reexecuted"] <= summary["in_flight_at_crash"]
    assert 1 <= summary["max_provider_calls_per_key"] <= 2
    assert summary["recovery_seconds"] > summary["runtime_recovery_seconds"] >= 0
    # The Account actors: exact balances despite the kill, one message per
    # payment (counted apart from the payments' invocations).
    assert summary["invocations"] == payments
    assert summary["accounts_correct"] is True
    assert summary["accounts"] == min(payments, summary["customers"])
    assert summary["account_messages"] == payments
    assert summary["max_account_messages_per_payment"] == 1
    assert summary["account_messages_resumed"] == summary["account_messages_in_flight_at_crash"]
    assert summary["actors_recovered"] >= summary["accounts"]
    # Rebuilding every account, from checkpoints and by full replay: both timed.
    assert summary["actor_recovery_checkpoint_ms"] > 0
    assert summary["actor_recovery_full_ms"] > 0
    assert summary["actor_messages_replayed_full"] == payments
    assert summary["actor_messages_replayed_checkpoint"] <= summary["actor_messages_replayed_full"]
    for state in summary["account_states"].values():
        assert state["paid_cents"] == state["expected_cents"]
        assert state["payments"] == state["expected_payments"] == state["messages"]
    assert all(summary["checks"].values()), summary["checks"]
    assert summary["ok"] is True


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"perdure {perdure.__version__}"


def test_help_lists_demo() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output


def test_demo_refuses_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    result = CliRunner().invoke(main, ["demo", "--payments", "10", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "not empty" in result.output
    assert precious.read_text() == "keep me"


def test_demo_exits_non_zero_when_a_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(options: DemoOptions, progress: object = None) -> dict[str, Any]:
        return {"payments": options.payments, "ok": False, "checks": {"charged once": False}}

    monkeypatch.setattr(demo_module, "run_demo", failing)
    result = CliRunner().invoke(main, ["demo", "--payments", "5", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "payments": 5,
        "ok": False,
        "checks": {"charged once": False},
    }


def _snapshot(
    invocations: dict[str, tuple[str | None, str]],
    steps: dict[str, dict[int, str]],
    charges: dict[str, str] | None = None,
    account_messages: dict[str, tuple[str, int, str | None, str]] | None = None,
) -> Snapshot:
    charges = charges or {}
    return Snapshot(
        invocations=invocations,
        steps=steps,
        charges=charges,
        calls=dict.fromkeys(charges, 1),
        ledger={pid: (f"tx_{pid}", 1) for pid in sorted(set(charges.values()))},
        transactions=[(pid, f"tx_{pid}") for pid in charges.values()],
        account_messages=account_messages or {},
    )


ALL_STEPS = {1: "validate", 2: "charge", 3: "record", 4: "account"}


def _accounts_event(payments: int, credited_twice: str | None = None) -> dict[str, Any]:
    """What worker 2 reports of the accounts: right, or one payment credited twice."""
    accounts: dict[str, dict[str, Any]] = {}
    for request in make_payments(payments, DemoOptions().customers):
        times = 2 if request.payment_id == credited_twice else 1
        a = accounts.setdefault(
            request.customer,
            {"key": request.customer, "paid_cents": 0, "payments": 0, "checkpoint_seq": 0},
        )
        a["paid_cents"] += request.amount_cents * times
        a["payments"] += times
    for a in accounts.values():
        a.update(
            messages=a["payments"],
            completed_messages=a["payments"],
            replayed_checkpoint=a["payments"],
            replayed_full=a["payments"],
            rebuild_checkpoint_seconds=0.001,
            rebuild_full_seconds=0.001,
            same_state=True,
        )
    return {"accounts": list(accounts.values())}


def _summary_of_two_payments(
    final_charges: dict[str, str],
    final_messages: dict[str, tuple[str, int, str | None, str]],
    accounts: dict[str, Any],
) -> dict[str, Any]:
    """pay-00001 completed before the kill, pay-00002 was mid-way (validated)."""
    crash = _snapshot(
        {"i1": ("pay-00001", "completed"), "i2": ("pay-00002", "running")},
        {"i1": ALL_STEPS, "i2": {1: "validate"}},
        {"i1:2": "pay-00001"},
        {"m1": ("cust-001", 1, "i1:4", "completed")},
    )
    final = _snapshot(
        {"i1": ("pay-00001", "completed"), "i2": ("pay-00002", "completed")},
        {"i1": ALL_STEPS, "i2": ALL_STEPS},
        final_charges,
        final_messages,
    )
    first = WorkerRun(number=1, returncode=-signal.SIGKILL, killed=True)
    first.live_steps = [("i1", 1), ("i1", 2), ("i1", 3), ("i1", 4), ("i2", 1), ("i2", 2)]
    second = WorkerRun(number=2, returncode=0)
    second.live_steps = [("i2", 2), ("i2", 3), ("i2", 4)]
    second.events = {
        "resumed": {"resumed": 1, "runtime_recovery_seconds": 0.001},
        "finished": {"stats": {"steps_replayed": 1}, "created": 0, "recovery_seconds": 0.1},
        "accounts": accounts,
    }
    return summarize(
        DemoOptions(payments=2),
        directory=None,
        threshold=1,
        first=first,
        second=second,
        crash=crash,
        final=final,
        total_seconds=1.0,
    )


RIGHT_MESSAGES: dict[str, tuple[str, int, str | None, str]] = {
    "m1": ("cust-001", 1, "i1:4", "completed"),
    "m2": ("cust-002", 1, "i2:4", "completed"),
}


def test_summary_of_a_good_run_passes() -> None:
    summary = _summary_of_two_payments(
        {"i1:2": "pay-00001", "i2:2": "pay-00002"}, RIGHT_MESSAGES, _accounts_event(2)
    )
    assert summary["ok"] is True, summary["checks"]
    assert summary["accounts"] == 2
    assert summary["account_messages"] == 2
    assert summary["account_messages_at_crash"] == 1


def test_summary_flags_a_double_charge() -> None:
    summary = _summary_of_two_payments(
        # pay-00002 charged twice, under two different keys
        {"i1:2": "pay-00001", "i2:2": "pay-00002", "other:2": "pay-00002"},
        RIGHT_MESSAGES,
        _accounts_event(2),
    )
    assert summary["min_charges_per_key"] == 1
    assert summary["max_charges_per_key"] == 2
    assert summary["steps_reexecuted"] == 1
    assert summary["committed_steps_rerun"] == 0
    assert summary["ok"] is False
    failed = [name for name, ok in summary["checks"].items() if not ok]
    assert failed == ["every payment charged exactly once"]


def test_summary_flags_an_account_credited_twice() -> None:
    # The resumed payment's asking step re-sent its message under another key.
    messages = {**RIGHT_MESSAGES, "m3": ("cust-002", 2, "other:4", "completed")}
    summary = _summary_of_two_payments(
        {"i1:2": "pay-00001", "i2:2": "pay-00002"},
        messages,
        _accounts_event(2, credited_twice="pay-00002"),
    )
    assert summary["accounts_correct"] is False
    assert summary["account_messages"] == 3
    assert summary["ok"] is False
    failed = [name for name, ok in summary["checks"].items() if not ok]
    assert failed == [
        "every account's balance equals its payments",
        "one account message per payment, keyed by its step",
    ]


@pytest.mark.slow
def test_demo_json_survives_sigkill() -> None:
    args = ["demo", "--payments", "30", "--concurrency", "8", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # progress went to stderr
    _assert_invariants(summary, 30)
    # At most 8 payments run at a time and the kill comes after 48 of the 120
    # steps: some payments had completed, and re-submitting them attached.
    assert summary["completed_at_crash"] > 0
    assert summary["attached_after_restart"] >= summary["completed_at_crash"]
    assert summary["directory"] is None  # the temporary directory was removed
    assert "worker 1" in result.stderr
    assert "killed by SIGKILL" in result.stderr


@pytest.mark.slow
def test_demo_command_table_and_rerun_in_the_same_directory(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    for _ in range(2):  # the second run wipes the first one's files
        proc = _perdure("demo", "--payments", "40", "--dir", str(work), cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "OK: all 40 payments completed, each charged exactly once" in proc.stdout
        assert "time to recover" in proc.stdout
        assert "killed by SIGKILL" in proc.stderr
        assert (work / MARKER_FILE).exists()
        assert (work / "perdure.db").exists()
    json_run = _perdure("demo", "--payments", "40", "--dir", str(work), "--json", cwd=tmp_path)
    assert json_run.returncode == 0, json_run.stderr
    _assert_invariants(json.loads(json_run.stdout), 40)


def test_lazy_commands_absent_or_broken_do_not_break_the_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        cli_module,
        "_LAZY_COMMANDS",
        {
            "ghost": ("perdure._no_such_module", "ghost"),
            "broken": ("perdure._demo.worker", "no_such_command"),
        },
    )
    runner = CliRunner()
    listing = runner.invoke(main, ["--help"])
    assert listing.exit_code == 0
    assert "ghost" not in listing.output
    assert "broken" in listing.output
    assert "demo" in listing.output
    assert runner.invoke(main, ["ghost"]).exit_code == 2  # no such command
    broken = runner.invoke(main, ["broken"])
    assert broken.exit_code == 1
    assert "unavailable" in broken.output


@pytest.mark.slow
def test_demo_accounts_rebuilt_from_checkpoints() -> None:
    # 45 payments over 3 customers: 15 messages per account, a checkpoint
    # every 10, so rebuilding from it replays 5 messages instead of 15.
    summary = demo_module.run_demo(DemoOptions(payments=45, customers=3, concurrency=8))
    _assert_invariants(summary, 45)
    assert summary["accounts"] == 3
    assert summary["account_checkpoints"] == 3
    assert summary["actor_messages_replayed_checkpoint"] == 3 * 5
    assert summary["actor_messages_replayed_full"] == 45
    # The checkpoint goes with each account's 10th message, at position 10 of
    # its log, or later: a message the restarted worker re-sends (a payment
    # resumed before its asking step had committed) is deduplicated by its
    # key but uses up a position (Runtime.send_actor).
    resent = (
        summary["account_messages_in_flight_at_crash"]
        + summary["account_messages_handled_not_journaled_at_crash"]
    )
    for state in summary["account_states"].values():
        assert 10 <= state["checkpoint_seq"] <= 10 + resent
