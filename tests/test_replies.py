"""Replies: a dispatcher may publish a service's reply into the runtime it serves.

The how-to "Handling replies" promises that `runtime.publish(...)` from inside the
dispatcher does not deadlock, however small the mailboxes and however few the
dispatcher workers: shard workers hand commands to the outbox without waiting for it,
so a dispatcher blocked on a full mailbox is always freed by a shard that keeps going.
These tests hold it to that with one-item mailboxes, one dispatcher worker and many
instances at once, on every store and both event loops; `fail_after` only turns a
deadlock into a failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401

from sagaflow import Complete, DispatchMeta, Registry, Runtime, Send, Unmatched, correlate, on
from sagaflow.exceptions import RegistrationError
from sagaflow.stores import MemoryStore, PostgresStore, SQLiteStore, Store
from sagaflow.testing import Scenario, SyncScenario

ORDERS = 60
DEADLOCK = 60  # seconds: a safety net only; the work takes well under a second alone


@attrs.frozen
class PaymentRequested:
    order_id: str


@attrs.frozen
class Charge:
    order_id: str


@attrs.frozen
class Charged:
    order_id: str
    command_id: str


@attrs.define
class Payment:
    status: str = "new"
    charge: str = ""


registry = Registry()


@registry.saga(state=Payment)
class PaymentSaga:
    @correlate
    def order_id(self, event: PaymentRequested | Charged) -> str:
        return event.order_id

    @on(PaymentRequested, start=True)
    def requested(self, payment: Payment, event: PaymentRequested) -> Send[Charge]:
        payment.status = "charging"
        return Send(Charge(event.order_id))

    @on(Charged)
    def charged(self, payment: Payment, event: Charged) -> Complete:
        payment.status, payment.charge = "charged", event.command_id
        return Complete()


@attrs.define
class Replying:
    """A dispatcher whose service answers at once: it publishes the reply itself."""

    runtime: Runtime | None = None
    calls: list[tuple[str, int]] = attrs.Factory(list)

    async def __call__(self, command: Charge, meta: DispatchMeta) -> None:
        assert self.runtime is not None
        self.calls.append((command.order_id, meta.attempt))
        await self.runtime.publish(Charged(command.order_id, meta.id), id=f"reply:{meta.id}")


TIGHT = {"shards": 1, "queue_size": 1, "max_batch": 1, "dispatch_concurrency": 1}
WIDER = {"shards": 2, "queue_size": 2, "max_batch": 8, "dispatch_concurrency": 4}


def _sqlite(tmp_path: Path) -> Store:
    return SQLiteStore(tmp_path / "replies.db")


STORES: dict[str, Callable[[Path], Store]] = {"memory": lambda _: MemoryStore(), "sqlite": _sqlite}


@asynccontextmanager
async def replying(store: Store, **options: Any) -> AsyncIterator[tuple[Runtime, Replying]]:
    dispatch = Replying()
    async with Runtime(registry, store=store, dispatch=dispatch, **options) as runtime:
        dispatch.runtime = runtime
        yield runtime, dispatch


def _expected_calls() -> list[tuple[str, int]]:
    return sorted((f"o{i}", 1) for i in range(ORDERS))


async def _publish_all(runtime: Runtime) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(ORDERS):
            tg.start_soon(runtime.publish, PaymentRequested(f"o{i}"))


@pytest.mark.anyio
@pytest.mark.parametrize("options", [TIGHT, WIDER], ids=["tight", "wider"])
@pytest.mark.parametrize("store_name", sorted(STORES))
async def test_publish_from_the_dispatcher_does_not_deadlock_under_backpressure(
    store_name: str, options: dict[str, int], tmp_path: Path
) -> None:
    """Many instances at once fill one-item mailboxes while the dispatcher publishes."""
    store = STORES[store_name](tmp_path)
    with anyio.fail_after(DEADLOCK):
        async with replying(store, **options) as (runtime, dispatch):
            await _publish_all(runtime)
            await runtime.drain()
            stats = runtime.statistics()
            remaining = await store.list_instances()
    assert sorted(dispatch.calls) == _expected_calls()
    assert (stats.events_handled, stats.commands_dispatched, stats.commands_failed) == (
        2 * ORDERS,
        ORDERS,
        0,
    )
    assert (stats.events_unmatched, stats.events_dead_lettered) == (0, 0)
    assert remaining == []


@pytest.mark.anyio
async def test_publish_from_the_dispatcher_while_run_feeds_a_stream() -> None:
    """`run(source)` keeps feeding the mailbox the dispatcher's replies also go to."""
    send, receive = anyio.create_memory_object_stream[PaymentRequested](0)

    async def feed() -> None:
        async with send:
            for i in range(ORDERS):
                await send.send(PaymentRequested(f"o{i}"))

    with anyio.fail_after(DEADLOCK):
        async with replying(MemoryStore(), **TIGHT) as (runtime, dispatch):
            async with receive, anyio.create_task_group() as tg:
                tg.start_soon(feed)
                assert await runtime.run(receive) == ORDERS
            await runtime.drain()
            stats = runtime.statistics()
    assert sorted(dispatch.calls) == _expected_calls()
    assert (stats.events_handled, stats.commands_dispatched) == (2 * ORDERS, ORDERS)


@pytest.mark.anyio
async def test_leaving_the_context_waits_for_replies_published_by_the_dispatcher(
    tmp_path: Path,
) -> None:
    """The drain on leaving the context counts a dispatch, and so the reply it publishes."""
    with anyio.fail_after(DEADLOCK):
        async with replying(SQLiteStore(tmp_path / "replies.db"), **TIGHT) as (runtime, _):
            await _publish_all(runtime)
        stats = runtime.statistics()
        store = SQLiteStore(tmp_path / "replies.db")
        await store.open()
        try:
            remaining = await store.list_instances()
            outbox = await store.list_outbox()
        finally:
            await store.close()
    assert (stats.events_handled, stats.commands_dispatched) == (2 * ORDERS, ORDERS)
    assert (remaining, outbox) == ([], [])


@pytest.mark.anyio
@pytest.mark.postgres
async def test_publish_from_the_dispatcher_does_not_deadlock_in_cluster_mode(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """Through the shared inbox too, with a small connection pool."""
    store = PostgresStore(postgres_dsn, schema=pg_schema, max_size=2, poll_interval=0.1)
    with anyio.fail_after(DEADLOCK):
        async with replying(store, cluster=True, **TIGHT) as (runtime, dispatch):
            await _publish_all(runtime)
            await runtime.drain()
            stats = runtime.statistics()
            remaining = await store.list_instances()
    assert sorted(dispatch.calls) == _expected_calls()
    assert (stats.commands_dispatched, stats.commands_failed, remaining) == (ORDERS, 0, [])


# -- replies correlated by command id --------------------------------------------------


@attrs.frozen
class ChargeReply:
    """A reply that names no order: only the id of the command it answers."""

    command_id: str
    charge_id: str


@attrs.frozen(order=True)
class Receipt:
    order_id: str
    charge_id: str


@attrs.define
class ByIdSaga:
    """Charges an order and completes when the reply to its `Charge` comes back."""

    @correlate(PaymentRequested)
    def order_id(self, event: PaymentRequested) -> str:
        return event.order_id

    @correlate(ChargeReply, reply=True)
    def answers(self, event: ChargeReply) -> str:
        return event.command_id

    @on(PaymentRequested, start=True)
    def requested(self, payment: Payment, event: PaymentRequested) -> Send[Charge]:
        payment.status = event.order_id  # the key, to show which instance a reply reached
        return Send(Charge(event.order_id))

    @on(ChargeReply)
    def charged(self, payment: Payment, event: ChargeReply) -> list[Any]:
        payment.charge = event.charge_id
        return [Send(Receipt(payment.status, event.charge_id)), Complete()]


def by_id_registry(*names: str) -> Registry:
    registry = Registry()
    for name in names or ("ById",):
        registry.register(ByIdSaga(), state=Payment, name=name)
    return registry


@attrs.define
class Answering:
    """A service that answers a `Charge` with the command id alone."""

    runtime: Runtime | None = None
    calls: list[tuple[Any, DispatchMeta]] = attrs.Factory(list)

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        self.calls.append((command, meta))
        if isinstance(command, Charge):
            assert self.runtime is not None
            reply = ChargeReply(meta.id, f"ch-{command.order_id}")
            await self.runtime.publish(reply, id=f"reply:{meta.id}")

    def receipts(self) -> list[Receipt]:
        return sorted(c for c, _ in self.calls if isinstance(c, Receipt))


KEYS = ["o1", "o:2", "ö/3 x", "o%4", ""]
MODES = [
    "memory",
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("cluster", marks=pytest.mark.postgres),
]


@pytest.fixture
def reply_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Store]:
    def make(mode: str) -> Store:
        if mode == "memory":
            return MemoryStore()
        if mode == "sqlite":
            return SQLiteStore(tmp_path / "replies.db")
        dsn = request.getfixturevalue("postgres_dsn")
        return PostgresStore(dsn, schema=request.getfixturevalue("pg_schema"), poll_interval=0.05)

    return make


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_a_reply_finds_its_instance_by_the_command_id_alone(
    mode: str, reply_store: Callable[[str], Store]
) -> None:
    """Keys with any characters: the id encodes saga and key, percent-encoded."""
    dispatch = Answering()
    store = reply_store(mode)
    with anyio.fail_after(DEADLOCK):
        async with Runtime(
            by_id_registry(), store=store, dispatch=dispatch, cluster=mode == "cluster"
        ) as runtime:
            dispatch.runtime = runtime
            for key in KEYS:
                await runtime.publish(PaymentRequested(key))
            await runtime.drain()
            left = await store.list_instances()
            stats = runtime.statistics()

    assert dispatch.receipts() == sorted(Receipt(k, f"ch-{k}") for k in KEYS)
    ids = {m.key: m.id for c, m in dispatch.calls if isinstance(c, Charge)}
    assert {k: i.partition(":")[2] for k, i in ids.items()} == {
        "o1": "ById:o1",
        "o:2": "ById:o%3A2",
        "ö/3 x": "ById:%C3%B6%2F3%20x",
        "o%4": "ById:o%254",
        "": "ById:",
    }
    assert (left, stats.events_unmatched) == ([], 0)


@pytest.mark.anyio
async def test_sagas_that_do_not_correlate_replies_keep_plain_command_ids() -> None:
    """`{instance id}.{version}.{n}`: nothing added for sagas without reply correlation."""
    metas: list[DispatchMeta] = []

    async def record(command: Any, meta: DispatchMeta) -> None:
        metas.append(meta)

    async with Runtime(registry, store=MemoryStore(), dispatch=record) as runtime:
        await runtime.publish(PaymentRequested("o1"))
        await runtime.drain()

    (meta,) = metas
    instance_id, version, n = meta.id.split(".")
    assert (len(instance_id), version, n, meta.key) == (32, "1", "0", "o1")


@pytest.mark.anyio
async def test_a_reply_with_an_unknown_command_id_is_reported() -> None:
    unmatched: list[Unmatched] = []
    registry = by_id_registry()
    async with Runtime(
        registry, store=MemoryStore(), dispatch=Answering(), on_unmatched=unmatched.append
    ) as runtime:
        await runtime.publish(ChargeReply("not-an-id", "ch"))
        await runtime.publish(ChargeReply("abc.1.0:Other:o1", "ch"))
        stats = runtime.statistics()

    reason = (
        "its command id {} names no instance of saga(s) 'ById', which correlate "
        "ChargeReply as a reply: it must be the `meta.id` a command of one of them was "
        "dispatched with"
    )
    assert unmatched == [
        Unmatched(ChargeReply("not-an-id", "ch"), "ById", None, reason.format("'not-an-id'")),
        Unmatched(
            ChargeReply("abc.1.0:Other:o1", "ch"),
            "ById",
            None,
            reason.format("'abc.1.0:Other:o1'"),
        ),
    ]
    assert stats.events_unmatched == 2


@pytest.mark.anyio
async def test_two_sagas_correlating_one_reply_type_each_take_their_own() -> None:
    dispatch = Answering()
    async with Runtime(by_id_registry("A", "B"), store=MemoryStore(), dispatch=dispatch) as runtime:
        dispatch.runtime = runtime
        await runtime.publish(PaymentRequested("o1"))  # reaches both sagas
        await runtime.drain()
        left = await runtime.store.list_instances()
        stats = runtime.statistics()

    receipts = [(m.saga, c) for c, m in dispatch.calls if isinstance(c, Receipt)]
    assert sorted(receipts) == [("A", Receipt("o1", "ch-o1")), ("B", Receipt("o1", "ch-o1"))]
    assert (left, stats.events_handled, stats.events_unmatched) == ([], 4, 0)


@pytest.mark.anyio
async def test_a_reply_after_the_instance_ended_is_reported_as_late() -> None:
    unmatched: list[Unmatched] = []
    dispatch = Answering()
    async with Runtime(
        by_id_registry(), store=MemoryStore(), dispatch=dispatch, on_unmatched=unmatched.append
    ) as runtime:
        dispatch.runtime = runtime
        await runtime.publish(PaymentRequested("o1"))
        await runtime.drain()
        (charge_id,) = [m.id for c, m in dispatch.calls if isinstance(c, Charge)]
        await runtime.publish(ChargeReply(charge_id, "ch-again"))

    assert unmatched == [
        Unmatched(
            ChargeReply(charge_id, "ch-again"),
            "ById",
            "o1",
            "the instance has completed",
            "completed",
        )
    ]


@pytest.mark.anyio
async def test_a_renamed_saga_takes_replies_to_commands_sent_under_its_old_name() -> None:
    store = MemoryStore()
    sent: list[DispatchMeta] = []

    async def unanswered(command: Any, meta: DispatchMeta) -> None:
        sent.append(meta)

    async with Runtime(by_id_registry(), store=store, dispatch=unanswered) as runtime:
        await runtime.publish(PaymentRequested("o1"))
        await runtime.drain()
    (old_id,) = [m.id for m in sent]
    second = Answering()
    registry = Registry()
    registry.register(ByIdSaga(), state=Payment, name="Renamed", aliases=("ById",))
    async with Runtime(registry, store=store, dispatch=second) as runtime:
        await runtime.publish(ChargeReply(old_id, "ch-late"))
        await runtime.drain()
        left = await store.list_instances()

    assert old_id.endswith(":ById:o1")
    assert [(c, m.saga) for c, m in second.calls] == [(Receipt("o1", "ch-late"), "Renamed")]
    assert left == []


def test_reply_correlation_is_checked_at_registration() -> None:
    with pytest.raises(TypeError, match=r"@correlate\(reply=True\) needs the reply event types"):
        correlate(reply=True)
    with pytest.raises(TypeError, match=r"needs the reply event types"):
        correlate(lambda self, e: e, reply=True)  # type: ignore[call-overload]

    class Starting:
        @correlate(ChargeReply, reply=True)
        def answers(self, event: ChargeReply) -> str:
            return event.command_id

        @on(ChargeReply, start=True)
        def start(self, payment: Payment, event: ChargeReply) -> None: ...

    with pytest.raises(RegistrationError) as caught:
        Registry().register(Starting(), state=Payment)

    assert str(caught.value) == (
        "saga 'Starting': handler start is start=True, but ChargeReply is correlated as a "
        "reply (reply=True): a reply answers a command of an instance that exists already; "
        "start it with an event that carries its key"
    )


@pytest.mark.anyio
async def test_a_scenario_replies_through_command_id() -> None:
    async with Scenario(ByIdSaga, state=Payment) as scenario:
        await scenario.given(PaymentRequested("o1"))
        charge = scenario.command_id(Charge)
        await scenario.when(ChargeReply(charge, "ch-1"))
        scenario.expect_sent(Receipt("o1", "ch-1"))
        scenario.expect_completed()
        assert charge.endswith(":ByIdSaga:o1")
        with pytest.raises(AssertionError, match="no dispatched command matches <function"):
            scenario.command_id(lambda c: False)


def test_a_sync_scenario_replies_through_command_id() -> None:
    with SyncScenario(ByIdSaga, state=Payment) as scenario:
        scenario.given(PaymentRequested("o1"))
        scenario.when(ChargeReply(scenario.command_id(Charge), "ch-1"))
        assert scenario.sent == [Receipt("o1", "ch-1")]
