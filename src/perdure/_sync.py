"""A blocking facade over the async runtime, for code without an event loop."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from ._client import InvocationHandle
from ._errors import ConfigurationError
from ._runtime import Runtime
from ._workflow import Workflow

T = TypeVar("T")
R = TypeVar("R")


class SyncHandle(Generic[R]):
    """The blocking twin of :class:`InvocationHandle`."""

    def __init__(self, runtime: SyncRuntime, handle: InvocationHandle[R]) -> None:
        self._runtime = runtime
        self._handle = handle
        self.id = handle.id
        self.target = handle.target

    def status(self) -> Any:
        return self._runtime._call(self._handle.status)

    def result(self, *, timeout: float | None = None) -> R:
        return self._runtime._call(functools.partial(self._handle.result, timeout=timeout))


class SyncRuntime:
    """Runs a :class:`Runtime` on a background event loop.

    >>> with SyncRuntime("sqlite:///payments.db", workflows=[process_payment]) as rt:
    ...     receipt = rt.run(process_payment, request, idempotency_key="pay-1")

    Takes the same arguments as :class:`Runtime`. Refuses to be used inside a
    running event loop: there, use the async :class:`Runtime` directly.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_in_loop()
        self.runtime = Runtime(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SyncRuntime:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        _refuse_in_loop()
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="perdure-loop", daemon=True)
        self._thread.start()
        self._loop = loop
        try:
            self._call(self.runtime.start)
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self.runtime.stop)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def _call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run the coroutine ``make()`` returns on the runtime's loop and wait.

        Takes a factory so that no coroutine exists when the call is refused.
        """
        _refuse_in_loop()
        if self._loop is None:
            raise ConfigurationError("the SyncRuntime is not started: use 'with SyncRuntime(...)'")
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    def start_workflow(
        self,
        workflow: Workflow[Any, R] | str,
        /,
        *args: Any,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> SyncHandle[R]:
        """Start a workflow; see :meth:`Client.start`."""
        handle = self._call(
            functools.partial(
                self.runtime.client.start,
                workflow,
                *args,
                idempotency_key=idempotency_key,
                **kwargs,
            )
        )
        return SyncHandle(self, handle)

    def run(
        self,
        workflow: Workflow[Any, R] | str,
        /,
        *args: Any,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> R:
        """Start a workflow and wait for its result; see :meth:`Client.run`."""
        result: R = self._call(
            functools.partial(
                self.runtime.client.run, workflow, *args, idempotency_key=idempotency_key, **kwargs
            )
        )
        return result

    def get(self, invocation_id: str) -> SyncHandle[Any]:
        return SyncHandle(
            self, self._call(functools.partial(self.runtime.client.get, invocation_id))
        )


def _refuse_in_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise ConfigurationError(
        "SyncRuntime cannot be used inside a running event loop; use the async Runtime there"
    )
