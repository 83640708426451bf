"""The payment demo's worker process.

Run by ``perdure demo`` as ``python -m perdure._demo.worker --dir DIR ...``;
the demo kills the first worker with SIGKILL mid-batch and starts a second
one on the same directory. Each worker:

1. opens the Perdure store ``DIR/perdure.db`` and resumes every invocation
   left unfinished by a previous worker, then waits until they complete
   (the recovery that the demo times);
2. submits the whole batch, at most ``--concurrency`` payments at a time,
   with ``idempotency_key=payment_id``: a payment a previous worker already
   recorded attaches to its invocation instead of starting another;
3. once every payment has completed, reads each customer's durable
   ``Account`` actor and times rebuilding its state from its latest
   checkpoint plus a replay of the messages after it, and by a full replay.

Each payment also credits its customer's ``Account`` (one actor per
customer, ``--customers`` of them), as a journaled step of the workflow.

It reports on stdout, one line per event, written straight to the file
descriptor so that every line written before a SIGKILL still reaches the
parent:

``S <invocation id> <index> <step name>``
    a step is about to run live (``Hooks.before_step``; not on replay);
``D <payment id> <invocation id>``
    a payment completed in this worker (resumed or new);
``A <payment id>``
    a payment was already known to the store: its submission attached;
``E <json object>``
    a phase event (``resumed``, ``recovered``, ``accounts``, ``finished``)
    with figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import InvocationHandle, Runtime, StepInfo
from .._actor import RebuiltState, rebuild
from ..storage import UNFINISHED, Status
from ..testing import Hooks
from .payments import (
    Account,
    AccountState,
    Charge,
    PaymentRequest,
    PaymentResult,
    Provider,
    SQLiteLedger,
    SQLiteProvider,
    build_payment_workflow,
)

STORE_FILE = "perdure.db"
PROVIDER_FILE = "provider.db"
LEDGER_FILE = "ledger.db"


def payment_id(number: int) -> str:
    return f"pay-{number:05d}"


def customer_id(number: int) -> str:
    return f"cust-{number:03d}"


def make_payments(count: int, customers: int = 10) -> list[PaymentRequest]:
    """The demo's batch: deterministic, every payment valid, the customers in turn."""
    return [
        PaymentRequest(
            payment_id=payment_id(i),
            customer=customer_id((i - 1) % customers + 1),
            amount_cents=100 + (i * 7919) % 99_000,
            card="4242424242424242",
        )
        for i in range(1, count + 1)
    ]


class LatencyProvider:
    """A provider behind a network whose round trip takes ``latency_seconds``
    on average (uniformly 0.5x to 1.5x): half of it before the provider sees
    the request, half after it has charged (the response travelling back).
    A crash in the second half leaves a charge whose step has not committed:
    the step runs again on recovery and the provider deduplicates the
    repeated call by the step's key."""

    def __init__(self, inner: Provider, latency_seconds: float) -> None:
        self._inner = inner
        self._half = max(0.0, latency_seconds) / 2

    def _wait(self) -> None:
        if self._half:
            time.sleep(self._half * random.uniform(0.5, 1.5))

    def charge(self, idempotency_key: str, payment_id: str, amount_cents: int) -> Charge:
        self._wait()
        charge = self._inner.charge(idempotency_key, payment_id, amount_cents)
        self._wait()
        return charge

    def refund(self, idempotency_key: str, transaction_id: str) -> None:
        self._wait()
        self._inner.refund(idempotency_key, transaction_id)
        self._wait()


class Events:
    """Event lines to the parent, one ``os.write`` each: nothing is buffered
    in this process, so a SIGKILL loses no line already written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._broken = False

    def line(self, text: str) -> None:
        if self._broken:
            return
        try:
            os.write(self._fd, (text + "\n").encode())
        except OSError:
            # The parent is gone; the payments still finish correctly.
            self._broken = True

    def event(self, name: str, **figures: Any) -> None:
        self.line("E " + json.dumps({"event": name, **figures}, separators=(",", ":")))


async def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    directory = Path(args.dir)
    events = Events(sys.stdout.fileno())
    payments = make_payments(args.payments, args.customers)
    provider_db = SQLiteProvider(str(directory / PROVIDER_FILE))
    ledger_db = SQLiteLedger(str(directory / LEDGER_FILE))
    provider = LatencyProvider(provider_db, args.charge_latency_ms / 1000)
    process_payment = build_payment_workflow(provider, ledger_db, accounts=True)

    def before_step(info: StepInfo) -> None:
        events.line(f"S {info.invocation_id} {info.index} {info.name}")

    # recover=False, then rt.recover(): exactly what start() does by default,
    # split so that the worker knows which invocations it resumed.
    rt = Runtime(
        f"sqlite:///{directory / STORE_FILE}",
        workflows=[process_payment],
        actors=[Account],
        hooks=Hooks(before_step=before_step),
        recover=False,
    )
    try:
        await rt.start()
        started = time.monotonic()
        records = await rt.store.list_invocations(statuses=UNFINISHED)
        # Payments; the Account messages in flight resume in their actors.
        unfinished = [rec for rec in records if rec.actor_type is None]
        resumed = await rt.recover()
        events.event(
            "resumed",
            pid=os.getpid(),
            unfinished=len(unfinished),
            unfinished_account_messages=len(records) - len(unfinished),
            resumed=resumed,
            actors_recovered=rt.stats.actors_recovered,
            runtime_recovery_seconds=rt.stats.recovery_seconds,
        )
        handles: list[InvocationHandle[PaymentResult]] = [
            InvocationHandle(rt, rec.id, rec.target) for rec in unfinished
        ]
        results = await asyncio.gather(*(h.result() for h in handles))
        for handle, result in zip(handles, results, strict=True):
            events.line(f"D {result.payment_id} {handle.id}")
        recovered = time.monotonic()
        events.event("recovered", recovered=len(handles))

        known = {rec.idempotency_key for rec in await rt.store.list_invocations()}
        limit = asyncio.Semaphore(args.concurrency)
        created = 0

        async def pay(request: PaymentRequest) -> None:
            nonlocal created
            async with limit:
                handle = await rt.client.start(
                    process_payment, request, idempotency_key=request.payment_id
                )
                result = await handle.result()
            if result.payment_id != request.payment_id:
                raise RuntimeError(f"{request.payment_id} returned {result!r}")
            if request.payment_id in known:
                events.line(f"A {request.payment_id}")
            else:
                created += 1
                events.line(f"D {request.payment_id} {handle.id}")

        await asyncio.gather(*(pay(p) for p in payments))
        finished = time.monotonic()
        stats = dataclasses.asdict(rt.stats)
        events.event("accounts", accounts=await measure_accounts(rt, args.rebuild_repeats))
    finally:
        await rt.stop()
        provider_db.close()
        ledger_db.close()

    restarted_at: float | None = args.restarted_at
    events.event(
        "finished",
        stats=stats,
        resumed=len(handles),
        created=created,
        attached=len(payments) - created,
        # Durations inside this process (time.monotonic is system-wide, so
        # the parent's restart instant compares with ours).
        startup_seconds=None if restarted_at is None else began - restarted_at,
        open_seconds=started - began,
        resume_seconds=recovered - started,
        recovery_seconds=None if restarted_at is None else recovered - restarted_at,
        batch_seconds=finished - recovered,
    )
    return 0


async def measure_accounts(rt: Runtime, repeats: int) -> list[dict[str, Any]]:
    """Every Account's durable state, and the time to rebuild it two ways.

    (a) from its latest checkpoint plus a replay of the messages after it,
    which is what an activation does after a restart; (b) by replaying every
    message (``use_checkpoints=False``). Each is timed ``repeats`` times and
    the fastest run kept: the figures compare the two, not the first run's
    cold caches. Rebuilding writes nothing and makes no external call.
    """
    definition = rt.actor(Account)
    accounts: list[dict[str, Any]] = []
    for _, key in await rt.store.list_actors(definition.name):
        messages = await rt.store.list_actor_messages(definition.name, key)
        timings: dict[bool, float] = {}
        rebuilt: dict[bool, RebuiltState] = {}
        for use_checkpoints in (True, False):
            best = math.inf
            for _ in range(repeats):
                began = time.perf_counter()
                state = await rebuild(
                    rt, definition, key, upto_seq=None, use_checkpoints=use_checkpoints
                )
                best = min(best, time.perf_counter() - began)
            timings[use_checkpoints] = best
            rebuilt[use_checkpoints] = state
        fast, full = rebuilt[True], rebuilt[False]
        account: AccountState = fast.instance.state
        accounts.append(
            {
                "key": key,
                "paid_cents": account.paid_cents,
                "payments": account.payments,
                "last_transaction": account.last_transaction,
                "messages": len(messages),
                "completed_messages": sum(1 for m in messages if m.status is Status.COMPLETED),
                "checkpoint_seq": fast.checkpoint_seq,
                "replayed_checkpoint": fast.replayed,
                "replayed_full": full.replayed,
                "rebuild_checkpoint_seconds": timings[True],
                "rebuild_full_seconds": timings[False],
                "same_state": dataclasses.asdict(account)
                == dataclasses.asdict(full.instance.state),
            }
        )
    return accounts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perdure._demo.worker",
        description="The payment demo's worker (started by 'perdure demo').",
    )
    parser.add_argument("--dir", required=True, help="the demo's work directory")
    parser.add_argument("--payments", type=int, required=True)
    parser.add_argument("--customers", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--rebuild-repeats",
        type=int,
        default=3,
        help="times each account's rebuild is timed (the fastest is kept)",
    )
    parser.add_argument("--charge-latency-ms", type=float, default=5.0)
    parser.add_argument(
        "--restarted-at",
        type=float,
        default=None,
        help="time.monotonic() when the parent restarted this worker",
    )
    args = parser.parse_args(argv)
    if (
        min(args.payments, args.customers, args.concurrency, args.rebuild_repeats) < 1
        or args.charge_latency_ms < 0
    ):
        parser.error(
            "--payments, --customers, --concurrency and --rebuild-repeats must be >= 1, "
            "--charge-latency-ms >= 0"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
