"""Sagas: compensations that undo a workflow's steps when it fails.

>>> async with ctx.saga() as saga:
...     charge = await ctx.run("charge", provider.charge, payment)
...     saga.on_failure("refund", provider.refund, charge.transaction_id)
...     await ctx.run("record", ledger.record, charge)

If the block raises (or the invocation is cancelled inside it), the
registered compensations run in reverse order, each as a journaled step
named ``compensate <name>``, and then the error propagates. Since each
compensation is a step, a crash halfway through the undo resumes it: undos
that committed are not run again, and each has a stable step key to pass to
the external API.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._retry import RetryPolicy

if TYPE_CHECKING:
    from ._context import Context

# Undos must not give up easily: a failed refund leaves money taken.
COMPENSATION_RETRY = RetryPolicy(max_attempts=10)


class Saga:
    """A stack of compensations; get one from ``ctx.saga()``."""

    __slots__ = ("_ctx", "_undo", "retry")

    def __init__(self, ctx: Context, *, retry: RetryPolicy = COMPENSATION_RETRY) -> None:
        self._ctx = ctx
        self._undo: list[tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self.retry = retry

    def on_failure(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Register ``fn(*args, **kwargs)`` to undo what was just done."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a compensation name must be a non-empty string, not {name!r}")
        if not callable(fn):
            raise TypeError(f"compensation {name!r}: {fn!r} is not callable")
        self._undo.append((name, fn, args, kwargs))

    @property
    def pending(self) -> list[str]:
        """The names of the compensations registered so far, oldest first."""
        return [name for name, *_ in self._undo]

    async def compensate(self) -> None:
        """Run the compensations now, newest first, each as a journaled step."""
        while self._undo:
            name, fn, args, kwargs = self._undo.pop()
            await self._ctx.run(f"compensate {name}", fn, *args, retry=self.retry, **kwargs)

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from ._errors import Cancelled

        # Parked and Suspended are the runtime stopping the invocation, not a
        # failure: it resumes later, and the saga with it.
        if exc is not None and isinstance(exc, Exception | Cancelled):
            await self.compensate()
        else:
            self._undo.clear()
