"""`Admin`: what an operator does with a store: find stuck instances, retry, discard, abort.

Everything here goes through the `Store` protocol (its listings to read, `commit` with
version checks to write), so it works the same on every store, next to running runtimes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import attrs

from ._check import CheckReport, check
from ._clock import SystemClock
from ._registry import TOMBSTONE_RETENTION, Registry, SagaSpec
from .exceptions import ConflictError, DeadLetterError
from .stores._protocol import (
    ABORTED,
    ACTIVE,
    COMPENSATE,
    COMPENSATION_FAILED,
    COMPLETED,
    COMPLETING,
    Changes,
    DeadLetter,
    InstanceDelete,
    InstanceRecord,
    InstanceWrite,
    LoadRequest,
    OutboxRecord,
    RowCounts,
    ScheduleRecord,
    Store,
    Tombstone,
    TombstoneWrite,
)
from .typing import Clock

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["Admin", "InstanceInfo", "SagaState", "StatePage"]

log = logging.getLogger("sagaflow.admin")

EVENT = "event"
_RACES = 5
"""How often an operation reads again after losing a race with a runtime."""

_Ref = tuple[str, str]
S = TypeVar("S")


@attrs.frozen
class InstanceInfo:
    """One saga instance with everything pending for it, as an operator sees it.

    Attributes:
        record: The stored instance; `record.state` is its state as JSON text.
        schedules: Its pending schedules, earliest first.
        outbox: Its commands waiting to be dispatched (or retried), in their order.
        dead_letters: The dead letters of its saga and key, oldest first.
        age: Seconds from its start to the moment it was read.
        idle: Seconds from its last write (the last event it handled, or a command
            that failed for good) to the moment it was read.
    """

    record: InstanceRecord
    schedules: tuple[ScheduleRecord, ...] = ()
    outbox: tuple[OutboxRecord, ...] = ()
    dead_letters: tuple[DeadLetter, ...] = ()
    age: float = 0.0
    idle: float = 0.0

    @property
    def saga(self) -> str:
        """The saga's name."""
        return self.record.saga

    @property
    def key(self) -> str:
        """The instance key."""
        return self.record.key

    @property
    def status(self) -> str:
        """`"active"`, `"completing"` or `"compensation_failed"`."""
        return self.record.status


@attrs.frozen
class SagaState(Generic[S]):
    """One stored saga instance with its state decoded: what an API or a page shows.

    Attributes:
        saga: The saga's name.
        key: The instance key.
        state: The state, an instance of the saga's state class (upcast if it was
            written by an older version of the saga).
        status: `"active"`, `"completing"` (completed, its last commands not yet
            dispatched) or `"compensation_failed"`.
        version: Incremented by every write of the instance; 1 when it started.
        created_at: Wall-clock seconds when it started.
        updated_at: Wall-clock seconds of its last write.
        completed: The saga returned `Complete()`.
    """

    saga: str
    key: str
    state: S
    status: str
    version: int
    created_at: float
    updated_at: float
    completed: bool


@attrs.frozen
class StatePage(Generic[S]):
    """One page of `Admin.states`: instances of one saga, ordered by key.

    Attributes:
        items: The instances of this page.
        next: Pass it as `after=` for the next page; `None` on the last page.
    """

    items: tuple[SagaState[S], ...]
    next: str | None


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _duration(seconds: float) -> str:
    """Seconds as `timedelta` shows them, to the second: `"6 days, 23:59:30"`."""
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def _owner(command_id: str) -> str:
    """The instance id a command id was derived from (`{instance_id}.{version}.{n}`)."""
    return command_id.partition(".")[0]


@attrs.define(eq=False)
class Admin:
    """Inspect and repair a store: the operator's side of sagaflow, for every store.

    Reads go through the store's listings, changes through `commit` with version checks,
    so an `Admin` may work on a store that running runtimes use at the same time (it
    reads again if it loses a race). The store must be open: use a running runtime's
    store (`Admin(runtime.store)`), or `await store.open()` first. Every change is logged
    at INFO on the `sagaflow.admin` logger, with `saga`, `key` and `dead_letter_id` (or
    `instance_id`) as extra fields of the record.

    A running runtime keeps the commands it dispatches in memory and reads the store's
    outbox when it starts, so a command put back by `retry` is dispatched by the next
    runtime that starts on the store, or by a running one once it looks at the store
    again.

    Args:
        store: The store to work on.
        registry: The sagas, used to decode an event dead letter for `retry`; the
            runtime's registry is used when it is not given.
        clock: Where "now" comes from (ages, stalled instances, the time written on a
            resumed instance); the wall clock by default.
    """

    _store: Store = attrs.field(alias="store")
    _registry: Registry | None = attrs.field(default=None, alias="registry")
    _clock: Clock = attrs.field(factory=SystemClock, kw_only=True, alias="clock")

    @property
    def store(self) -> Store:
        """The store this `Admin` works on."""
        return self._store

    # -- reading -------------------------------------------------------------------

    async def list_instances(
        self,
        *,
        saga: str | None = None,
        status: str | None = None,
        stalled: timedelta | float | None = None,
    ) -> list[InstanceInfo]:
        """The instances in flight, with their pending schedules, commands and dead letters.

        Every stored instance is in flight: a completed one is deleted once its last
        command has been dispatched.

        Args:
            saga: Only the instances of this saga.
            status: Only the instances in this status (`"active"`, `"completing"`,
                `"compensation_failed"`).
            stalled: Only the instances that made no progress for longer than this
                (a `timedelta` or seconds): their last write is older than now minus it.

        Returns:
            The instances, ordered by saga and key.
        """
        now = self._clock.now()
        records = await self._store.list_instances(saga=saga, status=status)
        if stalled is not None:
            cutoff = now - _seconds(stalled)
            records = [r for r in records if r.updated_at < cutoff]
        if not records:
            return []
        schedules: defaultdict[_Ref, list[ScheduleRecord]] = defaultdict(list)
        outbox: defaultdict[_Ref, list[OutboxRecord]] = defaultdict(list)
        letters: defaultdict[_Ref, list[DeadLetter]] = defaultdict(list)
        if len(records) == 1:
            # A narrow filter found one instance: read only its own rows.
            ref = (records[0].saga, records[0].key)
            schedules[ref], outbox[ref], letters[ref] = await self._pending(*ref)
        else:
            for s in await self._store.list_schedules(saga=saga):
                schedules[(s.saga, s.key)].append(s)
            for o in await self._store.list_outbox(saga=saga):
                outbox[(o.saga, o.key)].append(o)
            for d in await self._store.list_dead_letters(saga=saga):
                letters[(d.saga, d.key)].append(d)
        infos = []
        for r in records:
            ref = (r.saga, r.key)
            infos.append(self._info(r, schedules[ref], outbox[ref], letters[ref], now))
        return infos

    async def show(self, saga: str, key: str) -> InstanceInfo:
        """One instance whole: its record (state included), schedules, outbox, dead letters.

        Raises:
            DeadLetterError: No instance of `saga` has this key.
        """
        now = self._clock.now()
        record = await self._record(saga, key)
        schedules, outbox, letters = await self._pending(saga, key)
        if record is None:
            left = f"; {len(letters)} dead letter(s) of it remain" if letters else ""
            tombstones = await self._store.list_tombstones(saga=saga, key=key)
            if tombstones and tombstones[0].expires_at >= now:
                t = tombstones[0]
                how = "completed" if t.ended == COMPLETED else f"was {t.ended}"
                ended = f"it {how} {_duration(now - t.ended_at)} ago; its tombstone counts "
                ended += f"for {_duration(t.expires_at - now)} more"
            else:
                ended = "it never started, or it ended or was aborted"
            raise DeadLetterError(f"no instance of saga {saga!r} has key {key!r} ({ended}){left}")
        return self._info(record, schedules, outbox, letters, now)

    @overload
    async def state(self, saga: str, key: str) -> SagaState[Any]: ...

    @overload
    async def state(self, saga: str, key: str, state_type: type[S]) -> SagaState[S]: ...

    async def state(self, saga: str, key: str, state_type: type[Any] | None = None) -> Any:
        """One instance with its state decoded, as the saga's state class.

        The state is decoded as a runtime decodes it (through the saga's upcasters):
        no JSON to pick apart by hand.

        Args:
            saga: The saga's name.
            key: The instance key.
            state_type: The saga's state class (or a base class of it); when given, a
                type checker knows the type of `.state`, and a mismatch is an error.

        Returns:
            The instance.

        Raises:
            DeadLetterError: No instance of `saga` has this key (a `LookupError`).
            DecodeError: The stored state cannot be decoded by this code; the message
                names saga, key, version and field.
            LookupError: No saga of that name is registered.
            TypeError: The `Admin` has no registry, or `state_type` is not the saga's
                state class.
        """
        spec = self._spec(saga, state_type, "state")
        record = await self._record(spec.name, key)
        if record is None:
            raise DeadLetterError(
                f"no instance of saga {saga!r} has key {key!r} (it never started, or it "
                "ended or was aborted)"
            )
        return self._decoded(spec, record)

    @overload
    async def states(
        self, saga: str, *, after: str | None = None, limit: int = 100
    ) -> StatePage[Any]: ...

    @overload
    async def states(
        self, saga: str, state_type: type[S], *, after: str | None = None, limit: int = 100
    ) -> StatePage[S]: ...

    async def states(
        self,
        saga: str,
        state_type: type[Any] | None = None,
        *,
        after: str | None = None,
        limit: int = 100,
    ) -> Any:
        """A page of one saga's instances, ordered by key, with their states decoded.

        Keyset pagination on the store's primary key (`Store.scan_instances`): each
        page is one short read whatever the number of instances, and instances that
        start or end between two pages neither shift nor repeat the others.

        Args:
            saga: The saga's name.
            state_type: The saga's state class, as for `state`.
            after: The `next` of the page before; `None` for the first page.
            limit: The most instances on a page.

        Returns:
            The page; its `next` is `None` when no instance follows.

        Raises:
            DecodeError: A state on the page cannot be decoded (`Admin.check` lists
                every such row).
            LookupError: No saga of that name is registered.
            TypeError: As for `state`.
            ValueError: `limit` is less than 1.
        """
        if limit < 1:
            raise ValueError(f"Admin.states(limit={limit!r}) must be at least 1")
        spec = self._spec(saga, state_type, "states")
        records: list[InstanceRecord] = []
        if after is None:
            # Keys sort after (saga, ""), except "" itself: read that one directly.
            first = await self._record(spec.name, "")
            if first is not None:
                records.append(first)
        # One more than asked, to know whether a next page exists. Rows are in (saga,
        # key) order, so those of this saga come first and together.
        scanned = await self._store.scan_instances(
            after=(spec.name, after or ""), limit=limit + 1 - len(records)
        )
        for record in scanned:
            if record.saga != spec.name:
                break
            records.append(record)
        items = tuple(self._decoded(spec, r) for r in records[:limit])
        return StatePage(items, items[-1].key if len(records) > limit else None)

    async def count_rows(self) -> RowCounts:
        """How many instances (by status), commands in the outbox, schedules (due
        ones among them) and dead letters the store holds: the gauges of a dashboard.

        Counting may read whole tables: poll it every few seconds, not per request.
        """
        return await self._store.count_rows(now=self._clock.now())

    async def list_dead_letters(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[DeadLetter]:
        """Commands that failed for good and events whose handler kept failing.

        Args:
            saga: Only the dead letters of this saga.
            key: Only those of this instance key.

        Returns:
            The dead letters, oldest first.
        """
        letters = await self._store.list_dead_letters(saga=saga)
        return letters if key is None else [d for d in letters if d.key == key]

    async def get_dead_letter(self, id: str) -> DeadLetter:
        """The dead letter with this id.

        Raises:
            DeadLetterError: There is none.
        """
        for letter in await self._store.list_dead_letters():
            if letter.id == id:
                return letter
        raise DeadLetterError(
            f"no dead letter has the id {id!r}; list them with `sagaflow dead-letters` "
            "or Admin.list_dead_letters()"
        )

    async def check(self, *, page: int = 1000, failures_per_group: int | None = 20) -> CheckReport:
        """Decode every stored row with the current code and registry; change nothing.

        The pre-deploy check: run it with the code about to be deployed (its registry)
        against the store in use. Every instance state (through its saga's upcasters,
        from the version it was written at), outbox command, scheduled message, dead
        letter (event or command), final state kept in a tombstone for `late=True`
        handlers and, on a store shared in cluster mode, inbox event is decoded exactly
        as a runtime would decode it. Each row is ok, would be
        upcast (written at an older version, and the whole upcaster chain succeeds), or
        would fail: it cannot be decoded (a renamed or removed field with no upcaster,
        a JSON value that is not an object, a type name not on the allow-list), an
        upcaster fails, it was written by a newer version than the code, or its saga is
        neither registered nor an alias of a registered saga. Rows stored under an
        alias count as the saga that took the alias over.

        Rows are read in pages ordered by primary key, one short read per page, so the
        check runs next to working runtimes and on millions of rows in bounded memory.
        Rows written while it runs may or may not be checked.

        Args:
            page: Rows read per store call.
            failures_per_group: How many failing rows each group lists (`count` is the
                total); `None` lists them all.

        Returns:
            The report; `report.ok` is `False` when any row would fail.

        Raises:
            TypeError: The `Admin` was made without a registry.
            ValueError: `page` or `failures_per_group` is out of range.
        """
        if self._registry is None:
            raise TypeError(
                "Admin.check decodes rows with the sagas' code: make the Admin with the "
                "registry to check, Admin(store, registry=registry)"
            )
        return await check(self._store, self._registry, page=page, listed=failures_per_group)

    # -- changing ------------------------------------------------------------------

    async def retry(self, id: str, *, runtime: Runtime | None = None) -> DeadLetter:
        """Try a dead letter again.

        A command goes back into its instance's outbox at its old place (its `seq`), with
        its attempts reset; its dead letter is removed in the same commit. A compensation
        of an instance whose status is `"compensation_failed"` also sets that instance
        back to `"completing"` (if it had completed) or `"active"`, with a version check,
        so the compensation chain resumes where it stopped. A command whose instance has
        ended is dispatched on its own. The command is dispatched by the next runtime that
        starts on the store, or by a running one once it reads the store's outbox again.

        A scheduled message that could not be delivered to its instance (a `to_self`
        timer, for example of an instance whose state could not be decoded) is
        scheduled again, due now, under its old name (or under its id if that name is
        pending again); no runtime is needed: a running one fires it once its timer
        looks at the store again. With `runtime=`, it looks at once, and `retry`
        returns once the runtime has delivered it (`drain`).

        Any other event is published again through `runtime` (which must be running),
        with its original event id if it had one, and its dead letter is removed once
        `runtime.publish` returns (if it fails again, a new dead letter replaces it). The
        event must still reach the dead letter's saga and key; without an event id it
        must reach no other saga, which would handle it a second time.

        Args:
            id: The dead letter's id.
            runtime: A running runtime, needed for an event dead letter only.

        Returns:
            The dead letter as it was before the retry.

        Raises:
            DeadLetterError: No dead letter has this id, or it is an event that cannot be
                published again (no runtime given, it would not reach its instance, its
                instance's compensation failed, or it would reach other sagas too).
            ConflictError: Runtimes kept changing the instance meanwhile.
            RuntimeClosedError: `runtime` is not running.
        """
        for attempt in range(1, _RACES + 1):
            letter = await self.get_dead_letter(id)
            if letter.kind == EVENT and letter.name is not None:
                await self._reschedule(letter, runtime)
                return letter
            if letter.kind == EVENT:
                await self._republish(letter, runtime)
                return letter
            record = await self._record(letter.saga, letter.key)
            writes = []
            resumed = None
            if (
                record is not None
                and letter.kind == COMPENSATE
                and record.status == COMPENSATION_FAILED
                and _owner(letter.id) == record.instance_id
            ):
                resumed = COMPLETING if record.completed else ACTIVE
                written = attrs.evolve(
                    record,
                    version=record.version + 1,
                    status=resumed,
                    updated_at=self._clock.now(),
                )
                writes.append(InstanceWrite(written, record.version))
            row = OutboxRecord(
                letter.id,
                letter.saga,
                letter.key,
                letter.seq,
                letter.kind,
                letter.type_name,
                letter.payload,
            )
            try:
                await self._store.commit(
                    Changes(writes=writes, outbox_adds=[row], dead_letter_deletes=[letter.id])
                )
            except ConflictError:
                if attempt == _RACES:
                    raise
                continue
            log.info(
                "retried dead letter %s (%s %s of %s/%s): back in the outbox%s",
                letter.id,
                letter.kind,
                letter.type_name,
                letter.saga,
                letter.key,
                f"; the instance is {resumed} again" if resumed else "",
                extra={"saga": letter.saga, "key": letter.key, "dead_letter_id": letter.id},
            )
            return letter
        raise AssertionError("unreachable")  # pragma: no cover

    async def retry_instance(
        self, saga: str, key: str, *, runtime: Runtime | None = None
    ) -> list[DeadLetter]:
        """Retry every dead letter of one instance, oldest first (see `retry`).

        This is how an instance that was held (its state could not be decoded, say)
        resumes once the code can read it again: its events and timers are delivered
        again in the order they failed.

        Returns:
            The dead letters retried, oldest first.

        Raises:
            DeadLetterError: As `retry`; the letters before it were retried.
        """
        letters = await self.list_dead_letters(saga=saga, key=key)
        for letter in letters:
            await self.retry(letter.id, runtime=runtime)
        return letters

    async def _reschedule(self, letter: DeadLetter, runtime: Runtime | None) -> None:
        assert letter.name is not None
        # Due now for the runtime that fires it (its clock may be a virtual one).
        now = self._clock.now() if runtime is None else runtime._clock.now()
        pending = {
            s.name for s in await self._store.list_schedules(saga=letter.saga, key=letter.key)
        }
        name = letter.id if letter.name in pending else letter.name
        schedule = ScheduleRecord(
            letter.id,
            letter.saga,
            letter.key,
            name,
            now,
            True,
            letter.type_name,
            letter.payload,
            letter.seq,
        )
        await self._store.commit(Changes(schedule_puts=[schedule], dead_letter_deletes=[letter.id]))
        if runtime is not None:
            runtime._schedule_added(now)
            # Delivered before whatever is retried next: the instance sees them in order.
            await runtime.drain()
        log.info(
            "retried dead letter %s (scheduled %s of %s/%s): scheduled again as %r, due now",
            letter.id,
            letter.type_name,
            letter.saga,
            letter.key,
            name,
            extra={"saga": letter.saga, "key": letter.key, "dead_letter_id": letter.id},
        )

    async def _republish(self, letter: DeadLetter, runtime: Runtime | None) -> None:
        where = f"{letter.saga}/{letter.key}"
        if runtime is None:
            raise DeadLetterError(
                f"dead letter {letter.id!r} is an event ({letter.type_name} for {where}): "
                "it is published again through a running runtime, "
                "Admin.retry(id, runtime=runtime); the command line cannot do it"
            )
        registry = self._registry or runtime.registry
        event = registry.serializer.decode(letter.type_name, letter.payload)
        prefix = f"{letter.saga}:{letter.key}:"
        event_id = letter.id.removeprefix(prefix) if letter.id.startswith(prefix) else None
        keys = {spec.name: correlate(event) for spec, _, correlate in registry.routes(type(event))}
        if keys.get(letter.saga) != letter.key:
            raise DeadLetterError(
                f"dead letter {letter.id!r}: publishing its {letter.type_name} again would "
                f"not reach {where} (its handler takes only to_self schedules, or the "
                "saga changed); discard it, or handle it by hand"
            )
        others = sorted(
            name for name, key in keys.items() if key is not None and name != letter.saga
        )
        if event_id is None and others:
            raise DeadLetterError(
                f"dead letter {letter.id!r}: publishing its {letter.type_name} again would "
                f"also reach saga(s) {', '.join(others)}, which handled it already, and it "
                "has no event id to deduplicate it there; discard it, or handle it by hand"
            )
        record = await self._record(letter.saga, letter.key)
        if record is not None and record.status == COMPENSATION_FAILED:
            raise DeadLetterError(
                f"dead letter {letter.id!r}: instance {where} is in status "
                f"{COMPENSATION_FAILED!r} and takes no events; retry its compensation or "
                "abort it first"
            )
        await runtime.publish(event, id=event_id)
        try:
            current = await self.get_dead_letter(letter.id)
        except DeadLetterError:
            current = None
        # The same id again, changed, is the retry's own failure: keep that one.
        if current == letter:
            await self._store.commit(Changes(dead_letter_deletes=[letter.id]))
        log.info(
            "retried dead letter %s (event %s of %s): published again",
            letter.id,
            letter.type_name,
            where,
            extra={"saga": letter.saga, "key": letter.key, "dead_letter_id": letter.id},
        )

    async def discard(self, id: str) -> DeadLetter:
        """Delete a dead letter for good; nothing is dispatched or delivered.

        Discarding the dead letter of a failed compensation leaves its instance in
        `"compensation_failed"`: `abort` it when nothing more should happen.

        Returns:
            The dead letter that was deleted.

        Raises:
            DeadLetterError: No dead letter has this id.
        """
        letter = await self.get_dead_letter(id)
        await self._store.commit(Changes(dead_letter_deletes=[letter.id]))
        log.info(
            "discarded dead letter %s (%s %s of %s/%s): %s",
            letter.id,
            letter.kind,
            letter.type_name,
            letter.saga,
            letter.key,
            letter.error,
            extra={"saga": letter.saga, "key": letter.key, "dead_letter_id": letter.id},
        )
        return letter

    async def abort(self, saga: str, key: str) -> InstanceInfo:
        """Delete an instance with its pending schedules and commands; its dead letters stay.

        The delete is version-checked: if a runtime changes the instance meanwhile, it is
        read again and the delete repeated. A running runtime may still dispatch a
        command of it that it holds in memory and that is due now; one waiting there for a
        retry is dropped before its next attempt.

        In the same commit the instance leaves an `"aborted"` tombstone (without its
        state) for its saga's `tombstone_retention` (7 days when the `Admin` has no
        registry or the saga is not registered in it): meanwhile its events are
        reported as unmatched, saying it was aborted, no `late=True` handler runs for
        it, and a start event does not start the key again unless the saga reuses keys.

        Returns:
            The instance as it was just before it was deleted.

        Raises:
            DeadLetterError: No instance of `saga` has this key.
            ConflictError: Runtimes kept changing the instance meanwhile.
        """
        for attempt in range(1, _RACES + 1):
            info = await self.show(saga, key)
            try:
                await self._store.commit(
                    Changes(
                        deletes=[InstanceDelete(saga, key, info.record.version)],
                        tombstones=self._aborted(info.record),
                    )
                )
            except ConflictError:
                if attempt == _RACES:
                    raise
                continue
            log.info(
                "aborted instance %s/%s (status %s) with %d schedule(s) and %d command(s)",
                saga,
                key,
                info.status,
                len(info.schedules),
                len(info.outbox),
                extra={"saga": saga, "key": key, "instance_id": info.record.instance_id},
            )
            return info
        raise AssertionError("unreachable")  # pragma: no cover

    # -- helpers -------------------------------------------------------------------

    def _aborted(self, record: InstanceRecord) -> list[TombstoneWrite]:
        """The tombstone an aborted instance leaves, if its saga keeps any."""
        spec = None if self._registry is None else self._registry.sagas.get(record.saga)
        retention = (
            TOMBSTONE_RETENTION.total_seconds() if spec is None else spec.tombstone_retention
        )
        if not retention:
            return []
        now = self._clock.now()
        tombstone = Tombstone(
            record.saga,
            record.key,
            ABORTED,
            now,
            now + retention,
            record.instance_id,
            record.version,
            None,
            record.state_version,
        )
        return [TombstoneWrite(tombstone)]

    def _spec(self, saga: str, state_type: type[Any] | None, method: str) -> SagaSpec:
        if self._registry is None:
            raise TypeError(
                f"Admin.{method} decodes states with the sagas' code: make the Admin with "
                "the registry, Admin(store, registry=registry)"
            )
        spec = self._registry.get(saga)
        if state_type is not None and not (
            isinstance(state_type, type) and issubclass(spec.state_type, state_type)
        ):
            shown = getattr(state_type, "__qualname__", repr(state_type))
            raise TypeError(
                f"saga {saga!r} keeps its state as {spec.state_type.__qualname__}, not "
                f"{shown}: pass {spec.state_type.__qualname__} (or nothing)"
            )
        return spec

    def _decoded(self, spec: SagaSpec, record: InstanceRecord) -> SagaState[Any]:
        assert self._registry is not None
        state = spec.load_record(self._registry.serializer, record)
        return SagaState(
            record.saga,
            record.key,
            state,
            record.status,
            record.version,
            record.created_at,
            record.updated_at,
            record.completed,
        )

    async def _record(self, saga: str, key: str) -> InstanceRecord | None:
        loaded = await self._store.load(LoadRequest(instances=[(saga, key)], now=self._clock.now()))
        return loaded.instances.get((saga, key))

    async def _pending(
        self, saga: str, key: str
    ) -> tuple[list[ScheduleRecord], list[OutboxRecord], list[DeadLetter]]:
        return (
            await self._store.list_schedules(saga=saga, key=key),
            await self._store.list_outbox(saga=saga, key=key),
            await self.list_dead_letters(saga=saga, key=key),
        )

    @staticmethod
    def _info(
        record: InstanceRecord,
        schedules: list[ScheduleRecord],
        outbox: list[OutboxRecord],
        letters: list[DeadLetter],
        now: float,
    ) -> InstanceInfo:
        return InstanceInfo(
            record,
            tuple(schedules),
            tuple(outbox),
            tuple(letters),
            age=now - record.created_at,
            idle=now - record.updated_at,
        )
