"""Calling user code (handlers, dispatchers) so that its faults stay local.

- A call that takes longer than its timeout is cancelled and fails with a
  `TimeoutError` saying so: a failed attempt like any other.
- A cancellation exception that user code raises while the runtime is not being
  cancelled (on asyncio, it awaited a future that something else cancelled) fails the
  call too, instead of silently ending the task that made it.
- `KeyboardInterrupt` and `SystemExit` stop the runtime: the task that met one raises
  `Interrupt` (an ordinary exception, so that asyncio does not tear it out of the event
  loop and task groups stop cleanly), and `Runtime.__aexit__` re-raises the original
  (`interrupt_in`).

Timeouts are measured in real time (the event loop's clock), not through the runtime's
`Clock`: they guard against calls that hang, and a virtual clock standing still must not
keep a hung call alive, nor moving it on cut a running one short.
"""

from __future__ import annotations

import math
import types
from collections.abc import Awaitable, Callable, Generator
from datetime import timedelta
from typing import Any, NoReturn, TypeVar, cast

import anyio
import attrs

__all__ = ["Interrupt", "Watch", "call", "interrupt_in", "seconds"]

T = TypeVar("T")


def seconds(value: timedelta | float | None, name: str) -> float | None:
    """A timeout option as seconds (`None`: no limit).

    Raises:
        ValueError: The value is not a positive duration.
    """
    if value is None:
        return None
    result = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not result > 0:
        raise ValueError(
            f"Runtime({name}=...) must be a positive number of seconds, a timedelta, or None "
            f"for no limit; got {value!r}"
        )
    return result


@attrs.define(eq=False)
class Watch:
    """A cancel scope that a worker task keeps open across its calls, armed with a
    call's time limit only while that call waits.

    Entering and leaving a cancel scope costs more than many a call of a busy runtime
    (a dispatcher that hands a command to a buffer), and a call that does not suspend
    cannot be interrupted anyway. So a worker enters one scope for many calls (`run`),
    and `call` sets its deadline once the call has suspended. When a limit passes, the
    scope is cancelled: that call fails with `TimeoutError`, and the worker leaves the
    scope and enters a new one before it awaits anything else (`expired`).
    """

    scope: anyio.CancelScope | None = None
    expired: bool = False
    """The scope was cancelled by a call's deadline: the worker must leave it now."""

    async def run(self, body: Callable[[Watch], Awaitable[None]]) -> None:
        """Run `body(self)` in a scope, again in a new scope each time a limit passed;
        `body` returns once `expired` is set."""
        while True:
            self.expired = False
            with anyio.CancelScope() as self.scope:
                await body(self)


async def call(
    awaitable: Awaitable[T],
    timeout: float | None,
    what: Callable[[], str],
    option: str,
    watch: Watch | None = None,
) -> T:
    """Await user code with a time limit.

    Args:
        awaitable: The call's result (a coroutine not yet started).
        timeout: Seconds, or `None` for no limit.
        what: Describes the call for an error message (called only on failure).
        option: The `Runtime` option that set `timeout`, named in the message.
        watch: The calling worker's long-lived scope (see `Watch`); without one, the
            call gets a cancel scope of its own.

    Raises:
        TimeoutError: The call took longer than `timeout`.
        RuntimeError: The call raised a cancellation exception although nothing
            cancelled the runtime.
    """
    try:
        steps = awaitable.__await__()
    except AttributeError:
        raise TypeError(
            f"{what()} returned {awaitable!r}, which cannot be awaited: make it an "
            "`async def` function (or an object with `async def __call__`)"
        ) from None
    if watch is not None and timeout is not None:
        try:
            first = steps.send(None)
        except StopIteration as done:  # done without waiting: no deadline needed
            return done.value  # type: ignore[no-any-return]
        except Exception:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised, or as RuntimeError
            _reraise(exc, what)
        return await _watched(steps, first, timeout, what, option, watch)
    try:
        if timeout is None:  # no limit: no cancel scope either
            return cast(T, await _resume(steps, steps.send(None)))
        with anyio.CancelScope() as scope:
            # Most calls of a busy runtime finish without waiting, and one that does not
            # wait cannot be interrupted anyway: only a call that suspends pays for the
            # deadline (a timer on the event loop). So take the first step here, and
            # set the deadline if it suspended (the time limit counts from there).
            first = steps.send(None)
            scope.deadline = anyio.current_time() + timeout
            return cast(T, await _resume(steps, first))
    except StopIteration as done:  # the first step finished the call
        return cast(T, done.value)
    except Exception:
        raise  # an ordinary failure: the caller counts it
    except BaseException as exc:  # noqa: BLE001 - re-raised, or as RuntimeError
        _reraise(exc, what)
    # Only our own deadline ends the scope without a result or an exception.
    raise TimeoutError(f"{what()} timed out after {timeout:g} s ({option})")


async def _watched(
    steps: Generator[Any, Any, T],
    first: Any,
    timeout: float,
    what: Callable[[], str],
    option: str,
    watch: Watch,
) -> T:
    """`call` in the worker's scope, for a call that suspended: armed with its deadline
    until it returns."""
    scope = watch.scope
    assert scope is not None and not watch.expired
    scope.deadline = anyio.current_time() + timeout
    try:
        return cast(T, await _resume(steps, first))
    except Exception:
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised, or as TimeoutError
        if scope.cancel_called and not isinstance(exc, KeyboardInterrupt | SystemExit):
            raise TimeoutError(f"{what()} timed out after {timeout:g} s ({option})") from None
        _reraise(exc, what)
    finally:
        if scope.cancel_called:
            watch.expired = True
        else:
            scope.deadline = math.inf


def _reraise(exc: BaseException, what: Callable[[], str]) -> NoReturn:
    """Raise a `BaseException` out of user code on: itself when it stops the runtime (an
    interrupt, or the runtime being cancelled), else a `RuntimeError` for a cancellation
    nobody asked for (or another loop's cancellation exception)."""
    if (
        isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit)
        or anyio.current_effective_deadline() == -math.inf  # the runtime is cancelled
        or (isinstance(exc, BaseExceptionGroup) and interrupt_in(exc) is not None)
    ):
        raise exc
    raise RuntimeError(
        f"{what()} raised {type(exc).__name__} although the runtime was not cancelled "
        "(did it await something that another task cancelled?)"
    ) from exc


@types.coroutine
def _resume(steps: Generator[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on awaiting `steps`, which suspended (yielding `yielded` to the event loop)."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # noqa: BLE001 - passed on to the call
            try:
                yielded = steps.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                yielded = steps.send(sent)
            except StopIteration as done:
                return done.value


class Interrupt(Exception):
    """Carries a `KeyboardInterrupt` or `SystemExit` out of a runtime task.

    Attributes:
        original: The exception to raise to the runtime's owner.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__} in a runtime task")
        self.original = original


def interrupt_in(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first `KeyboardInterrupt`/`SystemExit` in `group` (carried or not), if any."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = interrupt_in(exc)
            if found is not None:
                return found
        elif isinstance(exc, Interrupt):
            return exc.original
        elif isinstance(exc, KeyboardInterrupt | SystemExit):
            return exc
    return None
