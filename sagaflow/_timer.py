"""The timer: sleeps until the earliest pending schedule and hands due ones over."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from typing import Any, Protocol

import anyio
import attrs

from ._sync import Activity
from .stores._protocol import ScheduleRecord

__all__ = ["DueSchedules", "Timer"]

log = logging.getLogger("sagaflow.timer")


class DueSchedules(Protocol):
    """Where the timer finds due schedules: a store, or cluster mode's claims."""

    async def due_schedules(
        self, now: float, limit: int, *, sagas: Collection[str] | None = None
    ) -> list[ScheduleRecord]: ...

    async def next_due(self, *, sagas: Collection[str] | None = None) -> float | None: ...


@attrs.define(eq=False)
class Timer:
    """Wakes at the earliest due schedule, read from the store by due time.

    It never polls: it sleeps until the earliest due time it knows, and `notify` wakes it
    early when a commit adds an earlier one. Due schedules are read in pages of `page`
    and handed to `fire`, which passes them to the shards and returns how many it took;
    each one stays "in flight" until its shard calls `settled`, so a schedule whose
    instance waits (for a handler retry, say) is neither fired twice nor read in a loop.
    Only schedules of `sagas` (the registered ones) are read, so rows of a saga that is
    not registered any more never crowd out the others.
    """

    store: DueSchedules
    clock: Any
    activity: Activity
    fire: Callable[[list[ScheduleRecord]], int]
    sagas: Collection[str] | None = None
    page: int = 256
    backoff: float = 1.0
    _target: float | None = attrs.field(default=None, init=False)
    _scope: anyio.CancelScope | None = attrs.field(default=None, init=False)
    _dirty: bool = attrs.field(default=True, init=False)
    _wake: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _inflight: set[str] = attrs.field(factory=set, init=False)

    @property
    def next_due(self) -> float | None:
        """The due time the timer sleeps until, if it knows one."""
        return self._target

    def next_wakeup(self) -> float | None:
        """The due time the timer is waiting for, or `-inf` if it must look again."""
        return -math.inf if self._dirty else self._target

    def notify(self, due: float) -> None:
        """A schedule due at `due` was committed: wake early if it is the earliest."""
        if self._target is None or due < self._target:
            self._target = due
            self._look_again()

    def taken(self, schedule_id: str) -> None:
        """A due schedule was handed to a shard."""
        self._inflight.add(schedule_id)

    def settled(self, schedule_id: str) -> None:
        """A due schedule's shard is done with it (committed or not): look again."""
        self._inflight.discard(schedule_id)
        self._look_again()

    def _look_again(self) -> None:
        self._dirty = True
        if self._scope is not None:
            self._scope.cancel()
        self._wake.set()

    async def run(self) -> None:
        """Fire due schedules until cancelled."""
        while True:
            self.activity.begin()
            try:
                await self._fire_due()
            except Exception as exc:  # noqa: BLE001 - the store failed: look again later
                log.error("could not read due schedules: %s", exc)
                self._dirty = False
                self._target = self.clock.now() + self.backoff
            finally:
                self.activity.end()
            if self._target is None:
                self._wake = anyio.Event()
                if not self._dirty:
                    await self._wake.wait()
                continue
            with anyio.CancelScope() as scope:
                self._scope = scope
                if not self._dirty:
                    await self.clock.sleep_until(self._target)
            self._scope = None

    async def _fire_due(self) -> None:
        while True:
            self._dirty = False
            now = self.clock.now()
            inflight = self._inflight
            rows = await self.store.due_schedules(now, self.page + len(inflight), sagas=self.sagas)
            fresh = [r for r in rows if r.id not in inflight]
            if fresh and self.fire(fresh):
                continue
            if rows:
                # Everything due is in flight (it wakes us when settled) or cannot be
                # fired now: look again later, never in a tight loop.
                self._target = now + self.backoff
                return
            if not self._dirty:
                self._target = await self.store.next_due(sagas=self.sagas)
            if not self._dirty:
                return
