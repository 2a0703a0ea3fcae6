"""sagaflow: durable sagas (process managers) for asyncio and trio.

Write a saga as a plain class with `@on` handlers and a `@correlate` key function,
register it in a `Registry`, and run it with a `Runtime` on a store.
"""

from importlib.metadata import PackageNotFoundError, version

from ._actions import (
    Associate,
    CommandFailed,
    Compensate,
    Complete,
    Dissociate,
    Schedule,
    Send,
    Unschedule,
)
from ._admin import Admin, InstanceInfo, SagaState, StatePage
from ._check import CheckFailure, CheckGroup, CheckReport
from ._clock import SystemClock
from ._decorators import correlate, on
from ._evolution import upcast
from ._hooks import Hooks
from ._records import Consumed, DispatchMeta, Outcome, Unmatched
from ._registry import Registry
from ._retry import RetryPolicy
from ._runtime import Runtime, Statistics

try:
    __version__: str = version("sagaflow")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
"""The installed distribution's version (from its metadata), e.g. `"0.1.0"`."""

__all__ = [
    "Admin",
    "Associate",
    "CheckFailure",
    "CheckGroup",
    "CheckReport",
    "CommandFailed",
    "Compensate",
    "Complete",
    "Consumed",
    "DispatchMeta",
    "Dissociate",
    "Hooks",
    "InstanceInfo",
    "Outcome",
    "Registry",
    "RetryPolicy",
    "Runtime",
    "SagaState",
    "Schedule",
    "Send",
    "StatePage",
    "Statistics",
    "SystemClock",
    "Unmatched",
    "Unschedule",
    "correlate",
    "on",
    "upcast",
]
