"""The ``perdure`` command line.

``perdure demo`` runs the payment demo (a worker process killed with SIGKILL
mid-batch, restarted, checked); ``perdure bench`` runs the benchmarks when
``perdure._bench`` is installed; ``perdure serve`` serves an application's
workflows and actors over HTTP; ``perdure invocations``, ``journal``,
``actor`` and ``fork`` read a store; ``perdure cancel``, ``promise``,
``signal`` and ``query`` act on its invocations. Commands import what they need when
they run, so ``perdure --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import click

from . import __version__

# Commands defined in modules of their own, imported only when used. A module
# that is absent from this installation simply does not show up.
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "actor": ("perdure._cli_store", "actor"),
    "bench": ("perdure._bench", "bench"),
    "cancel": ("perdure._cli_control", "cancel"),
    "fork": ("perdure._cli_store", "fork"),
    "invocations": ("perdure._cli_store", "invocations"),
    "journal": ("perdure._cli_store", "journal"),
    "replay": ("perdure._cli_resume", "replay"),
    "resume": ("perdure._cli_resume", "resume"),
    "promise": ("perdure._cli_control", "promise"),
    "query": ("perdure._cli_control", "query"),
    "serve": ("perdure._cli_serve", "serve"),
    "signal": ("perdure._cli_control", "signal"),
}


class _Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        for name, (module, _) in _LAZY_COMMANDS.items():
            if _module_exists(module):
                names.add(name)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in _LAZY_COMMANDS:
            return command
        module_name, attribute = _LAZY_COMMANDS[cmd_name]
        if not _module_exists(module_name):
            return None
        try:
            found = getattr(importlib.import_module(module_name), attribute, None)
        except ImportError as exc:
            return _unavailable(cmd_name, f"{module_name} cannot be imported: {exc}")
        if not isinstance(found, click.Command):
            return _unavailable(cmd_name, f"{module_name}.{attribute} is not a click command")
        return found


def _unavailable(name: str, reason: str) -> click.Command:
    """A stand-in for a command that cannot load, so that the rest still works."""

    def fail() -> None:
        raise click.ClickException(f"'perdure {name}' is unavailable: {reason}")

    return click.Command(name, callback=fail, help=f"(unavailable: {reason})")


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "-V", "--version", prog_name="perdure", message="%(prog)s %(version)s"
)
def main() -> None:
    """Perdure: durable execution for Python, on an embedded SQLite file."""


@main.command(short_help="Payments survive a SIGKILL of their worker: run it and check.")
@click.option(
    "--payments",
    "-n",
    type=click.IntRange(min=2),
    default=200,
    show_default=True,
    help="How many payments the batch holds.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Work directory, wiped at the start (only if empty or a previous demo's) and kept "
    "afterwards.  [default: a temporary directory, removed afterwards]",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Payments in flight at a time in the worker.",
)
@click.option(
    "--charge-latency-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Mean simulated network round trip of each call to the card provider.",
)
@click.option(
    "--kill-at",
    type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
    default=0.4,
    show_default=True,
    help="Kill the worker once this fraction of the batch's steps has run "
    "(at the next instant when payments are mid-way).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Seconds after which a worker that has not finished is killed and the demo fails.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout."
)
def demo(
    payments: int,
    directory: Path | None,
    concurrency: int,
    charge_latency_ms: float,
    kill_at: float,
    timeout: float,
    as_json: bool,
) -> None:
    """Process a batch of payments, SIGKILL the worker mid-batch, restart it, check.

    A worker process runs the payment workflow (validate, charge, record) on
    an embedded SQLite store. Once --kill-at of the batch's steps have run,
    the worker is killed with SIGKILL while payments are mid-way (it is
    frozen with SIGSTOP first, to check that in the store). A new worker
    resumes the unfinished invocations from their journals and re-submits
    the batch with each payment's id as its idempotency key. The summary
    checks that every payment completed and was charged exactly once.

    Exits with status 1 if a check fails. Progress goes to stderr, the
    summary to stdout.
    """
    from rich.console import Console

    from ._demo.demo import (
        DemoError,
        DemoOptions,
        PlainProgress,
        RichProgress,
        render,
        run_demo,
    )

    options = DemoOptions(
        payments=payments,
        directory=directory,
        concurrency=concurrency,
        charge_latency_ms=charge_latency_ms,
        kill_at=kill_at,
        timeout=timeout,
    )
    err = Console(stderr=True)
    try:
        if err.is_terminal:
            with RichProgress(payments, err) as progress:
                summary = run_demo(options, progress)
        else:
            summary = run_demo(options, PlainProgress(payments, sys.stderr))
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        render(summary, sys.stdout)
    if not summary["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main(prog_name="perdure")
