"""The time-travel web UI: a static page at ``/ui/`` and the few read-only
JSON endpoints it needs beyond the ingress's own.

The page (``static/``: HTML, JS and CSS, no build step, nothing fetched
from the internet) reads the ingress's JSON API with the browser's cookie
(see :class:`~perdure.ingress._http.BearerAuth`) and these endpoints:

- ``GET /ui/api/actors``: every actor (type, key) with a history;
- ``GET /ui/api/invocations/{id}/timeline``: the journal, each entry with
  the failed attempts that came before it;
- ``GET /ui/api/actors/{type}/{key}/step?at=N``: the state after message N,
  the state before it, what changed, and the message itself;
- ``POST /ui/api/invocations/{id}/fork?upto=N``: a dry-run fork (no live
  steps, nothing external is called), for debugging.

Everything goes through the runtime's public client, plus the store's
public reads ``list_actors`` and ``read_attempts``.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from .._errors import NotFoundError
from .._runtime import Runtime
from .._views import dumps, entry_view, error_view, record_view, recorded_error_view, timestamp
from ..storage._records import EntryKind
from ._http import HTTPError, error_response, json_response, query_int

log = logging.getLogger("perdure.ingress")

# The page may load only itself: no inline script, no other origin.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# A fork is run by the page's own script, which sends this header; a form
# on another site cannot (it would need a CORS preflight this app refuses).
UI_HEADER = "x-perdure-ui"


def ui_routes(runtime: Runtime) -> list[BaseRoute]:
    """``/`` (a redirect to the UI) and the UI itself, mounted at ``/ui``."""
    ui = _UI(runtime)
    api = [
        Route("/", ui.page, methods=["GET"]),
        Route("/static/{name}", ui.static, methods=["GET"]),
        Route("/api/actors", ui.actors, methods=["GET"]),
        Route("/api/actors/{actor_type}/{key}/step", ui.actor_step, methods=["GET"]),
        Route("/api/invocations/{invocation_id}/timeline", ui.timeline, methods=["GET"]),
        Route("/api/invocations/{invocation_id}/fork", ui.fork, methods=["POST"]),
    ]
    return [Route("/", _to_ui, methods=["GET"]), Mount("/ui", routes=api)]


async def _to_ui(request: Request) -> Response:
    return RedirectResponse(f"{request.scope.get('root_path', '')}/ui/", status_code=307)


@functools.cache
def _asset(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


def _guarded(endpoint: Callable[[_UI, Request], Awaitable[Response]]) -> Any:
    """Errors as the ingress sends them: ``{"error": {"type", "message"}}``."""

    @functools.wraps(endpoint)
    async def guarded(self: _UI, request: Request) -> Response:
        try:
            return await endpoint(self, request)
        except HTTPError as exc:
            return error_response(exc.status, exc.kind, exc.message, exc.headers)
        except NotFoundError as exc:
            return error_response(404, "not_found", str(exc))
        except ValueError as exc:
            return error_response(400, "bad_request", str(exc))
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(
                500, "internal_error", "internal server error; the server's log has the details"
            )

    return guarded


class _UI:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.client = runtime.client

    async def page(self, request: Request) -> Response:
        html = _asset("index.html")
        return Response(html, media_type=_STATIC["index.html"], headers=_SECURITY_HEADERS)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        media_type = _STATIC.get(name)
        if media_type is None:
            return error_response(404, "not_found", f"the UI has no file {name!r}")
        return Response(_asset(name), media_type=media_type, headers=_SECURITY_HEADERS)

    # -- reads -------------------------------------------------------------------

    @_guarded
    async def actors(self, request: Request) -> Response:
        durable = {name for name, d in self.runtime.actors.items() if d.durable}
        found = [
            {"type": actor_type, "key": key}
            for actor_type, key in await self.runtime.store.list_actors()
            if actor_type in durable
        ]
        return json_response(200, {"actors": found})

    @_guarded
    async def timeline(self, request: Request) -> Response:
        invocation_id = request.path_params["invocation_id"]
        handle = await self.client.get(invocation_id)
        rec = await handle.record()
        entries = await self.client.journal(invocation_id)
        failed: dict[int, list[dict[str, Any]]] = {}
        for attempt in await self.runtime.store.read_attempts(invocation_id):
            failed.setdefault(attempt.index, []).append(
                {
                    "attempt": attempt.attempt,
                    "created_at": timestamp(attempt.created_at),
                    "error": recorded_error_view(_decoded(attempt.error)),
                }
            )
        views = []
        for entry in entries:
            view = entry_view(entry)
            view["failed_attempts"] = failed.get(entry.index, [])
            views.append(view)
        return json_response(200, {"invocation": record_view(rec), "entries": views})

    @_guarded
    async def actor_step(self, request: Request) -> Response:
        actor_type = request.path_params["actor_type"]
        key = request.path_params["key"]
        definition = self.runtime.actors.get(actor_type)
        if definition is None or not definition.durable:
            raise HTTPError(
                404, "not_found", f"no durable actor type named {actor_type!r}: it keeps no history"
            )
        ref = self.client.actor(actor_type, key)
        history = await ref.history()
        last = max((m.actor_seq or 0 for m in history), default=0)
        at = query_int(request, "at", minimum=0, maximum=last)
        at = last if at is None else at
        after = _plain(await ref.state_at(at))
        before = _plain(await ref.state_at(at - 1)) if at > 0 else None
        message = next((m for m in history if m.actor_seq == at), None)
        view: dict[str, Any] = {
            "actor_type": actor_type,
            "key": key,
            "at": at,
            "last": last,
            "state": after,
            "previous": before,
            "changes": changes(before, after) if at > 0 else [],
            "message": None,
        }
        if message is not None:
            journal = await self.client.journal(message.id)
            message_view = record_view(message)
            for entry in journal:
                if entry.kind is EntryKind.INPUT:
                    message_view["input"] = entry_view(entry).get("value")
                elif entry.kind is EntryKind.OUTPUT:
                    output = entry_view(entry)
                    message_view["output"] = {k: output.get(k) for k in ("ok", "value", "error")}
            view["message"] = message_view
        return json_response(200, view)

    # -- fork ----------------------------------------------------------------------

    @_guarded
    async def fork(self, request: Request) -> Response:
        if request.headers.get(UI_HEADER) != "1":
            raise HTTPError(
                403, "forbidden", f"a fork from the UI must send the header '{UI_HEADER}: 1'"
            )
        invocation_id = request.path_params["invocation_id"]
        upto = query_int(request, "upto", minimum=1)
        result = await self.client.fork(invocation_id, upto=upto, live=False)
        return json_response(
            200,
            {
                "invocation_id": result.invocation_id,
                "upto": upto,
                "status": result.status,
                "value": result.value,
                "error": None if result.error is None else error_view(result.error),
                "stopped_at": None
                if result.stopped_at is None
                else {"index": result.stopped_at[0], "step": result.stopped_at[1]},
                "replayed": result.replayed,
                "executed": result.executed,
                "journal": [entry_view(e) for e in result.journal],
            },
        )


def _decoded(payload: bytes) -> Any:
    try:
        return msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None


def _plain(value: Any) -> Any:
    """A state as the JSON the page shows (dataclasses, Structs, pydantic models)."""
    return msgspec.json.decode(dumps(value))


_ABSENT: Any = object()


def changes(before: Any, after: Any) -> list[dict[str, Any]]:
    """What changed between two JSON values, path by path, as the page shows it:
    ``{"path", "change": "added"|"removed"|"changed", "before", "after"}``.

    Paths are those of ``ActorRef.diff``: objects compare by key
    (``items.apple``), lists of the same length by position (``log[2]``).
    """
    out: list[dict[str, Any]] = []
    _walk(before, after, "", out)
    return out


def _walk(a: Any, b: Any, path: str, out: list[dict[str, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{path}.{k}" if path else str(k), out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _walk(x, y, f"{path}[{i}]", out)
    elif a is _ABSENT:
        out.append({"path": path or ".", "change": "added", "before": None, "after": b})
    elif b is _ABSENT:
        out.append({"path": path or ".", "change": "removed", "before": a, "after": None})
    elif a != b:
        out.append({"path": path or ".", "change": "changed", "before": a, "after": b})
