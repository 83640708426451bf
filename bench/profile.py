"""Profile Perdure's hot path with cProfile, in every thread.

    .venv/bin/python bench/profile.py payments            # 64 concurrent payment workflows
    .venv/bin/python bench/profile.py steps               # one 100-step workflow at a time
    .venv/bin/python bench/profile.py steps --sync        # the same with sync step functions
    .venv/bin/python bench/profile.py steps --concurrency 64   # 64 concurrent 100-step workflows
    .venv/bin/python bench/profile.py payments --store memory:// --top 25 --dump prof/
    .venv/bin/python bench/profile.py actors              # 256 senders x 40 durable actor asks
    .venv/bin/python bench/profile.py plain-actors        # plain actor asks and the Queue baseline
    .venv/bin/python bench/profile.py recovery            # rebuild a 10,050-message actor
    .venv/bin/python bench/profile.py recovery --checkpoints   # the same, checkpoint_every=100
    .venv/bin/python bench/profile.py timers              # 10,000 parked sleeps due within 1 s
    .venv/bin/python bench/profile.py fanout              # a parent gathering 1,000 children, 3x

The workloads are the ones ``perdure bench`` times (imported from
``perdure._bench``), on a fresh temporary SQLite file (synchronous=full)
unless ``--store`` says otherwise. Perdure's time is spread over threads -- the
event loop, the SQLite writer, the step thread pool -- so each thread gets its
own profiler and the report shows each kind of thread separately: the time
per category (SQLite, msgspec, asyncio, thread handoffs, Perdure's own
modules...), then the top functions by tottime and by cumtime.

Times are wall-clock: a thread that waits (the loop in epoll, the writer in
its queue) shows that wait as the tottime of the waiting call, which is what
tells whether a thread is busy or starved. cProfile slows pure-Python code
down by roughly 1.5-2x, so read the shares, not the absolute figures.
"""

from __future__ import annotations

import os
import sys

# This file is named profile.py, and cProfile imports the standard library's
# ``profile``: drop this directory from the path so that it finds the right one.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Coroutine  # noqa: E402
from typing import Any  # noqa: E402

from perdure._bench import (  # noqa: E402
    ACTOR_CONCURRENCY,
    ACTOR_KEYS,
    STEPS_PER_WORKFLOW,
    StoreFactory,
    TimerRun,
    actor_recovery,
    concurrent_payments,
    concurrent_steps,
    durable_actor_messages,
    fanout,
    percentile,
    plain_actor_vs_queue,
    sequential_steps,
    timer_lateness,
)


class ThreadProfiles:
    """One cProfile profiler per thread, for the main thread and every thread started later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.profiles: list[tuple[str, cProfile.Profile]] = []
        self._main = cProfile.Profile()

    def _bootstrap(self, frame: Any, event: str, arg: Any) -> None:
        # threading installs this as the new thread's profile function; the
        # first event replaces it with a real profiler for that thread.
        profile = cProfile.Profile()
        with self._lock:
            self.profiles.append((threading.current_thread().name, profile))
        profile.enable()

    def start(self) -> None:
        threading.setprofile(self._bootstrap)
        self._main.enable()

    def stop(self) -> None:
        self._main.disable()
        threading.setprofile(None)
        # Let the workload's threads finish, so that no profiler is still writing.
        for thread in threading.enumerate():
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def grouped(self) -> dict[str, pstats.Stats]:
        """Stats merged per kind of thread (numbered pool threads together)."""
        groups: dict[str, pstats.Stats] = {"event loop (MainThread)": pstats.Stats(self._main)}
        for name, profile in self.profiles:
            group = re.sub(r"[_-]\d+$", "", name)
            if group in groups:
                groups[group].add(profile)
            else:
                groups[group] = pstats.Stats(profile)
        return groups


def category(filename: str, func: str) -> str:
    """A coarse bucket for a function, to say where a thread's time goes."""
    if filename == "~":  # a C function
        if "sqlite3" in func:
            return "sqlite3 (execute/commit, incl. fsync)"
        if "msgspec" in func:
            return "msgspec (encode/decode/convert)"
        if "epoll" in func or "select" in func:
            return "idle: waiting in the selector"
        if "SimpleQueue" in func or "_thread.lock" in func or "acquire" in func:
            return "thread sync: queues and locks (waits included)"
        if "posix.write" in func or "send" in func or "recv" in func or "posix.read" in func:
            return "thread handoff: self-pipe wakeups"
        if "_asyncio" in func or "_contextvars" in func or "Context" in func:
            return "asyncio (C: futures, tasks, contextvars)"
        return "other builtins"
    path = filename.replace("\\", "/")
    if "/perdure/" in path:
        return "perdure " + path.split("/perdure/", 1)[1]
    if "/asyncio/" in path:
        return "asyncio (Python)"
    if "/concurrent/futures/" in path:
        return "executor: concurrent.futures"
    if path.endswith(("/threading.py", "/queue.py")):
        return "thread sync: threading.py/queue.py"
    if "/msgspec/" in path:
        return "msgspec (Python)"
    if path.endswith(("/dataclasses.py", "/enum.py", "/typing.py", "/functools.py")):
        return "stdlib: dataclasses/enum/typing/functools"
    if "/perdure_bench" in path or path.endswith("profile.py"):
        return "benchmark harness"
    return "other Python"


_WAITS = ("idle:", "thread sync: queues and locks")


def categories(stats: pstats.Stats) -> list[tuple[str, float]]:
    totals: dict[str, float] = defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        totals[category(filename, func)] += tottime
    return sorted(totals.items(), key=lambda kv: -kv[1])


def top(stats: pstats.Stats, sort: str, limit: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(limit)
    lines = out.getvalue().splitlines()
    # Drop pstats' preamble up to the column header.
    for i, line in enumerate(lines):
        if line.lstrip().startswith("ncalls"):
            return "\n".join(lines[i:]).rstrip()
    return "\n".join(lines).rstrip()


def report(
    profiles: ThreadProfiles, sorts: list[str], limit: int, dump: str | None, threads: str
) -> None:
    groups = profiles.grouped()
    if dump:
        os.makedirs(dump, exist_ok=True)
    for name, stats in groups.items():
        if threads == "main" and not name.startswith("event loop"):
            continue
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in raw.values())
        if total < 1e-3:
            continue
        shares = categories(stats)
        waiting = sum(sec for cat, sec in shares if cat.startswith(_WAITS))
        if total - waiting < max(0.01, 0.02 * total):
            print(f"\n=== {name}: idle ({waiting:.3f} of {total:.3f} s waiting) ===")
            continue
        print(
            f"\n=== {name}: {total:.3f} s profiled (sum of tottime), "
            f"busy {total - waiting:.3f} s ==="
        )
        for cat, seconds in shares:
            if seconds / total >= 0.005:
                print(f"  {seconds:8.3f} s  {100 * seconds / total:5.1f}%  {cat}")
        if dump:
            path = os.path.join(dump, re.sub(r"[^\w.-]+", "_", name) + ".prof")
            stats.dump_stats(path)
            print(f"  (written to {path})")
        stats.strip_dirs()
        for sort in sorts:
            print(f"\n--- {name}: top {limit} by {sort} ---")
            print(top(stats, sort, limit))


Workload = Callable[[str], Coroutine[Any, Any, Any]]


def workload(args: argparse.Namespace) -> tuple[str, Workload, Callable[[Any], str]]:
    kind = "sync" if args.sync else "async"
    if args.workload == "payments":
        concurrency = args.concurrency or 64
        per_worker = args.count or 100

        def payments(url: str) -> Coroutine[Any, Any, float]:
            return concurrent_payments(
                url, concurrency=concurrency, per_worker=per_worker, warmup_per_worker=2
            )

        def payments_summary(elapsed: Any) -> str:
            n = concurrency * per_worker
            return f"{n} payment workflows in {elapsed:.3f} s: {n / elapsed:,.0f} workflows/s"

        title = f"payment workflows, {concurrency} workers x {per_worker} each"
        return title, payments, payments_summary

    if args.workload == "actors":
        actor_count = args.count or 40

        def actors(url: str) -> Coroutine[Any, Any, float]:
            return durable_actor_messages(url, per_worker=actor_count)

        def actors_summary(elapsed: Any) -> str:
            n = ACTOR_CONCURRENCY * actor_count
            return f"{n} durable actor messages in {elapsed:.3f} s: {n / elapsed:,.0f}/s"

        title = (
            f"durable actor asks, {ACTOR_CONCURRENCY} senders x {actor_count} each "
            f"over {ACTOR_KEYS} keys (plus a warm-up message per key)"
        )
        return title, actors, actors_summary

    if args.workload == "plain-actors":
        plain_count = args.count or 200

        def plain(url: str) -> Coroutine[Any, Any, tuple[float, float]]:
            return plain_actor_vs_queue(url, per_worker=plain_count, rounds=3)

        def plain_summary(result: Any) -> str:
            p, q = result
            return (
                f"plain actor {p * 1e6:.2f} us/message, Queue actor {q * 1e6:.2f} us: {p / q:.2f}x"
            )

        title = (
            f"plain actor asks and the asyncio.Queue baseline, {ACTOR_CONCURRENCY} senders x "
            f"{plain_count} each over {ACTOR_KEYS} keys, 4 rounds of each"
        )
        return title, plain, plain_summary

    if args.workload == "recovery":
        history = args.count or 10_050

        def recovery(url: str) -> Coroutine[Any, Any, float]:
            return actor_recovery(url, checkpointed=args.checkpoints, history=history)

        def recovery_summary(elapsed: Any) -> str:
            return f"actor rebuilt in {elapsed * 1e3:.2f} ms"

        how = "checkpoint_every=100" if args.checkpoints else "no checkpoint"
        title = (
            f"actor recovery, {history} messages, {how} (the profile includes writing the "
            "history: read the event loop's rebuild/_load/_replay lines)"
        )
        return title, recovery, recovery_summary

    if args.workload == "timers":
        timers = args.count or 10_000

        def timer_row(url: str) -> Coroutine[Any, Any, TimerRun]:
            return timer_lateness(url, timers=timers, window=1.0)

        def timers_summary(run: Any) -> str:
            late = run.lateness
            return (
                f"{len(late)} timers: lateness p50 {percentile(late, 50) * 1e3:.1f} ms, "
                f"p99 {percentile(late, 99) * 1e3:.1f} ms; {run.resumed_after_due} resumed "
                "after their due time"
            )

        title = (
            f"{timers} parked durable sleeps due over 1 s (the profile includes starting and "
            "parking them, and waiting for the window: read the share of resume/_execute/_wait)"
        )
        return title, timer_row, timers_summary

    if args.workload == "fanout":
        children = args.count or 1000

        def fanout_row(url: str) -> Coroutine[Any, Any, list[float]]:
            return fanout(url, children=children, repeats=3)

        def fanout_summary(times: Any) -> str:
            return f"fan-out to {children} children: " + ", ".join(f"{t:.3f}" for t in times) + " s"

        title = f"a parent that starts {children} one-step children and gathers them, 3 times"
        return title, fanout_row, fanout_summary

    concurrency = args.concurrency or 1
    if concurrency > 1:
        per_worker = args.count or 2

        def concurrent(url: str) -> Coroutine[Any, Any, float]:
            return concurrent_steps(
                url,
                sync_steps=args.sync,
                concurrency=concurrency,
                workflows_per_worker=per_worker,
                steps=args.steps,
            )

        def concurrent_summary(elapsed: Any) -> str:
            n = concurrency * per_worker * args.steps
            return f"{n} steps in {elapsed:.3f} s: {n / elapsed:,.0f} steps/s"

        title = (
            f"{args.steps}-step workflows ({kind} step function), "
            f"{concurrency} workers x {per_worker} each"
        )
        return title, concurrent, concurrent_summary

    workflows = args.count or 20

    def steps(url: str) -> Coroutine[Any, Any, list[float]]:
        return sequential_steps(url, sync_steps=args.sync, workflows=workflows, steps=args.steps)

    def steps_summary(timings: Any) -> str:
        ordered = sorted(timings)
        p50 = ordered[len(ordered) // 2] * 1e3
        return f"{len(timings)} steps, one at a time: p50 {p50:.3f} ms per ctx.run"

    title = f"{workflows} sequential {args.steps}-step workflows ({kind} step function)"
    return title, steps, steps_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "workload",
        choices=["payments", "steps", "actors", "plain-actors", "recovery", "timers", "fanout"],
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="workers (payments: 64; steps: 1, i.e. one workflow at a time)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=0,
        help="workflows per worker (payments: 100; steps: 20 sequential, 2 concurrent); "
        "actors: messages per sender (actors: 40, plain-actors: 200); recovery: history; "
        "timers: timers (10,000); fanout: children (1,000)",
    )
    parser.add_argument("--steps", type=int, default=STEPS_PER_WORKFLOW, help="steps per workflow")
    parser.add_argument("--sync", action="store_true", help="steps: a sync step function")
    parser.add_argument("--checkpoints", action="store_true", help="recovery: checkpoint_every=100")
    parser.add_argument("--store", default=None, help="store URL (default: temp SQLite, full)")
    parser.add_argument("--top", type=int, default=15, help="functions per table")
    parser.add_argument("--sort", default="tottime,cumtime", help="comma-separated pstats keys")
    parser.add_argument("--threads", choices=["all", "main"], default="all")
    parser.add_argument("--dump", default=None, help="directory for .prof files (snakeviz...)")
    args = parser.parse_args(argv)

    title, run, summarize = workload(args)
    stores = StoreFactory(args.store)
    store_pattern = stores.pattern
    profiles = ThreadProfiles()
    try:
        with stores.fresh("profile") as url:
            cpu0, thread0, wall0 = os.times(), time.thread_time(), time.perf_counter()
            profiles.start()
            try:
                result = asyncio.run(run(url))
            finally:
                profiles.stop()
            wall = time.perf_counter() - wall0
            cpu1, main_cpu = os.times(), time.thread_time() - thread0
    finally:
        stores.cleanup()
    user, system = cpu1.user - cpu0.user, cpu1.system - cpu0.system
    print(f"workload: {title}")
    print(f"store: {store_pattern}")
    print(summarize(result) + " (under the profiler)")
    print(
        f"wall {wall:.3f} s; process CPU {user + system:.3f} s (user {user:.3f}, sys "
        f"{system:.3f}) = {(user + system) / wall:.2f} cores; main thread CPU {main_cpu:.3f} s"
    )
    report(
        profiles,
        [s.strip() for s in args.sort.split(",") if s.strip()],
        args.top,
        args.dump,
        args.threads,
    )


if __name__ == "__main__":
    main()
