"""The ingress app: routes, and what each does with the public client."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._actor import ActorDef
from .._client import InvocationHandle
from .._errors import (
    ConflictError,
    IdempotencyConflictError,
    InvocationCancelledError,
    InvocationFailedError,
    InvocationStoppedError,
    JournalDecodeError,
    NotFoundError,
    PayloadTooLargeError,
    SerializationError,
)
from .._runtime import Runtime
from .._views import entry_view, error_view, outcome_view, record_view
from .._workflow import Workflow
from ._http import (
    BearerAuth,
    HTTPError,
    decode_arguments,
    decode_text_field,
    decode_value,
    error_response,
    idempotency_key,
    json_response,
    query_bool,
    query_int,
    query_seconds,
    read_body,
)
from ._openapi import openapi_document
from ._ui import ui_routes

if TYPE_CHECKING:
    from ..observability import Metrics

log = logging.getLogger("perdure.ingress")

DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_LIST_LIMIT = 1000
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_app(
    runtime: Runtime,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: bool | None = None,
    metrics_public: bool = False,
) -> Starlette:
    """An ASGI app that serves ``runtime``'s workflows and actors over HTTP.

    >>> app = create_app(rt, token=os.environ["PERDURE_TOKEN"])
    >>> # uvicorn.run(app), or: perdure serve --app myapp:service

    With ``token``, every request needs ``Authorization: Bearer <token>``.
    Bodies over ``max_body_bytes`` are refused (413) while they are read.
    Served on its own, the app's lifespan starts the runtime (if it is not
    running) and stops it at shutdown.

    ``GET /metrics`` serves the runtime's Prometheus metrics
    (``perdure.observability.enable_metrics``) when ``metrics`` is True, or
    when it is None and prometheus-client is installed; behind the token
    like every route unless ``metrics_public``. A request's W3C
    ``traceparent`` is continued by the invocations it starts when the
    runtime is traced (``perdure.observability.instrument``).
    """
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string (or None for no auth)")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, not {max_body_bytes!r}")
    ingress = _Ingress(runtime, max_body_bytes, token is not None)
    if metrics is None:
        metrics = importlib.util.find_spec("prometheus_client") is not None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    routes = [
        Route("/openapi.json", ingress.openapi, methods=["GET"]),
        Route("/workflows/{name}", ingress.run_workflow, methods=["POST"]),
        Route("/workflows/{name}/start", ingress.start_workflow, methods=["POST"]),
        Route("/actors/{actor_type}/{key}/history", ingress.actor_history, methods=["GET"]),
        Route("/actors/{actor_type}/{key}/state", ingress.actor_state, methods=["GET"]),
        Route("/actors/{actor_type}/{key}/{handler}", ingress.send_actor, methods=["POST"]),
        Route("/invocations", ingress.list_invocations, methods=["GET"]),
        Route("/invocations/{invocation_id}", ingress.get_invocation, methods=["GET"]),
        Route("/invocations/{invocation_id}/journal", ingress.journal, methods=["GET"]),
        Route("/invocations/{invocation_id}/cancel", ingress.cancel, methods=["POST"]),
        Route("/invocations/{invocation_id}/signals/{name}", ingress.signal, methods=["POST"]),
        Route("/invocations/{invocation_id}/queries/{name}", ingress.query, methods=["GET"]),
        Route("/promises/{promise_id}/resolve", ingress.resolve_promise, methods=["POST"]),
        Route("/promises/{promise_id}/reject", ingress.reject_promise, methods=["POST"]),
        *ui_routes(runtime),
    ]
    public: frozenset[str] = frozenset()
    if metrics:
        from ..observability import enable_metrics

        ingress.metrics = enable_metrics(runtime)
        routes.append(Route("/metrics", ingress.serve_metrics, methods=["GET"]))
        if metrics_public:
            public = frozenset({"/metrics"})
    middleware = [] if token is None else [Middleware(BearerAuth, token=token, public=public)]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_exception},
        lifespan=lifespan,
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method), as JSON."""
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    message = {
        404: f"no route for {request.method} {request.url.path}; GET /openapi.json lists them",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, kind, message, exc.headers)


def _guarded(endpoint: Callable[[_Ingress, Request], Awaitable[Response]]) -> Any:
    """Map errors to responses; an unexpected one is logged, never sent."""

    @functools.wraps(endpoint)
    async def guarded(self: _Ingress, request: Request) -> Response:
        try:
            return await endpoint(self, request)
        except HTTPError as exc:
            return error_response(exc.status, exc.kind, exc.message, exc.headers)
        except IdempotencyConflictError as exc:
            return error_response(409, "idempotency_conflict", str(exc))
        except ConflictError as exc:  # a settled promise, a finished invocation
            return error_response(409, "conflict", str(exc))
        except NotFoundError as exc:
            return error_response(404, "not_found", str(exc))
        except PayloadTooLargeError as exc:
            return error_response(413, "payload_too_large", str(exc))
        except JournalDecodeError as exc:
            log.error("%s %s: %s", request.method, request.url.path, exc)
            return error_response(500, "journal_decode_error", str(exc))
        except SerializationError as exc:
            return error_response(422, "invalid_arguments", str(exc))
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(
                500, "internal_error", "internal server error; the server's log has the details"
            )

    return guarded


# The longest deadline a start may ask for (timedelta's own limit is far larger).
MAX_TIMEOUT_SECONDS = 100 * 365 * 86400.0


def _deadline(request: Request) -> timedelta | None:
    """``?timeout_seconds=``: cancel the invocation if it has not finished by then."""
    seconds = query_seconds(request, "timeout_seconds")
    if seconds is None:
        return None
    if seconds > MAX_TIMEOUT_SECONDS:
        raise HTTPError(
            400,
            "bad_request",
            f"query parameter 'timeout_seconds' must be at most {MAX_TIMEOUT_SECONDS:.0f} "
            "(100 years)",
        )
    return timedelta(seconds=seconds)


def _created(request: Request, handle: InvocationHandle[Any], status: str) -> Response:
    location = f"{request.scope.get('root_path', '')}/invocations/{handle.id}"
    return json_response(
        202, {"invocation_id": handle.id, "status": status}, {"Location": location}
    )


class _Ingress:
    """The endpoints, over one runtime's public client."""

    def __init__(self, runtime: Runtime, max_body_bytes: int, auth: bool) -> None:
        self.runtime = runtime
        self.client = runtime.client
        self.max_body_bytes = max_body_bytes
        self.auth = auth
        self.metrics: Metrics | None = None

    def _trace(self, request: Request) -> contextlib.AbstractContextManager[None]:
        """Continue the caller's trace (``traceparent``) if the runtime is traced."""
        if "traceparent" not in request.headers:
            return contextlib.nullcontext()
        from ..observability import tracing_of

        tracing = tracing_of(self.runtime)
        if tracing is None:
            return contextlib.nullcontext()
        return tracing.continue_trace(request.headers)

    # -- lookups -------------------------------------------------------------------

    def _workflow(self, name: str) -> Workflow[Any, Any]:
        found = self.runtime.workflows.get(name)
        if found is None:
            known = ", ".join(sorted(self.runtime.workflows)) or "none"
            raise HTTPError(404, "not_found", f"no workflow named {name!r} (workflows: {known})")
        return found

    def _actor(self, actor_type: str) -> ActorDef:
        found = self.runtime.actors.get(actor_type)
        if found is None:
            known = ", ".join(sorted(self.runtime.actors)) or "none"
            raise HTTPError(
                404, "not_found", f"no actor type named {actor_type!r} (actor types: {known})"
            )
        return found

    def _durable_actor(self, actor_type: str) -> ActorDef:
        definition = self._actor(actor_type)
        if not definition.durable:
            raise HTTPError(
                404,
                "not_found",
                f"actor type {actor_type!r} keeps no history: it has no DurabilityFacet",
            )
        return definition

    # -- invoking --------------------------------------------------------------------

    @_guarded
    async def run_workflow(self, request: Request) -> Response:
        return await self._invoke_workflow(request, wait=query_bool(request, "wait", True))

    @_guarded
    async def start_workflow(self, request: Request) -> Response:
        return await self._invoke_workflow(request, wait=False)

    async def _invoke_workflow(self, request: Request, *, wait: bool) -> Response:
        wf = self._workflow(request.path_params["name"])
        timeout = query_seconds(request, "timeout")
        deadline = _deadline(request)
        key = idempotency_key(request)
        body = await read_body(request, self.max_body_bytes)
        args, kwargs = decode_arguments(wf, body, f"workflow {wf.name!r}")
        with self._trace(request):
            handle = await self.client.start(
                wf, *args, idempotency_key=key, timeout=deadline, **kwargs
            )
        if not wait:
            return _created(request, handle, (await handle.status()).value)
        return await self._outcome(request, handle, timeout)

    @_guarded
    async def send_actor(self, request: Request) -> Response:
        actor_type = request.path_params["actor_type"]
        definition = self._actor(actor_type)
        name = request.path_params["handler"]
        handler = definition.handlers.get(name)
        if handler is None:
            known = ", ".join(sorted(definition.handlers))
            raise HTTPError(
                404, "not_found", f"actor type {actor_type!r} has no handler {name!r} ({known})"
            )
        wait = query_bool(request, "wait", True)
        timeout = query_seconds(request, "timeout")
        key = idempotency_key(request)
        body = await read_body(request, self.max_body_bytes)
        args, kwargs = decode_arguments(handler, body, f"actor handler {handler.name!r}")
        ref = self.client.actor(actor_type, request.path_params["key"])
        if not definition.durable:
            if key is not None:
                raise HTTPError(
                    400,
                    "bad_request",
                    f"actor type {actor_type!r} is not durable, so an Idempotency-Key cannot "
                    "be honoured; give it a DurabilityFacet or send no key",
                )
            if not wait:
                await ref.tell(name, *args, **kwargs)
                return json_response(202, {"invocation_id": None, "status": "accepted"})
            try:
                value = await ref.ask(name, *args, **kwargs)
            except Exception as exc:
                log.warning("%s failed: %r", handler.name, exc)
                return json_response(
                    500, {"invocation_id": None, "status": "failed", "error": error_view(exc)}
                )
            return json_response(
                200, {"invocation_id": None, "status": "completed", "result": value}
            )
        with self._trace(request):
            handle = await ref.tell(name, *args, idempotency_key=key, **kwargs)
        assert handle is not None
        if not wait:
            return _created(request, handle, (await handle.status()).value)
        return await self._outcome(request, handle, timeout)

    async def _outcome(
        self, request: Request, handle: InvocationHandle[Any], timeout: float | None
    ) -> Response:
        try:
            value = await handle.result(timeout=timeout)
        except TimeoutError:
            return _created(request, handle, (await handle.status()).value)
        except InvocationCancelledError as exc:
            return json_response(
                409,
                {
                    "invocation_id": handle.id,
                    "status": "cancelled",
                    "error": {"type": "Cancelled", "message": exc.reason},
                },
            )
        except InvocationFailedError as exc:
            return json_response(
                500, {"invocation_id": handle.id, "status": "failed", "error": error_view(exc)}
            )
        except InvocationStoppedError as exc:
            return json_response(
                503,
                {
                    "invocation_id": handle.id,
                    "status": "running",
                    "error": {"type": "invocation_stopped", "message": str(exc)},
                },
            )
        return json_response(
            200, {"invocation_id": handle.id, "status": "completed", "result": value}
        )

    # -- reading -----------------------------------------------------------------------

    @_guarded
    async def get_invocation(self, request: Request) -> Response:
        handle = await self.client.get(request.path_params["invocation_id"])
        rec = await handle.record()
        view = record_view(rec)
        if rec.status.finished:
            view.update(outcome_view(await self.client.journal(rec.id)))
        return json_response(200, view)

    @_guarded
    async def journal(self, request: Request) -> Response:
        invocation_id = request.path_params["invocation_id"]
        entries = await self.client.journal(invocation_id)
        return json_response(
            200, {"invocation_id": invocation_id, "entries": [entry_view(e) for e in entries]}
        )

    @_guarded
    async def list_invocations(self, request: Request) -> Response:
        limit = query_int(request, "limit", minimum=1, maximum=MAX_LIST_LIMIT)
        try:
            records = await self.client.list(
                status=request.query_params.get("status"),
                workflow=request.query_params.get("target"),
                limit=100 if limit is None else limit,
            )
        except ValueError as exc:
            raise HTTPError(400, "bad_request", str(exc)) from None
        return json_response(200, {"invocations": [record_view(r) for r in records]})

    @_guarded
    async def actor_history(self, request: Request) -> Response:
        definition = self._durable_actor(request.path_params["actor_type"])
        key = request.path_params["key"]
        messages = await self.client.actor(definition.name, key).history()
        return json_response(
            200,
            {
                "actor_type": definition.name,
                "key": key,
                "messages": [record_view(m) for m in messages],
            },
        )

    @_guarded
    async def actor_state(self, request: Request) -> Response:
        definition = self._durable_actor(request.path_params["actor_type"])
        key = request.path_params["key"]
        at = query_int(request, "at", minimum=0)
        ref = self.client.actor(definition.name, key)
        history = await ref.history()
        last = max((m.actor_seq or 0 for m in history), default=0)
        if at is not None and at > last:
            raise HTTPError(
                404,
                "not_found",
                f"the latest message of actor {definition.name}/{key} is #{last}; there is "
                f"no state after message {at}",
            )
        state = await ref.state_at(at)
        return json_response(
            200,
            {
                "actor_type": definition.name,
                "key": key,
                "at": last if at is None else at,
                "state": state,
            },
        )

    # -- promises, signals, queries, cancellation ---------------------------------------

    @_guarded
    async def resolve_promise(self, request: Request) -> Response:
        promise_id = request.path_params["promise_id"]
        value = decode_value(await read_body(request, self.max_body_bytes))
        await self.client.resolve_promise(promise_id, value)
        return json_response(200, {"promise_id": promise_id, "status": "resolved"})

    @_guarded
    async def reject_promise(self, request: Request) -> Response:
        promise_id = request.path_params["promise_id"]
        body = await read_body(request, self.max_body_bytes)
        message = decode_text_field(body, "message", required=True)
        assert message is not None
        await self.client.reject_promise(promise_id, message)
        return json_response(200, {"promise_id": promise_id, "status": "rejected"})

    @_guarded
    async def signal(self, request: Request) -> Response:
        name = request.path_params["name"]
        value = decode_value(await read_body(request, self.max_body_bytes))
        handle = await self.client.get(request.path_params["invocation_id"])
        await handle.signal(name, value)
        return json_response(202, {"invocation_id": handle.id, "signal": name, "status": "sent"})

    @_guarded
    async def query(self, request: Request) -> Response:
        name = request.path_params["name"]
        handle = await self.client.get(request.path_params["invocation_id"])
        value = await handle.query(name)
        return json_response(200, {"invocation_id": handle.id, "query": name, "value": value})

    @_guarded
    async def cancel(self, request: Request) -> Response:
        body = await read_body(request, self.max_body_bytes)
        reason = decode_text_field(body, "reason", required=False)
        handle = await self.client.get(request.path_params["invocation_id"])
        await handle.cancel(reason or "cancelled")
        # Delivered at its next durable point: until then it is not cancelled yet.
        rec = await handle.record()
        return json_response(
            202,
            {
                "invocation_id": handle.id,
                "status": rec.status.value,
                "cancel_reason": rec.cancel_reason,
            },
            {"Location": f"{request.scope.get('root_path', '')}/invocations/{handle.id}"},
        )

    @_guarded
    async def serve_metrics(self, request: Request) -> Response:
        assert self.metrics is not None
        await self.metrics.refresh()
        return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @_guarded
    async def openapi(self, request: Request) -> Response:
        return json_response(200, openapi_document(self.runtime, auth=self.auth))
