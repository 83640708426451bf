"""Several node processes on one real PostgreSQL server: one is SIGKILLed,
another SIGSTOPped past its lease (a zombie) and then SIGCONTed, and the
server itself restarts mid-run. Every payment completes once, is charged
once, no step result is written by the zombie after it lost its leases,
and every account's balance is exact.

The nodes are ``python -m perdure._bench_nodes`` processes (the payment
service that ``perdure bench`` also runs as a cluster); this test submits the
payments through a runtime that runs nothing itself (``recover=False``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conftest import pg_query
from perdure import Runtime, Status
from perdure._bench_nodes import Account, Cluster, Payment, charges, client, owners
from perdure.storage import EntryKind
from perdure.storage._records import UNFINISHED

pytestmark = pytest.mark.slow
TTL = 2.0


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(pg_url, tmp_path, TTL)
    try:
        yield c
    finally:
        c.stop()


async def wait_for(check: Any, what: str, seconds: float, cluster: Cluster | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except Exception:  # the database restarting: look again
            pass
        await asyncio.sleep(0.1)
    report = "" if cluster is None else await stuck(cluster)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}{report}")


async def stuck(cluster: Cluster) -> str:
    """What a timeout's message says: the unfinished invocations, their
    journals' last entries, the leases, and the nodes' logs."""
    lines = []
    async with Runtime(cluster.url, recover=False, actors=[Account]) as rt:
        for rec in await rt.store.list_invocations(statuses=UNFINISHED, limit=None):
            journal = await rt.store.read_journal(rec.id)
            last = [(e.index, e.kind.value, e.name) for e in journal[-2:]]
            lines.append(f"{rec.id} {rec.target} {rec.status.value} part {rec.partition}: {last}")
        lines += [
            f"lease {x.partition}: {x.owner} epoch {x.epoch}" for x in await rt.store.list_leases()
        ]
    return "\n" + "\n".join(lines) + "\n" + cluster.logs()


async def completed(rt: Runtime, n: int) -> bool:
    done = await rt.client.list(status=Status.COMPLETED, workflow="pay", limit=None)
    return len(done) >= n


async def check_outcome(rt: Runtime, payments: list[Payment], directory: Path) -> None:
    records = await rt.client.list(workflow="pay", limit=None)
    assert len(records) == len(payments)
    assert all(r.status is Status.COMPLETED for r in records), [r.status for r in records]
    per_payment, _ = charges(directory)
    assert per_payment == {p.payment_id: 1 for p in payments}  # each charged exactly once
    for customer in {p.customer for p in payments}:
        mine = [p for p in payments if p.customer == customer]
        state = await rt.client.actor(Account, customer).state_at()
        assert (state.cents, state.payments) == (sum(p.amount_cents for p in mine), len(mine))


async def test_three_nodes_survive_a_kill_and_a_zombie(cluster: Cluster, pg_url: str) -> None:
    for node in ("n1", "n2", "n3"):
        # A 1 s charge (about 4 s of charging per node) keeps work in flight
        # on the nodes when they are stopped.
        cluster.spawn(node, latency=1.0)
    payments = [Payment(f"p{i:03d}", f"c{i % 5}", 100 + i) for i in range(60)]
    async with client(pg_url, cluster.directory, TTL) as rt:

        async def spread() -> bool:
            return await owners(rt) == {"n1", "n2", "n3"}

        await wait_for(spread, "the partitions to spread over three nodes", 15)
        for p in payments:
            await rt.client.start("pay", p, idempotency_key=p.payment_id)

        async def a_quarter() -> bool:
            return await completed(rt, len(payments) // 4)

        await wait_for(a_quarter, "a quarter of the payments", 30)
        cluster.signal("n2", signal.SIGKILL)
        cluster.signal("n3", signal.SIGSTOP)
        stopped_at = time.time()
        unfinished = len(payments) - len(
            await rt.client.list(status=Status.COMPLETED, workflow="pay", limit=None)
        )
        assert unfinished > 0  # the stopped nodes had work in flight

        async def all_done() -> bool:
            return await completed(rt, len(payments))

        async def taken_over() -> bool:  # n1 holds both nodes' partitions
            return await owners(rt) == {"n1"}

        await wait_for(all_done, "every payment, on the surviving node", 60, cluster)
        await wait_for(taken_over, "n1 to take over every partition", 4 * TTL, cluster)
        cluster.signal("n3", signal.SIGCONT)
        await asyncio.sleep(TTL)  # the zombie wakes up, tries to write, is fenced out

        await check_outcome(rt, payments, cluster.directory)
        # No step result written by the zombie after it was stopped (its
        # in-flight steps ended after its lease was taken: they were refused).
        schema = pg_url.rpartition("schema=")[2]
        rows = pg_query(
            pg_url,
            f"SELECT invocation_id, idx, payload, created_at FROM {schema}.journal "
            f"WHERE kind = '{EntryKind.STEP.value}'",
        )
        late = [
            (inv, idx)
            for inv, idx, payload, at in rows
            if msgspec.json.decode(bytes(payload)) == "n3" and at >= stopped_at
        ]
        assert late == []
        # Every committed charge step's key was charged; a repeated call is a
        # step that had not committed, deduplicated by its key.
        _, calls = charges(cluster.directory)
        assert {key for key, *_ in calls} == {
            f"{inv}:{idx}" for inv, idx, payload, _ in rows if idx == 2
        }
    assert cluster.procs["n1"].poll() is None


@pytest.mark.skipif(shutil.which("pg_ctlcluster") is None, reason="needs pg_ctlcluster")
@pytest.mark.skipif(
    os.environ.get("PERDURE_RESTART_TESTS") != "1",
    reason="restarts the shared PostgreSQL server: PERDURE_RESTART_TESTS=1",
)
async def test_nodes_reconnect_after_the_database_restarts(cluster: Cluster, pg_url: str) -> None:
    for node in ("n1", "n2"):
        cluster.spawn(node, latency=0.2)
    payments = [Payment(f"r{i:03d}", f"c{i % 3}", 200 + i) for i in range(40)]
    async with client(pg_url, cluster.directory, TTL) as rt:
        for p in payments[:20]:
            await rt.client.start("pay", p, idempotency_key=p.payment_id)

        async def some() -> bool:
            return await completed(rt, 5)

        await wait_for(some, "the first payments", 30)
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        await asyncio.to_thread(
            subprocess.run,
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
            check=True,
            timeout=60,
        )
        for p in payments[20:]:
            for _ in range(50):  # the client's own connections come back too
                try:
                    await rt.client.start("pay", p, idempotency_key=p.payment_id)
                    break
                except Exception:
                    await asyncio.sleep(0.2)

        async def all_done() -> bool:
            return await completed(rt, len(payments))

        await wait_for(all_done, "every payment after the restart", 90, cluster)
        await check_outcome(rt, payments, cluster.directory)
