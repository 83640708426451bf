"""Several node processes on one PostgreSQL: the payment service as a cluster.

Two things use it: ``perdure bench --store postgresql://...`` (its node rows)
and the multi-node tests (tests/test_nodes_pg.py), which kill, pause and
restart what runs here.

A node is ``python -m perdure._bench_nodes --store URL --dir DIR --node n1``:
a runtime with ``node=`` running the payment workflow (validate -> charge ->
record -> credit the customer's durable ``Account`` actor) until SIGTERM.
Every step returns the node's id, so a test can tell which node wrote each
journaled result. The provider is a SQLite file in ``DIR`` shared by every
node, which records each call and deduplicates charges by the step key: the
count of charges per payment is what "charged exactly once" is checked on.

The measurements (:func:`throughput`, :func:`failover`) submit the payments
through a client runtime that runs nothing itself (``recover=False``), so
every payment is routed through the store to the node holding its partition.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from ._actor import Actor, DurabilityFacet
from ._context import Context, current_step
from ._demo.payments import (
    Charge,
    MemoryLedger,
    MemoryProvider,
    PaymentRequest,
    build_payment_workflow,
)
from ._nodes import NodeConfig
from ._runtime import Runtime
from ._workflow import Workflow, workflow

log = logging.getLogger("perdure.bench.nodes")

PARTITIONS = 8
CONCURRENCY = 256  # payments submitted at once in the throughput rows


@dataclasses.dataclass(frozen=True)
class Payment:
    payment_id: str
    customer: str
    amount_cents: int


@dataclasses.dataclass
class Balance:
    cents: int = 0
    payments: int = 0


class Account(Actor[Balance]):
    durability = DurabilityFacet(checkpoint_every=5)

    async def credit(self, ctx: Context, cents: int) -> int:
        self.state.cents += cents
        self.state.payments += 1
        return self.state.cents


class Provider:
    """Charges by idempotency key, in a SQLite file shared by every node.

    ``latency`` seconds pass around each call (half before it is recorded,
    half after), so that a test can kill a node while charges are in flight.
    """

    def __init__(self, path: Path, node: str, latency: float) -> None:
        self.node = node
        self.latency = latency
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        # A killed process loses nothing the OS has: no fsync per charge.
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.executescript(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT, payment TEXT, node TEXT, at REAL);"
            "CREATE TABLE IF NOT EXISTS charges (key TEXT PRIMARY KEY, payment TEXT, cents INT);"
        )

    def charge(self, payment: Payment) -> str:
        key = current_step().key
        if self.latency:
            time.sleep(self.latency / 2)  # the request on its way
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "INSERT INTO calls VALUES (?, ?, ?, ?)",
                (key, payment.payment_id, self.node, time.time()),
            )
            self._conn.execute(
                "INSERT OR IGNORE INTO charges VALUES (?, ?, ?)",
                (key, payment.payment_id, payment.amount_cents),
            )
            self._conn.execute("COMMIT")
        if self.latency:
            time.sleep(self.latency / 2)  # the answer on its way back
        return self.node


def charges(directory: Path) -> tuple[dict[str, int], list[tuple[str, str, str, float]]]:
    """(charges per payment, every call as (step key, payment, node, time))."""
    with contextlib.closing(sqlite3.connect(directory / "provider.db")) as conn:
        per_payment = dict(conn.execute("SELECT payment, count(*) FROM charges GROUP BY 1"))
        calls = conn.execute("SELECT key, payment, node, at FROM calls").fetchall()
    return per_payment, calls


def build(provider: Provider) -> Workflow[[Payment], str]:
    node = provider.node

    @workflow(name="pay")
    async def pay(ctx: Context, payment: Payment) -> str:
        await ctx.run("validate", lambda: node)
        await ctx.run("charge", provider.charge, payment)
        await ctx.run("record", lambda: node)
        await ctx.actor(Account, payment.customer).ask(Account.credit, payment.amount_cents)
        return payment.payment_id

    return pay


class _SlowProvider(MemoryProvider):
    """The benchmark's in-memory provider, with ``latency`` seconds per charge."""

    def __init__(self, latency: float) -> None:
        super().__init__()
        self.latency = latency

    def charge(self, key: str, payment_id: str, cents: int) -> Charge:
        if self.latency:
            time.sleep(self.latency)
        return super().charge(key, payment_id, cents)


def workflows(workload: str, directory: Path, node: str, latency: float) -> list[Any]:
    """``accounts``: the payment workflow of the multi-node tests (a shared
    SQLite provider, and a durable Account actor per customer); ``payments``:
    the payment workflow of ``perdure bench`` (validate, charge, record; the
    provider and ledger in memory, so the figures measure Perdure)."""
    if workload == "payments":
        return [build_payment_workflow(_SlowProvider(latency), MemoryLedger())]
    return [build(Provider(directory / "provider.db", node, latency))]


def request(tag: str) -> PaymentRequest:
    return PaymentRequest(
        payment_id=f"pay-{tag}", customer="cust-1", amount_cents=1999, card="4242424242424242"
    )


def config(node: str, ttl: float | None) -> NodeConfig:
    """The node settings: Perdure's defaults, or (``ttl``) a short lease for tests."""
    if ttl is None:
        return NodeConfig(node_id=node, partitions=PARTITIONS)
    return NodeConfig(
        node_id=node,
        partitions=PARTITIONS,
        lease_ttl=timedelta(seconds=ttl),
        renew_every=timedelta(seconds=ttl / 4),
        poll_every=timedelta(seconds=0.25),
    )


def client(url: str, directory: Path, ttl: float | None, workload: str = "accounts") -> Runtime:
    """A runtime that submits payments and runs none of them."""
    return Runtime(
        url,
        workflows=workflows(workload, directory, "client", 0.0),
        actors=[Account],
        node=config("client", ttl),
        recover=False,
    )


class Cluster:
    """Node processes on one store, started and signalled by name."""

    def __init__(
        self, url: str, directory: Path, ttl: float | None, workload: str = "accounts"
    ) -> None:
        self.url = url
        self.directory = directory
        self.ttl = ttl
        self.workload = workload
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def spawn(self, node: str, latency: float = 0.0) -> None:
        command = [sys.executable, "-m", "perdure._bench_nodes", "--store", self.url]
        command += ["--dir", str(self.directory), "--node", node, "--latency", str(latency)]
        command += ["--workload", self.workload]
        if self.ttl is not None:
            command += ["--ttl", str(self.ttl)]
        # The node's log goes to a file: a pipe nobody reads fills up, and a
        # node writing to a full pipe stops dead.
        log = self.log_path(node)
        with open(log, "a") as stderr:
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"node {node} did not start: {line!r}\n{log.read_text()}")
        self.procs[node] = proc

    def log_path(self, node: str) -> Path:
        return self.directory / f"{node}.log"

    def logs(self, tail: int = 400) -> str:
        """The last lines of every node's log, for a failure's report (a live
        node first logs where its tasks wait)."""
        for node, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                self.signal(node, signal.SIGUSR1)
        time.sleep(1.0)
        parts = []
        for node in self.procs:
            lines = self.log_path(node).read_text(errors="replace").splitlines()
            parts.append(f"--- {node} ({len(lines)} lines) ---\n" + "\n".join(lines[-tail:]))
        return "\n".join(parts)

    def signal(self, node: str, sig: signal.Signals) -> None:
        self.procs[node].send_signal(sig)

    def alive(self, node: str) -> bool:
        return self.procs[node].poll() is None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@contextlib.contextmanager
def cluster(url: str, ttl: float | None, workload: str) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="perdure-nodes-") as d:
        c = Cluster(url, Path(d), ttl, workload)
        try:
            yield c
        finally:
            c.stop()


async def owners(rt: Runtime) -> set[str]:
    """The nodes holding a lease that has not expired."""
    now = time.time()
    return {x.owner for x in await rt.store.list_leases() if x.owner and x.expires_at > now}


async def spread(rt: Runtime, nodes: set[str], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while await owners(rt) != nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the partitions did not spread over {sorted(nodes)}")
        await asyncio.sleep(0.05)


async def throughput(
    url: str, *, nodes: int, per_worker: int, concurrency: int = CONCURRENCY
) -> dict[str, float]:
    """The benchmark's payment workflow on ``nodes`` node processes:
    ``concurrency`` client workers each start a payment and wait for its
    result, ``per_worker`` times (after one warm-up each), through a client
    node that runs none (so every payment is routed through the store, and
    its end announced back). Payments/s, and each one's latency p50/p99 as
    the client sees it."""
    with cluster(url, None, "payments") as c:
        for i in range(nodes):
            c.spawn(f"n{i}")
        async with client(url, c.directory, None, "payments") as rt:
            await spread(rt, set(c.procs))
            latencies: list[float] = []

            async def worker(w: int, n: int, tag: str) -> None:
                for j in range(n):
                    began = time.perf_counter()
                    handle = await rt.client.start("process_payment", request(f"{tag}{w}-{j}"))
                    await handle.result()
                    latencies.append(time.perf_counter() - began)

            await asyncio.gather(*(worker(w, 1, "w") for w in range(concurrency)))
            latencies.clear()
            began = time.perf_counter()
            await asyncio.gather(*(worker(w, per_worker, "p") for w in range(concurrency)))
            elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "workflows_per_second": len(latencies) / elapsed,
        "latency_p50_ms": latencies[len(latencies) // 2] * 1e3,
        "latency_p99_ms": latencies[max(0, -(-len(latencies) * 99 // 100) - 1)] * 1e3,
    }


async def failover(url: str, *, payments: int, latency: float) -> dict[str, float]:
    """Two nodes with Perdure's default lease settings and payments in flight
    (charges of ``latency`` s); one is SIGKILLed. The seconds from the kill
    until the other holds every partition, and until every payment that was
    unfinished on the killed node has completed there."""
    defaults = NodeConfig()
    with cluster(url, None, "payments") as c:
        c.spawn("n0", latency)
        c.spawn("n1", latency)
        async with client(url, c.directory, None, "payments") as rt:
            await spread(rt, {"n0", "n1"})
            leases = {x.partition: x.owner for x in await rt.store.list_leases()}
            for i in range(payments):
                await rt.client.start("process_payment", request(f"f{i}"))
            await asyncio.sleep(latency / 2)  # both nodes have charges in flight
            victims = [
                r.id
                for r in await rt.client.list(workflow="process_payment", limit=None)
                if leases.get(r.partition) == "n1" and not r.status.finished
            ]
            if not victims:
                raise RuntimeError("no payment was in flight on the node to kill")
            c.signal("n1", signal.SIGKILL)
            killed = time.perf_counter()
            while True:
                held = await rt.store.list_leases()
                if await owners(rt) == {"n0"} and len(held) == PARTITIONS:
                    break
                await asyncio.sleep(0.01)
            takeover = time.perf_counter() - killed
            for invocation_id in victims:
                await (await rt.client.get(invocation_id)).result(timeout=60)
            seconds = time.perf_counter() - killed
    return {
        "failover_seconds": seconds,
        "takeover_seconds": takeover,
        "in_flight": float(len(victims)),
        "lease_ttl_seconds": defaults.lease_ttl.total_seconds(),
        "renew_every_seconds": defaults.renew_every.total_seconds(),
        "charge_seconds": latency,
    }


def dump_tasks(rt: Runtime) -> None:
    """SIGUSR1: log where every task of the node waits, down the chain of
    awaits (for a stuck test's report)."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        out.write(f"{task.get_name()}:\n")
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                out.write(
                    f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}\n"
                )
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
            if coro is not None and not hasattr(coro, "cr_frame") and not hasattr(coro, "gi_frame"):
                out.write(f"    awaiting {coro!r}\n"[:300])
                break
    for (actor_type, key), a in rt._activations.items():
        task = a.task
        state = "running" if not task.done() else "cancelled" if task.cancelled() else "ended"
        if state == "ended":
            state += f": {task.exception()!r}"
        out.write(f"activation {actor_type}/{key}: mailbox {len(a.mailbox)}, ")
        out.write(f"stopped {a.stopped!r}, task {state}\n")
    out.write(f"stopped here: {rt._stopped!r}\n"[:2000])
    log.warning("tasks:\n%s", out.getvalue())


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    rt = Runtime(
        args.store,
        workflows=workflows(args.workload, Path(args.dir), args.node, args.latency),
        actors=[Account],
        node=config(args.node, args.ttl),
    )
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks, rt)
    async with rt:
        assert rt.nodes is not None
        print(f"READY {args.node} {sorted(rt.nodes.owned)}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="One node of the payment service cluster.")
    parser.add_argument("--store", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--ttl", type=float, default=None, help="lease seconds (default: 3)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per charge")
    parser.add_argument("--workload", choices=["accounts", "payments"], default="accounts")
    asyncio.run(main(parser.parse_args()))
