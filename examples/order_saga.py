"""The order saga from DESIGN.md, run on asyncio and on trio.

Run it: `python examples/order_saga.py` (add `trio` to run on trio only).
"""

from __future__ import annotations

import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs

from sagaflow import (
    CommandFailed,
    Compensate,
    Complete,
    DispatchMeta,
    Registry,
    RetryPolicy,
    Runtime,
    Schedule,
    Send,
    Unschedule,
    correlate,
    on,
)
from sagaflow.stores import SQLiteStore


@attrs.frozen
class OrderPlaced:
    order_id: str
    amount: int


@attrs.frozen
class PaymentCaptured:
    order_id: str


@attrs.frozen
class PaymentTimedOut:
    order_id: str


@attrs.frozen
class ReserveStock:
    order_id: str
    amount: int


@attrs.frozen
class ShipOrder:
    order_id: str


@attrs.frozen
class ReleaseStock:
    order_id: str


@attrs.frozen
class CancelOrder:
    order_id: str


@attrs.define
class Order:
    status: str = "new"
    amount: int = 0


registry = Registry()


@registry.saga(state=Order)
class OrderSaga:
    @correlate
    def order_id(self, event: OrderPlaced | PaymentCaptured | PaymentTimedOut) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, order: Order, event: OrderPlaced) -> list[Any]:
        order.status, order.amount = "placed", event.amount
        return [
            Send(ReserveStock(event.order_id, event.amount)),
            Schedule(
                PaymentTimedOut(event.order_id),
                after=timedelta(seconds=0.2),
                name="payment",
                to_self=True,
            ),
        ]

    @on(PaymentCaptured)
    async def captured(self, order: Order, event: PaymentCaptured) -> list[Any]:
        order.status = "paid"
        return [Unschedule("payment"), Send(ShipOrder(event.order_id)), Complete()]

    @on(PaymentTimedOut)
    def timed_out(self, order: Order, event: PaymentTimedOut) -> list[Any] | None:
        if order.status == "paid":
            return None
        return [Compensate([ReleaseStock(event.order_id), CancelOrder(event.order_id)]), Complete()]

    @on(CommandFailed)
    def failed(self, order: Order, event: CommandFailed[Any]) -> list[Any]:
        return [Compensate([CancelOrder(event.command.order_id)]), Complete()]


async def main(db: Path) -> list[str]:
    sent: list[str] = []

    async def dispatch(command: Any, meta: DispatchMeta) -> None:
        if isinstance(command, ShipOrder) and command.order_id == "o-3":
            raise ConnectionError("shipping is down")
        sent.append(type(command).__name__ + " " + command.order_id)

    policy = RetryPolicy(max_attempts=2, initial_delay=0.01)
    async with Runtime(registry, store=SQLiteStore(db), dispatch=dispatch, retry=policy) as rt:
        await rt.publish(OrderPlaced("o-1", 120))
        await rt.publish(OrderPlaced("o-2", 80))  # never paid: times out
        await rt.publish(OrderPlaced("o-3", 50))  # shipping fails: compensated
        await rt.publish(PaymentCaptured("o-1"))
        await rt.publish(PaymentCaptured("o-3"))
        with anyio.fail_after(10):
            while await rt.store.list_instances():  # wait for the timeout and retries
                await anyio.sleep(0.05)
                await rt.drain()
    return sent


if __name__ == "__main__":
    backends = sys.argv[1:] or ["asyncio", "trio"]
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            sent = anyio.run(main, Path(tmp) / "orders.db", backend=backend)
        print(f"{backend}: {sorted(sent)}")
        assert sorted(sent) == [
            "CancelOrder o-2",
            "CancelOrder o-3",
            "ReleaseStock o-2",
            "ReserveStock o-1",
            "ReserveStock o-2",
            "ReserveStock o-3",
            "ShipOrder o-1",
        ], sent
