"""``perdure bench`` on tiny sizes: the report's shape, never its timings."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import perdure
from perdure._bench import bench, median_of
from perdure.testing import FakeClock

# --timer-window (internal): the timer row's wake-ups over 0.2 s instead of 1 s.
TINY = ["--quick", "--scale", "0.02", "--runs", "1", "--timer-window", "0.2"]

FLAT_METRICS = [
    "workflow_latency_p50_ms",
    "workflow_latency_p99_ms",
    "steps_per_second",
    "steps_per_second_sync",
    "step_latency_p50_ms",
    "step_latency_p50_ms_sync",
    "plain_workflow_us",
    "durable_over_plain",
    "actor_recovery_full_ms",
    "actor_recovery_checkpoint_ms",
    "actor_recovery_ratio",
    "checkpoint_1mb_ms",
    "actor_messages_per_second",
    "plain_actor_us",
    "queue_actor_us",
    "plain_actor_over_queue",
    "timer_lateness_p50_ms",
    "timer_lateness_p99_ms",
    "timer_lateness_max_ms",
    "fanout_1000_seconds",
]


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _check_figures(doc: dict[str, Any]) -> None:
    for key in FLAT_METRICS:
        assert _positive(doc[key]), f"{key} = {doc[key]!r}"
    # A hundred sleepers (the tiny size) may leave the heap a little smaller, or
    # the resident set within the same pages.
    for key in ("suspended_workflow_bytes", "suspended_workflow_rss_bytes"):
        assert isinstance(doc[key], float)
        assert math.isfinite(doc[key])
    timers = doc["timers"]
    assert timers["timers"] == timers["parked"] == timers["resumed"] > 0
    assert 0 <= timers["resumed_after_due"] <= timers["timers"]
    assert timers["parked_ahead_seconds"] > 0
    assert timers["timer_lead_seconds"] == 3.0  # the runtime's default
    suspended = doc["suspended"]
    assert suspended["workflows"] == suspended["suspended_in_store"] > 0
    wps = doc["workflows_per_second"]
    assert set(wps) == {"1", "16", "64", "256"}
    for concurrency, value in wps.items():
        assert _positive(value), f"workflows_per_second[{concurrency}] = {value!r}"
    common = {
        "workflows_per_second.256",
        "step_latency_p50_ms",
        "actor_recovery_checkpoint_ms",
        "actor_recovery_ratio",
        "checkpoint_1mb_ms",
        "actor_messages_per_second",
        "plain_actor_over_queue",
        "timer_lateness_p99_ms",
        "suspended_workflow_bytes",
        "fanout_1000_seconds",
    }
    if "pg_workflows_per_second" in doc:
        # PostgreSQL: the node rows, and the scale-out issue's targets.
        for key in ("pg_workflows_per_second", "pg_workflow_latency_p50_ms"):
            assert set(doc[key]) == {"1", "2"}
            assert all(_positive(v) for v in doc[key].values()), doc[key]
        assert 0 < doc["takeover_seconds"] <= doc["failover_seconds"]
        assert doc["failover"]["lease_ttl_seconds"] == 3.0  # the default lease
        assert doc["failover"]["in_flight"] > 0
        assert set(doc["targets"]) == common | {"failover_seconds"}
    else:
        assert "failover_seconds" not in doc
        assert set(doc["targets"]) == common | {"steps_per_second", "workflow_latency_p50_ms"}
    assert all(isinstance(t["met"], bool) for t in doc["targets"].values())


@pytest.mark.slow
def test_json_on_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(bench, [*TINY, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # exactly one JSON object on stdout
    _check_figures(doc)
    config = doc["config"]
    assert config["synchronous"] == "full"
    assert config["runs"] == 1
    assert config["quick"] is True
    assert config["cpu_count"] >= 1
    assert config["python"].count(".") == 2
    assert config["store_url"].startswith("sqlite:///")
    assert config["actor_history_messages"] > config["sizes"]["actor_history"] > 0
    assert config["checkpoint_state_bytes"] > 900_000
    sizes = config["sizes"]
    assert sizes["timer_window"] == 0.2
    assert sizes["timers"] == doc["timers"]["timers"]
    assert sizes["suspended_workflows"] == doc["suspended"]["workflows"]
    assert sizes["fanout_children"] == 20
    # With --quick, timers and suspended workflows are measured in one run only.
    assert sizes["timers_every_run"] is False
    # Always written to metrics/benchmark_results.json under the working directory.
    written = json.loads((tmp_path / "metrics" / "benchmark_results.json").read_text())
    assert written == doc


@pytest.mark.slow
def test_sqlite_url_sets_mode_and_leaves_nothing_behind(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out" / "results.json"
    url = f"sqlite:///{data}/x.db?synchronous=normal"
    result = CliRunner().invoke(bench, [*TINY, "--json", "--store", url, "--output", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    _check_figures(doc)
    assert doc["config"]["synchronous"] == "normal"
    assert doc["config"]["store"] == url
    assert doc["config"]["store_dir"].startswith(str(data))
    assert json.loads(out.read_text()) == doc
    assert list(data.iterdir()) == []  # every fresh store file was removed


@pytest.mark.slow
def test_postgres_url_uses_fresh_schemas_and_drops_them(pg_url: str, tmp_path: Path) -> None:
    import psycopg

    from perdure.storage._postgres import parse_url

    out = tmp_path / "results.json"
    result = CliRunner().invoke(bench, [*TINY, "--json", "--store", pg_url, "--output", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    _check_figures(doc)
    base = parse_url(pg_url)[1]
    assert doc["config"]["store"] == pg_url
    assert doc["config"]["store_url"].endswith(f"schema={base}_<measurement>")
    assert doc["config"]["synchronous"] is None
    assert doc["config"]["postgres_version"]
    conninfo = parse_url(pg_url)[0]
    with psycopg.connect(conninfo) as conn:
        left = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (base + "%",)
        ).fetchall()
    assert left == []  # every measurement's schema was dropped


@pytest.mark.slow
def test_table_on_memory_store(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(bench, [*TINY, "--store", "memory://", "--output", str(out)])
    assert result.exit_code == 0, result.output
    for row in (
        "workflow_latency_p50_ms",
        "workflows_per_second.256",
        "durable_over_plain",
        "actor_recovery_full_ms",
        "plain_actor_over_queue",
        "timer_lateness_p99_ms",
        "suspended_workflow_bytes",
        "fanout_1000_seconds",
    ):
        assert row in result.stdout
    doc = json.loads(out.read_text())
    _check_figures(doc)
    assert doc["config"]["synchronous"] is None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:1/test",  # nothing listens there
        "postgres://h/db?schema=Not-A-Schema",
        "sqlite:///x.db?journal=wal",
        "sqlite:////no/such/dir/x.db",
    ],
)
def test_bad_store_url_is_a_usage_error(tmp_path: Path, url: str) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(bench, ["--store", url, "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert "--store" in result.output
    assert not out.exists()


def test_median_of_skips_runs_that_did_not_measure_a_figure() -> None:
    runs: list[dict[str, Any]] = [
        {"a": 1.0, "timers": {"timers": 10, "parked": 10}, "b": 5.0},
        {"a": 3.0},
        {"a": 2.0, "b": 7.0},
    ]
    assert median_of(runs) == {"a": 2.0, "timers": {"timers": 10, "parked": 10}, "b": 6.0}


@perdure.workflow
async def _sleeps_an_hour(ctx: perdure.Context) -> None:
    await ctx.sleep(timedelta(hours=1))


async def test_a_caller_that_stops_waiting_for_a_parked_workflow_leaves_nothing_behind() -> None:
    """The premise of suspended_workflow_bytes: a parked invocation holds no memory
    in the runtime, also after callers polled for its result and gave up."""
    clock = FakeClock(autojump=False)
    async with perdure.Runtime("memory://", workflows=[_sleeps_an_hour], clock=clock) as rt:
        handle = await rt.client.start(_sleeps_an_hour)
        while rt.stats.invocations_parked < 1:
            await asyncio.sleep(0.002)
        with pytest.raises(TimeoutError):
            await handle.result(timeout=0.2)  # polls the store a few times, then gives up
        assert rt.running(handle.id) is None
        assert rt._finish_waiters == {}
        assert rt._tasks == {}
        assert rt._contexts == {}
        assert not rt._notified
