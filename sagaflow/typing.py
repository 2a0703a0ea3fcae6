"""Protocols and type aliases for the parts of sagaflow you can plug in.

- `Dispatch`: what `Runtime(dispatch=...)` calls for every command.
- `Acknowledge`: what `Runtime.run(source, ack=...)` calls with the events it is done with.
- `Clock`: what `Runtime(clock=...)` reads time and waits through.
- `Store`: where a runtime keeps its data (see `sagaflow.stores`).
- `Action` and `HandlerResult`: what an `@on` handler returns, for annotating handlers
  (`-> list[Action]`); a type checker rejects a handler annotated to return anything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ._actions import Action, HandlerResult
from ._records import Consumed, DispatchMeta
from .stores._protocol import Store

__all__ = ["Acknowledge", "Action", "Clock", "Dispatch", "DispatchMeta", "HandlerResult", "Store"]


Acknowledge = Callable[[list[Consumed]], Awaitable[object] | None]
"""What `Runtime.run(source, ack=...)` calls: `ack(consumed)` with the next events it is
done with, in consumption order; awaited if it returns an awaitable."""


class Dispatch(Protocol):
    """`async def dispatch(command, meta) -> None`, or an object with such an `__call__`.

    It reports failure by raising or by returning `False` (any other result is success);
    `meta.id` is stable per command, so the receiver can deduplicate.
    """

    def __call__(self, command: Any, meta: DispatchMeta, /) -> Awaitable[object]: ...


class Clock(Protocol):
    """The runtime's only source of time; `sagaflow.testing.VirtualClock` is one."""

    def now(self) -> float:
        """Wall-clock seconds since the epoch (due times are stored as such)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once `now()` has reached `deadline` (at once if it already has)."""
        ...
