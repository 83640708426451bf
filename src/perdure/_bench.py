"""``perdure bench``: how fast Perdure itself is.

Every measurement gets its own fresh store file and its own :class:`Runtime`
(in its own event loop), is warmed up first, and is timed with
:func:`time.perf_counter`. The payment provider and ledger live in memory
(:class:`MemoryProvider`, :class:`MemoryLedger`), so the figures measure
Perdure: journaling, group commit, the event loop and the thread hops, not a
fake provider's own I/O. Each figure is the median of ``--runs`` runs.

The workloads are importable (``bench/profile.py`` profiles them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import click
import msgspec

from ._context import Context
from ._demo.payments import (
    MemoryLedger,
    MemoryProvider,
    PaymentRequest,
    PaymentResult,
    build_payment_workflow,
    validate,
)
from ._errors import ConfigurationError
from ._runtime import Runtime
from ._workflow import Workflow, workflow
from .storage import open_store

DEFAULT_OUTPUT = "metrics/benchmark_results.json"
CONCURRENCIES = (1, 16, 64, 256)
STEPS_PER_WORKFLOW = 100
STEPS_CONCURRENCY = 64

T = TypeVar("T")


class BenchError(Exception):
    """A workload did not do what it should have: its figures would be wrong."""


# -- sizes ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each measurement does (per run)."""

    latency_workflows: int
    latency_warmup: int
    throughput_per_worker: dict[int, int]
    throughput_warmup_per_worker: int
    steps_workflows_per_worker: int
    step_latency_workflows: int
    plain_rounds: int

    def scaled(self, factor: float) -> Sizes:
        def s(n: int, least: int = 1) -> int:
            return max(least, round(n * factor))

        return Sizes(
            latency_workflows=s(self.latency_workflows, 5),
            latency_warmup=s(self.latency_warmup, 2),
            throughput_per_worker={c: s(n) for c, n in self.throughput_per_worker.items()},
            throughput_warmup_per_worker=s(self.throughput_warmup_per_worker),
            steps_workflows_per_worker=s(self.steps_workflows_per_worker),
            step_latency_workflows=s(self.step_latency_workflows),
            plain_rounds=s(self.plain_rounds, 5),
        )


FULL = Sizes(
    latency_workflows=3000,
    latency_warmup=200,
    throughput_per_worker={1: 2000, 16: 500, 64: 200, 256: 80},
    throughput_warmup_per_worker=2,
    steps_workflows_per_worker=8,
    step_latency_workflows=50,
    plain_rounds=50,
)
QUICK = Sizes(
    latency_workflows=300,
    latency_warmup=30,
    throughput_per_worker={1: 300, 16: 50, 64: 20, 256: 10},
    throughput_warmup_per_worker=1,
    steps_workflows_per_worker=2,
    step_latency_workflows=5,
    plain_rounds=50,
)


# -- stores --------------------------------------------------------------------


class StoreFactory:
    """Hands out a fresh store URL for every measurement.

    SQLite files go into a new temporary directory (inside the directory of
    the ``--store`` URL's file when one is given, so that the file system is
    the one asked for); every file is deleted once its measurement is done.
    """

    def __init__(self, url: str | None) -> None:
        self.requested = url
        self.memory = False
        self.synchronous: str | None = "full"
        parent: str | None = None
        if url is not None:
            try:
                open_store(url)  # validates the URL; opens nothing
            except ConfigurationError as exc:
                raise click.BadParameter(str(exc), param_hint="--store") from None
            parts = urlsplit(url)
            if parts.scheme.lower() == "memory":
                self.memory = True
                self.synchronous = None
            else:
                path = parts.path[1:] if parts.path.startswith("/") else parts.path
                parent = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(parent):
                    raise click.BadParameter(
                        f"the directory {parent} does not exist", param_hint="--store"
                    )
                options = dict(parse_qsl(parts.query))
                self.synchronous = options.get("synchronous", "full").lower()
        self._dir: str | None = None
        if not self.memory:
            self._dir = tempfile.mkdtemp(prefix="perdure-bench-", dir=parent)
        self._count = 0

    @property
    def directory(self) -> str | None:
        return self._dir

    @property
    def pattern(self) -> str:
        if self.memory:
            return "memory://"
        return f"sqlite:///{self._dir}/<measurement>.db?synchronous={self.synchronous}"

    @contextmanager
    def fresh(self, label: str) -> Iterator[str]:
        if self.memory or self._dir is None:
            yield "memory://"
            return
        self._count += 1
        path = os.path.join(self._dir, f"{self._count:03d}-{label}.db")
        try:
            yield f"sqlite:///{path}?synchronous={self.synchronous}"
        finally:
            for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
                try:
                    os.unlink(path + suffix)
                except FileNotFoundError:
                    pass

    def cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# -- workloads -----------------------------------------------------------------


def payment_request(tag: str) -> PaymentRequest:
    return PaymentRequest(
        payment_id=f"pay-{tag}", customer="cust-1", amount_cents=1999, card="4242424242424242"
    )


async def plain_payment(
    provider: MemoryProvider, ledger: MemoryLedger, request: PaymentRequest
) -> PaymentResult:
    """The payment workflow without Perdure: the same three calls, made directly."""
    validate(request)
    charge = provider.charge(
        f"{request.payment_id}:charge", request.payment_id, request.amount_cents
    )
    ledger.record(request.payment_id, charge)
    return PaymentResult(request.payment_id, charge.transaction_id, charge.status)


async def _step_async(i: int) -> int:
    return i


def _step_sync(i: int) -> int:
    return i


def build_steps_workflow(
    *, sync_steps: bool, timings: list[float] | None = None
) -> Workflow[[int], int]:
    """A workflow of ``n`` trivial journaled steps; appends each step's time to ``timings``."""
    step: Callable[[int], Any] = _step_sync if sync_steps else _step_async

    @workflow(name="bench_steps")
    async def bench_steps(ctx: Context, n: int) -> int:
        total = 0
        if timings is None:
            for i in range(n):
                total += await ctx.run("step", step, i)
        else:
            clock = time.perf_counter
            record = timings.append
            for i in range(n):
                began = clock()
                total += await ctx.run("step", step, i)
                record(clock() - began)
        return total

    return bench_steps


def _expect(what: str, got: int, want: int) -> None:
    if got != want:
        raise BenchError(f"{what}: expected {want}, got {got}; the figures would be wrong")


async def sequential_payments(url: str, count: int, warmup: int) -> tuple[list[float], float]:
    """``count`` payment workflows one at a time: (latency of each, total seconds)."""
    provider, ledger = MemoryProvider(), MemoryLedger()
    wf = build_payment_workflow(provider, ledger)
    async with Runtime(url, workflows=[wf]) as rt:
        run = rt.client.run
        for i in range(warmup):
            await run(wf, payment_request(f"w{i}"))
        clock = time.perf_counter
        latencies: list[float] = []
        began = clock()
        for i in range(count):
            t = clock()
            await run(wf, payment_request(str(i)))
            latencies.append(clock() - t)
        total = clock() - began
    _expect("payments recorded", len(ledger.rows), warmup + count)
    return latencies, total


async def concurrent_payments(
    url: str, concurrency: int, per_worker: int, warmup_per_worker: int
) -> float:
    """``concurrency`` workers each loop start+result ``per_worker`` times: seconds taken."""
    provider, ledger = MemoryProvider(), MemoryLedger()
    wf = build_payment_workflow(provider, ledger)
    async with Runtime(url, workflows=[wf]) as rt:
        client = rt.client

        async def worker(w: int, n: int, tag: str) -> None:
            for j in range(n):
                handle = await client.start(wf, payment_request(f"{tag}{w}-{j}"))
                await handle.result()

        await asyncio.gather(*(worker(w, warmup_per_worker, "w") for w in range(concurrency)))
        began = time.perf_counter()
        await asyncio.gather(*(worker(w, per_worker, "") for w in range(concurrency)))
        elapsed = time.perf_counter() - began
    _expect("payments recorded", len(ledger.rows), concurrency * (per_worker + warmup_per_worker))
    return elapsed


async def concurrent_steps(
    url: str, *, sync_steps: bool, concurrency: int, workflows_per_worker: int, steps: int
) -> float:
    """``concurrency`` workers each run ``steps``-step workflows: seconds taken."""
    wf = build_steps_workflow(sync_steps=sync_steps)
    async with Runtime(url, workflows=[wf]) as rt:
        client = rt.client

        async def worker(n: int) -> None:
            for _ in range(n):
                await client.run(wf, steps)

        await asyncio.gather(*(worker(1) for _ in range(concurrency)))  # warm-up
        before = rt.stats.steps_executed
        began = time.perf_counter()
        await asyncio.gather(*(worker(workflows_per_worker) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        _expect(
            "steps executed",
            rt.stats.steps_executed - before,
            concurrency * workflows_per_worker * steps,
        )
    return elapsed


async def sequential_steps(
    url: str, *, sync_steps: bool, workflows: int, steps: int
) -> list[float]:
    """``workflows`` ``steps``-step workflows, one at a time: the time of each step."""
    timings: list[float] = []
    wf = build_steps_workflow(sync_steps=sync_steps, timings=timings)
    async with Runtime(url, workflows=[wf]) as rt:
        await rt.client.run(wf, steps)  # warm-up
        timings.clear()
        for _ in range(workflows):
            await rt.client.run(wf, steps)
    _expect("steps timed", len(timings), workflows * steps)
    return timings


async def plain_payments(count: int, rounds: int) -> float:
    """Seconds per plain (non-durable) payment workflow, one at a time.

    Each round makes ``count`` payments (as many as the sequential durable row)
    on a fresh provider and ledger, so that their dicts are as big as the
    durable row's; the result is the median round's mean.
    """
    requests = [payment_request(str(i)) for i in range(count)]
    clock = time.perf_counter
    means: list[float] = []
    for _ in range(rounds + 1):  # the first round warms up
        provider, ledger = MemoryProvider(), MemoryLedger()
        began = clock()
        for r in requests:
            await plain_payment(provider, ledger, r)
        means.append((clock() - began) / count)
    return statistics.median(means[1:])


# -- the run -------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile."""
    ordered = sorted(values)
    k = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[k]


Progress = Callable[[str], None]


def run_once(stores: StoreFactory, sizes: Sizes, progress: Progress) -> dict[str, Any]:
    """One run of every measurement; each on its own fresh store and runtime."""

    def measure(label: str, fn: Callable[[str], Coroutine[Any, Any, T]]) -> T:
        gc.collect()
        with stores.fresh(label) as url:
            return asyncio.run(fn(url))

    m: dict[str, Any] = {}
    latencies, total = measure(
        "sequential",
        functools.partial(
            sequential_payments, count=sizes.latency_workflows, warmup=sizes.latency_warmup
        ),
    )
    m["workflow_latency_p50_ms"] = percentile(latencies, 50) * 1e3
    m["workflow_latency_p99_ms"] = percentile(latencies, 99) * 1e3
    m["durable_workflow_us"] = total / len(latencies) * 1e6
    progress(
        f"sequential payments: p50 {m['workflow_latency_p50_ms']:.3f} ms, "
        f"p99 {m['workflow_latency_p99_ms']:.3f} ms"
    )

    wps: dict[str, float] = {}
    for c in CONCURRENCIES:
        n = sizes.throughput_per_worker[c]
        elapsed = measure(
            f"payments-c{c}",
            functools.partial(
                concurrent_payments,
                concurrency=c,
                per_worker=n,
                warmup_per_worker=sizes.throughput_warmup_per_worker,
            ),
        )
        wps[str(c)] = c * n / elapsed
        progress(f"payments at concurrency {c}: {wps[str(c)]:,.0f} workflows/s")
    m["workflows_per_second"] = wps

    for sync_steps, suffix in ((False, ""), (True, "_sync")):
        kind = "sync" if sync_steps else "async"
        elapsed = measure(
            f"steps-{kind}",
            functools.partial(
                concurrent_steps,
                sync_steps=sync_steps,
                concurrency=STEPS_CONCURRENCY,
                workflows_per_worker=sizes.steps_workflows_per_worker,
                steps=STEPS_PER_WORKFLOW,
            ),
        )
        total_steps = STEPS_CONCURRENCY * sizes.steps_workflows_per_worker * STEPS_PER_WORKFLOW
        m[f"steps_per_second{suffix}"] = total_steps / elapsed
        timings = measure(
            f"step-latency-{kind}",
            functools.partial(
                sequential_steps,
                sync_steps=sync_steps,
                workflows=sizes.step_latency_workflows,
                steps=STEPS_PER_WORKFLOW,
            ),
        )
        m[f"step_latency_p50_ms{suffix}"] = percentile(timings, 50) * 1e3
        m[f"step_latency_p99_ms{suffix}"] = percentile(timings, 99) * 1e3
        progress(
            f"{kind} steps: {m[f'steps_per_second{suffix}']:,.0f} steps/s at concurrency "
            f"{STEPS_CONCURRENCY}, p50 {m[f'step_latency_p50_ms{suffix}']:.3f} ms sequential"
        )

    gc.collect()
    plain = asyncio.run(plain_payments(sizes.latency_workflows, sizes.plain_rounds))
    m["plain_workflow_us"] = plain * 1e6
    m["durable_over_plain"] = m["durable_workflow_us"] / m["plain_workflow_us"]
    progress(
        f"plain payments: {m['plain_workflow_us']:.2f} us each; "
        f"durable/plain {m['durable_over_plain']:,.0f}x"
    )
    return m


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure across runs (recursing into nested objects)."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = median_of([r[key] for r in runs])
        else:
            out[key] = statistics.median(r[key] for r in runs)
    return out


# -- targets and report ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    metric: str
    op: str  # ">=" or "<"
    value: float

    def met(self, figure: float) -> bool:
        return figure >= self.value if self.op == ">=" else figure < self.value


TARGETS: dict[str, Target] = {
    t.metric: t
    for t in (
        Target("steps_per_second", ">=", 40_000),
        Target("workflows_per_second.256", ">=", 8_000),
        Target("step_latency_p50_ms", "<", 0.4),
        Target("workflow_latency_p50_ms", "<", 1.5),
    )
}

# (metric path, unit) in table order; a dot walks into a nested object.
ROWS: list[tuple[str, str]] = [
    ("workflow_latency_p50_ms", "ms"),
    ("workflow_latency_p99_ms", "ms"),
    *((f"workflows_per_second.{c}", "wf/s") for c in CONCURRENCIES),
    ("steps_per_second", "steps/s"),
    ("steps_per_second_sync", "steps/s"),
    ("step_latency_p50_ms", "ms"),
    ("step_latency_p99_ms", "ms"),
    ("step_latency_p50_ms_sync", "ms"),
    ("step_latency_p99_ms_sync", "ms"),
    ("durable_workflow_us", "us"),
    ("plain_workflow_us", "us"),
    ("durable_over_plain", "x"),
]


def lookup(figures: dict[str, Any], path: str) -> float:
    value: Any = figures
    for part in path.split("."):
        value = value[part]
    return float(value)


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def target_report(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        path: {"op": t.op, "value": t.value, "met": t.met(lookup(figures, path))}
        for path, t in TARGETS.items()
    }


def print_table(figures: dict[str, Any], config: dict[str, Any], output: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"perdure bench — {config['store']} — median of {config['runs']} run(s)"
        + (" (quick)" if config["quick"] else "")
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("met?", justify="center")
    for path, unit in ROWS:
        value = lookup(figures, path)
        t = TARGETS.get(path)
        if t is None:
            table.add_row(path, f"{_fmt(value)} {unit}", "", "")
        else:
            ok = t.met(value)
            table.add_row(
                path,
                f"{_fmt(value)} {unit}",
                f"{t.op} {_fmt(t.value)}",
                "[green]yes[/green]" if ok else "[red]no[/red]",
            )
    console = Console()
    console.print(table)
    load = config.get("load_average_at_start")
    console.print(
        f"python {config['python']}, {config['cpu_count']} CPUs, "
        f"SQLite {config['sqlite_version']}, load average at start {load}, "
        f"{config['seconds']:.0f} s; written to {output}"
    )


def _load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages: other work on the machine skews the figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe_config(
    stores: StoreFactory, runs: int, quick: bool, scale: float, sizes: Sizes
) -> dict[str, Any]:
    from . import __version__

    return {
        "store": stores.requested or "sqlite (temporary file, synchronous=full)",
        "store_url": stores.pattern,
        "store_dir": stores.directory,
        "synchronous": stores.synchronous,
        "runs": runs,
        "quick": quick,
        "scale": scale,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": _load_average(),
        "perdure": __version__,
        "sqlite_version": sqlite3.sqlite_version,
        "msgspec": msgspec.__version__,
        "steps_per_workflow": STEPS_PER_WORKFLOW,
        "steps_concurrency": STEPS_CONCURRENCY,
        "sizes": {
            **dataclasses.asdict(sizes),
            "throughput_per_worker": {str(c): n for c, n in sizes.throughput_per_worker.items()},
        },
    }


# -- the command ---------------------------------------------------------------


@click.command("bench")
@click.option("--quick", is_flag=True, help="Smaller sizes: well under a minute in total.")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Runs of every measurement; each figure is their median.",
)
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    default=None,
    help="Store to measure, e.g. memory:// or 'sqlite:///x.db?synchronous=normal' (fresh "
    "files go into a temporary directory next to x.db). Default: a temporary SQLite "
    "file, synchronous=full.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=DEFAULT_OUTPUT,
    show_default=True,
    help="Where the JSON results are always written.",
)
@click.option(
    "--scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiply every workload size (e.g. 0.05 for a smoke test).",
)
def bench(
    quick: bool, runs: int, store_url: str | None, as_json: bool, output: str, scale: float
) -> None:
    """Measure Perdure's latency and throughput on a payment workflow and on steps."""
    from rich.console import Console

    err = Console(stderr=True)
    sizes = (QUICK if quick else FULL).scaled(scale)
    stores = StoreFactory(store_url)
    results: list[dict[str, Any]] = []
    try:
        config = describe_config(stores, runs, quick, scale, sizes)
        began = time.perf_counter()
        for r in range(runs):

            def progress(msg: str, r: int = r) -> None:
                err.print(f"[dim]run {r + 1}/{runs}[/dim] {msg}", highlight=False)

            results.append(run_once(stores, sizes, progress))
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        stores.cleanup()
    config["seconds"] = round(time.perf_counter() - began, 3)
    config["load_average_at_end"] = _load_average()
    figures = median_of(results)
    document: dict[str, Any] = {
        **figures,
        "targets": target_report(figures),
        "samples": results,
        "config": config,
    }
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(document))
    else:
        print_table(figures, config, str(path))


if __name__ == "__main__":
    bench()
