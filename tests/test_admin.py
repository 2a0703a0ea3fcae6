"""`Admin`: listing, showing, retrying, discarding and aborting, on every store.

Each test starts from the store `ops_sagas.prepare` leaves (a real runtime ran on it),
at the fixed time `NOW`, so ages, due times and idle times are exact.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import attrs
import ops_sagas
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from json_meaning import JsonText
from ops_sagas import DAY, Services, prepare

from sagaflow import Admin, RetryPolicy, Runtime
from sagaflow._clock import VirtualClock
from sagaflow.exceptions import ConflictError, DeadLetterError
from sagaflow.stores import (
    Changes,
    DeadLetter,
    InstanceRecord,
    InstanceWrite,
    MemoryStore,
    OutboxRecord,
    SQLiteStore,
    Store,
)

NOW = 1_790_000_000.0
HOUR = 3600.0
EXPIRY = 30 * DAY
RESERVE_ERROR = "ConnectionFailed: Reserve service down"


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The prepared store, open."""
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "ops.db")
    else:
        from sagaflow.stores import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        made = PostgresStore(dsn, schema=request.getfixturevalue("pg_schema"))
    await prepare(made, now=NOW)
    await made.open()
    yield made
    await made.close()


@pytest.fixture
def admin(store: Store) -> Admin:
    return Admin(store, clock=VirtualClock(start=NOW))


async def record(store: Store, saga: str, key: str) -> InstanceRecord:
    (found,) = [r for r in await store.list_instances(saga=saga) if r.key == key]
    return found


async def letter(store: Store, kind: str) -> DeadLetter:
    (found,) = [d for d in await store.list_dead_letters() if d.kind == kind]
    return found


# -- reading ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_instances_shows_every_instance_with_its_pending_rows(admin: Admin) -> None:
    """Age, idle time, last event, schedules (name, due), commands waiting or retrying
    (attempts, error) and dead letters, per instance, ordered by saga and key."""
    infos = await admin.list_instances()

    assert [
        (
            i.saga,
            i.key,
            i.status,
            i.record.completed,
            i.age,
            i.idle,
            i.record.last_event,
            [(s.name, s.due) for s in i.schedules],
            [(o.type_name, o.kind, o.attempts, o.error) for o in i.outbox],
            [d.kind for d in i.dead_letters],
        )
        for i in infos
    ] == [
        (
            "order",
            "a1",
            "active",
            False,
            10 * DAY,
            10 * DAY,
            "ops_sagas.Opened",
            [("expiry", NOW - 10 * DAY + EXPIRY)],
            [],
            ["event"],
        ),
        (
            "order",
            "a2",
            "active",
            False,
            3 * HOUR,
            3 * HOUR,
            "ops_sagas.Opened",
            [("expiry", NOW - 3 * HOUR + EXPIRY)],
            [("ops_sagas.Reserve", "send", 1, RESERVE_ERROR)],
            [],
        ),
        (
            "order",
            "c1",
            "compensation_failed",
            True,
            10 * DAY,
            10 * DAY - 180,
            None,  # the last write handled CommandFailed
            [],
            [("ops_sagas.Refund", "compensate", 0, None)],
            ["compensate"],
        ),
        (
            "order",
            "n1",
            "active",
            False,
            3 * HOUR,
            3 * HOUR,
            "ops_sagas.Opened",
            [("expiry", NOW - 3 * HOUR + EXPIRY)],
            [],
            [],
        ),
        ("shipping", "s1", "active", False, 10 * DAY, 10 * DAY, "ops_sagas.Paid", [], [], ["send"]),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("filters", "found"),
    [
        ({"saga": "shipping"}, ["shipping/s1"]),
        ({"saga": "nope"}, []),
        ({"status": "compensation_failed"}, ["order/c1"]),
        ({"stalled": timedelta(days=1)}, ["order/a1", "order/c1", "shipping/s1"]),
        ({"stalled": 2 * HOUR}, ["order/a1", "order/a2", "order/c1", "order/n1", "shipping/s1"]),
        ({"stalled": 10 * DAY - 100}, ["order/a1", "shipping/s1"]),
        ({"stalled": 10 * DAY}, []),  # "longer than": exactly 10 days idle is not stalled
        ({"saga": "order", "stalled": DAY}, ["order/a1", "order/c1"]),
    ],
)
async def test_list_instances_filters_by_saga_status_and_time_without_progress(
    admin: Admin, filters: dict[str, object], found: list[str]
) -> None:
    infos = await admin.list_instances(**filters)  # type: ignore[arg-type]

    assert [f"{i.saga}/{i.key}" for i in infos] == found


@pytest.mark.anyio
async def test_a_narrow_filter_reads_the_same_pending_rows(admin: Admin) -> None:
    """One instance found: its rows are read for it alone, with the same result."""
    (alone,) = await admin.list_instances(status="compensation_failed")
    every = {f"{i.saga}/{i.key}": i for i in await admin.list_instances()}

    assert alone == every["order/c1"]


@pytest.mark.anyio
async def test_show_returns_one_instance_whole(admin: Admin, store: Store) -> None:
    c1 = await record(store, "order", "c1")

    info = await admin.show("order", "c1")

    assert info == attrs.evolve(
        info,
        record=c1,
        schedules=(),
        outbox=tuple(await store.list_outbox(saga="order", key="c1")),
        dead_letters=(await letter(store, "compensate"),),
        age=10 * DAY,
        idle=10 * DAY - 180,
    )
    assert (info.saga, info.key, info.status, c1.state) == (
        "order",
        "c1",
        "compensation_failed",
        JsonText('{"status": "failed: Release"}'),
    )


@pytest.mark.anyio
async def test_show_of_an_unknown_instance_names_it(admin: Admin) -> None:
    with pytest.raises(DeadLetterError, match=r"^no instance of saga 'order' has key 'zz' "):
        await admin.show("order", "zz")


@pytest.mark.anyio
async def test_show_of_an_aborted_instance_mentions_its_dead_letters(admin: Admin) -> None:
    await admin.abort("order", "c1")

    with pytest.raises(DeadLetterError, match=r"; 1 dead letter\(s\) of it remain$"):
        await admin.show("order", "c1")


@pytest.mark.anyio
async def test_list_dead_letters_oldest_first(admin: Admin, store: Store) -> None:
    """Ordered by failure time (the two that failed at once in either order); filtered
    by saga and key."""
    c1 = await record(store, "order", "c1")
    s1 = await record(store, "shipping", "s1")
    failed = NOW - 10 * DAY + 180

    letters = await admin.list_dead_letters()

    summary = [(d.id, d.saga, d.key, d.kind, d.type_name, d.attempts, d.failed_at) for d in letters]
    assert [summary[0], *sorted(summary[1:], key=lambda d: d[1])] == [
        ("order:a1:broken-1", "order", "a1", "event", "ops_sagas.Broken", 1, NOW - 10 * DAY),
        (f"{c1.instance_id}.2.0", "order", "c1", "compensate", "ops_sagas.Release", 3, failed),
        (f"{s1.instance_id}.1.0", "shipping", "s1", "send", "ops_sagas.Notify", 3, failed),
    ]
    assert [d.key for d in await admin.list_dead_letters(saga="order")] == ["a1", "c1"]
    assert [d.id for d in await admin.list_dead_letters(saga="order", key="c1")] == [
        f"{c1.instance_id}.2.0"
    ]
    assert await admin.get_dead_letter(letters[2].id) == letters[2]


# -- retrying --------------------------------------------------------------------------


async def run_sagas(store: Store, *, now: float = NOW) -> Services:
    """Start a runtime on `store` (nothing fails now), let it do what is due, stop it."""
    services = Services()
    await store.close()
    try:
        async with Runtime(
            ops_sagas.registry,
            store=store,
            dispatch=services,
            retry=RetryPolicy(max_attempts=3, initial_delay=60, jitter=False),
            clock=VirtualClock(start=now),
        ) as runtime:
            await runtime.drain()
    finally:
        await store.open()
    return services


@pytest.mark.anyio
async def test_retrying_a_failed_compensation_resumes_the_chain(admin: Admin, store: Store) -> None:
    """The command goes back at its old place with its attempts reset, the instance is
    completing again (version-checked), and a runtime then finishes the chain in order
    and ends the instance."""
    c1 = await record(store, "order", "c1")
    dead = await letter(store, "compensate")
    refund = await store.list_outbox(saga="order", key="c1")

    assert await admin.retry(dead.id) == dead

    assert await record(store, "order", "c1") == attrs.evolve(
        c1, version=c1.version + 1, status="completing", updated_at=NOW
    )
    assert await store.list_outbox(saga="order", key="c1") == [
        OutboxRecord(dead.id, "order", "c1", dead.seq, "compensate", dead.type_name, dead.payload),
        *refund,
    ]
    assert sorted(d.kind for d in await store.list_dead_letters()) == ["event", "send"]

    services = await run_sagas(store)

    assert [s for s in services.sent() if s[1] == "c1"] == [
        ("Release", "c1", "compensate", 1),
        ("Refund", "c1", "compensate", 1),
    ]
    assert [f"{r.saga}/{r.key}" for r in await store.list_instances()] == [
        "order/a1",
        "order/a2",
        "order/n1",
        "shipping/s1",
    ]
    assert await store.list_outbox(saga="order", key="c1") == []


async def retry_while_running(store: Store) -> tuple[Services, list[InstanceRecord]]:
    """Retry the failed compensation while a runtime runs; let it sweep the store."""
    await store.close()
    clock = VirtualClock(start=NOW)
    services = Services()
    async with Runtime(
        ops_sagas.registry, store=store, dispatch=services, clock=clock, sweep_interval=5
    ) as runtime:
        await runtime.drain()
        admin = Admin(runtime.store, clock=clock)
        await admin.retry((await letter(store, "compensate")).id)
        for _ in range(3):
            clock.advance(5)
            await runtime.drain()
        left = await store.list_instances(saga="order")
    await store.open()
    return services, left


@pytest.mark.anyio
async def test_a_running_runtime_dispatches_a_retried_compensation(store: Store) -> None:
    services, _ = await retry_while_running(store)

    assert [s for s in services.sent() if s[1] == "c1"] == [
        ("Release", "c1", "compensate", 1),
        ("Refund", "c1", "compensate", 1),
    ]


@pytest.mark.anyio
async def test_a_running_runtime_ends_a_completed_instance_after_its_retried_chain(
    store: Store,
) -> None:
    _, left = await retry_while_running(store)

    assert [r.key for r in left] == ["a1", "a2", "n1"]


@pytest.mark.anyio
async def test_retrying_a_failed_compensation_of_an_active_instance_makes_it_active(
    store: Store,
) -> None:
    """Not completed: back to "active", and it takes events again."""
    base = await record(store, "order", "c1")
    await store.commit(
        Changes(
            writes=[
                InstanceWrite(
                    attrs.evolve(base, version=base.version + 1, completed=False), base.version
                )
            ]
        )
    )
    dead = await letter(store, "compensate")

    await Admin(store, clock=VirtualClock(start=NOW)).retry(dead.id)

    c1 = await record(store, "order", "c1")
    assert (c1.status, c1.version) == ("active", base.version + 2)


@pytest.mark.anyio
async def test_retrying_a_send_puts_it_back_and_leaves_the_instance_alone(
    admin: Admin, store: Store
) -> None:
    s1 = await record(store, "shipping", "s1")
    dead = await letter(store, "send")

    await admin.retry(dead.id)

    assert await record(store, "shipping", "s1") == s1
    assert await store.list_outbox(saga="shipping") == [
        OutboxRecord(dead.id, "shipping", "s1", dead.seq, "send", "ops_sagas.Notify", dead.payload)
    ]
    services = await run_sagas(store)
    assert [s for s in services.sent() if s[1] == "s1"] == [("Notify", "s1", "send", 1)]
    assert await store.list_outbox(saga="shipping") == []


@pytest.mark.anyio
async def test_retrying_a_command_of_an_ended_instance_dispatches_it_on_its_own(
    admin: Admin, store: Store
) -> None:
    dead = await letter(store, "send")
    await admin.abort("shipping", "s1")

    await admin.retry(dead.id)

    assert [o.id for o in await store.list_outbox(saga="shipping")] == [dead.id]
    services = await run_sagas(store)
    assert [s for s in services.sent() if s[1] == "s1"] == [("Notify", "s1", "send", 1)]
    assert await store.list_instances(saga="shipping") == []


@pytest.mark.anyio
async def test_retrying_an_unknown_id_names_it(admin: Admin, store: Store) -> None:
    before = await store.list_outbox()

    with pytest.raises(DeadLetterError, match=r"^no dead letter has the id 'nope'; "):
        await admin.retry("nope")
    with pytest.raises(DeadLetterError, match=r"^no dead letter has the id 'nope'; "):
        await admin.discard("nope")

    assert await store.list_outbox() == before


@pytest.mark.anyio
async def test_an_event_needs_a_running_runtime_to_be_retried(admin: Admin) -> None:
    with pytest.raises(
        DeadLetterError,
        match=r"^dead letter 'order:a1:broken-1' is an event \(ops_sagas.Broken for order/a1\): "
        r"it is published again through a running runtime, Admin.retry\(id, runtime=runtime\)",
    ):
        await admin.retry("order:a1:broken-1")


@pytest.mark.anyio
async def test_an_event_is_published_again_through_the_runtime(store: Store) -> None:
    """The fixed saga handles it; the dead letter is gone, the instance moved on."""
    await store.close()
    async with Runtime(
        ops_sagas.make_registry(fixed=True),
        store=store,
        dispatch=Services(),
        clock=VirtualClock(start=NOW),
    ) as runtime:
        admin = Admin(runtime.store, clock=VirtualClock(start=NOW))
        retried = await admin.retry("order:a1:broken-1", runtime=runtime)

        assert retried.kind == "event"
        a1 = await record(store, "order", "a1")
        assert (a1.status, a1.state, a1.last_event, a1.updated_at) == (
            "active",
            JsonText('{"status": "repaired"}'),
            "ops_sagas.Broken",
            NOW,
        )
        assert sorted(d.kind for d in await store.list_dead_letters()) == ["compensate", "send"]
    await store.open()


@pytest.mark.anyio
async def test_an_event_that_fails_again_keeps_its_new_dead_letter(store: Store) -> None:
    await store.close()
    clock = VirtualClock(start=NOW)
    async with Runtime(
        ops_sagas.registry, store=store, dispatch=Services(), clock=clock
    ) as runtime:
        admin = Admin(runtime.store, clock=clock)
        old = await admin.get_dead_letter("order:a1:broken-1")

        await admin.retry(old.id, runtime=runtime)

        assert await admin.get_dead_letter(old.id) == attrs.evolve(old, failed_at=NOW)
    await store.open()


async def add_letter(store: Store, **fields: object) -> DeadLetter:
    letter = DeadLetter(
        **{  # type: ignore[arg-type]
            "id": "manual",
            "saga": "order",
            "key": "a1",
            "kind": "event",
            "type_name": "ops_sagas.Paid",
            "payload": '{"key": "a1"}',
            "error": "RuntimeError: boom",
            "attempts": 1,
            "failed_at": NOW,
            **fields,
        }
    )
    await store.commit(Changes(dead_letters=[letter]))
    return letter


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        (
            {},
            r"^dead letter 'manual': publishing its ops_sagas.Paid again would also reach "
            r"saga\(s\) shipping, which handled it already, and it has no event id",
        ),
        (
            {"type_name": "ops_sagas.Expired"},
            r"^dead letter 'manual': publishing its ops_sagas.Expired again would not reach "
            r"order/a1 \(its handler takes only to_self schedules",
        ),
        (
            {"type_name": "ops_sagas.Broken", "key": "c1", "payload": '{"key": "c1"}'},
            r"^dead letter 'manual': instance order/c1 is in status 'compensation_failed' "
            r"and takes no events; retry its compensation or abort it first$",
        ),
    ],
    ids=["reaches-other-sagas", "internal-handler", "compensation-failed"],
)
async def test_an_event_that_would_go_astray_is_not_published(
    store: Store, fields: dict[str, object], refusal: str
) -> None:
    letter = await add_letter(store, **fields)
    await store.close()
    services = Services()
    async with Runtime(
        ops_sagas.make_registry(fixed=True),
        store=store,
        dispatch=services,
        clock=VirtualClock(start=NOW),
    ) as runtime:
        admin = Admin(runtime.store, clock=VirtualClock(start=NOW))
        instances = await store.list_instances()

        with pytest.raises(DeadLetterError, match=refusal):
            await admin.retry("manual", runtime=runtime)

        assert await store.list_instances() == instances
        assert await admin.get_dead_letter("manual") == letter
    await store.open()


# -- discarding and aborting -----------------------------------------------------------


@pytest.mark.anyio
async def test_discard_deletes_only_the_dead_letter(admin: Admin, store: Store) -> None:
    dead = await letter(store, "compensate")
    instances, outbox = await store.list_instances(), await store.list_outbox()

    assert await admin.discard(dead.id) == dead

    assert sorted(d.kind for d in await store.list_dead_letters()) == ["event", "send"]
    assert (await store.list_instances(), await store.list_outbox()) == (instances, outbox)


@pytest.mark.anyio
async def test_abort_deletes_the_instance_its_schedules_and_outbox_but_not_dead_letters(
    admin: Admin, store: Store
) -> None:
    before = await admin.show("order", "a2")

    assert await admin.abort("order", "a2") == before

    assert [f"{r.saga}/{r.key}" for r in await store.list_instances(saga="order")] == [
        "order/a1",
        "order/c1",
        "order/n1",
    ]
    assert await store.list_schedules(saga="order", key="a2") == []
    assert await store.list_outbox(saga="order", key="a2") == []
    assert len(await store.list_dead_letters()) == 3
    with pytest.raises(DeadLetterError, match=r"^no instance of saga 'order' has key 'a2'"):
        await admin.abort("order", "a2")


# -- races and logs --------------------------------------------------------------------


@attrs.define(eq=False)
class RacingStore(MemoryStore):
    """Before the next commit that writes or deletes an instance, a "runtime" writes
    `race` (one version further) first."""

    race: InstanceRecord | None = None
    commits: int = 0

    async def commit(self, changes: Changes) -> None:
        race = self.race
        if race is not None and (changes.writes or changes.deletes):
            self.race = None
            self.commits += 1
            await super().commit(
                Changes(
                    writes=[
                        InstanceWrite(attrs.evolve(race, version=race.version + 1), race.version)
                    ]
                )
            )
        await super().commit(changes)


@pytest.mark.anyio
async def test_operations_read_again_after_losing_a_race() -> None:
    store = RacingStore()
    await prepare(store, now=NOW)
    admin = Admin(store, clock=VirtualClock(start=NOW))
    c1 = await record(store, "order", "c1")
    store.race = c1

    await admin.retry((await letter(store, "compensate")).id)

    assert store.commits == 1
    after = await record(store, "order", "c1")
    assert (after.status, after.version) == ("completing", c1.version + 2)

    a1 = await record(store, "order", "a1")
    store.race = a1
    aborted = await admin.abort("order", "a1")
    assert (aborted.record.version, store.commits) == (a1.version + 1, 2)


@attrs.define(eq=False)
class AlwaysRacing(MemoryStore):
    async def commit(self, changes: Changes) -> None:
        if changes.deletes:
            raise ConflictError([(d.saga, d.key) for d in changes.deletes])
        await super().commit(changes)


@pytest.mark.anyio
async def test_an_operation_that_keeps_losing_gives_up_with_the_conflict() -> None:
    store = AlwaysRacing()
    await prepare(store, now=NOW)

    with pytest.raises(ConflictError):
        await Admin(store).abort("order", "a1")

    assert len(await store.list_instances()) == 5


@pytest.mark.anyio
async def test_every_change_is_logged_with_saga_key_and_id(
    admin: Admin, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    compensate, send = await letter(store, "compensate"), await letter(store, "send")
    a2 = await record(store, "order", "a2")

    with caplog.at_level(logging.INFO, logger="sagaflow.admin"):
        await admin.retry(compensate.id)
        await admin.discard(send.id)
        await admin.abort("order", "a2")
        await admin.list_instances()

    logged = [r for r in caplog.records if r.name == "sagaflow.admin"]
    assert [
        (
            r.levelname,
            r.getMessage(),
            r.saga,
            r.key,
            getattr(r, "dead_letter_id", None),
            getattr(r, "instance_id", None),
        )  # type: ignore[attr-defined]
        for r in logged
    ] == [
        (
            "INFO",
            f"retried dead letter {compensate.id} (compensate ops_sagas.Release of order/c1): "
            "back in the outbox; the instance is completing again",
            "order",
            "c1",
            compensate.id,
            None,
        ),
        (
            "INFO",
            f"discarded dead letter {send.id} (send ops_sagas.Notify of shipping/s1): "
            "ConnectionFailed: Notify service down",
            "shipping",
            "s1",
            send.id,
            None,
        ),
        (
            "INFO",
            "aborted instance order/a2 (status active) with 1 schedule(s) and 1 command(s)",
            "order",
            "a2",
            None,
            a2.instance_id,
        ),
    ]
