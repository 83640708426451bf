"""Several node processes on one PostgreSQL: throughput by node count, and failover time.

    .venv/bin/python bench/nodes.py [--dsn postgresql://postgres@127.0.0.1:5432/test] [--json]

Each node is a tests/crash/node_worker.py process (the payment workflow:
validate -> charge -> record -> credit the customer's durable Account actor,
with a zero-latency fake provider here). A client runtime that runs nothing
itself (``recover=False``) submits the payments; they are routed to the node
that holds each partition.

- ``pg_workflows_per_second``: payments completed per second with 1 and 2
  node processes, all submitted at once, timed from the first submission to
  the last completion (so it includes routing through the store and
  LISTEN/NOTIFY); p50/p99 of each payment's submit-to-complete latency.
- ``failover_seconds``: two nodes with payments in flight (a slow provider);
  one is SIGKILLed; the time from the kill until every payment that was in
  flight on it has completed on the other. Bounded below by the lease
  timeout (stated in the output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "crash"))

from node_worker import Account, Payment, Provider, build, config  # noqa: E402

from perdure import Runtime, Status  # noqa: E402
from perdure.storage._postgres import drop_schema, with_schema  # noqa: E402

WORKER = ROOT / "tests" / "crash" / "node_worker.py"
TTL = 2.0


def spawn(url: str, directory: str, node: str, latency: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            "--store",
            url,
            "--dir",
            directory,
            "--node",
            node,
            "--ttl",
            str(TTL),
            "--latency",
            str(latency),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise SystemExit(f"node {node} did not start: {line!r}")
    return proc


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
        if p.stdout is not None:
            p.stdout.close()


async def spread(rt: Runtime, nodes: int) -> None:
    for _ in range(100):
        now = time.time()
        owners = {x.owner for x in await rt.store.list_leases() if x.owner and x.expires_at > now}
        if len(owners) == nodes:
            return
        await asyncio.sleep(0.1)


async def throughput(dsn: str, nodes: int, payments: int) -> dict[str, Any]:
    url = with_schema(dsn, f"bench_nodes_{uuid.uuid4().hex[:12]}")
    with tempfile.TemporaryDirectory() as d:
        procs = [spawn(url, d, f"n{i}", 0.0) for i in range(nodes)]
        try:
            rt = Runtime(
                url,
                workflows=[build(Provider(Path(d) / "provider.db", "client", 0.0))],
                actors=[Account],
                node=config("client", TTL),
                recover=False,
            )
            async with rt:
                await spread(rt, nodes)
                began = time.perf_counter()
                handles = []
                sent: dict[str, float] = {}
                for i in range(payments):
                    p = Payment(f"p{i:05d}", f"c{i % 50}", 100 + i)
                    sent[p.payment_id] = time.perf_counter()
                    handles.append(await rt.client.start("pay", p, idempotency_key=p.payment_id))
                latencies = []
                while True:
                    done = await rt.client.list(status=Status.COMPLETED, workflow="pay", limit=None)
                    if len(done) >= payments:
                        break
                    await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - began
                for r in done:
                    latencies.append(r.updated_at - r.created_at)
        finally:
            stop(procs)
            drop_schema(url)
    latencies.sort()
    return {
        "nodes": nodes,
        "payments": payments,
        "seconds": round(elapsed, 3),
        "workflows_per_second": round(payments / elapsed, 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


async def failover(dsn: str, payments: int) -> dict[str, Any]:
    url = with_schema(dsn, f"bench_failover_{uuid.uuid4().hex[:12]}")
    with tempfile.TemporaryDirectory() as d:
        procs = [spawn(url, d, f"n{i}", 1.0) for i in range(2)]
        try:
            rt = Runtime(
                url,
                workflows=[build(Provider(Path(d) / "provider.db", "client", 0.0))],
                actors=[Account],
                node=config("client", TTL),
                recover=False,
            )
            async with rt:
                await spread(rt, 2)
                leases = {x.partition: x.owner for x in await rt.store.list_leases()}
                for i in range(payments):
                    p = Payment(f"f{i:04d}", f"c{i % 10}", 100 + i)
                    await rt.client.start("pay", p, idempotency_key=p.payment_id)
                await asyncio.sleep(0.3)  # both nodes have work in flight (1 s charges)
                victims = [
                    r.id
                    for r in await rt.client.list(workflow="pay", limit=None)
                    if leases.get(r.partition) == "n1" and not r.status.finished
                ]
                procs[1].send_signal(signal.SIGKILL)
                killed = time.perf_counter()
                while True:
                    left = [
                        i
                        for i in victims
                        if not (await rt.store.get_invocation(i)).status.finished  # type: ignore[union-attr]
                    ]
                    if not left:
                        break
                    await asyncio.sleep(0.02)
                seconds = time.perf_counter() - killed
        finally:
            stop(procs)
            drop_schema(url)
    return {
        "failover_seconds": round(seconds, 3),
        "lease_ttl_seconds": TTL,
        "in_flight_on_the_killed_node": len(victims),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PERDURE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--payments", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {"pg_workflows_per_second": {}}
    for n in (1, 2):
        row = await throughput(args.dsn, n, args.payments)
        result["pg_workflows_per_second"][str(n)] = row
    result.update(await failover(args.dsn, 200))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for n, row in result["pg_workflows_per_second"].items():
        print(
            f"{n} node(s): {row['workflows_per_second']} payment workflows/s "
            f"(p50 {row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms, "
            f"{row['payments']} payments)"
        )
    print(
        f"failover: {result['failover_seconds']} s with a {TTL} s lease "
        f"({result['in_flight_on_the_killed_node']} payments in flight on the killed node)"
    )


if __name__ == "__main__":
    asyncio.run(main())
