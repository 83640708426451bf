"""JSON views of invocations, journal entries and errors.

The HTTP ingress and the CLI show the same things in the same shape; this
module builds that shape from the public client's records. It needs nothing
beyond msgspec, so the CLI can use it without the ``server`` extra.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgspec

from ._errors import InvocationFailedError, StepFailedError
from .storage._records import EntryKind, InvocationRecord, JournalEntry


def _enc_hook(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:  # a pydantic v2 model
        return dump(mode="json")
    raise TypeError(f"objects of type {type(value).__qualname__} are not serializable")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def dumps(value: Any) -> bytes:
    """``value`` as JSON: JSON types, dataclasses, Structs, pydantic models."""
    return _encoder.encode(value)


def dumps_pretty(value: Any) -> str:
    """``value`` as indented JSON, for people."""
    return msgspec.json.format(dumps(value), indent=2).decode()


def timestamp(seconds: float) -> str:
    """Seconds since the epoch as an ISO 8601 UTC time, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_view(exc: BaseException) -> dict[str, str]:
    """What a caller may see of an error: its type's name and its message.

    Never its traceback: that stays in the journal and the server's log.
    """
    if isinstance(exc, InvocationFailedError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, StepFailedError):
        return {"type": exc.type_name.rpartition(":")[2], "message": exc.message}
    return {"type": type(exc).__qualname__, "message": str(exc)}


def record_view(rec: InvocationRecord) -> dict[str, Any]:
    """An invocation's record: what it runs, where it is, when.

    A suspended invocation shows when it wakes (``wake_at``; None: when a
    promise, a signal, a child or a cancellation wakes it); ``deadline`` is
    when it is cancelled if it has not finished by then; ``cancel_reason``
    is the reason given when its cancellation was asked for (None if never).
    """
    actor = None
    if rec.actor_type is not None:
        actor = {"type": rec.actor_type, "key": rec.actor_key, "seq": rec.actor_seq}
    return {
        "invocation_id": rec.id,
        "target": rec.target,
        "status": rec.status.value,
        "idempotency_key": rec.idempotency_key,
        "created_at": timestamp(rec.created_at),
        "updated_at": timestamp(rec.updated_at),
        "actor": actor,
        "parent_id": rec.parent_id,
        "wake_at": None if rec.wake_at is None else timestamp(rec.wake_at),
        "deadline": None if rec.deadline is None else timestamp(rec.deadline),
        "cancel_reason": rec.cancel_reason,
    }


def _payload(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None


def entry_view(entry: JournalEntry, *, traceback: bool = False) -> dict[str, Any]:
    """One journal entry with its payload as JSON.

    A recorded error shows its type and message; its traceback only with
    ``traceback=True`` (the CLI, for the operator; never over HTTP).
    """
    view: dict[str, Any] = {
        "index": entry.index,
        "kind": entry.kind.value,
        "name": entry.name,
        "ok": entry.ok,
        "attempts": entry.attempts,
        "created_at": timestamp(entry.created_at),
    }
    payload = _payload(entry.payload)
    if entry.ok:
        view["value"] = payload
        view["type_tag"] = entry.type_tag
    else:
        view["error"] = recorded_error_view(payload, traceback=traceback)
    return view


def recorded_error_view(record: Any, *, traceback: bool = False) -> dict[str, Any]:
    """The view of an error as the journal records it (``Codec.encode_error``)."""
    if not isinstance(record, dict):
        return {"type": "unknown", "message": "the recorded error cannot be read"}
    view: dict[str, Any] = {
        "type": str(record.get("type", "")).rpartition(":")[2] or "unknown",
        "message": str(record.get("message", "")),
    }
    if traceback:
        view["traceback"] = record.get("traceback", "")
    return view


def outcome_view(journal: list[JournalEntry], *, traceback: bool = False) -> dict[str, Any]:
    """``{"result": ...}`` or ``{"error": ...}`` from a finished journal's output."""
    output = journal[-1] if journal and journal[-1].kind is EntryKind.OUTPUT else None
    if output is None:
        return {}
    payload = _payload(output.payload)
    if output.ok:
        return {"result": payload}
    return {"error": recorded_error_view(payload, traceback=traceback)}
