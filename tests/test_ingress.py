"""The HTTP ingress, over every store, through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pydantic
import pytest

import perdure
from conftest import Backend, Gate
from perdure.ingress import create_app, is_loopback, serve
from perdure.testing import FakeClock

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 2048

# What the steps did, in order: every entry is a real execution, so a
# retried request that runs nothing again adds nothing here.
EFFECTS: list[Any] = []


@pytest.fixture(autouse=True)
def _clear_effects() -> None:
    EFFECTS.clear()


@dataclasses.dataclass
class Order:
    item: str
    quantity: int


@dataclasses.dataclass
class Total:
    item: str
    cents: int


@perdure.workflow(name="shop.order")
async def order(ctx: perdure.Context, o: Order, note: str = "") -> Total:
    await ctx.run("charge", EFFECTS.append, ("charge", o.item, o.quantity))
    return Total(o.item, o.quantity * 250)


@perdure.workflow(name="shop.refund")
async def refund(ctx: perdure.Context, item: str) -> None:
    await ctx.run("check", EFFECTS.append, ("refund", item))
    raise perdure.TerminalError(f"{item} cannot be refunded")


@perdure.workflow(name="shop.wait")
async def wait_for_gate(ctx: perdure.Context) -> str:
    gate: Gate = GATES[0]
    return await ctx.run("gate", gate.wait)


GATES: list[Gate] = []


class Customer(pydantic.BaseModel):
    name: str
    tier: int


@perdure.workflow(name="shop.typed")
async def typed(
    ctx: perdure.Context, when: datetime.datetime, price: decimal.Decimal, who: Customer
) -> dict[str, Any]:
    assert isinstance(when, datetime.datetime)
    assert isinstance(who, Customer)
    return {"year": when.year, "cents": int(price * 100), "who": who.name}


@dataclasses.dataclass
class Tally:
    total: int = 0
    adds: int = 0


class Counter(perdure.Actor[Tally]):
    durability = perdure.DurabilityFacet(checkpoint_every=2)

    async def add(self, ctx: perdure.Context, n: int) -> int:
        await ctx.run("effect", EFFECTS.append, ("add", self.key, n))
        self.state.total += n
        self.state.adds += 1
        return self.state.total

    async def explode(self, ctx: perdure.Context) -> int:
        raise ValueError("the counter exploded")


class Scratch(perdure.Actor[Tally]):
    """A plain (in-memory) actor."""

    async def add(self, ctx: perdure.Context, n: int) -> int:
        self.state.total += n
        return self.state.total

    async def explode(self, ctx: perdure.Context) -> int:
        raise ValueError("the scratch exploded")

    async def history(self, ctx: perdure.Context) -> str:
        return "a handler may be called history"


@perdure.workflow(name="shop.approve")
async def approve(ctx: perdure.Context, item: str) -> str:
    """Parks on a promise, whose id it publishes as the query "promise"."""
    approval = ctx.promise("approval", type=str)
    await ctx.publish("promise", approval.id)
    try:
        decision = await approval
    finally:
        await ctx.run("release", EFFECTS.append, ("release", item))
    return f"{item}: {decision}"


@perdure.workflow(name="shop.tally")
async def tally(ctx: perdure.Context, count: int) -> int:
    """Adds up ``count`` "add" signals, publishing the running total."""
    total = 0
    for _ in range(count):
        total += await ctx.signal("add", type=int)
        await ctx.publish("total", total)
    return total


@perdure.workflow(name="shop.nap")
async def nap(ctx: perdure.Context) -> str:
    await ctx.sleep(datetime.timedelta(days=1))
    return "rested"


@dataclasses.dataclass
class Api:
    rt: perdure.Runtime
    http: httpx.AsyncClient


WORKFLOWS = [order, refund, wait_for_gate, typed, approve, tally, nap]


@pytest.fixture
async def api(backend: Backend) -> AsyncIterator[Api]:
    rt = backend.runtime(WORKFLOWS, actors=[Counter, Scratch])
    async with rt:
        app = create_app(rt, token=TOKEN, max_body_bytes=LIMIT)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://perdure.test", headers=AUTH
        ) as http:
            yield Api(rt, http)


@pytest.fixture
async def frozen_api(backend: Backend, clock_frozen: FakeClock) -> AsyncIterator[Api]:
    """Like ``api``, with a clock that moves only on ``clock_frozen.advance()``."""
    rt = backend.runtime(WORKFLOWS, clock=clock_frozen)
    async with rt:
        transport = httpx.ASGITransport(app=create_app(rt, token=TOKEN, max_body_bytes=LIMIT))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://perdure.test", headers=AUTH
        ) as http:
            yield Api(rt, http)


@pytest.fixture
def clock_frozen() -> FakeClock:
    return FakeClock(autojump=False)


def _error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == kind
    assert "Traceback" not in response.text
    message: str = body["error"]["message"]
    return message


# -- invoking workflows ----------------------------------------------------------


async def test_run_workflow_returns_its_result(api: Api) -> None:
    r = await api.http.post("/workflows/shop.order", json={"o": {"item": "tea", "quantity": 2}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed"
    assert body["result"] == {"item": "tea", "cents": 500}
    assert EFFECTS == [("charge", "tea", 2)]
    # The same call as an array of positional arguments.
    r = await api.http.post("/workflows/shop.order", json=[{"item": "jam", "quantity": 1}, "gift"])
    assert r.json()["result"] == {"item": "jam", "cents": 250}
    assert body["invocation_id"] != r.json()["invocation_id"]


async def test_idempotency_key_sent_twice_runs_once(api: Api) -> None:
    headers = {"Idempotency-Key": "order-1"}
    first = await api.http.post(
        "/workflows/shop.order", json={"o": {"item": "tea", "quantity": 2}}, headers=headers
    )
    # A retry, this time with the arguments positional and the keys reordered:
    # the same call, so it attaches to the first invocation.
    again = await api.http.post(
        "/workflows/shop.order", json=[{"quantity": 2, "item": "tea"}], headers=headers
    )
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert EFFECTS == [("charge", "tea", 2)]
    records = await api.rt.client.list(workflow="shop.order")
    assert [r.idempotency_key for r in records] == ["order-1"]


async def test_concurrent_requests_with_one_key_run_once(api: Api) -> None:
    body = {"o": {"item": "tea", "quantity": 5}}
    headers = {"Idempotency-Key": "order-c"}
    responses = await asyncio.gather(
        *(api.http.post("/workflows/shop.order", json=body, headers=headers) for _ in range(5))
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["invocation_id"] for r in responses}) == 1
    assert EFFECTS == [("charge", "tea", 5)]


async def test_idempotency_key_with_another_body_is_a_conflict(api: Api) -> None:
    headers = {"Idempotency-Key": "order-2"}
    r = await api.http.post(
        "/workflows/shop.order", json={"o": {"item": "tea", "quantity": 2}}, headers=headers
    )
    assert r.status_code == 200
    r = await api.http.post(
        "/workflows/shop.order", json={"o": {"item": "tea", "quantity": 3}}, headers=headers
    )
    message = _error(r, 409, "idempotency_conflict")
    assert "order-2" in message
    assert "different input" in message
    assert EFFECTS == [("charge", "tea", 2)]


async def test_start_returns_202_and_the_invocation_can_be_read(api: Api) -> None:
    r = await api.http.post(
        "/workflows/shop.order/start", json={"o": {"item": "tea", "quantity": 1}}
    )
    assert r.status_code == 202, r.text
    invocation_id = r.json()["invocation_id"]
    assert r.headers["location"] == f"/invocations/{invocation_id}"
    r2 = await api.http.post(
        "/workflows/shop.order?wait=false", json={"o": {"item": "jam", "quantity": 1}}
    )
    assert r2.status_code == 202
    await api.rt.client.wait_idle(timeout=10)

    r = await api.http.get(f"/invocations/{invocation_id}")
    assert r.status_code == 200
    view = r.json()
    assert view["invocation_id"] == invocation_id
    assert view["target"] == "shop.order"
    assert view["status"] == "completed"
    assert view["result"] == {"item": "tea", "cents": 250}
    assert view["actor"] is None

    r = await api.http.get(f"/invocations/{invocation_id}/journal")
    entries = r.json()["entries"]
    assert [(e["index"], e["kind"], e["name"]) for e in entries] == [
        (0, "input", "shop.order"),
        (1, "step", "charge"),
        (2, "output", "shop.order"),
    ]
    assert entries[0]["value"] == {"args": [{"item": "tea", "quantity": 1}], "kwargs": {}}
    assert entries[2]["value"] == {"item": "tea", "cents": 250}


async def test_list_invocations_filters(api: Api) -> None:
    for item in ("a", "b", "c"):
        await api.http.post("/workflows/shop.order", json=[{"item": item, "quantity": 1}])
    await api.http.post("/workflows/shop.refund", json=["a"])
    r = await api.http.get("/invocations")
    assert [v["target"] for v in r.json()["invocations"]] == ["shop.order"] * 3 + ["shop.refund"]
    r = await api.http.get("/invocations", params={"status": "failed"})
    assert [v["target"] for v in r.json()["invocations"]] == ["shop.refund"]
    r = await api.http.get("/invocations", params={"target": "shop.order", "limit": 2})
    assert len(r.json()["invocations"]) == 2
    _error(await api.http.get("/invocations?status=lost"), 400, "bad_request")
    _error(await api.http.get("/invocations?limit=0"), 400, "bad_request")


async def test_wait_with_a_timeout_returns_202_while_running(api: Api, gate: Gate) -> None:
    GATES[:] = [gate]
    r = await api.http.post("/workflows/shop.wait?timeout=0.01")
    assert r.status_code == 202
    assert r.json()["status"] == "running"
    # The step is still blocked at the gate; stopping the runtime leaves it unfinished.


# -- actors --------------------------------------------------------------------------


async def test_actor_ask_tell_history_and_state(api: Api) -> None:
    r = await api.http.post("/actors/Counter/alice/add", json={"n": 5})
    assert r.status_code == 200, r.text
    assert r.json()["result"] == 5
    assert r.json()["invocation_id"]
    r = await api.http.post("/actors/Counter/alice/add?wait=false", json=[7])
    assert r.status_code == 202
    told = r.json()["invocation_id"]
    r = await api.http.post("/actors/Counter/alice/add", json=[1])
    assert r.json()["result"] == 13
    assert EFFECTS == [("add", "alice", 5), ("add", "alice", 7), ("add", "alice", 1)]

    r = await api.http.get(f"/invocations/{told}")
    assert r.json()["actor"] == {"type": "Counter", "key": "alice", "seq": 2}
    assert r.json()["result"] == 12

    r = await api.http.get("/actors/Counter/alice/history")
    messages = r.json()["messages"]
    assert [(m["actor"]["seq"], m["target"], m["status"]) for m in messages] == [
        (1, "Counter.add", "completed"),
        (2, "Counter.add", "completed"),
        (3, "Counter.add", "completed"),
    ]
    r = await api.http.get("/actors/Counter/alice/state", params={"at": 1})
    assert r.json() == {
        "actor_type": "Counter",
        "key": "alice",
        "at": 1,
        "state": {"total": 5, "adds": 1},
    }
    r = await api.http.get("/actors/Counter/alice/state")
    assert r.json()["at"] == 3
    assert r.json()["state"] == {"total": 13, "adds": 3}
    r = await api.http.get("/actors/Counter/alice/state", params={"at": 0})
    assert r.json()["state"] == {"total": 0, "adds": 0}
    # Reading the past made no external call.
    assert len(EFFECTS) == 3
    message = _error(await api.http.get("/actors/Counter/alice/state?at=4"), 404, "not_found")
    assert "latest message of actor Counter/alice is #3" in message
    _error(await api.http.get("/actors/Counter/alice/state?at=-1"), 400, "bad_request")


async def test_actor_idempotency_key(api: Api) -> None:
    headers = {"Idempotency-Key": "deposit-1"}
    first = await api.http.post("/actors/Counter/bob/add", json=[3], headers=headers)
    again = await api.http.post("/actors/Counter/bob/add", json={"n": 3}, headers=headers)
    assert first.json() == again.json()
    assert first.json()["result"] == 3
    assert EFFECTS == [("add", "bob", 3)]
    r = await api.http.post("/actors/Counter/bob/add", json=[4], headers=headers)
    _error(r, 409, "idempotency_conflict")


async def test_actor_handler_that_raises(api: Api) -> None:
    r = await api.http.post("/actors/Counter/carol/explode")
    assert r.status_code == 500
    body = r.json()
    assert body["status"] == "failed"
    assert body["error"] == {"type": "ValueError", "message": "the counter exploded"}
    assert "Traceback" not in r.text
    r = await api.http.post("/actors/Scratch/carol/explode")
    assert r.status_code == 500
    assert r.json()["error"] == {"type": "ValueError", "message": "the scratch exploded"}


async def test_plain_actor(api: Api) -> None:
    r = await api.http.post("/actors/Scratch/x/add", json=[2])
    assert r.json() == {"invocation_id": None, "status": "completed", "result": 2}
    r = await api.http.post("/actors/Scratch/x/add?wait=false", json=[3])
    assert r.status_code == 202
    r = await api.http.post("/actors/Scratch/x/add", json=[4])
    assert r.json()["result"] == 9
    r = await api.http.post("/actors/Scratch/x/add", json=[1], headers={"Idempotency-Key": "k"})
    assert "not durable" in _error(r, 400, "bad_request")
    assert "DurabilityFacet" in _error(
        await api.http.get("/actors/Scratch/x/history"), 404, "not_found"
    )
    # POST reaches the handler of that name; GET is the time-travel read.
    r = await api.http.post("/actors/Scratch/x/history")
    assert r.json()["result"] == "a handler may be called history"


# -- bad requests ---------------------------------------------------------------------


async def test_malformed_json(api: Api) -> None:
    r = await api.http.post(
        "/workflows/shop.order", content=b'{"o": {', headers={"Content-Type": "application/json"}
    )
    assert "not valid JSON" in _error(r, 400, "malformed_json")
    r = await api.http.post("/actors/Counter/a/add", content=b"[1,")
    _error(r, 400, "malformed_json")
    assert EFFECTS == []


async def test_wrong_types_and_arguments(api: Api) -> None:
    async def post(json: Any) -> str:
        return _error(
            await api.http.post("/workflows/shop.order", json=json), 422, "invalid_arguments"
        )

    message = await post({"o": {"item": "tea", "quantity": "two"}})
    assert "argument 'o'" in message
    assert "Expected `int`, got `str`" in message
    assert "`o.quantity`" in message
    assert "missing a required argument: 'o'" in await post({})
    assert "quantity" in await post({"o": {"item": "tea"}})
    assert "unexpected keyword argument 'colour'" in await post(
        {"o": {"item": "tea", "quantity": 1}, "colour": "red"}
    )
    assert "too many positional arguments" in await post([{"item": "a", "quantity": 1}, "", 3])
    assert "JSON object of keyword arguments or a JSON array" in await post(42)
    # A bool is not an int, a float is not an int: strict JSON types.
    assert "Expected `int`" in await post({"o": {"item": "tea", "quantity": 1.5}})
    r = await api.http.post("/actors/Counter/a/add", json={"n": "x"})
    assert "argument 'n'" in _error(r, 422, "invalid_arguments")
    assert EFFECTS == []


async def test_types_beyond_json(api: Api) -> None:
    """Arguments decode with JSON's rules against their hints: a datetime from
    a string, a Decimal from a string, a pydantic model."""
    body = {
        "when": "2026-01-31T12:00:00Z",
        "price": "1.25",
        "who": {"name": "Ann", "tier": 2},
    }
    r = await api.http.post("/workflows/shop.typed", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {"year": 2026, "cents": 125, "who": "Ann"}
    bad = dict(body, who={"name": "Ann", "tier": "gold"})
    message = _error(
        await api.http.post("/workflows/shop.typed", json=bad), 422, "invalid_arguments"
    )
    assert "argument 'who'" in message
    assert "tier" in message
    bad = dict(body, stock={"seven": "tea"})
    message = _error(
        await api.http.post("/workflows/shop.typed", json=bad), 422, "invalid_arguments"
    )
    assert "argument 'stock'" in message
    bad = dict(body, when="yesterday")
    _error(await api.http.post("/workflows/shop.typed", json=bad), 422, "invalid_arguments")
    doc = (await api.http.get("/openapi.json")).json()
    assert "Customer" in doc["components"]["schemas"]


async def test_unknown_workflow_actor_handler_invocation(api: Api) -> None:
    message = _error(await api.http.post("/workflows/shop.nope", json={}), 404, "not_found")
    assert "shop.order" in message  # says what exists
    _error(await api.http.post("/workflows/shop.nope/start", json={}), 404, "not_found")
    _error(await api.http.post("/actors/Nope/a/add", json=[1]), 404, "not_found")
    message = _error(await api.http.post("/actors/Counter/a/subtract", json=[1]), 404, "not_found")
    assert "add" in message
    _error(await api.http.get("/invocations/0000-missing"), 404, "not_found")
    _error(await api.http.get("/invocations/0000-missing/journal"), 404, "not_found")
    _error(await api.http.get("/actors/Nope/a/history"), 404, "not_found")
    _error(await api.http.get("/no/such/route"), 404, "not_found")
    _error(await api.http.get("/workflows/shop.order"), 405, "method_not_allowed")
    _error(await api.http.post("/workflows/shop.order?wait=perhaps", json={}), 400, "bad_request")
    r = await api.http.post(
        "/workflows/shop.order", json={}, headers={"Idempotency-Key": "k" * 300}
    )
    _error(r, 400, "bad_request")


async def test_missing_or_wrong_token(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        async with httpx.AsyncClient(
            transport=api.http._transport, base_url="http://perdure.test", headers=headers
        ) as anonymous:
            r = await anonymous.post("/workflows/shop.order", json=[{"item": "a", "quantity": 1}])
            assert "bearer token" in _error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
            # Not even whether a route exists is told without the token.
            _error(await anonymous.get("/no/such/route"), 401, "unauthorized")
            _error(await anonymous.get("/openapi.json"), 401, "unauthorized")
    assert EFFECTS == []


async def test_oversize_body(api: Api) -> None:
    big = {"o": {"item": "x" * LIMIT, "quantity": 1}}
    message = _error(
        await api.http.post("/workflows/shop.order", json=big), 413, "payload_too_large"
    )
    assert f"{LIMIT:,} bytes" in message

    # Without a Content-Length (chunked), the body is counted as it arrives
    # and reading stops at the limit: an endless body is never held.
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"o": {"item": "'
        while True:
            sent += 1
            yield b"x" * 256

    r = await api.http.post("/workflows/shop.order", content=endless())
    _error(r, 413, "payload_too_large")
    assert sent <= LIMIT // 256 + 1
    assert EFFECTS == []


async def test_workflow_that_raises(api: Api) -> None:
    r = await api.http.post("/workflows/shop.refund", json={"item": "tea"})
    assert r.status_code == 500
    body = r.json()
    assert body["status"] == "failed"
    assert body["error"] == {"type": "TerminalError", "message": "tea cannot be refunded"}
    assert "Traceback" not in r.text
    assert "test_ingress.py" not in r.text
    r = await api.http.get(f"/invocations/{body['invocation_id']}")
    assert r.json()["status"] == "failed"
    assert r.json()["error"] == body["error"]
    r = await api.http.get(f"/invocations/{body['invocation_id']}/journal")
    assert r.json()["entries"][-1]["error"] == body["error"]
    assert "Traceback" not in r.text


async def test_unexpected_error_is_logged_not_sent(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(**kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(api.rt.client, "list", broken)
    with caplog.at_level(logging.ERROR, logger="perdure.ingress"):
        r = await api.http.get("/invocations")
    message = _error(r, 500, "internal_error")
    assert "secret" not in r.text
    assert "log" in message
    assert "secret internal detail" in caplog.text


# -- promises, signals, queries, cancellation ---------------------------------------


async def _until(api: Api, path: str, check: Any, what: str) -> Any:
    """GET ``path`` (in small real steps: progress is on the event loop, not
    the fake clock) until ``check(response)`` holds; return the response."""
    r: httpx.Response | None = None
    try:
        async with asyncio.timeout(10):
            while True:
                r = await api.http.get(path)
                if check(r):
                    return r
                await asyncio.sleep(0.002)
    except TimeoutError:
        last = "none" if r is None else r.text
        raise AssertionError(f"timed out waiting for {what}; last response: {last}") from None


async def _parked_on_promise(api: Api, item: str, key: str) -> tuple[str, str]:
    """Start shop.approve; once it is suspended, its invocation id and promise id."""
    r = await api.http.post(
        "/workflows/shop.approve/start", json={"item": item}, headers={"Idempotency-Key": key}
    )
    assert r.status_code == 202, r.text
    invocation_id = r.json()["invocation_id"]
    r = await _until(
        api,
        f"/invocations/{invocation_id}/queries/promise",
        lambda r: r.status_code == 200,
        "the promise id to be published",
    )
    assert r.json() == {
        "invocation_id": invocation_id,
        "query": "promise",
        "value": f"{invocation_id}:1",
    }
    await _until(
        api,
        f"/invocations/{invocation_id}",
        lambda r: r.json()["status"] == "suspended",
        "the workflow to park",
    )
    promise_id: str = r.json()["value"]
    return invocation_id, promise_id


async def test_a_promise_resolved_over_http_completes_the_workflow(api: Api) -> None:
    invocation_id, promise_id = await _parked_on_promise(api, "tea", "approve-1")
    view = (await api.http.get(f"/invocations/{invocation_id}")).json()
    assert view["status"] == "suspended"
    assert view["wake_at"] is None  # it waits to be woken, not for a time
    assert "result" not in view
    r = await api.http.post(f"/promises/{promise_id}/resolve", json="approved")
    assert r.status_code == 200, r.text
    assert r.json() == {"promise_id": promise_id, "status": "resolved"}
    # The same start again, with its key, waits for the first one's result.
    r = await api.http.post(
        "/workflows/shop.approve", json={"item": "tea"}, headers={"Idempotency-Key": "approve-1"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "invocation_id": invocation_id,
        "status": "completed",
        "result": "tea: approved",
    }
    view = (await api.http.get(f"/invocations/{invocation_id}")).json()
    assert (view["status"], view["result"], view["wake_at"]) == ("completed", "tea: approved", None)
    assert EFFECTS == [("release", "tea")]


async def test_a_promise_settles_once_and_unknown_ones_are_404(api: Api) -> None:
    invocation_id, promise_id = await _parked_on_promise(api, "jam", "approve-2")
    assert (await api.http.post(f"/promises/{promise_id}/resolve", json="yes")).status_code == 200
    message = _error(
        await api.http.post(f"/promises/{promise_id}/resolve", json="no"), 409, "conflict"
    )
    assert message == f"promise {promise_id} is already resolved"
    r = await api.http.post(f"/promises/{promise_id}/reject", json={"message": "no"})
    assert "already resolved" in _error(r, 409, "conflict")
    for verb, body in (("resolve", 1), ("reject", {"message": "no"})):
        r = await api.http.post(f"/promises/{invocation_id}:99/{verb}", json=body)
        assert f"promise {invocation_id}:99 does not exist" in _error(r, 404, "not_found")
    r = await _until(
        api,
        f"/invocations/{invocation_id}",
        lambda r: r.json()["status"] == "completed",
        "the workflow to finish",
    )
    assert r.json()["result"] == "jam: yes"


async def test_a_promise_rejected_over_http_fails_the_workflow(api: Api) -> None:
    invocation_id, promise_id = await _parked_on_promise(api, "oil", "approve-3")
    r = await api.http.post(f"/promises/{promise_id}/reject", content=b"{}")
    assert "message" in _error(r, 422, "invalid_arguments")
    r = await api.http.post(f"/promises/{promise_id}/reject", json={"message": "out of stock"})
    assert r.json() == {"promise_id": promise_id, "status": "rejected"}
    r = await api.http.post(
        "/workflows/shop.approve", json={"item": "oil"}, headers={"Idempotency-Key": "approve-3"}
    )
    assert r.status_code == 500
    assert r.json()["invocation_id"] == invocation_id
    assert r.json()["error"] == {"type": "TerminalError", "message": "out of stock"}


async def test_promise_and_signal_bodies_are_checked(api: Api) -> None:
    invocation_id, promise_id = await _parked_on_promise(api, "rye", "approve-4")
    for path in (f"/promises/{promise_id}/resolve", f"/invocations/{invocation_id}/signals/s"):
        _error(await api.http.post(path, content=b"{oops"), 400, "malformed_json")
        big = b'"' + b"x" * LIMIT + b'"'
        _error(await api.http.post(path, content=big), 413, "payload_too_large")
    _error(
        await api.http.post(f"/promises/{promise_id}/reject", json={"message": ""}),
        422,
        "invalid_arguments",
    )
    # Nothing was settled by the refused requests.
    r = await api.http.post(f"/promises/{promise_id}/resolve", json="fine")
    assert r.status_code == 200, r.text
    r = await api.http.post(
        "/workflows/shop.approve", json={"item": "rye"}, headers={"Idempotency-Key": "approve-4"}
    )
    assert r.json()["result"] == "rye: fine"


async def test_signal_then_query(api: Api) -> None:
    r = await api.http.post("/workflows/shop.tally/start", json={"count": 2})
    invocation_id = r.json()["invocation_id"]
    path = f"/invocations/{invocation_id}"
    message = _error(await api.http.get(f"{path}/queries/total"), 404, "not_found")
    assert "published nothing named 'total'" in message
    r = await api.http.post(f"{path}/signals/add", json=5)
    assert r.status_code == 202, r.text
    assert r.json() == {"invocation_id": invocation_id, "signal": "add", "status": "sent"}
    r = await _until(
        api,
        f"{path}/queries/total",
        lambda r: r.status_code == 200,
        "the first signal to be added up",
    )
    assert r.json() == {"invocation_id": invocation_id, "query": "total", "value": 5}
    assert (await api.http.post(f"{path}/signals/add", json=7)).status_code == 202
    r = await _until(
        api, path, lambda r: r.json()["status"] == "completed", "the workflow to finish"
    )
    assert r.json()["result"] == 12
    assert (await api.http.get(f"{path}/queries/total")).json()["value"] == 12
    # A finished invocation takes no more signals; an unknown one is 404.
    message = _error(await api.http.post(f"{path}/signals/add", json=1), 409, "conflict")
    assert "already completed" in message
    _error(await api.http.post("/invocations/0000-missing/signals/add", json=1), 404, "not_found")
    _error(await api.http.get("/invocations/0000-missing/queries/total"), 404, "not_found")


async def test_cancel_a_parked_workflow_over_http(api: Api) -> None:
    invocation_id, _ = await _parked_on_promise(api, "tea", "approve-5")
    path = f"/invocations/{invocation_id}"
    _error(await api.http.post(f"{path}/cancel", json={"reason": 3}), 422, "invalid_arguments")
    r = await api.http.post(f"{path}/cancel", json={"reason": "customer asked"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == path
    assert r.json()["cancel_reason"] == "customer asked"
    # Waiting for it (the same start, with its key) gives the cancellation.
    r = await api.http.post(
        "/workflows/shop.approve", json={"item": "tea"}, headers={"Idempotency-Key": "approve-5"}
    )
    assert r.status_code == 409, r.text
    assert r.json() == {
        "invocation_id": invocation_id,
        "status": "cancelled",
        "error": {"type": "Cancelled", "message": "customer asked"},
    }
    view = (await api.http.get(path)).json()
    assert view["status"] == "cancelled"
    assert view["error"] == {"type": "Cancelled", "message": "customer asked"}
    assert EFFECTS == [("release", "tea")]  # its finally block ran, once
    kinds = [e["kind"] for e in (await api.http.get(f"{path}/journal")).json()["entries"]]
    assert kinds == ["input", "promise", "publish", "cancel", "step", "output"]
    # Cancelling it again, or cancelling a completed invocation, is a conflict.
    message = _error(await api.http.post(f"{path}/cancel"), 409, "conflict")
    assert "already cancelled" in message
    done = await api.http.post("/workflows/shop.order", json=[{"item": "jam", "quantity": 1}])
    r = await api.http.post(f"/invocations/{done.json()['invocation_id']}/cancel")
    assert "already completed" in _error(r, 409, "conflict")
    _error(await api.http.post("/invocations/0000-missing/cancel"), 404, "not_found")


async def test_timeout_seconds_sets_a_deadline(frozen_api: Api, clock_frozen: FakeClock) -> None:
    api = frozen_api
    _error(await api.http.post("/workflows/shop.nap?timeout_seconds=0"), 400, "bad_request")
    _error(await api.http.post("/workflows/shop.nap?timeout_seconds=1e12"), 400, "bad_request")
    start = clock_frozen.now()
    r = await api.http.post("/workflows/shop.nap/start?timeout_seconds=7200")
    assert r.status_code == 202, r.text
    path = f"/invocations/{r.json()['invocation_id']}"
    r = await _until(api, path, lambda r: r.json()["status"] == "suspended", "the nap to park")
    view = r.json()
    # Parked for a day, but woken at its deadline, two hours in.
    two_hours = datetime.datetime.fromtimestamp(start + 7200, datetime.UTC)
    assert view["deadline"] == two_hours.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert view["wake_at"] == view["deadline"]
    clock_frozen.advance(7200)
    r = await _until(api, path, lambda r: r.json()["status"] == "cancelled", "the deadline")
    assert r.json()["error"] == {"type": "Cancelled", "message": "timed out (its deadline passed)"}
    assert r.json()["wake_at"] is None


async def test_a_suspended_sleep_shows_when_it_wakes(
    frozen_api: Api, clock_frozen: FakeClock
) -> None:
    api = frozen_api
    start = clock_frozen.now()
    r = await api.http.post("/workflows/shop.nap?timeout=0.01")
    assert r.status_code == 202  # still asleep when the wait ran out
    path = f"/invocations/{r.json()['invocation_id']}"
    r = await _until(api, path, lambda r: r.json()["status"] == "suspended", "the nap to park")
    day = datetime.datetime.fromtimestamp(start + 86400, datetime.UTC)
    assert r.json()["wake_at"] == day.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert r.json()["deadline"] is None
    clock_frozen.advance(86400)
    r = await _until(api, path, lambda r: r.json()["status"] == "completed", "the nap to end")
    assert r.json()["result"] == "rested"


async def test_control_routes_are_in_the_openapi_document(api: Api) -> None:
    doc = (await api.http.get("/openapi.json")).json()
    paths = doc["paths"]
    assert set(paths["/promises/{promise_id}/resolve"]) == {"post"}
    assert set(paths["/promises/{promise_id}/reject"]) == {"post"}
    assert set(paths["/invocations/{invocation_id}/signals/{name}"]) == {"post"}
    assert set(paths["/invocations/{invocation_id}/queries/{name}"]) == {"get"}
    cancel = paths["/invocations/{invocation_id}/cancel"]["post"]
    assert set(cancel["responses"]) >= {"202", "404", "409"}
    assert cancel["requestBody"]["required"] is False
    start = paths["/workflows/shop.nap/start"]["post"]
    assert "timeout_seconds" in {p["name"] for p in start["parameters"]}
    invocation = doc["components"]["schemas"]["Invocation"]["properties"]
    assert {"wake_at", "deadline", "parent_id", "cancel_reason"} <= set(invocation)
    kinds = doc["components"]["schemas"]["JournalEntry"]["properties"]["kind"]["enum"]
    assert {"promise", "signal", "publish", "cancel", "timer"} <= set(kinds)


# -- the OpenAPI document -----------------------------------------------------------


async def test_openapi_document(api: Api) -> None:
    r = await api.http.get("/openapi.json")
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    for path in (
        "/workflows/shop.order",
        "/workflows/shop.order/start",
        "/workflows/shop.refund",
        "/actors/Counter/{key}/add",
        "/actors/Counter/{key}/history",
        "/actors/Counter/{key}/state",
        "/actors/Scratch/{key}/add",
        "/invocations",
        "/invocations/{invocation_id}",
        "/invocations/{invocation_id}/journal",
    ):
        assert path in paths, path
    # A plain actor keeps no history; Scratch.history is a handler.
    assert set(paths["/actors/Scratch/{key}/history"]) == {"post"}
    assert "/actors/Scratch/{key}/state" not in paths
    post = paths["/workflows/shop.order"]["post"]
    assert post["requestBody"]["required"] is True
    keyword, positional = post["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert keyword["properties"]["o"] == {"$ref": "#/components/schemas/Order"}
    assert keyword["required"] == ["o"]
    assert keyword["properties"]["note"] == {"type": "string"}
    assert positional["minItems"] == 1
    result = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert result["properties"]["result"] == {"$ref": "#/components/schemas/Total"}
    schemas = doc["components"]["schemas"]
    assert schemas["Order"]["properties"]["quantity"] == {"type": "integer"}
    assert schemas["Tally"]["properties"]["total"] == {"type": "integer", "default": 0}
    assert {p["name"] for p in post["parameters"]} == {
        "wait",
        "timeout",
        "timeout_seconds",
        "Idempotency-Key",
    }
    assert doc["security"] == [{"bearer": []}]
    assert paths["/workflows/shop.wait"]["post"]["requestBody"]["required"] is False
    # Every reference resolves.
    text = r.text
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name.split("/")[0] in schemas, name


# -- the app on its own ----------------------------------------------------------------


async def test_app_lifespan_runs_the_runtime(tmp_path: Any) -> None:
    rt = perdure.Runtime(f"sqlite:///{tmp_path}/app.db", workflows=[order], actors=[Counter])
    app = create_app(rt)  # no token: no auth
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        r = await client.post("/workflows/shop.order", json=[{"item": "tea", "quantity": 4}])
        assert r.json()["result"] == {"item": "tea", "cents": 1000}
        assert (await client.get("/actors/Counter/z/history")).json()["messages"] == []
    assert EFFECTS == [("charge", "tea", 4)]
    # The lifespan stopped the runtime: its SQLite file is free again.
    async with perdure.Runtime(f"sqlite:///{tmp_path}/app.db", workflows=[order]) as again:
        assert len(await again.client.list()) == 1


def test_create_app_checks_its_options() -> None:
    rt = perdure.Runtime("memory://")
    with pytest.raises(ValueError, match="token"):
        create_app(rt, token="")
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(rt, max_body_bytes=0)


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.1.2.3")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("192.168.1.5")
    assert not is_loopback("example.com")


async def test_serve_refuses_an_open_api_on_a_public_address() -> None:
    rt = perdure.Runtime("memory://", workflows=[order])
    with pytest.raises(perdure.ConfigurationError, match="without a token"):
        await serve(rt, host="0.0.0.0", port=0)


def test_plain_import_does_not_need_the_server_extra() -> None:
    code = (
        "import sys, perdure, perdure._cli, perdure._cli_store, perdure._cli_serve\n"
        "loaded = {'starlette', 'uvicorn', 'httpx'} & set(sys.modules)\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_ingress_public_names() -> None:
    assert perdure.ingress.__all__ == ["create_app", "is_loopback", "serve"]
