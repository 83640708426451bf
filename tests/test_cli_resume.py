"""``perdure resume`` finishes what a crash left unfinished; ``perdure replay``
tells whether the current code still replays a journal."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

import perdure
from perdure._cli import main


def test_resume_finishes_an_unfinished_invocation_and_replay_checks_journals(
    tmp_path: Path, monkeypatch: object
) -> None:
    url = f"sqlite:///{tmp_path}/x.db"

    @perdure.workflow(name="resumable")
    async def stuck(ctx: perdure.Context, n: int) -> int:
        await ctx.run("double", _block)  # the process "dies" here
        return 0

    async def _block() -> int:
        await asyncio.Event().wait()
        return 0

    @perdure.workflow(name="changed")
    async def old_changed(ctx: perdure.Context, n: int) -> int:
        return await ctx.run("first step", lambda: n)

    async def leave_unfinished() -> tuple[str, str]:
        async with perdure.Runtime(url, workflows=[stuck, old_changed]) as rt:
            handle = await rt.client.start(stuck, 21)
            done = await rt.client.run(old_changed, 1)
            assert done == 1
            await asyncio.sleep(0.05)
            finished = (await rt.client.list(workflow="changed"))[0].id
            return handle.id, finished

    unfinished, finished = asyncio.run(leave_unfinished())
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # type: ignore[attr-defined]
    runner = CliRunner()
    app = "cli_resume_app:APP"
    result = runner.invoke(main, ["resume", "--store", url, "--app", app, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [
        {"invocation_id": unfinished, "status": "completed", "stopped": None}
    ]
    ok = runner.invoke(main, ["replay", unfinished, "--store", url, "--app", app, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["status"] == "completed"
    bad = runner.invoke(main, ["replay", finished, "--store", url, "--app", app])
    assert bad.exit_code == 1, bad.output
    assert "diverged" in bad.output
    nothing = runner.invoke(main, ["resume", "--store", url, "--app", app])
    assert nothing.exit_code == 0
    assert "no unfinished invocations" in nothing.output
