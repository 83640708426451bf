"""Observability: OpenTelemetry spans, Prometheus metrics, logging filters.

Nothing here runs unless asked for, and nothing is installed by default::

    from perdure import observability

    observability.instrument(rt, tracer_provider=provider)   # spans (perdure[otel])
    registry = observability.enable_metrics(rt).registry     # metrics (perdure[metrics])
    app.mount("/metrics", observability.metrics_app(rt))     # or GET /metrics of the ingress

    handler.addFilter(observability.InvocationFilter())      # %(invocation_id)s
    handler.addFilter(observability.ReplayFilter())          # replayed code does not log twice

Both ``instrument`` and ``enable_metrics`` add hooks to ``rt.hooks``
(:class:`perdure.testing.Hooks`), alongside any the runtime was built with;
call them before ``rt.start()`` to see recovery's runs too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import ConfigurationError
from .._hooks import BatchCommit as BatchCommit
from .._hooks import InvocationEnd as InvocationEnd
from .._hooks import InvocationInfo as InvocationInfo
from .._hooks import StepFailure as StepFailure
from .._hooks import chain
from ._logging import InvocationFilter as InvocationFilter
from ._logging import ReplayFilter as ReplayFilter
from ._metrics import Metrics as Metrics
from ._metrics import metrics_app as metrics_app
from ._tracing import Tracing as Tracing

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .._runtime import Runtime

__all__ = [
    "BatchCommit",
    "InvocationEnd",
    "InvocationFilter",
    "InvocationInfo",
    "Metrics",
    "ReplayFilter",
    "StepFailure",
    "Tracing",
    "enable_metrics",
    "instrument",
    "metrics_app",
    "tracing_of",
]

_TRACING = "perdure.tracing"
_METRICS = "perdure.metrics"


def instrument(runtime: Runtime, tracer_provider: TracerProvider | None = None) -> Tracing:
    """Trace ``runtime``: a span per invocation run, a child span per live step.

    ``tracer_provider``: where spans go (None: OpenTelemetry's global one).
    Needs ``pip install 'perdure[otel]'``. A runtime is instrumented once; a
    second call with the same provider returns the same :class:`Tracing`.

    >>> provider = TracerProvider()
    >>> provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    >>> perdure.observability.instrument(rt, tracer_provider=provider)
    """
    found = runtime.extensions.get(_TRACING)
    if found is not None:
        tracing, provider = found
        if provider is not tracer_provider:
            raise ConfigurationError(
                "this runtime is already traced with another tracer provider; instrument it once"
            )
        assert isinstance(tracing, Tracing)
        return tracing
    tracing = Tracing(tracer_provider)
    runtime.hooks = chain(runtime.hooks, tracing.hooks())
    runtime.extensions[_TRACING] = (tracing, tracer_provider)
    return tracing


def tracing_of(runtime: Runtime) -> Tracing | None:
    """The runtime's :class:`Tracing`, if :func:`instrument` traced it."""
    found = runtime.extensions.get(_TRACING)
    if found is None:
        return None
    tracing: Tracing = found[0]
    return tracing


def enable_metrics(runtime: Runtime) -> Metrics:
    """``runtime``'s Prometheus metrics, made (and hooked in) on the first call.

    Needs ``pip install 'perdure[metrics]'``. Metrics live in the runtime's
    own registry (``.registry``), never in prometheus_client's global one.
    """
    found = runtime.extensions.get(_METRICS)
    if isinstance(found, Metrics):
        return found
    metrics = Metrics(runtime)
    runtime.hooks = chain(runtime.hooks, metrics.hooks())
    runtime.extensions[_METRICS] = metrics
    return metrics
