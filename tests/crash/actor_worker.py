"""The child process of the actor crash tests (tests/test_actor_crash.py).

It sends a plan of deposits to a few durable ``Account`` actors on a SQLite
store. Each deposit calls an external bank (its own SQLite file) with the
step key, like the payment provider of ``perdure._demo.payments``: every
call is logged, and the effect is recorded once per step key.

``crash`` mode SIGKILLs the process at a chosen point for a chosen deposit;
``recover`` mode opens the same store (the runtime resumes the actors with
unfinished messages), re-sends the whole plan with the same idempotency
keys, waits for every reply and writes balances, histories and stats to
``results-recover.json``. ``reference`` mode is an uncrashed run.

Run: ``python tests/crash/actor_worker.py --dir DIR --mode crash --point
after_step --message dep-013``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import perdure
from perdure import Runtime, current_step
from perdure.testing import Hooks, StepInfo

POINTS = ("before_step", "after_step", "after_output", "batch_commit")
KEYS = ("k0", "k1", "k2", "k3")
RESULT_TIMEOUT = 60.0


def plan(n: int) -> list[tuple[str, str, int]]:
    """(message id, actor key, cents): the same in every process."""
    return [(f"dep-{i:03d}", KEYS[i % len(KEYS)], 100 + 7 * i) for i in range(n)]


class Bank:
    """The external side: logs every call, applies each step key's effect once."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS calls (
                seq INTEGER PRIMARY KEY, step_key TEXT NOT NULL,
                actor_key TEXT NOT NULL, cents INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS effects (
                step_key TEXT PRIMARY KEY, actor_key TEXT NOT NULL, cents INTEGER NOT NULL);
            """
        )

    def credit(self, step_key: str, actor_key: str, cents: int) -> int:
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            c.execute(
                "INSERT INTO calls (step_key, actor_key, cents) VALUES (?, ?, ?)",
                (step_key, actor_key, cents),
            )
            c.execute(
                "INSERT OR IGNORE INTO effects VALUES (?, ?, ?)", (step_key, actor_key, cents)
            )
            (applied,) = c.execute(
                "SELECT cents FROM effects WHERE step_key = ?", (step_key,)
            ).fetchone()
            c.execute("COMMIT")
        return int(applied)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


BANK: Bank | None = None


def credit(actor_key: str, cents: int) -> int:
    assert BANK is not None
    return BANK.credit(current_step().key, actor_key, cents)


@dataclasses.dataclass
class Balance:
    cents: int = 0
    history: list[int] = dataclasses.field(default_factory=list)


def make_account(checkpoint_every: int) -> type[perdure.Actor[Balance]]:
    class Account(perdure.Actor[Balance]):
        actor_name = "Account"
        durability = perdure.DurabilityFacet(checkpoint_every=checkpoint_every)

        async def deposit(self, ctx: Any, cents: int) -> int:
            got = await ctx.run("credit", credit, self.key, cents)
            self.state.cents += got
            self.state.history.append(got)
            return self.state.cents

        async def summary(self, ctx: Any) -> list[int]:
            return [self.state.cents, *self.state.history]

    return Account


class Crash:
    def __init__(self, directory: Path, point: str, message: str, min_batch: int) -> None:
        self.directory = directory
        self.point = point
        self.message = message
        self.min_batch = min_batch
        self.owner: dict[str, str] = {}  # invocation id -> message id
        self.steps_committed = 0
        self._lock = threading.Lock()

    def matches(self, invocation_id: str) -> bool:
        return self.owner.get(invocation_id) == self.message

    def die(self, **where: Any) -> None:
        with self._lock:
            marker = {"point": self.point, "pid": os.getpid(), **where}
            tmp = self.directory / "crash.json.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, self.directory / "crash.json")
            os.kill(os.getpid(), signal.SIGKILL)


def make_hooks(crash: Crash | None) -> Hooks:
    if crash is None:
        return Hooks()

    def before_step(info: StepInfo) -> None:
        if crash.point == "before_step" and crash.matches(info.invocation_id):
            crash.die(inv=info.invocation_id, key=info.key)

    def after_step(info: StepInfo) -> None:
        crash.steps_committed += 1
        if crash.point == "after_step" and crash.matches(info.invocation_id):
            crash.die(inv=info.invocation_id, key=info.key)

    def after_output(invocation_id: str) -> None:
        if crash.point == "after_output" and crash.matches(invocation_id):
            crash.die(inv=invocation_id)

    def before_batch_commit(size: int) -> None:
        if (
            crash.point == "batch_commit"
            and crash.steps_committed >= crash.min_batch
            and size >= crash.min_batch
        ):
            crash.die(size=size, steps_committed=crash.steps_committed)

    return Hooks(
        before_step=before_step,
        after_step=after_step,
        after_output=after_output,
        before_batch_commit=before_batch_commit,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    global BANK
    directory: Path = args.dir
    crash = None
    if args.mode == "crash":
        crash = Crash(directory, args.point, args.message, args.min_batch)
    BANK = Bank(str(directory / "bank.db"))
    account = make_account(args.checkpoint_every)
    url = args.store or f"sqlite:///{directory / 'journal.db'}"
    messages = plan(args.n)
    try:
        async with Runtime(url, actors=[account], hooks=make_hooks(crash)) as rt:
            recovered = rt.stats.actors_recovered

            async def one_key(key: str) -> list[int]:
                ref = rt.client.actor(account, key)
                handles = []
                for message_id, k, cents in messages:
                    if k != key:
                        continue
                    handle = await ref.tell("deposit", cents, idempotency_key=message_id)
                    assert handle is not None
                    if crash is not None:
                        crash.owner[handle.id] = message_id
                    handles.append(handle)
                for handle in handles:
                    await handle.result(timeout=RESULT_TIMEOUT)
                summary: list[int] = await ref.ask("summary")
                return summary

            summaries = await asyncio.gather(*(one_key(k) for k in KEYS))
        stats = dataclasses.asdict(rt.stats)
    finally:
        BANK.close()
    return {
        "summaries": dict(zip(KEYS, summaries, strict=True)),
        "stats": stats,
        "actors_recovered_at_start": recovered,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--mode", choices=("crash", "recover", "reference"), required=True)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--point", choices=POINTS)
    parser.add_argument("--message", default="dep-013")
    parser.add_argument("--min-batch", type=int, default=3)
    parser.add_argument("--store", help="the journal's store URL (default: journal.db in --dir)")
    parser.add_argument("--checkpoint-every", type=int, default=3)
    args = parser.parse_args(argv)
    if args.mode == "crash" and args.point is None:
        parser.error("--mode crash needs --point")
    out = asyncio.run(run(args))
    if args.mode == "crash":
        print(f"crash point {args.point} was never reached", file=sys.stderr)
        return 3
    path = args.dir / f"results-{args.mode}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
