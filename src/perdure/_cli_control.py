"""``perdure cancel|promise|signal|query``: act on invocations in a store.

Like the reading commands, each opens the store through a :class:`Runtime`
that resumes nothing, uses only the public client, and closes it. What it
records (a resolution, a signal, a cancellation) is delivered when a
runtime runs the invocation: at once if one is running it on a shared
store, else on the next start. A SQLite store is locked while a runtime
runs on it; while ``perdure serve`` has it, send the same over HTTP.
"""

from __future__ import annotations

from typing import Any

import click
import msgspec

from ._cli_store import (
    _console,
    _echo_json,
    _escape,
    _status,
    app_option,
    json_option,
    run,
    runtime_for,
    started,
    store_option,
)
from ._views import dumps_pretty


def _over_http(route: str) -> str:
    return f"send it through its HTTP API instead ({route})"


def _json_argument(text: str, name: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise click.BadParameter(
            f"{text!r} is not JSON ({exc}); a string needs its quotes, e.g. '\"approved\"'",
            param_hint=name,
        ) from None


def _non_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value:
        raise click.BadParameter("must not be empty")
    return value


# -- perdure cancel ------------------------------------------------------------------------------


@click.command(short_help="Cancel an invocation.")
@click.argument("invocation_id")
@click.option(
    "--reason",
    default="cancelled",
    show_default=True,
    callback=_non_empty,
    help="Why: the invocation's error message once it ends cancelled.",
)
@store_option
@json_option
def cancel(invocation_id: str, reason: str, store: str, as_json: bool) -> None:
    """Cancel an invocation and its children.

    Perdure.Cancelled is raised inside it at its next durable point: its
    finally blocks and compensations run, and it ends cancelled. A finished
    invocation cannot be cancelled.
    """
    runtime = runtime_for(store, None)

    async def main() -> dict[str, Any]:
        async with started(runtime, _over_http("POST /invocations/ID/cancel")) as rt:
            handle = await rt.client.get(invocation_id)
            await handle.cancel(reason)
            rec = await handle.record()
        return {
            "invocation_id": rec.id,
            "status": rec.status.value,
            "cancel_reason": rec.cancel_reason,
        }

    view = run(main())
    if as_json:
        _echo_json(view)
        return
    _console().print(
        f"cancellation of {view['invocation_id']} recorded "
        f"(reason: {_escape(view['cancel_reason'] or '')}); it is {_status(view['status'])} "
        "and ends cancelled once a runtime runs it"
    )


# -- perdure promise -----------------------------------------------------------------------------


@click.group(short_help="Resolve or reject a durable promise.")
def promise() -> None:
    """Settle a durable promise (the p.id of a ctx.promise()): its workflow resumes."""


@promise.command("resolve")
@click.argument("promise_id")
@click.argument("value_json", metavar="VALUE_JSON")
@store_option
@json_option
def resolve_promise(promise_id: str, value_json: str, store: str, as_json: bool) -> None:
    """Resolve the promise with VALUE_JSON (JSON: '"approved"', '42', '{"ok": true}')."""
    value = _json_argument(value_json, "VALUE_JSON")
    runtime = runtime_for(store, None)

    async def main() -> None:
        async with started(runtime, _over_http("POST /promises/ID/resolve")) as rt:
            await rt.client.resolve_promise(promise_id, value)

    run(main())
    _settled(promise_id, "resolved", as_json)


@promise.command("reject")
@click.argument("promise_id")
@click.argument("message", callback=_non_empty)
@store_option
@json_option
def reject_promise(promise_id: str, message: str, store: str, as_json: bool) -> None:
    """Reject the promise: its await raises TerminalError(MESSAGE) in the workflow."""
    runtime = runtime_for(store, None)

    async def main() -> None:
        async with started(runtime, _over_http("POST /promises/ID/reject")) as rt:
            await rt.client.reject_promise(promise_id, message)

    run(main())
    _settled(promise_id, "rejected", as_json)


def _settled(promise_id: str, status: str, as_json: bool) -> None:
    if as_json:
        _echo_json({"promise_id": promise_id, "status": status})
        return
    _console().print(
        f"promise {_escape(promise_id)} {status}; its workflow resumes when a runtime runs it"
    )


# -- perdure signal and query --------------------------------------------------------------------


@click.command(short_help="Send a signal to an invocation.")
@click.argument("invocation_id")
@click.argument("name")
@click.argument("value_json", metavar="VALUE_JSON")
@store_option
@json_option
def signal(invocation_id: str, name: str, value_json: str, store: str, as_json: bool) -> None:
    """Send the signal NAME with VALUE_JSON (JSON); the workflow takes it with
    ctx.signal(NAME). Signals of one name arrive in the order sent."""
    value = _json_argument(value_json, "VALUE_JSON")
    runtime = runtime_for(store, None)

    async def main() -> str:
        async with started(runtime, _over_http("POST /invocations/ID/signals/NAME")) as rt:
            handle = await rt.client.get(invocation_id)
            await handle.signal(name, value)
            return handle.id

    sent_to = run(main())
    if as_json:
        _echo_json({"invocation_id": sent_to, "signal": name, "status": "sent"})
        return
    _console().print(f"signal {_escape(name)!r} sent to {sent_to}")


@click.command(short_help="Read what an invocation published.")
@click.argument("invocation_id")
@click.argument("name")
@store_option
@app_option(required=False)
@json_option
def query(invocation_id: str, name: str, store: str, app: str | None, as_json: bool) -> None:
    """The latest value the invocation published with ctx.publish(NAME, ...)."""
    runtime = runtime_for(store, app)

    async def main() -> Any:
        async with started(runtime) as rt:
            handle = await rt.client.get(invocation_id)
            return await handle.query(name)

    value = run(main())
    if as_json:
        _echo_json({"invocation_id": invocation_id, "query": name, "value": value})
        return
    click.echo(dumps_pretty(value))
