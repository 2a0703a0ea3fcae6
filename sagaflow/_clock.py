"""Clocks: the only way the runtime reads time or waits for it."""

from __future__ import annotations

import math
import time

import anyio
import attrs

__all__ = ["SystemClock", "VirtualClock"]


@attrs.define(eq=False)
class SystemClock:
    """Wall-clock time (`time.time()`), waiting with `anyio.sleep`."""

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        """Return at or after the wall-clock time `deadline` (at once if it has passed)."""
        delay = deadline - time.time()
        if delay > 0:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()


@attrs.define(eq=False)
class VirtualClock:
    """A clock that moves only when told to, so timers and retries never wait for real.

    Sleepers wake when `advance` or `set` moves the time to or past their deadline.

    Args:
        start: The initial time in seconds since the epoch.
    """

    _now: float = attrs.field(default=1_700_000_000.0, alias="start")
    _sleepers: list[tuple[float, anyio.Event]] = attrs.field(factory=list, init=False)

    def now(self) -> float:
        """The current virtual time."""
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        """Wait until the virtual time reaches `deadline`."""
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        entry = (deadline, event)
        self._sleepers.append(entry)
        try:
            await event.wait()
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def set(self, when: float) -> None:
        """Move the time to `when` (never backwards) and wake the sleepers now due."""
        if when < self._now or math.isnan(when):
            raise ValueError(f"a VirtualClock cannot go back from {self._now} to {when}")
        self._now = when
        for deadline, event in list(self._sleepers):
            if deadline <= when:
                event.set()

    def advance(self, seconds: float) -> None:
        """Move the time forward by `seconds` and wake the sleepers now due."""
        if seconds < 0:
            raise ValueError(f"cannot advance a VirtualClock by {seconds} seconds")
        self.set(self._now + seconds)

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline someone is sleeping until, if any."""
        return min((d for d, _ in self._sleepers), default=None)
