"""Deploys meet stored data: versions, upcasters, strict decoding, held instances, renamed
and removed sagas, moved classes, on SQLite and PostgreSQL, asyncio and trio.

Each test runs the "old code" (a registry) on a store until it has an instance with a
command in flight (its dispatcher is down) and a timer pending, stops, then starts the
"new code" on the same store and checks what became of the data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st
from json_meaning import JsonText

from sagaflow import (
    Admin,
    DispatchMeta,
    Registry,
    RetryPolicy,
    Runtime,
    Schedule,
    Send,
    correlate,
    on,
    upcast,
)
from sagaflow.exceptions import DecodeError, RegistrationError
from sagaflow.stores import ScheduleRecord, SQLiteStore, Store
from sagaflow.testing import VirtualClock, advance, load_message, load_state

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0
SAGA = "orders"


# -- messages -------------------------------------------------------------------


@attrs.frozen
class Placed:
    key: str


@attrs.frozen
class Remind:
    key: str


@attrs.frozen
class Ship:
    key: str
    n: int


@attrs.frozen
class OldShip:
    """A command class as the old code had it (moved to `NewShip` by the new code)."""

    key: str
    n: int


@attrs.frozen
class NewShip:
    key: str
    n: int


@attrs.frozen
class ShipV2:
    """`Ship` at version 2: a field added without a default."""

    key: str
    n: int
    priority: str


# -- states, one per version of the code -----------------------------------------


@attrs.define
class V1:
    count: int = 0
    note: str = ""


@attrs.define
class Added:
    count: int = 0
    note: str = ""
    extra: str = "default"


@attrs.define
class Logged:
    """`note` removed and `log` added: needs an upcaster."""

    count: int = 0
    log: list[str] = attrs.Factory(list)


@attrs.define
class Renamed:
    total: int = 0
    note: str = ""


@attrs.define
class Retyped:
    count: str = ""
    note: str = ""


@attrs.define
class Inner:
    count: int = 0


@attrs.define
class Nested:
    inner: Inner = attrs.Factory(Inner)
    note: str = ""


@attrs.define
class Inner2:
    total: int = 0


@attrs.define
class Nested2:
    inner: Inner2 = attrs.Factory(Inner2)
    note: str = ""


# -- sagas ----------------------------------------------------------------------


class Base:
    """Sends one command and sets a timer per `Placed`; records what it saw."""

    command: type = Ship

    @correlate
    def key(self, event: Placed | Remind) -> str:
        return event.key

    @on(Placed, start=True)
    def placed(self, state: Any, event: Placed) -> list[object]:
        n = self.seen(state, "placed")
        return [
            Send(self.command(event.key, n)),
            Schedule(Remind(event.key), after=60, name="remind", to_self=True),
        ]

    @on(Remind)
    def remind(self, state: Any, event: Remind) -> None:
        self.seen(state, "remind")

    def seen(self, state: Any, what: str) -> int:
        state.count += 1
        state.note = what
        return int(state.count)


class SagaV1(Base):
    pass


class OldShipSaga(Base):
    command = OldShip


class NewShipSaga(Base):
    command = NewShip


class LoggedNoUpcaster(Base):
    def seen(self, state: Any, what: str) -> int:
        state.count += 1
        state.log.append(what)
        return int(state.count)


class LoggedSaga(LoggedNoUpcaster):
    @upcast(1)
    @staticmethod
    def note_to_log(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        data["log"] = [data.pop("note")]
        return data


class RenamedSaga(Base):
    @upcast(1)
    @staticmethod
    def count_to_total(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        data["total"] = data.pop("count")
        return data

    def seen(self, state: Any, what: str) -> int:
        state.total += 1
        state.note = what
        return int(state.total)


class RetypedSaga(Base):
    @upcast(1)
    def count_to_text(self, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "count": str(data["count"])}

    def seen(self, state: Any, what: str) -> int:
        state.count = str(int(state.count) + 1)
        state.note = what
        return int(state.count)


class NestedSaga(Base):
    def seen(self, state: Any, what: str) -> int:
        state.inner.count += 1
        state.note = what
        return int(state.inner.count)


class Nested2NoUpcaster(Base):
    def seen(self, state: Any, what: str) -> int:
        state.inner.total += 1
        state.note = what
        return int(state.inner.total)


class Nested2Saga(Nested2NoUpcaster):
    @upcast(1)
    @staticmethod
    def inner_total(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "inner": {"total": data["inner"]["count"]}}


def registry_of(
    saga: object, state: type, *, name: str = SAGA, version: int = 1, **options: Any
) -> Registry:
    registry = Registry()
    registry.register(saga, state=state, name=name, version=version, **options)
    return registry


# -- stores and the two deploys ----------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """A factory of store objects that all open the same database."""
    if request.param == "sqlite":
        path = tmp_path / "evolution.db"
        yield lambda: SQLiteStore(path)
        return
    from sagaflow.stores import PostgresStore

    dsn = request.getfixturevalue("postgres_dsn")
    schema = request.getfixturevalue("pg_schema")
    yield lambda: PostgresStore(dsn, schema=schema, max_size=4)


@attrs.define
class Dispatcher:
    up: bool = True
    sent: list[tuple[object, str, str]] = attrs.Factory(list)

    async def __call__(self, command: object, meta: DispatchMeta) -> None:
        if not self.up:
            raise ConnectionError("downstream is down")
        self.sent.append((command, meta.saga, meta.key))


# Long backoff: a command that failed once waits, in flight, across the deploy.
RETRY = RetryPolicy(max_attempts=50, initial_delay=1000, max_delay=1000, jitter=False)


async def run_old_code(store: Store, registry: Registry, *keys: str) -> None:
    """One `Placed` per key with the dispatcher down: each instance keeps a command in
    the outbox (waiting for a retry) and a timer due in 60 s."""
    clock = VirtualClock(start=T0)
    with anyio.fail_after(30):
        async with Runtime(
            registry, store=store, dispatch=Dispatcher(up=False), clock=clock, retry=RETRY
        ) as runtime:
            for key in keys:
                await runtime.publish(Placed(key))
            await runtime.drain()


@attrs.define
class NewCode:
    runtime: Runtime
    clock: VirtualClock
    dispatcher: Dispatcher

    async def after(self, seconds: float) -> None:
        await advance(self.runtime, self.clock, seconds)


@asynccontextmanager
async def new_code(store: Store, registry: Registry) -> AsyncIterator[NewCode]:
    clock = VirtualClock(start=T0 + 10)
    dispatcher = Dispatcher()
    with anyio.fail_after(60):
        async with Runtime(
            registry, store=store, dispatch=dispatcher, clock=clock, retry=RETRY
        ) as runtime:
            yield NewCode(runtime, clock, dispatcher)


async def stored_state(store: Store, key: str, saga: str = SAGA) -> tuple[int, Any]:
    await store.open()
    try:
        (record,) = [r for r in await store.list_instances(saga=saga) if r.key == key]
    finally:
        await store.close()
    return record.state_version, json.loads(record.state)


# -- registration ------------------------------------------------------------------


def test_a_gap_in_a_sagas_upcaster_chain_is_a_registration_error() -> None:
    with pytest.raises(RegistrationError) as caught:
        registry_of(RenamedSaga(), Renamed, version=3)

    assert str(caught.value) == (
        "saga 'orders' is at version 3 but has no upcaster for version(s) [2]: stored rows "
        "of those versions could not be read; add @upcast(n) functions (for a message "
        "type: upcasters={n: fn})"
    )


def test_upcasters_that_do_not_fit_the_version_are_registration_errors() -> None:
    with pytest.raises(RegistrationError) as caught:
        registry_of(RenamedSaga(), Renamed)

    assert "upcasters for version(s) [1] do not fit version 1" in str(caught.value)


def test_a_saga_version_must_be_a_positive_int() -> None:
    with pytest.raises(RegistrationError) as caught:
        registry_of(SagaV1(), V1, version=0)

    assert str(caught.value) == "saga 'orders': version must be an int >= 1, got 0"


def test_upcast_takes_a_positive_version() -> None:
    with pytest.raises(TypeError, match="@upcast takes the version it reads"):
        upcast(0)


def test_aliases_must_not_clash_with_names() -> None:
    registry = registry_of(SagaV1(), V1, aliases=("OrderSaga",))

    with pytest.raises(RegistrationError, match="alias 'OrderSaga' is already an alias"):
        registry.register(SagaV1(), state=V1, name="other", aliases=("OrderSaga",))
    with pytest.raises(RegistrationError, match="the name is an alias of saga 'orders'"):
        registry.register(SagaV1(), state=V1, name="OrderSaga")
    assert registry.aliases == {"OrderSaga": "orders"}


def test_a_gap_in_a_message_upcaster_chain_is_a_registration_error() -> None:
    registry = Registry()

    with pytest.raises(RegistrationError) as caught:
        registry.message(ShipV2, version=3, upcasters={1: dict})

    assert "has no upcaster for version(s) [2]" in str(caught.value)


def test_message_names_cannot_hold_an_at_sign() -> None:
    with pytest.raises(RegistrationError, match="without '@'"):
        Registry().message(Ship, name="shop.Ship@2")


# -- strict decoding and the testing helpers -------------------------------------


@pytest.mark.parametrize(
    ("stored", "field", "reason"),
    [
        ({"count": 1, "note": "x", "gone": 2}, "gone", "unknown field(s) 'gone'"),
        ([], None, "the stored JSON is an array, not an object"),
        ('"abc"', None, "the stored JSON is a str ('abc'), not an object"),
        ({}, None, "the stored JSON is an empty object, but the class has fields"),
        ({"count": "1", "note": "x"}, "count", "expected int"),
    ],
)
def test_a_state_that_does_not_fit_is_an_error_naming_saga_key_version_and_field(
    stored: Any, field: str | None, reason: str
) -> None:
    registry = registry_of(SagaV1(), V1)

    with pytest.raises(DecodeError) as caught:
        load_state(registry, SAGA, stored, version=1)

    error = caught.value
    assert (error.saga, error.key, error.version, error.field) == (SAGA, "<test>", 1, field)
    assert reason in str(error)
    assert "(stored at version 1); the row is kept" in str(error)


def test_a_renamed_nested_field_is_an_error_naming_its_path() -> None:
    registry = registry_of(Nested2NoUpcaster(), Nested2)

    with pytest.raises(DecodeError) as caught:
        load_state(registry, SAGA, {"inner": {"count": 1}, "note": ""}, version=1)

    assert caught.value.field == "inner.count"


def test_a_field_added_with_a_default_needs_no_upcaster() -> None:
    registry = registry_of(SagaV1(), Added)

    assert load_state(registry, SAGA, {"count": 1, "note": "x"}, version=1) == Added(1, "x")


def test_upcasters_run_in_order_before_decoding() -> None:
    registry = registry_of(RenamedSaga(), Renamed, version=2)

    assert load_state(registry, SAGA, {"count": 4, "note": "x"}, version=1) == Renamed(4, "x")
    assert load_state(registry, SAGA, {"total": 4, "note": "x"}, version=2) == Renamed(4, "x")


def test_a_state_newer_than_the_code_is_an_error() -> None:
    registry = registry_of(SagaV1(), V1)

    with pytest.raises(DecodeError, match="written at version 2, newer than this code's"):
        load_state(registry, SAGA, {"count": 1, "note": ""}, version=2)


def test_an_upcaster_that_fails_is_a_decode_error_naming_the_step() -> None:
    registry = registry_of(RenamedSaga(), Renamed, version=2)

    with pytest.raises(DecodeError) as caught:
        load_state(registry, SAGA, {"note": "no count"}, version=1)

    assert "the upcaster from version 1 to 2 raised KeyError: 'count'" in str(caught.value)


def test_messages_are_stored_with_their_version_and_upcast_when_read() -> None:
    registry = registry_of(SagaV1(), V1)
    registry.message(
        ShipV2,
        name="shop.Ship",
        version=2,
        aliases=["test_evolution.Ship"],
        upcasters={1: lambda d: {**d, "priority": "normal"}},
    )

    assert registry.serializer.encode(ShipV2("a", 1, "high")) == (
        "shop.Ship@2",
        JsonText('{"key": "a", "n": 1, "priority": "high"}'),
    )
    assert load_message(registry, "test_evolution.Ship", {"key": "a", "n": 1}) == ShipV2(
        "a", 1, "normal"
    )
    assert load_message(registry, "shop.Ship@2", {"key": "a", "n": 1, "priority": "x"}) == (
        ShipV2("a", 1, "x")
    )
    with pytest.raises(DecodeError, match="written at version 3"):
        load_message(registry, "shop.Ship@3", {"key": "a", "n": 1, "priority": "x"})


def test_a_name_resolves_only_to_classes_whose_own_module_is_allowed() -> None:
    """`test_evolution.Registry` is sagaflow's class seen through this module."""
    registry = registry_of(SagaV1(), V1)

    with pytest.raises(LookupError, match="not on sagaflow's allow-list"):
        registry.serializer.resolve("test_evolution.DispatchMeta")


# -- deploys on real stores --------------------------------------------------------


async def test_a_field_added_with_a_default_keeps_everything_in_flight(
    make_store: Callable[[], Store],
) -> None:
    await run_old_code(make_store(), registry_of(SagaV1(), V1), "a")

    async with new_code(make_store(), registry_of(SagaV1(), Added)) as new:
        await new.after(2000)
        await new.runtime.publish(Placed("a"))
        await new.runtime.drain()

    assert new.dispatcher.sent == [(Ship("a", 1), SAGA, "a"), (Ship("a", 3), SAGA, "a")]
    assert await stored_state(make_store(), "a") == (
        1,
        {"count": 3, "note": "placed", "extra": "default"},
    )


async def test_a_renamed_field_with_an_upcaster_keeps_its_value_and_is_rewritten(
    make_store: Callable[[], Store],
) -> None:
    await run_old_code(make_store(), registry_of(SagaV1(), V1), "a", "b")

    async with new_code(make_store(), registry_of(RenamedSaga(), Renamed, version=2)) as new:
        await new.after(2000)

    assert sorted(new.dispatcher.sent, key=repr) == [
        (Ship("a", 1), SAGA, "a"),
        (Ship("b", 1), SAGA, "b"),
    ]
    assert await stored_state(make_store(), "a") == (2, {"total": 2, "note": "remind"})


async def test_a_changed_type_with_an_upcaster(make_store: Callable[[], Store]) -> None:
    await run_old_code(make_store(), registry_of(SagaV1(), V1), "a")

    async with new_code(make_store(), registry_of(RetypedSaga(), Retyped, version=2)) as new:
        await new.after(2000)

    assert await stored_state(make_store(), "a") == (2, {"count": "2", "note": "remind"})


async def test_a_nested_rename_holds_the_instance_until_an_upcaster_heals_it(
    make_store: Callable[[], Store], caplog: pytest.LogCaptureFixture
) -> None:
    await run_old_code(make_store(), registry_of(NestedSaga(), Nested), "a")

    async with new_code(make_store(), registry_of(Nested2NoUpcaster(), Nested2)) as new:
        await new.after(2000)
        letters = await Admin(new.runtime.store).list_dead_letters()

    (letter,) = letters
    assert (letter.kind, letter.name, letter.type_name) == (
        "event",
        "remind",
        "test_evolution.Remind",
    )
    assert "instance is held" in letter.error
    assert "at field 'inner.count'" in letter.error
    assert await stored_state(make_store(), "a") == (1, {"inner": {"count": 1}, "note": "placed"})
    # Commands do not need the state: the one in flight went out.
    assert new.dispatcher.sent == [(Ship("a", 1), SAGA, "a")]

    async with new_code(make_store(), registry_of(Nested2Saga(), Nested2, version=2)) as fixed:
        retried = await Admin(fixed.runtime.store).retry_instance(SAGA, "a", runtime=fixed.runtime)
        await fixed.after(0)

    assert [r.id for r in retried] == [letter.id]
    assert await stored_state(make_store(), "a") == (2, {"inner": {"total": 2}, "note": "remind"})


async def test_a_removed_field_holds_the_instance_and_nothing_is_overwritten(
    make_store: Callable[[], Store],
) -> None:
    """Events and the due timer of an instance the code cannot read wait as dead
    letters with the true reason; once an upcaster is deployed they resume in order."""
    await run_old_code(make_store(), registry_of(SagaV1(), V1), "a")

    async with new_code(make_store(), registry_of(LoggedNoUpcaster(), Logged)) as new:
        await new.after(2000)  # the timer falls due
        await new.runtime.publish(Placed("a"))
        await new.runtime.drain()
        letters = await Admin(new.runtime.store).list_dead_letters()

    assert [(d.kind, d.type_name, d.name) for d in letters] == [
        ("event", "test_evolution.Remind", "remind"),
        ("event", "test_evolution.Placed", None),
    ]
    for letter in letters:
        assert "unknown field(s) 'note'" in letter.error
        assert "saga 'orders' key 'a'" in letter.error
    assert await stored_state(make_store(), "a") == (1, {"count": 1, "note": "placed"})

    async with new_code(make_store(), registry_of(LoggedSaga(), Logged, version=2)) as fixed:
        await Admin(fixed.runtime.store).retry_instance(SAGA, "a", runtime=fixed.runtime)
        await fixed.after(0)
        left = await Admin(fixed.runtime.store).list_dead_letters()

    assert left == []
    assert await stored_state(make_store(), "a") == (
        2,
        {"count": 3, "log": ["placed", "remind", "placed"]},
    )
    assert fixed.dispatcher.sent == [(Ship("a", 3), SAGA, "a")]


async def test_a_moved_command_class_resolves_through_its_alias(
    make_store: Callable[[], Store],
) -> None:
    await run_old_code(make_store(), registry_of(OldShipSaga(), V1), "a")
    registry = registry_of(NewShipSaga(), V1)
    registry.message(NewShip, aliases=["test_evolution.OldShip"])

    async with new_code(make_store(), registry) as new:
        await new.after(2000)
        await new.runtime.publish(Placed("a"))
        await new.runtime.drain()

    assert new.dispatcher.sent == [(NewShip("a", 1), SAGA, "a"), (NewShip("a", 3), SAGA, "a")]


async def test_a_message_version_bump_upcasts_commands_in_flight(
    make_store: Callable[[], Store],
) -> None:
    await run_old_code(make_store(), registry_of(SagaV1(), V1), "a")
    registry = registry_of(SagaV1(), V1)
    registry.message(
        ShipV2,
        aliases=["test_evolution.Ship"],
        version=2,
        upcasters={1: lambda d: {**d, "priority": "normal"}},
    )

    async with new_code(make_store(), registry) as new:
        await new.after(2000)

    assert new.dispatcher.sent == [(ShipV2("a", 1, "normal"), SAGA, "a")]


async def test_a_renamed_saga_takes_over_its_instances_commands_and_timers(
    make_store: Callable[[], Store], caplog: pytest.LogCaptureFixture
) -> None:
    await run_old_code(make_store(), registry_of(SagaV1(), V1, name="OrderSaga"), "a")
    caplog.set_level(logging.INFO, "sagaflow")

    async with new_code(make_store(), registry_of(SagaV1(), V1, aliases=["OrderSaga"])) as new:
        await new.after(2000)
        await new.runtime.publish(Placed("a"))
        await new.runtime.drain()
        stats = new.runtime.statistics()
        store = new.runtime.store
        sagas = {r.saga for r in await store.list_instances()}

    assert new.dispatcher.sent == [(Ship("a", 1), SAGA, "a"), (Ship("a", 3), SAGA, "a")]
    assert (sagas, stats.orphan_sagas) == ({SAGA}, 0)
    assert "saga 'orders' took over 1 instance(s) stored under its old name 'OrderSaga'" in (
        caplog.text
    )


async def test_thousands_of_due_timers_of_a_removed_saga_never_block_the_others(
    make_store: Callable[[], Store], caplog: pytest.LogCaptureFixture
) -> None:
    from sagaflow.stores import Changes

    await run_old_code(make_store(), registry_of(SagaV1(), V1), "a")
    store = make_store()
    await store.open()
    orphans = [
        ScheduleRecord(
            f"o{i}", "removed", f"k{i}", "t", T0 + 1, False, "test_evolution.Ship", "{}", i
        )
        for i in range(3000)
    ]
    await store.commit(Changes(schedule_puts=orphans))
    await store.close()

    async with new_code(make_store(), registry_of(SagaV1(), V1)) as new:
        await new.after(2000)
        stats = new.runtime.statistics()
        left = len(await new.runtime.store.list_schedules(saga="removed"))

    assert new.dispatcher.sent == [(Ship("a", 1), SAGA, "a")]
    assert await stored_state(make_store(), "a") == (1, {"count": 2, "note": "remind"})
    assert (stats.orphan_sagas, left) == (1, 3000)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "'removed'" in r.message
    ]
    assert len(warnings) == 1
    assert "which is not registered: they are kept" in warnings[0].message


# -- property: any stored version, upcast, equals writing at the current version -----

Schema = dict[str, Any]  # {"amount": name, "label": name, "scale": int, "extras": {...}}

ops = st.one_of(
    st.tuples(st.just("rename"), st.sampled_from(["amount", "label"])),
    st.tuples(st.just("scale"), st.integers(2, 5)),
    st.tuples(st.just("add"), st.text("xyz", min_size=1, max_size=3)),
    st.tuples(st.just("drop"), st.none()),
)


def evolve(schema: Schema, op: tuple[str, Any], version: int) -> Schema:
    kind, arg = op
    schema = {**schema, "extras": dict(schema["extras"])}
    if kind == "rename":
        schema[arg] = f"{arg}_{version}"
    elif kind == "scale":
        schema["scale"] *= arg
    elif kind == "add":
        schema["extras"][f"extra_{version}"] = arg
    elif schema["extras"]:
        del schema["extras"][min(schema["extras"])]
    return schema


def stored_as(schema: Schema, amount: int, label: str) -> dict[str, Any]:
    """What the code at this schema writes for the logical value `(amount, label)`."""
    return {
        schema["amount"]: amount * schema["scale"],
        schema["label"]: label,
        **schema["extras"],
    }


def upcaster(old: Schema, new: Schema) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def step(data: dict[str, Any]) -> dict[str, Any]:
        amount = data[old["amount"]] // old["scale"]
        return stored_as(new, amount, data[old["label"]]) | {
            name: data.get(name, default) for name, default in new["extras"].items()
        }

    return step


@given(
    chain=st.lists(ops, max_size=6),
    amount=st.integers(-1000, 1000),
    label=st.text(),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
def test_any_stored_version_upcast_equals_writing_at_the_current_version(
    chain: list[tuple[str, Any]], amount: int, label: str, data: st.DataObject
) -> None:
    schemas: list[Schema] = [{"amount": "amount", "label": "label", "scale": 1, "extras": {}}]
    for version, op in enumerate(chain, start=2):
        schemas.append(evolve(schemas[-1], op, version))
    current = schemas[-1]
    state = attrs.make_class(
        "State",
        {
            current["amount"]: attrs.field(type=int, default=0),
            current["label"]: attrs.field(type=str, default=""),
            **{n: attrs.field(type=str, default=d) for n, d in current["extras"].items()},
        },
    )
    upcasters = {v: upcaster(schemas[v - 1], schemas[v]) for v in range(1, len(schemas))}
    serializer = Registry().serializer
    stored = data.draw(st.integers(1, len(schemas)), label="stored version")

    def load(version: int) -> Any:
        text = json.dumps(stored_as(schemas[version - 1], amount, label))
        return serializer.loads(
            text, state, "State", version=version, current=len(schemas), upcasters=upcasters
        )

    assert load(stored) == load(len(schemas))
    assert attrs.asdict(load(stored)) == stored_as(current, amount, label)


@pytest.mark.parametrize("message_first", [False, True])
def test_a_handled_event_type_can_get_a_stable_name_and_a_version(message_first: bool) -> None:
    """Before or after its saga: rows stored under the default name stay readable."""
    registry = Registry()

    def message() -> None:
        registry.message(Placed, name="Placed", version=2, upcasters={1: dict})

    if message_first:
        message()
    registry.register(SagaV1(), state=V1, name=SAGA)
    if not message_first:
        message()

    assert registry.serializer.encode(Placed("a")) == ("Placed@2", JsonText('{"key": "a"}'))
    assert load_message(registry, "test_evolution.Placed", {"key": "a"}) == Placed("a")
    assert load_message(registry, "Placed", {"key": "a"}) == Placed("a")
