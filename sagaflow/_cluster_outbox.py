"""The outbox of cluster mode: commands claimed from the store, per instance in order.

In one process, the outbox knows every command because the shards hand them over. With
several processes the store is the only place that knows them all, so `ClusterOutbox`
takes its commands from it with leases (`ClusterStore.claim_commands`): an instance's
rows are always in one process's hands, so they go out in order. Deliveries, retries and
give-ups are recorded in the store. A give-up stays there, marked failed and leased, so
the instance's later commands stay held until its `CommandFailed` is handled, by
whichever process. Completed instances end in the store once their outbox is empty,
whoever dispatched their last command.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from ._calls import Watch
from ._outbox import CommandQueue, OutboxCore, QueuedCommand, error_text
from ._registry import Registry
from ._sync import Wakeup
from .exceptions import SerializationError
from .stores._claims import ClaimedCommand, ClusterStore
from .stores._protocol import OutboxRecord, OutboxUpdate

__all__ = ["ClusterOutbox"]

log = logging.getLogger("sagaflow.cluster")

_Ref = tuple[str, str]
# Decoded commands kept from `add` until a claim returns their rows.
_DECODED_LIMIT = 4096


@attrs.define(eq=False, kw_only=True)
class ClusterOutbox(OutboxCore):
    """Dispatches the commands this process claimed, per instance in order.

    It offers what the shards use of `Outbox` (`add`, `has_pending`, `completing`,
    `hold`, `release`, `drop_head`, `forget`) and what the runtime reads (`depth`,
    `next_wakeup`, `next_sweep`, `recover`, `run`). Commands come from claims, not from
    `add`: the rows a shard commits are in the store for any process to take, and
    `add` only wakes the claimer (and keeps the decoded commands, saving a decode when
    this process claims them, which it usually does first).
    """

    store: ClusterStore
    registry: Registry
    owner: str
    announce: Callable[[], None]

    _decoded: dict[str, Any] = attrs.field(factory=dict, init=False)
    _delivered: list[str] = attrs.field(factory=list, init=False)
    _retried: list[OutboxUpdate] = attrs.field(factory=list, init=False)
    _failed: list[OutboxUpdate] = attrs.field(factory=list, init=False)
    _released: list[str] = attrs.field(factory=list, init=False)
    _finish: set[_Ref] = attrs.field(factory=set, init=False)
    _giving_up: dict[str, tuple[_Ref, QueuedCommand]] = attrs.field(factory=dict, init=False)
    _claim: Wakeup = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._claim = Wakeup(self.clock, self.store.poll_interval)

    @property
    def sagas(self) -> list[str]:
        return sorted(self.registry.sagas)

    def leased_ids(self) -> list[str]:
        """The ids of the outbox rows this process holds (to renew their leases)."""
        return [e.row.id for queue in self._queues.values() for e in queue]

    def next_wakeup(self) -> float | None:
        """When the earliest retry falls due, `-inf` if the store must be looked at."""
        wakeups = [self._claim.next_wakeup()]
        retry = self._dispatchers.next_retry()
        if retry is not None:
            wakeups.append(retry)
        if self._flush_retry is not None:
            wakeups.append(self._flush_retry)
        return min(wakeups)

    def next_sweep(self) -> float:
        """When the claimer next looks at the store unasked."""
        return self._claim.next_poll

    def poke(self) -> None:
        """Another process has more commands than it can take: look for some."""
        self._claim.poke()

    def lost(self, ids: list[str]) -> None:
        """Another process took these rows over: leave their instances to it.

        What this process still holds of those instances is given back, so that the new
        owner can take it too, in order.
        """
        gone = set(ids)
        for ref, queue in list(self._queues.items()):
            if any(e.row.id in gone for e in queue):
                self._awaiting.discard(ref)
                if ref in self._busy:
                    self._held.add(ref)  # the worker drops them when it is done
                else:
                    self._drop(ref, release=True)

    # -- what the shards call --------------------------------------------------------

    def has_pending(self, ref: _Ref) -> bool:
        """Always `True`: another process may hold the instance's commands.

        A completing instance therefore stays in the store until a cleanup finds its
        outbox empty (see `completing`).
        """
        return True

    def add(self, rows: list[OutboxRecord], commands: list[Any] | None = None) -> None:
        """Committed rows are in the store: wake the claimer, keep the decoded commands."""
        if commands is not None:
            decoded = self._decoded
            for row, command in zip(rows, commands, strict=True):
                decoded[row.id] = command
            while len(decoded) > _DECODED_LIMIT:
                del decoded[next(iter(decoded))]
        if rows:
            self._claim.poke()

    # Delivered rows are finalized by the claimer's own commits: nothing rides along
    # in a shard's batch.

    def begin_carrying(self) -> None:
        """Nothing to carry (see `Outbox.begin_carrying`)."""

    def end_carrying(self) -> None:
        """Nothing to carry (see `Outbox.end_carrying`)."""

    def take_records(self) -> tuple[list[str], list[OutboxUpdate]]:
        """Nothing to carry: always empty."""
        return [], []

    def recorded(self, deletes: list[str]) -> None:
        """Nothing to carry (see `Outbox.recorded`)."""

    def give_back(self, deletes: list[str], updates: list[OutboxUpdate]) -> None:
        """Nothing to carry (see `Outbox.give_back`)."""

    def completing(self, ref: _Ref) -> None:
        """The instance completed: end it in the store once its outbox is empty."""
        self._finish.add(ref)
        self._mark_dirty()

    def hold(self, ref: _Ref) -> None:
        """The instance's compensation failed: give its commands back (claims skip it)."""
        self._awaiting.discard(ref)
        if ref in self._busy:
            self._held.add(ref)  # the worker drops them when it is done
        else:
            self._drop(ref, release=True)

    def drop_head(self, ref: _Ref, row_id: str) -> None:
        """The failed first command was handled (and deleted by that commit)."""
        queue = self._queues.get(ref)
        if queue and queue[0].row.id == row_id:
            queue.popleft()
            self._depth -= 1
            if not queue:
                del self._queues[ref]
        # If the instance had completed, that may have been its last command.
        self._finish.add(ref)
        self._mark_dirty()

    def release(self, ref: _Ref) -> None:
        """Resume the instance's commands after its `CommandFailed` was handled."""
        self._awaiting.discard(ref)
        self._held.discard(ref)
        if ref in self._queues and ref not in self._busy:
            self._make_ready(ref)
        # Rows the handler added, or the next instance rows, may be claimable now.
        self._claim.poke()

    def forget(self, ref: _Ref) -> None:
        """The instance was deleted, with its rows."""
        self._drop(ref, release=False)
        self._awaiting.discard(ref)
        self._held.discard(ref)

    async def recover(self) -> None:
        """Nothing to load: the claimer finds what a previous run left."""
        self._claim.poke()
        await anyio.lowlevel.checkpoint()

    # -- internals ---------------------------------------------------------------------

    def _drop(self, ref: _Ref, *, release: bool) -> None:
        queue = self._queues.pop(ref, None)
        if queue:
            self._depth -= len(queue)
            if release:
                self._released.extend(e.row.id for e in queue)
                self._mark_dirty()

    def _take(self, claimed: list[ClaimedCommand]) -> None:
        for c in claimed:
            row = c.row
            ref = (row.saga, row.key)
            queue = self._queues.get(ref)
            if queue is not None and any(e.row.id == row.id for e in queue):
                continue  # a lease that expired under us and came back
            entry = QueuedCommand(row)
            if row.id in self._decoded:
                entry.command, entry.decoded = self._decoded.pop(row.id), True
            if queue is None:
                queue = self._queues[ref] = CommandQueue()
            self._insert(queue, entry)
            self._depth += 1
            if c.failed:
                # Its process gave up on it but died before the instance handled it.
                self._awaiting.add(ref)
                command = self._decode(entry)
                self.on_failed(row, command)
            elif ref not in self._busy and ref not in self._awaiting:
                self._make_ready(ref)

    def _decode(self, entry: QueuedCommand) -> Any:
        """The entry's command, or `None` if it cannot be decoded."""
        if not entry.decoded:
            try:
                entry.command = self.serializer.decode(entry.row.type_name, entry.row.payload)
                entry.decoded = True
            except SerializationError:
                return None
        return entry.command

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the claimer, the workers, the retry timer and the flusher until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._dispatchers.run, self.concurrency, self._dispatch_head)
            tg.start_soon(self._flush_loop)
            tg.start_soon(self._claim_loop)
            task_status.started()

    async def _claim_loop(self) -> None:
        failures = 0
        while True:
            await self._claim.wait()
            room = self.capacity - self._depth
            if room <= 0:
                continue  # deliveries poke us again
            mine = [ref for ref in self._queues if ref not in self._held]
            self.activity.begin()
            try:
                claimed = await self.store.claim_commands(
                    self.owner, self.clock.now(), room, sagas=self.sagas, mine=mine
                )
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the next poll tries again
                failures += 1
                if failures == 1:
                    log.error("could not claim commands: %s", error_text(exc))
                continue
            finally:
                self.activity.end()
            self._take(claimed)
            if len(claimed) >= room:
                self._claim.poke()  # there may be more
                self.announce()  # and other processes may help

    async def _dispatch_head(self, ref: _Ref, watch: Watch) -> None:
        queue = self._queues.get(ref)
        if ref in self._held:
            self._busy.discard(ref)
            self._held.discard(ref)
            self._drop(ref, release=True)
            return
        if not queue or ref in self._awaiting:
            self._busy.discard(ref)
            return
        entry = queue[0]
        row = entry.row
        if row.due > self.clock.now():
            self._dispatchers.retry_at(ref, row.due)  # claimed behind a row that backs off
            return
        if not await self._attempt(ref, entry, watch):
            return
        self._delivered.append(row.id)
        self._mark_dirty()
        # The queue may have changed meanwhile: dropped (compensation failed, instance
        # deleted), or grown in front (an operator put a dead letter back).
        queue = self._queues.get(ref)
        if queue is not None and entry in queue:
            queue.remove(entry)
            self._depth -= 1
            if not queue:
                del self._queues[ref]
        self._busy.discard(ref)
        if ref in self._held:
            self._held.discard(ref)
            self._drop(ref, release=True)
        elif ref in self._queues:
            self._make_ready(ref)
        elif self._depth < self.capacity:
            self._claim.poke()

    def _record_retry(self, update: OutboxUpdate) -> None:
        self._retried.append(update)
        self._mark_dirty()

    def _give_up(self, ref: _Ref, entry: QueuedCommand) -> None:
        # The instance hears of it once the row is marked failed in the store while we
        # still hold it: if another process took it over meanwhile (we stalled), that
        # one tells the instance, and the instance must not hear it twice.
        row = entry.row
        self._failed.append(OutboxUpdate(row.id, row.attempts, row.due, row.error))
        self._giving_up[row.id] = (ref, entry)
        self._mark_dirty()

    def _gave_up(self, ids: list[str], marked: list[str]) -> None:
        """Hand the failures now marked in the store to their instances."""
        for row_id in ids:
            pending = self._giving_up.pop(row_id, None)
            if pending is None:
                continue
            ref, entry = pending
            if row_id in marked:
                self.on_failed(entry.row, entry.command if entry.decoded else None)
            else:
                log.warning(
                    "command %s of %s/%s failed for good here, but another process had "
                    "taken it over (this one stalled): that one decides",
                    entry.row.type_name,
                    ref[0],
                    ref[1],
                )
                self.lost([row_id])

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            await self._flush_event.wait()
            # Let more deliveries pile up behind this flush: one transaction for many.
            await anyio.lowlevel.checkpoint()
            delivered, self._delivered = self._delivered, []
            retried, self._retried = self._retried, []
            failed, self._failed = self._failed, []
            released, self._released = self._released, []
            finish, self._finish = self._finish, set()
            self._flush_event = anyio.Event()
            self._flushing = False
            try:
                settled = await self.store.settle_commands(
                    self.owner,
                    self.clock.now(),
                    delivered=delivered,
                    retries=retried,
                    failed=failed,
                    released=released,
                )
                self._gave_up([u.id for u in failed], settled.failed)
                check = sorted(finish.union(settled.instances))
                if check:
                    await self.store.finish_completed(
                        check,
                        sagas=self.sagas,
                        limit=len(check),
                        now=self.clock.now(),
                        tombstones=self.registry.tombstone_policies(),
                    )
                failures = 0
                if delivered or released:
                    self._claim.poke()  # rows behind them may be free now
                continue
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill the runtime
                # Until recorded, a delivered command may be dispatched again once its
                # lease expires (at least once): nothing is lost.
                failures += 1
                log.error("could not record dispatched commands: %s", error_text(exc))
                self._delivered[:0] = delivered
                self._retried[:0] = retried
                self._failed[:0] = failed
                self._released[:0] = released
                self._finish.update(finish)
            finally:
                self.activity.end()
            self._flush_retry = self.clock.now() + self.policy.delay(failures)
            await self.clock.sleep_until(self._flush_retry)
            self._flush_retry = None
            self._mark_dirty()
