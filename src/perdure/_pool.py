"""A thread pool for sync steps, lean on the event-loop side.

``loop.run_in_executor`` costs a concurrent future, a chained asyncio future
and one self-pipe write per completion. Here completions are queued and the
loop is woken once for all that finished since it last looked, which matters
when thousands of short steps finish per second.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP: Any = object()


class StepPool:
    """Runs callables on worker threads; results come back as asyncio futures.

    Threads start on demand, up to ``max_threads``, when every started one is
    busy, so a step that blocks on I/O does not hold up the others.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_threads: int) -> None:
        self._loop = loop
        self._max_threads = max_threads
        self._jobs: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[[], Any]]] = (
            queue.SimpleQueue()
        )
        self._done: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = collections.deque()
        self._wakeup_pending = False
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("the step pool is shut down")
        future = self._loop.create_future()
        self._jobs.put((future, call))
        if self._idle == 0 and len(self._threads) < self._max_threads:
            self._spawn()
        return future

    def _spawn(self) -> None:
        with self._lock:
            thread = threading.Thread(
                target=self._work, name=f"perdure-step-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            self._idle += 1
        thread.start()

    def _work(self) -> None:
        jobs, done, loop = self._jobs, self._done, self._loop
        while True:
            future, call = jobs.get()
            with self._lock:
                self._idle -= 1
            if future is _STOP:
                return
            try:
                outcome = (future, True, call())
            except BaseException as exc:
                outcome = (future, False, exc)
            done.append(outcome)
            if not self._wakeup_pending:
                self._wakeup_pending = True
                try:
                    loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass
            with self._lock:
                self._idle += 1

    def _drain(self) -> None:
        self._wakeup_pending = False
        done = self._done
        while done:
            future, ok, value = done.popleft()
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def shutdown(self) -> None:
        """Stop the threads once their current step returns; do not wait."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put((_STOP, _STOP))
