"""The payment service as the shop sees it: charges go out, replies come back.

`PaymentChannel` is the seam. The shop sends `ChargePayment` commands through
`channel.send` (from its dispatcher, with the command's stable id) and feeds whatever
`channel.replies()` yields to `runtime.run`. `SimulatedPayments` is a payment service
simulated in this process, so the example runs with nothing to install. With a broker,
`send` appends the command to a stream that the real payment service reads, and
`replies` reads the stream its replies go to: `redis_payments.RedisPayments` does so
through Redis Streams (see the README).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Protocol, Self

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sagaflow import Consumed, DispatchMeta


@attrs.frozen
class ChargePayment:
    """A command to the payment service: charge `amount` for `order_id`."""

    order_id: str
    amount: int


@attrs.frozen
class PaymentCaptured:
    """The payment service charged the order; `charge_id` is the command's id."""

    order_id: str
    charge_id: str
    payment_id: str


@attrs.frozen
class PaymentDeclined:
    """The payment service refused the charge."""

    order_id: str
    charge_id: str
    reason: str


Reply = PaymentCaptured | PaymentDeclined


def reply_id(reply: Reply) -> str:
    """The dedup id of a reply: one reply per charge, however often it is delivered."""
    return f"payment:{reply.charge_id}"


class PaymentChannel(Protocol):
    """How the shop talks to the payment service.

    The shop enters it (`async with channel:`) before its runtime starts and leaves it
    after the runtime stopped, so commands recovered at start and drained at stop can
    still be sent.
    """

    async def __aenter__(self) -> Self:
        """Connect (the simulated service starts working here)."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Disconnect."""
        ...

    async def send(self, charge: ChargePayment, meta: DispatchMeta) -> None:
        """Hand a charge to the payment service (at least once, with `meta.id`)."""
        ...

    def replies(self) -> AsyncIterator[Reply]:
        """The payment service's replies, to feed to `runtime.run`."""
        ...

    async def ack(self, consumed: list[Consumed]) -> None:
        """Acknowledge replies whose effects are committed (`runtime.run(ack=...)`)."""
        ...


class PaymentService:
    """The simulated payment service's books: it charges up to `limit`, declines above.

    Each command id is charged once, so a redelivered command gets the same reply
    again and no second charge.
    """

    def __init__(self, *, limit: int = 1000) -> None:
        self.limit = limit
        self.charged: dict[str, Reply] = {}
        """Every charge worked on, by command id."""

    def answer(self, charge_id: str, charge: ChargePayment) -> Reply:
        """The reply to the command `charge_id`: charged now, or the earlier reply."""
        reply = self.charged.get(charge_id)
        if reply is None:
            reply = self._charge(charge_id, charge)
            self.charged[charge_id] = reply
        return reply

    def _charge(self, charge_id: str, charge: ChargePayment) -> Reply:
        if charge.amount > self.limit:
            return PaymentDeclined(
                charge.order_id, charge_id, f"amount {charge.amount} is over the limit"
            )
        return PaymentCaptured(charge.order_id, charge_id, f"pay-{len(self.charged) + 1}")


class SimulatedPayments(PaymentService):
    """A payment service in this process (see `PaymentService`).

    Charges arrive through `send` and are worked on by a task of its own, as by a
    separate service; replies come back through a memory stream, so there is nothing
    to acknowledge.
    """

    def __init__(self, *, limit: int = 1000) -> None:
        super().__init__(limit=limit)
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        requests, incoming = anyio.create_memory_object_stream[tuple[str, ChargePayment]](math.inf)
        answers, replies = anyio.create_memory_object_stream[Reply](math.inf)
        for stream in (requests, incoming, answers, replies):
            self._stack.enter_context(stream)
        self._requests, self._replies = requests, replies
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(tg.cancel_scope.cancel)
        tg.start_soon(self._serve, incoming, answers)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def send(self, charge: ChargePayment, meta: DispatchMeta) -> None:
        await self._requests.send((meta.id, charge))

    def replies(self) -> AsyncIterator[Reply]:
        return self._replies

    async def ack(self, consumed: list[Consumed]) -> None:
        pass  # a memory stream keeps nothing to acknowledge

    async def _serve(
        self,
        incoming: MemoryObjectReceiveStream[tuple[str, ChargePayment]],
        answers: MemoryObjectSendStream[Reply],
    ) -> None:
        async for charge_id, charge in incoming:
            await answers.send(self.answer(charge_id, charge))
