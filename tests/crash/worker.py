"""The child process of the crash tests (tests/test_crash.py).

It runs a batch of payment workflows on a SQLite store (or the one ``--store``
names, e.g. a PostgreSQL schema) and, in ``crash``
mode, SIGKILLs itself at a chosen point for a chosen payment; in
``recover`` mode it opens the same store (the runtime resumes what was
unfinished), re-submits the same payments with the same idempotency keys,
waits for every result and writes them as JSON. ``reference`` mode is an
uncrashed run.

Everything the parent needs to check is written to files in ``--dir``:

- ``events.log``: one JSON object per line, appended with single O_APPEND
  writes (no fsync: the data is in the kernel when the process is killed):
  ``start`` (a step is about to run live, from ``Hooks.before_step``),
  ``committed`` (``Hooks.after_step``), ``output`` (``Hooks.after_output``)
  and ``batch`` (``Hooks.before_batch_commit``), each tagged with the phase.
- ``crash.json``: written just before the self-inflicted SIGKILL: where.
- ``results-<phase>.json``: every payment's result and the runtime's stats.

Run: ``python tests/crash/worker.py --dir DIR --mode crash --point after_step
--payment p-007 --step charge``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from perdure import Runtime
from perdure._demo.payments import (
    Charge,
    PaymentRequest,
    SQLiteLedger,
    SQLiteProvider,
    build_payment_workflow,
)
from perdure.testing import Hooks, StepInfo

POINTS = ("before_step", "after_charge", "after_step", "after_output", "batch_commit")
RESULT_TIMEOUT = 60.0


def payments(n: int) -> list[PaymentRequest]:
    """The batch every run submits: the same requests in every process."""
    return [
        PaymentRequest(
            payment_id=f"p-{i:03d}",
            customer=f"cust-{i % 7}",
            amount_cents=1000 + 37 * i,
            card="4242424242424242",
        )
        for i in range(n)
    ]


class EventLog:
    """Append-only JSON lines; each line is one O_APPEND write()."""

    def __init__(self, path: Path, phase: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._phase = phase

    def write(self, event: str, **fields: Any) -> None:
        record = {"phase": self._phase, "pid": os.getpid(), "event": event, **fields}
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


class Crash:
    """Where to die, and the act of dying."""

    def __init__(self, directory: Path, point: str, payment: str, step: str, min_batch: int):
        self.directory = directory
        self.point = point
        self.payment = payment
        self.step = step
        self.min_batch = min_batch
        # invocation id -> payment id, filled as soon as client.start returns,
        # which is before the invocation's task first runs.
        self.owner: dict[str, str] = {}
        self.steps_committed = 0
        self._lock = threading.Lock()

    def matches(self, info: StepInfo) -> bool:
        return self.owner.get(info.invocation_id) == self.payment and info.name == self.step

    def die(self, **where: Any) -> None:
        with self._lock:  # only one thread writes the marker
            marker = {"point": self.point, "pid": os.getpid(), **where}
            tmp = self.directory / "crash.json.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, self.directory / "crash.json")
            os.kill(os.getpid(), signal.SIGKILL)


class KillingProvider:
    """The real provider; dies right after the chosen payment's charge returned."""

    def __init__(self, inner: SQLiteProvider, crash: Crash) -> None:
        self._inner = inner
        self._crash = crash

    def charge(self, idempotency_key: str, payment_id: str, amount_cents: int) -> Charge:
        result = self._inner.charge(idempotency_key, payment_id, amount_cents)
        if payment_id == self._crash.payment:
            self._crash.die(payment_id=payment_id, key=idempotency_key)
        return result


def make_hooks(log: EventLog, crash: Crash | None) -> Hooks:
    def before_step(info: StepInfo) -> None:
        log.write("start", inv=info.invocation_id, idx=info.index, name=info.name)
        if crash is not None and crash.point == "before_step" and crash.matches(info):
            crash.die(inv=info.invocation_id, idx=info.index, name=info.name)

    def after_step(info: StepInfo) -> None:
        log.write("committed", inv=info.invocation_id, idx=info.index, name=info.name)
        if crash is None:
            return
        crash.steps_committed += 1
        if crash.point == "after_step" and crash.matches(info):
            crash.die(inv=info.invocation_id, idx=info.index, name=info.name)

    def after_output(invocation_id: str) -> None:
        log.write("output", inv=invocation_id)
        if (
            crash is not None
            and crash.point == "after_output"
            and crash.owner.get(invocation_id) == crash.payment
        ):
            crash.die(inv=invocation_id)

    def before_batch_commit(size: int) -> None:
        # The batch's rows are written inside the open transaction; COMMIT is next.
        log.write("batch", size=size)
        if (
            crash is not None
            and crash.point == "batch_commit"
            # armed once some steps have committed, so that the batch holds
            # step results (not only new invocations) and there is a journal
            # to replay
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
    directory: Path = args.dir
    log = EventLog(directory / "events.log", args.mode)
    crash = None
    if args.mode == "crash":
        crash = Crash(directory, args.point, args.payment, args.step, args.min_batch)
    provider = SQLiteProvider(str(directory / "provider.db"))
    ledger = SQLiteLedger(str(directory / "ledger.db"))
    wired: Any = provider
    if crash is not None and crash.point == "after_charge":
        wired = KillingProvider(provider, crash)
    wf = build_payment_workflow(wired, ledger)
    url = args.store or f"sqlite:///{directory / 'journal.db'}"
    results: dict[str, Any] = {}
    try:
        async with Runtime(url, workflows=[wf], hooks=make_hooks(log, crash)) as rt:

            async def one(request: PaymentRequest) -> None:
                handle = await rt.client.start(wf, request, idempotency_key=request.payment_id)
                if crash is not None:
                    crash.owner[handle.id] = request.payment_id
                result = await handle.result(timeout=RESULT_TIMEOUT)
                results[request.payment_id] = {
                    "invocation_id": handle.id,
                    "type": type(result).__qualname__,
                    **dataclasses.asdict(result),
                }

            await asyncio.gather(*(one(r) for r in payments(args.n)))
        stats = dataclasses.asdict(rt.stats)
    finally:
        provider.close()
        ledger.close()
        log.close()
    return {"results": results, "stats": stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--mode", choices=("crash", "recover", "reference"), required=True)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--point", choices=POINTS)
    parser.add_argument("--payment", default="p-017")
    parser.add_argument("--step", default="charge")
    parser.add_argument("--min-batch", type=int, default=3)
    parser.add_argument("--store", help="the journal's store URL (default: journal.db in --dir)")
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
