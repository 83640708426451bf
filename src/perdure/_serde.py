"""Encoding of journal payloads: JSON via msgspec, never pickle.

Values of JSON types, dataclasses, msgspec Structs and pydantic models are
supported. A top-level dataclass, Struct or pydantic model is recorded with a
type tag (``module:qualname``) so that it comes back as the same type on
replay; a function's return annotation, when present, restores nested types
(``list[Charge]``, ``datetime``, ``Decimal``) as well.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import math
import sys
import traceback
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from ._errors import PayloadTooLargeError, SerializationError, StepFailedError

_SCALARS = (type(None), bool, int, float, str)
_TRACEBACK_LIMIT = 8192


def _enc_hook(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:  # pydantic v2 model
        return dump(mode="json")
    raise TypeError(f"objects of type {type(value).__qualname__} are not serializable")


def _dec_hook(tp: Any, obj: Any) -> Any:
    validate = getattr(tp, "model_validate", None)
    if validate is not None:
        return validate(obj)
    raise NotImplementedError(f"cannot decode into {tp!r}")


def type_tag(value: Any) -> str | None:
    """The tag that restores ``value``'s own type, or None for plain JSON."""
    tp = type(value)
    if tp in _SCALARS or tp is list or tp is dict:
        return None
    if _is_record_type(tp):
        return f"{tp.__module__}:{tp.__qualname__}"
    return None


def _is_record_type(tp: Any) -> bool:
    return isinstance(tp, type) and (
        dataclasses.is_dataclass(tp)
        or issubclass(tp, msgspec.Struct)
        or hasattr(tp, "model_validate")
    )


def resolve_name(tag: str) -> Any:
    """Import ``module:qualname`` and return the object it names."""
    module_name, _, qualname = tag.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """``inspect.iscoroutinefunction``, cached: it is asked once per step."""
    try:
        return _cached_is_coroutine_function(fn)
    except TypeError:  # unhashable callable
        return inspect.iscoroutinefunction(fn)


_cached_is_coroutine_function = functools.lru_cache(maxsize=4096)(inspect.iscoroutinefunction)


def return_hint(fn: Callable[..., Any]) -> Any:
    """The return annotation of ``fn`` resolved to a type, or None."""
    try:
        return _cached_return_hint(fn)
    except TypeError:  # unhashable callable
        return _return_hint(fn)


def _return_hint(fn: Callable[..., Any]) -> Any:
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:
        return None
    if hint is None or hint is type(None) or hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin is not None and getattr(origin, "__name__", "") in {"Coroutine", "Awaitable"}:
        args = typing.get_args(hint)
        hint = args[-1] if args else None
    return hint


_cached_return_hint = functools.lru_cache(maxsize=4096)(_return_hint)


class Codec:
    """Encodes and decodes journal payloads, enforcing a size limit."""

    def __init__(self, *, max_payload_bytes: int) -> None:
        self.max_payload_bytes = max_payload_bytes
        self._encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
        self._sorted_encoder = msgspec.json.Encoder(enc_hook=_enc_hook, order="sorted")
        self._decoder = msgspec.json.Decoder()

    def encode(self, value: Any, what: str) -> tuple[bytes, str | None]:
        """Encode ``value``; ``what`` names it in error messages."""
        try:
            data = self._encoder.encode(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"{what}: the value cannot be serialized ({exc}). Return JSON types, "
                "dataclasses, msgspec Structs or pydantic models."
            ) from None
        self._check_size(data, what)
        return data, type_tag(value)

    def encode_input(self, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> bytes:
        try:
            data = self._sorted_encoder.encode({"args": args, "kwargs": kwargs})
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"{what}: the input cannot be serialized ({exc}). Pass JSON types, "
                "dataclasses, msgspec Structs or pydantic models."
            ) from None
        self._check_size(data, what)
        return data

    def _check_size(self, data: bytes, what: str) -> None:
        if len(data) > self.max_payload_bytes:
            raise PayloadTooLargeError(
                f"{what}: the serialized value is {len(data):,} bytes, over the "
                f"limit of {self.max_payload_bytes:,} bytes. Store large data "
                "elsewhere and journal a reference, or raise max_payload_bytes."
            )

    def decode(self, data: bytes, tag: str | None, hint: Any = None) -> Any:
        """Decode a payload. Raises ``ValueError`` or ``TypeError`` on bad data."""
        obj = self._decoder.decode(data)
        target = hint
        if tag is not None and (hint is None or not _is_record_type(hint)):
            target = resolve_name(tag)
            if not _is_record_type(target):
                raise TypeError(f"type tag {tag!r} does not name a record type")
        if target is None:
            return obj
        return convert(obj, target)

    def roundtrip(self, value: Any, data: bytes, tag: str | None, hint: Any, what: str) -> Any:
        """What replay will return for ``value``, so that live and replay agree.

        Refuses a value that would come back as another type (a set, bytes or
        a tuple without a return annotation, a float that is not finite).
        """
        tp = type(value)
        if tp in _SCALARS and (tp is not float or math.isfinite(value)):
            return value
        try:
            back = self.decode(data, tag, hint)
        except (ValueError, TypeError, AttributeError, ImportError) as exc:
            raise SerializationError(
                f"{what}: the {tp.__qualname__} value serializes but cannot be read "
                f"back ({exc}); give the function an accurate return annotation"
            ) from None
        if hint is None and type(back) is not tp:
            raise SerializationError(
                f"{what}: a {tp.__qualname__} value would come back from the journal as "
                f"a {type(back).__qualname__} ({back!r:.80}); annotate the function's "
                f"return type (e.g. '-> {tp.__qualname__}') or return a JSON type"
            )
        return back

    def decode_input(
        self, data: bytes, hints: dict[str, Any], params: list[str]
    ) -> tuple[list[Any], dict[str, Any]]:
        raw = self._decoder.decode(data)
        args = [
            convert(a, hints[params[i]]) if i < len(params) and params[i] in hints else a
            for i, a in enumerate(raw["args"])
        ]
        kwargs = {k: convert(v, hints[k]) if k in hints else v for k, v in raw["kwargs"].items()}
        return args, kwargs

    # -- errors ---------------------------------------------------------------

    def encode_error(self, exc: BaseException) -> bytes:
        tp = type(exc)
        args: list[Any]
        try:
            self._encoder.encode(list(exc.args))
            args = list(exc.args)
        except (TypeError, ValueError, OverflowError):
            args = [str(exc)]
        tb = "".join(traceback.format_exception(exc))[-_TRACEBACK_LIMIT:]
        record = {
            "type": f"{tp.__module__}:{tp.__qualname__}",
            "message": str(exc),
            "args": args,
            "traceback": tb,
        }
        data = self._encoder.encode(record)
        if len(data) > self.max_payload_bytes:
            record["args"] = [str(exc)[:1024]]
            record["message"] = str(exc)[:1024]
            record["traceback"] = ""
            data = self._encoder.encode(record)
        return data

    def decode_error(self, data: bytes) -> Exception:
        record = self._decoder.decode(data)
        return rebuild_error(record["type"], record["message"], record.get("args", []))

    def error_summary(self, data: bytes) -> dict[str, Any]:
        record: dict[str, Any] = self._decoder.decode(data)
        return record


def rebuild_error(type_name: str, message: str, args: list[Any]) -> Exception:
    """Re-create a recorded exception: same type, same message."""
    try:
        cls = resolve_name(type_name)
    except Exception:
        return StepFailedError(type_name, message)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return StepFailedError(type_name, message)
    try:
        exc = cls(*args)
        if str(exc) == message:
            return exc
    except Exception:
        pass
    exc = cls.__new__(cls)
    exc.args = tuple(args) if args else (message,)
    return exc


def convert(obj: Any, hint: Any) -> Any:
    if hint is Any or hint is None:
        return obj
    validate = getattr(hint, "model_validate", None)
    if validate is not None:
        return validate(obj)
    return msgspec.convert(obj, hint, strict=False, dec_hook=_dec_hook)


def input_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
