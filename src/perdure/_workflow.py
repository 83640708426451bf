"""Workflow definitions: durable functions registered with a runtime."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from ._errors import ConfigurationError
from ._serde import return_hint

if TYPE_CHECKING:
    from ._context import Context

P = ParamSpec("P")
R = TypeVar("R")


class Workflow(Generic[P, R]):
    """A durable function: ``async def f(ctx, ...)`` with a registered name.

    Create with the :func:`workflow` decorator. Calling the object calls the
    function itself (for unit tests with a hand-made context).
    """

    __slots__ = (
        "fn",
        "hints",
        "kind",
        "leading",
        "name",
        "params",
        "positional_arity",
        "return_hint",
        "signature",
    )

    def __init__(
        self,
        fn: Callable[Concatenate[Context, P], Awaitable[R]],
        name: str,
        *,
        leading: int = 1,
        kind: str = "workflow",
    ) -> None:
        # ``leading`` parameters are supplied by the runtime: ``ctx`` for a
        # workflow, ``self`` and ``ctx`` for an actor handler.
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(f"{kind} {name!r} must be an 'async def' function taking ctx")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a {kind} name must be a non-empty string, not {name!r}")
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        if len(params) < leading or any(
            p.kind
            not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for p in params[:leading]
        ):
            raise ConfigurationError(f"{kind} {name!r} must take the context as its first argument")
        self.fn = fn
        self.name = name
        self.kind = kind
        self.leading = leading
        self.signature = signature
        self.params = [p.name for p in params[leading:]]
        # When every parameter is a plain required positional one, a call with
        # exactly that many positional arguments needs no signature binding.
        simple = all(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty
            for p in params[leading:]
        )
        self.positional_arity = len(params) - leading if simple else -1
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = {}
        hints.pop("return", None)
        self.hints: dict[str, Any] = hints
        self.return_hint = return_hint(fn)

    @property
    def method(self) -> Callable[..., Awaitable[Any]]:
        """The function, untyped: an actor handler takes ``self`` before ``ctx``."""
        return self.fn

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise TypeError, as a call would, if the arguments do not fit."""
        if kwargs or len(args) != self.positional_arity:
            try:
                self.signature.bind(*([None] * self.leading), *args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.kind} {self.name!r}{self.signature}: {exc}") from None

    def __call__(self, ctx: Context, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        return self.fn(ctx, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r}>"


@overload
def workflow(fn: Callable[Concatenate[Context, P], Awaitable[R]], /) -> Workflow[P, R]: ...


@overload
def workflow(
    *, name: str | None = None
) -> Callable[[Callable[Concatenate[Context, P], Awaitable[R]]], Workflow[P, R]]: ...


def workflow(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Declare a durable workflow.

    >>> @workflow
    ... async def greet(ctx, who: str) -> str:
    ...     return await ctx.run("hello", lambda: f"hello {who}")
    >>> greet.name
    'greet'

    ``@workflow(name="payments.process")`` sets the name that is stored in
    the journal; keep it stable across deployments.
    """

    def wrap(f: Callable[..., Awaitable[Any]]) -> Workflow[Any, Any]:
        return Workflow(f, name or f.__qualname__)

    return wrap if fn is None else wrap(fn)


def as_workflow(obj: Workflow[Any, Any] | Callable[..., Awaitable[Any]]) -> Workflow[Any, Any]:
    if isinstance(obj, Workflow):
        return obj
    if callable(obj):
        return Workflow(obj, getattr(obj, "__qualname__", repr(obj)))
    raise ConfigurationError(
        f"{obj!r} is not a workflow: decorate an async function with @workflow"
    )
