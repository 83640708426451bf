"""Points where tests (and later, observability) can watch the runtime."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TypeVar

import msgspec

log = logging.getLogger("perdure.hooks")
T = TypeVar("T")


class StepInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The step that is running: pass ``key`` to external APIs.

    ``key`` is identical across retries, replays and process restarts, so an
    external API that deduplicates by it makes the step effectively-once.
    """

    invocation_id: str
    index: int
    name: str
    attempt: int

    @property
    def key(self) -> str:
        return f"{self.invocation_id}:{self.index}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Hooks:
    """Callbacks fired at the runtime's durable points. Keep them cheap.

    A hook that raises is logged and ignored: observing the runtime must not
    change what it does.

    ``before_step``: a step is about to run live (not replayed).
    ``after_step``: a step's outcome has committed.
    ``after_output``: an invocation's output has committed.
    ``before_batch_commit``: a storage batch is written but not committed.
    """

    before_step: Callable[[StepInfo], None] | None = None
    after_step: Callable[[StepInfo], None] | None = None
    after_output: Callable[[str], None] | None = None
    before_batch_commit: Callable[[int], None] | None = None


def fire(hook: Callable[[T], None] | None, arg: T) -> None:
    """Call ``hook(arg)`` if set; log and swallow what it raises."""
    if hook is None:
        return
    try:
        hook(arg)
    except Exception:
        log.exception("hook %r raised; ignored", hook)
