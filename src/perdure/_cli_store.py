"""``perdure invocations|journal|actor|fork``: read a store from the command line.

Each command opens the store through a :class:`Runtime` that resumes
nothing (``recover=False``) and writes nothing, prints a table (or JSON with
``--json``) and closes it. A SQLite store is locked while a runtime runs on
it; while ``perdure serve`` has it, read it over HTTP instead.

``--app module:attr`` names the code: the actor commands need the actor
class to rebuild states, and ``fork`` re-runs an invocation with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import inspect
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import click

from ._actor import Actor
from ._errors import ConfigurationError, PerdureError, RuntimeLockedError
from ._runtime import Runtime
from ._views import (
    dumps,
    dumps_pretty,
    entry_view,
    error_view,
    outcome_view,
    record_view,
)
from ._workflow import Workflow
from .storage import DEFAULT_URL, SQLiteStore, open_store

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

APP_HELP = (
    "The code, as module:attribute: a list of workflows and actor classes, or a function "
    "that returns one (e.g. perdure._demo.payments:service). The current directory is "
    "importable."
)

# -- loading the application ----------------------------------------------------------


def load_app(spec: str) -> tuple[list[Workflow[Any, Any]], list[type[Actor[Any]]]]:
    """The workflows and actor types ``module:attr`` names.

    ``attr`` is a list (or tuple) of workflows and :class:`Actor` classes,
    or a function called with no arguments that returns one; a single
    workflow or actor class also does.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise click.BadParameter(
            f"{spec!r} is not module:attribute (e.g. myapp.service:definitions)", param_hint="--app"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name}: {exc}", param_hint="--app"
        ) from None
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise click.BadParameter(
                f"module {module_name} has no attribute {attribute!r}", param_hint="--app"
            ) from None
    if _is_definition(found):
        found = [found]
    elif callable(found):
        found = found()
    if _is_definition(found):
        found = [found]
    if not isinstance(found, list | tuple | set | frozenset):
        raise click.BadParameter(
            f"{spec} is a {type(found).__name__}: it must be a list of workflows and actor "
            "classes, or a function that returns one",
            param_hint="--app",
        )
    workflows: list[Workflow[Any, Any]] = []
    actors: list[type[Actor[Any]]] = []
    for item in found:
        if isinstance(item, type) and issubclass(item, Actor):
            actors.append(item)
        elif isinstance(item, Workflow):
            workflows.append(item)
        elif inspect.iscoroutinefunction(item):
            workflows.append(item)  # a bare async function: registered as a workflow
        else:
            raise click.BadParameter(
                f"{spec} holds {item!r}, which is neither a workflow nor an actor class",
                param_hint="--app",
            )
    return workflows, actors


def _is_definition(obj: Any) -> bool:
    return isinstance(obj, Workflow) or (isinstance(obj, type) and issubclass(obj, Actor))


def runtime_for(store_url: str, app: str | None) -> Runtime:
    """A runtime, not started, on an existing store, that resumes nothing."""
    workflows, actors = load_app(app) if app else ([], [])
    try:
        store = open_store(store_url, exclusive=True)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None
    if isinstance(store, SQLiteStore) and not os.path.exists(store.path):
        raise click.ClickException(
            f"there is no Perdure store at {store.path}; check --store (or PERDURE_STORE)"
        )
    return Runtime(store, workflows=workflows, actors=actors, recover=False)


_READ_OVER_HTTP = (
    "read through its HTTP API instead (GET /invocations, /invocations/ID, /invocations/ID/journal)"
)


@contextlib.asynccontextmanager
async def started(rt: Runtime, over_http: str = _READ_OVER_HTTP) -> AsyncIterator[Runtime]:
    """``rt`` started; a store that another runtime holds is a clear error,
    which says what to do over HTTP instead (``over_http``)."""
    try:
        await rt.start()
    except RuntimeLockedError as exc:
        raise click.ClickException(f"{exc} If that is 'perdure serve', {over_http}.") from None
    try:
        yield rt
    finally:
        await rt.stop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; Perdure's errors become a clean message."""
    try:
        return asyncio.run(coro)
    except (PerdureError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


# -- output -------------------------------------------------------------------------------

_STATUS_STYLE = {
    "completed": "green",
    "failed": "red",
    "running": "yellow",
    "pending": "yellow",
    "suspended": "yellow",
    "cancelled": "magenta",
}


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


# Ids, times and statuses stay whole (to be copied); long keys are cut short
# (--json has them whole); the rest folds.
_WHOLE = frozenset(
    {"#", "seq", "invocation", "status", "created (UTC)", "at (UTC)", "kind", "ok", "actor"}
)


def _table(*columns: str) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD)
    for name in columns:
        if name in _WHOLE:
            table.add_column(name, no_wrap=True)
        elif name == "idempotency key":
            table.add_column(name, no_wrap=True, max_width=20, overflow="ellipsis")
        else:
            table.add_column(name, overflow="fold", min_width=20 if "value" in name else 12)
    return table


def _print_table(console: Any, table: Any) -> None:
    """Print ``table``; where the terminal is too narrow for its whole columns,
    at its natural width: lines run long rather than ids being cut short."""
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update(width=10_000), table)
    if console.width < needed.minimum:
        console.width = needed.maximum
    console.print(table)


def _when(iso: str) -> str:
    """A view's time, shorter for a table: '2026-01-31 12:00:00' (UTC)."""
    return iso[:19].replace("T", " ")


def _status(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'default')}]{status}[/]"


def _short(value: Any, width: int = 60) -> str:
    text = dumps(value).decode()
    return text if len(text) <= width else text[: width - 3] + "..."


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _echo_json(value: Any) -> None:
    click.echo(dumps_pretty(value))


def _entries_table(entries: list[dict[str, Any]]) -> Any:
    table = _table("#", "kind", "name", "ok", "attempts", "at (UTC)", "value / error")
    for e in entries:
        if e["ok"]:
            shown = _escape(_short(e["value"]))
        else:
            shown = f"[red]{_escape(e['error']['type'])}: {_escape(e['error']['message'])}[/]"
        table.add_row(
            str(e["index"]),
            e["kind"],
            _escape(e["name"]),
            "yes" if e["ok"] else "[red]no[/]",
            str(e["attempts"]),
            _when(e["created_at"]),
            shown,
        )
    return table


# -- options ------------------------------------------------------------------------------


def store_option(fn: F) -> F:
    return click.option(
        "--store",
        envvar="PERDURE_STORE",
        default=DEFAULT_URL,
        show_default=True,
        help="The store URL (or PERDURE_STORE).",
    )(fn)


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of a table, for scripts."
    )(fn)


def app_option(required: bool) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        return click.option("--app", "app", envvar="PERDURE_APP", required=required, help=APP_HELP)(
            fn
        )

    return decorate


def parse_since(text: str) -> float:
    """A duration back from now (``30s``, ``15m``, ``2h``, ``7d``) or an ISO 8601 time
    (UTC unless it says otherwise), as seconds since the epoch."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return time.time() - float(match[1]) * unit
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give a duration such as 30m, 2h or 7d, or an ISO 8601 time such as "
            "2026-01-31T12:00:00Z",
            param_hint="--since",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


# -- perdure invocations ---------------------------------------------------------------------


@click.group(short_help="List and show invocations.")
def invocations() -> None:
    """List the invocations in a store, and show one."""


@invocations.command("list")
@store_option
@click.option("--status", help="Only this status: pending, running, completed, failed, ...")
@click.option("--target", help="Only this workflow (or actor handler, as Type.handler).")
@click.option("--since", help="Only those created since: 30m, 2h, 7d, or an ISO 8601 time.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many."
)
@json_option
def list_invocations(
    store: str,
    status: str | None,
    target: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Invocations, oldest first (use --since to see the recent ones)."""
    after = None if since is None else parse_since(since)

    runtime = runtime_for(store, None)

    async def main() -> list[dict[str, Any]]:
        async with started(runtime) as rt:
            records = await rt.client.list(
                status=status, workflow=target, limit=limit if after is None else None
            )
        if after is not None:
            records = [r for r in records if r.created_at >= after][:limit]
        return [record_view(r) for r in records]

    views = run(main())
    if as_json:
        _echo_json({"invocations": views})
        return
    table = _table("invocation", "target", "status", "created (UTC)", "idempotency key", "actor")
    for v in views:
        actor = v["actor"]
        table.add_row(
            v["invocation_id"],
            _escape(v["target"]),
            _status(v["status"]),
            _when(v["created_at"]),
            _escape(v["idempotency_key"] or ""),
            "" if actor is None else _escape(f"{actor['type']}/{actor['key']} #{actor['seq']}"),
        )
    console = _console()
    _print_table(console, table)
    console.print(f"{len(views)} invocation(s)")


@invocations.command("show")
@click.argument("invocation_id")
@store_option
@json_option
def show_invocation(invocation_id: str, store: str, as_json: bool) -> None:
    """An invocation: its target, status, times, and its result or error."""

    runtime = runtime_for(store, None)

    async def main() -> dict[str, Any]:
        async with started(runtime) as rt:
            handle = await rt.client.get(invocation_id)
            rec = await handle.record()
            view = record_view(rec)
            if rec.status.finished:
                view.update(outcome_view(await rt.client.journal(rec.id), traceback=True))
            return view

    view = run(main())
    if as_json:
        _echo_json(view)
        return
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("invocation", view["invocation_id"])
    grid.add_row("target", _escape(view["target"]))
    grid.add_row("status", _status(view["status"]))
    grid.add_row("idempotency key", _escape(view["idempotency_key"] or "-"))
    grid.add_row("created", view["created_at"])
    grid.add_row("updated", view["updated_at"])
    if view["actor"] is not None:
        actor = view["actor"]
        grid.add_row("actor", _escape(f"{actor['type']}/{actor['key']}, message #{actor['seq']}"))
    if view["parent_id"] is not None:
        grid.add_row("parent", view["parent_id"])
    if view["status"] == "suspended":
        grid.add_row("wakes", view["wake_at"] or "when woken (a promise, a signal, a child)")
    if view["deadline"] is not None:
        grid.add_row("deadline", view["deadline"])
    if view["cancel_reason"] is not None:
        grid.add_row("cancel reason", _escape(view["cancel_reason"]))
    if "result" in view:
        grid.add_row("result", _escape(dumps_pretty(view["result"])))
    if "error" in view:
        error = view["error"]
        grid.add_row("error", f"[red]{_escape(error['type'])}: {_escape(error['message'])}[/]")
    console = _console()
    console.print(grid)
    if view.get("error", {}).get("traceback"):
        console.print(f"[dim]{_escape(view['error']['traceback'].rstrip())}[/]")


# -- perdure journal ---------------------------------------------------------------------------


@click.command(short_help="Show an invocation's journal.")
@click.argument("invocation_id")
@store_option
@json_option
def journal(invocation_id: str, store: str, as_json: bool) -> None:
    """An invocation's journal, entry by entry: its input, each step, its output."""

    runtime = runtime_for(store, None)

    async def main() -> list[dict[str, Any]]:
        async with started(runtime) as rt:
            entries = await rt.client.journal(invocation_id)
        return [entry_view(e, traceback=True) for e in entries]

    entries = run(main())
    if as_json:
        _echo_json({"invocation_id": invocation_id, "entries": entries})
        return
    _print_table(_console(), _entries_table(entries))


# -- perdure actor -----------------------------------------------------------------------------


@click.group(short_help="A durable actor's history and its state at any message.")
def actor() -> None:
    """Time travel over a durable actor: its messages, and its state after any of them."""


@actor.command("history")
@click.argument("actor_type")
@click.argument("key")
@store_option
@app_option(required=True)
@json_option
def actor_history(actor_type: str, key: str, store: str, app: str, as_json: bool) -> None:
    """Every message the actor handled, in order."""

    runtime = runtime_for(store, app)

    async def main() -> list[dict[str, Any]]:
        async with started(runtime) as rt:
            messages = await rt.client.actor(actor_type, key).history()
        return [record_view(m) for m in messages]

    views = run(main())
    if as_json:
        _echo_json({"actor_type": actor_type, "key": key, "messages": views})
        return
    table = _table("seq", "invocation", "handler", "status", "created (UTC)", "idempotency key")
    for v in views:
        table.add_row(
            str(v["actor"]["seq"]),
            v["invocation_id"],
            _escape(v["target"].rpartition(".")[2]),
            _status(v["status"]),
            _when(v["created_at"]),
            _escape(v["idempotency_key"] or ""),
        )
    console = _console()
    _print_table(console, table)
    console.print(f"{len(views)} message(s) to {_escape(actor_type)}/{_escape(key)}")


@actor.command("state")
@click.argument("actor_type")
@click.argument("key")
@click.option(
    "--at",
    type=click.IntRange(min=0),
    default=None,
    help="The state after this message of the history.  [default: the latest]",
)
@store_option
@app_option(required=True)
@json_option
def actor_state(
    actor_type: str, key: str, at: int | None, store: str, app: str, as_json: bool
) -> None:
    """The actor's state after a message: its checkpoint plus a replay, no external call."""

    runtime = runtime_for(store, app)

    async def main() -> dict[str, Any]:
        async with started(runtime) as rt:
            ref = rt.client.actor(actor_type, key)
            history = await ref.history()
            last = max((m.actor_seq or 0 for m in history), default=0)
            if at is not None and at > last:
                raise click.ClickException(
                    f"the latest message of actor {actor_type}/{key} is #{last}; there is no "
                    f"state after message {at}"
                )
            state = await ref.state_at(at)
        return {
            "actor_type": actor_type,
            "key": key,
            "at": last if at is None else at,
            "state": state,
        }

    view = run(main())
    if as_json:
        _echo_json(view)
        return
    console = _console()
    console.print(f"[bold]{_escape(actor_type)}/{_escape(key)}[/] after message {view['at']}:")
    console.print(_escape(dumps_pretty(view["state"])))


# -- perdure fork ------------------------------------------------------------------------------


@click.command(short_help="Re-run an invocation from a journal prefix, in a sandbox.")
@click.argument("invocation_id")
@click.option(
    "--upto",
    type=click.IntRange(min=1),
    default=None,
    help="Keep the journal entries before this index.  [default: all but the output]",
)
@click.option(
    "--live",
    is_flag=True,
    help="Run the steps after the prefix instead of stopping before the first. Their "
    "external calls are real; only their results stay in the sandbox.",
)
@store_option
@app_option(required=True)
@json_option
def fork(
    invocation_id: str, upto: int | None, live: bool, store: str, app: str, as_json: bool
) -> None:
    """Re-run an invocation from its first --upto journal entries against the current code.

    The original is not touched. Without --live the fork stops before the
    first step it would run live, and says which, so no external call is made.
    """

    runtime = runtime_for(store, app)

    async def main() -> dict[str, Any]:
        async with started(runtime) as rt:
            result = await rt.client.fork(invocation_id, upto=upto, live=live)
        return {
            "invocation_id": result.invocation_id,
            "status": result.status,
            "value": result.value,
            "error": None if result.error is None else error_view(result.error),
            "stopped_at": None
            if result.stopped_at is None
            else {"index": result.stopped_at[0], "step": result.stopped_at[1]},
            "replayed": result.replayed,
            "executed": result.executed,
            "journal": [entry_view(e, traceback=True) for e in result.journal],
        }

    view = run(main())
    if as_json:
        _echo_json(view)
        return
    console = _console()
    console.print(
        f"fork of {view['invocation_id']}: {_status(view['status'])} "
        f"({view['replayed']} step(s) replayed, {view['executed']} executed)"
    )
    if view["stopped_at"] is not None:
        stop = view["stopped_at"]
        console.print(
            f"stopped before step {_escape(stop['step'])!r} (journal index {stop['index']}): "
            "it would run live; --live runs it in the sandbox"
        )
    elif view["error"] is not None:
        console.print(
            f"[red]{_escape(view['error']['type'])}: {_escape(view['error']['message'])}[/]"
        )
    elif view["status"] == "completed":
        console.print(f"result: {_escape(dumps_pretty(view['value']))}")
    _print_table(console, _entries_table(view["journal"]))
