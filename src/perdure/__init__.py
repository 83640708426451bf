"""Perdure: durable execution for Python workflows and actors.

>>> import perdure
>>> @perdure.workflow
... async def process_payment(ctx, request):
...     charge = await ctx.run("charge", provider.charge, request,
...                            idempotency_key=request["id"])
...     return charge
"""

from __future__ import annotations

from ._actor import Actor as Actor
from ._actor import DurabilityFacet as DurabilityFacet
from ._client import ActorRef as ActorRef
from ._client import Client as Client
from ._client import InvocationHandle as InvocationHandle
from ._context import Context as Context
from ._context import current_context as current_context
from ._context import current_step as current_step
from ._durable import ChildHandle as ChildHandle
from ._durable import DurableFuture as DurableFuture
from ._durable import DurablePromise as DurablePromise
from ._durable import SignalWait as SignalWait
from ._durable import Timer as Timer
from ._errors import Cancelled as Cancelled
from ._errors import ConfigurationError as ConfigurationError
from ._errors import ConflictError as ConflictError
from ._errors import FencedError as FencedError
from ._errors import ForkStoppedError as ForkStoppedError
from ._errors import IdempotencyConflictError as IdempotencyConflictError
from ._errors import InvocationCancelledError as InvocationCancelledError
from ._errors import InvocationFailedError as InvocationFailedError
from ._errors import InvocationStoppedError as InvocationStoppedError
from ._errors import JournalDecodeError as JournalDecodeError
from ._errors import NonDeterminismError as NonDeterminismError
from ._errors import NotFoundError as NotFoundError
from ._errors import PayloadTooLargeError as PayloadTooLargeError
from ._errors import PerdureError as PerdureError
from ._errors import RuntimeLockedError as RuntimeLockedError
from ._errors import SerializationError as SerializationError
from ._errors import StepFailedError as StepFailedError
from ._errors import StorageError as StorageError
from ._errors import StorageFullError as StorageFullError
from ._errors import TerminalError as TerminalError
from ._errors import UnknownWorkflowError as UnknownWorkflowError
from ._fork import ForkResult as ForkResult
from ._hooks import StepInfo as StepInfo
from ._nodes import NodeConfig as NodeConfig
from ._retry import RetryPolicy as RetryPolicy
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStats as RuntimeStats
from ._saga import Saga as Saga
from ._schedule import Schedule as Schedule
from ._sync import SyncHandle as SyncHandle
from ._sync import SyncRuntime as SyncRuntime
from ._workflow import Workflow as Workflow
from ._workflow import workflow as workflow
from .storage import Status as Status

__version__ = "0.1.0"

__all__ = [
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
