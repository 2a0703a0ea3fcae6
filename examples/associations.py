"""Associations and fan-out: a shipment id learned late, and an event for all of a
customer's orders. Runs on a SQLite file, on asyncio and then on trio.

Run it: `python examples/associations.py` (add `trio` to run on trio only).

Each order associates itself with its customer when it starts and with its shipment when
one is created. The carrier's `ShipmentDelivered` names the shipment only, and reaches
the order through that association; `CustomerBlocked` reaches every open order of the
customer (fan-out), each handled and committed on its own.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import attrs

from sagaflow import (
    Admin,
    Associate,
    Complete,
    DispatchMeta,
    Dissociate,
    Registry,
    Runtime,
    Send,
    correlate,
    on,
)
from sagaflow.stores import SQLiteStore


@attrs.frozen
class OrderPlaced:
    order_id: str
    customer_id: str


@attrs.frozen
class ShipmentCreated:
    order_id: str
    shipment_id: str


@attrs.frozen
class ShipmentDelivered:
    shipment_id: str


@attrs.frozen
class CustomerBlocked:
    customer_id: str


@attrs.frozen
class NotifyCustomer:
    order_id: str
    text: str


@attrs.frozen
class CancelOrder:
    order_id: str


@attrs.define
class Order:
    order_id: str = ""
    status: str = "new"
    shipments: list[str] = attrs.Factory(list)


registry = Registry()


@registry.saga(state=Order)
class OrderSaga:
    @correlate(OrderPlaced, ShipmentCreated)
    def order_id(self, event: OrderPlaced | ShipmentCreated) -> str:
        return event.order_id

    @correlate(ShipmentDelivered, via="shipment")
    def shipment(self, event: ShipmentDelivered) -> str:
        return event.shipment_id

    @correlate(CustomerBlocked, via="customer")
    def customer(self, event: CustomerBlocked) -> str:
        return event.customer_id

    @on(OrderPlaced, start=True)
    def placed(self, order: Order, event: OrderPlaced) -> Associate:
        order.order_id, order.status = event.order_id, "placed"
        return Associate("customer", event.customer_id)

    @on(ShipmentCreated)
    def shipped(self, order: Order, event: ShipmentCreated) -> Associate:
        order.status = "shipped"
        order.shipments.append(event.shipment_id)
        return Associate("shipment", event.shipment_id)

    @on(ShipmentDelivered)
    def delivered(
        self, order: Order, event: ShipmentDelivered
    ) -> list[Send[NotifyCustomer] | Dissociate | Complete]:
        order.shipments.remove(event.shipment_id)
        text = f"shipment {event.shipment_id} delivered"
        actions: list[Send[NotifyCustomer] | Dissociate | Complete] = [
            Send(NotifyCustomer(order.order_id, text)),
            Dissociate("shipment", event.shipment_id),
        ]
        if not order.shipments:
            order.status = "delivered"
            actions.append(Complete())
        return actions

    @on(CustomerBlocked)
    def blocked(self, order: Order, event: CustomerBlocked) -> list[Send[CancelOrder] | Complete]:
        order.status = "cancelled"
        return [Send(CancelOrder(order.order_id)), Complete()]


@attrs.define
class Dispatcher:
    sent: list[tuple[str, object]] = attrs.Factory(list)

    async def __call__(self, command: object, meta: DispatchMeta) -> None:
        await anyio.lowlevel.checkpoint()
        self.sent.append((meta.key, command))


async def main(path: Path) -> None:
    dispatcher = Dispatcher()
    orders = [(f"o-{i}", f"c-{i % 3}") for i in range(9)]  # c-0: o-0, o-3, o-6; ...
    async with Runtime(registry, store=SQLiteStore(path), dispatch=dispatcher) as runtime:

        async def history() -> AsyncIterator[object]:
            for order_id, customer_id in orders:
                yield OrderPlaced(order_id, customer_id)
            yield ShipmentCreated("o-1", "s-1a")
            yield ShipmentCreated("o-1", "s-1b")
            yield ShipmentCreated("o-2", "s-2")
            # Right behind the association that routes it, in the same stream.
            yield ShipmentDelivered("s-1a")

        await runtime.run(history())
        shown = await Admin(runtime.store).show("OrderSaga", "o-1")
        pairs = ", ".join(f"{a.name}={a.value}" for a in shown.associations)
        print(f"o-1 is associated with: {pairs}")

        await runtime.publish(ShipmentDelivered("s-1b"))  # o-1's last shipment: it ends
        await runtime.publish(CustomerBlocked("c-0"))  # o-0, o-3 and o-6
        await runtime.publish(ShipmentDelivered("s-404"))  # nobody: reported as unmatched
        await runtime.drain()
        stats = runtime.statistics()
        left = {r.key: r.status for r in await runtime.store.list_instances()}

    for key, command in dispatcher.sent:
        print(f"  {key}: {command}")
    print(f"{stats.events_handled} events handled, {stats.events_unmatched} unmatched")
    cancelled = sorted(c.order_id for _, c in dispatcher.sent if isinstance(c, CancelOrder))
    assert cancelled == ["o-0", "o-3", "o-6"], cancelled
    notified = [c.text for key, c in dispatcher.sent if key == "o-1"]
    assert notified == ["shipment s-1a delivered", "shipment s-1b delivered"], notified
    assert all(key == getattr(c, "order_id", None) for key, c in dispatcher.sent)
    assert stats.events_unmatched == 1
    assert left == {key: "active" for key in ("o-2", "o-4", "o-5", "o-7", "o-8")}, left


if __name__ == "__main__":
    backends = sys.argv[1:] or ["asyncio", "trio"]
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"-- {backend}")
            anyio.run(main, Path(tmp) / "orders.db", backend=backend)
