"""The cost of perdure.observability: the payment workflow with tracing and
metrics on, against the same workload with them off, side by side.

    .venv/bin/python bench/observability_overhead.py              # SQLite, synchronous=full
    .venv/bin/python bench/observability_overhead.py --store memory://
    .venv/bin/python bench/observability_overhead.py --rounds 5 --count 400

It reports CPU time of this process per workflow (every thread: the loop,
the step pool, the SQLite committer, the span processor), which other load
on a shared machine disturbs far less than wall-clock time; durable I/O
waits (fsync) are not in it. Each round runs the workload off, then on, each
on a fresh store: tracing goes to a BatchSpanProcessor whose exporter drops
the spans (so the figure is Perdure's cost plus the SDK's span bookkeeping,
not an exporter's I/O), metrics into the runtime's registry. The ratios are
of the medians over rounds. ``--sample 0.1`` samples a tenth of the traces.
Needs the ``otel`` and ``metrics`` extras (``pip install -e '.[dev]'`` has them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from perdure import Runtime, observability
from perdure._bench import payment_request
from perdure._demo.payments import MemoryLedger, MemoryProvider, build_payment_workflow


class Discard(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


async def workload(
    url: str, observed: bool, count: int, concurrency: int, what: str, sample: float = 1.0
) -> tuple[float, int]:
    """CPU seconds per payment workflow (``concurrency`` at a time), and spans made."""
    provider, ledger = MemoryProvider(), MemoryLedger()
    wf = build_payment_workflow(provider, ledger)
    rt = Runtime(url, workflows=[wf])
    exporter = Discard()
    tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample)))
    if observed and what in ("both", "tracing"):
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        observability.instrument(rt, tracer_provider=tracer_provider)
    if observed and what in ("both", "metrics"):
        observability.enable_metrics(rt)
    async with rt:

        async def worker(w: int, n: int, tag: str) -> None:
            for j in range(n):
                await rt.client.run(wf, payment_request(f"{tag}{w}-{j}"))

        per_worker = max(1, count // concurrency)
        await asyncio.gather(*(worker(w, 5, "warm") for w in range(concurrency)))
        began = time.process_time()
        await asyncio.gather(*(worker(w, per_worker, "") for w in range(concurrency)))
        elapsed = time.process_time() - began
    tracer_provider.shutdown()  # flushes the batch processor
    return elapsed / (per_worker * concurrency), exporter.spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=None, help="memory:// (default: a temporary SQLite)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=300, help="workflows per measurement")
    parser.add_argument(
        "--sample", type=float, default=1.0, help="fraction of traces sampled (default all)"
    )
    parser.add_argument(
        "--what", choices=["both", "tracing", "metrics"], default="both", help="what is on"
    )
    args = parser.parse_args()
    results: dict[tuple[int, bool], list[float]] = {}
    spans = 0
    with tempfile.TemporaryDirectory(prefix="perdure-obs-") as tmp:
        for r in range(args.rounds):
            for concurrency in (1, 64):
                for observed in (False, True):
                    url = args.store or f"sqlite:///{os.path.join(tmp, f'{r}-{concurrency}')}"
                    if url.startswith("sqlite"):
                        url += f"-{observed}.db"
                    seconds, made = asyncio.run(
                        workload(url, observed, args.count, concurrency, args.what, args.sample)
                    )
                    results.setdefault((concurrency, observed), []).append(seconds)
                    spans = max(spans, made)
    store = args.store or "sqlite (synchronous=full)"
    sampled = "" if args.sample == 1 else f", {args.sample:g} of traces sampled"
    print(f"{args.what} on vs off{sampled}; store: {store}; medians of {args.rounds} rounds")
    print(f"{'concurrency':>11} {'off (ms CPU/wf)':>16} {'on (ms CPU/wf)':>15} {'on/off':>7}")
    for concurrency in (1, 64):
        off = statistics.median(results[(concurrency, False)])
        on = statistics.median(results[(concurrency, True)])
        print(f"{concurrency:>11} {off * 1e3:>16.3f} {on * 1e3:>15.3f} {on / off:>7.2f}")
    print(f"spans per measured run with tracing on: {spans}")


if __name__ == "__main__":
    main()
