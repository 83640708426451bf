"""Scheduled workflows (cron) and delayed messages to actors.

Both are built on the durable timer, so they are persisted, survive
restarts and fire once.

A schedule is a chain of ``perdure.cron`` invocations, one per fire time:
each sleeps until its time, starts the scheduled workflow with the
idempotency key ``cron:<name>:<time>`` and then starts the next link, keyed
by the next fire time. Keys make every step idempotent, so a crash anywhere,
or a runtime that starts while a link is pending, never runs a fire time
twice. A fire time missed while no process ran fires once on restart; the
chain then goes on from the next time after now.

A delayed message is a ``perdure.deliver`` invocation that sleeps until the
message is due and then sends it as a journaled ``tell``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError
from ._workflow import Workflow, as_workflow, workflow

if TYPE_CHECKING:
    from ._context import Context
    from ._runtime import Runtime

CRON_WORKFLOW = "perdure.cron"
DELIVER_WORKFLOW = "perdure.deliver"


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """Run ``workflow(*args, **kwargs)`` at every time a cron expression names (UTC).

    >>> Runtime(url, workflows=[report], schedules=[Schedule("0 6 * * *", report, "daily")])

    ``name`` (default: the workflow's name) keys the fire times in the store:
    keep it stable, and give two schedules of one workflow different names.
    """

    cron: str
    workflow: Workflow[Any, Any] | Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None

    def __init__(
        self,
        cron: str,
        workflow: Workflow[Any, Any] | Callable[..., Any],
        /,
        *args: Any,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            from croniter import croniter
        except ImportError:  # pragma: no cover - the extra is missing
            raise ConfigurationError(
                "schedules need the croniter package: pip install 'perdure[cron]'"
            ) from None
        if not isinstance(cron, str) or not croniter.is_valid(cron):
            raise ConfigurationError(
                f"schedule {name or ''!s}: {cron!r} is not a valid cron expression "
                "(five fields: minute hour day-of-month month day-of-week, e.g. '*/5 * * * *')"
            )
        definition = as_workflow(workflow)
        object.__setattr__(self, "cron", cron)
        object.__setattr__(self, "workflow", definition)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "name", name or definition.name)

    @property
    def key(self) -> str:
        assert self.name is not None
        return self.name

    def next_after(self, moment: float) -> float:
        """The first fire time strictly after ``moment`` (seconds since the epoch)."""
        from croniter import croniter

        start = datetime.fromtimestamp(math.floor(moment), UTC)
        value: float = croniter(self.cron, start).get_next(float)
        return value


@workflow(name=CRON_WORKFLOW)
async def cron_tick(ctx: Context, schedule: str, fire_at: float) -> str:
    """One link of a schedule's chain: wait, fire, start the next link."""
    rt = ctx._rt
    await ctx.sleep_until(datetime.fromtimestamp(fire_at, UTC))
    found = rt.schedules.get(schedule)
    if found is None:
        return f"schedule {schedule!r} is no longer registered: the chain ends"
    target = rt.workflow(found.workflow)

    async def fire() -> str:
        rec, _ = await rt.submit(
            target, found.args, found.kwargs, idempotency_key=f"cron:{schedule}:{fire_at:.0f}"
        )
        return rec.id

    started = await ctx.run("fire", fire)
    following = found.next_after(max(fire_at, ctx.now().timestamp()))

    async def link() -> str:
        return await schedule_link(rt, found, following)

    await ctx.run("next", link)
    return started


async def schedule_link(rt: Runtime, schedule: Schedule, fire_at: float) -> str:
    """Start (or attach to) the chain link for ``fire_at``; its invocation id."""
    rec, _ = await rt.submit(
        CRON_WORKFLOW,
        (schedule.key, fire_at),
        {},
        idempotency_key=f"{CRON_WORKFLOW}:{schedule.key}:{fire_at:.0f}",
    )
    return rec.id


@workflow(name=DELIVER_WORKFLOW)
async def deliver(
    ctx: Context,
    actor_type: str,
    key: str,
    handler: str,
    args: list[Any],
    kwargs: dict[str, Any],
    due: float,
    reply: bool = False,
    message_key: str | None = None,
) -> Any:
    """A delayed message, or one that another node received for this node's
    actor: sleep until it is due, then send it as one journaled step (with
    ``reply``, wait for the handler's reply: it is the result). The message's
    idempotency key is ``message_key`` (the sender's, so that a message sent
    directly and again through here after a failover is deduplicated), or
    the step's."""
    from ._context import current_step
    from ._retry import NO_RETRY

    if due > ctx.now().timestamp():
        await ctx.sleep_until(datetime.fromtimestamp(due, UTC))
    rt = ctx._rt
    definition = rt.actor(actor_type)

    async def send() -> Any:
        return await rt.send_from_step(
            definition,
            key,
            handler,
            tuple(args),
            kwargs,
            idempotency_key=message_key or current_step().key,
            reply=reply,
        )

    return await ctx.run(
        f"{'ask' if reply else 'tell'} {actor_type}.{handler} {key}", send, retry=NO_RETRY
    )


INTERNAL_WORKFLOWS = (cron_tick, deliver)
