"""A web shop: a Starlette app that hosts a sagaflow runtime in its lifespan.

- `POST /orders` with an `Idempotency-Key` header and `{"amount": 120, "customer":
  "ada"}` places an order: a retried request (same key) is applied once.
- `GET /orders/{order_id}` shows the order saga's state, decoded as its `Order` class.
- `GET /orders?limit=20&after=...` lists orders, a page at a time.

The order saga charges the payment service (`payments.py`) and ships once the payment
is captured; the payment service's replies are fed back into the runtime. Run it with
`uvicorn shop:app` from this folder (see README.md).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import attrs
from payments import (
    ChargePayment,
    PaymentCaptured,
    PaymentChannel,
    PaymentDeclined,
    SimulatedPayments,
    reply_id,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sagaflow import (
    Admin,
    DispatchMeta,
    Hooks,
    Registry,
    Runtime,
    SagaState,
    Schedule,
    Send,
    Unschedule,
    correlate,
    on,
)
from sagaflow.stores import SQLiteStore, Store
from sagaflow.typing import Clock

# -- the order saga --------------------------------------------------------------------


@attrs.frozen
class OrderPlaced:
    order_id: str
    amount: int
    customer: str


@attrs.frozen
class PaymentTimedOut:
    order_id: str


@attrs.frozen
class ShipOrder:
    order_id: str


@attrs.define
class Order:
    status: str = "new"
    amount: int = 0
    customer: str = ""
    payment_id: str | None = None
    problem: str | None = None


registry = Registry()


@registry.saga(state=Order, name="OrderSaga")
class OrderSaga:
    """Charges the order, ships it once paid; a declined or late payment ends it.

    It does not `Complete()`: the instance, and so its state, stays for the shop to
    show (a saga that completes is deleted once its commands are out).
    """

    @correlate
    def order_id(
        self, event: OrderPlaced | PaymentCaptured | PaymentDeclined | PaymentTimedOut
    ) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, order: Order, event: OrderPlaced) -> list[Any]:
        order.status, order.amount, order.customer = (
            "awaiting payment",
            event.amount,
            event.customer,
        )
        return [
            Send(ChargePayment(event.order_id, event.amount)),
            Schedule(
                PaymentTimedOut(event.order_id),
                after=timedelta(minutes=5),
                name="payment",
                to_self=True,
            ),
        ]

    @on(PaymentCaptured)
    def captured(self, order: Order, event: PaymentCaptured) -> list[Any]:
        if order.status != "awaiting payment":
            return []
        order.status, order.payment_id = "paid", event.payment_id
        return [Unschedule("payment"), Send(ShipOrder(event.order_id))]

    @on(PaymentDeclined)
    def declined(self, order: Order, event: PaymentDeclined) -> Unschedule | None:
        if order.status != "awaiting payment":
            return None
        order.status, order.problem = "declined", event.reason
        return Unschedule("payment")

    @on(PaymentTimedOut)
    def timed_out(self, order: Order, event: PaymentTimedOut) -> None:
        if order.status == "awaiting payment":
            order.status, order.problem = "payment timed out", "no answer from payments"


# -- the web app -------------------------------------------------------------------------

_ORDER_IDS = uuid.UUID("5a6f3b1e-7c1d-4b8e-9a51-2f0c6d3e8b47")


def order_id_for(idempotency_key: str) -> str:
    """The order a request creates: the same for every retry of it."""
    return f"o-{uuid.uuid5(_ORDER_IDS, idempotency_key).hex[:16]}"


def order_json(found: SagaState[Order]) -> dict[str, Any]:
    return {"order_id": found.key, "saga_status": found.status, **attrs.asdict(found.state)}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def place_order(request: Request) -> JSONResponse:
    key = request.headers.get("idempotency-key", "").strip()
    if not key:
        return error(400, "send an Idempotency-Key header: a retried request then applies once")
    try:
        body = await request.json()
        amount, customer = body["amount"], body["customer"]
    except (ValueError, TypeError, KeyError):
        return error(422, 'send a JSON object like {"amount": 120, "customer": "ada"}')
    if type(amount) is not int or amount <= 0 or not isinstance(customer, str):
        return error(422, "amount must be a positive integer and customer a string")
    runtime: Runtime = request.app.state.runtime
    order_id = order_id_for(key)
    # Returns once the order is stored: a retry with the same key is applied once.
    await runtime.publish(OrderPlaced(order_id, amount, customer), id=f"order:{key}")
    found = await request.app.state.admin.state("OrderSaga", order_id, Order)
    if (found.state.amount, found.state.customer) != (amount, customer):
        return error(409, f"Idempotency-Key {key!r} was used for another order")
    headers = {"Location": f"/orders/{order_id}"}
    return JSONResponse(order_json(found), status_code=202, headers=headers)


async def show_order(request: Request) -> JSONResponse:
    admin: Admin = request.app.state.admin
    try:
        found = await admin.state("OrderSaga", request.path_params["order_id"], Order)
    except LookupError:
        return error(404, "no such order")
    return JSONResponse(order_json(found))


async def list_orders(request: Request) -> JSONResponse:
    admin: Admin = request.app.state.admin
    try:
        limit = int(request.query_params.get("limit", "20"))
    except ValueError:
        return error(422, "limit must be an integer")
    if not 1 <= limit <= 100:
        return error(422, "limit must be between 1 and 100")
    after = request.query_params.get("after")
    page = await admin.states("OrderSaga", Order, after=after, limit=limit)
    return JSONResponse({"orders": [order_json(o) for o in page.items], "next": page.next})


def default_payments() -> PaymentChannel:
    """`RedisPayments` on `$SHOP_REDIS_URL` if it is set, else `SimulatedPayments`."""
    url = os.environ.get("SHOP_REDIS_URL")
    if not url:
        return SimulatedPayments()
    from redis_payments import RedisPayments

    return RedisPayments(url)


def create_app(
    *,
    store: Store | None = None,
    payments: PaymentChannel | None = None,
    hooks: Hooks | None = None,
    clock: Clock | None = None,
) -> Starlette:
    """The shop: a runtime on `store` (SQLite `$SHOP_DB`, default `shop.db`) that
    talks to `payments` (by default through Redis Streams if `$SHOP_REDIS_URL` is set,
    else simulated in this process)."""
    channel = default_payments() if payments is None else payments
    shipped: list[str] = []

    async def dispatch(command: object, meta: DispatchMeta) -> None:
        if isinstance(command, ChargePayment):
            await channel.send(command, meta)
        elif isinstance(command, ShipOrder):
            shipped.append(command.order_id)  # stands in for the warehouse

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = Runtime(
            registry,
            store=store or SQLiteStore(os.environ.get("SHOP_DB", "shop.db")),
            dispatch=dispatch,
            hooks=hooks,
            clock=clock,
        )
        async with channel, runtime, anyio.create_task_group() as tg:
            app.state.runtime = runtime
            app.state.admin = Admin(runtime.store, registry=registry)
            # The payment service's replies, applied once each (by reply id), each
            # acknowledged to the channel once its effects are committed.
            tg.start_soon(lambda: runtime.run(channel.replies(), id=reply_id, ack=channel.ack))
            yield
            tg.cancel_scope.cancel()

    app = Starlette(
        routes=[
            Route("/orders", place_order, methods=["POST"]),
            Route("/orders", list_orders, methods=["GET"]),
            Route("/orders/{order_id}", show_order, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.payments = channel
    app.state.shipped = shipped
    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app)
