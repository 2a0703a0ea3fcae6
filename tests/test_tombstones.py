"""Finished instances: tombstones, late events and `late=True` handlers, on every store.

A completed instance (or one an operator aborted) leaves a tombstone for its saga's
`tombstone_retention`: events for its key are reported as unmatched with how it ended,
a start event does not start the key again unless the saga reuses keys, and a
`late=True` handler gets the final state read-only and may send commands.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from json_meaning import JsonText

from sagaflow import (
    Admin,
    Complete,
    DispatchMeta,
    Registry,
    RetryPolicy,
    Runtime,
    Schedule,
    Send,
    Unmatched,
    Unschedule,
    correlate,
    on,
    upcast,
)
from sagaflow._clock import VirtualClock
from sagaflow.exceptions import DeadLetterError, RegistrationError, RegistrationErrors
from sagaflow.stores import (
    Changes,
    DedupMark,
    InstanceRecord,
    InstanceWrite,
    Loaded,
    LoadRequest,
    MemoryStore,
    SQLiteStore,
    Store,
    Tombstone,
    TombstoneWrite,
)
from sagaflow.stores import _sqlite as sqlite_module
from sagaflow.testing import Scenario, SyncScenario

T0 = 1_800_000_000.0
WEEK = timedelta(days=7).total_seconds()
NO_INSTANCE = "no live instance and the handler is not start=True"
COMPLETED = "the instance has completed"
RETRY = RetryPolicy(max_attempts=3, initial_delay=10, jitter=False)

# -- messages and the saga -------------------------------------------------------------


@attrs.frozen
class TripBooked:
    trip: str


@attrs.frozen
class HotelConfirmed:
    trip: str
    hotel: str


@attrs.frozen
class Touch:
    trip: str


@attrs.frozen
class RefundIssued:  # only a late handler takes it
    trip: str


@attrs.frozen
class Deadline:
    trip: str


@attrs.frozen
class ReserveHotel:
    trip: str


@attrs.frozen
class Notify:
    trip: str
    what: str


@attrs.frozen
class CancelHotel:
    trip: str
    hotel: str
    status: str


@attrs.define
class Trip:
    status: str = "new"
    hotel: str = ""


def cancel(trip: Trip, event: Any) -> Any:
    """The usual late handler: cancel what was confirmed too late."""
    if isinstance(event, RefundIssued):
        return Send(Notify(event.trip, f"refund after {trip.status}"))
    return Send(CancelHotel(event.trip, event.hotel, trip.status))


@attrs.define
class TripSaga:
    """Books a hotel before a deadline; `late` is what its late handler does."""

    late: Callable[[Trip, Any], Any] = cancel
    notify: bool = False  # completing sends a Notify too

    @correlate(TripBooked, HotelConfirmed, Touch, RefundIssued)
    def trip(self, event: TripBooked | HotelConfirmed | Touch | RefundIssued) -> str:
        return event.trip

    @on(TripBooked, start=True)
    def booked(self, trip: Trip, event: TripBooked) -> list[Any]:
        trip.status = "booking"
        return [
            Send(ReserveHotel(event.trip)),
            Schedule(Deadline(event.trip), after=600, name="deadline", to_self=True),
        ]

    @on(HotelConfirmed)
    def confirmed(self, trip: Trip, event: HotelConfirmed) -> list[Any]:
        trip.status, trip.hotel = "confirmed", event.hotel
        notify = [Send(Notify(event.trip, "confirmed"))] if self.notify else []
        return [Unschedule("deadline"), *notify, Complete()]

    @on(Deadline, internal=True)
    def expired(self, trip: Trip, event: Deadline) -> Complete:
        trip.status = "expired"
        return Complete()

    @on(Touch)
    def touched(self, trip: Trip, event: Touch) -> None:
        return None

    @on(HotelConfirmed, RefundIssued, late=True)
    def too_late(self, trip: Trip, event: HotelConfirmed | RefundIssued) -> Any:
        return self.late(trip, event)


@attrs.define
class PlainTripSaga:
    """The trip saga without late handlers."""

    @correlate
    def trip(self, event: TripBooked | HotelConfirmed | Touch) -> str:
        return event.trip

    @on(TripBooked, start=True)
    def booked(self, trip: Trip, event: TripBooked) -> Send[ReserveHotel]:
        trip.status = "booking"
        return Send(ReserveHotel(event.trip))

    @on(HotelConfirmed)
    def confirmed(self, trip: Trip, event: HotelConfirmed) -> Complete:
        trip.status, trip.hotel = "confirmed", event.hotel
        return Complete()

    @on(Touch)
    def touched(self, trip: Trip, event: Touch) -> None:
        return None


def trips(saga: object | None = None, **options: Any) -> Registry:
    registry = Registry()
    registry.register(TripSaga() if saga is None else saga, state=Trip, name="Trip", **options)
    return registry


# -- the harness -------------------------------------------------------------------------


@attrs.define
class Calls:
    """A dispatcher that records calls; the labels in `failing` fail their first attempt."""

    failing: dict[type, int] = attrs.Factory(dict)
    calls: list[tuple[Any, DispatchMeta]] = attrs.Factory(list)

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        await anyio.lowlevel.checkpoint()
        self.calls.append((command, meta))
        if meta.attempt <= self.failing.get(type(command), 0):
            raise ConnectionError(f"{type(command).__name__} is down")

    def commands(self) -> list[Any]:
        return [c for c, _ in self.calls]


@attrs.define
class Run:
    runtime: Runtime
    store: Store
    clock: VirtualClock | None
    calls: Calls
    unmatched: list[Unmatched]

    async def publish(self, event: Any, *, id: str | None = None) -> None:
        await self.runtime.publish(event, id=id)
        await self.runtime.drain()

    async def advance(self, seconds: float) -> None:
        assert self.clock is not None, "no virtual clock in cluster mode"
        await self.runtime.drain()
        self.clock.advance(seconds)
        await self.runtime.drain()

    def now(self) -> float:
        return self.runtime._clock.now()


MODES = [
    "memory",
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("cluster", marks=pytest.mark.postgres),
]
SINGLE = MODES[:3]


@pytest.fixture
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Store]:
    """Stores by mode name; every call for one test shares one database."""

    def make(mode: str) -> Store:
        if mode == "memory":
            return shared.setdefault("memory", MemoryStore())
        if mode == "sqlite":
            return SQLiteStore(tmp_path / "trips.db")
        from sagaflow.stores import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("pg_schema")
        return PostgresStore(dsn, schema=schema, poll_interval=0.05, lease=5.0)

    shared: dict[str, Store] = {}
    return make


@asynccontextmanager
async def running(
    registry: Registry,
    store: Store,
    *,
    cluster: bool = False,
    calls: Calls | None = None,
    clock: VirtualClock | None = None,
    **options: Any,
) -> AsyncIterator[Run]:
    calls = Calls() if calls is None else calls
    unmatched: list[Unmatched] = []
    if not cluster and clock is None:
        clock = VirtualClock(start=T0)
    with anyio.fail_after(60):
        async with Runtime(
            registry,
            store=store,
            dispatch=calls,
            retry=RETRY,
            clock=clock,
            on_unmatched=unmatched.append,
            cluster=cluster,
            **options,
        ) as runtime:
            yield Run(runtime, store, clock, calls, unmatched)


def instance_id(run: Run, command_type: type) -> str:
    """The instance id the first command of `command_type` was made by."""
    return next(m.id for c, m in run.calls.calls if isinstance(c, command_type)).split(".")[0]


# -- tombstones and unmatched events ---------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_a_completed_instance_leaves_a_tombstone_and_its_events_are_reported(
    mode: str, make_store: Callable[[str], Store], caplog: pytest.LogCaptureFixture
) -> None:
    """Reported as "completed" (WARNING, counter, hook), unlike a key that never existed."""
    store = make_store(mode)
    async with running(trips(), store, cluster=mode == "cluster") as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        ended = run.now()
        caplog.clear()
        with caplog.at_level(logging.WARNING, "sagaflow.runtime"):
            await run.publish(Touch("t1"))
            await run.publish(Touch("t9"))
        instances, tombstones = await store.list_instances(), await store.list_tombstones()
        stats = run.runtime.statistics()

    (tombstone,) = tombstones
    assert instances == []
    assert tombstone == Tombstone(
        "Trip",
        "t1",
        "completed",
        tombstone.ended_at,
        tombstone.ended_at + WEEK,
        instance_id(run, ReserveHotel),
        2,
        JsonText('{"status": "confirmed", "hotel": "h1"}'),  # the saga has late handlers
        1,
    )
    assert tombstone.ended_at <= ended
    assert run.unmatched == [
        Unmatched(Touch("t1"), "Trip", "t1", COMPLETED, "completed"),
        Unmatched(Touch("t9"), "Trip", "t9", NO_INSTANCE),
    ]
    assert stats.events_unmatched == 2
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"Touch for saga 'Trip' key 't1' matched no instance, it was not applied: {COMPLETED}",
        f"Touch for saga 'Trip' key 't9' matched no instance, it was not applied: {NO_INSTANCE}",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", SINGLE)
async def test_a_saga_without_late_handlers_keeps_no_state_in_its_tombstones(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    store = make_store(mode)
    async with running(trips(PlainTripSaga()), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        (tombstone,) = await store.list_tombstones()

    assert (tombstone.ended, tombstone.version, tombstone.state) == ("completed", 2, None)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_a_start_event_does_not_start_a_finished_key_again(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    store = make_store(mode)
    async with running(trips(), store, cluster=mode == "cluster") as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(TripBooked("t1"))
        instances = await store.list_instances()

    assert instances == []
    assert [type(c) for c in run.calls.commands()] == [ReserveHotel]
    (u,) = run.unmatched
    assert (u.event, u.ended) == (TripBooked("t1"), "completed")
    assert u.reason == (
        "the instance has completed, and saga 'Trip' does not reuse keys: a start event "
        "does not begin a new instance for a finished key while its tombstone counts "
        "(register the saga with reuse_keys=True to allow it)"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_with_reuse_keys_a_start_event_starts_the_key_again(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    """The tombstone goes in the commit that starts the key; versions go on from it."""
    store = make_store(mode)
    async with running(trips(reuse_keys=True), store, cluster=mode == "cluster") as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(TripBooked("t1"))
        (record,) = await store.list_instances()
        tombstones = await store.list_tombstones()

    assert tombstones == []
    assert (record.status, record.version, record.state) == (
        "active",
        3,
        JsonText('{"status": "booking", "hotel": ""}'),
    )
    assert [type(c) for c in run.calls.commands()] == [ReserveHotel, ReserveHotel]
    assert run.unmatched == []


@pytest.mark.anyio
@pytest.mark.parametrize("mode", SINGLE)
async def test_once_the_retention_passed_the_key_is_forgotten(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    store = make_store(mode)
    registry = trips(tombstone_retention=timedelta(hours=1))
    async with running(registry, store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.advance(3600)
        await run.publish(Touch("t1"))  # still remembered: expires_at is inclusive
        await run.advance(1)
        await run.publish(Touch("t1"))
        await run.publish(TripBooked("t1"))
        (record,) = await store.list_instances()

    assert [(u.reason, u.ended) for u in run.unmatched] == [
        (COMPLETED, "completed"),
        (NO_INSTANCE, None),
    ]
    assert (record.status, record.version) == ("active", 1)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", SINGLE)
async def test_a_retention_of_0_keeps_no_tombstones(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    store = make_store(mode)
    async with running(trips(PlainTripSaga(), tombstone_retention=0), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(Touch("t1"))
        tombstones = await store.list_tombstones()
        await run.publish(TripBooked("t1"))
        (record,) = await store.list_instances()

    assert tombstones == []
    assert run.unmatched == [Unmatched(Touch("t1"), "Trip", "t1", NO_INSTANCE)]
    assert (record.status, record.version) == ("active", 1)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", SINGLE)
async def test_an_aborted_instance_leaves_an_aborted_tombstone(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    """No late handler runs for it: an operator decided that nothing more happens."""
    store = make_store(mode)
    registry = trips(tombstone_retention=timedelta(days=2))
    async with running(registry, store) as run:
        await run.publish(TripBooked("t1"))
        aborted_at = run.now()
        await Admin(store, registry, clock=run.runtime._clock).abort("Trip", "t1")
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(TripBooked("t1"))
        tombstones = await store.list_tombstones()

    assert tombstones == [
        Tombstone(
            "Trip",
            "t1",
            "aborted",
            aborted_at,
            aborted_at + 2 * 86400,
            instance_id(run, ReserveHotel),
            1,
            None,
            1,
        )
    ]
    reason = "the instance was aborted by an operator"
    assert run.unmatched == [
        Unmatched(HotelConfirmed("t1", "h1"), "Trip", "t1", reason, "aborted"),
        Unmatched(TripBooked("t1"), "Trip", "t1", reason, "aborted"),
    ]
    assert [type(c) for c in run.calls.commands()] == [ReserveHotel]


@pytest.mark.anyio
async def test_an_admin_without_a_registry_keeps_aborted_tombstones_for_7_days() -> None:
    store = MemoryStore()
    async with running(trips(), store) as run:
        await run.publish(TripBooked("t1"))
        now = run.now()
        await Admin(store, clock=run.runtime._clock).abort("Trip", "t1")
        (tombstone,) = await store.list_tombstones()

    assert (tombstone.ended, tombstone.expires_at) == ("aborted", now + WEEK)


# -- late handlers -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_a_late_handler_gets_the_final_state_and_its_commands_go_out(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    """Each late event gets commands with ids of their own (the tombstone's version goes
    up); a redelivered one is a duplicate."""
    store = make_store(mode)
    async with running(trips(), store, cluster=mode == "cluster") as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(HotelConfirmed("t1", "h2"), id="late-1")
        await run.publish(RefundIssued("t1"))
        await run.publish(HotelConfirmed("t1", "h2"), id="late-1")
        (tombstone,) = await store.list_tombstones()
        left = (await store.list_instances(), await store.list_outbox())
        stats = run.runtime.statistics()

    iid = instance_id(run, ReserveHotel)
    assert [(c, m.id, m.saga, m.key) for c, m in run.calls.calls[1:]] == [
        (CancelHotel("t1", "h2", "confirmed"), f"{iid}.3.0", "Trip", "t1"),
        (Notify("t1", "refund after confirmed"), f"{iid}.4.0", "Trip", "t1"),
    ]
    assert (tombstone.version, tombstone.state) == (
        4,
        JsonText('{"status": "confirmed", "hotel": "h1"}'),
    )
    assert left == ([], [])
    assert (stats.events_duplicate, stats.events_unmatched, run.unmatched) == (1, 0, [])


@pytest.mark.anyio
@pytest.mark.parametrize("mode", SINGLE)
async def test_a_late_handler_runs_while_the_instance_still_drains_its_outbox(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    """Completed but not ended (a command waits for its retry): the late handler's
    commands go after it, and the instance ends once they are out too."""
    store = make_store(mode)
    calls = Calls(failing={Notify: 1})
    async with running(trips(TripSaga(notify=True)), store, calls=calls) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(HotelConfirmed("t1", "h2"))
        (completing,) = await store.list_instances()
        await run.advance(10)
        left = await store.list_instances()
        (tombstone,) = await store.list_tombstones()

    assert (completing.status, completing.version) == ("completing", 3)
    assert run.calls.commands() == [
        ReserveHotel("t1"),
        Notify("t1", "confirmed"),
        Notify("t1", "confirmed"),
        CancelHotel("t1", "h2", "confirmed"),
    ]
    assert left == []
    assert (tombstone.version, tombstone.state) == (
        3,
        JsonText('{"status": "confirmed", "hotel": "h1"}'),
    )


@pytest.mark.anyio
async def test_a_late_only_type_for_a_live_instance_is_reported() -> None:
    async with running(trips(), MemoryStore()) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(RefundIssued("t1"))

    reason = "only a late=True handler takes RefundIssued, and the instance has not completed"
    assert run.unmatched == [Unmatched(RefundIssued("t1"), "Trip", "t1", reason)]


def _schedule(trip: Trip, event: Any) -> Any:
    return Schedule(Touch(event.trip), after=5)


def _unschedule(trip: Trip, event: Any) -> Any:
    return Unschedule("deadline")


def _complete(trip: Trip, event: Any) -> Any:
    return [Send(CancelHotel(event.trip, event.hotel, "x")), Complete()]


def _change(trip: Trip, event: Any) -> Any:
    trip.status = "changed"
    return Send(CancelHotel(event.trip, event.hotel, trip.status))


LATE_ONLY = (
    "a late=True handler may return Send and Compensate only, not {}: the instance has completed"
)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("late", "error"),
    [
        (_schedule, LATE_ONLY.format("Schedule")),
        (_unschedule, LATE_ONLY.format("Unschedule")),
        (_complete, LATE_ONLY.format("Complete")),
        (
            _change,
            "a late=True handler gets the final state read-only, but this one changed it "
            "(the instance has completed: nothing would keep the change)",
        ),
    ],
    ids=["schedule", "unschedule", "complete", "state-change"],
)
async def test_what_a_late_handler_may_not_do_dead_letters_its_event(
    late: Callable[[Trip, Any], Any], error: str
) -> None:
    store = MemoryStore()
    async with running(trips(TripSaga(late=late)), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(HotelConfirmed("t1", "h2"))
        await run.publish(HotelConfirmed("t1", "h3"))  # the state was restored meanwhile
        letters = await store.list_dead_letters()
        (tombstone,) = await store.list_tombstones()

    assert [letter.error for letter in letters] == [
        f"ActionError: saga 'Trip' key 't1' handling HotelConfirmed: {error}"
    ] * 2
    assert (tombstone.version, tombstone.state) == (
        2,
        JsonText('{"status": "confirmed", "hotel": "h1"}'),
    )
    assert [type(c) for c in run.calls.commands()] == [ReserveHotel]


@pytest.mark.anyio
async def test_a_late_command_that_fails_for_good_is_a_dead_letter() -> None:
    store = MemoryStore()
    calls = Calls(failing={CancelHotel: 99})
    async with running(trips(), store, calls=calls) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(HotelConfirmed("t1", "h2"))
        await run.advance(10)
        await run.advance(20)
        (letter,) = await store.list_dead_letters()
        outbox = await store.list_outbox()

    assert (letter.kind, letter.attempts, outbox) == ("send", 3, [])
    assert letter.error == "ConnectionError: CancelHotel is down; the instance is completed"


@pytest.mark.anyio
async def test_a_late_handler_added_after_the_instance_ended_finds_no_state() -> None:
    """The tombstone of a saga without late handlers holds no state, so a late handler
    added by a later deploy cannot run for it: the event is reported, saying why."""
    store = MemoryStore()
    async with running(trips(PlainTripSaga()), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
    async with running(trips(), store) as run:
        await run.publish(HotelConfirmed("t1", "h2"))

    (u,) = run.unmatched
    assert (u.ended, u.reason) == (
        "completed",
        "the instance has completed, and its tombstone holds no final state for the "
        "late=True handler too_late (the saga had no late handler when the instance ended)",
    )


@attrs.define
class TripV2:
    state: str = "new"  # renamed from `status` in version 2
    hotel: str = ""


@attrs.define
class TripSagaV2:
    seen: list[TripV2] = attrs.Factory(list)

    @correlate
    def trip(self, event: TripBooked | HotelConfirmed) -> str:
        return event.trip

    @on(TripBooked, start=True)
    def booked(self, trip: TripV2, event: TripBooked) -> None:
        return None

    @on(HotelConfirmed, late=True)
    def too_late(self, trip: TripV2, event: HotelConfirmed) -> Send[CancelHotel]:
        self.seen.append(trip)
        return Send(CancelHotel(event.trip, event.hotel, trip.state))

    @upcast(1)
    @staticmethod
    def rename(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        data["state"] = data.pop("status")
        return data


@pytest.mark.anyio
async def test_a_tombstone_state_of_an_older_version_is_upcast_for_the_late_handler() -> None:
    store = MemoryStore()
    async with running(trips(), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
    saga = TripSagaV2()
    registry = Registry()
    registry.register(saga, state=TripV2, name="Trip", version=2)
    async with running(registry, store) as run:
        await run.publish(HotelConfirmed("t1", "h2"))

    assert saga.seen == [TripV2("confirmed", "h1")]
    assert run.calls.commands() == [CancelHotel("t1", "h2", "confirmed")]


@pytest.mark.anyio
async def test_tombstones_of_a_renamed_saga_move_with_it() -> None:
    store = MemoryStore()
    async with running(trips(), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
    registry = Registry()
    registry.register(TripSaga(), state=Trip, name="Journey", aliases=("Trip",))
    async with running(registry, store) as run:
        await run.publish(Touch("t1"))
        await run.publish(HotelConfirmed("t1", "h2"))

    assert run.unmatched == [Unmatched(Touch("t1"), "Journey", "t1", COMPLETED, "completed")]
    assert run.calls.commands() == [CancelHotel("t1", "h2", "confirmed")]


@attrs.define(eq=False)
class RecordingStore(MemoryStore):
    commits: list[Changes] = attrs.field(factory=list, init=False)

    async def commit(self, changes: Changes) -> None:
        self.commits.append(changes)
        await super().commit(changes)


@attrs.define(eq=False)
class CountingStore(MemoryStore):
    loads: list[LoadRequest] = attrs.field(factory=list, init=False)

    async def load(self, request: LoadRequest) -> Loaded:
        self.loads.append(request)
        return await super().load(request)


@pytest.mark.anyio
async def test_a_late_event_costs_one_store_read_like_any_event() -> None:
    """The tombstone comes with the batch's one load (no read of its own)."""
    store = CountingStore()
    async with running(trips(), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        store.loads.clear()
        await run.publish(HotelConfirmed("t1", "h2"), id="late")

    assert [(r.instances, r.marks) for r in store.loads] == [
        ([("Trip", "t1")], [("Trip", "t1", "late")])
    ]
    assert run.calls.commands()[-1] == CancelHotel("t1", "h2", "confirmed")


@pytest.mark.anyio
async def test_a_tombstone_is_written_in_the_commit_that_deletes_its_instance() -> None:
    store = RecordingStore()
    async with running(trips(), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))

    (last,) = [c for c in store.commits if c.tombstones]
    (write,) = last.tombstones
    assert [(d.saga, d.key, d.expected_version) for d in last.deletes] == [("Trip", "t1", 1)]
    assert (write.expected_version, write.tombstone.version) == (0, 2)


# -- registration -----------------------------------------------------------------------------


def test_late_handlers_are_checked_at_registration() -> None:
    class Broken:
        @correlate
        def key(self, event: Any) -> str:
            return str(event.trip)

        @on(TripBooked, start=True, late=True)
        def both(self, trip: Trip, event: Any) -> None: ...

        @on(Deadline, internal=True, late=True)
        def inner(self, trip: Trip, event: Any) -> None: ...

        @on(HotelConfirmed, late=True)
        def one(self, trip: Trip, event: Any) -> None: ...

        @on(HotelConfirmed, late=True)
        def two(self, trip: Trip, event: Any) -> None: ...

        @on(Touch, start=True)
        def start(self, trip: Trip, event: Any) -> None: ...

    with pytest.raises(RegistrationErrors) as caught:
        Registry().register(Broken(), state=Trip, tombstone_retention=0)

    assert sorted(str(e) for e in caught.value.exceptions) == [
        "saga 'Broken': handler both cannot be late=True and start=True: a late handler "
        "takes events for instances that have completed",
        "saga 'Broken': handler inner cannot be late=True and internal=True: a late "
        "handler takes events for instances that have completed",
        "saga 'Broken': late=True handlers (one) need the final state that tombstones "
        "keep, but tombstone_retention is 0",
        "saga 'Broken': two late=True handlers for HotelConfirmed: one and two; one type "
        "has one handler per saga (and one late=True handler besides)",
    ]


@pytest.mark.parametrize("retention", [-1, float("inf"), "7d", True])
def test_a_bad_tombstone_retention_is_refused(retention: Any) -> None:
    with pytest.raises(RegistrationError) as caught:
        trips(PlainTripSaga(), tombstone_retention=retention)

    assert str(caught.value) == (
        f"saga 'Trip': tombstone_retention={retention!r} must be a timedelta or a number "
        "of seconds, 0 (keep no tombstones) or more"
    )


def test_commandfailed_cannot_have_a_late_handler() -> None:
    from sagaflow import CommandFailed

    class Broken:
        @correlate
        def key(self, event: Any) -> str:
            return str(event.trip)

        @on(TripBooked, start=True)
        def start(self, trip: Trip, event: Any) -> None: ...

        @on(CommandFailed, late=True)
        def failed(self, trip: Trip, event: Any) -> None: ...

    with pytest.raises(RegistrationError) as caught:
        Registry().register(Broken(), state=Trip)

    assert str(caught.value) == (
        "saga 'Broken': handler failed: CommandFailed cannot be late=True; a command of a "
        "late handler that fails for good is a dead letter"
    )


# -- sagaflow.testing ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_scenario_checks_late_events() -> None:
    async with Scenario(TripSaga, state=Trip) as scenario:
        await scenario.given(TripBooked("t1"), HotelConfirmed("t1", "h1"))
        await scenario.when(HotelConfirmed("t1", "h2"))
        scenario.expect_sent(CancelHotel("t1", "h2", "confirmed"))
        assert (scenario.state, scenario.completed) == (None, True)

        await scenario.when(Touch("t1"))
        scenario.expect_unmatched(Touch("t1"))
        assert [u.ended for u in scenario.unmatched] == ["completed"]


def test_a_sync_scenario_checks_late_events() -> None:
    with SyncScenario(TripSaga, state=Trip) as scenario:
        scenario.given(TripBooked("t1"), HotelConfirmed("t1", "h1"))
        scenario.when(RefundIssued("t1"))
        assert scenario.sent == [Notify("t1", "refund after confirmed")]
        scenario.when(TripBooked("t1"))
        scenario.expect_unmatched(TripBooked("t1"))


# -- purging ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", SINGLE)
async def test_expired_tombstones_are_purged_as_new_ones_come(
    mode: str, make_store: Callable[[str], Store]
) -> None:
    store = make_store(mode)
    registry = trips(PlainTripSaga(), tombstone_retention=60)
    async with running(registry, store) as run:
        for i in range(5):
            await run.publish(TripBooked(f"old{i}"))
            await run.publish(HotelConfirmed(f"old{i}", "h"))
        await run.advance(61)
        for i in range(20):  # a store may purge every few commits only
            await run.publish(TripBooked(f"new{i:02}"))
            await run.publish(HotelConfirmed(f"new{i:02}", "h"))
        tombstones = await store.list_tombstones()

    assert [t.key for t in tombstones] == [f"new{i:02}" for i in range(20)]


@pytest.mark.anyio
async def test_a_tombstone_write_is_a_plain_commit() -> None:
    """What `Admin` and tools may do: put a tombstone by hand, which the runtime honours."""
    store = MemoryStore()
    tombstone = Tombstone("Trip", "t7", "aborted", T0, T0 + 60, "i", 4)
    await store.commit(Changes(tombstones=[TombstoneWrite(tombstone)]))
    async with running(trips(), store) as run:
        await run.publish(TripBooked("t7"))

    assert [(u.key, u.ended) for u in run.unmatched] == [("t7", "aborted")]


# -- inspection ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_admin_show_says_how_and_when_a_finished_instance_ended() -> None:
    store = MemoryStore()
    async with running(trips(), store) as run:
        await run.publish(TripBooked("t1"))
        await run.publish(HotelConfirmed("t1", "h1"))
        run.clock.advance(30)  # type: ignore[union-attr]
        admin = Admin(store, clock=run.runtime._clock)
        with pytest.raises(DeadLetterError) as finished:
            await admin.show("Trip", "t1")
        with pytest.raises(DeadLetterError) as unknown:
            await admin.show("Trip", "t2")

    assert str(finished.value) == (
        "no instance of saga 'Trip' has key 't1' (it completed 0:00:30 ago; its tombstone "
        "counts for 6 days, 23:59:30 more)"
    )
    assert str(unknown.value) == (
        "no instance of saga 'Trip' has key 't2' (it never started, or it ended or was aborted)"
    )


# -- migrating a store of schema version 3 (the release before tombstones) --------------------


IID = "i" * 32
# What a schema-3 runtime left: an active trip with its command and timer, and a mark.
# Instances and marks have not changed since; outbox rows and schedules gained columns
# after schema 3, so they are written as schema 3 has them, by hand.
V3_ROWS = Changes(
    writes=[
        InstanceWrite(
            InstanceRecord(
                "Trip",
                "t1",
                1,
                "active",
                '{"status": "booking", "hotel": ""}',
                IID,
                T0,
                T0,
                "test_tombstones.TripBooked",
            ),
            0,
        )
    ],
    marks=[DedupMark("Trip", "t1", "booked-1", T0 + WEEK)],
)
V3_OUTBOX = (
    "INSERT INTO {s}outbox (id, saga, key, seq, kind, type_name, payload, attempts, due, "
    "error) VALUES ('" + IID + ".1.0', 'Trip', 't1', 65536, 'send', "
    "'test_tombstones.ReserveHotel', '{{\"trip\": \"t1\"}}', 0, 0, NULL)"
)
V3_SCHEDULE = (
    "INSERT INTO {s}schedules (id, saga, key, name, due, to_self, type_name, payload, seq, "
    "attempts) VALUES ('" + IID + ".1.1', 'Trip', 't1', 'deadline', " + str(T0 + 600) + ", "
    "{true}, 'test_tombstones.Deadline', '{{\"trip\": \"t1\"}}', 65537, 0)"
)


async def _run_the_migrated_store(store: Store) -> Run:
    async with running(trips(), store) as run:
        await run.publish(TripBooked("t1"), id="booked-1")  # a duplicate: the mark moved
        await run.publish(HotelConfirmed("t1", "h1"))
        await run.publish(HotelConfirmed("t1", "h2"))
        await run.publish(Touch("t1"))
    return run


@pytest.mark.anyio
async def test_a_schema_3_sqlite_file_migrates_and_its_instances_leave_tombstones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v3.db"
    with pytest.MonkeyPatch.context() as version_3:
        version_3.setattr(sqlite_module, "_MIGRATIONS", sqlite_module._MIGRATIONS[:2])
        version_3.setattr(sqlite_module, "SCHEMA_VERSION", 3)
        old = SQLiteStore(path)
        await old.open()
        await old.commit(V3_ROWS)
        await old.close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(V3_OUTBOX.format(s=""))
        conn.execute(V3_SCHEDULE.format(s="", true=1))

    run = await _run_the_migrated_store(SQLiteStore(path))

    store = SQLiteStore(path)
    await store.open()
    tombstones = await store.list_tombstones()
    await store.close()
    _check_migrated_run(run, tombstones)


@pytest.mark.anyio
@pytest.mark.postgres
async def test_a_schema_3_postgres_schema_migrates_and_its_instances_leave_tombstones(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    import psycopg

    from sagaflow.stores import PostgresStore
    from sagaflow.stores import _postgres as postgres_module

    with pytest.MonkeyPatch.context() as version_3:
        version_3.setattr(postgres_module, "_MIGRATIONS", postgres_module._MIGRATIONS[:3])
        version_3.setattr(postgres_module, "SCHEMA_VERSION", 3)
        old = PostgresStore(postgres_dsn, schema=pg_schema)
        await old.open()
        await old.commit(V3_ROWS)
        await old.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(V3_OUTBOX.format(s=f'"{pg_schema}".'))
        conn.execute(V3_SCHEDULE.format(s=f'"{pg_schema}".', true="true"))

    run = await _run_the_migrated_store(PostgresStore(postgres_dsn, schema=pg_schema))

    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    tombstones = await store.list_tombstones()
    await store.close()
    _check_migrated_run(run, tombstones)


def _check_migrated_run(run: Run, tombstones: list[Tombstone]) -> None:
    assert run.calls.commands() == [
        ReserveHotel("t1"),  # left in the outbox by the old runtime
        CancelHotel("t1", "h2", "confirmed"),
    ]
    assert tombstones == [
        Tombstone(
            "Trip",
            "t1",
            "completed",
            T0,
            T0 + WEEK,
            IID,
            3,
            JsonText('{"status": "confirmed", "hotel": "h1"}'),
            1,
        )
    ]
    assert run.unmatched == [Unmatched(Touch("t1"), "Trip", "t1", COMPLETED, "completed")]
    assert run.runtime.statistics().events_duplicate == 1
