"""`@on` and `@correlate`: decorators that only mark methods; the `Registry` collects them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

import attrs

from ._retry import RetryPolicy

__all__ = ["CorrelateMark", "HandlerMark", "correlate", "on"]

F = TypeVar("F", bound=Callable[..., Any])

HANDLER_ATTR = "__sagaflow_on__"
CORRELATE_ATTR = "__sagaflow_correlate__"


@attrs.frozen
class HandlerMark:
    """What `@on` recorded on a method."""

    types: tuple[type, ...]
    start: bool
    internal: bool
    retry: RetryPolicy | None = None


@attrs.frozen
class CorrelateMark:
    """What `@correlate` recorded on a method; empty `types` means every handled type."""

    types: tuple[type, ...]


def on(
    *types: type,
    start: bool = False,
    internal: bool = False,
    retry: RetryPolicy | None = None,
) -> Callable[[F], F]:
    """Mark a saga method as the handler of one or more event types.

    The method is called as `handler(self, state, event)`, may be sync or async, mutates
    `state` in place, and returns `None`, one action or an iterable of actions.

    Args:
        *types: The event types handled; subclasses are handled too.
        start: Only handlers with `start=True` may create an instance for a new key.
        internal: The handler only receives messages the runtime routes to the instance
            itself (`Schedule(..., to_self=True)`), so it needs no correlate function and
            published events of these types are not routed to it.
        retry: How often to try the handler when it raises, instead of the runtime's
            policy.

    Returns:
        A decorator that returns the method unchanged.
    """
    if not types:
        raise TypeError("@on() needs at least one event type, e.g. @on(OrderPlaced)")
    for t in types:
        if not isinstance(t, type):
            raise TypeError(f"@on() takes event classes, got {t!r}")
    mark = HandlerMark(types=types, start=start, internal=internal, retry=retry)

    def decorate(fn: F) -> F:
        marks: tuple[HandlerMark, ...] = getattr(fn, HANDLER_ATTR, ())
        setattr(fn, HANDLER_ATTR, (*marks, mark))
        return fn

    return decorate


@overload
def correlate(*types: type) -> Callable[[F], F]: ...
@overload
def correlate(fn: F, /) -> F: ...
def correlate(*args: Any) -> Any:
    """Mark a saga method as the function that maps an event to an instance key.

    Bare (`@correlate`) it applies to every event type the saga handles; called
    (`@correlate(A, B)`) to those types only. It is called as `fn(self, event)` and
    returns the key (`str`) or `None` when the event is not for this saga.
    """
    if len(args) == 1 and callable(args[0]) and not isinstance(args[0], type):
        setattr(args[0], CORRELATE_ATTR, CorrelateMark(types=()))
        return args[0]
    for t in args:
        if not isinstance(t, type):
            raise TypeError(f"@correlate() takes event classes, got {t!r}")
    mark = CorrelateMark(types=tuple(args))

    def decorate(fn: F) -> F:
        setattr(fn, CORRELATE_ATTR, mark)
        return fn

    return decorate
