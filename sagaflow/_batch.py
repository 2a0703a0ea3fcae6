"""One pass of a shard over a batch: load, run handlers, collect changes, commit, hand over.

A batch is handled against working copies; only a successful commit makes it visible
(cache, outbox, timer, publishers), so a failed or conflicting commit leaves nothing
behind. The shard (`_shard.py`) takes items from its mailbox and runs batches, again
after a lost concurrency race.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs

from . import _report as report
from ._actions import (
    Associate,
    CommandFailed,
    Compensate,
    Complete,
    Dissociate,
    Schedule,
    Send,
    Unschedule,
)
from ._associations import Fanout, Lookup, resolve
from ._calls import call
from ._hooks import capture, handling_span
from ._outbox import error_text
from ._records import Outcome, Unmatched
from ._registry import RECORD_FIELDS, HandlerSpec, SagaSpec
from ._replies import reply_suffix
from ._sync import Ack
from .exceptions import ActionError, DecodeError, SerializationError
from .stores._protocol import (
    ACTIVE,
    COMPENSATE,
    COMPENSATION_FAILED,
    COMPLETED,
    COMPLETING,
    SEND,
    Association,
    Changes,
    DeadLetter,
    DedupMark,
    InstanceDelete,
    InstanceRecord,
    InstanceWrite,
    Loaded,
    LoadRequest,
    OutboxRecord,
    OutboxUpdate,
    ScheduleDelete,
    ScheduleRecord,
    Tombstone,
    TombstoneWrite,
)

if TYPE_CHECKING:
    from ._shard import Shard

__all__ = [
    "EVENT",
    "FAILED",
    "FINALIZE",
    "FIRE",
    "IF_ASSOCIATED",
    "VIA",
    "Batch",
    "Item",
    "Ref",
]

log = logging.getLogger("sagaflow.runtime")

EVENT, FIRE, FAILED, FINALIZE, VIA, IF_ASSOCIATED = range(6)
# Outcomes as plain names: set once per event on the hot path.
_COMMITTED, _DUPLICATE, _UNMATCHED, _DEAD_LETTERED = (
    Outcome.COMMITTED,
    Outcome.DUPLICATE,
    Outcome.UNMATCHED,
    Outcome.DEAD_LETTERED,
)
_SEQ_BITS = 16
_MAX_OUTPUTS = 1 << _SEQ_BITS
Ref = tuple[str, str]
"""An instance: `(saga name, key)`."""


@attrs.define(eq=False, slots=True)
class Item:
    """One unit of work for a shard: an event, a due schedule, a failed command, the
    end of a completing instance's outbox, or an event routed via an association (`VIA`:
    `key` is the value looked up, `fanout` the tally the shards share; the batch hands
    the event to each of this shard's instances associated with it). `IF_ASSOCIATED`:
    the event of a `VIA` item for instance `key`, which waited behind a handler retry of
    the instance; it is handled if the instance is associated with the value when its
    turn comes (what the events before it did decides)."""

    kind: int
    saga: SagaSpec
    key: str
    event: Any = None
    handler: HandlerSpec | None = None
    event_id: str | None = None
    ack: Ack | None = None
    schedule: ScheduleRecord | None = None
    row: OutboxRecord | None = None
    attempts: int = 0
    retry: bool = False
    outcome: Outcome = _COMMITTED
    """How an event was settled by the batch that committed it (for `run(ack=...)`)."""
    trace: str | None = None
    """The trace context the event was published in (`Hooks.capture_trace`), as text."""
    fanout: Fanout | None = None
    parked: tuple[str, ...] = ()
    """`VIA`: keys of the instances that got an `IF_ASSOCIATED` item behind their retry
    before the batch (`Shard._expand`)."""

    def for_instance(self, kind: int, key: str) -> Item:
        """The event of this `VIA` item for one instance: an `EVENT` to handle now, or
        an `IF_ASSOCIATED` to decide when its turn comes (it keeps the fan-out tally)."""
        fanout = self.fanout if kind == IF_ASSOCIATED else None
        return Item(
            kind,
            self.saga,
            key,
            self.event,
            self.handler,
            self.event_id,
            self.ack,
            trace=self.trace,
            fanout=fanout,
        )


class _Work:
    """The working copy of one instance during a batch (made per event: a plain class
    whose instances set only what differs from the defaults below)."""

    broken: DecodeError | None = None
    corrupt = False  # the record itself (version, status) is unreadable
    dirty = False
    deleted = False
    blocked = False
    failed: OutboxRecord | None = None
    became_completing = False
    handler_error: str | None = None
    puts: list[str] | None = None  # schedule names put in this batch
    # A finished instance: its tombstone (as loaded: `tomb_version`), updated by the
    # late events handled in this batch (`tomb_dirty`).
    tombstone: Tombstone | None = None
    tomb_version = 0
    tomb_dirty = False
    rows: list[OutboxRecord] | None = None  # the outbox rows it produced (`output`)
    commands: list[Any] | None = None  # their commands, decoded

    def __init__(
        self,
        spec: SagaSpec,
        key: str,
        start_version: int,
        record: InstanceRecord | None,
        state: Any = None,
    ) -> None:
        self.spec = spec
        self.key = key
        self.start_version = start_version
        self.record = record
        self.state = state

    def output(self) -> tuple[list[OutboxRecord], list[Any]]:
        """The instance's own lists of outbox rows and their commands, made on first use."""
        rows, commands = self.rows, self.commands
        if rows is None or commands is None:
            rows = self.rows = []
            commands = self.commands = []
        return rows, commands

    def put(self, name: str) -> None:
        if self.puts is None:
            self.puts = [name]
        else:
            self.puts.append(name)


class _Rejected(Exception):
    """A handler's result cannot be applied and retrying will not help."""


@attrs.define(eq=False)
class Batch:
    """One pass over a batch of items; thrown away if its commit does not succeed."""

    shard: Shard
    items: list[Item]
    work: dict[Ref, _Work] = attrs.field(factory=dict)
    now: float = 0.0
    loaded: Loaded | None = None
    writes: list[InstanceWrite] = attrs.field(factory=list)
    schedule_ops: dict[tuple[str, str, str], ScheduleRecord | None] = attrs.field(factory=dict)
    clears: list[Ref] = attrs.field(factory=list)
    dead: list[DeadLetter] = attrs.field(factory=list)
    marks: dict[tuple[str, str, str], DedupMark] = attrs.field(factory=dict)
    outbox_deletes: list[str] = attrs.field(factory=list)
    done: list[Item] = attrs.field(factory=list)
    deferred: list[tuple[Item, float]] = attrs.field(factory=list)
    held: list[Item] = attrs.field(factory=list)
    again: list[Item] = attrs.field(factory=list)
    unmatched: list[Unmatched] = attrs.field(factory=list)
    taken_failures: list[OutboxRecord] = attrs.field(factory=list)  # by CommandFailed handlers
    handled: int = 0
    commit_seconds: float = 0.0
    outbox_adds: list[OutboxRecord] = attrs.field(factory=list)
    carried: tuple[list[str], list[OutboxUpdate]] = attrs.field(factory=lambda: ([], []))
    commands: list[Any] = attrs.field(factory=list)  # the decoded `outbox_adds`
    # Association changes of this batch: `{(saga, name, value): {key: put?}}`.
    associating: dict[Lookup, dict[str, bool]] = attrs.field(factory=dict)
    association_puts: list[Association] = attrs.field(factory=list)
    association_deletes: list[Association] = attrs.field(factory=list)
    associated: dict[Lookup, list[str]] = attrs.field(factory=dict)  # looked up at start
    # VIA items, with how many items they made, instances found and instances waiting
    fanned: list[tuple[Item, int, int, int]] = attrs.field(factory=list)
    decided: list[tuple[Item, bool]] = attrs.field(factory=list)  # IF_ASSOCIATED: reached?
    blocked: list[_Work] = attrs.field(factory=list)  # instances whose handler waits to retry

    async def run(self) -> None:
        outbox = self.shard.outbox
        outbox.begin_carrying()
        try:
            await self._handle_items()
            # The outbox's pending records ride along in this batch's transaction.
            self.carried = outbox.take_records()
        finally:
            outbox.end_carrying()
        changes = self._changes()
        if changes:
            started = time.perf_counter()
            await self.shard.store.commit(changes)
            self.commit_seconds = time.perf_counter() - started

    async def _handle_items(self) -> None:
        shard = self.shard
        self.now = shard.clock.now()
        cache = shard.cache
        work = self.work
        works: list[_Work] = []  # the working copy of each item's instance
        missing: list[Ref] = []
        marks: list[tuple[str, str, str]] = []
        schedule_ids: list[str] = []
        vias: list[Item] = []
        lookups: list[Item] = []  # VIA and IF_ASSOCIATED items

        def work_of(spec: SagaSpec, key: str) -> _Work:
            ref = (spec.name, key)
            w = work.get(ref)
            if w is None:
                hit = cache.get(ref)
                if hit is None:
                    missing.append(ref)
                    w = _Work(spec, key, 0, None)
                else:
                    cache.move_to_end(ref)
                    w = _Work(spec, key, hit[0].version, hit[0], hit[1])
                work[ref] = w
            return w

        for item in self.items:
            if item.kind == VIA:
                vias.append(item)
                lookups.append(item)
                works.append(_NO_WORK)
                continue
            if item.kind == IF_ASSOCIATED:
                lookups.append(item)
            works.append(work_of(item.saga, item.key))
            if item.event_id is not None:
                marks.append((item.saga.name, item.key, item.event_id))
            if item.schedule is not None:
                schedule_ids.append(item.schedule.id)
        if lookups:
            # The instances each fan-out reaches are loaded with the others, in one read.
            self.associated = await resolve(shard, [_fanout(i).lookup for i in lookups])
            for item in vias:
                f = _fanout(item)
                for key in self.associated[f.lookup]:
                    work_of(item.saga, key)
                    if item.event_id is not None:
                        marks.append((f.saga, key, item.event_id))
        if missing or marks or schedule_ids:
            self.loaded = await shard.store.load(
                LoadRequest(missing, marks, schedule_ids, self.now)
            )
            for ref, record in self.loaded.instances.items():
                w = self.work[ref]
                w.record, w.start_version = record, record.version
                try:
                    w.state = w.spec.load_record(shard.serializer, record)
                except DecodeError as exc:
                    w.broken = exc
                    w.corrupt = exc.field in RECORD_FIELDS
                    log.error("%s", exc, extra={"saga": ref[0], "key": ref[1]})
            for ref, tombstone in self.loaded.tombstones.items():
                w = self.work[ref]
                w.tombstone, w.tomb_version = tombstone, tombstone.version

        for item, w in zip(self.items, works, strict=True):
            if item.kind == VIA:
                await self._fan_out(item)
            elif w.blocked:
                self.held.append(item)
            elif w.deleted:
                self.again.append(item)
            elif item.kind == EVENT or (item.kind == IF_ASSOCIATED and await self._decide(item)):
                handler = self._admit(w, item)
                if handler is not None:
                    late = handler.late
                    applied = await self._handle(w, item, handler, item.event, not late, late=late)
                    if applied and item.event_id is not None:
                        self._applied(w, item.event_id)
            elif item.kind == IF_ASSOCIATED:
                self.done.append(item)  # not associated (any more): not for this instance
            elif item.kind == FIRE:
                await self._fire(w, item)
            elif item.kind == FAILED:
                await self._failed(w, item)
            else:
                self._finalize(w, item)

    # -- items ---------------------------------------------------------------------

    async def _fan_out(self, item: Item) -> None:
        """Hand a `VIA` item's event to each instance of this shard associated with its
        value now.

        An instance whose earlier events wait behind a handler retry gets it once they
        are handled (`IF_ASSOCIATED`), if it is associated with the value then: those
        events may associate or dissociate it. (`Shard._expand` parked those items for
        the instances waiting when the batch began, in their order.)
        """
        f = item.fanout
        assert f is not None and item.handler is not None
        targets = await self._associated_now(item)
        waiting: set[str] = set()
        blocked: set[str] = set()
        if item.parked or self.blocked:
            waiting.update(item.parked)
            # Instances whose handler is to be retried since this batch: the same, here.
            blocked = {
                w.key for w in self.blocked if w.spec.name == f.saga and w.key not in waiting
            }
            waiting |= blocked
        for key in sorted(blocked):
            self.held.append(item.for_instance(IF_ASSOCIATED, key))
        made = len(blocked)
        found = 0
        for key in targets:
            if waiting and key in waiting:
                continue
            found += 1
            w = self.work[(f.saga, key)]
            one = item.for_instance(EVENT, key)
            made += 1
            handler = self._admit(w, one)
            if handler is not None:
                late = handler.late
                applied = await self._handle(w, one, handler, item.event, not late, late=late)
                if applied and item.event_id is not None:
                    self._applied(w, item.event_id)
        self.fanned.append((item, made, found, len(blocked)))
        self.done.append(item)

    async def _decide(self, item: Item) -> bool:
        """Whether an `IF_ASSOCIATED` item's instance is associated with its value now."""
        reached = item.key in await self._associated_now(item)
        self.decided.append((item, reached))
        return reached

    async def _associated_now(self, item: Item) -> list[str]:
        """The keys of this shard's live instances associated with the value of a `VIA`
        or `IF_ASSOCIATED` item now: as looked up when the batch began, changed by what
        the batch did before it (associations made or removed, instances ended)."""
        f = item.fanout
        assert f is not None
        lookup = (f.saga, f.name, f.value)
        looked_up = self.associated[lookup]
        changed = self.associating.get(lookup)
        if changed is None:
            keys = looked_up
        else:
            now = set(looked_up)
            for key, put in changed.items():
                if put:
                    now.add(key)
                else:
                    now.discard(key)
            keys = sorted(now)
        work = self.work
        targets = [key for key in keys if (w := work.get((f.saga, key))) is None or not w.deleted]
        if changed is not None and item.event_id is not None and item.kind == VIA:
            # Associated earlier in this batch: their dedup marks were not read yet.
            unread = [(f.saga, key, item.event_id) for key in set(keys).difference(looked_up)]
            if unread:
                extra = await self.shard.store.load(LoadRequest(marks=unread, now=self.now))
                if self.loaded is None:
                    self.loaded = extra
                else:
                    self.loaded.marks.update(extra.marks)
        return targets

    def _admit(self, w: _Work, item: Item) -> HandlerSpec | None:
        """The handler the event goes to; if none, settle it here (a plain function,
        so the common path awaits only the handling itself)."""
        handler = item.handler
        assert handler is not None
        if item.event_id is not None:
            mark = (w.spec.name, w.key, item.event_id)
            if mark in self.marks or (self.loaded is not None and mark in self.loaded.marks):
                self.shard.counters.events_duplicate += 1
                item.outcome = _DUPLICATE
                self.done.append(item)
                return None
        if w.broken is not None:
            self._dead_event(w, item, str(w.broken))
            return None
        record = w.record
        if record is None:
            if w.tombstone is not None:
                return self._after_end(w, item, w.tombstone)
            if not handler.start:
                self._unmatched(item, "no live instance and the handler is not start=True")
                return None
        elif record.status == COMPLETING:
            late = w.spec.late_handler_for(type(item.event))
            if late is None:
                self._unmatched(item, "the instance has completed", COMPLETED)
            return late
        elif record.status == COMPENSATION_FAILED:
            self._dead_event(w, item, "the instance's compensation failed; retry or abort it first")
            return None
        elif handler.late:
            self._unmatched(
                item,
                f"only a late=True handler takes {type(item.event).__name__}, and the "
                "instance has not completed",
            )
            return None
        return handler

    def _after_end(self, w: _Work, item: Item, tombstone: Tombstone) -> HandlerSpec | None:
        """The handler an event for a finished instance goes to, if any: a start handler
        of a saga that reuses keys, or a late handler with the final state."""
        handler = item.handler
        assert handler is not None
        spec = w.spec
        if handler.start and spec.reuse_keys:
            return handler
        late = spec.late_handler_for(type(item.event))
        if tombstone.ended != COMPLETED:
            reason = f"the instance was {tombstone.ended} by an operator"
        elif late is not None and tombstone.state is not None:
            if w.state is None:
                try:
                    w.state = spec.load_state(
                        self.shard.serializer, w.key, tombstone.state, tombstone.state_version
                    )
                except DecodeError as exc:
                    self._dead_event(w, item, str(exc))
                    return None
            return late
        elif late is not None:
            reason = (
                "the instance has completed, and its tombstone holds no final state for "
                f"the late=True handler {late.method} (the saga had no late handler when "
                "the instance ended)"
            )
        elif handler.start:
            reason = (
                f"the instance has completed, and saga {spec.name!r} does not reuse keys: "
                "a start event does not begin a new instance for a finished key while its "
                "tombstone counts (register the saga with reuse_keys=True to allow it)"
            )
        else:
            reason = "the instance has completed"
        self._unmatched(item, reason, tombstone.ended)
        return None

    def _applied(self, w: _Work, event_id: str) -> None:
        """An event with an id was applied: remember it (dedup)."""
        saga, key = w.spec.name, w.key
        self.marks[(saga, key, event_id)] = DedupMark(
            saga, key, event_id, self.now + self.shard.dedup_retention
        )

    async def _fire(self, w: _Work, item: Item) -> None:
        s = item.schedule
        assert s is not None and self.loaded is not None
        skey = (s.saga, s.key, s.name)
        if s.id not in self.loaded.schedule_ids or skey in self.schedule_ops:
            self.done.append(item)  # replaced, cancelled or already fired
            return
        if w.record is None or w.record.status != ACTIVE:
            # Schedules go with Complete; one left over cannot be delivered any more.
            state = "gone" if w.record is None else w.record.status
            self._dead_schedule(
                w, item, f"schedule {s.name!r} fell due but the instance is {state}"
            )
            return
        if w.broken is not None and (s.to_self or w.corrupt):
            # Held: the instance's state cannot be decoded by this code. The timer waits
            # as a dead letter with the true reason; retrying it schedules it again.
            self._dead_schedule(
                w, item, f"schedule {s.name!r} fell due but the instance is held: {w.broken}"
            )
            return
        try:
            message = self.shard.serializer.decode(s.type_name, s.payload, saga=s.saga, key=s.key)
        except SerializationError as exc:
            self._dead_schedule(w, item, str(exc))
            return
        item.event = message
        if not s.to_self:
            self.schedule_ops[skey] = None
            version = w.record.version + 1
            command = message
            rows, commands = w.output()
            rows.append(
                OutboxRecord(
                    s.id,
                    s.saga,
                    s.key,
                    version << _SEQ_BITS,
                    SEND,
                    s.type_name,
                    s.payload,
                    trace=s.trace,
                )
            )
            commands.append(command)
            w.record = attrs.evolve(w.record, version=version, updated_at=self.now)
            w.dirty = True
            self.done.append(item)
            return
        handler = w.spec.handler_for(type(item.event))
        if handler is None:
            self._dead_schedule(
                w,
                item,
                f"saga {w.spec.name!r} has no handler for its scheduled {s.type_name!r} any more",
            )
            return
        item.attempts = s.attempts
        ok = await self._handle(w, item, handler, item.event, allow_schedule=True, fire=s)
        if ok:
            self.schedule_ops.setdefault(skey, None)

    def _dead_schedule(self, w: _Work, item: Item, error: str) -> None:
        """A due schedule cannot be delivered: drop it, keep it as a dead letter."""
        s = item.schedule
        assert s is not None
        self.schedule_ops[(s.saga, s.key, s.name)] = None
        kind = "event" if s.to_self else "send"
        seq = s.seq if s.to_self else 0
        self._dead(w, item, s.type_name, s.payload, kind, error, s.attempts + 1, seq, s.name)
        self.done.append(item)

    async def _failed(self, w: _Work, item: Item) -> None:
        row = item.row
        assert row is not None
        error = row.error or "unknown error"
        handler = w.spec.handler_for(CommandFailed)
        usable = w.record is not None and w.broken is None and item.event is not None
        if usable and handler is not None:
            assert w.record is not None
            event = CommandFailed(item.event, error, row.attempts)
            allow = w.record.status == ACTIVE and not w.record.completed
            w.handler_error = None
            await self._handle(w, item, handler, event, allow_schedule=allow, failure=True)
            if w.blocked:
                return  # tried again later; nothing of the failure is applied yet
            if w.handler_error is not None:
                error = f"{error}; then the CommandFailed handler failed: {w.handler_error}"
        else:
            self.done.append(item)
            if w.record is None:
                ended = "gone" if w.tombstone is None else f"{w.tombstone.ended}"
                error = f"{error}; the instance is {ended}"
        self.outbox_deletes.append(row.id)
        w.failed = row
        if row.kind == COMPENSATE or not usable or handler is None or w.handler_error:
            self._dead(w, item, row.type_name, row.payload, row.kind, error, row.attempts, row.seq)
        else:
            self.taken_failures.append(row)
        if row.kind == COMPENSATE and w.record is not None:
            bump = 0 if w.dirty and w.record.version > w.start_version else 1
            w.record = attrs.evolve(
                w.record,
                version=w.record.version + bump,
                status=COMPENSATION_FAILED,
                updated_at=self.now,
            )
            w.became_completing = False
            w.dirty = True

    def _finalize(self, w: _Work, item: Item) -> None:
        ref = (w.spec.name, w.key)
        if (
            w.record is not None
            and w.record.status == COMPLETING
            and not w.rows
            and not self.shard.outbox.has_pending(ref)
        ):
            w.deleted = True
        self.done.append(item)

    # -- handling ------------------------------------------------------------------

    async def _handle(
        self,
        w: _Work,
        item: Item,
        handler: HandlerSpec,
        event: Any,
        allow_schedule: bool,
        *,
        fire: ScheduleRecord | None = None,
        failure: bool = False,
        late: bool = False,
    ) -> bool:
        """Run a handler on the working copy; returns whether its result was applied.

        With `late`, the handler gets the state of an instance that has completed, read
        only: its live record (completing), or else its tombstone.
        """
        shard = self.shard
        spec = w.spec
        record = w.record
        tombstone = None
        if record is None:
            if late:
                tombstone = w.tombstone
                assert tombstone is not None
                record = _from_tombstone(tombstone)
                state = w.state
            else:
                # A key reused after a finished instance goes on from its last version,
                # so that the new commands sort after the late ones of the old.
                first = 0 if w.tombstone is None else w.tombstone.version
                record = InstanceRecord(
                    spec.name, w.key, first, ACTIVE, "", _instance_id(self.now), self.now, self.now
                )
                state = spec.new_state()
        else:
            state = w.state
        frozen = shard.serializer.dumps(state, spec.state_name) if late else None
        version = record.version + 1
        hooks = shard.hooks
        # The trace this event carries (a due timer's or a failed command's for those);
        # what the handler produces carries its span's.
        trace = item.trace
        if trace is None:
            if fire is not None:
                trace = fire.trace
            elif failure and item.row is not None:
                trace = item.row.trace
        span = (
            None
            if hooks is None
            else handling_span(hooks, spec.name, w.key, event, record.instance_id, trace)
        )
        try:
            if span is None:
                result = handler.fn(state, event)
                if handler.is_async:
                    result = await self._call(result, handler, event, w.key)
            else:
                with span:
                    result = handler.fn(state, event)
                    if handler.is_async:
                        result = await self._call(result, handler, event, w.key)
                    trace = capture(hooks) or trace
            record = self._apply(
                w, record, state, result, version, allow_schedule, event, handler, trace, frozen
            )
        except _Rejected as exc:
            self._restore(w)
            cause = exc.__cause__ or exc
            self._give_up(w, item, event, fire, error_text(cause), failure, item.attempts + 1)
            return False
        except Exception as exc:
            self._restore(w)
            attempts = item.attempts + 1
            policy = handler.retry or shard.policy
            error = error_text(exc)
            extra = {"saga": spec.name, "key": w.key, "event_type": type(event).__name__}
            if policy.gives_up_after(attempts):
                log.error(
                    "handler %s of saga %r failed for good on %s (key %r): %s",
                    handler.method,
                    spec.name,
                    type(event).__name__,
                    w.key,
                    error,
                    extra=extra,
                    exc_info=exc,
                )
                self._give_up(w, item, event, fire, error, failure, attempts)
                return False
            shard.counters.handler_retries += 1
            if hooks is not None:
                hooks.handler_retry(spec.name, w.key, event, attempts, error)
            due = self.now + policy.delay(attempts)
            log.warning(
                "handler %s of saga %r raised on %s (key %r), attempt %d, retrying: %s",
                handler.method,
                spec.name,
                type(event).__name__,
                w.key,
                attempts,
                error,
                extra=extra,
            )
            if fire is not None:
                # A due schedule retries durably: it is moved back, not held in memory.
                self.schedule_ops[(fire.saga, fire.key, fire.name)] = attrs.evolve(
                    fire, due=due, attempts=attempts
                )
                w.put(fire.name)
                self.done.append(item)
                return False
            item.attempts = attempts
            w.blocked = True
            self.blocked.append(w)
            self.deferred.append((item, due))
            return False
        if tombstone is not None:
            w.tombstone = attrs.evolve(tombstone, version=record.version)
            w.tomb_dirty = True
            self.handled += 1
            item.outcome = _COMMITTED
            self.done.append(item)
            return True
        w.record = record
        w.state = state
        w.dirty = True
        if late and w.rows:
            # Commands added to a completing instance: it ends once they are out too.
            w.became_completing = True
        if w.became_completing and not w.rows and not shard.outbox.has_pending((spec.name, w.key)):
            w.deleted = True  # nothing left to dispatch: the instance ends now
        self.handled += 1
        item.outcome = _COMMITTED
        self.done.append(item)
        return True

    async def _call(self, result: Any, handler: HandlerSpec, event: Any, key: str) -> Any:
        """Await an async handler within `handler_timeout` (see `_calls.call`)."""
        return await call(
            result,
            self.shard.handler_timeout,
            lambda: (
                f"handler {handler.method} of saga {handler.saga!r} on "
                f"{type(event).__name__} (key {key!r})"
            ),
            "handler_timeout",
        )

    def _restore(self, w: _Work) -> None:
        """Undo a failed handler's changes to the state object."""
        if w.record is not None:
            w.state = w.spec.load_state(
                self.shard.serializer, w.key, w.record.state, w.record.state_version
            )
        elif w.tombstone is not None and w.tombstone.state is not None:
            w.state = w.spec.load_state(
                self.shard.serializer, w.key, w.tombstone.state, w.tombstone.state_version
            )

    def _give_up(
        self,
        w: _Work,
        item: Item,
        event: Any,
        fire: ScheduleRecord | None,
        error: str,
        failure: bool,
        attempts: int,
    ) -> None:
        if fire is not None:
            self.schedule_ops[(fire.saga, fire.key, fire.name)] = None
        if failure:
            w.handler_error = error  # _failed dead-letters the command itself
            self.done.append(item)
            return
        self._dead_event(w, item, error, attempts, event)

    def _apply(
        self,
        w: _Work,
        record: InstanceRecord,
        state: Any,
        result: Any,
        version: int,
        allow_schedule: bool,
        event: Any,
        handler: HandlerSpec,
        trace: str | None,
        frozen: str | None = None,
    ) -> InstanceRecord:
        """Turn a handler's result into outbox rows, schedule and association changes.

        `frozen` is the state's JSON before a late handler ran: it may not change.

        Raises:
            _Rejected: The result cannot be applied (not an action, a Schedule where
                none is allowed, a value that cannot be serialized, an action or a
                state change a late handler may not make, an association that is not
                made of strings).
        """
        spec, key = w.spec, w.key
        ser = self.shard.serializer
        prefix = f"{record.instance_id}.{version}."
        # Command ids of sagas that correlate replies say which instance sent them.
        suffix = reply_suffix(spec.name, key) if spec.replies else None
        base = version << _SEQ_BITS
        rows, commands = w.rows, w.commands
        if rows is None or commands is None:  # (`_Work.output`, spelled out)
            rows = w.rows = []
            commands = w.commands = []
        first_row = len(rows)  # rows of earlier events of this batch stay
        outputs = 0
        # (name, record or None for Unschedule), in the order the handler returned them
        schedule_ops: list[tuple[str, ScheduleRecord | None]] | None = None
        scheduled = False
        complete = False
        associating: list[tuple[str, str, bool]] | None = None
        encode = ser.encode
        cls = type(result)
        if cls is list or cls is tuple:
            actions = result
        elif cls in _ACTIONS:
            actions = (result,)
        else:
            actions = _actions(result, w, event)
        try:
            for action in actions:
                cls = type(action)
                if cls is Send or cls is Compensate:
                    kind = SEND if cls is Send else COMPENSATE
                    for command in (action.command,) if cls is Send else action.commands:
                        type_name, payload = encode(command)
                        rows.append(
                            OutboxRecord(
                                prefix + str(outputs)
                                if suffix is None
                                else _id(prefix, outputs, suffix),
                                spec.name,
                                key,
                                base | outputs,
                                kind,
                                type_name,
                                payload,
                                trace=trace,
                            )
                        )
                        commands.append(command)
                        outputs += 1
                elif cls is Schedule:
                    if frozen is not None:
                        raise self._reject(w, event, _late_only(cls))
                    if not allow_schedule or complete or record.completed:
                        raise self._reject(
                            w, event, "Schedule cannot be returned by a completing instance"
                        )
                    if action.to_self and spec.handler_for(type(action.message)) is None:
                        raise self._reject(
                            w,
                            event,
                            f"Schedule(to_self=True) of {type(action.message).__name__}, "
                            "which this saga has no handler for",
                        )
                    type_name, payload = encode(action.message)
                    sid = prefix + str(outputs) if suffix is None else _id(prefix, outputs, suffix)
                    schedule = ScheduleRecord(
                        sid,
                        spec.name,
                        key,
                        action.name or sid,
                        self.now + action.after,
                        action.to_self,
                        type_name,
                        payload,
                        base | outputs,
                        trace=trace,
                    )
                    outputs += 1
                    scheduled = True
                    if schedule_ops is None:
                        schedule_ops = []
                    schedule_ops.append((schedule.name, schedule))
                elif cls is Unschedule:
                    if frozen is not None:
                        raise self._reject(w, event, _late_only(cls))
                    if schedule_ops is None:
                        schedule_ops = []
                    schedule_ops.append((action.name, None))
                elif cls is Associate or cls is Dissociate:
                    if frozen is not None:
                        raise self._reject(w, event, _late_only(cls))
                    name, value = action.name, action.value
                    if type(name) is not str or not name or type(value) is not str:
                        raise self._reject(w, event, _bad_association(action, handler))
                    if associating is None:
                        associating = []
                    associating.append((name, value, cls is Associate))
                elif cls is Complete:
                    if frozen is not None:
                        raise self._reject(w, event, _late_only(cls))
                    if scheduled:
                        raise self._reject(
                            w, event, "Schedule cannot be returned together with Complete"
                        )
                    complete = True
                else:
                    raise self._reject(w, event, _not_an_action(action))
            if outputs > _MAX_OUTPUTS:
                raise self._reject(w, event, f"more than {_MAX_OUTPUTS} commands at once")
            state_json = ser.dumps(state, spec.state_name)
            if frozen is not None and state_json != frozen:
                raise self._reject(
                    w,
                    event,
                    "a late=True handler gets the final state read-only, but this one "
                    "changed it (the instance has completed: nothing would keep the change)",
                )
        except SerializationError as exc:
            del rows[first_row:], commands[first_row:]
            raise self._reject(w, event, str(exc))  # noqa: B904 - the ActionError is its cause
        except BaseException:
            del rows[first_row:], commands[first_row:]
            raise

        if schedule_ops is not None or complete:
            ops = self.schedule_ops
            for name, op in schedule_ops or ():
                ops[(spec.name, key, name)] = op
                if op is not None:
                    w.put(name)
            if complete and not record.completed:
                # Clears apply before puts: drop this instance's puts of this batch.
                for name in w.puts or ():
                    ops.pop((spec.name, key, name), None)
                self.clears.append((spec.name, key))
        for name, value, put in associating or ():
            self.associating.setdefault((spec.name, name, value), {})[key] = put
        status = record.status
        if complete and status == ACTIVE:
            status = COMPLETING
            w.became_completing = True
        event_type = type(event)
        return InstanceRecord(
            spec.name,
            key,
            version,
            status,
            state_json,
            record.instance_id,
            record.created_at,
            self.now,
            None if event_type is CommandFailed else ser.name_of(event_type),
            record.completed or complete,
            spec.version,
        )

    @staticmethod
    def _reject(w: _Work, event: Any, message: str) -> _Rejected:
        exc = _Rejected(message)
        exc.__cause__ = ActionError(
            f"saga {w.spec.name!r} key {w.key!r} handling {type(event).__name__}: {message}",
            saga=w.spec.name,
            key=w.key,
        )
        return exc

    # -- outcomes ------------------------------------------------------------------

    def _unmatched(self, item: Item, reason: str, ended: str | None = None) -> None:
        self.unmatched.append(Unmatched(item.event, item.saga.name, item.key, reason, ended))
        item.outcome = _UNMATCHED
        self.done.append(item)

    def _dead_event(
        self, w: _Work, item: Item, error: str, attempts: int | None = None, event: Any = None
    ) -> None:
        event = item.event if event is None else event
        try:
            type_name, payload = self.shard.serializer.encode(event)
        except SerializationError:
            type_name, payload = type(event).__qualname__, repr(event)
        self._dead(
            w,
            item,
            type_name,
            payload,
            "event",
            error,
            item.attempts + 1 if attempts is None else attempts,
        )
        item.outcome = _DEAD_LETTERED
        self.done.append(item)

    def _dead(
        self,
        w: _Work,
        item: Item,
        type_name: str,
        payload: str,
        kind: str,
        error: str,
        attempts: int,
        seq: int = 0,
        name: str | None = None,
    ) -> None:
        if item.row is not None:
            did = item.row.id
        elif item.schedule is not None:
            did = item.schedule.id
        elif item.event_id is not None:
            did = f"{w.spec.name}:{w.key}:{item.event_id}"
        else:
            did = uuid.uuid4().hex
        self.dead.append(
            DeadLetter(
                did,
                w.spec.name,
                w.key,
                kind,
                type_name,
                payload,
                error,
                attempts,
                self.now,
                seq,
                name if kind == "event" else None,
            )
        )

    def _changes(self) -> Changes:
        writes: list[InstanceWrite] = []
        deletes: list[InstanceDelete] = []
        outbox_adds: list[OutboxRecord] = []
        tombstones: list[TombstoneWrite] = []
        tombstone_deletes: list[Ref] = []
        commands = self.commands
        for w in self.work.values():
            record = w.record
            if record is None:
                if w.tomb_dirty:  # late events of a finished instance
                    assert w.tombstone is not None
                    tombstones.append(TombstoneWrite(w.tombstone, w.tomb_version))
                    if w.rows and w.commands:
                        outbox_adds += w.rows
                        commands += w.commands
                continue
            if w.deleted:
                if w.start_version:
                    deletes.append(InstanceDelete(w.spec.name, w.key, w.start_version))
                if w.spec.tombstone_retention:
                    tombstones.append(TombstoneWrite(self._tombstone(w.spec, record)))
            elif w.dirty:
                writes.append(InstanceWrite(record, w.start_version))
                if not w.start_version and w.tombstone is not None:
                    tombstone_deletes.append((w.spec.name, w.key))  # the key starts again
                if w.rows and w.commands:
                    outbox_adds += w.rows
                    commands += w.commands
        self.outbox_adds = outbox_adds
        puts = [s for s in self.schedule_ops.values() if s is not None]
        sdeletes = [ScheduleDelete(*k) for k, s in self.schedule_ops.items() if s is None]
        clears = self.clears
        if deletes and clears:  # deleting an instance deletes its schedules too
            gone = {(d.saga, d.key) for d in deletes}
            clears = [ref for ref in clears if ref not in gone]
        for (saga, name, value), keys in self.associating.items():
            for key, put in keys.items():
                w = self.work[(saga, key)]
                if w.record is not None and not w.deleted:  # else they go with it
                    added = self.association_puts if put else self.association_deletes
                    added.append(Association(saga, name, value, key))
        return Changes(
            writes=writes,
            deletes=deletes,
            association_deletes=self.association_deletes,
            association_puts=self.association_puts,
            schedule_clears=clears,
            schedule_deletes=sdeletes,
            schedule_puts=puts,
            outbox_deletes=self.outbox_deletes + self.carried[0],
            outbox_adds=outbox_adds,
            outbox_updates=self.carried[1],
            dead_letters=self.dead,
            marks=list(self.marks.values()),
            tombstone_deletes=tombstone_deletes,
            tombstones=tombstones,
        )

    def _tombstone(self, spec: SagaSpec, record: InstanceRecord) -> Tombstone:
        """What a completed instance leaves: its final state only for late handlers."""
        return Tombstone(
            spec.name,
            record.key,
            COMPLETED,
            self.now,
            self.now + spec.tombstone_retention,
            record.instance_id,
            record.version,
            record.state if spec.late_handlers else None,
            record.state_version,
        )

    def publish(self) -> None:
        """The commit succeeded: update the cache, hand over commands, wake publishers."""
        shard = self.shard
        outbox = shard.outbox
        outbox.recorded(self.carried[0])
        associations = shard.associations
        for a in self.association_deletes:
            associations.delete(a)
        for a in self.association_puts:
            associations.put(a)
        for item, made, found, waiting in self.fanned:
            shard.activity.begin(made)
            if item.ack is not None:
                item.ack.pending += made
            if not found and not made:
                item.outcome = _UNMATCHED  # none of this shard's instances is associated
            assert item.fanout is not None
            if item.fanout.looked(found, waiting):
                self.unmatched.append(
                    Unmatched(item.event, item.saga.name, None, item.fanout.reason())
                )
        for item, reached in self.decided:
            assert item.fanout is not None
            item.kind = EVENT  # decided: a handler retry of it needs no second look
            if item.fanout.decided(reached):
                self.unmatched.append(
                    Unmatched(item.event, item.saga.name, None, item.fanout.reason())
                )
        if self.outbox_adds:
            # Before the per-instance calls below: they look at the instances' queues.
            outbox.add(self.outbox_adds, self.commands)
        cache, cache_size = shard.cache, shard.cache_size
        for ref, w in self.work.items():
            record = w.record
            if w.deleted or record is None:
                associations.forget(ref)  # (a stale lookup may have named a gone one)
            if w.deleted:
                cache.pop(ref, None)
                outbox.forget(ref)
                continue
            if record is not None and w.broken is None:
                if record.status == COMPENSATION_FAILED:
                    # An operator resumes or aborts it in the store: always read it afresh.
                    cache.pop(ref, None)
                else:  # (`Shard.remember`, spelled out)
                    cache[ref] = (record, w.state)
                    cache.move_to_end(ref)
                    if len(cache) > cache_size:
                        cache.popitem(last=False)
            if w.failed is not None:
                outbox.drop_head(ref, w.failed.id)
            if w.record is None:
                if w.failed is not None:
                    outbox.release(ref)
                continue
            if w.record.status == COMPENSATION_FAILED:
                outbox.hold(ref)
            elif w.failed is not None:
                outbox.release(ref)
            if w.became_completing:
                outbox.completing(ref)
        due = min((s.due for s in self.schedule_ops.values() if s is not None), default=None)
        if due is not None:
            shard.notify_timer(due)
        counters = shard.counters
        counters.events_handled += self.handled
        counters.batches_committed += 1
        if self.unmatched:
            report.unmatched(self.unmatched, counters, shard.on_unmatched, shard.hooks)
        if self.dead:
            report.dead_letters(self.dead, counters, shard.hooks)
        if self.taken_failures:
            report.taken_failures(self.taken_failures)
        if shard.hooks is not None:
            report.call_hook(shard.hooks.batch_committed, len(self.items), self.commit_seconds)
        for item in self.done:
            if item.ack is not None:
                item.ack.settle(item.outcome)
        shard.activity.end(len(self.done))
        for item, due in self.deferred:
            shard.defer(item, due)
        for item in self.held:
            shard.hold(item)
        for item in self.again:
            shard.mailbox.put_unbounded(item)


def _instance_id(now: float) -> str:
    """A new incarnation's id: 32 hex digits, the creation time in milliseconds first.

    Command and schedule ids start with it, so rows created close together sit close
    together in the stores' indexes (like a UUIDv7) instead of at random pages. The 80
    random bits come from `random`, seeded from the system's entropy at start and again
    in a forked child, which is unique enough and spares a system call per instance.
    """
    return f"{max(0, int(now * 1000)):012x}{random.getrandbits(80):020x}"


def _id(prefix: str, n: int, suffix: str) -> str:
    """A command or schedule id of a saga that correlates replies."""
    return f"{prefix}{n}{suffix}"


def _from_tombstone(tombstone: Tombstone) -> InstanceRecord:
    """The finished instance as its tombstone remembers it, for a late handler."""
    return InstanceRecord(
        tombstone.saga,
        tombstone.key,
        tombstone.version,
        COMPLETING,
        tombstone.state or "",
        tombstone.instance_id,
        tombstone.ended_at,
        tombstone.ended_at,
        None,
        True,
        tombstone.state_version,
    )


def _late_only(cls: type) -> str:
    return (
        f"a late=True handler may return Send and Compensate only, not {cls.__name__}: "
        "the instance has completed"
    )


_ACTIONS = frozenset((Send, Schedule, Unschedule, Compensate, Complete, Associate, Dissociate))
_NO_WORK: Any = None  # the place of a VIA item in the list of works: it has none of its own


def _actions(result: Any, w: _Work, event: Any) -> Iterable[Any]:
    """A handler's result as an iterable of actions (lists and tuples are used as they are)."""
    if result is None:
        return ()
    if isinstance(result, list | tuple):
        return result
    if isinstance(
        result, Send | Schedule | Unschedule | Compensate | Complete | Associate | Dissociate
    ):
        return (result,)
    if isinstance(result, str | bytes | dict) or not isinstance(result, Iterable):
        raise Batch._reject(w, event, _not_an_action(result))
    return result


def _fanout(item: Item) -> Fanout:
    """The tally of a `VIA` or `IF_ASSOCIATED` item."""
    assert item.fanout is not None
    return item.fanout


def _not_an_action(value: Any) -> str:
    """Why a value a handler returned is not an action, and what was likely meant."""
    if isinstance(value, type):
        name = value.__qualname__
        if value in _ACTIONS:
            return f"returned the class {name}, not an action: return {name}(...) instead"
        return f"returned the class {name}, which is not an action"
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:197] + "..."
    cls = type(value)
    if attrs.has(cls) or dataclasses.is_dataclass(cls):
        return (
            f"returned {shown}, which is not an action: to send it as a command, "
            f"return Send({cls.__qualname__}(...))"
        )
    return (
        f"returned {shown}, which is not an action: return None, an action (Send, "
        "Schedule, Unschedule, Compensate, Complete, Associate, Dissociate) or a list "
        "of actions"
    )


def _bad_association(action: Associate | Dissociate, handler: HandlerSpec) -> str:
    """Why an `Associate`/`Dissociate` cannot be applied: its name or value."""
    what = type(action).__name__
    shown = f"{what}(name={action.name!r}, value={action.value!r})"
    if type(action.name) is not str or not action.name:
        return (
            f"handler {handler.method} returned {shown}: the name must be a non-empty str, "
            "the via= of a correlate function"
        )
    return (
        f"handler {handler.method} returned {shown}: the value must be a str, got "
        f"{type(action.value).__name__}; convert it (e.g. str(...)) the same way the "
        "correlate function does"
    )
