"""`advance`: move a virtual clock forward through every due time a runtime has."""

from __future__ import annotations

from datetime import timedelta

import anyio.lowlevel

from .. import Runtime
from .._clock import VirtualClock

__all__ = ["advance", "settle"]


def to_seconds(by: timedelta | float) -> float:
    """`by` in seconds; it must not be negative."""
    seconds = by.total_seconds() if isinstance(by, timedelta) else float(by)
    if not seconds >= 0:
        raise ValueError(f"cannot advance time by {by!r}: time only moves forward")
    return seconds


async def settle(runtime: Runtime) -> None:
    """`runtime.drain()`, then let the tasks it saw waiting for a later time go to sleep.

    `drain()` returns once nothing is due now; a task that must wait for a later time
    (a retry's backoff) may not yet have started sleeping on the clock by then. It was
    made runnable before this task yields, so a couple of checkpoints let it register
    its deadline before the caller reads `clock.next_deadline`.
    """
    await runtime.drain()
    for _ in range(2):
        await anyio.lowlevel.checkpoint()


async def _next_schedule(runtime: Runtime, now: float) -> float | None:
    """The earliest due time of a schedule of the runtime's sagas after `now`."""
    sagas = sorted(runtime.registry.sagas)
    due = await runtime.store.next_due(sagas=sagas)
    if due is None or due > now:
        return due
    # A schedule due now survived a drain (a runtime waiting to retry it, say): look
    # past it rather than stop at it for ever.
    later = (s for s in await runtime.store.list_schedules() if s.due > now and s.saga in sagas)
    return min((s.due for s in later), default=None)


async def advance(runtime: Runtime, clock: VirtualClock, by: timedelta | float) -> None:
    """Move `clock` forward by `by`, stopping at every due time on the way.

    At each stop the runtime is drained, so what fell due (schedules, command and
    handler retries) is handled at its own due time and in due order, and a timer that
    schedules another one within the window fires too. Every time the runtime sleeps
    until is a stop, its periodic outbox sweep included: a runtime made with a long
    `sweep_interval` steps through long windows faster. Returns with the clock at the
    target and the runtime drained.

    Args:
        runtime: A running `Runtime` whose `clock` is `clock`.
        clock: The runtime's virtual clock.
        by: A `timedelta` or a number of seconds, not negative.

    Raises:
        ValueError: `by` is negative.
    """
    target = clock.now() + to_seconds(by)
    while True:
        await settle(runtime)
        now = clock.now()
        wakeups = (await _next_schedule(runtime, now), clock.next_deadline)
        later = [t for t in wakeups if t is not None and t > now]
        if not later or min(later) > target:
            break
        clock.set(min(later))
    if target > clock.now():
        clock.set(target)
    await settle(runtime)
