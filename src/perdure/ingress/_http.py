"""HTTP plumbing of the ingress: errors, bodies, arguments, auth."""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .._views import dumps
from .._workflow import Workflow

MAX_IDEMPOTENCY_KEY = 256


class HTTPError(Exception):
    """A request the ingress refuses, with the status and the message to send."""

    def __init__(
        self, status: int, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """``{"error": {"type", "message"}}``: every error the ingress sends looks like this."""
    return json_response(status, {"error": {"type": kind, "message": message}}, headers)


# -- the request ---------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes.

    A declared Content-Length over the limit is refused before reading; a
    chunked body is counted as it arrives, so an unbounded one is never held.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise HTTPError(
                400, "bad_request", "the Content-Length header is not a number"
            ) from None
        if length > limit:
            raise _too_large(limit, f"the request body is {length:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit, "the request body is larger")
    return bytes(body)


def _too_large(limit: int, what: str) -> HTTPError:
    return HTTPError(413, "payload_too_large", f"{what}, over the limit of {limit:,} bytes")


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise HTTPError(
            400,
            "bad_request",
            f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} characters long",
        )
    return key


def query_bool(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = raw.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise HTTPError(
        400, "bad_request", f"query parameter {name!r} must be true or false, not {raw!r}"
    )


def query_int(
    request: Request, name: str, *, minimum: int, maximum: int | None = None
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise HTTPError(
            400, "bad_request", f"query parameter {name!r} must be an integer {bound}, not {raw!r}"
        )
    return value


def query_seconds(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise HTTPError(
            400, "bad_request", f"query parameter {name!r} must be a positive number of seconds"
        )
    return value


def decode_value(body: bytes) -> Any:
    """The body as one JSON value (a promise's value, a signal's); empty: null."""
    if not body.strip():
        return None
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise HTTPError(
            400, "malformed_json", f"the request body is not valid JSON: {exc}"
        ) from None


def decode_text_field(body: bytes, field: str, *, required: bool) -> str | None:
    """``{"<field>": "..."}``'s non-empty string; None for no body, ``{}`` or
    a null field, unless ``required``."""
    value = decode_value(body)
    if isinstance(value, dict) and set(value) == {field}:
        found = value[field]
        if isinstance(found, str) and found:
            return found
        if found is None and not required:
            return None
    elif not required and (value is None or value == {}):
        return None
    optional = "" if required else " (or no body)"
    raise HTTPError(
        422,
        "invalid_arguments",
        f'the body must be {{"{field}": "<a non-empty string>"}}{optional}',
    )


# -- arguments -----------------------------------------------------------------


def decode_arguments(
    definition: Workflow[Any, Any], body: bytes, what: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments from a JSON body, checked against the type hints.

    The body is an object of keyword arguments or an array of positional
    ones (empty: no arguments). The result is in a canonical form, positional
    wherever the signature allows, so that the same call sent either way has
    the same input, and an Idempotency-Key retry matches.
    """
    if not body.strip():
        body = b"{}"
    try:
        raw = _ARGUMENTS.decode(body)
    except msgspec.ValidationError:
        raise HTTPError(
            422,
            "invalid_arguments",
            f"{what}: the body must be a JSON object of keyword arguments or a JSON array "
            "of positional arguments",
        ) from None
    except msgspec.DecodeError as exc:
        raise HTTPError(
            400, "malformed_json", f"the request body is not valid JSON: {exc}"
        ) from None
    args: tuple[Any, ...] = tuple(raw) if isinstance(raw, list) else ()
    kwargs: dict[str, Any] = raw if isinstance(raw, dict) else {}
    try:
        bound = definition.signature.bind(*([None] * definition.leading), *args, **kwargs)
    except TypeError as exc:
        raise HTTPError(422, "invalid_arguments", f"{what}: {exc}") from None
    parameters = definition.signature.parameters
    for name, value in list(bound.arguments.items())[definition.leading :]:
        hint = definition.hints.get(name)
        kind = parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            decoded: Any = tuple(
                _decode(v, hint, f"{name}[{i}]", what) for i, v in enumerate(value)
            )
        elif kind is inspect.Parameter.VAR_KEYWORD:
            decoded = {k: _decode(v, hint, k, what) for k, v in value.items()}
        else:
            decoded = _decode(value, hint, name, what)
        bound.arguments[name] = decoded
    return bound.args[definition.leading :], bound.kwargs


# Each argument stays raw JSON until it is decoded against its own type hint,
# with JSON's own rules (strict types; object keys may decode to ints).
_ARGUMENTS = msgspec.json.Decoder(dict[str, msgspec.Raw] | list[msgspec.Raw])


def _dec_hook(tp: Any, obj: Any) -> Any:
    validate = getattr(tp, "model_validate", None)
    if validate is not None:
        return validate(obj)
    raise NotImplementedError(f"cannot decode into {tp!r}")


def _decode(raw: msgspec.Raw, hint: Any, name: str, what: str) -> Any:
    try:
        if hint is None or hint is Any:
            return msgspec.json.decode(raw)
        validate = getattr(hint, "model_validate_json", None)
        if validate is not None:  # a pydantic model
            return validate(bytes(raw))
        return msgspec.json.decode(raw, type=hint, strict=True, dec_hook=_dec_hook)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        detail = str(exc).replace("`$", f"`{name}")
        raise HTTPError(422, "invalid_arguments", f"{what}: argument {name!r}: {detail}") from None


# -- auth ----------------------------------------------------------------------


class BearerAuth:
    """Refuses every HTTP request without ``Authorization: Bearer <token>``,
    except to the ``public`` paths.

    A browser cannot send that header when it opens a page, so the web UI
    is opened once as ``/ui/?token=<token>``: that answers with a redirect
    to the same page without the token, and an HttpOnly, SameSite=Strict
    cookie derived from it (not the token itself). The cookie then stands
    for the token on GET and HEAD requests, and on other requests only with
    the header the UI's own script sends (``X-Perdure-UI: 1``), which a form
    on another site cannot send.
    """

    def __init__(self, app: ASGIApp, token: str, public: frozenset[str] = frozenset()) -> None:
        self.app = app
        self._token = token.encode()
        self._cookie = hmac.new(self._token, b"perdure-ui-cookie", "sha256").hexdigest().encode()
        self._public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self._public and _route_path(scope) in self._public):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and request.method in ("GET", "HEAD"):
            if hmac.compare_digest(given.encode(), self._token):
                await self._set_cookie(request)(scope, receive, send)
                return
        elif self._authorized(request):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "unauthorized",
            "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
            "(in a browser, open /ui/?token=<token> once)",
            {"WWW-Authenticate": 'Bearer realm="perdure"'},
        )
        await response(scope, receive, send)

    def _authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(given.strip().encode(), self._token)
        cookie = request.cookies.get(UI_COOKIE)
        if cookie is None or not hmac.compare_digest(cookie.encode(), self._cookie):
            return False
        return request.method in ("GET", "HEAD") or request.headers.get("x-perdure-ui") == "1"

    def _set_cookie(self, request: Request) -> Response:
        """The same URL without the token, and the cookie that stands for it."""
        rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
        location = request.url.path + (f"?{rest}" if rest else "")
        response = Response(
            status_code=303, headers={"Location": location, "Referrer-Policy": "no-referrer"}
        )
        response.set_cookie(
            UI_COOKIE,
            self._cookie.decode(),
            path=request.scope.get("root_path") or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response


UI_COOKIE = "perdure_ui"


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
