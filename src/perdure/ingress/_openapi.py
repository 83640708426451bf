"""The OpenAPI 3.1 document of an ingress, from the registered definitions."""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import msgspec

from .. import __version__
from .._runtime import Runtime
from .._workflow import Workflow
from ..storage._records import EntryKind

log = logging.getLogger("perdure.ingress")

REF = "#/components/schemas/{name}"
_P = inspect.Parameter


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(name=name)}


def _content(schema: dict[str, Any] | str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema) if isinstance(schema, str) else schema}}


def _json(schema: dict[str, Any] | str, description: str) -> dict[str, Any]:
    return {"description": description, "content": _content(schema)}


_ERRORS = {
    "400": _json("Error", "Malformed JSON or a bad parameter"),
    "401": _json("Error", "Missing or wrong bearer token"),
    "404": _json("Error", "No such workflow, actor type, handler, invocation or promise"),
    "413": _json("Error", "The request body is over the limit"),
    "422": _json("Error", "The arguments do not fit the handler's signature and type hints"),
}

_NULLABLE_STRING = {"type": ["string", "null"]}

_BASE_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                "required": ["type", "message"],
            }
        },
        "required": ["error"],
    },
    "Accepted": {
        "type": "object",
        "description": "Started (or, with an Idempotency-Key, attached to); poll its Location",
        "properties": {"invocation_id": _NULLABLE_STRING, "status": {"type": "string"}},
        "required": ["invocation_id", "status"],
    },
    "Failed": {
        "type": "object",
        "description": "The invocation finished with an error (its type and message)",
        "properties": {
            "invocation_id": _NULLABLE_STRING,
            "status": {"const": "failed"},
            "error": {"$ref": REF.format(name="Error") + "/properties/error"},
        },
        "required": ["invocation_id", "status", "error"],
    },
    "Cancelled": {
        "type": "object",
        "description": "The invocation was cancelled, or its deadline passed, before it finished",
        "properties": {
            "invocation_id": {"type": "string"},
            "status": {"const": "cancelled"},
            "error": {"$ref": REF.format(name="Error") + "/properties/error"},
        },
        "required": ["invocation_id", "status", "error"],
    },
    "Invocation": {
        "type": "object",
        "description": "An invocation; once finished, with its result or its error",
        "properties": {
            "invocation_id": {"type": "string"},
            "target": {"type": "string"},
            "status": {
                "enum": ["pending", "running", "suspended", "completed", "failed", "cancelled"]
            },
            "idempotency_key": _NULLABLE_STRING,
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "actor": {
                "type": ["object", "null"],
                "properties": {
                    "type": {"type": "string"},
                    "key": {"type": "string"},
                    "seq": {"type": "integer"},
                },
            },
            "parent_id": {
                "type": ["string", "null"],
                "description": "the invocation that started this one as its child",
            },
            "wake_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "when a suspended invocation resumes (null: when a promise, a "
                "signal, a child or a cancellation wakes it)",
            },
            "deadline": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "when it is cancelled if it has not finished",
            },
            "cancel_reason": {
                "type": ["string", "null"],
                "description": "set once its cancellation was asked for",
            },
            "result": {},
            "error": {"$ref": REF.format(name="Error") + "/properties/error"},
        },
        "required": ["invocation_id", "target", "status", "created_at", "updated_at"],
    },
    "JournalEntry": {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "kind": {"enum": [kind.value for kind in EntryKind]},
            "name": {"type": "string"},
            "ok": {"type": "boolean"},
            "attempts": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "value": {},
            "type_tag": _NULLABLE_STRING,
            "error": {"$ref": REF.format(name="Error") + "/properties/error"},
        },
        "required": ["index", "kind", "name", "ok", "attempts", "created_at"],
    },
}


class _Schemas:
    """JSON schemas of type hints, their named parts collected as components."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def of(self, hint: Any) -> dict[str, Any]:
        if hint is None or hint is Any:
            return {}
        if hasattr(hint, "model_json_schema"):  # a pydantic model
            try:
                schema: dict[str, Any] = hint.model_json_schema(
                    ref_template=REF.replace("{name}", "{model}")
                )
            except Exception as exc:
                log.warning("no JSON schema for %r: %s", hint, exc)
                return {}
            self.components.update(schema.pop("$defs", {}))
            self.components[hint.__name__] = schema
            return _ref(hint.__name__)
        try:
            (found,), components = msgspec.json.schema_components([hint], ref_template=REF)
        except Exception as exc:  # a type msgspec has no schema for: any JSON
            log.debug("no JSON schema for %r: %s", hint, exc)
            return {}
        self.components.update(components)
        return dict(found)

    def body(self, definition: Workflow[Any, Any]) -> dict[str, Any]:
        """The request body: an object of keyword arguments or an array of positional ones."""
        params = list(definition.signature.parameters.values())[definition.leading :]
        properties: dict[str, Any] = {}
        required: list[str] = []
        prefix: list[dict[str, Any]] = []
        min_items = 0
        var_positional: dict[str, Any] | None = None
        var_keyword: dict[str, Any] | None = None
        object_form = array_form = True
        for p in params:
            schema = self.of(definition.hints.get(p.name))
            if p.kind is _P.VAR_POSITIONAL:
                var_positional = schema
                continue
            if p.kind is _P.VAR_KEYWORD:
                var_keyword = schema
                continue
            if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD):
                prefix.append(schema)
                if p.default is _P.empty:
                    min_items = len(prefix)
            if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY):
                properties[p.name] = schema
                if p.default is _P.empty:
                    required.append(p.name)
            if p.default is _P.empty:
                object_form = object_form and p.kind is not _P.POSITIONAL_ONLY
                array_form = array_form and p.kind is not _P.KEYWORD_ONLY
        forms: list[dict[str, Any]] = []
        if object_form:
            obj: dict[str, Any] = {
                "type": "object",
                "title": "keyword arguments",
                "properties": properties,
                "additionalProperties": False if var_keyword is None else var_keyword,
            }
            if required:
                obj["required"] = required
            forms.append(obj)
        if array_form:
            arr: dict[str, Any] = {
                "type": "array",
                "title": "positional arguments",
                "prefixItems": prefix,
                "minItems": min_items,
                "items": False if var_positional is None else var_positional,
            }
            forms.append(arr)
        schema = forms[0] if len(forms) == 1 else {"oneOf": forms}
        # An empty body means no arguments: it is optional if none is required.
        return {"required": bool(required or min_items), "content": _content(schema)}


def _operation_id(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", "_".join(parts))


_WAIT = {
    "name": "wait",
    "in": "query",
    "schema": {"type": "boolean", "default": True},
    "description": "false: return 202 with the invocation id once it is recorded",
}
_TIMEOUT = {
    "name": "timeout",
    "in": "query",
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "seconds to wait for the result; after that, 202 with the invocation id",
}
_TIMEOUT_SECONDS = {
    "name": "timeout_seconds",
    "in": "query",
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "a deadline: the invocation is cancelled if it has not finished this many "
    "seconds after it started (its children inherit it)",
}
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
    "description": "a retry with the same key returns the first invocation's result and runs "
    "nothing again; the same key with a different body is a 409",
}
_KEY = {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
_INVOCATION_ID = {
    "name": "invocation_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}


def _invoke(
    summary: str,
    operation_id: str,
    body: dict[str, Any],
    result: dict[str, Any],
    parameters: list[dict[str, Any]],
    *,
    wait: bool,
    cancellable: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if wait:
        completed = {
            "type": "object",
            "properties": {
                "invocation_id": _NULLABLE_STRING,
                "status": {"const": "completed"},
                "result": result,
            },
            "required": ["invocation_id", "status", "result"],
        }
        responses["200"] = _json(completed, "Completed: the result")
    responses["202"] = _json("Accepted", "Recorded; not waited for")
    responses.update(_ERRORS)
    responses["409"] = _json("Error", "The Idempotency-Key was used with a different body")
    if wait and cancellable:
        responses["409"] = _json(
            {"oneOf": [_ref("Error"), _ref("Cancelled")]},
            "The Idempotency-Key was used with a different body, or the invocation was "
            "cancelled (or timed out)",
        )
    if wait:
        responses["500"] = _json("Failed", "The invocation failed")
    return {
        "summary": summary,
        "operationId": operation_id,
        "parameters": parameters,
        "requestBody": body,
        "responses": responses,
    }


def _read(summary: str, operation_id: str, schema: dict[str, Any] | str, **extra: Any) -> Any:
    responses = {"200": _json(schema, summary)}
    responses.update({k: v for k, v in _ERRORS.items() if k in ("400", "401", "404")})
    return {
        "get": {"summary": summary, "operationId": operation_id, **extra, "responses": responses}
    }


def _add(paths: dict[str, Any], path: str, operations: dict[str, Any]) -> None:
    """Add operations to a path: a handler may share a path with a read
    (POST /actors/T/{key}/history is the handler, GET the history)."""
    paths.setdefault(path, {}).update(operations)


def openapi_document(runtime: Runtime, *, auth: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ingress over ``runtime``."""
    schemas = _Schemas()
    paths: dict[str, Any] = {}
    for name, wf in sorted(runtime.workflows.items()):
        body, result = schemas.body(wf), schemas.of(wf.return_hint)
        _add(
            paths,
            f"/workflows/{name}",
            {
                "post": _invoke(
                    f"Run workflow {name} and wait for its result",
                    _operation_id("run", name),
                    body,
                    result,
                    [_WAIT, _TIMEOUT, _TIMEOUT_SECONDS, _IDEMPOTENCY],
                    wait=True,
                    cancellable=True,
                )
            },
        )
        _add(
            paths,
            f"/workflows/{name}/start",
            {
                "post": _invoke(
                    f"Start workflow {name}",
                    _operation_id("start", name),
                    body,
                    result,
                    [_TIMEOUT_SECONDS, _IDEMPOTENCY],
                    wait=False,
                )
            },
        )
    for actor_name, definition in sorted(runtime.actors.items()):
        for handler_name, handler in sorted(definition.handlers.items()):
            _add(
                paths,
                f"/actors/{actor_name}/{{key}}/{handler_name}",
                {
                    "post": _invoke(
                        f"Send {handler_name} to the {actor_name} actor with this key "
                        "(ask; tell with wait=false)",
                        _operation_id("send", actor_name, handler_name),
                        schemas.body(handler),
                        schemas.of(handler.return_hint),
                        [_KEY, _WAIT, _TIMEOUT, _IDEMPOTENCY]
                        if definition.durable
                        else [_KEY, _WAIT],
                        wait=True,
                    )
                },
            )
        if definition.durable:
            history = {
                "type": "object",
                "properties": {
                    "actor_type": {"type": "string"},
                    "key": {"type": "string"},
                    "messages": {"type": "array", "items": _ref("Invocation")},
                },
            }
            _add(
                paths,
                f"/actors/{actor_name}/{{key}}/history",
                _read(
                    f"Every message the {actor_name} actor with this key handled, in order",
                    _operation_id("history", actor_name),
                    history,
                    parameters=[_KEY],
                ),
            )
            state = {
                "type": "object",
                "properties": {
                    "actor_type": {"type": "string"},
                    "key": {"type": "string"},
                    "at": {"type": "integer"},
                    "state": schemas.of(definition.cls.state_type),
                },
            }
            at = {
                "name": "at",
                "in": "query",
                "schema": {"type": "integer", "minimum": 0},
                "description": "the state after this message of the history (default: the latest)",
            }
            _add(
                paths,
                f"/actors/{actor_name}/{{key}}/state",
                _read(
                    f"The state of the {actor_name} actor with this key (time travel with at=N)",
                    _operation_id("state", actor_name),
                    state,
                    parameters=[_KEY, at],
                ),
            )
    listing = {
        "type": "object",
        "properties": {"invocations": {"type": "array", "items": _ref("Invocation")}},
    }
    _add(
        paths,
        "/invocations",
        _read(
            "Invocations, oldest first",
            "list_invocations",
            listing,
            parameters=[
                {"name": "status", "in": "query", "schema": {"type": "string"}},
                {"name": "target", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100}},
            ],
        ),
    )
    _add(
        paths,
        "/invocations/{invocation_id}",
        _read(
            "An invocation's status, and its result or error once finished",
            "get_invocation",
            "Invocation",
            parameters=[_INVOCATION_ID],
        ),
    )
    journal = {
        "type": "object",
        "properties": {
            "invocation_id": {"type": "string"},
            "entries": {"type": "array", "items": _ref("JournalEntry")},
        },
    }
    _add(
        paths,
        "/invocations/{invocation_id}/journal",
        _read(
            "An invocation's journal, entry by entry",
            "get_journal",
            journal,
            parameters=[_INVOCATION_ID],
        ),
    )
    _add_controls(paths)
    components: dict[str, Any] = {"schemas": {**schemas.components, **_BASE_SCHEMAS}}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Perdure ingress", "version": __version__},
        "paths": paths,
        "components": components,
    }
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _post(
    summary: str,
    operation_id: str,
    parameters: list[dict[str, Any]],
    body: dict[str, Any] | None,
    ok: tuple[str, dict[str, Any], str],
    conflict: str,
) -> dict[str, Any]:
    status, schema, description = ok
    responses: dict[str, Any] = {status: _json(schema, description)}
    responses.update({k: v for k, v in _ERRORS.items() if k != "422" or body is not None})
    responses["409"] = _json("Error", conflict)
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "parameters": parameters,
        "responses": responses,
    }
    if body is not None:
        operation["requestBody"] = body
    return {"post": operation}


def _add_controls(paths: dict[str, Any]) -> None:
    """Promises, signals, queries and cancellation: the same for every workflow."""
    promise_id = {
        "name": "promise_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "what ctx.promise() returned as p.id",
    }
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    any_value = {"required": False, "content": _content({"description": "any JSON value"})}

    def text_body(field: str, required: bool) -> dict[str, Any]:
        schema = {
            "type": "object",
            "properties": {field: {"type": "string", "minLength": 1}},
            "required": [field] if required else [],
            "additionalProperties": False,
        }
        return {"required": required, "content": _content(schema)}

    def settled(state: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"promise_id": {"type": "string"}, "status": {"const": state}},
            "required": ["promise_id", "status"],
        }

    _add(
        paths,
        "/promises/{promise_id}/resolve",
        _post(
            "Resolve a durable promise with the body's JSON value (empty: null); the "
            "workflow that waits for it resumes",
            "resolve_promise",
            [promise_id],
            any_value,
            ("200", settled("resolved"), "Resolved"),
            "The promise is already resolved or rejected",
        ),
    )
    _add(
        paths,
        "/promises/{promise_id}/reject",
        _post(
            "Reject a durable promise: its await raises TerminalError(message)",
            "reject_promise",
            [promise_id],
            text_body("message", True),
            ("200", settled("rejected"), "Rejected"),
            "The promise is already resolved or rejected",
        ),
    )
    sent = {
        "type": "object",
        "properties": {
            "invocation_id": {"type": "string"},
            "signal": {"type": "string"},
            "status": {"const": "sent"},
        },
        "required": ["invocation_id", "signal", "status"],
    }
    _add(
        paths,
        "/invocations/{invocation_id}/signals/{name}",
        _post(
            "Send a signal with the body's JSON value (empty: null); the workflow takes it "
            "with ctx.signal(name)",
            "send_signal",
            [_INVOCATION_ID, name],
            any_value,
            ("202", sent, "Recorded; delivered in order"),
            "The invocation has finished",
        ),
    )
    asked = {
        "type": "object",
        "properties": {
            "invocation_id": {"type": "string"},
            "status": {"type": "string"},
            "cancel_reason": {"type": "string"},
        },
        "required": ["invocation_id", "status", "cancel_reason"],
    }
    _add(
        paths,
        "/invocations/{invocation_id}/cancel",
        _post(
            "Cancel an invocation (and its children) at its next durable point; its "
            "finally blocks and compensations run",
            "cancel_invocation",
            [_INVOCATION_ID],
            text_body("reason", False),
            ("202", asked, "Asked for; GET the invocation to see it end cancelled"),
            "The invocation has finished",
        ),
    )
    published = {
        "type": "object",
        "properties": {
            "invocation_id": {"type": "string"},
            "query": {"type": "string"},
            "value": {},
        },
        "required": ["invocation_id", "query", "value"],
    }
    _add(
        paths,
        "/invocations/{invocation_id}/queries/{name}",
        _read(
            "The latest value the invocation published with ctx.publish(name, ...)",
            "query_invocation",
            published,
            parameters=[_INVOCATION_ID, name],
        ),
    )
