"""The child process of the durable-primitives crash tests (tests/test_primitives_crash.py).

One scenario per run, on a SQLite store in ``--dir``:

- ``sleep``: workflows park on ``ctx.sleep(--seconds)``;
- ``promise``: workflows park on ``await p`` for a durable promise;
- ``signal``: workflows take one signal, then park waiting for a second;
- ``cancel``: a workflow parks in an hour-long sleep inside a saga and a
  ``finally`` block, to be cancelled;
- ``fanout``: a parent gathers ``FANOUT`` children;
- ``saga``: a payment whose recording fails, so its saga refunds three charges;
- ``deadline``: a parent started with a ``timeout`` gathers two children that
  park in hour-long sleeps: all three park until the deadline they share.

Modes:

- ``crash``: start the scenario's invocations. For ``sleep``, ``promise``,
  ``signal`` and ``cancel``, wait until every one is parked, print one
  ``READY {json}`` line and wait to be SIGKILLed by the test (for ``sleep``
  with ``--ready-when resumed``: once the timer service has resumed every
  sleeper ahead of its time). For ``fanout`` and ``saga``, SIGKILL itself at
  ``--kill`` (writing ``crash.json`` first).
- ``outside``: while no worker runs, do what the scenario does from outside
  (resolve the promises, send the signals, cancel) through a
  ``Runtime(url, recover=False)`` that runs no workflows, as an admin tool
  would; print ``DONE``.
- ``recover``: open the store (the runtime resumes what is unfinished),
  start the same invocations with the same idempotency keys (they attach),
  wait for every outcome and write ``results-recover.json``.
- ``reference``: every scenario at once, uncrashed, each in ``DIR/<scenario>``,
  the outside actions done in-process; writes ``results-reference.json`` there.

Every step calls :func:`effect`, which records the call in ``effects.db``
(table ``calls``: every call, in order) and its effect once per step key
(table ``effects``), like an external API that deduplicates by the key.

Run: ``python tests/crash/primitives_worker.py --dir DIR --scenario fanout
--mode crash --kill after_step:work:4``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import perdure
from perdure import Runtime, Status, current_step
from perdure.storage import EntryKind
from perdure.testing import Hooks, StepInfo

SCENARIOS = ("sleep", "promise", "signal", "cancel", "fanout", "saga", "deadline")
NAPPERS = ("n0", "n1", "n2", "n3")
APPROVALS = ("a0", "a1", "a2")
COLLECTORS = ("c0", "c1")
CANCELLABLE = ("x0",)
FANOUT = 8
SAGAS = ("s0",)
DEADLINES = ("d0",)
DEADLINE = timedelta(seconds=1.5)
RESULT_TIMEOUT = 30.0
READY_TIMEOUT = 20.0


# -- the external side -------------------------------------------------------------------


class Effects:
    """Logs every call; applies each step key's effect once."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS calls (
                seq INTEGER PRIMARY KEY, step_key TEXT NOT NULL, what TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS effects (step_key TEXT PRIMARY KEY, what TEXT NOT NULL);
            """
        )

    def record(self, step_key: str, what: str) -> None:
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO calls (step_key, what) VALUES (?, ?)", (step_key, what))
            c.execute("INSERT OR IGNORE INTO effects VALUES (?, ?)", (step_key, what))
            c.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclasses.dataclass
class Process:
    """What this process is: where it writes, and where it dies."""

    directory: Path | None = None
    # An effect after which to die ("after_call"), and a step commit after
    # which to die: (step name, how many such commits).
    die_after_effect: str | None = None
    die_after_step: tuple[str, int] | None = None
    steps_seen: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def die(self, **where: Any) -> None:
        assert self.directory is not None
        with self.lock:
            marker = {"pid": os.getpid(), **where}
            tmp = self.directory / "crash.json.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, self.directory / "crash.json")
            os.kill(os.getpid(), signal.SIGKILL)


PROCESS = Process()
# The effects file of the scenario a step belongs to (reference mode runs
# several scenarios in one process). Set before the scenario's runtime
# starts: its tasks, the timer service's and the step threads inherit it.
EFFECTS: contextvars.ContextVar[Effects] = contextvars.ContextVar("EFFECTS")


def effect(what: str) -> str:
    """A step's external call: recorded under the step's key."""
    step = current_step()
    EFFECTS.get().record(step.key, what)
    if PROCESS.die_after_effect == what:
        PROCESS.die(point="after_call", key=step.key, what=what)
    return what


def woke_at(tag: str) -> float:
    """The wall-clock time at which a sleeper's first step after its sleep ran."""
    effect(f"{tag}:woke")
    return time.time()


def reject(tag: str) -> None:
    effect(f"{tag}:record")
    raise perdure.TerminalError(f"ledger rejected {tag}")


# -- the workflows -----------------------------------------------------------------------


@perdure.workflow
async def napper(ctx: perdure.Context, tag: str, seconds: float) -> str:
    await ctx.run("before", effect, f"{tag}:before")
    await ctx.sleep(seconds)
    await ctx.run("woke", woke_at, tag)
    return f"{tag}: awake"


@perdure.workflow
async def approval(ctx: perdure.Context, tag: str) -> str:
    p = ctx.promise("approval", type=str)
    await ctx.run("send", effect, f"{tag}:send")  # hand p.id out
    try:
        decision = await p
    except perdure.TerminalError as exc:
        decision = f"rejected ({exc})"
    await ctx.run("apply", effect, f"{tag}:{decision}")
    return f"{tag}: {decision}"


@perdure.workflow
async def collector(ctx: perdure.Context, tag: str) -> list[int]:
    got: list[int] = []
    for _ in range(2):
        value = await ctx.signal("add", type=int)
        got.append(value)
        await ctx.run("took", effect, f"{tag}:took {value}")
    return got


@perdure.workflow
async def cancellable(ctx: perdure.Context, tag: str) -> str:
    async with ctx.saga() as saga:
        await ctx.run("charge", effect, f"{tag}:charge")
        saga.on_failure("refund", effect, f"{tag}:refund")
        try:
            await ctx.sleep(3600)
        finally:
            await ctx.run("cleanup", effect, f"{tag}:cleanup")
    return "not cancelled"


@perdure.workflow
async def square(ctx: perdure.Context, n: int) -> int:
    await ctx.run("work", effect, f"child {n}")
    return n * n


@perdure.workflow
async def fan_out(ctx: perdure.Context, n: int) -> list[int]:
    values: list[int] = await ctx.gather(*(ctx.start(square, i) for i in range(n)))
    await ctx.run("sum", effect, f"sum {sum(values)}")
    return values


@perdure.workflow
async def saga_payment(ctx: perdure.Context, tag: str) -> str:
    async with ctx.saga() as saga:
        for i in range(3):
            await ctx.run(f"charge {i}", effect, f"{tag}:charge {i}")
            saga.on_failure(f"refund {i}", effect, f"{tag}:refund {i}")
        await ctx.run("record", reject, tag)
    return "unreachable"


@perdure.workflow
async def sleepy_child(ctx: perdure.Context, tag: str) -> str:
    try:
        await ctx.sleep(3600)
        return "woke"
    finally:
        await ctx.run("cleanup", effect, f"{tag}:cleanup")


@perdure.workflow
async def deadline_parent(ctx: perdure.Context, tag: str) -> list[str]:
    try:
        children = [ctx.start(sleepy_child, f"{tag}.{i}") for i in range(2)]
        return await ctx.gather(*children)
    finally:
        await ctx.run("cleanup", effect, f"{tag}:cleanup")


WORKFLOWS = [
    napper,
    approval,
    collector,
    cancellable,
    square,
    fan_out,
    saga_payment,
    sleepy_child,
    deadline_parent,
]


# -- the scenarios -----------------------------------------------------------------------

Handles = dict[str, perdure.InvocationHandle[Any]]


async def start(rt: Runtime, scenario: str, seconds: float) -> Handles:
    """Start (or, after a crash, attach to) the scenario's invocations."""
    client = rt.client
    if scenario == "sleep":
        return {t: await client.start(napper, t, seconds, idempotency_key=t) for t in NAPPERS}
    if scenario == "promise":
        return {t: await client.start(approval, t, idempotency_key=t) for t in APPROVALS}
    if scenario == "signal":
        return {t: await client.start(collector, t, idempotency_key=t) for t in COLLECTORS}
    if scenario == "cancel":
        return {t: await client.start(cancellable, t, idempotency_key=t) for t in CANCELLABLE}
    if scenario == "fanout":
        return {"fan": await client.start(fan_out, FANOUT, idempotency_key="fan")}
    if scenario == "saga":
        return {t: await client.start(saga_payment, t, idempotency_key=t) for t in SAGAS}
    if scenario == "deadline":
        return {
            t: await client.start(deadline_parent, t, idempotency_key=t, timeout=DEADLINE)
            for t in DEADLINES
        }
    raise AssertionError(scenario)


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            while not await check():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {READY_TIMEOUT}s waiting for {what}") from None


async def parked(rt: Runtime, handles: Handles, step: str | None = None) -> None:
    """Wait until every invocation is suspended (and, with ``step``, has journaled it)."""

    async def check() -> bool:
        for h in handles.values():
            try:
                if await h.status() is not Status.SUSPENDED:
                    return False
            except perdure.NotFoundError:  # a child not created yet
                return False
            if step is not None:
                journal = await rt.store.read_journal(h.id)
                if not any(e.kind is EntryKind.STEP and e.name == step for e in journal):
                    return False
        return True

    await until(check, "every invocation parked")


async def resumed(rt: Runtime, handles: Handles) -> None:
    async def check() -> bool:
        if rt.stats.invocations_resumed < len(handles):
            return False
        for h in handles.values():
            if await h.status() is not Status.RUNNING:
                return False
        return True

    await until(check, "every sleeper resumed by the timer service")


async def ready(rt: Runtime, scenario: str, handles: Handles) -> dict[str, Any]:
    """Wait until the scenario is where the test kills it; what the outside needs."""
    if scenario == "signal":
        for i, h in enumerate(handles.values()):
            await h.signal("add", 10 + i)
        await parked(rt, handles, step="took")
    elif scenario == "deadline":
        children = {
            f"{t}.{i}": perdure.InvocationHandle(rt, f"{h.id}:{i}", "sleepy_child")
            for t, h in handles.items()
            for i in (1, 2)
        }
        await parked(rt, {**handles, **children})
    else:
        await parked(rt, handles)
    info: dict[str, Any] = {"ids": {t: h.id for t, h in handles.items()}}
    if scenario == "promise":
        promises = {}
        for t, h in handles.items():
            journal = await rt.store.read_journal(h.id)
            (entry,) = [e for e in journal if e.kind is EntryKind.PROMISE]
            promises[t] = f"{h.id}:{entry.index}"
        info["promises"] = promises
    return info


async def outside(rt: Runtime, scenario: str, info: dict[str, Any]) -> None:
    """What happens from outside while (in the crash tests) no worker runs."""
    client = rt.client
    if scenario == "promise":
        for i, (tag, pid) in enumerate(sorted(info["promises"].items())):
            if i == 1:
                await client.reject_promise(pid, f"declined {tag}")
            else:
                await client.resolve_promise(pid, f"approved {tag}")
    elif scenario == "signal":
        for i, (_, inv) in enumerate(sorted(info["ids"].items())):
            await perdure.InvocationHandle(rt, inv, "collector").signal("add", 20 + i)
    elif scenario == "cancel":
        for inv in info["ids"].values():
            await client.cancel(inv, "customer asked")


async def outcome(handle: perdure.InvocationHandle[Any]) -> dict[str, Any]:
    try:
        return {"value": await handle.result(timeout=RESULT_TIMEOUT)}
    except perdure.InvocationCancelledError as exc:
        return {"cancelled": exc.reason}
    except perdure.InvocationFailedError as exc:
        cause = exc.cause
        return {"failed": f"{type(cause).__name__}: {cause}"}


async def outcomes(handles: Handles) -> dict[str, Any]:
    found = await asyncio.gather(*(outcome(h) for h in handles.values()))
    return dict(zip(handles, found, strict=True))


async def finish(rt: Runtime, scenario: str, handles: Handles) -> dict[str, Any]:
    """The outcomes of the scenario's invocations, once all of them finished."""
    results = await outcomes(handles)
    if scenario == "deadline":
        # A cancelled parent does not wait for its children to wind down; this
        # process does, before it stops. (Their reasons race: their own
        # deadline or their parent's cancellation, so they are not compared.)
        children = {
            f"{t}.{i}": perdure.InvocationHandle(rt, f"{h.id}:{i}", "sleepy_child")
            for t, h in handles.items()
            for i in (1, 2)
        }
        await outcomes(children)
    return results


# -- the modes ---------------------------------------------------------------------------


def make_hooks() -> Hooks:
    if PROCESS.die_after_step is None:
        return Hooks()
    name, count = PROCESS.die_after_step

    def after_step(info: StepInfo) -> None:
        if info.name != name:
            return
        with PROCESS.lock:
            PROCESS.steps_seen += 1
            seen = PROCESS.steps_seen
        if seen == count:
            PROCESS.die(point="after_step", key=info.key, name=name, count=count)

    return Hooks(after_step=after_step)


def runtime(
    directory: Path,
    *,
    recover: bool = True,
    workflows: bool = True,
    timer_lead: timedelta = timedelta(seconds=1),
) -> Runtime:
    url = f"sqlite:///{directory / 'journal.db'}"
    return Runtime(
        url,
        workflows=WORKFLOWS if workflows else [],
        hooks=make_hooks(),
        recover=recover,
        timer_lead=timer_lead,
    )


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def run_crash(args: argparse.Namespace) -> int:
    async with runtime(args.dir, timer_lead=timedelta(seconds=args.timer_lead)) as rt:
        handles = await start(rt, args.scenario, args.seconds)
        if args.kill is not None:
            # fanout, saga: it dies by its own hand at the chosen point.
            await outcomes(handles)
            say("the kill point was never reached")
            return 3
        if args.ready_when == "resumed":
            # Past the parking: the timer service has claimed every sleeper
            # (running again, replayed up to its sleep) and it waits out the
            # rest of the sleep in memory.
            await resumed(rt, handles)
            info: dict[str, Any] = {"ids": {t: h.id for t, h in handles.items()}}
        else:
            info = await ready(rt, args.scenario, handles)
        write_json(args.dir / "ready.json", info)
        say("READY " + json.dumps(info))
        await asyncio.Event().wait()  # until the SIGKILL
    return 3


async def run_outside(args: argparse.Namespace) -> int:
    info = json.loads((args.dir / "ready.json").read_text())
    async with runtime(args.dir, recover=False, workflows=False) as rt:
        await outside(rt, args.scenario, info)
        stats = dataclasses.asdict(rt.stats)
    write_json(args.dir / "outside.json", {"stats": stats})
    say("DONE")
    return 0


async def run_recover(args: argparse.Namespace) -> int:
    started_at = time.time()
    async with runtime(args.dir) as rt:
        handles = await start(rt, args.scenario, args.seconds)
        results = await finish(rt, args.scenario, handles)
        stats = dataclasses.asdict(rt.stats)
    out = {"results": results, "stats": stats, "started_at": started_at}
    write_json(args.dir / "results-recover.json", out)
    return 0


async def run_reference(args: argparse.Namespace) -> int:
    async def one(scenario: str) -> None:
        directory = args.dir / scenario
        directory.mkdir(exist_ok=True)
        effects = Effects(directory / "effects.db")
        EFFECTS.set(effects)  # this task's context: its runtime's tasks inherit it
        async with runtime(directory) as rt:
            handles = await start(rt, scenario, args.seconds)
            info = await ready(rt, scenario, handles) if scenario in EXTERNAL else None
            if info is not None:
                await outside(rt, scenario, info)
            results = await finish(rt, scenario, handles)
            stats = dataclasses.asdict(rt.stats)
        effects.close()
        write_json(directory / "results-reference.json", {"results": results, "stats": stats})

    await asyncio.gather(*(one(s) for s in args.scenarios))
    return 0


EXTERNAL = (
    "sleep",
    "promise",
    "signal",
    "cancel",
    "deadline",
)  # killed by the test, not by themselves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--mode", choices=("crash", "outside", "recover", "reference"))
    parser.add_argument("--scenario", choices=SCENARIOS, action="append", dest="scenarios")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long the sleepers sleep")
    parser.add_argument(
        "--ready-when",
        choices=("parked", "resumed"),
        default="parked",
        help="crash mode, sleep: be killed once parked, or once resumed ahead of time",
    )
    parser.add_argument("--timer-lead", type=float, default=1.0, help="crash mode's timer lead")
    parser.add_argument(
        "--kill",
        help="after_step:NAME:N (die once N steps named NAME committed) or after_call:WHAT "
        "(die right after the effect WHAT was recorded, before its step commits)",
    )
    args = parser.parse_args(argv)
    if not args.scenarios:
        parser.error("give --scenario")
    args.scenario = args.scenarios[0]
    if args.kill is not None:
        point, _, rest = args.kill.partition(":")
        if point == "after_step":
            name, _, count = rest.rpartition(":")
            PROCESS.die_after_step = (name, int(count))
        elif point == "after_call":
            PROCESS.die_after_effect = rest
        else:
            parser.error(f"unknown kill point {args.kill!r}")
    PROCESS.directory = args.dir
    if args.mode == "reference":
        return asyncio.run(run_reference(args))
    effects = Effects(args.dir / "effects.db")
    EFFECTS.set(effects)  # asyncio.run copies this context into its tasks
    try:
        if args.mode == "crash":
            return asyncio.run(run_crash(args))
        if args.mode == "outside":
            return asyncio.run(run_outside(args))
        return asyncio.run(run_recover(args))
    finally:
        effects.close()


if __name__ == "__main__":
    sys.exit(main())
