"""One node of a multi-node Perdure cluster on PostgreSQL (tests/test_nodes_pg.py).

It runs the payment workflow (validate -> charge -> record -> credit the
customer's durable Account actor) as one node of several sharing the store,
until SIGTERM. Every step returns the node's id, so the test can tell which
node wrote each journaled result. The fake provider and ledger are SQLite
files in ``--dir`` shared by all nodes; the provider deduplicates charges by
the step key.

Run: ``python tests/crash/node_worker.py --store URL --dir DIR --node n1``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import perdure
from perdure import NodeConfig, Runtime

PARTITIONS = 8


@dataclasses.dataclass(frozen=True)
class Payment:
    payment_id: str
    customer: str
    amount_cents: int


@dataclasses.dataclass
class Balance:
    cents: int = 0
    payments: int = 0


class Account(perdure.Actor[Balance]):
    durability = perdure.DurabilityFacet(checkpoint_every=5)

    async def credit(self, ctx: perdure.Context, cents: int) -> int:
        self.state.cents += cents
        self.state.payments += 1
        return self.state.cents


class Provider:
    """Charges by idempotency key in a SQLite file shared by every node."""

    def __init__(self, path: Path, node: str, latency: float) -> None:
        self.node = node
        self.latency = latency
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT, payment TEXT, node TEXT, at REAL);"
            "CREATE TABLE IF NOT EXISTS charges (key TEXT PRIMARY KEY, payment TEXT, cents INT);"
        )

    def charge(self, payment: Payment) -> str:
        key = perdure.current_step().key
        time.sleep(self.latency / 2)  # the request on its way
        with self._lock:
            self._conn.execute(
                "INSERT INTO calls VALUES (?, ?, ?, ?)",
                (key, payment.payment_id, self.node, time.time()),
            )
            self._conn.execute(
                "INSERT OR IGNORE INTO charges VALUES (?, ?, ?)",
                (key, payment.payment_id, payment.amount_cents),
            )
        time.sleep(self.latency / 2)  # the answer on its way back
        return self.node


def build(provider: Provider) -> perdure.Workflow[[Payment], str]:
    node = provider.node

    @perdure.workflow(name="pay")
    async def pay(ctx: perdure.Context, payment: Payment) -> str:
        await ctx.run("validate", lambda: node)
        await ctx.run("charge", provider.charge, payment)
        await ctx.run("record", lambda: node)
        await ctx.actor(Account, payment.customer).ask(Account.credit, payment.amount_cents)
        return payment.payment_id

    return pay


def config(node: str, ttl: float) -> NodeConfig:
    return NodeConfig(
        node_id=node,
        partitions=PARTITIONS,
        lease_ttl=timedelta(seconds=ttl),
        renew_every=timedelta(seconds=ttl / 4),
        poll_every=timedelta(seconds=0.25),
    )


async def main(args: argparse.Namespace) -> None:
    provider = Provider(Path(args.dir) / "provider.db", args.node, args.latency)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    rt = Runtime(
        args.store, workflows=[build(provider)], actors=[Account], node=config(args.node, args.ttl)
    )
    async with rt:
        assert rt.nodes is not None
        print(f"READY {args.node} {sorted(rt.nodes.owned)}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--latency", type=float, default=0.2)
    asyncio.run(main(parser.parse_args()))
