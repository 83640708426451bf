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


@dataclasses.dataclass
class Api:
    rt: perdure.Runtime
    http: httpx.AsyncClient


@pytest.fixture
async def api(backend: Backend) -> AsyncIterator[Api]:
    rt = backend.runtime([order, refund, wait_for_gate, typed], actors=[Counter, Scratch])
    async with rt:
        app = create_app(rt, token=TOKEN, max_body_bytes=LIMIT)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://perdure.test", headers=AUTH
        ) as http:
            yield Api(rt, http)


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
    assert {p["name"] for p in post["parameters"]} == {"wait", "timeout", "Idempotency-Key"}
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
