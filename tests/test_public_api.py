"""The public surface, pinned: a change here is an API change and needs a CHANGELOG entry."""

from __future__ import annotations

import pytest

import perdure
import perdure.storage
import perdure.testing

PERDURE_ALL = [
    "Actor",
    "ActorRef",
    "Cancelled",
    "ChildHandle",
    "Client",
    "ConfigurationError",
    "ConflictError",
    "Context",
    "DurabilityFacet",
    "DurableFuture",
    "DurablePromise",
    "FencedError",
    "ForkResult",
    "ForkStoppedError",
    "IdempotencyConflictError",
    "InvocationCancelledError",
    "InvocationFailedError",
    "InvocationHandle",
    "InvocationStoppedError",
    "JournalDecodeError",
    "NodeConfig",
    "NonDeterminismError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PerdureError",
    "RetryPolicy",
    "Runtime",
    "RuntimeLockedError",
    "RuntimeStats",
    "Saga",
    "Schedule",
    "SerializationError",
    "SignalWait",
    "Status",
    "StepFailedError",
    "StepInfo",
    "StorageError",
    "StorageFullError",
    "SyncHandle",
    "SyncRuntime",
    "TerminalError",
    "Timer",
    "UnknownWorkflowError",
    "Workflow",
    "current_context",
    "current_step",
    "workflow",
]

STORAGE_ALL = [
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
    "UNFINISHED",
    "Wake",
    "Write",
    "open_store",
]

TESTING_ALL = [
    "CrashPoint",
    "CrashReport",
    "FakeClock",
    "Hooks",
    "SimulatedCrash",
    "StepInfo",
    "crash_at_every_point",
    "runtime",
]

# The exception tree documented in perdure/_errors.py.
ERROR_BASES = {
    "PerdureError": Exception,
    "ConfigurationError": perdure.PerdureError,
    "NotFoundError": perdure.PerdureError,
    "UnknownWorkflowError": perdure.NotFoundError,
    "ConflictError": perdure.PerdureError,
    "IdempotencyConflictError": perdure.ConflictError,
    "RuntimeLockedError": perdure.ConflictError,
    "FencedError": perdure.ConflictError,
    "NonDeterminismError": perdure.PerdureError,
    "SerializationError": perdure.PerdureError,
    "PayloadTooLargeError": perdure.SerializationError,
    "JournalDecodeError": perdure.SerializationError,
    "StorageError": perdure.PerdureError,
    "StorageFullError": perdure.StorageError,
    "InvocationFailedError": perdure.PerdureError,
    "InvocationCancelledError": perdure.InvocationFailedError,
    "InvocationStoppedError": perdure.PerdureError,
    "ForkStoppedError": perdure.PerdureError,
    "TerminalError": Exception,
    "StepFailedError": Exception,
    "Cancelled": BaseException,
}


@pytest.mark.parametrize(
    ("module", "expected"),
    [(perdure, PERDURE_ALL), (perdure.storage, STORAGE_ALL), (perdure.testing, TESTING_ALL)],
    ids=["perdure", "perdure.storage", "perdure.testing"],
)
def test_all_is_pinned_and_resolves(module: object, expected: list[str]) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert sorted(names) == sorted(expected)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(module, name) is not None, name


def test_star_import_exports_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from perdure import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(PERDURE_ALL)


def test_shared_names_are_the_same_objects() -> None:
    assert perdure.Status is perdure.storage.Status
    assert perdure.StepInfo is perdure.testing.StepInfo
    assert isinstance(perdure.__version__, str)


@pytest.mark.parametrize("name", sorted(ERROR_BASES))
def test_error_hierarchy(name: str) -> None:
    cls = getattr(perdure, name)
    assert cls.__bases__ == (ERROR_BASES[name],)


def test_every_public_error_is_in_the_pinned_tree() -> None:
    errors = {
        name
        for name in PERDURE_ALL
        if isinstance(getattr(perdure, name), type)
        and issubclass(getattr(perdure, name), BaseException)
    }
    assert errors == set(ERROR_BASES)


def test_user_facing_signals_are_catchable_exceptions() -> None:
    # TerminalError is raised by user code and must be catchable as Exception;
    # it is deliberately not a PerdureError.
    assert not issubclass(perdure.TerminalError, perdure.PerdureError)
    assert issubclass(perdure.TerminalError, Exception)
