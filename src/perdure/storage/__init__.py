"""What storage backend authors need: the contract, its records, the backends.

Open a store from a URL with :func:`open_store`:

- ``memory://`` — in memory, for tests;
- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` — one file.
  Query options: ``synchronous=full|normal|off`` (default ``full``).
- ``postgresql://user:password@host:port/db?schema=NAME`` (or ``postgres://``)
  — a PostgreSQL database, every table in the schema ``NAME`` (default
  ``public``; created if missing). Other query options go to libpq. Needs
  ``pip install 'perdure[postgres]'``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .._errors import ConfigurationError
from ._base import AfterCommit as AfterCommit
from ._base import BeforeCommit as BeforeCommit
from ._base import Store as Store
from ._memory import MemoryStore as MemoryStore
from ._postgres import PostgresStore as PostgresStore
from ._records import UNFINISHED as UNFINISHED
from ._records import Attempt as Attempt
from ._records import CancelRequest as CancelRequest
from ._records import Checkpoint as Checkpoint
from ._records import EntryKind as EntryKind
from ._records import Fence as Fence
from ._records import IdempotentResult as IdempotentResult
from ._records import InvocationRecord as InvocationRecord
from ._records import JournalEntry as JournalEntry
from ._records import Lease as Lease
from ._records import PromiseRecord as PromiseRecord
from ._records import Resolution as Resolution
from ._records import SignalRecord as SignalRecord
from ._records import Status as Status
from ._records import StatusChange as StatusChange
from ._records import Wake as Wake
from ._records import Write as Write
from ._sqlite import SQLiteStore as SQLiteStore

__all__ = [
    "UNFINISHED",
    "AfterCommit",
    "Attempt",
    "BeforeCommit",
    "CancelRequest",
    "Checkpoint",
    "EntryKind",
    "Fence",
    "IdempotentResult",
    "InvocationRecord",
    "JournalEntry",
    "Lease",
    "MemoryStore",
    "PostgresStore",
    "PromiseRecord",
    "Resolution",
    "SQLiteStore",
    "SignalRecord",
    "Status",
    "StatusChange",
    "Store",
    "Wake",
    "Write",
    "open_store",
]

DEFAULT_URL = "sqlite:///perdure.db"


def open_store(
    url: str = DEFAULT_URL,
    *,
    exclusive: bool = False,
    before_commit: BeforeCommit | None = None,
    after_commit: AfterCommit | None = None,
) -> Store:
    """Build the store a URL names (not yet opened: ``await store.open()``)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"the store URL must be a string, not {type(url).__name__}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryStore(before_commit=before_commit)
    if scheme == "sqlite":
        # sqlite:///rel.db -> "rel.db"; sqlite:////abs.db -> "/abs.db"
        if parts.netloc:
            raise ConfigurationError(
                f"store URL {url!r}: a SQLite URL has no host; write sqlite:///relative.db "
                "or sqlite:////absolute/path.db"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError(f"store URL {url!r} names no file; e.g. sqlite:///perdure.db")
        options: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key != "synchronous":
                raise ConfigurationError(
                    f"store URL {url!r}: unknown option {key!r}; known: synchronous"
                )
            options[key] = value.lower()
        return SQLiteStore(
            path,
            exclusive=exclusive,
            before_commit=before_commit,
            after_commit=after_commit,
            **options,
        )
    if scheme in {"postgres", "postgresql"}:
        return PostgresStore.from_url(url, exclusive=exclusive, before_commit=before_commit)
    raise ConfigurationError(
        f"store URL {url!r}: unknown scheme {parts.scheme!r}; use sqlite:///path.db, "
        "postgresql://host/db or memory://"
    )
