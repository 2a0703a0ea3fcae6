"""The store protocol: one atomic, batched `commit` plus the reads the runtime needs.

Stores see only plain records: states, events and commands arrive already encoded as
JSON text with a stable type name, so a store never imports user classes.

Records are values, compared and hashed by value, and nothing changes one once it is
built (`attrs.evolve` makes a new one); a store must not either. The ones built for
every event (instances, outbox rows, schedules, writes, tombstones) are nonetheless not
`attrs.frozen`: a frozen class with slots sets each field through `object.__setattr__`,
which makes it about four times as costly to build (940 against 230 ns for eleven
fields, CPython 3.11), and the runtime builds several per event.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

__all__ = [
    "ABORTED",
    "ACTIVE",
    "Association",
    "COMPENSATION_FAILED",
    "COMPLETED",
    "COMPLETING",
    "Changes",
    "DeadLetter",
    "DedupMark",
    "InstanceDelete",
    "InstanceRecord",
    "InstanceWrite",
    "LoadRequest",
    "Loaded",
    "OutboxRecord",
    "OutboxUpdate",
    "PendingCommand",
    "RowCounts",
    "ScheduleDelete",
    "ScheduleRecord",
    "Store",
    "Tombstone",
    "TombstonePolicy",
    "TombstoneWrite",
]

ACTIVE = "active"
"""Instance status: takes events."""
COMPLETING = "completing"
"""Instance status: completed, waiting for its outstanding commands to be dispatched."""
COMPENSATION_FAILED = "compensation_failed"
"""Instance status: a compensation failed for good; kept for an operator."""

SEND = "send"
COMPENSATE = "compensate"

COMPLETED = "completed"
"""How an instance ended (`Tombstone.ended`): it completed and its outbox drained."""
ABORTED = "aborted"
"""How an instance ended (`Tombstone.ended`): an operator aborted it (`Admin.abort`)."""


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class InstanceRecord:
    """One saga instance as stored.

    Attributes:
        saga: The saga's name.
        key: The correlation key.
        version: Incremented by every write; 1 for a new instance (one more than its
            tombstone's for a key that starts again after a finished instance).
        status: `"active"`, `"completing"` or `"compensation_failed"`.
        state: The state as JSON text.
        instance_id: Unique per incarnation of `(saga, key)`; command ids derive from it.
        created_at: Wall-clock seconds when the instance started.
        updated_at: Wall-clock seconds of the last write.
        last_event: The type name of the last event handled.
        completed: `Complete()` was returned; the instance ends once its outbox is
            empty (this survives a "compensation failed" status and an operator's retry).
        state_version: The saga's state version `state` was written at (rows written
            before versions existed are version 1).
    """

    saga: str
    key: str
    version: int
    status: str
    state: str
    instance_id: str
    created_at: float
    updated_at: float
    last_event: str | None = None
    completed: bool = False
    state_version: int = 1


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class OutboxRecord:
    """A command waiting to be dispatched, in its instance's order.

    Attributes:
        id: The stable command id (the same on every attempt and after a restart).
        seq: Orders the commands of one instance; lower goes first.
        kind: `"send"` or `"compensate"`.
        attempts: Failed attempts so far.
        due: Not to be dispatched before this wall-clock time (retry backoff).
        error: The last error, if an attempt failed.
        trace: The trace context of the handling that produced the command, as JSON
            text (a carrier such as `{"traceparent": "..."}`), or `None`.
    """

    id: str
    saga: str
    key: str
    seq: int
    kind: str
    type_name: str
    payload: str
    attempts: int = 0
    due: float = 0.0
    error: str | None = None
    trace: str | None = None


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class OutboxUpdate:
    """Record a failed attempt of an outbox row (a no-op if the row is gone)."""

    id: str
    attempts: int
    due: float
    error: str | None


@attrs.frozen
class PendingCommand:
    """An outbox row as `Store.pending_commands` reads it, with its instance's status.

    Attributes:
        row: The command.
        status: The status of the instance the row belongs to, or `None` if that
            instance is gone (a retried dead letter of an instance that has ended).
    """

    row: OutboxRecord
    status: str | None


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class ScheduleRecord:
    """A durable timer of an instance; `(saga, key, name)` is unique.

    Attributes:
        id: Stable id; the command id when it is dispatched, the event id when it is
            delivered to the instance.
        name: The schedule's name (the id for unnamed schedules).
        due: Wall-clock seconds when it falls due.
        to_self: Deliver to the instance as an event instead of dispatching it.
        seq: Orders schedules that fall due at the same time.
        attempts: Failed deliveries so far (a `to_self` handler that raised); each
            failure moves `due` back by the retry policy's delay.
        trace: The trace context of the handling that scheduled it, as JSON text, or
            `None`; the handling or the dispatch it leads to continues that trace.
    """

    id: str
    saga: str
    key: str
    name: str
    due: float
    to_self: bool
    type_name: str
    payload: str
    seq: int = 0
    attempts: int = 0
    trace: str | None = None


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class ScheduleDelete:
    """Remove the schedule `(saga, key, name)` if present."""

    saga: str
    key: str
    name: str


@attrs.frozen
class DeadLetter:
    """A command that failed for good, or an event whose handler kept failing.

    Attributes:
        id: The command id, or an id made for the event.
        kind: `"send"`, `"compensate"` or `"event"`.
        seq: For commands, the outbox position to resume from on retry.
        attempts: How many times it was tried.
        failed_at: Wall-clock seconds of the last failure.
        name: For a scheduled message that could not be delivered to its instance
            (`to_self`), the schedule's name: retrying it schedules it again, due now.
    """

    id: str
    saga: str
    key: str
    kind: str
    type_name: str
    payload: str
    error: str
    attempts: int
    failed_at: float
    seq: int = 0
    name: str | None = None


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class DedupMark:
    """Event `event_id` was applied to instance `(saga, key)`; forget it after `expires_at`."""

    saga: str
    key: str
    event_id: str
    expires_at: float


@attrs.frozen
class Association:
    """Instance `(saga, key)` is found under association `name` = `value`.

    Stored in a table indexed by `(saga, name, value)`, so routing an event by an
    association costs one index lookup; `(saga, name, value, key)` is unique.
    """

    saga: str
    name: str
    value: str
    key: str


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class Tombstone:
    """What is left of a finished instance, for a while: its key is not started again,
    and a late event for it is reported as such (or handled by a `late=True` handler).

    Attributes:
        saga: The saga's name.
        key: The instance key.
        ended: How it ended: `"completed"` or `"aborted"`.
        ended_at: Wall-clock seconds when it ended.
        expires_at: Wall-clock seconds after which it no longer counts and may be purged.
        instance_id: The finished incarnation's id (command ids derive from it).
        version: The instance's last version; every late event handled bumps it, so the
            commands of late handlers get ids and an order of their own.
        state: The final state as JSON text, kept only for sagas with `late=True`
            handlers (`None` otherwise).
        state_version: The saga's state version `state` was written at.
    """

    saga: str
    key: str
    ended: str
    ended_at: float
    expires_at: float
    instance_id: str
    version: int
    state: str | None = None
    state_version: int = 1


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class TombstoneWrite:
    """Put a tombstone.

    `expected_version` 0 puts it whatever is stored for its key (it is written with the
    delete of its instance, which is version-checked itself); any other value updates
    the stored tombstone only if it is at that version (a late event was handled).
    """

    tombstone: Tombstone
    expected_version: int = 0


@attrs.frozen
class TombstonePolicy:
    """How one saga's finished instances are remembered.

    Attributes:
        retention: Seconds a tombstone counts; 0 keeps none.
        keep_state: Keep the final state in the tombstone (the saga has `late=True`
            handlers).
    """

    retention: float
    keep_state: bool = False


@attrs.frozen
class RowCounts:
    """How many rows a store holds: the backlog of every runtime that shares it.

    Attributes:
        instances: Instances by status: `"active"`, `"completing"` and
            `"compensation_failed"` always (0 when there are none), and any other
            status found.
        outbox: Commands waiting to be dispatched or retried (or held).
        schedules: Pending schedules.
        due_schedules: Pending schedules due at the time asked about, or earlier.
        dead_letters: Dead letters kept.
    """

    instances: Mapping[str, int] = attrs.field(hash=False)
    outbox: int
    schedules: int
    due_schedules: int
    dead_letters: int


def row_counts(
    statuses: Mapping[str, int], outbox: int, schedules: int, due: int, dead: int
) -> RowCounts:
    """A `RowCounts` with the three statuses always present (for stores)."""
    instances = {ACTIVE: 0, COMPLETING: 0, COMPENSATION_FAILED: 0, **statuses}
    return RowCounts(instances, outbox, schedules, due, dead)


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class InstanceWrite:
    """Insert or update an instance; `expected_version` 0 means it must not exist yet."""

    record: InstanceRecord
    expected_version: int


@attrs.define(unsafe_hash=True)  # not frozen: see the module's docstring
class InstanceDelete:
    """Delete an instance with its schedules, outbox rows and associations (dead letters
    stay)."""

    saga: str
    key: str
    expected_version: int


@attrs.frozen
class Changes:
    """Everything one batch changed, committed atomically by `Store.commit`.

    A store applies, in this order: instance deletes (with their schedules, outbox rows
    and associations; deleting an absent instance with `expected_version` 0 only drops
    those), instance writes, association deletes (a no-op for a missing one),
    association puts (a no-op for one already there), tombstone deletes (`(saga, key)`
    pairs whose key starts again), tombstone writes, schedule clears (all schedules of
    an instance), schedule deletes,
    schedule puts (replacing the same `(saga, key, name)`, or the same id), outbox
    deletes, outbox adds (replacing the same id), outbox updates (a no-op for a missing
    row), dead-letter deletes, dead-letter adds and dedup marks. Every `expected_version`
    is checked against the state at the point where it applies (so a delete followed by
    a write of the same instance expects 0 for the write); if one does not match,
    nothing is applied and `ConflictError` names the instances. The runtime never sends
    two operations on one schedule name in one `Changes`.
    """

    writes: Sequence[InstanceWrite] = ()
    deletes: Sequence[InstanceDelete] = ()
    association_deletes: Sequence[Association] = ()
    association_puts: Sequence[Association] = ()
    schedule_clears: Sequence[tuple[str, str]] = ()
    schedule_deletes: Sequence[ScheduleDelete] = ()
    schedule_puts: Sequence[ScheduleRecord] = ()
    outbox_deletes: Sequence[str] = ()
    outbox_adds: Sequence[OutboxRecord] = ()
    outbox_updates: Sequence[OutboxUpdate] = ()
    dead_letter_deletes: Sequence[str] = ()
    dead_letters: Sequence[DeadLetter] = ()
    marks: Sequence[DedupMark] = ()
    tombstone_deletes: Sequence[tuple[str, str]] = ()
    tombstones: Sequence[TombstoneWrite] = ()

    def __bool__(self) -> bool:
        return any(
            (
                self.writes,
                self.deletes,
                self.association_deletes,
                self.association_puts,
                self.schedule_clears,
                self.schedule_deletes,
                self.schedule_puts,
                self.outbox_deletes,
                self.outbox_adds,
                self.outbox_updates,
                self.dead_letter_deletes,
                self.dead_letters,
                self.marks,
                self.tombstone_deletes,
                self.tombstones,
            )
        )


@attrs.frozen
class LoadRequest:
    """What a batch needs to read before it runs its handlers.

    Attributes:
        instances: `(saga, key)` pairs to load, with their unexpired tombstones.
        marks: `(saga, key, event_id)` triples to look up among unexpired dedup marks.
        schedule_ids: Ids of schedules about to fire, to check they are still pending.
        now: Wall-clock seconds; marks and tombstones that expired before it do not
            count.
    """

    instances: Sequence[tuple[str, str]] = ()
    marks: Sequence[tuple[str, str, str]] = ()
    schedule_ids: Sequence[str] = ()
    now: float = 0.0


@attrs.frozen
class Loaded:
    """The answer to a `LoadRequest`; missing instances are simply absent.

    `tombstones` holds the unexpired tombstones of the requested instances (a key that
    has an instance has none).
    """

    instances: dict[tuple[str, str], InstanceRecord]
    marks: set[tuple[str, str, str]]
    schedule_ids: set[str]
    tombstones: dict[tuple[str, str], Tombstone] = attrs.field(factory=dict)


@runtime_checkable
class Store(Protocol):
    """Where instances, the outbox, schedules, dedup marks and dead letters live.

    Every method may be called from any task; a store serializes what it must. Blocking
    drivers run their calls in worker threads (`anyio.to_thread`), so a store works on
    asyncio and trio alike. The conformance suite `sagaflow.testing.conformance`
    pins the behaviour every store must show. Listings
    and `due_schedules` break ties by id, so their order is deterministic. A commit
    cancelled while its worker thread runs may still have been applied.
    """

    async def open(self) -> None:
        """Connect and create or migrate the schema; called when a runtime starts."""
        ...

    async def close(self) -> None:
        """Release connections; called when a runtime stops."""
        ...

    async def load(self, request: LoadRequest) -> Loaded:
        """Read instances (or their tombstones), dedup marks and pending schedule ids in
        one go."""
        ...

    async def commit(self, changes: Changes) -> None:
        """Apply `changes` atomically (all or nothing).

        Raises:
            ConflictError: An `expected_version` did not match; nothing was applied.
        """
        ...

    async def next_due(self, *, sagas: Collection[str] | None = None) -> float | None:
        """The earliest due time of any pending schedule (of `sagas`, if given), or `None`."""
        ...

    async def due_schedules(
        self, now: float, limit: int, *, sagas: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        """Up to `limit` schedules due at or before `now`, earliest first.

        With `sagas`, only schedules of those sagas: the rows of a saga that is not
        registered any more never crowd out the others.
        """
        ...

    async def saga_names(self) -> set[str]:
        """The names of the sagas that have instances, schedules or outbox rows."""
        ...

    async def rename_saga(self, old: str, new: str) -> int:
        """Move the rows of saga `old` to saga `new` in one transaction (a renamed saga).

        Instances, associations, schedules, outbox rows, dead letters, dedup marks and
        tombstones move, key by key, except the keys that already have an instance under
        `new`: those stay under `old` (so does a tombstone whose key `new` has one of).
        Idempotent.

        Returns:
            How many instances moved.
        """
        ...

    async def list_instances(
        self, *, saga: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[InstanceRecord]:
        """Instances, optionally of one saga or status, ordered by saga and key."""
        ...

    async def list_outbox(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[OutboxRecord]:
        """Pending outbox rows, ordered by saga, key and seq."""
        ...

    async def pending_commands(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[PendingCommand]:
        """Up to `limit` outbox rows of the instances after `after`, in `(saga, key)`
        order and each instance's rows by seq, with their instances' statuses.

        This is how the single-process outbox reads the commands it does not hold in
        memory: a page at a time (keyset pagination by instance), never the whole
        outbox. The last instance of a full page may be cut short; pass its `(saga, key)`
        as `after` to go on with the next instance. With `sagas`, only rows of those sagas.
        """
        ...

    async def drained_instances(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[tuple[str, str]]:
        """Up to `limit` completing instances that have no outbox row left, in `(saga, key)`
        order, those after `after` only (with `sagas`, of those sagas only): the
        instances that can end now."""
        ...

    async def scan_instances(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[InstanceRecord]:
        """Up to `limit` instances ordered by `(saga, key)`, those after `after` only.

        The `scan_*` methods page through every row by primary key (keyset
        pagination), for tools that read them all, such as `Admin.check`: pass the
        last row's key as `after` to get the next page; an empty page is the end. Each
        call is one short read, so a scan of millions of rows holds one page in memory
        and no lock between pages; rows written meanwhile may or may not be seen.
        """
        ...

    async def scan_outbox(self, *, after: str | None = None, limit: int) -> list[OutboxRecord]:
        """Up to `limit` outbox rows ordered by id, those after `after` only."""
        ...

    async def scan_schedules(
        self, *, after: tuple[str, str, str] | None = None, limit: int
    ) -> list[ScheduleRecord]:
        """Up to `limit` schedules ordered by `(saga, key, name)`, those after `after` only."""
        ...

    async def scan_dead_letters(self, *, after: str | None = None, limit: int) -> list[DeadLetter]:
        """Up to `limit` dead letters ordered by id, those after `after` only."""
        ...

    async def scan_tombstones(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[Tombstone]:
        """Up to `limit` tombstones ordered by `(saga, key)`, those after `after` only."""
        ...

    async def list_schedules(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[ScheduleRecord]:
        """Pending schedules, ordered by due time, then seq."""
        ...

    async def find_associated(
        self, saga: str, name: str, values: Sequence[str]
    ) -> dict[str, list[str]]:
        """The keys of the instances of `saga` associated with each of `values` under `name`.

        One indexed read, however many values. Values no instance is associated with
        are absent from the answer; each list of keys is sorted.
        """
        ...

    async def list_associations(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Association]:
        """Associations, optionally of one saga or instance, ordered by saga, key, name
        and value."""
        ...

    async def list_dead_letters(self, *, saga: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        ...

    async def list_tombstones(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Tombstone]:
        """Tombstones, optionally of one saga or key, ordered by saga and key.

        Expired tombstones that were not purged yet are listed too (see `expires_at`).
        """
        ...

    async def count_rows(self, *, now: float) -> RowCounts:
        """How many instances (by status), outbox rows, schedules (and of them, due at
        `now` or earlier) and dead letters the store holds, read in one go.

        For gauges: it may scan tables, so it is called every few seconds, never per
        event.
        """
        ...
