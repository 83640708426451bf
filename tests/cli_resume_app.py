"""The app that tests/test_cli_resume.py hands to ``perdure resume`` / ``replay``."""

import perdure


@perdure.workflow(name="resumable")
async def resumable(ctx: perdure.Context, n: int) -> int:
    return await ctx.run("double", lambda: 2 * n)


@perdure.workflow(name="changed")
async def changed(ctx: perdure.Context, n: int) -> int:
    return await ctx.run("another step", lambda: n)  # the journal says "first step"


APP = [resumable, changed]
