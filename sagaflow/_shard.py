"""Shard workers: take a batch from the mailbox, handle it, and retry what must wait.

Every `(saga, key)` hashes to one shard, so the events of one instance are handled one
at a time and in order, while instances of different shards run concurrently. A shard
keeps a cache of instance states and holds back the later events of an instance whose
handler is waiting for a retry; the work on one batch is a `Batch` (`_batch.py`).
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from ._batch import Batch, Item, Ref
from ._calls import Interrupt
from ._hooks import Hooks
from ._outbox import Counters, Outbox, error_text
from ._records import Unmatched
from ._retry import RetryPolicy
from ._serialization import Serializer
from ._sync import Ack, Activity, Mailbox
from .exceptions import ConflictError, RuntimeClosedError
from .stores._protocol import InstanceRecord, Store

__all__ = ["Shard"]

log = logging.getLogger("sagaflow.runtime")


@attrs.define(eq=False)
class Shard:
    """One shard worker with its mailbox, its state cache and its handler retries."""

    store: Store
    serializer: Serializer
    clock: Any
    policy: RetryPolicy
    activity: Activity
    counters: Counters
    outbox: Outbox
    notify_timer: Callable[[float], None]
    on_unmatched: Callable[[Unmatched], None] | None
    hooks: Hooks | None
    dedup_retention: float
    max_batch: int
    cache_size: int
    conflict_retries: int
    mailbox: Mailbox[Item]
    handler_timeout: float | None = None
    """Seconds an async handler call may take (`None`: no limit)."""
    cache: OrderedDict[Ref, tuple[InstanceRecord, Any]] = attrs.field(
        factory=OrderedDict, init=False
    )
    """Committed instances and their states, least recently used first."""
    _held: dict[Ref, list[Item]] = attrs.field(factory=dict, init=False)
    _current: list[Item] = attrs.field(factory=list, init=False)
    """The items of the batch under way."""
    _deferred: set[Item] = attrs.field(factory=set, init=False)
    """Items waiting for their handler retry."""
    _retry_due: list[float] = attrs.field(factory=list, init=False)
    _tg: anyio.abc.TaskGroup | None = attrs.field(default=None, init=False)

    @property
    def cached(self) -> int:
        """How many instance states this shard holds in memory."""
        return len(self.cache)

    def next_wakeup(self) -> float | None:
        """When the earliest handler retry of this shard falls due, if any waits."""
        return self._retry_due[0] if self._retry_due else None

    async def run(self) -> None:
        """Take batches from the mailbox and handle them, until cancelled.

        When it stops, the publishers still waiting for one of its items hear so (see
        `_abandon`).

        Raises:
            Interrupt: User code raised `KeyboardInterrupt` or `SystemExit`.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                while True:
                    await self.mailbox.wait_readable()
                    try:
                        await self._process(self.mailbox.take(self.max_batch))
                    except (KeyboardInterrupt, SystemExit) as exc:
                        raise Interrupt(exc) from None
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """Fail the publishers of the items this stopped shard still has.

        Only `publish` and `run` wait on a plain `Ack`; due schedules and cluster inbox
        rows are in the store and are taken up again by the next start.
        """
        items = [*self._current, *self.mailbox.take(len(self.mailbox)), *self._deferred]
        for held in self._held.values():
            items += held
        self._current, self._deferred, self._held = [], set(), {}
        error = RuntimeClosedError(
            "the runtime stopped while this event was being handled or waiting to be; it "
            "may not be committed: publish it again to a running runtime (with an id, it "
            "is applied at most once)"
        )
        for item in items:
            if type(item.ack) is Ack:
                item.ack.done(error)

    def _expand(self, items: list[Item]) -> list[Item]:
        """Put items behind a handler retry on hold, and release them behind it."""
        if not self._held:
            return items
        out: list[Item] = []
        for item in items:
            ref = (item.saga.name, item.key)
            if item.retry:
                held = self._held.pop(ref, [])
                self.activity.begin(len(held))
                out.append(item)
                out.extend(held)
            elif ref in self._held:
                self._held[ref].append(item)
                self.activity.end()
            else:
                out.append(item)
        return out

    async def _process(self, items: list[Item]) -> None:
        items = self._expand(items)
        if not items:
            return
        self._current = items
        await self._handle(items)
        self._current = []  # (left as is when cancelled: `_abandon` needs them)

    async def _handle(self, items: list[Item]) -> None:
        for _ in range(self.conflict_retries):
            batch = Batch(self, items)
            try:
                await batch.run()
            except ConflictError as exc:
                self.outbox.give_back(*batch.carried)
                self.counters.conflicts += 1
                self._evict(batch.work)
                log.debug("batch lost a race on %d instance(s), handling again", len(exc.instances))
                continue
            except Exception as exc:  # noqa: BLE001 - the store failed: tell the publishers
                self.outbox.give_back(*batch.carried)
                self._evict(batch.work)
                log.error("could not commit a batch of %d item(s): %s", len(items), error_text(exc))
                for item in items:
                    self._finish(item, exc)
                return
            batch.publish()
            return
        error = ConflictError([(i.saga.name, i.key) for i in items])
        log.error("gave up on a batch after %d conflicts", self.conflict_retries)
        for item in items:
            self._finish(item, error)

    def _evict(self, work: dict[Ref, Any]) -> None:
        """Drop what a failed batch touched: the store may have moved on."""
        for ref in work:
            self.cache.pop(ref, None)

    def _finish(self, item: Item, error: BaseException | None = None) -> None:
        if item.ack is not None:
            item.ack.done(error)
        self.activity.end()

    def remember(self, ref: Ref, record: InstanceRecord, state: Any) -> None:
        """Cache a committed instance, evicting the least recently used beyond the size."""
        cache = self.cache
        cache[ref] = (record, state)
        cache.move_to_end(ref)
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

    def defer(self, item: Item, due: float) -> None:
        """Try a failed event again at `due`; later events of its instance wait for it."""
        assert self._tg is not None
        ref = (item.saga.name, item.key)
        self._held.setdefault(ref, [])
        heapq.heappush(self._retry_due, due)
        self._deferred.add(item)
        self.activity.end()
        self._tg.start_soon(self._wake_later, item, due)

    def hold(self, item: Item) -> None:
        """Keep `item` until the handler retry of its instance has run."""
        self._held.setdefault((item.saga.name, item.key), []).append(item)
        self.activity.end()

    async def _wake_later(self, item: Item, due: float) -> None:
        await self.clock.sleep_until(due)
        self._retry_due.remove(due)
        heapq.heapify(self._retry_due)
        self._deferred.discard(item)
        self.activity.begin()
        item.retry = True
        self.mailbox.put_unbounded(item)
