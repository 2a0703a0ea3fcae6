"""Acknowledgement after commit: `Runtime.run(source, ack=...)`.

Each consumed event gets a `Tracker`, an `Ack` counting down its targets; the shards
settle them in whatever order their batches commit. The `Intake` keeps the trackers in
consumption order and hands the settled ones at its head, in order and in batches, to
the caller's `ack`, from a task of its own: so a broker message is acknowledged (or an
offset committed) only once nothing of its event can be lost, and a slow `ack` never
holds up the shards.
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Any

import anyio
import attrs

from ._calls import Interrupt
from ._records import Consumed, Outcome
from ._sync import Ack
from .typing import Acknowledge

__all__ = ["Intake", "Tracker"]

# When one event reached several instances, the outcome that says the most wins.
_RANK = {
    Outcome.UNMATCHED: 0,
    Outcome.DUPLICATE: 1,
    Outcome.COMMITTED: 2,
    Outcome.DEAD_LETTERED: 3,
}


class Tracker(Ack):
    """One consumed event: settled once each of its targets is.

    Made once per event, so its `__init__` sets only what a tracker uses (it is never
    waited on: the `Intake` hears of it instead).
    """

    __slots__ = ("event", "event_id", "intake", "outcome")

    def __init__(self, pending: int, intake: Intake | None, event: Any, event_id: str | None):
        self.pending = pending
        self.error = None
        self.intake = intake
        self.event = event
        self.event_id = event_id
        self.outcome = Outcome.UNMATCHED

    def settle(self, outcome: Outcome) -> None:
        current = self.outcome
        if outcome is not current and _RANK[outcome] > _RANK[current]:
            self.outcome = outcome
        # `done()` inlined: this runs once per event and target.
        self.pending -= 1
        if self.pending == 0 and self.intake is not None:
            self.intake.settled(self)

    def poisoned(self, error: BaseException, dead_lettered: bool) -> None:
        if dead_lettered:
            self.settle(Outcome.DEAD_LETTERED)
        else:
            self.done(error)

    def done(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.pending -= 1
        if self.pending == 0 and self.intake is not None:
            self.intake.settled(self)


@attrs.define(eq=False)
class Intake:
    """The consumed events of one `run(ack=...)`, in order, until acknowledged.

    Args:
        ack: The caller's callback.
        limit: How many consumed events may wait for their acknowledgement before
            `track` waits (a slow `ack` slows the consumption down, not memory up).
    """

    ack: Acknowledge
    limit: int
    _queue: deque[Tracker] = attrs.field(factory=deque, init=False)
    _ready: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _room: anyio.Event | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    error: BaseException | None = attrs.field(default=None, init=False)
    """What stopped the acknowledgements: an event that failed, or `ack` itself."""
    consuming: anyio.CancelScope = attrs.field(factory=anyio.CancelScope, init=False)
    """Around the consumption of the source: cancelled when the intake stops."""

    def track(self, event: Any, event_id: str | None, targets: int) -> Tracker:
        """A tracker for the next consumed event, which has `targets` targets."""
        tracker = Tracker(targets, self, event, event_id)
        queue = self._queue
        queue.append(tracker)
        if targets == 0 and len(queue) == 1:
            self._ready.set()
        return tracker

    def full(self) -> bool:
        """Whether `track` should wait for `room()` first."""
        return len(self._queue) >= self.limit

    async def room(self) -> None:
        """Wait until fewer than `limit` events wait for their acknowledgement."""
        while len(self._queue) >= self.limit and self.error is None:
            if self._room is None:
                self._room = anyio.Event()
            await self._room.wait()

    def settled(self, tracker: Tracker) -> None:
        queue = self._queue
        if queue and queue[0] is tracker:
            self._ready.set()

    def close(self) -> None:
        """No more events will be tracked: `deliver` returns once the queue is empty."""
        self._closed = True
        self._ready.set()

    async def deliver(self) -> None:
        """Hand the settled events at the head of the queue to `ack`, in order, until
        closed and empty, an event failed, or `ack` raised (see `error`)."""
        queue = self._queue
        try:
            while True:
                await self._ready.wait()
                self._ready = anyio.Event()
                batch: list[Consumed] = []
                append, pop = batch.append, queue.popleft
                while queue and queue[0].pending == 0:
                    tracker = queue[0]
                    if tracker.error is not None:
                        self.error = tracker.error
                        break
                    pop()
                    append(Consumed(tracker.event, tracker.event_id, tracker.outcome))
                if self._room is not None and len(queue) < self.limit:
                    self._room.set()
                    self._room = None
                if batch:
                    result = self.ack(batch)
                    if inspect.isawaitable(result):
                        await result
                if self.error is not None or (self._closed and not queue):
                    break
        except (KeyboardInterrupt, SystemExit) as exc:
            # An ordinary exception, or asyncio would tear it out of the event loop.
            raise Interrupt(exc) from None
        except Exception as exc:  # noqa: BLE001 - `run` raises it once the intake stopped
            self.error = exc
        if self.error is not None:
            self.consuming.cancel()
            if self._room is not None:
                self._room.set()
