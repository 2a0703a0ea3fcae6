"""Shard workers: take a batch from the mailbox, handle it, and retry what must wait.

Every `(saga, key)` hashes to one shard, so the events of one instance are handled one
at a time and in order, while instances of different shards run concurrently. A shard
keeps a cache of instance states and holds back the later events of an instance whose
handler is waiting for a retry; the work on one batch is a `Batch` (`_batch.py`).
"""

from __future__ import annotations

import heapq
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

import anyio
import attrs

from . import _report as report
from ._associations import AssociationCache, resolve
from ._batch import EVENT, IF_ASSOCIATED, VIA, Batch, Item, Ref
from ._calls import Interrupt
from ._hooks import Hooks
from ._intake import Tracker
from ._outbox import Counters, Outbox, error_text
from ._records import Unmatched
from ._retry import RetryPolicy
from ._serialization import Serializer
from ._sync import Ack, Activity, Mailbox
from .exceptions import ConflictError, RuntimeClosedError, UnstorableError
from .stores._protocol import Changes, DeadLetter, InstanceRecord, Store

__all__ = ["Shard", "shard_index"]

log = logging.getLogger("sagaflow.runtime")


def shard_index(saga: str, key: str, shards: int) -> int:
    """The shard that handles instance `(saga, key)`, of `shards`."""
    return hash((saga, key)) % shards


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
    index: int = 0
    shards: int = 1
    """This shard's place among the runtime's shards, and how many there are."""
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
    associations: AssociationCache = attrs.field(init=False)
    """Association lookups of this shard's instances (empty when `cache_size` is 0)."""

    @associations.default
    def _association_cache(self) -> AssociationCache:
        return AssociationCache(self.cache_size)

    def owns(self, saga: str, key: str) -> bool:
        """Whether instance `(saga, key)` is handled by this shard."""
        return shard_index(saga, key, self.shards) == self.index

    @property
    def held_refs(self) -> Collection[Ref]:
        """The instances whose later events wait behind a handler retry."""
        return self._held.keys()

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

        Only `publish` and `run` wait on a plain `Ack` (or a `Tracker`, for `run(ack=...)`);
        due schedules and cluster inbox rows are in the store and are taken up again by
        the next start.
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
            if type(item.ack) is Ack or type(item.ack) is Tracker:
                item.ack.done(error)

    def _expand(self, items: list[Item]) -> list[Item]:
        """Put items behind a handler retry on hold, and release them behind it."""
        if not self._held:
            return items
        out: list[Item] = []
        for item in items:
            ref = (item.saga.name, item.key)
            if item.kind == VIA:
                self._park(item)
                out.append(item)
            elif item.retry:
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

    def _park(self, item: Item) -> None:
        """Put an `IF_ASSOCIATED` item of a `VIA` item behind each held instance of its
        saga: whether the event reaches it is decided once its earlier events are
        handled, since they may associate or dissociate it."""
        fanout = item.fanout
        assert fanout is not None and item.ack is not None
        parked = []
        for (saga, key), held in self._held.items():
            if saga == fanout.saga:
                held.append(item.for_instance(IF_ASSOCIATED, key))
                parked.append(key)
        item.parked = tuple(parked)
        item.ack.pending += len(parked)
        fanout.pending += len(parked)

    async def _process(self, items: list[Item]) -> None:
        items = self._expand(items)
        if not items:
            return
        self._current = items
        await self._handle(items)
        self._current = []  # (left as is when cancelled: `_abandon` needs them)

    async def _handle(self, items: list[Item]) -> None:
        error = await self._attempt(items)
        if error is None:
            return
        if len(items) > 1 and not isinstance(error, ConflictError):
            await self._isolate(items, error)
            return
        if len(items) == 1 and _refused(error):
            # Alone, nothing shows the store works: only an error about the data it was
            # given marks the event as poison; anything else fails it as the store's error.
            if items[0].kind == VIA:
                await self._split(items[0], error)
            else:
                await self._poison(items[0], error)
            return
        self._fail(items, error)

    async def _attempt(self, items: list[Item]) -> Exception | None:
        """Handle and commit `items` (again after lost races); the error if it failed."""
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
            except Exception as exc:  # noqa: BLE001 - the store failed: the caller decides
                self.outbox.give_back(*batch.carried)
                self._evict(batch.work)
                return exc
            batch.publish()
            return None
        log.error("gave up on a batch after %d conflicts", self.conflict_retries)
        return ConflictError([(i.saga.name, i.key) for i in items])

    async def _isolate(self, items: list[Item], error: Exception) -> None:
        """A batch failed to commit: commit its halves apart, down to the item that broke it.

        If both halves fail, the store itself is failing (not one item): every item of the
        batch fails with the error, as a whole batch would.
        """
        middle = len(items) // 2
        halves = (items[:middle], items[middle:])
        errors = [await self._attempt(half) for half in halves]
        if all(e is not None for e in errors):
            self._fail(items, error)
            return
        for half, failed in zip(halves, errors, strict=True):
            if failed is None:
                continue
            if isinstance(failed, ConflictError):
                self._fail(half, failed)
            elif len(half) == 1:
                # Its sibling committed, so the store works; once more, in case the store
                # hiccuped just then, before it counts as poison.
                again = await self._attempt(half)
                if isinstance(again, ConflictError):
                    self._fail(half, again)
                elif again is not None:
                    await self._poison(half[0], again)
            else:
                await self._isolate(half, failed)

    async def _split(self, item: Item, error: Exception) -> None:
        """The store refused the effects of a fan-out: deliver the event instance by
        instance instead, so that only those whose effects cannot be stored are kept as
        dead letters."""
        fanout = item.fanout
        assert fanout is not None and item.ack is not None
        try:
            keys = (await resolve(self, [fanout.lookup]))[fanout.lookup]
        except Exception as exc:  # noqa: BLE001 - the store fails: so does the event
            self._fail([item], exc)
            return
        # Those parked behind a handler retry get it when their turn comes (`_park`).
        items = [
            Item(
                EVENT,
                item.saga,
                key,
                item.event,
                item.handler,
                item.event_id,
                item.ack,
                trace=item.trace,
            )
            for key in keys
            if key not in item.parked
        ]
        self.activity.begin(len(items))
        item.ack.pending += len(items)
        if fanout.looked(len(items)):
            unmatched = Unmatched(item.event, item.saga.name, None, fanout.reason())
            report.unmatched([unmatched], self.counters, self.on_unmatched, self.hooks)
        self._finish(item)
        items = self._expand(items)
        if items:
            await self._handle(items)

    async def _poison(self, item: Item, error: Exception) -> None:
        """One item's effects cannot be stored: keep it as a dead letter, tell its
        publisher which event, saga and key it was, and go on."""
        if item.kind not in (EVENT, IF_ASSOCIATED):
            # A due schedule or a failed command: the runtime tries it again later.
            self._fail([item], error)
            return
        saga, key = item.saga.name, item.key
        event = item.event
        try:
            type_name, payload = self.serializer.encode(event)
        except Exception:  # noqa: BLE001 - the dead letter keeps what can be kept
            type_name, payload = type(event).__qualname__, json.dumps(repr(event))
        # Escaped, so that what broke the commit (a lone surrogate, a NUL) cannot break
        # the dead letter too.
        payload = json.dumps(json.loads(payload), ensure_ascii=True)
        what = f"{type(event).__name__} for saga {saga!r} key {key!r}"
        reason = f"the store refused it: {error_text(error)}"
        dead = False
        letter_id = uuid.uuid4().hex if item.event_id is None else f"{saga}:{key}:{item.event_id}"
        letter = DeadLetter(
            _storable(letter_id),
            _storable(saga),
            _storable(key),
            "event",
            _storable(type_name),
            payload,
            _storable(reason),
            1,
            self.clock.now(),
        )
        try:
            await self.store.commit(Changes(dead_letters=[letter]))
        except Exception as exc:  # noqa: BLE001 - then it is only reported
            log.error("could not keep %s as a dead letter: %s", what, error_text(exc))
        else:
            dead = True
            report.dead_letters([letter], self.counters, self.hooks)
        if not dead:
            log.error(
                "could not commit %s: %s",
                what,
                reason,
                extra={"saga": saga, "key": key, "event_type": type(event).__name__},
            )
        unstorable = UnstorableError(
            f"{what} could not be stored: {reason}; "
            + (
                "it was kept as a dead letter, the rest of its batch was committed"
                if dead
                else "the rest of its batch was committed"
            ),
            saga=saga,
            key=key,
            type_name=type_name,
            dead_lettered=dead,
        )
        unstorable.__cause__ = error
        if item.ack is not None:
            item.ack.poisoned(unstorable, dead)
        self.activity.end()

    def _fail(self, items: list[Item], error: Exception) -> None:
        if not isinstance(error, ConflictError):
            log.error("could not commit a batch of %d item(s): %s", len(items), error_text(error))
        for item in items:
            self._finish(item, error)

    def _evict(self, work: dict[Ref, Any]) -> None:
        """Drop what a failed batch touched: the store may have moved on."""
        for ref in work:
            self.cache.pop(ref, None)
            self.associations.evict(ref)

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


_REFUSALS = frozenset(("DataError", "IntegrityError", "InterfaceError", "ProgrammingError"))


def _refused(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a store refusing the data it was given
    (an encoding or type error, a DB-API data error), not the store failing."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, UnicodeError | TypeError | ValueError) and not isinstance(
            seen, OSError
        ):
            return True
        if _REFUSALS.intersection(c.__name__ for c in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _storable(text: str) -> str:
    """`text` with what no store takes escaped: lone surrogates and NULs."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
