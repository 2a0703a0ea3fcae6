"""`mypy --strict typing_tests` proves that user code written against sagaflow type-checks.

Nothing here runs; the `assert_type` calls are checked by mypy only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, assert_type

import attrs

from sagaflow import (
    Admin,
    CommandFailed,
    Compensate,
    Complete,
    DispatchMeta,
    Registry,
    RetryPolicy,
    Runtime,
    SagaState,
    Schedule,
    Send,
    StatePage,
    Statistics,
    Unschedule,
    correlate,
    on,
)
from sagaflow.stores import MemoryStore, RowCounts, SQLiteStore, Store
from sagaflow.testing import Scenario, SyncScenario, VirtualClock
from sagaflow.typing import Action


@attrs.frozen
class OrderPlaced:
    order_id: str
    amount: int


@attrs.frozen
class PaymentTimedOut:
    order_id: str


@attrs.frozen
class ReserveStock:
    order_id: str
    amount: int


@attrs.define
class Order:
    status: str = "new"


registry = Registry()


@registry.saga(state=Order)
class OrderSaga:
    @correlate
    def order_id(self, event: OrderPlaced | PaymentTimedOut) -> str | None:
        return event.order_id

    @correlate(OrderPlaced)
    def unused(self, event: OrderPlaced) -> str:
        return event.order_id

    @on(OrderPlaced, start=True, retry=RetryPolicy(max_attempts=2))
    def placed(self, order: Order, event: OrderPlaced) -> list[Send[ReserveStock] | Schedule[Any]]:
        return [
            Send(ReserveStock(event.order_id, event.amount)),
            Schedule(PaymentTimedOut(event.order_id), after=timedelta(minutes=1), to_self=True),
        ]

    @on(PaymentTimedOut, internal=True)
    async def timed_out(self, order: Order, event: PaymentTimedOut) -> list[Action]:
        return [Unschedule("payment"), Compensate([ReserveStock(event.order_id, 0)]), Complete()]

    @on(CommandFailed)
    def failed(self, order: Order, event: CommandFailed[ReserveStock]) -> None:
        assert_type(event.command, ReserveStock)
        assert_type(event.error, str)
        assert_type(event.attempts, int)


# The decorators hand back the very function (or class) they mark.
placed: Callable[[OrderSaga, Order, OrderPlaced], list[Send[ReserveStock] | Schedule[Any]]] = (
    OrderSaga.placed
)
unused: Callable[[OrderSaga, OrderPlaced], str] = OrderSaga.unused
assert_type(OrderSaga().order_id(PaymentTimedOut("o")), str | None)
assert_type(registry.register(OrderSaga(), state=Order, name="other"), OrderSaga)
assert_type(Send(ReserveStock("o", 1)), Send[ReserveStock])
assert_type(Schedule(PaymentTimedOut("o"), after=5).after, float)


async def dispatch(command: object, meta: DispatchMeta) -> None:
    assert_type(meta.id, str)
    assert_type(meta.attempt, int)
    assert_type(meta.trace, Mapping[str, str] | None)


async def accepted(command: object, meta: DispatchMeta) -> bool:
    return meta.attempt < 3  # False is a failed attempt


async def run() -> None:
    store: Store = SQLiteStore("sagas.db")
    Runtime(registry, store=store, dispatch=accepted)
    async with Runtime(registry, store=store, dispatch=dispatch, clock=VirtualClock()) as rt:
        assert_type(rt, Runtime)
        await rt.publish(OrderPlaced("o-1", 5), id="e-1")
        assert_type(rt.statistics(), Statistics)
        await rt.drain()
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.when(OrderPlaced("o-2", 5))
        assert_type(scenario.state, Order | None)
    with SyncScenario(OrderSaga, state=Order) as sync:
        sync.when(OrderPlaced("o-3", 5))
    MemoryStore()


async def read(store: Store) -> None:
    admin = Admin(store, registry=registry)
    found = await admin.state("OrderSaga", "o-1", Order)
    assert_type(found, SagaState[Order])
    assert_type(found.state, Order)
    assert_type(await admin.state("OrderSaga", "o-1"), SagaState[Any])
    page = await admin.states("OrderSaga", Order, after=None, limit=10)
    assert_type(page, StatePage[Order])
    assert_type(page.items, tuple[SagaState[Order], ...])
    assert_type(page.next, str | None)
    assert_type(await admin.count_rows(), RowCounts)
