"""Prometheus metrics of one runtime, in a registry of its own.

Counters are read from ``runtime.stats`` when scraped, so they cost nothing
while the runtime works; the histograms are fed by the runtime's hooks. The
two gauges of suspended invocations come from one count query on the store,
made when scraped (``await metrics.refresh()``; :func:`metrics_app` and the
ingress's ``GET /metrics`` do it).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError, PerdureError
from .._hooks import BatchCommit, Hooks, StepFailure, StepInfo

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .._runtime import Runtime

# Seconds: a journaled step is ~0.2 ms here; external calls take far longer.
STEP_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
    *(0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Metrics:
    """The metrics of one runtime; get them with :func:`enable_metrics`.

    ``registry`` is a ``prometheus_client.CollectorRegistry`` of this runtime
    only; ``render()`` is the text exposition format.
    """

    def __init__(self, runtime: Runtime) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram
        except ImportError:
            raise ConfigurationError(
                "metrics need prometheus-client: pip install 'perdure[metrics]'"
            ) from None
        self.runtime = runtime
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            "perdure_step_seconds",
            "Latency of live step attempts, from the call to its committed outcome.",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.commit_batch_size = Histogram(
            "perdure_journal_commit_batch_size",
            "Writes per group-committed storage transaction.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "perdure_journal_commit_seconds",
            "Duration of group-committed storage transactions (BEGIN to COMMIT done).",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.suspended = 0
        self.timers_pending = 0
        self.registry.register(_StatsCollector(self))
        self._began: contextvars.ContextVar[float] = contextvars.ContextVar(
            "perdure_metrics_step", default=0.0
        )

    def hooks(self) -> Hooks:
        return Hooks(
            before_step=self._before_step,
            after_step=self._after_step,
            step_failed=self._step_failed,
            after_batch_commit=self._batch_committed,
        )

    async def refresh(self) -> None:
        """Count the suspended invocations in the store (for the gauges)."""
        if not self.runtime._started:
            return
        try:
            self.suspended, self.timers_pending = await self.runtime.store.count_suspended()
        except PerdureError:
            pass  # a store that cannot answer now: the last counts stand

    def render(self) -> bytes:
        """The registry in Prometheus's text format (call ``refresh()`` first)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def _before_step(self, info: StepInfo) -> None:
        self._began.set(time.perf_counter())

    def _after_step(self, info: StepInfo) -> None:
        began = self._began.get()
        if began:
            self.step_seconds.observe(time.perf_counter() - began)
            self._began.set(0.0)

    def _step_failed(self, failure: StepFailure) -> None:
        self._after_step(failure.step)

    def _batch_committed(self, batch: BatchCommit) -> None:
        self.commit_batch_size.observe(batch.size)
        self.commit_seconds.observe(batch.seconds)


class _StatsCollector:
    """Counters and gauges read from the runtime when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # no fixed description: collect() is cheap, and names never clash

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._metrics.runtime.stats
        invocations = CounterMetricFamily(
            "perdure_invocations",
            "Invocations that finished in this process, by final status.",
            labels=["status"],
        )
        invocations.add_metric(["completed"], stats.invocations_completed)
        invocations.add_metric(["failed"], stats.invocations_failed)
        invocations.add_metric(["cancelled"], stats.invocations_cancelled)
        yield invocations
        yield CounterMetricFamily(
            "perdure_invocations_started",
            "Invocations created by this process.",
            value=stats.invocations_started,
        )
        steps = CounterMetricFamily(
            "perdure_steps",
            "Steps: run live, replayed from the journal, or deduplicated by idempotency key.",
            labels=["kind"],
        )
        steps.add_metric(["executed"], stats.steps_executed)
        steps.add_metric(["replayed"], stats.steps_replayed)
        steps.add_metric(["deduplicated"], stats.steps_deduplicated)
        yield steps
        yield CounterMetricFamily(
            "perdure_step_retries",
            "Step attempts that failed and were retried.",
            value=stats.step_retries,
        )
        recovery = CounterMetricFamily(
            "perdure_recovery",
            "What recovery resumed when the runtime started.",
            labels=["kind"],
        )
        recovery.add_metric(["invocation"], stats.invocations_recovered)
        recovery.add_metric(["actor"], stats.actors_recovered)
        yield recovery
        yield GaugeMetricFamily(
            "perdure_recovery_seconds",
            "How long the recovery at the last start took.",
            value=stats.recovery_seconds,
        )
        yield GaugeMetricFamily(
            "perdure_invocations_suspended",
            "Suspended (parked) invocations in the store, counted when scraped.",
            value=self._metrics.suspended,
        )
        yield GaugeMetricFamily(
            "perdure_timers_pending",
            "Suspended invocations with a wake-up time (a timer or a deadline) in the store.",
            value=self._metrics.timers_pending,
        )


def metrics_app(runtime: Runtime) -> ASGIApp:
    """A bare ASGI app that serves ``runtime``'s metrics on every GET, for
    mounting in an app of your own (no authentication: mount it behind yours).

    >>> app.mount("/metrics", perdure.observability.metrics_app(rt))  # Starlette
    """
    from . import enable_metrics

    metrics = enable_metrics(runtime)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"GET only\n", "text/plain; charset=utf-8")
            return
        await metrics.refresh()
        body = metrics.render()
        await _respond(send, 200, b"" if scope["method"] == "HEAD" else body, CONTENT_TYPE)

    return app


async def _respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
