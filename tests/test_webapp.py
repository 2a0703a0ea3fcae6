"""The web shop example (examples/webapp): its HTTP API, driven with httpx in process.

The app runs with its lifespan (the runtime, the simulated payment service and the
feed of its replies) on a SQLite file of the test's own, on asyncio and trio.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from _redis_server import redis_url, stream_name  # noqa: F401

from sagaflow.stores import SQLiteStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "webapp"))
import shop

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = shop.create_app(store=SQLiteStore(tmp_path / "shop.db"))
    with anyio.fail_after(30):
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://shop"
            ) as client,
        ):
            yield client


async def place(client: httpx.AsyncClient, key: str | None, body: Any) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return await client.post("/orders", json=body, headers=headers)


async def order_when(
    client: httpx.AsyncClient, order_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The order once `done(order)` holds: the payment service answers in its own time."""
    while True:
        response = await client.get(f"/orders/{order_id}")
        order: dict[str, Any] = response.json()
        if done(order):
            return order
        await client._transport.app.state.runtime.drain()  # type: ignore[attr-defined]
        await anyio.sleep(0.01)


def app_state(client: httpx.AsyncClient) -> Any:
    return client._transport.app.state  # type: ignore[attr-defined]


async def test_an_order_is_placed_charged_and_shipped(client: httpx.AsyncClient) -> None:
    placed = await place(client, "req-1", {"amount": 120, "customer": "ada"})

    order_id = shop.order_id_for("req-1")
    assert (placed.status_code, placed.headers["location"]) == (202, f"/orders/{order_id}")
    assert placed.json() == {
        "order_id": order_id,
        "saga_status": "active",
        "status": "awaiting payment",
        "amount": 120,
        "customer": "ada",
        "payment_id": None,
        "problem": None,
    }
    paid = await order_when(client, order_id, lambda o: o["status"] != "awaiting payment")
    assert paid == {**placed.json(), "status": "paid", "payment_id": "pay-1"}
    await app_state(client).runtime.drain()
    assert app_state(client).shipped == [order_id]


async def test_a_retried_post_is_applied_once(client: httpx.AsyncClient) -> None:
    """Same Idempotency-Key: the same order, one charge, one shipment."""
    body = {"amount": 50, "customer": "bob"}
    first = await place(client, "retry-me", body)
    order_id = first.json()["order_id"]
    await order_when(client, order_id, lambda o: o["status"] == "paid")

    again = [await place(client, "retry-me", body) for _ in range(3)]
    await app_state(client).runtime.drain()

    assert [r.status_code for r in again] == [202, 202, 202]
    assert {r.json()["order_id"] for r in again} == {order_id}
    assert [r.json()["status"] for r in again] == ["paid"] * 3
    assert len(app_state(client).payments.charged) == 1
    assert app_state(client).shipped == [order_id]


async def test_a_key_reused_for_another_order_is_refused(client: httpx.AsyncClient) -> None:
    await place(client, "k", {"amount": 50, "customer": "bob"})

    reused = await place(client, "k", {"amount": 51, "customer": "bob"})

    assert (reused.status_code, reused.json()) == (
        409,
        {"error": "Idempotency-Key 'k' was used for another order"},
    )


async def test_a_declined_payment_shows_on_the_order(client: httpx.AsyncClient) -> None:
    placed = await place(client, "big", {"amount": 5000, "customer": "cy"})

    order = await order_when(
        client, placed.json()["order_id"], lambda o: o["status"] != "awaiting payment"
    )

    assert (order["status"], order["problem"]) == ("declined", "amount 5000 is over the limit")
    assert app_state(client).shipped == []


@pytest.mark.parametrize(
    ("key", "body", "status", "message"),
    [
        (None, {"amount": 1, "customer": "x"}, 400, "send an Idempotency-Key header"),
        ("k", [1], 422, "send a JSON object like"),
        ("k", {"amount": 1}, 422, "send a JSON object like"),
        ("k", {"amount": "1", "customer": "x"}, 422, "amount must be a positive integer"),
        ("k", {"amount": 0, "customer": "x"}, 422, "amount must be a positive integer"),
    ],
)
async def test_bad_requests_get_a_clear_error_and_change_nothing(
    client: httpx.AsyncClient, key: str | None, body: Any, status: int, message: str
) -> None:
    response = await place(client, key, body)
    listing = await client.get("/orders")

    assert response.status_code == status
    assert response.json()["error"].startswith(message)
    assert listing.json() == {"orders": [], "next": None}


async def test_an_unknown_order_is_not_found(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders/o-nope")

    assert (response.status_code, response.json()) == (404, {"error": "no such order"})


async def test_orders_are_listed_a_page_at_a_time(client: httpx.AsyncClient) -> None:
    ids = sorted(
        [
            (await place(client, f"p{i}", {"amount": 10 + i, "customer": "d"})).json()["order_id"]
            for i in range(5)
        ]
    )

    pages = []
    after: str | None = None
    while True:
        params = {"limit": "2"} if after is None else {"limit": "2", "after": after}
        page = (await client.get("/orders", params=params)).json()
        pages.append([o["order_id"] for o in page["orders"]])
        after = page["next"]
        if after is None:
            break
    bad = await client.get("/orders", params={"limit": "0"})

    assert pages == [ids[0:2], ids[2:4], ids[4:]]
    assert (bad.status_code, bad.json()) == (422, {"error": "limit must be between 1 and 100"})


@pytest.mark.redis
async def test_payment_replies_travel_back_through_redis(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    stream_name: str,  # noqa: F811
) -> None:
    """With `RedisPayments`, the charge goes out on a stream and the reply comes back on
    another, read through the shop's consumer group and acknowledged after commit."""
    redis_payments = pytest.importorskip("redis_payments")
    commands, replies = f"{stream_name}:payments", f"{stream_name}:payment-replies"
    channel = redis_payments.RedisPayments(redis_url, commands=commands, replies=replies)
    app = shop.create_app(store=SQLiteStore(tmp_path / "shop.db"), payments=channel)
    with anyio.fail_after(30):
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c,
        ):
            order_id = (await place(c, "r-1", {"amount": 120, "customer": "ada"})).json()[
                "order_id"
            ]
            declined = (await place(c, "r-2", {"amount": 5000, "customer": "bo"})).json()
            paid = await order_when(c, order_id, lambda o: o["status"] != "awaiting payment")
            refused = await order_when(
                c, declined["order_id"], lambda o: o["status"] != "awaiting payment"
            )
            while channel.client.xpending(replies, "shop")["pending"]:
                await anyio.sleep(0.01)  # acknowledged once committed, just after
            sent = [f for _, f in channel.client.xrange(commands)]
            answered = [f for _, f in channel.client.xrange(replies)]

    assert (paid["status"], paid["payment_id"]) == ("paid", "pay-1")
    assert (refused["status"], refused["problem"]) == ("declined", "amount 5000 is over the limit")
    assert [(f["type"], json.loads(f["data"])) for f in sent] == [
        ("ChargePayment", {"order_id": order_id, "amount": 120}),
        ("ChargePayment", {"order_id": declined["order_id"], "amount": 5000}),
    ]
    charge_ids = [f["id"] for f in sent]
    assert sorted((f["type"], f["id"]) for f in answered) == sorted(
        [
            ("PaymentCaptured", f"payment:{charge_ids[0]}"),
            ("PaymentDeclined", f"payment:{charge_ids[1]}"),
        ]
    )
    assert app.state.shipped == [order_id]


def test_the_app_uses_redis_when_shop_redis_url_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    redis_payments = pytest.importorskip("redis_payments")
    monkeypatch.delenv("SHOP_REDIS_URL", raising=False)
    assert type(shop.default_payments()) is shop.SimulatedPayments

    monkeypatch.setenv("SHOP_REDIS_URL", "redis://example:6379/3")
    channel = shop.default_payments()

    assert type(channel) is redis_payments.RedisPayments
    assert channel.url == "redis://example:6379/3"
