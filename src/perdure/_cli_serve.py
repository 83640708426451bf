"""``perdure serve``: a runtime's workflows and actors over HTTP (the ingress)."""

from __future__ import annotations

import asyncio
import logging
import secrets

import click

from ._cli_store import APP_HELP, load_app
from ._errors import PerdureError
from ._runtime import Runtime
from .storage import DEFAULT_URL


@click.command(short_help="Serve workflows and actors over HTTP.")
@click.option(
    "--store",
    envvar="PERDURE_STORE",
    default=DEFAULT_URL,
    show_default=True,
    help="The store URL (or PERDURE_STORE).",
)
@click.option("--app", "app", envvar="PERDURE_APP", required=True, help=APP_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="0: any free one.",
)
@click.option(
    "--token",
    envvar="PERDURE_TOKEN",
    default=None,
    help="Every request must carry 'Authorization: Bearer TOKEN' (or PERDURE_TOKEN). "
    "[default: none on a loopback address; on any other, one is generated and printed]",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=1 << 20,
    show_default=True,
    help="Larger request bodies are refused (413).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve(
    store: str,
    app: str,
    host: str,
    port: int,
    token: str | None,
    max_body_bytes: int,
    log_level: str,
) -> None:
    """Run a runtime on --store with the workflows and actors of --app, and serve
    them over HTTP until SIGINT or SIGTERM.

    Unfinished invocations resume first. GET /openapi.json describes the API:
    POST /workflows/NAME runs a workflow with the JSON body's arguments,
    POST /actors/TYPE/KEY/HANDLER sends a message, an Idempotency-Key header
    makes retries safe, and GET /invocations/ID reads an invocation.
    """
    try:
        from .ingress import is_loopback
        from .ingress import serve as serve_app
    except ImportError as exc:
        raise click.ClickException(
            f"'perdure serve' needs the server extra ({exc}): pip install 'perdure[server]'"
        ) from None
    workflows, actors = load_app(app)
    if not workflows and not actors:
        raise click.BadParameter(f"{app} registers no workflow and no actor", param_hint="--app")
    generated = token is None and not is_loopback(host)
    if generated:
        token = secrets.token_urlsafe(32)
    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(levelname)s:%(name)s: %(message)s"
    )

    def ready(url: str) -> None:
        click.echo(
            f"perdure: serving {len(workflows)} workflow(s) and {len(actors)} actor type(s) "
            f"on {url} (store {store}); the API is described at {url}/openapi.json",
            err=True,
        )
        click.echo(
            f"perdure: the web UI is at {url}/ui/"
            + (" (with a token: open /ui/?token=TOKEN once)" if token is not None else ""),
            err=True,
        )
        if generated:
            click.echo(
                f"perdure: {host} is not a loopback address, so token auth is on: send "
                f"'Authorization: Bearer {token}' (choose the token with --token or "
                f"PERDURE_TOKEN); in a browser, open {url}/ui/?token={token}",
                err=True,
            )

    try:
        runtime = Runtime(store, workflows=workflows, actors=actors)
        asyncio.run(
            serve_app(
                runtime,
                host=host,
                port=port,
                token=token,
                max_body_bytes=max_body_bytes,
                log_level=log_level,
                ready=ready,
            )
        )
    except PerdureError as exc:
        raise click.ClickException(str(exc)) from None
