"""`@on` and `@correlate`: decorators that only mark methods; the `Registry` collects them."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeAlias, TypeVar, overload

import attrs

from ._actions import HandlerResult
from ._retry import RetryPolicy

__all__ = ["CorrelateMark", "HandlerDecorator", "HandlerMark", "correlate", "on"]

Key: TypeAlias = "str | None"
"""What a correlate function returns: the instance key, or `None` for "not for this saga"."""

F = TypeVar("F", bound=Callable[..., Any])
CorrelateT = TypeVar("CorrelateT", bound=Callable[[Any, Any], Key])
HandlerT = TypeVar(
    "HandlerT",
    bound=Callable[[Any, Any, Any], "HandlerResult | Coroutine[Any, Any, HandlerResult]"],
)
E_co = TypeVar("E_co", covariant=True)
E = TypeVar("E")
E1 = TypeVar("E1")
E2 = TypeVar("E2")
E3 = TypeVar("E3")
E4 = TypeVar("E4")
E5 = TypeVar("E5")
E6 = TypeVar("E6")
S = TypeVar("S")
St = TypeVar("St")
HandlerResultT = TypeVar(
    "HandlerResultT", bound="HandlerResult | Coroutine[Any, Any, HandlerResult]"
)


class HandlerDecorator(Protocol[E_co]):
    """What `@on(A, B)` returns, for the type checker: it takes a handler whose event
    parameter accepts `A | B` and that returns actions (sync or async).

    The method keeps its state and return types, so tests can call it directly (with
    positional arguments); its event parameter is typed as the `@on` types.
    """

    # `E` is bound through `self`, that is from the `@on(...)` types, before `fn` is
    # looked at: so `fn`'s event parameter is checked against them, not inferred from it.
    def __call__(
        self: HandlerDecorator[E], fn: Callable[[S, St, E], HandlerResultT], /
    ) -> Callable[[S, St, E], HandlerResultT]: ...


HANDLER_ATTR = "__sagaflow_on__"
CORRELATE_ATTR = "__sagaflow_correlate__"


@attrs.frozen
class HandlerMark:
    """What `@on` recorded on a method."""

    types: tuple[type, ...]
    start: bool
    internal: bool
    retry: RetryPolicy | None = None
    late: bool = False


@attrs.frozen
class CorrelateMark:
    """What `@correlate` recorded on a method; empty `types` means every handled type."""

    types: tuple[type, ...]
    reply: bool = False


# One overload per number of event types lets the type checker tie the handler's event
# parameter to them; past six, a handler is checked for its shape and result only.
@overload
def on(
    t1: type[E1],
    /,
    *,
    start: bool = ...,
    internal: bool = ...,
    retry: RetryPolicy | None = ...,
    late: bool = ...,
) -> HandlerDecorator[E1]: ...
@overload
def on(
    t1: type[E1],
    t2: type[E2],
    /,
    *,
    start: bool = ...,
    internal: bool = ...,
    retry: RetryPolicy | None = ...,
    late: bool = ...,
) -> HandlerDecorator[E1 | E2]: ...
@overload
def on(
    t1: type[E1],
    t2: type[E2],
    t3: type[E3],
    /,
    *,
    start: bool = ...,
    internal: bool = ...,
    retry: RetryPolicy | None = ...,
    late: bool = ...,
) -> HandlerDecorator[E1 | E2 | E3]: ...
@overload
def on(
    t1: type[E1],
    t2: type[E2],
    t3: type[E3],
    t4: type[E4],
    /,
    *,
    start: bool = ...,
    internal: bool = ...,
    retry: RetryPolicy | None = ...,
    late: bool = ...,
) -> HandlerDecorator[E1 | E2 | E3 | E4]: ...
@overload
def on(
    t1: type[E1],
    t2: type[E2],
    t3: type[E3],
    t4: type[E4],
    t5: type[E5],
    /,
    *,
    start: bool = ...,
    internal: bool = ...,
    retry: RetryPolicy | None = ...,
    late: bool = ...,
) -> HandlerDecorator[E1 | E2 | E3 | E4 | E5]: ...
@overload
def on(
    t1: type[E1],
    t2: type[E2],
    t3: type[E3],
    t4: type[E4],
    t5: type[E5],
    t6: type[E6],
    /,
    *,
    start: bool = ...,
    internal: bool = ...,
    retry: RetryPolicy | None = ...,
    late: bool = ...,
) -> HandlerDecorator[E1 | E2 | E3 | E4 | E5 | E6]: ...
@overload
def on(
    *types: type,
    start: bool = ...,
    internal: bool = ...,
    retry: RetryPolicy | None = ...,
    late: bool = ...,
) -> Callable[[HandlerT], HandlerT]: ...
def on(
    *types: type,
    start: bool = False,
    internal: bool = False,
    retry: RetryPolicy | None = None,
    late: bool = False,
) -> Any:
    """Mark a saga method as the handler of one or more event types.

    The method is called as `handler(self, state, event)`, may be sync or async, mutates
    `state` in place, and returns `None`, one action or an iterable of actions
    (`sagaflow.typing.HandlerResult`). A type checker holds the method to that: its event
    parameter must accept every type listed, and it must return actions. For the type
    checker the method's event parameter becomes the listed types, so list every type in
    one `@on(A, B)` rather than stacking `@on(A)` on `@on(B)`.

    Args:
        *types: The event types handled; subclasses are handled too.
        start: Only handlers with `start=True` may create an instance for a new key.
        internal: The handler only receives messages the runtime routes to the instance
            itself (`Schedule(..., to_self=True)`), so it needs no correlate function and
            published events of these types are not routed to it.
        retry: How often to try the handler when it raises, instead of the runtime's
            policy.
        late: The handler takes these events when they arrive for an instance that has
            completed (while it drains its outbox, or from its tombstone afterwards). It
            gets the final state, read-only, and may return `Send` and `Compensate`
            only (a cancellation of something that came too late, say). A type may have
            a handler for live instances and a `late=True` one besides. See the how-to
            "Finished instances and late events".

    Returns:
        A decorator that returns the method unchanged.
    """
    if not types:
        raise TypeError("@on() needs at least one event type, e.g. @on(OrderPlaced)")
    for t in types:
        if not isinstance(t, type):
            raise TypeError(f"@on() takes event classes, got {t!r}")
    mark = HandlerMark(types=types, start=start, internal=internal, retry=retry, late=late)

    def decorate(fn: F) -> F:
        marks: tuple[HandlerMark, ...] = getattr(fn, HANDLER_ATTR, ())
        setattr(fn, HANDLER_ATTR, (*marks, mark))
        return fn

    return decorate


@overload
def correlate(*types: type, reply: bool = ...) -> Callable[[CorrelateT], CorrelateT]: ...
@overload
def correlate(fn: CorrelateT, /) -> CorrelateT: ...
def correlate(*args: Any, reply: bool = False) -> Any:
    """Mark a saga method as the function that maps an event to an instance key.

    Bare (`@correlate`) it applies to every event type the saga handles; called
    (`@correlate(A, B)`) to those types only. It is called as `fn(self, event)` and
    returns the key (`str`) or `None` when the event is not for this saga; a type
    checker rejects a correlate function annotated to return anything else.

    With `reply=True` the listed types are replies to commands the saga sent, and the
    function returns the **command id** the reply answers (the `meta.id` its receiver
    was given) instead of a key: the runtime finds the instance from it, no business
    key needed. Only the commands of sagas that declare such a function carry their
    saga and key in their id. See the how-to "Handling replies".

    Raises:
        TypeError: Something other than event classes was given, or `reply=True`
            without the reply types.
    """
    if len(args) == 1 and callable(args[0]) and not isinstance(args[0], type):
        if reply:
            raise TypeError(_REPLY_TYPES)
        setattr(args[0], CORRELATE_ATTR, CorrelateMark(types=()))
        return args[0]
    for t in args:
        if not isinstance(t, type):
            raise TypeError(f"@correlate() takes event classes, got {t!r}")
    if reply and not args:
        raise TypeError(_REPLY_TYPES)
    mark = CorrelateMark(types=tuple(args), reply=reply)

    def decorate(fn: CorrelateT) -> CorrelateT:
        setattr(fn, CORRELATE_ATTR, mark)
        return fn

    return decorate


_REPLY_TYPES = (
    "@correlate(reply=True) needs the reply event types it applies to, e.g. "
    "@correlate(PaymentReply, reply=True)"
)
