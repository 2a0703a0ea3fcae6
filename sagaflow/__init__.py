"""sagaflow: durable sagas (process managers) for asyncio and trio.

Write a saga as a plain class with `@on` handlers and a `@correlate` key function,
register it in a `Registry`, and run it with a `Runtime` on a store.
"""

from ._actions import CommandFailed, Compensate, Complete, Schedule, Send, Unschedule
from ._clock import SystemClock
from ._decorators import correlate, on
from ._outbox import DispatchMeta
from ._registry import Registry
from ._retry import RetryPolicy
from ._runtime import Runtime, Statistics
from ._shard import Unmatched

__all__ = [
    "CommandFailed",
    "Compensate",
    "Complete",
    "DispatchMeta",
    "Registry",
    "RetryPolicy",
    "Runtime",
    "Schedule",
    "Send",
    "Statistics",
    "SystemClock",
    "Unmatched",
    "Unschedule",
    "correlate",
    "on",
]
