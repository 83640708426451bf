"""The web UI's page, its JSON endpoints and the browser sign-in, in-process
over every store (httpx's ASGI transport). tests/test_ui_browser.py drives
the same page in a real Chromium."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest

import perdure
import ui_app
from conftest import Backend
from perdure.ingress import create_app
from perdure.ingress._ui import changes

TOKEN = "ui-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "http://perdure.test"


class Plain(perdure.Actor[dict[str, int]]):
    """Not durable: it keeps no history to show."""

    async def poke(self, ctx: perdure.Context) -> None:
        pass


@dataclass
class Ui:
    rt: perdure.Runtime
    http: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    ids: dict[str, str]


@pytest.fixture
async def ui(backend: Backend) -> AsyncIterator[Ui]:
    rt = backend.runtime([ui_app.ship_order, ui_app.book_ledger], actors=[ui_app.Cart, Plain])
    async with rt:
        ids = await ui_app.populate(rt)
        transport = httpx.ASGITransport(app=create_app(rt, token=TOKEN))
        async with (
            httpx.AsyncClient(transport=transport, base_url=BASE, headers=AUTH) as http,
            httpx.AsyncClient(transport=transport, base_url=BASE) as anonymous,
        ):
            yield Ui(rt, http, anonymous, ids)


async def test_the_page_is_served_with_a_strict_policy(ui: Ui) -> None:
    r = await ui.http.get("/")
    assert r.status_code == 307
    assert r.headers["location"] == "/ui/"
    page = await ui.http.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert 'src="static/app.js"' in page.text
    script = await ui.http.get("/ui/static/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text  # user data goes in as text only
    css = await ui.http.get("/ui/static/style.css")
    assert css.headers["content-type"].startswith("text/css")
    missing = await ui.http.get("/ui/static/..%2F_ui.py")
    assert missing.status_code == 404


async def test_a_token_in_the_address_becomes_a_cookie(ui: Ui) -> None:
    assert (await ui.anonymous.get("/ui/")).status_code == 401
    wrong = await ui.anonymous.get("/ui/?token=nope")
    assert wrong.status_code == 401
    assert "/ui/?token=" in wrong.json()["error"]["message"]

    r = await ui.anonymous.get("/ui/?token=" + TOKEN + "&x=1")
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/?x=1"  # the token leaves the address bar
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/" in cookie
    assert TOKEN not in cookie
    # The cookie stands for the token on reads...
    assert (await ui.anonymous.get("/ui/")).status_code == 200
    assert (await ui.anonymous.get("/invocations")).status_code == 200
    # ...but not on a write another site's form could send: that needs the
    # header only the UI's own script sends.
    failed = ui.ids["ledger o-3"]
    r = await ui.anonymous.post(f"/ui/api/invocations/{failed}/fork?upto=2")
    assert r.status_code == 401
    r = await ui.anonymous.post("/workflows/ship_order", json=["o-9"])
    assert r.status_code == 401
    r = await ui.anonymous.post(
        f"/ui/api/invocations/{failed}/fork?upto=2", headers={"X-Perdure-UI": "1"}
    )
    assert r.status_code == 200, r.text
    ui.anonymous.cookies.set("perdure_ui", "forged")
    assert (await ui.anonymous.get("/invocations")).status_code == 401


async def test_without_a_token_the_ui_needs_no_sign_in(backend: Backend) -> None:
    rt = backend.runtime([ui_app.ship_order], actors=[ui_app.Cart])
    async with rt:
        transport = httpx.ASGITransport(app=create_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
            assert (await http.get("/ui/")).status_code == 200
            assert (await http.get("/ui/api/actors")).json() == {"actors": []}


async def test_actors_lists_the_durable_ones(ui: Ui) -> None:
    await ui.rt.client.actor(Plain, "p").ask(Plain.poke)
    r = await ui.http.get("/ui/api/actors")
    assert r.json() == {
        "actors": [{"type": "Cart", "key": "alice"}, {"type": "Cart", "key": "bob"}]
    }


async def test_a_timeline_shows_the_failed_attempts(ui: Ui) -> None:
    r = await ui.http.get(f"/ui/api/invocations/{ui.ids['ledger o-3']}/timeline")
    view = r.json()
    assert view["invocation"]["status"] == "failed"
    entries = view["entries"]
    assert [(e["kind"], e["name"], e["ok"]) for e in entries] == [
        ("input", "book_ledger", True),
        ("step", "reserve", True),
        ("step", "ledger", False),
        ("output", "book_ledger", False),
    ]
    ledger = entries[2]
    assert ledger["attempts"] == 3
    assert ledger["error"] == {"type": "RuntimeError", "message": "ledger rejected o-3"}
    assert [a["attempt"] for a in ledger["failed_attempts"]] == [1, 2]
    assert ledger["failed_attempts"][0]["error"]["type"] == "RuntimeError"
    assert "traceback" not in r.text.lower()

    shipped = (await ui.http.get(f"/ui/api/invocations/{ui.ids['ship o-1']}/timeline")).json()
    charge = shipped["entries"][2]
    assert charge["ok"]
    assert charge["value"] == "tx-o-1"
    assert charge["attempts"] == 2
    assert charge["failed_attempts"][0]["error"] == {
        "type": "ConnectionError",
        "message": "bank unreachable while charging o-1",
    }
    missing = await ui.http.get("/ui/api/invocations/nope/timeline")
    assert missing.status_code == 404


def _kinds(diff: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    def kind(before: Any, after: Any) -> str:
        if repr(before) == "<missing>":
            return "added"
        if repr(after) == "<missing>":
            return "removed"
        return "changed"

    return {path: kind(*change) for path, change in diff.items()}


async def test_an_actor_step_is_the_state_after_it_and_what_it_changed(ui: Ui) -> None:
    cart = ui.rt.client.actor(ui_app.Cart, "alice")
    for k in range(11):
        view = (await ui.http.get(f"/ui/api/actors/Cart/alice/step?at={k}")).json()
        assert view["at"] == k
        assert view["last"] == 10
        assert view["state"] == msgspec.to_builtins(await cart.state_at(k))
        if k == 0:
            assert view["previous"] is None
            assert view["changes"] == []
            assert view["message"] is None
            continue
        assert view["previous"] == msgspec.to_builtins(await cart.state_at(k - 1))
        expected = _kinds(await cart.diff(k - 1, k))
        assert {c["path"]: c["change"] for c in view["changes"]} == expected
        handler, args = ui_app.CART_MESSAGES[k - 1]
        message = view["message"]
        assert message["target"] == f"Cart.{handler.__name__}"
        assert message["actor"] == {"type": "Cart", "key": "alice", "seq": k}
        assert message["input"] == {"args": list(args), "kwargs": {}}
        assert message["output"]["ok"] is True
    latest = (await ui.http.get("/ui/api/actors/Cart/alice/step")).json()
    assert latest["at"] == 10
    r = await ui.http.get("/ui/api/actors/Cart/alice/step?at=11")
    assert r.status_code == 400
    assert "between 0 and 10" in r.text
    assert (await ui.http.get("/ui/api/actors/Plain/p/step")).status_code == 404
    assert (await ui.http.get("/ui/api/actors/Nope/p/step")).status_code == 404


async def test_a_fork_is_a_dry_run_and_needs_the_ui_header(ui: Ui) -> None:
    failed = ui.ids["ledger o-3"]
    r = await ui.http.post(f"/ui/api/invocations/{failed}/fork?upto=2")
    assert r.status_code == 403
    assert "x-perdure-ui" in r.text
    headers = {"X-Perdure-UI": "1"}
    r = await ui.http.post(f"/ui/api/invocations/{failed}/fork?upto=2", headers=headers)
    view = r.json()
    assert view["status"] == "stopped"
    assert view["stopped_at"] == {"index": 2, "step": "ledger"}
    assert (view["replayed"], view["executed"]) == (1, 0)
    shipped = ui.ids["ship o-2"]
    view = (await ui.http.post(f"/ui/api/invocations/{shipped}/fork", headers=headers)).json()
    assert view["status"] == "completed"
    assert view["value"] == {"order": "o-2", "reservation": "r-o-2", "transaction": "tx-o-2"}
    r = await ui.http.post(f"/ui/api/invocations/{shipped}/fork?upto=0", headers=headers)
    assert r.status_code == 400
    r = await ui.http.post("/ui/api/invocations/nope/fork", headers=headers)
    assert r.status_code == 404
    # The original is untouched.
    record = await (await ui.rt.client.get(failed)).record()
    assert record.status is perdure.Status.FAILED


def test_changes_name_what_was_added_removed_and_changed() -> None:
    before = {"a": 1, "b": {"x": [1, 2]}, "gone": True, "log": [1]}
    after = {"a": 2, "b": {"x": [1, 3]}, "new": None, "log": [1, 2]}
    assert changes(before, after) == [
        {"path": "a", "change": "changed", "before": 1, "after": 2},
        {"path": "b.x[1]", "change": "changed", "before": 2, "after": 3},
        {"path": "gone", "change": "removed", "before": True, "after": None},
        {"path": "log", "change": "changed", "before": [1], "after": [1, 2]},
        {"path": "new", "change": "added", "before": None, "after": None},
    ]
    assert changes(1, 2) == [{"path": ".", "change": "changed", "before": 1, "after": 2}]
    assert changes({"a": 1}, {"a": 1}) == []


async def test_an_unexpected_error_is_logged_not_sent(
    ui: Ui, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(invocation_id: str) -> list[Any]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ui.rt.store, "read_attempts", broken)
    r = await ui.http.get(f"/ui/api/invocations/{ui.ids['ship o-1']}/timeline")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "internal_error"
    assert "disk on fire" not in r.text
    assert "disk on fire" in caplog.text
