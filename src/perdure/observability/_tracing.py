"""OpenTelemetry spans for invocation runs and steps, fired from the runtime's hooks.

A span per run of an invocation in this process (``perdure.invocation
<target>``) and, inside it, a span per live step attempt (``perdure.step
<name>``). A step that comes back from the journal on replay did no work, so
it gets no span: it is an event (``perdure.step.replayed``) on the run's span,
which keeps a replay of thousands of steps from flooding the trace.

Trace context travels in-process: an invocation's run continues the trace
that was current where it was created (the caller of ``client.start``, a
parent workflow for a child, the sending step for an actor message, the
``traceparent`` of an HTTP request). Nothing is stored with the invocation,
so a run resumed after a restart starts a new trace (``perdure.replayed``
is true on it).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError
from .._hooks import Hooks, InvocationEnd, InvocationInfo, StepFailure, StepInfo

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.trace import Span, TracerProvider

    from ..storage._records import InvocationRecord

# Creating contexts kept for invocations that have not finished (a parked one
# continues its trace when it resumes here); the oldest go first past this.
MAX_PARENTS = 10_000
_ERROR_OUTCOMES = ("failed", "stopped", "interrupted")


def _otel() -> Any:
    try:
        import opentelemetry.context
        import opentelemetry.trace
    except ImportError:
        raise ConfigurationError(
            "tracing needs OpenTelemetry: pip install 'perdure[otel]'"
        ) from None
    return opentelemetry


class Tracing:
    """The spans of one runtime; made by :func:`perdure.observability.instrument`."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        otel = _otel()
        from .. import __version__

        self._context = otel.context
        self._trace = otel.trace
        self.tracer = otel.trace.get_tracer("perdure", __version__, tracer_provider=tracer_provider)
        self._parents: dict[str, OtelContext] = {}
        self._runs: dict[str, Span] = {}
        # The live step's span and the token that made it current, in the
        # invocation's own task: gone with the task if the step never ends.
        self._step: contextvars.ContextVar[tuple[Span, object] | None] = contextvars.ContextVar(
            "perdure_otel_step", default=None
        )

    def hooks(self) -> Hooks:
        return Hooks(
            invocation_created=self._created,
            before_invocation=self._before_invocation,
            after_invocation=self._after_invocation,
            before_step=self._before_step,
            after_step=self._after_step,
            step_failed=self._step_failed,
            step_replayed=self._step_replayed,
        )

    @contextlib.contextmanager
    def continue_trace(self, headers: Mapping[str, str]) -> Iterator[None]:
        """Make the trace in ``headers`` (W3C ``traceparent``) current, so the
        invocations started inside continue it."""
        from opentelemetry.propagate import extract

        token = self._context.attach(extract(headers))
        try:
            yield
        finally:
            self._context.detach(token)

    # -- invocations -----------------------------------------------------------------

    def _created(self, rec: InvocationRecord) -> None:
        current = self._context.get_current()
        if not self._trace.get_current_span(current).get_span_context().is_valid:
            return
        parents = self._parents
        if len(parents) >= MAX_PARENTS:
            del parents[next(iter(parents))]
        parents[rec.id] = current

    def _before_invocation(self, info: InvocationInfo) -> None:
        parent = self._parents.get(info.invocation_id) or self._context.Context()
        attributes: dict[str, Any] = {
            "perdure.invocation_id": info.invocation_id,
            "perdure.target": info.target,
            "perdure.replayed": info.resumed,
        }
        if info.actor_type is not None:
            attributes["perdure.actor.type"] = info.actor_type
            attributes["perdure.actor.key"] = info.actor_key or ""
        if info.parent_id is not None:
            attributes["perdure.parent_id"] = info.parent_id
        span = self.tracer.start_span(
            f"perdure.invocation {info.target}", context=parent, attributes=attributes
        )
        self._runs[info.invocation_id] = span
        # Fired in the invocation's own task: its context dies with the task,
        # so there is nothing to detach.
        self._context.attach(self._trace.set_span_in_context(span))

    def _after_invocation(self, end: InvocationEnd) -> None:
        span = self._runs.pop(end.invocation_id, None)
        if end.outcome != "suspended":
            self._parents.pop(end.invocation_id, None)
        if span is None:
            return
        span.set_attribute("perdure.status", end.outcome)
        if end.outcome in _ERROR_OUTCOMES:
            self._error(span, end.error, end.outcome)
        span.end()

    def _error(self, span: Span, error: BaseException | None, what: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        if error is not None:
            span.record_exception(error)
            what = f"{type(error).__name__}: {error}"
        span.set_status(Status(StatusCode.ERROR, what))

    # -- steps -----------------------------------------------------------------------

    def _before_step(self, info: StepInfo) -> None:
        if not self._trace.get_current_span().is_recording():
            # A run that was not sampled: its steps would not be either, and
            # its context is current already for what the step calls.
            return
        span = self.tracer.start_span(
            f"perdure.step {info.name}",
            # Few attributes: the SDK's cost grows with them, and the run's
            # span carries the invocation's.
            attributes={
                "perdure.step.index": info.index,
                "perdure.step.attempt": info.attempt,
                "perdure.replayed": False,
            },
        )
        token = self._context.attach(self._trace.set_span_in_context(span))
        self._step.set((span, token))

    def _end_step(self) -> Span | None:
        current = self._step.get()
        if current is None:
            return None
        self._step.set(None)
        span, token = current
        self._context.detach(token)
        return span

    def _after_step(self, info: StepInfo) -> None:
        span = self._end_step()
        if span is not None:
            span.end()

    def _step_failed(self, failure: StepFailure) -> None:
        span = self._end_step()
        if span is None:
            return
        span.set_attribute("perdure.step.retrying", failure.retrying)
        self._error(span, failure.error, "failed")
        span.end()

    def _step_replayed(self, info: StepInfo) -> None:
        span = self._runs.get(info.invocation_id)
        if span is not None:
            span.add_event(
                "perdure.step.replayed",
                {"perdure.step.name": info.name, "perdure.step.index": info.index},
            )
