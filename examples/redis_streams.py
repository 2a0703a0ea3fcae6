"""Orders in and commands out through Redis Streams, with a payment service answering back.

Run it: `python examples/redis_streams.py`, with `SAGAFLOW_REDIS_URL` naming a Redis server
(`source .ci/redis.sh; redis_start` starts a throwaway one). Without it the example says
so and exits (on CI, where `CI` is set, that is an error).

- A shop appends `OrderPlaced` entries to the stream `orders` (the wire format: `type`,
  `data` as JSON, and an `id` the saga deduplicates on).
- The runtime reads `orders` and `payments.replies` through the consumer group `sagas`
  (each entry acknowledged only once its event is committed) and runs `OrderSaga` on
  SQLite; its commands go to `payments` and `shipping` (`RedisStreamDispatcher`, one
  stream per command type, each entry with the stable command id).
- A payment service (a task here; it could be written in any language) reads
  `payments`, skips command ids it has seen, and appends `PaymentCaptured` replies to
  `payments.replies`.

At the end every order is shipped once, and nothing is left pending in the group.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import anyio
import attrs

from sagaflow import Complete, Registry, Runtime, Send, correlate, on
from sagaflow.stores import SQLiteStore

ORDERS = 50


@attrs.frozen
class OrderPlaced:
    order_id: str
    amount: int


@attrs.frozen
class PaymentCaptured:
    order_id: str


@attrs.frozen
class CapturePayment:
    order_id: str
    amount: int


@attrs.frozen
class ShipOrder:
    order_id: str


@attrs.define
class Order:
    status: str = "new"


registry = Registry()
# Stable type names: what other services write in an entry's `type` field.
for cls in (OrderPlaced, PaymentCaptured, CapturePayment, ShipOrder):
    registry.message(cls, name=cls.__name__)


@registry.saga(state=Order)
class OrderSaga:
    @correlate
    def order_id(self, event: OrderPlaced | PaymentCaptured) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, order: Order, event: OrderPlaced) -> Send[CapturePayment]:
        order.status = "paying"
        return Send(CapturePayment(event.order_id, event.amount))

    @on(PaymentCaptured)
    def captured(self, order: Order, event: PaymentCaptured) -> list[Any]:
        order.status = "paid"
        return [Send(ShipOrder(event.order_id)), Complete()]


async def payment_service(client: Any, prefix: str) -> None:
    """Another service: captures payments and replies, deduplicating by command id."""
    seen: set[str] = set()
    last = "0"

    def read(after: str) -> Any:
        return client.xread({f"{prefix}payments": after}, count=100, block=200)

    while True:
        for _, entries in await anyio.to_thread.run_sync(read, last) or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields["id"] in seen:
                    continue  # a command delivered again: at least once
                seen.add(fields["id"])
                command = json.loads(fields["data"])  # {"order_id": ..., "amount": ...}
                reply = {
                    "type": "PaymentCaptured",
                    "data": json.dumps({"order_id": command["order_id"]}),
                    "id": f"captured:{fields['id']}",
                }
                client.xadd(f"{prefix}payments.replies", reply)


async def main(url: str) -> None:
    import redis

    from sagaflow.redis import RedisStreamDispatcher, RedisStreamSource, encode_entry

    prefix = f"example-{uuid.uuid4().hex[:8]}:"  # so that runs do not share streams
    client = redis.Redis.from_url(url, decode_responses=True)
    dispatch = RedisStreamDispatcher(
        client,
        registry,
        stream={CapturePayment: f"{prefix}payments", ShipOrder: f"{prefix}shipping"},
    )
    try:
        for i in range(ORDERS):  # the shop
            event = OrderPlaced(f"o-{i}", 10 * i)
            client.xadd(f"{prefix}orders", encode_entry(registry, event, id=f"placed:o-{i}"))
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteStore(Path(tmp) / "sagas.db")
            async with (
                Runtime(registry, store=store, dispatch=dispatch) as runtime,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(payment_service, client, prefix)
                for stream in ("orders", "payments.replies"):
                    source = RedisStreamSource(
                        client, registry, stream=f"{prefix}{stream}", group="sagas"
                    )
                    tg.start_soon(consume, runtime, source)
                with anyio.fail_after(60):
                    while client.xlen(f"{prefix}shipping") < ORDERS or await store.list_instances():
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        shipped = [json.loads(f["data"]) for _, f in client.xrange(f"{prefix}shipping")]
        assert sorted(s["order_id"] for s in shipped) == sorted(f"o-{i}" for i in range(ORDERS))
        for stream in ("orders", "payments.replies"):
            assert client.xpending(f"{prefix}{stream}", "sagas")["pending"] == 0
        print(f"{ORDERS} orders paid and shipped through Redis Streams")
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


async def consume(runtime: Runtime, source: Any) -> None:
    """Feed one stream to the runtime, acknowledging each entry after its commit."""
    async with source:
        await runtime.run(source, id=source.event_id, trace=source.trace, ack=source.ack)


if __name__ == "__main__":
    redis_url = os.environ.get("SAGAFLOW_REDIS_URL")
    if not redis_url:
        on_ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
        print("set SAGAFLOW_REDIS_URL to run this example (e.g. redis://localhost:6379/0)")
        sys.exit(1 if on_ci else 0)
    anyio.run(main, redis_url)
