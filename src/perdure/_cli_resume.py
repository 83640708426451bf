"""``perdure resume`` and ``perdure replay``: repair and check invocations from a terminal."""

from __future__ import annotations

import asyncio
from typing import Any

import click

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
from .storage import UNFINISHED


@click.command(short_help="Resume unfinished invocations and wait for them.")
@click.argument("invocation_ids", nargs=-1)
@store_option
@app_option(required=True)
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for them."
)
@json_option
def resume(
    invocation_ids: tuple[str, ...], store: str, app: str, timeout: float, as_json: bool
) -> None:
    """Start the app's runtime on the store: it resumes every unfinished
    invocation from its journal (after a crash, a fixed bug, a storage
    outage); wait until INVOCATION_IDS (default: all that were unfinished)
    finish or suspend, and report how each ended."""
    runtime = runtime_for(store, app)

    async def main() -> list[dict[str, Any]]:
        async with started(runtime, "it resumes them itself: nothing to do") as rt:
            ids = list(invocation_ids) or [
                r.id for r in await rt.store.list_invocations(statuses=UNFINISHED)
            ]
            await rt.recover()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            views = []
            for invocation_id in ids:
                while True:
                    rec = await rt.store.get_invocation(invocation_id)
                    if rec is None:
                        raise click.ClickException(f"invocation {invocation_id} does not exist")
                    stopped = rt.stopped_reason(invocation_id)
                    if rec.status.finished or stopped is not None or loop.time() > deadline:
                        break
                    if rec.status.value == "suspended" and rt.running(invocation_id) is None:
                        break
                    await asyncio.sleep(0.05)
                views.append(
                    {
                        "invocation_id": invocation_id,
                        "status": rec.status.value,
                        "stopped": None if stopped is None else str(stopped),
                    }
                )
            return views

    views = run(main())
    if as_json:
        _echo_json(views)
        return
    console = _console()
    if not views:
        console.print("no unfinished invocations")
    for v in views:
        line = f"{v['invocation_id']}: {_status(v['status'])}"
        if v["stopped"]:
            line += f" [red](stopped: {_escape(v['stopped'])})[/]"
        console.print(line)


@click.command(short_help="Replay an invocation's journal against the current code.")
@click.argument("invocation_id")
@store_option
@app_option(required=True)
@json_option
def replay(invocation_id: str, store: str, app: str, as_json: bool) -> None:
    """Check that the current code replays INVOCATION_ID's journal: every
    recorded step comes back from the journal, none runs, nothing is written
    (a dry-run fork of the whole journal). Exits 1 if the code diverged."""
    runtime = runtime_for(store, app)

    async def main() -> dict[str, Any]:
        async with started(runtime) as rt:
            result = await rt.client.fork(invocation_id)
        return {
            "invocation_id": invocation_id,
            "status": result.status,
            "replayed": result.replayed,
            "error": None if result.error is None else str(result.error),
        }

    view = run(main())
    if as_json:
        _echo_json(view)
    else:
        console = _console()
        console.print(
            f"replay of {invocation_id}: {_status(view['status'])}, "
            f"{view['replayed']} step(s) from the journal"
        )
        if view["error"]:
            console.print(f"[red]{_escape(view['error'])}[/]")
    if view["status"] == "diverged":
        raise SystemExit(1)
