"""Logging filters: the invocation id on records, and no second log from replay."""

from __future__ import annotations

import logging

from .._context import _current_context, _current_step


class InvocationFilter(logging.Filter):
    """Adds ``invocation_id``, ``perdure_workflow`` and ``perdure_step`` to
    every record, from the invocation running where it was logged (``default``
    outside one). Never drops a record.

    >>> handler = logging.StreamHandler()
    >>> handler.addFilter(perdure.observability.InvocationFilter())
    >>> handler.setFormatter(logging.Formatter("%(invocation_id)s %(message)s"))
    """

    def __init__(self, default: str | None = "-") -> None:
        super().__init__()
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current_context.get(None)
        step = _current_step.get(None)
        if ctx is None:
            record.invocation_id = self.default
            record.perdure_workflow = self.default
        else:
            record.invocation_id = ctx.invocation_id
            record.perdure_workflow = ctx.workflow_name
        record.perdure_step = self.default if step is None else step.name
        return True


class ReplayFilter(logging.Filter):
    """Drops records that handler code logs while its invocation replays
    (``ctx.replaying``), so a resumed workflow does not log its past twice.
    Perdure's own records (loggers ``perdure.*``) always pass.

    Code after the last journaled point runs again live after a crash, and
    logs again: nothing tells whether it ran before.

    >>> handler.addFilter(perdure.observability.ReplayFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current_context.get(None)
        if ctx is None or not ctx.replaying:
            return True
        name = record.name
        return name == "perdure" or name.startswith("perdure.")
