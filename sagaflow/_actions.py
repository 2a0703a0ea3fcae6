"""The values a handler returns, and the event the runtime sends when a command fails."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any, Generic, TypeAlias, TypeVar

import attrs

__all__ = [
    "Action",
    "Associate",
    "HandlerResult",
    "CommandFailed",
    "Dissociate",
    "Compensate",
    "Complete",
    "Schedule",
    "Send",
    "Unschedule",
]

T = TypeVar("T")


def _to_seconds(after: timedelta | float) -> float:
    seconds = after.total_seconds() if type(after) is timedelta else _seconds(after)
    if not seconds >= 0:
        raise ValueError(f"Schedule(after={after!r}) must not be negative")
    return seconds


def _seconds(after: timedelta | float) -> float:
    return after.total_seconds() if isinstance(after, timedelta) else float(after)


@attrs.frozen
class Send(Generic[T]):
    """Dispatch `command` once the state change that returned this is durable.

    Commands of one instance are dispatched in the order they were produced.
    """

    command: T


@attrs.frozen
class Schedule(Generic[T]):
    """Deliver `message` after a delay; durable across restarts.

    Args:
        message: The command to dispatch when due or, with `to_self=True`, the event to
            deliver back to this instance.
        after: A `timedelta` or a number of seconds, not negative.
        name: Scheduling a name that is already pending replaces it; `Unschedule(name)`
            cancels it. Unnamed schedules cannot be cancelled one by one.
        to_self: Deliver the message to this same instance as an event instead of
            dispatching it.
    """

    message: T
    after: float = attrs.field(kw_only=True, converter=_to_seconds)
    name: str | None = attrs.field(default=None, kw_only=True)
    to_self: bool = attrs.field(default=False, kw_only=True)


@attrs.frozen
class Unschedule:
    """Cancel this instance's pending schedule called `name` (no error if none is pending)."""

    name: str


def _to_tuple(commands: Iterable[object]) -> tuple[object, ...]:
    return tuple(commands)


@attrs.frozen
class Compensate:
    """Dispatch `commands` strictly in order, each only after the previous one succeeded.

    Each command has its own retry budget. One that fails for good stops the chain and
    leaves the instance in the "compensation failed" status for an operator.
    """

    commands: tuple[object, ...] = attrs.field(converter=_to_tuple)


@attrs.frozen
class Complete:
    """End the instance: its schedules are dropped, then its state is deleted once its
    outstanding commands have been dispatched."""


@attrs.frozen
class Associate:
    """Make this instance reachable through the association `name` = `value`.

    An event whose saga declares `@correlate(EventType, via=name)` is looked up among
    the associations of that name: it reaches every instance associated with the value
    its correlate function returns (fan-out). Committed with the state change that
    returned it; associating a pair the instance has already is a no-op. An instance's
    associations go with it when it ends.

    Attributes:
        name: The association's name, as in `@correlate(..., via=name)`.
        value: The value looked up: a `str` (convert ids yourself, e.g. `str(n)`, so
            that the correlate function returns the same text).
    """

    name: str
    value: str


@attrs.frozen
class Dissociate:
    """Remove the association `name` = `value` from this instance (a no-op if absent).

    Committed with the state change that returned it. See `Associate`.
    """

    name: str
    value: str


@attrs.frozen
class CommandFailed(Generic[T]):
    """Delivered to an instance when a command it sent failed for good.

    Attributes:
        command: The command that failed.
        error: The last error, as `"ExceptionType: message"` (a string, so it survives
            a restart).
        attempts: How many times it was tried.
    """

    command: T
    error: str
    attempts: int


Action: TypeAlias = (
    "Send[Any] | Schedule[Any] | Unschedule | Compensate | Complete | Associate | Dissociate"
)
"""One action a handler can return (`Send` and `Schedule` of any message type)."""

HandlerResult: TypeAlias = "Action | Iterable[Action] | None"
"""What a handler returns: nothing, one action, or an iterable of actions."""
