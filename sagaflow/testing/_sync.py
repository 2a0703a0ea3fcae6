"""`SyncScenario`: the scenario for plain (non-async) tests, on an event loop of its own."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from contextlib import ExitStack
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar, overload

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .. import Registry, RetryPolicy
from ._checks import Checks, View
from ._recorder import Match
from ._scenario import Scenario

__all__ = ["SyncScenario"]

S = TypeVar("S")


class SyncScenario(Checks[S]):
    """A `Scenario` for plain test functions: the same steps and checks, without `await`.

    The runtime runs on an event loop in a thread of its own (an anyio blocking
    portal), so handlers may still be async.

    ```python
    with SyncScenario(OrderSaga, state=Order) as scenario:
        scenario.given(OrderPlaced("o-1", 120))
        scenario.when(PaymentCaptured("o-1"))
        assert scenario.sent == [ShipOrder("o-1")]
    ```

    Args:
        target: A saga class, a saga object, or a `Registry` (see `Scenario`).
        state: The saga's state class (see `Scenario`).
        saga: The saga's name (see `Scenario`).
        retry: The runtime's retry policy (see `Scenario`).
        messages: More message classes for the type allow-list (see `Scenario`).
        raise_errors: Make a step raise when a handler fails (see `Scenario`).
        backend: The event loop to run on: `"asyncio"` (the default) or `"trio"`.
    """

    @overload
    def __init__(
        self: SyncScenario[S],
        target: object,
        /,
        *,
        state: type[S],
        saga: str | None = None,
        retry: RetryPolicy | None = None,
        messages: Iterable[type] = (),
        raise_errors: bool = True,
        backend: str = "asyncio",
    ) -> None: ...
    @overload
    def __init__(
        self: SyncScenario[Any],
        target: Registry,
        /,
        *,
        saga: str | None = None,
        retry: RetryPolicy | None = None,
        messages: Iterable[type] = (),
        raise_errors: bool = True,
        backend: str = "asyncio",
    ) -> None: ...
    def __init__(
        self,
        target: object,
        /,
        *,
        state: type[S] | None = None,
        saga: str | None = None,
        retry: RetryPolicy | None = None,
        messages: Iterable[type] = (),
        raise_errors: bool = True,
        backend: str = "asyncio",
    ) -> None:
        options: dict[str, Any] = {
            "saga": saga,
            "retry": retry,
            "messages": messages,
            "raise_errors": raise_errors,
        }
        if state is not None:
            options["state"] = state
        self._scenario: Scenario[S] = Scenario(target, **options)
        self._backend = backend
        self._portal: BlockingPortal | None = None
        self._stack = ExitStack()

    def __repr__(self) -> str:
        return f"<SyncScenario {self._view().where()}>"

    def _view(self) -> View[S]:
        return self._scenario._view()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            portal = stack.enter_context(start_blocking_portal(self._backend))
            stack.enter_context(portal.wrap_async_context_manager(self._scenario))
            self._stack = stack.pop_all()
        self._portal = portal
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._portal = None
        self._stack.__exit__(exc_type, exc, tb)

    def _call(self, fn: Callable[[], Awaitable[None]]) -> None:
        __tracebackhide__ = True
        if self._portal is None:
            raise RuntimeError(
                "the scenario is not running; use it as `with SyncScenario(...) as scenario:`"
            )
        self._portal.call(fn)

    def fail(
        self, match: Match, *, error: Exception | None = None, times: int | None = None
    ) -> None:
        """Make the dispatch of matching commands fail (see `Scenario.fail`)."""
        self._scenario.fail(match, error=error, times=times)

    def command_id(self, match: Match) -> str:
        """The id of the last dispatched command `match` matches (see
        `Scenario.command_id`)."""
        __tracebackhide__ = True
        return self._scenario.command_id(match)

    def given(self, *events: object) -> None:
        """Deliver events that happened before the test (see `Scenario.given`)."""
        __tracebackhide__ = True
        self._call(functools.partial(self._scenario.given, *events))

    def when(self, event: object, *, id: str | None = None) -> None:
        """Publish an event and wait for what it causes now (see `Scenario.when`)."""
        __tracebackhide__ = True
        self._call(functools.partial(self._scenario.when, event, id=id))

    def advance(self, by: timedelta | float) -> None:
        """Move the virtual clock forward, firing what falls due (see `Scenario.advance`)."""
        __tracebackhide__ = True
        self._call(functools.partial(self._scenario.advance, by))
