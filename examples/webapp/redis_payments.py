"""The payment channel over Redis Streams (extra `sagaflow[redis]`).

- `send` appends each `ChargePayment` to the `payments` stream with sagaflow's
  `RedisStreamDispatcher` (the command's stable id, type name, JSON and trace context
  in the entry: see sagaflow's broker guide for the wire format).
- A simulated payment service, a task here (it could be any service in any language),
  reads `payments` through its consumer group, charges each command id once and appends
  its reply to `payment-replies` (`encode_entry`, with the reply's dedup id).
- `replies()` is a `RedisStreamSource` on `payment-replies`; the shop's run
  acknowledges each reply (`ack`) once its effects are committed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, Self

import anyio
import anyio.to_thread
from payments import (
    ChargePayment,
    PaymentCaptured,
    PaymentDeclined,
    PaymentService,
    Reply,
    reply_id,
)

from sagaflow import Consumed, DispatchMeta, Registry
from sagaflow.redis import RedisStreamDispatcher, RedisStreamSource, encode_entry

wire = Registry()
"""The messages on the payment streams, by stable type names (the wire format)."""
wire.message(ChargePayment, name="ChargePayment")
wire.message(PaymentCaptured, name="PaymentCaptured")
wire.message(PaymentDeclined, name="PaymentDeclined")


class RedisPayments:
    """Charges out and replies back through Redis Streams, with the payment service
    simulated by a task of this channel (`service` keeps its books).

    Args:
        url: The Redis server, e.g. `"redis://localhost:6379/0"`.
        commands: The stream the charges are appended to.
        replies: The stream the payment service appends its replies to.
        group: The shop's consumer group on `replies` (`consumer` is its name in it:
            a restarted shop takes back the replies it had not acknowledged).
        limit: The simulated service charges up to `limit`, declines above.
    """

    def __init__(
        self,
        url: str,
        *,
        commands: str = "payments",
        replies: str = "payment-replies",
        group: str = "shop",
        consumer: str = "shop",
        limit: int = 1000,
    ) -> None:
        self.url = url
        self.commands, self.replies_stream = commands, replies
        self.group, self.consumer = group, consumer
        self.service = PaymentService(limit=limit)
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        import redis

        client = redis.Redis.from_url(self.url, decode_responses=True)
        self._stack.callback(client.close)
        self.client = client
        self._dispatch = RedisStreamDispatcher(client, wire, stream=self.commands)
        self._source = await self._stack.enter_async_context(
            RedisStreamSource(
                client, wire, stream=self.replies_stream, group=self.group, consumer=self.consumer
            )
        )
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(tg.cancel_scope.cancel)
        await anyio.to_thread.run_sync(self._create_service_group)
        tg.start_soon(self._serve)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def send(self, charge: ChargePayment, meta: DispatchMeta) -> None:
        await self._dispatch(charge, meta)

    def replies(self) -> AsyncIterator[Reply]:
        return self._source

    async def ack(self, consumed: list[Consumed]) -> None:
        await self._source.ack(consumed)

    # -- the simulated payment service -------------------------------------------------

    _SERVICE_GROUP = "payment-service"

    def _create_service_group(self) -> None:
        import redis

        try:
            self.client.xgroup_create(self.commands, self._SERVICE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self) -> Any:
        return self.client.xreadgroup(
            self._SERVICE_GROUP, "service", {self.commands: ">"}, count=100, block=200
        )

    async def _serve(self) -> None:
        while True:
            batches = await anyio.to_thread.run_sync(self._read, abandon_on_cancel=True)
            for _, entries in batches or []:
                for entry_id, fields in entries:
                    charge = ChargePayment(**json.loads(fields["data"]))
                    reply = self.service.answer(fields["id"], charge)
                    await anyio.to_thread.run_sync(self._reply, entry_id, reply)

    def _reply(self, entry_id: str, reply: Reply) -> None:
        """Append the reply and acknowledge its command, in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.replies_stream, encode_entry(wire, reply, id=reply_id(reply)))  # type: ignore[arg-type]
        pipe.xack(self.commands, self._SERVICE_GROUP, entry_id)
        pipe.execute()
