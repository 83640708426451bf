"""``perdure bench``: how fast Perdure itself is.

Every measurement gets its own fresh store file and its own :class:`Runtime`
(in its own event loop), is warmed up first, and is timed with
:func:`time.perf_counter`. The payment provider and ledger live in memory
(:class:`MemoryProvider`, :class:`MemoryLedger`), so the figures measure
Perdure: journaling, group commit, the event loop and the thread hops, not a
fake provider's own I/O. Each figure is the median of ``--runs`` runs, except
those measured in the first run only (see :class:`Sizes`): the suspended-workflow
row always, the timer row with ``--quick``.

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
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import click
import msgspec

from ._actor import Actor, DurabilityFacet
from ._client import ActorRef
from ._context import Context
from ._demo.payments import (
    MemoryLedger,
    MemoryProvider,
    PaymentRequest,
    PaymentResult,
    build_payment_workflow,
    validate,
)
from ._errors import ConfigurationError, StorageError
from ._hooks import Hooks
from ._runtime import Runtime
from ._workflow import Workflow, workflow
from .storage import MemoryStore, Status, Store, open_store

DEFAULT_OUTPUT = "metrics/benchmark_results.json"
CONCURRENCIES = (1, 16, 64, 256)
STEPS_PER_WORKFLOW = 100
STEPS_CONCURRENCY = 64
ACTOR_CONCURRENCY = 256  # concurrent senders of the actor throughput rows
ACTOR_KEYS = 1000  # actor instances they send to
ACTOR_CHECKPOINT_EVERY = 100  # the checkpointed recovery row (and the throughput row)
NEVER = 10**12  # checkpoint_every of the actors that never checkpoint
RECOVERY_WARMUP_MESSAGES = 150  # history of the actor that warms up the restarted runtime
CHECKPOINT_MAX_PAYLOAD = 4 << 20
FAILOVER_CHARGE = 0.2  # seconds per charge in the failover row: work is in flight
CHECKPOINT_STATE_ROWS = 10_000  # rows of the ~1 MB state (about 105 bytes each as JSON)

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
    actor_history: int
    checkpoint_messages: int
    checkpoint_warmup: int
    actor_throughput_per_worker: int
    plain_actor_per_worker: int
    plain_actor_rounds: int
    timers: int
    timers_every_run: bool  # else only in the first run (it takes seconds of real time)
    suspended_workflows: int  # measured in the first run only (in two fresh processes)
    fanout_children: int
    fanout_repeats: int
    node_per_worker: int  # PostgreSQL only: the node rows (first run only; processes)
    failover_payments: int
    timer_window: float = 1.0  # seconds; not scaled (an internal parameter for the tests)

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
            actor_history=s(self.actor_history, 10),
            checkpoint_messages=s(self.checkpoint_messages, 3),
            checkpoint_warmup=s(self.checkpoint_warmup, 2),
            actor_throughput_per_worker=s(self.actor_throughput_per_worker),
            plain_actor_per_worker=s(self.plain_actor_per_worker),
            plain_actor_rounds=s(self.plain_actor_rounds, 3),
            timers=s(self.timers, 10),
            timers_every_run=self.timers_every_run,
            suspended_workflows=s(self.suspended_workflows, 50),
            fanout_children=s(self.fanout_children, 10),
            fanout_repeats=self.fanout_repeats,
            node_per_worker=s(self.node_per_worker),
            failover_payments=s(self.failover_payments, 20),
            timer_window=self.timer_window,
        )


FULL = Sizes(
    latency_workflows=3000,
    latency_warmup=200,
    throughput_per_worker={1: 2000, 16: 500, 64: 200, 256: 80},
    throughput_warmup_per_worker=2,
    steps_workflows_per_worker=8,
    step_latency_workflows=50,
    plain_rounds=50,
    actor_history=10_000,
    checkpoint_messages=50,
    checkpoint_warmup=5,
    actor_throughput_per_worker=80,
    plain_actor_per_worker=200,
    plain_actor_rounds=5,
    timers=10_000,
    timers_every_run=True,
    suspended_workflows=20_000,
    fanout_children=1000,
    fanout_repeats=3,
    node_per_worker=20,
    failover_payments=200,
)
QUICK = Sizes(
    latency_workflows=300,
    latency_warmup=30,
    throughput_per_worker={1: 300, 16: 50, 64: 20, 256: 10},
    throughput_warmup_per_worker=1,
    steps_workflows_per_worker=2,
    step_latency_workflows=5,
    plain_rounds=50,
    actor_history=2_000,
    checkpoint_messages=20,
    checkpoint_warmup=3,
    actor_throughput_per_worker=10,
    plain_actor_per_worker=40,
    plain_actor_rounds=5,
    timers=2_000,
    timers_every_run=False,
    suspended_workflows=5_000,
    fanout_children=1000,
    fanout_repeats=1,
    node_per_worker=5,
    failover_payments=100,
)


# -- stores --------------------------------------------------------------------


class StoreFactory:
    """Hands out a fresh store URL for every measurement.

    SQLite files go into a new temporary directory (inside the directory of
    the ``--store`` URL's file when one is given, so that the file system is
    the one asked for); every file is deleted once its measurement is done.
    On PostgreSQL every measurement gets its own schema, named after the
    URL's ``schema`` option, which is dropped once the measurement is done.
    """

    def __init__(self, url: str | None) -> None:
        self.requested = url
        self.memory = False
        self.postgres: str | None = None  # the URL, for PostgreSQL
        self.server_version: str | None = None
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
            elif parts.scheme.lower() in {"postgres", "postgresql"}:
                from .storage._postgres import server_version

                try:
                    self.server_version = server_version(url)
                except StorageError as exc:
                    raise click.BadParameter(str(exc), param_hint="--store") from None
                self.postgres = url
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
        if not self.memory and self.postgres is None:
            self._dir = tempfile.mkdtemp(prefix="perdure-bench-", dir=parent)
        self._count = 0

    @property
    def directory(self) -> str | None:
        return self._dir

    @property
    def label(self) -> str | None:
        """The ``--store`` URL as reported (without a password)."""
        if self.postgres is not None:
            from .storage._postgres import redact

            return redact(self.postgres)
        return self.requested

    @property
    def pattern(self) -> str:
        if self.memory:
            return "memory://"
        if self.postgres is not None:
            from .storage._postgres import redact

            return redact(self._schema_url("MEASUREMENT")).replace("MEASUREMENT", "<measurement>")
        return f"sqlite:///{self._dir}/<measurement>.db?synchronous={self.synchronous}"

    def _schema_url(self, label: str) -> str:
        from .storage._postgres import parse_url, with_schema

        assert self.postgres is not None
        base = parse_url(self.postgres)[1]
        return with_schema(self.postgres, f"{base}_{label}"[:63])

    @contextmanager
    def fresh(self, label: str) -> Iterator[str]:
        if self.postgres is not None:
            from .storage._postgres import drop_schema

            self._count += 1
            url = self._schema_url(f"{self._count:03d}_{label.replace('-', '_')}")
            drop_schema(url)  # left over from an interrupted run
            try:
                yield url
            finally:
                drop_schema(url)
            return
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


# -- actor workloads -------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """A small actor state: a running total and the number of messages."""

    total: int = 0
    count: int = 0


class _TallyActor(Actor[Tally]):
    async def add(self, ctx: Context, n: int) -> int:
        """One journaled step (so that a replay has a journal to read), then the update."""
        n = await ctx.run("add", _step_async, n)
        self.state.total += n
        self.state.count += 1
        return self.state.total


class BenchTallyNoCheckpoint(_TallyActor):
    """Never checkpoints: recovery replays the whole history."""

    durability = DurabilityFacet(checkpoint_every=NEVER)


class BenchTally(_TallyActor):
    """Checkpoints every ``ACTOR_CHECKPOINT_EVERY`` messages (the default facet)."""

    durability = DurabilityFacet(checkpoint_every=ACTOR_CHECKPOINT_EVERY)


class BenchTallyMessages(Actor[Tally]):
    """The throughput row's actor: durable (checkpoint every 100), no step: a message
    is its invocation, input and output (two commits), the update in between."""

    durability = DurabilityFacet(checkpoint_every=ACTOR_CHECKPOINT_EVERY)

    async def add(self, ctx: Context, n: int) -> int:
        self.state.total += n
        self.state.count += 1
        return self.state.total


class BenchTallyPlain(Actor[Tally]):
    """No DurabilityFacet: in memory only. No step: the update alone."""

    async def add(self, ctx: Any, n: int) -> int:
        self.state.total += n
        self.state.count += 1
        return self.state.total


@dataclasses.dataclass
class LedgerRow:
    id: int
    account: str
    cents: int
    memo: str


@dataclasses.dataclass
class Ledger:
    """The ~1 MB state of the checkpoint row."""

    rows: list[LedgerRow] = dataclasses.field(default_factory=list)


def big_ledger() -> Ledger:
    return Ledger(
        [
            LedgerRow(i, f"acct-{i:08d}", 100 * i, f"memo {i:06d} " + "x" * 30)
            for i in range(CHECKPOINT_STATE_ROWS)
        ]
    )


class _LedgerActor(Actor[Ledger]):
    def initial_state(self) -> Ledger:
        return big_ledger()

    async def touch(self, ctx: Context, i: int) -> int:
        row = self.state.rows[i % len(self.state.rows)]
        row.cents += 1
        return row.cents


class BenchLedgerEvery(_LedgerActor):
    durability = DurabilityFacet(checkpoint_every=1)


class BenchLedgerNever(_LedgerActor):
    durability = DurabilityFacet(checkpoint_every=NEVER)


def _populate_url(url: str) -> str:
    """The same store without waiting for fsyncs: to write a long history fast.

    SQLite: the same file with ``synchronous=off``; PostgreSQL: the same
    schema with ``synchronous_commit=off`` for this connection.
    """
    if url.startswith("postgres"):
        return url + "&options=-c%20synchronous_commit%3Doff"
    if not url.startswith("sqlite:"):
        return url
    return url.split("?", 1)[0] + "?synchronous=off"


async def _tell_many(rt: Runtime, cls: type[Actor[Any]], key: str, count: int) -> None:
    """``count`` messages to one actor, pipelined (tells in chunks), until all are handled."""
    ref = rt.client.actor(cls, key)
    last = None
    for begin in range(0, count, 500):
        handles = await asyncio.gather(
            *(ref.tell("add", 1) for _ in range(min(500, count - begin)))
        )
        last = handles[-1]
    if last is not None:
        await last.result()


async def actor_recovery(url: str, *, checkpointed: bool, history: int) -> float:
    """Seconds until an actor with ``history`` messages is rebuilt on a restarted runtime.

    The history (and a small one for the warm-up actor) is written by a first
    runtime; a second runtime then opens the same store, activates the warm-up
    actor (code paths, decoders, SQLite statements), and the clock runs from
    the first reference to the big actor until its activation is ready: the
    message log's end read, the newest checkpoint read and decoded, the
    messages after it read with their journals and replayed.
    """
    cls: type[_TallyActor] = BenchTally if checkpointed else BenchTallyNoCheckpoint
    memory = url.startswith("memory:")
    shared: Store | None = MemoryStore() if memory else None
    first: str | Store = shared if shared is not None else _populate_url(url)
    async with Runtime(first, actors=[cls]) as rt:
        await _tell_many(rt, cls, "big", history)
        await _tell_many(rt, cls, "warm", RECOVERY_WARMUP_MESSAGES)
    second: str | Store = shared if shared is not None else url
    async with Runtime(second, actors=[cls]) as rt:
        definition = rt.actor(cls)
        await asyncio.shield(rt.activation(definition, "warm").ready)
        replayed_before = rt.stats.actor_messages_replayed
        began = time.perf_counter()
        activation = rt.activation(definition, "big")
        await asyncio.shield(activation.ready)
        elapsed = time.perf_counter() - began
        replayed = rt.stats.actor_messages_replayed - replayed_before
        state: Tally = activation.instance.state
    _expect("messages in the rebuilt state", state.count, history)
    every = ACTOR_CHECKPOINT_EVERY if checkpointed else NEVER
    _expect("messages replayed", replayed, history % every)
    return elapsed


class OutputWatch:
    """Futures resolved by the runtime's ``after_output`` hook: when an
    invocation's output (and the checkpoint written with it) has committed."""

    def __init__(self) -> None:
        self.done: set[str] = set()
        self.waiters: dict[str, asyncio.Future[None]] = {}

    def __call__(self, invocation_id: str) -> None:
        waiter = self.waiters.pop(invocation_id, None)
        if waiter is None:
            self.done.add(invocation_id)
        elif not waiter.done():
            waiter.set_result(None)

    async def wait(self, invocation_id: str) -> None:
        if invocation_id in self.done:
            self.done.discard(invocation_id)
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[invocation_id] = waiter
        await waiter


async def checkpoint_cost(
    url: str, *, messages: int, warmup: int
) -> tuple[list[float], list[float]]:
    """One message at a time to two actors with the same ~1 MB state, alternately:
    one checkpoints with every message, the other never. Each message is timed
    from ``tell`` until its output has committed (the ``after_output`` hook),
    the checkpoint in the same transaction: (with a checkpoint, without)."""
    watch = OutputWatch()
    async with Runtime(
        url,
        actors=[BenchLedgerEvery, BenchLedgerNever],
        max_payload_bytes=CHECKPOINT_MAX_PAYLOAD,
        hooks=Hooks(after_output=watch),
    ) as rt:
        every = rt.client.actor(BenchLedgerEvery, "k")
        never = rt.client.actor(BenchLedgerNever, "k")
        clock = time.perf_counter

        async def timed(ref: ActorRef, i: int) -> float:
            began = clock()
            handle = await ref.tell("touch", i)
            assert handle is not None
            await watch.wait(handle.id)
            return clock() - began

        for i in range(warmup):
            await timed(every, i)
            await timed(never, i)
        with_cp: list[float] = []
        without: list[float] = []
        for i in range(messages):
            without.append(await timed(never, i))
            with_cp.append(await timed(every, i))
        checkpoints = await rt.store.read_checkpoints(rt.actor(BenchLedgerEvery).name, "k")
        none = await rt.store.read_checkpoints(rt.actor(BenchLedgerNever).name, "k")
    newest = checkpoints[0].seq if checkpoints else 0
    _expect("seq of the newest checkpoint", newest, warmup + messages)
    _expect("checkpoints of the actor that never checkpoints", len(none), 0)
    return with_cp, without


def _key_of(worker: int, j: int) -> int:
    return (j * ACTOR_CONCURRENCY + worker) % ACTOR_KEYS


async def durable_actor_messages(url: str, *, per_worker: int) -> float:
    """``ACTOR_CONCURRENCY`` senders, each asking ``per_worker`` messages in turn over
    ``ACTOR_KEYS`` durable actors (no step: see BenchTallyMessages): seconds taken."""
    async with Runtime(url, actors=[BenchTallyMessages]) as rt:
        refs = [rt.client.actor(BenchTallyMessages, f"k{i}") for i in range(ACTOR_KEYS)]

        async def sender(w: int, n: int, offset: int) -> None:
            for j in range(n):
                await refs[_key_of(w, j + offset)].ask(BenchTallyMessages.add, 1)

        # Warm-up: one message to every actor (activates them all).
        warm = -(-ACTOR_KEYS // ACTOR_CONCURRENCY)
        await asyncio.gather(*(sender(w, warm, 0) for w in range(ACTOR_CONCURRENCY)))
        before = rt.stats.invocations_completed
        began = time.perf_counter()
        await asyncio.gather(*(sender(w, per_worker, warm) for w in range(ACTOR_CONCURRENCY)))
        elapsed = time.perf_counter() - began
        _expect(
            "actor messages completed",
            rt.stats.invocations_completed - before,
            ACTOR_CONCURRENCY * per_worker,
        )
    return elapsed


class QueueActors:
    """The hand-written baseline: per key, a state, an ``asyncio.Queue`` of
    (message, future) and a consumer task that handles them one at a time."""

    def __init__(self) -> None:
        self.mailboxes: dict[str, asyncio.Queue[tuple[int, asyncio.Future[int]]]] = {}
        self.states: dict[str, Tally] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def ask(self, key: str, n: int) -> int:
        queue = self.mailboxes.get(key)
        if queue is None:
            queue = self.mailboxes[key] = asyncio.Queue()
            state = self.states[key] = Tally()
            self.tasks.append(asyncio.create_task(self._consume(queue, state)))
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        queue.put_nowait((n, future))
        return await future

    @staticmethod
    async def _consume(queue: asyncio.Queue[tuple[int, asyncio.Future[int]]], state: Tally) -> None:
        while True:
            n, future = await queue.get()
            state.total += n
            state.count += 1
            if not future.done():
                future.set_result(state.total)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def plain_actor_vs_queue(url: str, *, per_worker: int, rounds: int) -> tuple[float, float]:
    """Seconds per message of a plain actor's ``ask`` and of the queue baseline, the
    same senders, keys and work; rounds alternate, each its own median."""
    queues = QueueActors()
    keys = [f"k{i}" for i in range(ACTOR_KEYS)]
    async with Runtime(url, actors=[BenchTallyPlain]) as rt:
        refs = [rt.client.actor(BenchTallyPlain, key) for key in keys]
        handler = BenchTallyPlain.add

        async def plain_sender(w: int, n: int) -> None:
            for j in range(n):
                await refs[_key_of(w, j)].ask(handler, 1)

        async def queue_sender(w: int, n: int) -> None:
            for j in range(n):
                await queues.ask(keys[_key_of(w, j)], 1)

        async def timed(sender: Callable[[int, int], Coroutine[Any, Any, None]]) -> float:
            began = time.perf_counter()
            await asyncio.gather(*(sender(w, per_worker) for w in range(ACTOR_CONCURRENCY)))
            return (time.perf_counter() - began) / (ACTOR_CONCURRENCY * per_worker)

        plain: list[float] = []
        queued: list[float] = []
        for r in range(rounds + 1):  # the first round warms up (and activates every key)
            if r % 2:
                p, q = await timed(plain_sender), await timed(queue_sender)
            else:
                q, p = await timed(queue_sender), await timed(plain_sender)
            if r:
                plain.append(p)
                queued.append(q)
        definition = rt.actor(BenchTallyPlain)
        handled = sum(rt.activation(definition, key).instance.state.count for key in keys)
    await queues.close()
    expected = (rounds + 1) * ACTOR_CONCURRENCY * per_worker
    _expect("plain actor messages handled", handled, expected)
    _expect("queue actor messages handled", sum(s.count for s in queues.states.values()), expected)
    return statistics.median(plain), statistics.median(queued)


# -- durable primitives: timers, suspension, fan-out ------------------------------------


class CountOutputs:
    """The runtime's ``after_output`` hook: an event set once ``target`` outputs committed."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.reached = asyncio.Event()

    def expect(self, more: int) -> None:
        self.target = self.count + more
        self.reached.clear()

    def __call__(self, invocation_id: str) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


@dataclasses.dataclass(frozen=True, slots=True)
class TimerRun:
    """What the timer row saw: the lateness of each timer and the counts it checks."""

    lateness: list[float]  # seconds after its due time that each sleep returned
    resumed_after_due: int  # timers whose invocation the timer service resumed late
    parked: int  # invocations parked before the first of the window was resumed
    resumed: int
    parked_ahead: float  # seconds between the last park and the first resume
    lead: float  # the runtime's timer_lead: resumed this long before due


def build_timer_workflow(
    observed: dict[str, float], resumed: dict[str, float]
) -> Workflow[[float], None]:
    """Sleeps until ``due`` (epoch seconds). Outside the journal, in plain Python
    in the workflow's body, it notes ``time.time()`` when its replay begins (a
    resumed run starts replaying) and when the sleep returns, i.e. after the
    timer's completion has committed: what the workflow's own code observes."""

    @workflow(name="bench_timer")
    async def bench_timer(ctx: Context, due: float) -> None:
        if ctx.replaying:
            resumed.setdefault(ctx.invocation_id, time.time())
        await ctx.sleep_until(datetime.fromtimestamp(due, UTC))
        observed.setdefault(ctx.invocation_id, time.time())

    return bench_timer


async def _until(check: Callable[[], bool]) -> None:
    """Wait until ``check()`` holds, looking every 5 ms: the runtime has no hook
    for parking, so the rows poll its counters (a cheap read, on the loop)."""
    while True:
        if check():
            return
        await asyncio.sleep(0.005)


async def _start_all(rt: Runtime, wf: Workflow[Any, Any], args: list[tuple[Any, ...]]) -> list[str]:
    """Start ``wf`` once per argument tuple, 500 at a time concurrently: their ids."""
    ids: list[str] = []
    for begin in range(0, len(args), 500):
        handles = await asyncio.gather(
            *(rt.client.start(wf, *a) for a in args[begin : begin + 500])
        )
        ids.extend(h.id for h in handles)
    return ids


async def timer_lateness(url: str, *, timers: int, window: float) -> TimerRun:
    """``timers`` durable sleeps due uniformly over one ``window``-second window in
    the future, far enough ahead that every invocation is parked (a suspended row,
    no task) before the timer service resumes the first; how late each sleep
    returned. The real clock (``SystemClock``)."""
    observed: dict[str, float] = {}
    resumed: dict[str, float] = {}
    wf = build_timer_workflow(observed, resumed)
    outputs = CountOutputs()
    async with Runtime(url, workflows=[wf], hooks=Hooks(after_output=outputs)) as rt:
        lead = rt.timer_lead

        async def batch(n: int, ahead: float) -> tuple[dict[str, float], float]:
            parked = rt.stats.invocations_parked
            outputs.expect(n)
            first = time.time() + lead + ahead
            dues = [first + window * i / n for i in range(n)]
            ids = await _start_all(rt, wf, [(d,) for d in dues])
            await _until(lambda: rt.stats.invocations_parked - parked >= n)
            all_parked = time.time()
            await outputs.reached.wait()
            return dict(zip(ids, dues, strict=True)), first - lead - all_parked

        await batch(min(100, timers), 0.3)  # warm-up: the same path, smaller
        observed.clear()
        resumed.clear()
        parked_before = rt.stats.invocations_parked
        resumed_before = rt.stats.invocations_resumed
        # Starting and parking one takes ~0.2 ms here: allow 0.5 ms each, plus 0.25 s.
        due_by_id, ahead = await batch(timers, 0.25 + timers * 0.0005)
        parked = rt.stats.invocations_parked - parked_before
        resumed_count = rt.stats.invocations_resumed - resumed_before
    if ahead <= 0:
        raise BenchError(
            f"starting and parking {timers} timers took {-ahead:.2f} s longer than allowed: "
            "some were not parked when the first was resumed; the machine is too loaded"
        )
    _expect("timers parked", parked, timers)
    _expect("timers resumed", resumed_count, timers)
    _expect("sleeps returned", len(observed), timers)
    return TimerRun(
        lateness=[observed[i] - due for i, due in due_by_id.items()],
        resumed_after_due=sum(resumed[i] > due for i, due in due_by_id.items()),
        parked=parked,
        resumed=resumed_count,
        parked_ahead=ahead,
        lead=lead,
    )


SUSPENDED_WARMUP = 200  # sleepers started (and parked) before the baseline


@workflow(name="bench_sleeper")
async def bench_sleeper(ctx: Context) -> None:
    """Sleeps an hour: parks at once, and stays parked while the row measures."""
    await ctx.sleep(timedelta(hours=1))


def _rss_bytes() -> int:
    """The process's resident set size now (Linux), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


async def suspended_growth(url: str, *, count: int, traced: bool) -> dict[str, Any]:
    """Memory growth of this process while ``count`` workflows sleep (parked).

    Ids are made before the baseline, so the bench's own list of them is not
    counted. After ``SUSPENDED_WARMUP`` sleepers (code paths, SQLite
    statements), the baseline; then the ``count`` are started and the row
    waits until every one is parked and ``rt.running(id)`` is None, collects
    garbage and measures again. ``traced``: Python allocations (tracemalloc,
    started before the runtime); else the resident set size. The store's
    status of each is checked afterwards: ``suspended``.
    """
    if traced:
        tracemalloc.start()
    try:
        ids = [f"sleeper-{i:07d}" for i in range(count)]
        async with Runtime(url, workflows=[bench_sleeper]) as rt:
            start = rt.client.start
            for begin in range(0, SUSPENDED_WARMUP, 100):
                await asyncio.gather(
                    *(
                        start(bench_sleeper, invocation_id=f"warm-{i}")
                        for i in range(begin, begin + 100)
                    )
                )
            await _until(lambda: rt.stats.invocations_parked >= SUSPENDED_WARMUP)
            gc.collect()
            before = tracemalloc.get_traced_memory()[0] if traced else _rss_bytes()
            began = time.perf_counter()
            for begin in range(0, count, 500):
                await asyncio.gather(
                    *(start(bench_sleeper, invocation_id=i) for i in ids[begin : begin + 500])
                )
            await _until(lambda: rt.stats.invocations_parked >= SUSPENDED_WARMUP + count)
            await asyncio.sleep(0.05)  # let the parked tasks' callbacks run
            elapsed = time.perf_counter() - began
            running = sum(rt.running(i) is not None for i in ids)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0] if traced else _rss_bytes()
            rows = await rt.store.list_invocations(
                statuses=[Status.SUSPENDED], target="bench_sleeper"
            )
            suspended = sum(r.id.startswith("sleeper-") for r in rows)
            del rows
    finally:
        if traced:
            tracemalloc.stop()
    _expect("sleepers still running in memory", running, 0)
    _expect("sleepers suspended in the store", suspended, count)
    return {"bytes": after - before, "seconds": elapsed, "suspended": suspended}


def _suspended_child() -> None:
    """Entry point of the process that measures one suspended-workflow figure."""
    url, count, traced = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "traced"
    try:
        result = asyncio.run(suspended_growth(url, count=count, traced=traced))
    except BenchError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(3)
    print(json.dumps(result))


def suspended_memory(url: str, *, count: int, traced: bool) -> dict[str, Any]:
    """:func:`suspended_growth` in a fresh Python process: neither tracemalloc's
    bookkeeping nor memory that earlier measurements freed (and that this
    process would reuse) touches the figure."""
    code = "from perdure._bench import _suspended_child; _suspended_child()"
    how = "traced" if traced else "rss"
    done = subprocess.run(
        [sys.executable, "-c", code, url, str(count), how],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(
            f"the suspended-workflow measurement ({how}) failed: {done.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def _child_step(i: int) -> int:
    return i


@workflow(name="bench_fanout_child")
async def bench_fanout_child(ctx: Context, i: int) -> int:
    """One small journaled step."""
    return await ctx.run("step", _child_step, i)


@workflow(name="bench_fanout")
async def bench_fanout(ctx: Context, n: int) -> int:
    """Starts ``n`` children at once and gathers their results."""
    children = [ctx.start(bench_fanout_child, i) for i in range(n)]
    return sum(await ctx.gather(*children))


async def fanout(url: str, *, children: int, repeats: int) -> list[float]:
    """``repeats`` times, one parent fanning out to ``children`` child workflows:
    seconds from ``client.start`` of the parent to its result, each."""
    async with Runtime(url, workflows=[bench_fanout, bench_fanout_child]) as rt:
        await rt.client.run(bench_fanout, min(100, children))  # warm-up
        steps_before = rt.stats.steps_executed
        completed_before = rt.stats.invocations_completed
        clock = time.perf_counter
        times: list[float] = []
        for _ in range(repeats):
            began = clock()
            handle = await rt.client.start(bench_fanout, children)
            total = await handle.result()
            times.append(clock() - began)
            _expect("sum of the children's results", total, children * (children - 1) // 2)
        _expect("child steps executed", rt.stats.steps_executed - steps_before, repeats * children)
        _expect(
            "invocations completed",
            rt.stats.invocations_completed - completed_before,
            repeats * (children + 1),
        )
    return times


# -- the run -------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile."""
    ordered = sorted(values)
    k = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[k]


Progress = Callable[[str], None]


def run_once(
    stores: StoreFactory, sizes: Sizes, progress: Progress, *, first: bool = True
) -> dict[str, Any]:
    """One run of every measurement; each on its own fresh store and runtime.
    Some are measured in the ``first`` run only (see :class:`Sizes`)."""

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

    history = actor_history(sizes)
    for checkpointed, key in ((False, "full"), (True, "checkpoint")):
        elapsed = measure(
            f"actor-recovery-{key}",
            functools.partial(actor_recovery, checkpointed=checkpointed, history=history),
        )
        m[f"actor_recovery_{key}_ms"] = elapsed * 1e3
    m["actor_recovery_ratio"] = m["actor_recovery_checkpoint_ms"] / m["actor_recovery_full_ms"]
    progress(
        f"actor recovery, {history:,} messages: {m['actor_recovery_full_ms']:.1f} ms by full "
        f"replay, {m['actor_recovery_checkpoint_ms']:.1f} ms from a checkpoint "
        f"({m['actor_recovery_ratio']:.1%})"
    )

    with_cp, without = measure(
        "checkpoint-1mb",
        functools.partial(
            checkpoint_cost, messages=sizes.checkpoint_messages, warmup=sizes.checkpoint_warmup
        ),
    )
    m["checkpoint_1mb_ms"] = (statistics.median(with_cp) - statistics.median(without)) * 1e3
    progress(
        f"1 MB checkpoint: {m['checkpoint_1mb_ms']:.2f} ms per message "
        f"({statistics.median(with_cp) * 1e3:.2f} ms with, "
        f"{statistics.median(without) * 1e3:.2f} ms without)"
    )

    elapsed = measure(
        "actor-messages",
        functools.partial(durable_actor_messages, per_worker=sizes.actor_throughput_per_worker),
    )
    m["actor_messages_per_second"] = ACTOR_CONCURRENCY * sizes.actor_throughput_per_worker / elapsed
    progress(
        f"durable actor messages: {m['actor_messages_per_second']:,.0f}/s "
        f"({ACTOR_CONCURRENCY} senders, {ACTOR_KEYS} keys)"
    )

    plain_actor, queue_actor = measure(
        "plain-actor",
        functools.partial(
            plain_actor_vs_queue,
            per_worker=sizes.plain_actor_per_worker,
            rounds=sizes.plain_actor_rounds,
        ),
    )
    m["plain_actor_us"] = plain_actor * 1e6
    m["queue_actor_us"] = queue_actor * 1e6
    m["plain_actor_over_queue"] = plain_actor / queue_actor
    progress(
        f"plain actor: {m['plain_actor_us']:.2f} us per message, asyncio.Queue actor "
        f"{m['queue_actor_us']:.2f} us: {m['plain_actor_over_queue']:.2f}x"
    )

    if first or sizes.timers_every_run:
        timed = measure(
            "timers",
            functools.partial(timer_lateness, timers=sizes.timers, window=sizes.timer_window),
        )
        m["timer_lateness_p50_ms"] = percentile(timed.lateness, 50) * 1e3
        m["timer_lateness_p99_ms"] = percentile(timed.lateness, 99) * 1e3
        m["timer_lateness_max_ms"] = max(timed.lateness) * 1e3
        m["timers"] = {
            "timers": len(timed.lateness),
            "parked": timed.parked,
            "resumed": timed.resumed,
            "resumed_after_due": timed.resumed_after_due,
            "parked_ahead_seconds": timed.parked_ahead,
            "timer_lead_seconds": timed.lead,
        }
        progress(
            f"timers: {len(timed.lateness):,} due over {sizes.timer_window:g} s, "
            f"{timed.parked:,} parked, {timed.resumed:,} resumed ({timed.resumed_after_due:,} "
            f"after their due time): lateness p50 {m['timer_lateness_p50_ms']:.1f} ms, "
            f"p99 {m['timer_lateness_p99_ms']:.1f} ms, max {m['timer_lateness_max_ms']:.1f} ms"
        )

    if first:
        n = sizes.suspended_workflows
        measured: dict[bool, dict[str, Any]] = {}
        for traced in (True, False):
            gc.collect()
            with stores.fresh("suspended-traced" if traced else "suspended-rss") as url:
                measured[traced] = suspended_memory(url, count=n, traced=traced)
        m["suspended_workflow_bytes"] = measured[True]["bytes"] / n
        m["suspended_workflow_rss_bytes"] = measured[False]["bytes"] / n
        m["suspended"] = {
            "workflows": n,
            "suspended_in_store": measured[True]["suspended"],
            "start_seconds": measured[False]["seconds"],
        }
        progress(
            f"suspended workflows: {n:,} parked, {m['suspended_workflow_bytes']:,.0f} bytes each "
            f"(tracemalloc), {m['suspended_workflow_rss_bytes']:,.0f} bytes each (RSS)"
        )

    if first and stores.postgres is not None:
        m.update(node_rows(stores, sizes, progress))

    times = measure(
        "fanout",
        functools.partial(fanout, children=sizes.fanout_children, repeats=sizes.fanout_repeats),
    )
    m["fanout_1000_seconds"] = statistics.median(times)
    progress(
        f"fan-out to {sizes.fanout_children:,} children: "
        + ", ".join(f"{t:.3f}" for t in times)
        + " s"
    )
    return m


def node_rows(stores: StoreFactory, sizes: Sizes, progress: Progress) -> dict[str, Any]:
    """The payment service as 1 and 2 node processes on PostgreSQL, and a failover."""
    from . import _bench_nodes

    m: dict[str, Any] = {
        "pg_workflows_per_second": {},
        "pg_workflow_latency_p50_ms": {},
        "pg_workflow_latency_p99_ms": {},
    }
    for nodes in (1, 2):
        with stores.fresh(f"nodes-{nodes}") as url:
            row = asyncio.run(
                _bench_nodes.throughput(url, nodes=nodes, per_worker=sizes.node_per_worker)
            )
        m["pg_workflows_per_second"][str(nodes)] = row["workflows_per_second"]
        m["pg_workflow_latency_p50_ms"][str(nodes)] = row["latency_p50_ms"]
        m["pg_workflow_latency_p99_ms"][str(nodes)] = row["latency_p99_ms"]
        progress(
            f"{nodes} node process(es), payments routed through PostgreSQL: "
            f"{row['workflows_per_second']:,.0f} workflows/s, p50 {row['latency_p50_ms']:.1f} ms, "
            f"p99 {row['latency_p99_ms']:.1f} ms"
        )
    with stores.fresh("failover") as url:
        row = asyncio.run(
            _bench_nodes.failover(url, payments=sizes.failover_payments, latency=FAILOVER_CHARGE)
        )
    m["failover_seconds"] = row.pop("failover_seconds")
    m["takeover_seconds"] = row.pop("takeover_seconds")
    m["failover"] = row
    progress(
        f"failover: the survivor held every partition {m['takeover_seconds']:.2f} s after the "
        f"SIGKILL and had finished the {row['in_flight']:.0f} payments in flight there "
        f"{m['failover_seconds']:.2f} s after it (default leases: "
        f"{row['lease_ttl_seconds']:g} s, renewed every {row['renew_every_seconds']:g} s)"
    )
    return m


def actor_history(sizes: Sizes) -> int:
    """Messages in the recovery rows' history: ``actor_history`` plus half a checkpoint
    interval, so that the checkpointed row replays the average 50 messages, not none."""
    return sizes.actor_history + ACTOR_CHECKPOINT_EVERY // 2


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure across the runs that measured it (recursing
    into nested objects)."""
    keys = list(dict.fromkeys(key for r in runs for key in r))
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs if key in r]
        if isinstance(values[0], dict):
            out[key] = median_of(values)
        else:
            out[key] = statistics.median(values)
    return out


# -- targets and report ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    metric: str
    op: str  # ">=", "<" or "<="
    value: float

    def met(self, figure: float) -> bool:
        if self.op == ">=":
            return figure >= self.value
        if self.op == "<=":
            return figure <= self.value
        return figure < self.value


TARGETS: dict[str, Target] = {
    t.metric: t
    for t in (
        Target("steps_per_second", ">=", 40_000),
        Target("workflows_per_second.256", ">=", 8_000),
        Target("step_latency_p50_ms", "<", 0.4),
        Target("workflow_latency_p50_ms", "<", 1.5),
        Target("actor_recovery_checkpoint_ms", "<", 25),
        Target("actor_recovery_ratio", "<=", 0.10),
        Target("checkpoint_1mb_ms", "<", 10),
        Target("actor_messages_per_second", ">=", 20_000),
        Target("plain_actor_over_queue", "<=", 1.10),
        Target("timer_lateness_p99_ms", "<", 50),
        Target("suspended_workflow_bytes", "<", 2048),
        Target("fanout_1000_seconds", "<", 0.5),
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
    ("actor_recovery_full_ms", "ms"),
    ("actor_recovery_checkpoint_ms", "ms"),
    ("actor_recovery_ratio", "x"),
    ("checkpoint_1mb_ms", "ms"),
    ("actor_messages_per_second", "msg/s"),
    ("plain_actor_us", "us"),
    ("queue_actor_us", "us"),
    ("plain_actor_over_queue", "x"),
    ("timer_lateness_p50_ms", "ms"),
    ("timer_lateness_p99_ms", "ms"),
    ("timer_lateness_max_ms", "ms"),
    ("suspended_workflow_bytes", "B"),
    ("suspended_workflow_rss_bytes", "B"),
    ("fanout_1000_seconds", "s"),
    *((f"pg_workflows_per_second.{n}", "wf/s") for n in (1, 2)),
    *((f"pg_workflow_latency_p50_ms.{n}", "ms") for n in (1, 2)),
    *((f"pg_workflow_latency_p99_ms.{n}", "ms") for n in (1, 2)),
    ("takeover_seconds", "s"),
    ("failover_seconds", "s"),
]


def row_note(path: str, figures: dict[str, Any], config: dict[str, Any]) -> str:
    """What the table says next to a row's name: the sizes behind the figure."""
    sizes = config["sizes"]
    if path == "timer_lateness_p50_ms":
        t = figures["timers"]
        runs = config["runs"] if sizes["timers_every_run"] else 1
        return (
            f"{t['timers']:,.0f} timers over {sizes['timer_window']:g} s, {t['parked']:,.0f} "
            f"parked, {t['resumed']:,.0f} resumed; {runs} run(s)"
        )
    if path == "suspended_workflow_bytes":
        return f"{sizes['suspended_workflows']:,} sleeping workflows; 1 run"
    if path.startswith("pg_workflows_per_second"):
        return (
            f"{_bench_nodes_concurrency()} workers x {sizes['node_per_worker']} payments, "
            f"{path[-1]} node process(es), routed from a client node; 1 run"
        )
    if path == "failover_seconds":
        f = figures["failover"]
        return (
            f"SIGKILL of 1 of 2 nodes to its {f['in_flight']:.0f} in-flight payments done; "
            f"default {f['lease_ttl_seconds']:g} s leases, {f['charge_seconds']:g} s charges"
        )
    if path == "fanout_1000_seconds":
        return f"{sizes['fanout_children']:,} children, median of {sizes['fanout_repeats']} a run"
    return ""


def _bench_nodes_concurrency() -> int:
    from ._bench_nodes import CONCURRENCY

    return CONCURRENCY


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


# On PostgreSQL (the scale-out issue's targets): what DBOS takes about 3.4 ms
# per step and 11 ms per payment workflow for on this machine's server.
POSTGRES_TARGETS: dict[str, Target] = {
    **{
        k: t
        for k, t in TARGETS.items()
        if k
        not in {
            "step_latency_p50_ms",
            "workflows_per_second.256",
            "workflow_latency_p50_ms",
            "steps_per_second",
        }
    },
    **{
        t.metric: t
        for t in (
            Target("step_latency_p50_ms", "<", 0.5),
            Target("workflows_per_second.256", ">=", 5_000),
            Target("failover_seconds", "<", 5),
        )
    },
}


def targets_for(figures: dict[str, Any]) -> dict[str, Target]:
    return POSTGRES_TARGETS if "pg_workflows_per_second" in figures else TARGETS


def target_report(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        path: {"op": t.op, "value": t.value, "met": t.met(lookup(figures, path))}
        for path, t in targets_for(figures).items()
        if has(figures, path)
    }


def has(figures: dict[str, Any], path: str) -> bool:
    try:
        lookup(figures, path)
    except KeyError:
        return False
    return True


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
    targets = targets_for(figures)
    for path, unit in ROWS:
        if not has(figures, path):
            continue  # a row of another store (the node rows: PostgreSQL only)
        value = lookup(figures, path)
        t = targets.get(path)
        note = row_note(path, figures, config)
        name = f"{path} [dim]({note})[/dim]" if note else path
        if t is None:
            table.add_row(name, f"{_fmt(value)} {unit}", "", "")
        else:
            ok = t.met(value)
            table.add_row(
                name,
                f"{_fmt(value)} {unit}",
                f"{t.op} {_fmt(t.value)}",
                "[green]yes[/green]" if ok else "[red]no[/red]",
            )
    console = Console()
    console.print(table)
    load = config.get("load_average_at_start")
    console.print(
        f"python {config['python']}, {config['cpu_count']} CPUs, "
        f"SQLite {config['sqlite_version']}"
        + (f", PostgreSQL {config['postgres_version']}" if config.get("postgres_version") else "")
        + f", load average at start {load}, "
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
        "store": stores.label or "sqlite (temporary file, synchronous=full)",
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
        "postgres_version": stores.server_version,
        "msgspec": msgspec.__version__,
        "steps_per_workflow": STEPS_PER_WORKFLOW,
        "steps_concurrency": STEPS_CONCURRENCY,
        "actor_concurrency": ACTOR_CONCURRENCY,
        "actor_keys": ACTOR_KEYS,
        "actor_checkpoint_every": ACTOR_CHECKPOINT_EVERY,
        "actor_history_messages": actor_history(sizes),
        "checkpoint_state_bytes": len(msgspec.json.encode(big_ledger())),
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
    help="Store to measure, e.g. memory://, 'sqlite:///x.db?synchronous=normal' (fresh "
    "files go into a temporary directory next to x.db) or "
    "'postgresql://host/db?schema=bench' (fresh schemas bench_<measurement>, dropped "
    "after). Default: a temporary SQLite file, synchronous=full.",
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
@click.option(
    "--timer-window",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    hidden=True,
    help="Internal (the tests): seconds over which the timer row's wake-ups are spread.",
)
def bench(
    quick: bool,
    runs: int,
    store_url: str | None,
    as_json: bool,
    output: str,
    scale: float,
    timer_window: float,
) -> None:
    """Measure Perdure's latency and throughput: a payment workflow, steps, actors,
    durable timers, suspended workflows and fan-out."""
    from rich.console import Console

    err = Console(stderr=True)
    sizes = dataclasses.replace((QUICK if quick else FULL).scaled(scale), timer_window=timer_window)
    stores = StoreFactory(store_url)
    results: list[dict[str, Any]] = []
    try:
        config = describe_config(stores, runs, quick, scale, sizes)
        began = time.perf_counter()
        for r in range(runs):

            def progress(msg: str, r: int = r) -> None:
                err.print(f"[dim]run {r + 1}/{runs}[/dim] {msg}", highlight=False)

            results.append(run_once(stores, sizes, progress, first=r == 0))
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
