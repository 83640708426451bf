"""perdure.observability: OpenTelemetry spans, Prometheus metrics, logging filters."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

import perdure
from conftest import Backend
from perdure import observability
from perdure.ingress import create_app
from perdure.testing import FakeClock

log = logging.getLogger("app.payments")


@dataclasses.dataclass
class Spans:
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name.startswith(prefix)]

    def one(self, name: str) -> ReadableSpan:
        found = [s for s in self.finished() if s.name == name]
        assert len(found) == 1, [s.name for s in self.finished()]
        return found[0]


@pytest.fixture
def spans() -> Iterator[Spans]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Spans(provider, exporter)
    provider.shutdown()


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


# -- workflows under test ----------------------------------------------------------


def charge(amount: int) -> str:
    log.info("charging %d", amount)
    return f"tx-{amount}"


@perdure.workflow
async def pay(ctx: perdure.Context, amount: int) -> str:
    log.info("paying %d", amount)
    await ctx.run("validate", lambda: None)
    return await ctx.run("charge", charge, amount)


FLAKY: list[int] = []


def flaky() -> str:
    FLAKY.append(1)
    if len(FLAKY) < 2:
        raise ConnectionError("provider unreachable")
    return "ok"


@perdure.workflow
async def retrying(ctx: perdure.Context) -> str:
    return await ctx.run("flaky", flaky, retry=perdure.RetryPolicy(max_attempts=3))


def refuse() -> None:
    raise perdure.TerminalError("card declined")


@perdure.workflow
async def declined(ctx: perdure.Context) -> None:
    await ctx.run("charge", refuse)


@perdure.workflow
async def napper(ctx: perdure.Context) -> str:
    log.info("before the nap")
    await ctx.run("first", lambda: 1)
    await ctx.sleep(timedelta(days=1))
    log.info("after the nap")
    await ctx.run("second", lambda: 2)
    return "rested"


@perdure.workflow
async def waiter(ctx: perdure.Context) -> str:
    value: str = await ctx.promise("approval", type=str)
    return value


@perdure.workflow
async def parent(ctx: perdure.Context, amount: int) -> str:
    child: str = await ctx.call(pay, amount)
    return child


@dataclasses.dataclass
class Balance:
    cents: int = 0


class Wallet(perdure.Actor[Balance]):
    durability = perdure.DurabilityFacet()

    async def deposit(self, ctx: perdure.Context, cents: int) -> int:
        await ctx.run("bank", lambda: cents)
        self.state.cents += cents
        return self.state.cents


@perdure.workflow
async def funder(ctx: perdure.Context, key: str) -> int:
    total: int = await ctx.actor(Wallet, key).ask(Wallet.deposit, 5)
    return total


# -- tracing ---------------------------------------------------------------------------


async def test_a_run_is_a_span_and_each_live_step_a_child_span(
    backend: Backend, spans: Spans
) -> None:
    async with backend.runtime([pay]) as rt:
        observability.instrument(rt, tracer_provider=spans.provider)
        handle = await rt.client.start(pay, 7)
        assert await handle.result() == "tx-7"
    run = spans.one("perdure.invocation pay")
    assert run.attributes is not None
    assert dict(run.attributes) == {
        "perdure.invocation_id": handle.id,
        "perdure.target": "pay",
        "perdure.replayed": False,
        "perdure.status": "completed",
    }
    assert run.status.status_code is StatusCode.UNSET
    steps = spans.named("perdure.step")
    assert [s.name for s in steps] == ["perdure.step validate", "perdure.step charge"]
    for index, step in enumerate(steps, start=1):
        assert parent_of(step) == span_id(run)
        assert trace_id(step) == trace_id(run)
        assert step.attributes is not None
        assert step.attributes["perdure.step.index"] == index
        assert step.attributes["perdure.step.attempt"] == 1
        assert step.attributes["perdure.replayed"] is False
        assert step.end_time is not None
        assert run.end_time is not None
        assert step.end_time <= run.end_time


async def test_a_run_continues_the_trace_current_where_it_was_started(
    backend: Backend, spans: Spans
) -> None:
    tracer = spans.provider.get_tracer("test")
    async with backend.runtime([pay]) as rt:
        observability.instrument(rt, tracer_provider=spans.provider)
        with tracer.start_as_current_span("checkout") as caller:
            handle = await rt.client.start(pay, 1)
        await handle.result()
    run = spans.one("perdure.invocation pay")
    assert parent_of(run) == caller.get_span_context().span_id
    assert trace_id(run) == caller.get_span_context().trace_id


async def test_each_attempt_is_a_span_and_errors_are_recorded(
    backend: Backend, spans: Spans
) -> None:
    FLAKY.clear()
    async with backend.runtime([retrying, declined]) as rt:
        observability.instrument(rt, tracer_provider=spans.provider)
        assert await rt.client.run(retrying) == "ok"
        with pytest.raises(perdure.InvocationFailedError):
            await rt.client.run(declined)
    first, second = spans.named("perdure.step flaky")
    assert first.attributes is not None
    assert second.attributes is not None
    assert (
        first.attributes["perdure.step.attempt"],
        second.attributes["perdure.step.attempt"],
    ) == (
        1,
        2,
    )
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["perdure.step.retrying"] is True
    assert [e.name for e in first.events] == ["exception"]
    assert second.status.status_code is StatusCode.UNSET
    refused = spans.one("perdure.step charge")
    assert refused.attributes is not None
    assert refused.attributes["perdure.step.retrying"] is False
    assert refused.status.status_code is StatusCode.ERROR
    run = spans.one("perdure.invocation declined")
    assert run.attributes is not None
    assert run.attributes["perdure.status"] == "failed"
    assert run.status.status_code is StatusCode.ERROR
    assert "card declined" in (run.status.description or "")


async def test_a_resumed_run_is_marked_replayed_and_its_replayed_steps_are_events(
    backend: Backend, spans: Spans
) -> None:
    tracer = spans.provider.get_tracer("test")
    async with backend.runtime([napper], clock=FakeClock()) as rt:
        observability.instrument(rt, tracer_provider=spans.provider)
        with tracer.start_as_current_span("caller"):
            handle = await rt.client.start(napper)
        assert await handle.result() == "rested"
    first, resumed = spans.named("perdure.invocation napper")
    assert first.attributes is not None
    assert resumed.attributes is not None
    assert first.attributes["perdure.status"] == "suspended"
    assert first.attributes["perdure.replayed"] is False
    assert resumed.attributes["perdure.replayed"] is True
    assert resumed.attributes["perdure.status"] == "completed"
    # A parked invocation that resumes in the same process continues its trace.
    assert trace_id(resumed) == trace_id(first)
    assert parent_of(resumed) == parent_of(first)
    assert [(e.name, dict(e.attributes or {})) for e in resumed.events] == [
        ("perdure.step.replayed", {"perdure.step.name": "first", "perdure.step.index": 1})
    ]
    # Only live steps get spans: "first" ran once, in the first run.
    assert [s.name for s in spans.named("perdure.step")] == [
        "perdure.step first",
        "perdure.step second",
    ]


async def test_a_run_recovered_after_a_restart_starts_a_new_trace(
    backend: Backend, spans: Spans
) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([napper], clock=clock) as rt:
        handle = await rt.client.start(napper)
        while (await handle.status()) is not perdure.Status.SUSPENDED:
            await asyncio.sleep(0.002)
    clock.advance(2 * 86400)
    rt = backend.runtime([napper], clock=clock)
    observability.instrument(rt, tracer_provider=spans.provider)
    async with rt:
        assert await rt.client.get(handle.id) is not None
        assert await (await rt.client.get(handle.id)).result() == "rested"
    run = spans.one("perdure.invocation napper")
    assert parent_of(run) is None
    assert run.attributes is not None
    assert run.attributes["perdure.replayed"] is True


async def test_a_child_workflow_and_an_actor_message_continue_the_callers_trace(
    backend: Backend, spans: Spans
) -> None:
    async with backend.runtime([parent, pay, funder], actors=[Wallet]) as rt:
        observability.instrument(rt, tracer_provider=spans.provider)
        assert await rt.client.run(parent, 3) == "tx-3"
        assert await rt.client.run(funder, "w-1") == 5
    outer = spans.one("perdure.invocation parent")
    child = spans.one("perdure.invocation pay")
    assert parent_of(child) == span_id(outer)
    assert trace_id(child) == trace_id(outer)
    assert child.attributes is not None
    assert child.attributes["perdure.parent_id"] == outer.attributes["perdure.invocation_id"]
    ask = spans.one("perdure.step ask Wallet.deposit w-1")
    message = spans.one("perdure.invocation Wallet.deposit")
    assert parent_of(message) == span_id(ask)
    assert trace_id(message) == trace_id(ask)
    assert message.attributes is not None
    assert message.attributes["perdure.actor.type"] == "Wallet"
    assert message.attributes["perdure.actor.key"] == "w-1"


async def test_the_ingress_continues_a_traceparent(backend: Backend, spans: Spans) -> None:
    rt = backend.runtime([pay], actors=[Wallet])
    observability.instrument(rt, tracer_provider=spans.provider)
    remote_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    remote_span = "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{remote_trace}-{remote_span}-01"}
    async with rt:
        app = create_app(rt, metrics=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.post("/workflows/pay", json={"amount": 2}, headers=headers)
            assert response.status_code == 200, response.text
            response = await http.post("/actors/Wallet/w-2/deposit", json=[1], headers=headers)
            assert response.status_code == 200, response.text
            response = await http.post("/workflows/pay", json={"amount": 3})
            assert response.status_code == 200, response.text
    continued = [s for s in spans.named("perdure.invocation") if parent_of(s) is not None]
    assert sorted(s.name for s in continued) == [
        "perdure.invocation Wallet.deposit",
        "perdure.invocation pay",
    ]
    for run in continued:
        assert trace_id(run) == int(remote_trace, 16)
        assert parent_of(run) == int(remote_span, 16)
        assert run.parent is not None
        assert run.parent.is_remote


async def test_an_unsampled_run_makes_no_step_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with perdure.Runtime("memory://", workflows=[pay]) as rt:
        tracing = observability.instrument(rt, tracer_provider=provider)
        started: list[bool] = []
        original = tracing.tracer.start_span

        def counting(*args: Any, **kwargs: Any) -> Any:
            started.append(True)
            return original(*args, **kwargs)

        tracing.tracer.start_span = counting  # type: ignore[method-assign]
        assert await rt.client.run(pay, 1) == "tx-1"
    assert started == [True]  # the run's span only, and it records nothing
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


async def test_instrumenting_twice_returns_the_same_tracing(spans: Spans) -> None:
    rt = perdure.Runtime("memory://", workflows=[pay])
    assert rt.hooks.before_invocation is None  # nothing is fired unless asked for
    tracing = observability.instrument(rt, tracer_provider=spans.provider)
    assert observability.instrument(rt, tracer_provider=spans.provider) is tracing
    with pytest.raises(perdure.ConfigurationError, match="another tracer provider"):
        observability.instrument(rt, tracer_provider=TracerProvider())
    assert rt.hooks.before_invocation is not None


async def test_tracing_keeps_the_hooks_the_runtime_was_built_with(spans: Spans) -> None:
    seen: list[str] = []
    rt = perdure.Runtime(
        "memory://",
        workflows=[pay],
        hooks=perdure.testing.Hooks(after_step=lambda info: seen.append(info.name)),
    )
    observability.instrument(rt, tracer_provider=spans.provider)
    async with rt:
        await rt.client.run(pay, 1)
    assert seen == ["validate", "charge"]
    assert len(spans.named("perdure.step")) == 2


async def test_no_span_is_current_in_the_caller_after_a_run(spans: Spans) -> None:
    async with perdure.Runtime("memory://", workflows=[pay]) as rt:
        observability.instrument(rt, tracer_provider=spans.provider)
        await rt.client.run(pay, 1)
        assert not trace.get_current_span().get_span_context().is_valid


def test_the_public_names_are_pinned() -> None:
    assert sorted(observability.__all__) == [
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


def test_without_the_extras_importing_costs_nothing_and_asking_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "for name in ('opentelemetry', 'prometheus_client'):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "import perdure\n"
        "from perdure import observability\n"
        "from perdure.ingress import create_app\n"
        "rt = perdure.Runtime('memory://')\n"
        "create_app(rt)  # no /metrics without prometheus-client, and no error\n"
        "for enable, extra in ((observability.instrument, 'otel'),"
        " (observability.enable_metrics, 'metrics')):\n"
        "    try:\n"
        "        enable(rt)\n"
        "    except perdure.ConfigurationError as exc:\n"
        "        assert f'perdure[{extra}]' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('no error')\n"
        "from perdure.testing import Hooks\n"
        "assert rt.hooks == Hooks()\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr


# -- metrics ---------------------------------------------------------------------------


def sample(metrics: observability.Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


async def test_metrics_count_invocations_steps_and_commits(tmp_path: Any) -> None:
    async with perdure.Runtime(f"sqlite:///{tmp_path}/m.db", workflows=[pay, declined]) as rt:
        metrics = observability.enable_metrics(rt)
        assert observability.enable_metrics(rt) is metrics
        await asyncio.gather(*(rt.client.run(pay, n) for n in range(5)))
        with pytest.raises(perdure.InvocationFailedError):
            await rt.client.run(declined)
        await metrics.refresh()
        text = metrics.render().decode()
    assert sample(metrics, "perdure_invocations_total", status="completed") == 5
    assert sample(metrics, "perdure_invocations_total", status="failed") == 1
    assert sample(metrics, "perdure_invocations_total", status="cancelled") == 0
    assert sample(metrics, "perdure_steps_total", kind="executed") == 11
    assert sample(metrics, "perdure_step_seconds_count") == 11  # every live attempt
    assert (sample(metrics, "perdure_step_seconds_sum") or 0) > 0
    batches = sample(metrics, "perdure_journal_commit_batch_size_count") or 0
    writes = sample(metrics, "perdure_journal_commit_batch_size_sum") or 0
    # 6 invocations: a create, their steps' commits and an output each.
    assert writes == 6 + 11 + 6
    assert 0 < batches <= writes
    assert sample(metrics, "perdure_journal_commit_seconds_count") == batches
    assert "# TYPE perdure_step_seconds histogram" in text
    assert "perdure_timers_pending 0.0" in text


async def test_the_suspended_gauges_count_the_store_when_scraped(backend: Backend) -> None:
    clock = FakeClock(autojump=False)
    async with backend.runtime([napper, waiter], clock=clock) as rt:
        metrics = observability.enable_metrics(rt)
        napping = await rt.client.start(napper)
        waiting = await rt.client.start(waiter)
        for handle in (napping, waiting):
            while (await handle.status()) is not perdure.Status.SUSPENDED:
                await asyncio.sleep(0.002)
        assert sample(metrics, "perdure_invocations_suspended") == 0  # not scraped yet
        await metrics.refresh()
        assert sample(metrics, "perdure_invocations_suspended") == 2
        assert sample(metrics, "perdure_timers_pending") == 1  # the promise has no wake-up


async def test_recovery_is_counted(backend: Backend) -> None:
    clock = FakeClock(autojump=False)
    gate = asyncio.Event()

    @perdure.workflow(name="blocked")
    async def blocked(ctx: perdure.Context) -> None:
        await ctx.run("wait", gate.wait)

    async with backend.runtime([blocked], clock=clock) as rt:
        await rt.client.start(blocked)
        await asyncio.sleep(0.05)
    gate.set()
    rt = backend.runtime([blocked], clock=clock)
    metrics = observability.enable_metrics(rt)
    async with rt:
        assert sample(metrics, "perdure_recovery_total", kind="invocation") == 1
        assert (sample(metrics, "perdure_recovery_seconds") or 0) > 0


async def test_each_runtime_has_its_own_registry() -> None:
    async with (
        perdure.Runtime("memory://", workflows=[pay]) as a,
        perdure.Runtime("memory://", workflows=[pay]) as b,
    ):
        ma, mb = observability.enable_metrics(a), observability.enable_metrics(b)
        await a.client.run(pay, 1)
        assert sample(ma, "perdure_invocations_total", status="completed") == 1
        assert sample(mb, "perdure_invocations_total", status="completed") == 0
        assert ma.registry is not mb.registry


async def test_get_metrics_is_behind_the_token_unless_public(backend: Backend) -> None:
    async with backend.runtime([pay]) as rt:
        for public in (False, True):
            app = create_app(rt, token="s3cret", metrics_public=public)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                await http.post(
                    "/workflows/pay", json=[1], headers={"Authorization": "Bearer s3cret"}
                )
                anonymous = await http.get("/metrics")
                assert anonymous.status_code == (200 if public else 401)
                assert (await http.get("/invocations")).status_code == 401
                authorized = await http.get("/metrics", headers={"Authorization": "Bearer s3cret"})
                assert authorized.status_code == 200
                assert authorized.headers["content-type"].startswith("text/plain")
                assert 'perdure_invocations_total{status="completed"}' in authorized.text


async def test_metrics_app_serves_the_text_format() -> None:
    async with perdure.Runtime("memory://", workflows=[pay]) as rt:
        await rt.client.run(pay, 1)
        transport = httpx.ASGITransport(app=observability.metrics_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/")
            assert response.status_code == 200
            assert "perdure_invocations_suspended 0.0" in response.text
            assert (await http.post("/")).status_code == 405


# -- logging ---------------------------------------------------------------------------


@pytest.fixture
def with_filter(caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    """Add a filter to caplog's handler for one test (pytest reuses the handler)."""
    added: list[logging.Filter] = []

    def add(f: logging.Filter) -> None:
        caplog.handler.addFilter(f)
        added.append(f)

    yield add
    for f in added:
        caplog.handler.removeFilter(f)


async def test_records_carry_the_invocation_id(
    caplog: pytest.LogCaptureFixture, with_filter: Any
) -> None:
    with_filter(observability.InvocationFilter())
    caplog.set_level(logging.INFO, logger="app")
    async with perdure.Runtime("memory://", workflows=[pay]) as rt:
        log.info("outside")
        handle = await rt.client.start(pay, 4)
        await handle.result()
    found = [
        (r.getMessage(), r.invocation_id, r.perdure_workflow, r.perdure_step)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "app.payments"
    ]
    assert found == [
        ("outside", "-", "-", "-"),
        ("paying 4", handle.id, "pay", "-"),
        ("charging 4", handle.id, "pay", "charge"),  # a sync step, in a pool thread
    ]


async def test_replayed_code_does_not_log_twice(
    caplog: pytest.LogCaptureFixture, with_filter: Any
) -> None:
    with_filter(observability.ReplayFilter())
    caplog.set_level(logging.INFO, logger="app")
    async with perdure.Runtime("memory://", workflows=[napper], clock=FakeClock()) as rt:
        assert await rt.client.run(napper) == "rested"
        assert rt.stats.invocations_resumed == 1  # it ran twice: parked, then resumed
    messages = [r.getMessage() for r in caplog.records if r.name == "app.payments"]
    assert messages == ["before the nap", "after the nap"]


async def test_without_the_filter_replayed_code_logs_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    async with perdure.Runtime("memory://", workflows=[napper], clock=FakeClock()) as rt:
        await rt.client.run(napper)
    messages = [r.getMessage() for r in caplog.records if r.name == "app.payments"]
    assert messages == ["before the nap", "before the nap", "after the nap"]


async def test_the_replay_filter_keeps_perdures_own_records() -> None:
    replay = observability.ReplayFilter()
    seen: list[tuple[str, bool]] = []

    @perdure.workflow(name="judge2")
    async def judge2(ctx: perdure.Context) -> None:
        for name in ("perdure.runtime", "app"):
            record = logging.LogRecord(name, logging.INFO, __file__, 1, "m", None, None)
            seen.append((name, replay.filter(record)))
        await ctx.run("one", lambda: 1)
        await ctx.sleep(timedelta(days=1))

    async with perdure.Runtime("memory://", workflows=[judge2], clock=FakeClock()) as rt:
        await rt.client.run(judge2)
    # first run: live; resumed run: replaying, so only Perdure's record passes
    assert seen == [
        ("perdure.runtime", True),
        ("app", True),
        ("perdure.runtime", True),
        ("app", False),
    ]
