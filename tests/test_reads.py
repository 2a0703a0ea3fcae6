"""Typed reads (`Admin.state`, `Admin.states`) and row counts (`count_rows`, gauges).

Instances are written straight into the store (as a runtime would write them), on the
memory, SQLite and PostgreSQL stores.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sagas_for_tests import SAGA, T0, Log, Started, running, scripted_registry

from sagaflow import Admin, Hooks, Registry, SagaState, StatePage, correlate, on, upcast
from sagaflow._clock import VirtualClock
from sagaflow.exceptions import DeadLetterError, DecodeError
from sagaflow.otel import OpenTelemetryHooks
from sagaflow.stores import (
    ACTIVE,
    COMPENSATION_FAILED,
    COMPLETING,
    Changes,
    DeadLetter,
    InstanceRecord,
    InstanceWrite,
    MemoryStore,
    OutboxRecord,
    RowCounts,
    ScheduleRecord,
    SQLiteStore,
    Store,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "reads.db")
    else:
        from sagaflow.stores import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        made = PostgresStore(dsn, schema=request.getfixturevalue("pg_schema"))
    await made.open()
    yield made
    await made.close()


def record(
    key: str, seen: list[str], *, saga: str = SAGA, status: str = ACTIVE, version: int = 1
) -> InstanceRecord:
    return InstanceRecord(
        saga,
        key,
        version,
        status,
        f'{{"seen": {list(seen)!r}}}'.replace("'", '"'),
        f"iid-{key}",
        T0,
        T0 + version,
        "sagas_for_tests.Started",
        status == COMPLETING,
    )


async def write(store: Store, *records: InstanceRecord) -> None:
    await store.commit(Changes(writes=[InstanceWrite(r, 0) for r in records]))


def admin(store: Store, registry: Registry | None = None) -> Admin:
    return Admin(
        store,
        registry=scripted_registry() if registry is None else registry,
        clock=VirtualClock(start=T0 + 100),
    )


# -- one instance ------------------------------------------------------------------------


async def test_state_gives_the_instance_with_its_state_decoded(store: Store) -> None:
    await write(store, record("k", ["Started", "Touched"], version=2, status=COMPLETING))

    found = await admin(store).state(SAGA, "k", Log)

    assert found == SagaState(
        saga=SAGA,
        key="k",
        state=Log(seen=["Started", "Touched"]),
        status=COMPLETING,
        version=2,
        created_at=T0,
        updated_at=T0 + 2,
        completed=True,
    )
    assert await admin(store).state(SAGA, "k") == found  # the state class is optional


async def test_state_of_an_instance_that_is_not_there_names_it(store: Store) -> None:
    with pytest.raises(DeadLetterError) as caught:
        await admin(store).state(SAGA, "nobody", Log)

    assert isinstance(caught.value, LookupError)
    assert str(caught.value) == (
        f"no instance of saga {SAGA!r} has key 'nobody' (it never started, or it ended or "
        "was aborted)"
    )


async def test_state_that_cannot_be_decoded_is_an_error_naming_saga_key_and_field(
    store: Store,
) -> None:
    await write(store, attrs.evolve(record("k", []), state='{"seen": 3}'))

    with pytest.raises(DecodeError) as caught:
        await admin(store).state(SAGA, "k", Log)

    assert (caught.value.saga, caught.value.key) == (SAGA, "k")
    assert "seen" in str(caught.value)


async def test_reads_need_the_registry_the_right_state_class_and_a_known_saga() -> None:
    store = MemoryStore()

    with pytest.raises(TypeError, match=r"make the Admin with the registry"):
        await Admin(store).state(SAGA, "k")
    with pytest.raises(TypeError) as wrong:
        await admin(store).state(SAGA, "k", Started)
    with pytest.raises(LookupError, match="no saga named 'Nope' is registered"):
        await admin(store).states("Nope")
    with pytest.raises(ValueError, match=r"Admin.states\(limit=0\) must be at least 1"):
        await admin(store).states(SAGA, limit=0)

    assert str(wrong.value) == (
        f"saga {SAGA!r} keeps its state as Log, not Started: pass Log (or nothing)"
    )


@attrs.define
class Tally:
    total: int = 0
    unit: str = ""


class TallySaga:
    @correlate
    def key(self, event: Started) -> str:
        return event.key

    @on(Started, start=True)
    def started(self, state: Tally, event: Started) -> None:
        state.total += 1

    @upcast(1)
    @staticmethod
    def add_unit(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "unit": "items"}


async def test_a_state_written_by_an_older_version_is_upcast(store: Store) -> None:
    registry = Registry()
    registry.register(TallySaga(), state=Tally, name="tally", version=2)
    old = InstanceRecord("tally", "k", 1, ACTIVE, '{"total": 4}', "iid", T0, T0, None, False, 1)
    await write(store, old)

    found = await admin(store, registry).state("tally", "k", Tally)

    assert found.state == Tally(4, "items")


# -- listings ----------------------------------------------------------------------------


async def test_states_pages_through_one_sagas_instances_by_key(store: Store) -> None:
    """Keys in order, the empty key first; other sagas' instances, before or after in
    the store's order, never show."""
    keys = ["", "a", "b b", "c", "é"]
    await write(
        store,
        *(record(k, [k]) for k in keys),
        record("z", [], saga="A"),
        record("", [], saga="T"),
        record("a", [], saga="T"),
    )
    reader = admin(store)

    pages: list[StatePage[Log]] = []
    after: str | None = None
    while True:
        page = await reader.states(SAGA, Log, after=after, limit=2)
        pages.append(page)
        if page.next is None:
            break
        after = page.next

    assert [[(s.key, s.state) for s in p.items] for p in pages] == [
        [("", Log([""])), ("a", Log(["a"]))],
        [("b b", Log(["b b"])), ("c", Log(["c"]))],
        [("é", Log(["é"]))],
    ]
    assert [p.next for p in pages] == ["a", "c", None]
    assert await reader.states(SAGA, after="é") == StatePage((), None)
    whole = await reader.states(SAGA, Log, limit=5)
    assert ([s.key for s in whole.items], whole.next) == (keys, None)


async def test_states_of_a_saga_without_instances_is_one_empty_page(store: Store) -> None:
    await write(store, record("k", [], saga="Other"))

    assert await admin(store).states(SAGA, Log) == StatePage((), None)


# -- counting rows -----------------------------------------------------------------------


async def test_admin_counts_the_rows_of_the_store(store: Store) -> None:
    await write(store, record("a", []), record("b", [], status=COMPENSATION_FAILED))
    await store.commit(
        Changes(
            outbox_adds=[OutboxRecord("c1", SAGA, "a", 1, "send", "T", "{}")],
            schedule_puts=[
                ScheduleRecord("s1", SAGA, "a", "due", T0 + 50, False, "T", "{}"),
                ScheduleRecord("s2", SAGA, "a", "later", T0 + 500, False, "T", "{}"),
            ],
            dead_letters=[DeadLetter("d1", SAGA, "b", "send", "T", "{}", "E", 3, T0)],
        )
    )

    counts = await admin(store).count_rows()  # at T0 + 100

    assert counts == RowCounts(
        instances={ACTIVE: 1, COMPLETING: 0, COMPENSATION_FAILED: 1},
        outbox=1,
        schedules=2,
        due_schedules=1,
        dead_letters=1,
    )


class Gauges(Hooks):
    def __init__(self) -> None:
        self.counts: list[RowCounts] = []
        self.counted = anyio.Event()

    def rows_counted(self, counts: RowCounts) -> None:
        self.counts.append(counts)
        self.counted.set()

    async def next(self) -> RowCounts:
        await self.counted.wait()
        self.counted = anyio.Event()
        return self.counts[-1]


def no_rows(active: int = 0) -> RowCounts:
    return RowCounts({ACTIVE: active, COMPLETING: 0, COMPENSATION_FAILED: 0}, 0, 0, 0, 0)


async def test_the_runtime_counts_rows_when_it_starts_and_then_every_interval() -> None:
    hooks = Gauges()
    async with running(scripted_registry(), hooks=hooks, gauge_interval=10) as h:
        first = await hooks.next()
        await h.runtime.publish(Started("k"))
        h.clock.advance(9)
        await h.runtime.drain()
        counted_before_the_interval = len(hooks.counts)
        h.clock.advance(1)
        second = await hooks.next()

    assert (first, counted_before_the_interval, second) == (no_rows(), 1, no_rows(active=1))


class CountingStore(MemoryStore):
    counted: int = 0

    async def count_rows(self, *, now: float) -> RowCounts:
        self.counted += 1
        return await super().count_rows(now=now)


@pytest.mark.parametrize(
    ("hooks", "interval"), [(None, 10.0), (Hooks(), 10.0), (Gauges(), None)], ids=str
)
async def test_rows_are_never_counted_unless_hooks_want_the_counts(
    hooks: Hooks | None, interval: float | None
) -> None:
    store = CountingStore()
    async with running(scripted_registry(), store=store, hooks=hooks, gauge_interval=interval) as h:
        await h.runtime.publish(Started("k"))
        await h.advance(100)

    assert store.counted == 0


async def test_a_count_that_fails_is_logged_and_the_runtime_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(CountingStore):
        async def count_rows(self, *, now: float) -> RowCounts:
            self.counted += 1
            raise ConnectionError("store down")

    store, hooks = Broken(), Gauges()
    with caplog.at_level(logging.WARNING, "sagaflow.runtime"):
        async with running(scripted_registry(), store=store, hooks=hooks, gauge_interval=5) as h:
            await h.runtime.publish(Started("k"))
            while store.counted < 2:
                h.clock.advance(5)
                await anyio.sleep(0)
            summary = await h.summary()

    assert hooks.counts == []
    assert summary == {"k": ("active", ["Started"])}
    assert "could not count the store's rows for gauges: ConnectionError: store down" in (
        caplog.text
    )


def test_opentelemetry_reports_the_last_counts_as_gauges() -> None:
    reader = InMemoryMetricReader()
    hooks = OpenTelemetryHooks(meter_provider=MeterProvider(metric_readers=[reader]))

    def gauges() -> list[tuple[str, dict[str, Any], int]]:
        data = reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        found.append((metric.name, dict(point.attributes or {}), point.value))
        return sorted(found, key=str)

    before = gauges()
    hooks.rows_counted(RowCounts({ACTIVE: 7, COMPLETING: 2, COMPENSATION_FAILED: 1}, 12, 30, 4, 3))

    assert before == []
    assert gauges() == sorted(
        [
            ("sagaflow.dead_letters.kept", {}, 3),
            ("sagaflow.instances", {"sagaflow.status": ACTIVE}, 7),
            ("sagaflow.instances", {"sagaflow.status": COMPENSATION_FAILED}, 1),
            ("sagaflow.instances", {"sagaflow.status": COMPLETING}, 2),
            ("sagaflow.outbox.depth", {}, 12),
            ("sagaflow.schedules.due", {}, 4),
        ],
        key=str,
    )
