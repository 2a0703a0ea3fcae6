"""Small synchronization helpers shared by the runtime's tasks."""

from __future__ import annotations

import math
from collections import deque
from typing import Generic, TypeVar

import anyio
import attrs

from ._records import Outcome
from .typing import Clock

__all__ = ["Ack", "Activity", "Mailbox", "Wakeup"]

T = TypeVar("T")


@attrs.define(eq=False)
class Activity:
    """Counts units of work in flight so that `drain()` can tell when all is quiet.

    Work that waits for a later time (a retry, a schedule) is not counted while it
    waits; whoever wakes it up calls `begin()` first thing.
    """

    count: int = 0
    _idle: anyio.Event | None = None
    _begun: anyio.Event | None = None

    def begin(self, n: int = 1) -> None:
        self.count += n
        if self._begun is not None:
            self._begun.set()
            self._begun = None

    async def wait_begin(self) -> None:
        """Wait until some work begins."""
        if self._begun is None:
            self._begun = anyio.Event()
        await self._begun.wait()

    def end(self, n: int = 1) -> None:
        self.count -= n
        if self.count == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Wait until the count next reaches zero (returns at once if it is zero)."""
        if self.count == 0:
            await anyio.lowlevel.checkpoint()
            return
        if self._idle is None:
            self._idle = anyio.Event()
        await self._idle.wait()


@attrs.define(eq=False)
class Ack:
    """Counts down the targets of one publish (or of a whole `run`) until committed."""

    pending: int = 0
    error: BaseException | None = None
    _done: anyio.Event | None = None
    poison_raises: bool = True
    """Whether a poison event that was dead-lettered fails the wait (`publish`), or
    counts as settled like any dead letter (`run`, which goes on with the source)."""

    def poisoned(self, error: BaseException, dead_lettered: bool) -> None:
        """A target could not be stored; it was dead-lettered if `dead_lettered`."""
        self.done(error if self.poison_raises or not dead_lettered else None)

    def settle(self, outcome: Outcome) -> None:
        """A target is done without error; `outcome` says how (`run(ack=...)` asks)."""
        self.done()

    def done(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.pending -= 1
        if self.pending == 0 and self._done is not None:
            self._done.set()

    async def wait(self) -> None:
        """Wait until every target is done; raise the first error one of them had."""
        if self.pending > 0:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()
        if self.error is not None:
            raise self.error


@attrs.define(eq=False)
class Mailbox(Generic[T]):
    """A FIFO with a soft bound: `put` waits for room, `put_nowait_unbounded` never does.

    Publishers use `put` (backpressure); the runtime's own tasks use the unbounded form
    so that no two of them can ever wait on each other.
    """

    limit: int
    _items: deque[T] = attrs.field(factory=deque, init=False)
    _readable: anyio.Event | None = attrs.field(default=None, init=False)
    _room: anyio.Event | None = attrs.field(default=None, init=False)

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: T) -> None:
        while len(self._items) >= self.limit:
            if self._room is None:
                self._room = anyio.Event()
            await self._room.wait()
        self.put_unbounded(item)

    def put_unbounded(self, item: T) -> None:
        self._items.append(item)
        if self._readable is not None:
            self._readable.set()
            self._readable = None

    async def wait_readable(self) -> None:
        while not self._items:
            if self._readable is None:
                self._readable = anyio.Event()
            await self._readable.wait()

    def take(self, limit: int) -> list[T]:
        """Take up to `limit` items without waiting."""
        items = self._items
        n = min(limit, len(items))
        taken = [items.popleft() for _ in range(n)]
        if self._room is not None and len(items) < self.limit:
            self._room.set()
            self._room = None
        return taken


@attrs.define(eq=False)
class Wakeup:
    """When a claim loop must look at the store: at once after `poke`, else at the poll.

    `next_wakeup` tells `drain()`: `-inf` while a look is owed, else the next poll.
    """

    clock: Clock
    interval: float
    dirty: bool = True
    next_poll: float = math.inf
    _scope: anyio.CancelScope | None = None

    def poke(self) -> None:
        """Look at the store as soon as the loop can."""
        self.dirty = True
        if self._scope is not None:
            self._scope.cancel()

    def next_wakeup(self) -> float:
        """`-inf` while a look is owed, else when the next poll is due."""
        return -math.inf if self.dirty else self.next_poll

    async def wait(self, until: float = math.inf) -> None:
        """Return when poked or when the poll is due (at the latest at `until`); the
        look is then no longer owed."""
        if not self.dirty:
            self.next_poll = min(self.clock.now() + self.interval, until)
            with anyio.CancelScope() as scope:
                self._scope = scope
                await self.clock.sleep_until(self.next_poll)
            self._scope = None
        self.dirty = False
