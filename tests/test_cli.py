"""The store-reading commands and ``perdure serve``, against real SQLite files."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

import perdure
import perdure.ingress
from perdure._cli import main
from perdure._demo.payments import SQLiteProvider
from perdure.testing import FakeClock

SRC = str(Path(perdure.__file__).resolve().parents[1])
APP = "test_cli:DEFINITIONS"
START = 1_700_000_000.0  # 2023-11-14T22:13:20Z

EFFECTS: list[Any] = []


@dataclasses.dataclass
class Parcel:
    ref: str
    grams: int


def label(p: Parcel) -> str:
    EFFECTS.append(("label", p.ref))
    return f"L-{p.ref}"


def send(p: Parcel, tag: str) -> str:
    EFFECTS.append(("send", p.ref))
    return f"sent {tag}"


@perdure.workflow(name="ship")
async def ship(ctx: perdure.Context, p: Parcel) -> dict[str, Any]:
    tag = await ctx.run("label", label, p)
    sent = await ctx.run("send", send, p, tag)
    return {"ref": p.ref, "tag": tag, "sent": sent}


@perdure.workflow(name="lose")
async def lose(ctx: perdure.Context, ref: str) -> None:
    raise perdure.TerminalError(f"parcel {ref} is lost")


@dataclasses.dataclass
class Book:
    cents: int = 0
    entries: int = 0


class Ledger(perdure.Actor[Book]):
    durability = perdure.DurabilityFacet(checkpoint_every=2)

    async def post(self, ctx: perdure.Context, cents: int) -> int:
        self.state.cents += cents
        self.state.entries += 1
        return self.state.cents


DEFINITIONS = [ship, lose, Ledger]


@dataclasses.dataclass
class Populated:
    url: str
    shipped: list[str]  # invocation ids of ship, in order
    lost: str


async def _populate(url: str) -> Populated:
    clock = FakeClock(START)
    async with perdure.Runtime(url, workflows=[ship, lose], actors=[Ledger], clock=clock) as rt:
        shipped = []
        for i in range(3):
            handle = await rt.client.start(ship, Parcel(f"p{i}", 100 * i), idempotency_key=f"k{i}")
            await handle.result()
            shipped.append(handle.id)
            clock.advance(60)
        failed = await rt.client.start(lose, "p9")
        with pytest.raises(perdure.InvocationFailedError):
            await failed.result()
        ledger = rt.client.actor(Ledger, "acct")
        for cents in (100, 250, 50):
            await ledger.ask(Ledger.post, cents)
    return Populated(url, shipped, failed.id)


@pytest.fixture
def populated(tmp_path: Path) -> Populated:
    found = asyncio.run(_populate(f"sqlite:///{tmp_path}/cli.db"))
    EFFECTS.clear()
    return found


def cli(*args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def cli_json(*args: str) -> Any:
    return json.loads(cli(*args, "--json").stdout)


# -- invocations --------------------------------------------------------------------


def test_invocations_list(populated: Populated) -> None:
    store = ("--store", populated.url)
    views = cli_json("invocations", "list", *store)["invocations"]
    assert [v["target"] for v in views] == ["ship"] * 3 + ["lose"] + ["Ledger.post"] * 3
    assert [v["invocation_id"] for v in views[:3]] == populated.shipped
    assert views[0]["idempotency_key"] == "k0"
    assert views[0]["created_at"] == "2023-11-14T22:13:20.000Z"
    assert views[-1]["actor"] == {"type": "Ledger", "key": "acct", "seq": 3}

    failed = cli_json("invocations", "list", *store, "--status", "failed")["invocations"]
    assert [v["invocation_id"] for v in failed] == [populated.lost]
    assert len(cli_json("invocations", "list", *store, "--target", "ship")["invocations"]) == 3
    assert len(cli_json("invocations", "list", *store, "--limit", "2")["invocations"]) == 2
    since = cli_json("invocations", "list", *store, "--since", "2023-11-14T22:14:00Z")
    assert [v["invocation_id"] for v in since["invocations"][:2]] == populated.shipped[1:]
    # Everything here was made in 2023, by the fake clock.
    assert cli_json("invocations", "list", *store, "--since", "2h")["invocations"] == []

    text = cli("invocations", "list", *store).stdout
    for invocation_id in populated.shipped:
        assert invocation_id in text
    assert "failed" in text
    assert "Ledger/acct #3" in text
    assert "7 invocation(s)" in text


def test_invocations_list_bad_options(populated: Populated) -> None:
    r = cli("invocations", "list", "--store", populated.url, "--status", "lost", ok=False)
    assert r.exit_code == 1
    assert "unknown status 'lost'" in r.output
    r = cli("invocations", "list", "--store", populated.url, "--since", "soon", ok=False)
    assert r.exit_code == 2
    assert "duration such as 30m" in r.output


def test_invocations_show(populated: Populated) -> None:
    store = ("--store", populated.url)
    view = cli_json("invocations", "show", populated.shipped[1], *store)
    assert view["status"] == "completed"
    assert view["result"] == {"ref": "p1", "tag": "L-p1", "sent": "sent L-p1"}
    text = cli("invocations", "show", populated.shipped[1], *store).stdout
    assert "completed" in text
    assert '"tag": "L-p1"' in text

    view = cli_json("invocations", "show", populated.lost, *store)
    assert view["status"] == "failed"
    assert view["error"]["type"] == "TerminalError"
    assert view["error"]["message"] == "parcel p9 is lost"
    assert "Traceback" in view["error"]["traceback"]  # the operator sees it, locally
    text = cli("invocations", "show", populated.lost, *store).stdout
    assert "TerminalError: parcel p9 is lost" in text

    r = cli("invocations", "show", "no-such-id", *store, ok=False)
    assert r.exit_code == 1
    assert "invocation no-such-id does not exist" in r.output


def test_journal(populated: Populated) -> None:
    store = ("--store", populated.url)
    view = cli_json("journal", populated.shipped[0], *store)
    assert [(e["kind"], e["name"]) for e in view["entries"]] == [
        ("input", "ship"),
        ("step", "label"),
        ("step", "send"),
        ("output", "ship"),
    ]
    assert view["entries"][1]["value"] == "L-p0"
    text = cli("journal", populated.shipped[0], *store).stdout
    assert "label" in text
    assert '"L-p0"' in text
    failed = cli_json("journal", populated.lost, *store)["entries"][-1]
    assert failed["ok"] is False
    assert failed["error"]["message"] == "parcel p9 is lost"
    assert cli("journal", "nope", *store, ok=False).exit_code == 1


# -- actors ----------------------------------------------------------------------------


def test_actor_history_and_state(populated: Populated) -> None:
    args = ("--store", populated.url, "--app", APP)
    history = cli_json("actor", "history", "Ledger", "acct", *args)
    assert [m["actor"]["seq"] for m in history["messages"]] == [1, 2, 3]
    assert "3 message(s) to Ledger/acct" in cli("actor", "history", "Ledger", "acct", *args).stdout

    assert cli_json("actor", "state", "Ledger", "acct", "--at", "1", *args) == {
        "actor_type": "Ledger",
        "key": "acct",
        "at": 1,
        "state": {"cents": 100, "entries": 1},
    }
    latest = cli_json("actor", "state", "Ledger", "acct", *args)
    assert (latest["at"], latest["state"]) == (3, {"cents": 400, "entries": 3})
    text = cli("actor", "state", "Ledger", "acct", "--at", "2", *args).stdout
    assert "Ledger/acct after message 2" in text
    assert '"cents": 350' in text

    r = cli("actor", "state", "Ledger", "acct", "--at", "9", *args, ok=False)
    assert r.exit_code == 1
    assert "latest message of actor Ledger/acct is #3" in r.output
    r = cli("actor", "history", "Ledger", "acct", "--store", populated.url, ok=False)
    assert r.exit_code == 2
    assert "--app" in r.output
    r = cli("actor", "history", "Nope", "acct", *args, ok=False)
    assert r.exit_code == 1
    assert "no actor type named 'Nope'" in r.output


# -- fork ------------------------------------------------------------------------------


def test_fork(populated: Populated) -> None:
    args = ("--store", populated.url, "--app", APP)
    dry = cli_json("fork", populated.shipped[2], "--upto", "2", *args)
    assert dry["status"] == "stopped"
    assert dry["stopped_at"] == {"index": 2, "step": "send"}
    assert dry["replayed"] == 1
    assert EFFECTS == []  # a dry run makes no external call
    text = cli("fork", populated.shipped[2], "--upto", "2", *args).stdout
    assert "stopped before step 'send'" in text

    live = cli_json("fork", populated.shipped[2], "--upto", "2", "--live", *args)
    assert live["status"] == "completed"
    assert live["value"] == {"ref": "p2", "tag": "L-p2", "sent": "sent L-p2"}
    assert live["executed"] == 1
    assert EFFECTS == [("send", "p2")]
    # The original is untouched.
    assert len(cli_json("journal", populated.shipped[2], "--store", populated.url)["entries"]) == 4


# -- errors opening the store or the app ----------------------------------------------------


def test_missing_store(tmp_path: Path) -> None:
    r = cli("invocations", "list", "--store", f"sqlite:///{tmp_path}/none.db", ok=False)
    assert r.exit_code == 1
    assert "there is no Perdure store at" in r.output
    assert not (tmp_path / "none.db").exists()  # and none was created
    r = cli("invocations", "list", "--store", "mysql://x", ok=False)
    assert r.exit_code == 2
    assert "unknown scheme" in r.output


def test_store_held_by_another_runtime(populated: Populated) -> None:
    with perdure.SyncRuntime(populated.url, workflows=[ship]):
        r = cli("invocations", "list", "--store", populated.url, ok=False)
    assert r.exit_code == 1
    assert "another Perdure runtime" in r.output
    assert "HTTP API" in r.output
    cli("invocations", "list", "--store", populated.url)  # free again


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("test_cli", "is not module:attribute"),
        ("no_such_module_here:x", "cannot import no_such_module_here"),
        ("test_cli:NOPE", "has no attribute 'NOPE'"),
        ("test_cli:START", "it must be a list of workflows and actor classes"),
        ("test_cli:BAD_DEFINITIONS", "neither a workflow nor an actor class"),
    ],
)
def test_bad_app(populated: Populated, spec: str, message: str) -> None:
    r = cli("actor", "history", "Ledger", "a", "--store", populated.url, "--app", spec, ok=False)
    assert r.exit_code == 2
    assert message in r.output


BAD_DEFINITIONS = [ship, "not a workflow"]


def definitions() -> list[Any]:
    return [Ledger]


def test_app_may_be_a_function_or_one_definition(populated: Populated) -> None:
    for spec in ("test_cli:definitions", "test_cli:Ledger"):
        args = ("--store", populated.url, "--app", spec)
        assert cli_json("actor", "state", "Ledger", "acct", *args)["at"] == 3


# -- perdure cancel, promise, signal, query -------------------------------------------------


@perdure.workflow(name="hold")
async def hold(ctx: perdure.Context, ref: str) -> str:
    """Parks on a promise, whose id it publishes as the query "promise"."""
    release = ctx.promise("release", type=str)
    await ctx.publish("promise", release.id)
    return f"{ref}: {await release}"


@perdure.workflow(name="weigh")
async def weigh(ctx: perdure.Context, count: int) -> int:
    grams = 0
    for _ in range(count):
        grams += await ctx.signal("add", type=int)
        await ctx.publish("grams", grams)
    return grams


@perdure.workflow(name="dispatch")
async def dispatch(ctx: perdure.Context, ref: str) -> str:
    return await ctx.start(hold, ref)


CONTROLLED = [hold, weigh, dispatch]


async def _until_suspended(handle: perdure.InvocationHandle[Any]) -> None:
    """Wait (in small real steps: the clock is fake) for ``handle`` to park."""
    async with asyncio.timeout(10):
        while True:
            try:
                if await handle.status() is perdure.Status.SUSPENDED:
                    return
            except perdure.NotFoundError:  # a child not created yet
                pass
            await asyncio.sleep(0.002)


async def _park(url: str, workflow: Any, *args: Any, **options: Any) -> str:
    """Start ``workflow`` on a runtime, wait for it to park, stop the runtime.

    Time stands still meanwhile, so that a deadline does not pass."""
    clock = FakeClock(START, autojump=False)
    async with perdure.Runtime(url, workflows=CONTROLLED, clock=clock) as rt:
        handle = await rt.client.start(workflow, *args, **options)
        await _until_suspended(handle)
        return handle.id


async def _finish(url: str, invocation_id: str, target: str) -> Any:
    """A runtime on the store again: the invocation's result (it resumes)."""
    async with perdure.Runtime(url, workflows=CONTROLLED, clock=FakeClock(START)) as rt:
        handle = perdure.InvocationHandle[Any](rt, invocation_id, target)
        return await asyncio.wait_for(handle.result(), 10)


def test_promise_resolved_from_the_cli_while_no_runtime_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hold.db"
    store = ("--store", url)
    invocation_id = asyncio.run(_park(url, hold, "p1"))
    view = cli_json("invocations", "show", invocation_id, *store)
    assert (view["status"], view["wake_at"]) == ("suspended", None)
    assert "when woken" in cli("invocations", "show", invocation_id, *store).stdout
    promise_id = cli_json("query", invocation_id, "promise", *store)["value"]
    assert promise_id == f"{invocation_id}:1"
    assert cli("query", invocation_id, "promise", *store).stdout == f'"{promise_id}"\n'

    r = cli("promise", "resolve", promise_id, "released", *store, ok=False)
    assert r.exit_code == 2  # not JSON: a string needs its quotes
    assert "is not JSON" in r.output
    r = cli("promise", "resolve", promise_id, '"released"', *store)
    assert f"promise {promise_id} resolved" in r.stdout
    r = cli("promise", "resolve", promise_id, '"again"', *store, ok=False)
    assert r.exit_code == 1
    assert f"promise {promise_id} is already resolved" in r.output
    assert "already resolved" in cli("promise", "reject", promise_id, "no", *store, ok=False).output
    r = cli("promise", "resolve", "no-such-promise", "1", *store, ok=False)
    assert r.exit_code == 1
    assert "promise no-such-promise does not exist" in r.output
    # Recorded, and the invocation is due: the next runtime resumes it.
    assert cli_json("invocations", "show", invocation_id, *store)["wake_at"] is not None
    assert asyncio.run(_finish(url, invocation_id, "hold")) == "p1: released"
    assert cli_json("invocations", "show", invocation_id, *store)["result"] == "p1: released"


def test_promise_rejected_from_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hold.db"
    invocation_id = asyncio.run(_park(url, hold, "p2"))
    view = cli_json("promise", "reject", f"{invocation_id}:1", "parcel refused", "--store", url)
    assert view == {"promise_id": f"{invocation_id}:1", "status": "rejected"}
    with pytest.raises(perdure.InvocationFailedError, match="parcel refused"):
        asyncio.run(_finish(url, invocation_id, "hold"))


def test_signal_and_query_from_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/weigh.db"
    store = ("--store", url)
    invocation_id = asyncio.run(_park(url, weigh, 2))
    r = cli("query", invocation_id, "grams", *store, ok=False)
    assert r.exit_code == 1
    assert "has published nothing named 'grams'" in r.output
    assert cli_json("signal", invocation_id, "add", "500", *store) == {
        "invocation_id": invocation_id,
        "signal": "add",
        "status": "sent",
    }
    assert "signal 'add' sent" in cli("signal", invocation_id, "add", "250", *store).stdout
    assert cli("signal", invocation_id, "add", "{", *store, ok=False).exit_code == 2
    assert asyncio.run(_finish(url, invocation_id, "weigh")) == 750
    assert cli_json("query", invocation_id, "grams", *store)["value"] == 750
    r = cli("signal", invocation_id, "add", "1", *store, ok=False)
    assert r.exit_code == 1
    assert "already completed" in r.output
    assert cli("signal", "no-such-id", "add", "1", *store, ok=False).exit_code == 1


def test_cancel_from_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hold.db"
    store = ("--store", url)
    invocation_id = asyncio.run(_park(url, hold, "p3"))
    r = cli("cancel", invocation_id, "--reason", "parcel recalled", *store)
    assert f"cancellation of {invocation_id} recorded (reason: parcel recalled)" in r.stdout
    text = cli("invocations", "show", invocation_id, *store).stdout
    assert re.search(r"cancel reason +parcel recalled", text), text
    with pytest.raises(perdure.InvocationCancelledError, match="parcel recalled"):
        asyncio.run(_finish(url, invocation_id, "hold"))
    view = cli_json("invocations", "show", invocation_id, *store)
    assert view["status"] == "cancelled"
    assert view["error"]["message"] == "parcel recalled"
    r = cli("cancel", invocation_id, *store, ok=False)
    assert r.exit_code == 1
    assert "already cancelled" in r.output
    assert cli("cancel", "no-such-id", *store, ok=False).exit_code == 1
    assert cli("cancel", invocation_id, "--reason", "", *store, ok=False).exit_code == 2


def test_invocations_show_a_child_with_its_parent_and_deadline(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/dispatch.db"
    store = ("--store", url)
    parent_id = asyncio.run(_park(url, dispatch, "p4", timeout=datetime.timedelta(hours=1)))
    deadline = "2023-11-14T23:13:20.000Z"  # START + 1 h
    parent = cli_json("invocations", "show", parent_id, *store)
    assert (parent["status"], parent["deadline"], parent["wake_at"]) == (
        "suspended",
        deadline,
        deadline,  # woken by its child, or at its deadline
    )
    (child,) = cli_json("invocations", "list", *store, "--target", "hold")["invocations"]
    assert (child["parent_id"], child["deadline"]) == (parent_id, deadline)
    text = cli("invocations", "show", child["invocation_id"], *store).stdout
    assert re.search(f"parent +{parent_id}", text), text
    assert re.search(f"deadline +{deadline}", text), text
    assert re.search(f"wakes +{deadline}", text), text  # at the deadline it inherited


def test_control_commands_refuse_a_store_held_by_a_runtime(populated: Populated) -> None:
    with perdure.SyncRuntime(populated.url, workflows=[ship]):
        r = cli("promise", "resolve", "x:1", "1", "--store", populated.url, ok=False)
        assert r.exit_code == 1
        assert "another Perdure runtime" in r.output
        assert "POST /promises/ID/resolve" in r.output
        r = cli("cancel", populated.shipped[0], "--store", populated.url, ok=False)
        assert "POST /invocations/ID/cancel" in r.output


# -- perdure serve -----------------------------------------------------------------------------


def test_serve_generates_a_token_off_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def fake_serve(runtime: perdure.Runtime, **options: Any) -> None:
        seen.update(options)
        options["ready"]("http://0.0.0.0:1234")

    monkeypatch.setattr(perdure.ingress, "serve", fake_serve)
    r = cli("serve", "--store", "memory://", "--app", APP, "--host", "0.0.0.0", "--port", "1234")
    assert seen["host"] == "0.0.0.0"
    token = seen["token"]
    assert isinstance(token, str)
    assert len(token) >= 32
    assert f"Authorization: Bearer {token}" in r.stderr
    assert f"http://0.0.0.0:1234/ui/?token={token}" in r.stderr  # the web UI's sign-in
    assert "2 workflow(s) and 1 actor type(s)" in r.stderr

    cli("serve", "--store", "memory://", "--app", APP, "--token", "mine")
    assert seen["host"] == "127.0.0.1"
    assert seen["token"] == "mine"
    cli("serve", "--store", "memory://", "--app", APP)
    assert seen["token"] is None  # loopback: no token unless asked for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
def test_serve_over_real_http(tmp_path: Path) -> None:
    """``perdure serve`` as a process: real HTTP, an Idempotency-Key sent twice
    charges the (fake) card provider once."""
    store = f"sqlite:///{tmp_path}/perdure.db"
    env = dict(os.environ, PYTHONPATH=SRC, PERDURE_DEMO_DIR=str(tmp_path), PERDURE_TOKEN="tok")
    command = [sys.executable, "-m", "perdure._cli", "serve", "--store", store]
    command += ["--app", "perdure._demo.payments:service", "--port", str(_free_port())]
    proc = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        url = None
        while url is None:
            line = proc.stderr.readline()
            assert line, f"perdure serve exited: {proc.wait()}"
            if line.startswith("perdure: serving"):
                url = line.split(" on ")[1].split()[0]
        payment = {
            "request": {
                "payment_id": "pay-1",
                "customer": "cust-1",
                "amount_cents": 1999,
                "card": "4242424242424242",
            }
        }
        with httpx.Client(
            base_url=url, headers={"Authorization": "Bearer tok"}, timeout=30
        ) as http:
            key = {"Idempotency-Key": "pay-1"}
            first = http.post("/workflows/process_payment", json=payment, headers=key)
            again = http.post("/workflows/process_payment", json=payment, headers=key)
            assert first.status_code == again.status_code == 200, first.text
            assert first.json() == again.json()
            assert first.json()["result"]["status"] == "captured"
            invocation_id = first.json()["invocation_id"]
            status = http.get(f"/invocations/{invocation_id}").json()
            assert status["status"] == "completed"
            assert status["idempotency_key"] == "pay-1"
            state = http.get("/actors/Account/cust-1/state").json()
            assert state["state"]["paid_cents"] == 1999
            assert "/workflows/process_payment" in http.get("/openapi.json").json()["paths"]
            anonymous = httpx.post(f"{url}/workflows/process_payment", json=payment)
            assert anonymous.status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    provider = SQLiteProvider(str(tmp_path / "provider.db"))
    try:
        assert provider.charges_per_payment() == {"pay-1": 1}
        assert sum(provider.calls_per_key().values()) == 1
    finally:
        provider.close()
    # The server released the store: the CLI reads what it did.
    views = cli_json("invocations", "list", "--store", store, "--target", "process_payment")
    assert [v["invocation_id"] for v in views["invocations"]] == [invocation_id]
