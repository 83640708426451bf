"""Perdure's exceptions.

Every error Perdure raises derives from one root::

    PerdureError
    ├── ConfigurationError          bad store URL, bad option, bad registration
    ├── NotFoundError               unknown invocation or workflow
    │   └── UnknownWorkflowError
    ├── ConflictError
    │   ├── IdempotencyConflictError   same key, different input
    │   ├── RuntimeLockedError         another runtime owns this store
    │   └── FencedError                this node lost the partition's lease
    ├── NonDeterminismError         replayed code diverged from its journal
    ├── SerializationError          a value cannot be encoded or decoded
    │   ├── PayloadTooLargeError
    │   └── JournalDecodeError      a stored journal row cannot be read back
    ├── StorageError                the backend failed (driver errors mapped here)
    │   └── StorageFullError
    ├── ForkStoppedError            a dry-run fork reached a step it would run live
    ├── InvocationFailedError       the invocation ended with an error (``__cause__``)
    │   └── InvocationCancelledError   it was cancelled (or timed out)
    └── InvocationStoppedError      it stopped unfinished here; resumes on the next start

User code raises :class:`TerminalError` from a step or a workflow to say
"do not retry". It is an ordinary ``Exception`` so that it can be caught.

Control-flow signals that interrupt user code derive from ``BaseException``
so that an ``except Exception`` in a workflow cannot swallow them:
:class:`Cancelled` (raised inside a cancelled workflow at its next durable
point; ``finally`` blocks and compensations run) and the runtime's own
``Suspended`` and ``Parked``.
"""

from __future__ import annotations


class PerdureError(Exception):
    """Root of every error Perdure raises."""


class ConfigurationError(PerdureError):
    """Perdure was set up wrongly: a bad store URL, option or registration."""


class NotFoundError(PerdureError):
    """The named invocation, workflow or record does not exist."""


class UnknownWorkflowError(NotFoundError):
    """No workflow with this name is registered with the runtime."""


class ConflictError(PerdureError):
    """The request conflicts with something already recorded."""


class IdempotencyConflictError(ConflictError):
    """An idempotency key was reused with a different input."""


class RuntimeLockedError(ConflictError):
    """Another runtime process already owns this store."""


class FencedError(ConflictError):
    """A write of a node that no longer holds its partition's lease.

    Another node took the partition over (the lease expired while this node
    was paused or cut off); this node's write is refused and it stops working
    on the partition. The new owner resumes the work from the journal.
    """

    def __init__(self, partition: int, epoch: int, current: int | None) -> None:
        self.partition = partition
        self.epoch = epoch
        self.current = current
        held = "nobody holds it" if current is None else f"its epoch is now {current}"
        super().__init__(
            f"partition {partition}: this node's lease (epoch {epoch}) was taken over "
            f"({held}); the write is refused and the new owner resumes the work"
        )


class NonDeterminismError(PerdureError):
    """Replayed workflow code asked for something other than its journal holds.

    The invocation is left unfinished, so that it resumes once the code that
    wrote its journal (or a compatible version) is deployed again.
    """

    def __init__(
        self,
        invocation_id: str,
        index: int,
        expected: str,
        actual: str,
    ) -> None:
        self.invocation_id = invocation_id
        self.index = index
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"invocation {invocation_id}: journal entry {index} is {expected}, "
            f"but the workflow code now asks for {actual}. The code changed under "
            "an in-flight invocation: deploy the previous version until it "
            "finishes, or cancel it."
        )


class SerializationError(PerdureError):
    """A value could not be encoded for the journal, or decoded from it."""


class PayloadTooLargeError(SerializationError):
    """An encoded payload is larger than the configured limit."""


class JournalDecodeError(SerializationError):
    """A stored journal entry could not be decoded."""

    def __init__(self, invocation_id: str, index: int, reason: str) -> None:
        self.invocation_id = invocation_id
        self.index = index
        super().__init__(
            f"invocation {invocation_id}: journal entry {index} cannot be "
            f"decoded: {reason}. The invocation is left unfinished; fix the "
            "type it names (or restore the code that wrote it) and restart."
        )


class StorageError(PerdureError):
    """The storage backend failed. Nothing half-written is kept."""


class StorageFullError(StorageError):
    """The storage backend has no space left."""


class InvocationFailedError(PerdureError):
    """The invocation finished with an error; ``__cause__`` holds it."""

    # Defaults for an instance rebuilt from a journal, which has only its message.
    invocation_id = ""
    target = ""
    cause: BaseException | None = None

    def __init__(self, invocation_id: str, target: str, cause: BaseException) -> None:
        self.invocation_id = invocation_id
        self.target = target
        self.cause = cause
        super().__init__(
            f"invocation {invocation_id} of {target!r} failed: {type(cause).__name__}: {cause}"
        )
        self.__cause__ = cause


class InvocationCancelledError(InvocationFailedError):
    """The invocation was cancelled, or its deadline passed, before it finished."""

    def __init__(self, invocation_id: str, target: str, reason: str) -> None:
        self.reason = reason
        PerdureError.__init__(self, f"invocation {invocation_id} of {target!r} was {reason}")
        self.invocation_id = invocation_id
        self.target = target
        self.cause = None


class InvocationStoppedError(PerdureError):
    """The invocation stopped unfinished in this process and will not progress
    until a runtime starts on its store again (``__cause__`` says why: the
    runtime stopped, the code is non-deterministic, the storage failed)."""

    def __init__(self, invocation_id: str, reason: BaseException | None) -> None:
        self.invocation_id = invocation_id
        self.reason = reason
        why = "the runtime stopped" if reason is None else f"{type(reason).__name__}: {reason}"
        super().__init__(
            f"invocation {invocation_id} stopped unfinished ({why}); it resumes from its "
            "journal when a runtime starts on this store again"
        )
        self.__cause__ = reason


class ForkStoppedError(PerdureError):
    """A dry-run fork reached a step that is not in the journal prefix."""

    def __init__(self, invocation_id: str, index: int, name: str) -> None:
        self.index = index
        self.step = name
        super().__init__(
            f"fork of {invocation_id} stopped before step {name!r} (journal index {index}): "
            "it would run live; fork with live=True to run it in the sandbox"
        )


class TerminalError(Exception):
    """Raise from a step or workflow to fail it at once, without retrying."""


class StepFailedError(Exception):
    """Stands in for a recorded step error whose type cannot be rebuilt.

    The original type's qualified name is in ``type_name``.
    """

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        self.message = message
        super().__init__(f"{type_name}: {message}")


class Suspended(BaseException):
    """Raised inside user code to stop an invocation without finishing it.

    The runtime catches it; the invocation stays unfinished and resumes from
    its journal later. User code must not catch it.
    """

    def __init__(self, reason: BaseException) -> None:
        self.reason = reason
        super().__init__(str(reason))


class Cancelled(BaseException):
    """Raised inside a workflow at its next durable point once it is cancelled
    (``timeout`` True: its deadline passed).

    It derives from ``BaseException`` so that ``except Exception`` does not
    swallow it; ``finally`` blocks and compensations run, and may use ``ctx``.
    If it propagates out of the workflow, the invocation ends cancelled.
    """

    def __init__(self, reason: str = "cancelled", *, timeout: bool = False) -> None:
        self.reason = reason
        self.timeout = timeout
        super().__init__(reason)


class Parked(BaseException):
    """Raised inside user code to suspend an invocation that waits durably.

    The runtime records it as suspended, to resume at ``wake_at`` (None: when
    woken by a promise, a signal, a child or a cancellation) by replaying its
    journal. Its task and memory are released meanwhile.
    """

    def __init__(self, wake_at: float | None) -> None:
        self.wake_at = wake_at
        super().__init__("parked")
