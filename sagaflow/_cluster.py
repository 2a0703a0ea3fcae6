"""Cluster mode: several runtime processes sharing one store (`Runtime(cluster=True)`).

In one process, the outbox knows every command because the shards hand them over, and
the timer owns every schedule. With several processes, the store is the only place that
knows everything, so the parts of cluster mode take their work from it with leases
(`sagaflow.stores._claims.ClusterStore`):

- `ClusterOutbox` (in `_cluster_outbox.py`) claims due commands and dispatches them,
  per instance in order.
- `ClusterTimer` is the single-process `Timer`, reading due schedules through claims.
- `Inbox` is the shared inbox behind `publish`: one row per routed instance, claimed per
  instance in order by whichever process gets there first, deleted after the handling
  commit; a redelivery after a crash is a no-op thanks to the event's dedup mark.
- `Cluster` wires them up, renews leases, wakes other processes with NOTIFY and is
  woken by their LISTEN notifications, and looks at the store every `poll_interval`
  when nothing wakes it (that also notices leases that expired).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import attrs

from . import _report as report
from ._batch import EVENT, Item
from ._cluster_outbox import ClusterOutbox
from ._hooks import Hooks
from ._outbox import Counters, error_text
from ._records import DispatchMeta
from ._registry import HandlerSpec, Registry, SagaSpec
from ._retry import RetryPolicy
from ._sync import Ack, Activity, Mailbox, Wakeup
from ._timer import Timer
from .exceptions import SerializationError
from .stores._claims import ClusterStore, InboxRecord
from .stores._protocol import (
    Changes,
    DeadLetter,
    OutboxRecord,
    ScheduleRecord,
    Store,
)
from .typing import Clock

__all__ = ["Cluster", "ClusterOutbox", "ClusterTimer", "Inbox", "cluster_store", "make_owner"]

log = logging.getLogger("sagaflow.cluster")

_Ref = tuple[str, str]
_Target = tuple[SagaSpec, HandlerSpec, str]

# Payload kinds of the wake-up notifications.
_INBOX, _ACKED, _OUTBOX = "i", "a", "o"
# How many completed instances one periodic cleanup ends at most.
_FINISH_PAGE = 256


def make_owner() -> str:
    """A lease owner name for this process: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@attrs.define(eq=False)
class _ScheduleClaims:
    """The store as `ClusterTimer` sees it: due schedules are claimed, not just read."""

    store: ClusterStore
    owner: str
    clock: Clock
    sagas: Sequence[str]

    async def due_schedules(
        self, now: float, limit: int, *, sagas: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        return await self.store.claim_schedules(self.owner, now, limit, sagas=self.sagas)

    async def next_due(self, *, sagas: Collection[str] | None = None) -> float | None:
        # Capped by the poll: other processes add schedules without telling us, and
        # schedules leased to a process that died come free when the lease expires.
        now = self.clock.now()
        due = await self.store.next_claimable_due(self.owner, now, sagas=self.sagas)
        poll = now + self.store.poll_interval
        return poll if due is None else min(due, poll)


@attrs.define(eq=False)
class ClusterTimer(Timer):
    """The `Timer`, with due schedules claimed under a lease (see `_ScheduleClaims`)."""

    def in_flight(self) -> list[str]:
        """Ids of the due schedules handed to shards and not settled yet."""
        return list(self._inflight)


class _Delivery(Ack):
    """Tells the inbox when the shard is done with one inbox row."""

    def __init__(self, inbox: Inbox, row: InboxRecord) -> None:
        super().__init__(1)
        self._inbox = inbox
        self._row = row

    def done(self, error: BaseException | None = None) -> None:
        self._inbox._done(self._row, error)

    def poisoned(self, error: BaseException, dead_lettered: bool) -> None:
        # Kept as a dead letter: handled, like any dead letter. Delivered again, it would
        # only be refused again.
        self.done(None if dead_lettered else error)


@attrs.define(eq=False)
class _Waiter:
    """A `publish` waiting for its inbox rows to be handled, here or elsewhere."""

    pending: int
    event: anyio.Event = attrs.field(factory=anyio.Event)

    def resolve(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.event.set()


@attrs.define(eq=False)
class Inbox:
    """The shared inbox: `publish` puts events in, every process takes them out.

    Rows are claimed per instance (see `ClusterStore.claim_inbox`), handed to the shards
    as events with their id (made up when the publisher gave none), and deleted once
    the shard committed them. If the process dies in between, the lease expires, another
    process handles the row again, and the dedup mark makes that a no-op.
    """

    store: ClusterStore
    registry: Registry
    owner: str
    clock: Clock
    activity: Activity
    route: Callable[[str, str], Mailbox[Item]]
    announce: Callable[[str], None]
    counters: Counters
    capacity: int = 1024
    hooks: Hooks | None = None

    _claim: Wakeup = attrs.field(init=False)
    _check: Wakeup = attrs.field(init=False)
    # Rows handed to the shards and not yet deleted or released in the store: their
    # instances stay ours, so that the rows behind them can be claimed meanwhile.
    _owned: dict[int, _Ref] = attrs.field(factory=dict, init=False)
    _in_flight: set[int] = attrs.field(factory=set, init=False)
    _acks: list[int] = attrs.field(factory=list, init=False)
    _releases: list[int] = attrs.field(factory=list, init=False)
    _flush_event: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _waiters: dict[int, _Waiter] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._claim = Wakeup(self.clock, self.store.poll_interval)
        self._check = Wakeup(self.clock, self.store.poll_interval, dirty=False)

    def next_wakeup(self) -> float:
        """`-inf` while the claimer owes a look at the inbox, else its next poll."""
        return self._claim.next_wakeup()

    def leased(self) -> list[int]:
        """Positions of the rows this process holds (to renew their leases)."""
        return list(self._owned)

    def poke(self) -> None:
        """Another process published: look at the inbox."""
        self._claim.poke()

    def acked_elsewhere(self) -> None:
        """Another process handled inbox rows: see whether our publishers may return."""
        if self._waiters:
            self._check.poke()

    async def publish(
        self, event: object, targets: Sequence[_Target], id: str | None, trace: str | None
    ) -> None:
        """Put `event` in the inbox for `targets`; return once every one handled it.

        Raises:
            SerializationError: The event cannot be encoded.
            StoreError: The store failed.
        """
        type_name, payload = self.registry.serializer.encode(event)
        event_id = uuid.uuid4().hex if id is None else id
        now = self.clock.now()
        rows = [
            InboxRecord(0, spec.name, key, event_id, id is None, type_name, payload, now, trace)
            for spec, _, key in targets
        ]
        waiter = _Waiter(len(rows))
        positions = await self.store.put_inbox(rows)
        for pos in positions:
            self._waiters[pos] = waiter
        try:
            self._claim.poke()
            self.announce(_INBOX)
            await waiter.event.wait()
        finally:
            for pos in positions:
                self._waiters.pop(pos, None)

    def _resolve(self, pos: int) -> None:
        waiter = self._waiters.pop(pos, None)
        if waiter is not None:
            waiter.resolve()

    def _done(self, row: InboxRecord, error: BaseException | None) -> None:
        self._in_flight.discard(row.pos)
        if error is None:
            self._acks.append(row.pos)
            self._resolve(row.pos)
        else:
            # Not committed: give it back; it is delivered again (maybe after later
            # events of its instance that were committed meanwhile).
            log.warning(
                "event %s for %s/%s was not committed, it goes back to the inbox: %s",
                row.type_name,
                row.saga,
                row.key,
                error_text(error),
            )
            self._releases.append(row.pos)
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        if not self._flush_event.is_set():
            self.activity.begin()
            self._flush_event.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Claim, hand over, acknowledge and answer publishers until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._claim_loop)
            tg.start_soon(self._flush_loop)
            tg.start_soon(self._check_loop)
            task_status.started()

    async def _claim_loop(self) -> None:
        failures = 0
        sagas = sorted(self.registry.sagas)
        while True:
            await self._claim.wait()
            room = self.capacity - len(self._in_flight)
            if room <= 0:
                continue  # acknowledgements poke us again
            self.activity.begin()
            try:
                rows = await self.store.claim_inbox(
                    self.owner,
                    self.clock.now(),
                    room,
                    sagas=sagas,
                    mine=list(set(self._owned.values())),
                )
                failures = 0
                rejected = [row for row in rows if not self._hand_over(row)]
                if rejected:
                    letters = [self._dead_letter(row) for row in rejected]
                    await self.store.commit(Changes(dead_letters=letters))
                    report.dead_letters(letters, self.counters, self.hooks)
                    for row in rejected:
                        self._owned[row.pos] = (row.saga, row.key)
                        self._acks.append(row.pos)
                    self._mark_dirty()
            except Exception as exc:  # noqa: BLE001 - the next poll tries again
                failures += 1
                if failures == 1:
                    log.error("could not claim inbox rows: %s", error_text(exc))
                continue
            finally:
                self.activity.end()
            if len(rows) >= room:
                self._claim.poke()

    def _hand_over(self, row: InboxRecord) -> bool:
        """Put one claimed row in its shard's mailbox; `False` if it cannot be handled."""
        spec = self.registry.sagas.get(row.saga)
        try:
            event = self.registry.serializer.decode(row.type_name, row.payload)
        except SerializationError:
            return False
        handler = next((h for s, h, _ in self.registry.routes(type(event)) if s is spec), None)
        if spec is None or handler is None:
            return False
        self._owned[row.pos] = (row.saga, row.key)
        self._in_flight.add(row.pos)
        self.activity.begin()
        delivery = _Delivery(self, row)
        item = Item(EVENT, spec, row.key, event, handler, row.event_id, delivery, trace=row.trace)
        self.route(row.saga, row.key).put_unbounded(item)
        return True

    def _dead_letter(self, row: InboxRecord) -> DeadLetter:
        """A row no saga here can take (its type is unknown, or no handler takes it)."""
        try:
            self.registry.serializer.decode(row.type_name, row.payload)
            reason = f"saga {row.saga!r} does not handle {row.type_name!r} (any more)"
        except SerializationError as exc:
            reason = str(exc)
        return DeadLetter(
            f"{row.saga}:{row.key}:{row.event_id}",
            row.saga,
            row.key,
            "event",
            row.type_name,
            row.payload,
            reason,
            1,
            self.clock.now(),
        )

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            await self._flush_event.wait()
            await anyio.lowlevel.checkpoint()
            acks, self._acks = self._acks, []
            releases, self._releases = self._releases, []
            self._flush_event = anyio.Event()
            try:
                await self.store.ack_inbox(self.owner, acks)
                await self.store.release_inbox(self.owner, releases)
                for pos in (*acks, *releases):
                    self._owned.pop(pos, None)
                failures = 0
                if acks:
                    self.announce(_ACKED)
                self._claim.poke()  # the rows behind these may be ours to take now
                continue
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill the runtime
                # Until acknowledged, a handled row is delivered again once its lease
                # expires, and its dedup mark makes that a no-op.
                failures += 1
                log.error("could not acknowledge inbox rows: %s", error_text(exc))
                self._acks[:0] = acks
                self._releases[:0] = releases
            finally:
                self.activity.end()
            await self.clock.sleep_until(self.clock.now() + min(failures, 5))
            self._mark_dirty()

    async def _check_loop(self) -> None:
        """Answer publishers whose rows another process handled."""
        while True:
            await self._check.wait()
            positions = list(self._waiters)
            if not positions:
                continue
            try:
                pending = await self.store.pending_inbox(positions)
            except Exception as exc:  # noqa: BLE001 - the next poll tries again
                log.warning("could not read the inbox: %s", error_text(exc))
                continue
            for pos in positions:
                if pos not in pending:
                    self._resolve(pos)


@attrs.define(eq=False)
class Cluster:
    """The cluster-mode parts of one runtime, and the loops that tie them to the others.

    Build it, then use `outbox` and `timer` in place of the single-process ones and
    run `run` next to them.
    """

    store: ClusterStore
    registry: Registry
    dispatch: Callable[[Any, DispatchMeta], Any]
    policy: RetryPolicy
    clock: Clock
    activity: Activity
    counters: Counters
    on_failed: Callable[[OutboxRecord, Any], None]
    fire: Callable[[list[ScheduleRecord]], int]
    route: Callable[[str, str], Mailbox[Item]]
    concurrency: int = 16
    capacity: int = 1024
    hooks: Hooks | None = None
    dispatch_timeout: float | None = None
    owner: str = attrs.field(factory=make_owner)

    outbox: ClusterOutbox = attrs.field(init=False)
    timer: ClusterTimer = attrs.field(init=False)
    inbox: Inbox = attrs.field(init=False)
    _token: str = attrs.field(init=False)
    _pending: set[str] = attrs.field(factory=set, init=False)
    _announce_event: anyio.Event = attrs.field(factory=anyio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        self._token = uuid.uuid4().hex[:12]
        sagas = sorted(self.registry.sagas)
        self.outbox = ClusterOutbox(
            store=self.store,
            dispatch=self.dispatch,
            registry=self.registry,
            serializer=self.registry.serializer,
            policy=self.policy,
            activity=self.activity,
            counters=self.counters,
            on_failed=self.on_failed,
            owner=self.owner,
            clock=self.clock,
            announce=lambda: self.announce(_OUTBOX),
            concurrency=self.concurrency,
            capacity=self.capacity,
            hooks=self.hooks,
            dispatch_timeout=self.dispatch_timeout,
        )
        claims = _ScheduleClaims(self.store, self.owner, self.clock, sagas)
        self.timer = ClusterTimer(claims, self.clock, self.activity, self.fire)
        self.inbox = Inbox(
            store=self.store,
            registry=self.registry,
            owner=self.owner,
            clock=self.clock,
            activity=self.activity,
            route=self.route,
            announce=self.announce,
            counters=self.counters,
            capacity=self.capacity,
            hooks=self.hooks,
        )

    def next_wakeup(self) -> float:
        """For `drain()`: `-inf` while the inbox owes a look, else its next poll."""
        return self.inbox.next_wakeup()

    async def publish(
        self, event: object, targets: Sequence[_Target], id: str | None, trace: str | None
    ) -> None:
        """`Runtime.publish` in cluster mode: through the shared inbox."""
        await self.inbox.publish(event, targets, id, trace)

    def announce(self, kind: str) -> None:
        """Tell the other processes (soon, batched) that there is work of `kind`."""
        if kind not in self._pending:
            self._pending.add(kind)
            self._announce_event.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the inbox, the listener, the announcer and the lease keeper until cancelled.

        When cancelled (the runtime stops), it gives up the leases it still holds, so
        that other processes need not wait for them to expire.
        """
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.inbox.run)
                tg.start_soon(self._listen)
                tg.start_soon(self._announce_loop)
                tg.start_soon(self._keep_leases)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.store.lease_seconds):
                await self._release_all()

    async def _release_all(self) -> None:
        try:
            now = self.clock.now()
            await self.store.settle_commands(self.owner, now, released=self.outbox.leased_ids())
            await self.store.release_inbox(self.owner, self.inbox.leased())
            await self.store.release_schedules(self.timer.in_flight(), owner=self.owner)
        except Exception as exc:  # noqa: BLE001 - the leases expire anyway
            log.warning("could not give up leases when stopping: %s", error_text(exc))

    async def _announce_loop(self) -> None:
        while True:
            await self._announce_event.wait()
            self._announce_event = anyio.Event()
            kinds, self._pending = self._pending, set()
            try:
                await self.store.notify([kind + self._token for kind in sorted(kinds)])
            except Exception as exc:  # noqa: BLE001 - the others poll anyway
                log.warning("could not notify the other processes: %s", error_text(exc))

    def _woken(self, payload: str) -> None:
        kind, token = payload[:1], payload[1:]
        if token == self._token:
            return  # our own: the local parts were woken already
        if kind == _INBOX:
            self.inbox.poke()
        elif kind == _ACKED:
            self.inbox.acked_elsewhere()
        elif kind == _OUTBOX:
            self.outbox.poke()

    async def _listen(self) -> None:
        listener = self.store.listener()
        failures = 0
        try:
            while True:
                try:
                    payloads = await anyio.to_thread.run_sync(
                        listener.wait, 60.0, abandon_on_cancel=True
                    )
                except Exception as exc:  # noqa: BLE001 - polling goes on meanwhile
                    failures += 1
                    if failures == 1:
                        log.warning(
                            "cannot LISTEN for other processes (polling every %s s meanwhile): %s",
                            self.store.poll_interval,
                            error_text(exc),
                        )
                    await self.clock.sleep_until(self.clock.now() + min(2.0**failures, 30.0))
                    continue
                if failures:
                    log.info("listening for other processes again")
                    failures = 0
                    # What was announced while we were deaf: look now.
                    self.inbox.poke()
                    self.inbox.acked_elsewhere()
                    self.outbox.poke()
                for payload in payloads:
                    self._woken(payload)
        finally:
            listener.interrupt()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(listener.close)

    async def _keep_leases(self) -> None:
        """Renew the leases this process holds; end completed instances nobody ended."""
        interval = self.store.lease_seconds / 3
        sagas = sorted(self.registry.sagas)
        while True:
            await self.clock.sleep_until(self.clock.now() + interval)
            try:
                lost = await self.store.renew_leases(
                    self.owner,
                    self.clock.now(),
                    commands=self.outbox.leased_ids(),
                    schedules=self.timer.in_flight(),
                    inbox=self.inbox.leased(),
                )
                if lost:
                    log.warning(
                        "%d command(s) were taken over by another process: this one did "
                        "not renew its leases for %s s (is its event loop blocked?)",
                        len(lost),
                        self.store.lease_seconds,
                    )
                    self.outbox.lost(lost)
                # Instances completed in a process that died after dispatching their
                # last command but before ending them.
                await self.store.finish_completed(
                    None,
                    sagas=sagas,
                    limit=_FINISH_PAGE,
                    now=self.clock.now(),
                    tombstones=self.registry.tombstone_policies(),
                )
            except Exception as exc:  # noqa: BLE001 - try again next time
                log.error("could not renew leases: %s", error_text(exc))


def cluster_store(store: Store) -> ClusterStore:
    """`store` as a `ClusterStore`, or a `TypeError` saying what is missing.

    Raises:
        TypeError: The store cannot be shared by several processes.
    """
    if not isinstance(store, ClusterStore):
        raise TypeError(
            f"Runtime(cluster=True) needs a store that several processes can share, such "
            f"as PostgresStore; {store!r} is not one (use cluster=False with it)"
        )
    return store
