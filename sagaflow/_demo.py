"""The demo behind `python -m sagaflow demo`: the order saga against simulated services.

Thousands of orders run through the saga on a SQLite file: most are paid and shipped,
some payments are declined (compensated), some never answered (timed out), and a few
cancellations fail for good (dead letters). Stop it (Ctrl-C or `--stop-after`) and run
it again: it resumes from the file.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs

from ._actions import CommandFailed, Compensate, Complete, Schedule, Send, Unschedule
from ._decorators import correlate, on
from ._records import DispatchMeta
from ._registry import Registry
from ._retry import RetryPolicy
from ._runtime import Runtime
from .stores._protocol import ACTIVE, COMPLETING, Store

__all__ = ["DemoResult", "registry", "run_demo"]


@attrs.frozen
class OrderPlaced:
    order_id: str
    amount: int


@attrs.frozen
class StockReserved:
    order_id: str


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
class CapturePayment:
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
    reason: str


@attrs.define
class Order:
    status: str = "new"
    amount: int = 0


PAYMENT_TIMEOUT = 1.0

registry = Registry()


@registry.saga(state=Order, name="order")
class OrderSaga:
    """The order saga of DESIGN.md, with a payment step and a short payment timeout."""

    @correlate
    def order_id(self, event: OrderPlaced | StockReserved | PaymentCaptured) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, order: Order, event: OrderPlaced) -> list[Any]:
        order.status, order.amount = "placed", event.amount
        return [
            Send(ReserveStock(event.order_id, event.amount)),
            Schedule(
                PaymentTimedOut(event.order_id),
                after=PAYMENT_TIMEOUT,
                name="payment",
                to_self=True,
            ),
        ]

    @on(StockReserved)
    def reserved(self, order: Order, event: StockReserved) -> Send[CapturePayment]:
        order.status = "reserved"
        return Send(CapturePayment(event.order_id, order.amount))

    @on(PaymentCaptured)
    async def captured(self, order: Order, event: PaymentCaptured) -> list[Any]:
        order.status = "paid"
        return [Unschedule("payment"), Send(ShipOrder(event.order_id)), Complete()]

    @on(PaymentTimedOut, internal=True)
    def timed_out(self, order: Order, event: PaymentTimedOut) -> list[Any] | None:
        if order.status == "paid":
            return None
        order.status = "timed out"
        return [
            Compensate([ReleaseStock(event.order_id), CancelOrder(event.order_id, "timeout")]),
            Complete(),
        ]

    @on(CommandFailed)
    def failed(self, order: Order, event: CommandFailed[Any]) -> list[Any] | None:
        command = event.command
        if isinstance(command, CapturePayment):
            if order.status == "timed out":
                return None  # the timeout compensated the order while the capture retried
            order.status = "declined"
            return [
                Unschedule("payment"),
                Compensate(
                    [ReleaseStock(command.order_id), CancelOrder(command.order_id, "declined")]
                ),
                Complete(),
            ]
        return None  # a failed compensation: the instance waits for an operator


class PaymentDeclined(Exception):
    """The simulated payment service refuses this order."""


def _number(order_id: str) -> int:
    return int(order_id[1:])


@attrs.define(eq=False)
class Services:
    """Simulated downstream services: each command may answer with an event."""

    replies: Any
    outcomes: dict[str, str]
    seen: set[str] = attrs.field(factory=set)

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        n = _number(command.order_id)
        if isinstance(command, ReserveStock):
            self.replies.send_nowait(StockReserved(command.order_id))
        elif isinstance(command, CapturePayment):
            if n % 10 == 3:
                raise PaymentDeclined(f"card of order {command.order_id} declined")
            if n % 10 != 7:  # n % 10 == 7: the payment service never answers
                self.replies.send_nowait(PaymentCaptured(command.order_id))
        elif isinstance(command, ShipOrder):
            self.outcomes[command.order_id] = "completed"
        elif isinstance(command, CancelOrder):
            if n % 100 == 23:
                raise ConnectionError(f"order service unreachable for {command.order_id}")
            self.outcomes[command.order_id] = (
                "timed out" if command.reason == "timeout" else "compensated"
            )


@attrs.frozen
class DemoResult:
    """What one demo run saw."""

    orders: int
    completed: int
    compensated: int
    timed_out: int
    dead_letters: int
    in_flight: int
    resumed_instances: int
    events_handled: int
    seconds: float
    finished: bool


def _default_store(db: str | None) -> Store:
    if db == ":memory:":
        from .stores import MemoryStore

        return MemoryStore()
    from .stores import SQLiteStore

    return SQLiteStore(db or "sagaflow-demo.db")


def _load_outcomes(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {str(k): str(v) for k, v in data.items()}


async def run_demo(
    *,
    orders: int = 2000,
    db: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    out: Any = None,
) -> DemoResult:
    """Run the demo and return its summary.

    Args:
        orders: How many orders to place (ids `o0` .. `o{orders-1}`).
        db: The SQLite file (default `sagaflow-demo.db`), or `":memory:"`.
        stop_after: Place only the first `stop_after` orders, handle what is due now,
            and stop, leaving the orders in flight in the file for the next run.
        progress: Print a progress line while running.
        out: Where progress and the summary go (default stdout).
    """
    out = out or sys.stdout
    # The demo's failures are on purpose: keep their warnings out of the display.
    quiet = logging.getLogger("sagaflow")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    store = _default_store(db)
    sidecar = None if db == ":memory:" else Path(f"{db or 'sagaflow-demo.db'}.outcomes.json")
    outcomes = _load_outcomes(sidecar)
    send, receive = anyio.create_memory_object_stream[Any](math.inf)
    services = Services(send, outcomes)
    started = time.monotonic()
    runtime = Runtime(
        registry,
        store=store,
        dispatch=services,
        retry=RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.5),
    )
    limit = orders if stop_after is None else min(orders, stop_after)

    async def new_orders() -> AsyncIterator[OrderPlaced]:
        for i in range(limit):
            yield OrderPlaced(f"o{i}", 100 + i % 900)

    async def show_progress() -> None:
        while True:
            _progress(out, runtime, outcomes, orders, started)
            await anyio.sleep(0.25)

    try:
        async with runtime, send, receive:
            resumed = await _in_flight(store)
            if resumed:
                print(f"resuming: {resumed} order(s) in flight from an earlier run", file=out)
            async with anyio.create_task_group() as tg:
                tg.start_soon(runtime.run, receive)
                if progress:
                    tg.start_soon(show_progress)
                # Redelivering an order that an earlier run placed is harmless: the id
                # makes it a duplicate, applied at most once.
                await runtime.run(new_orders(), id=lambda e: f"placed-{e.order_id}")
                finished = limit == orders
                while finished:
                    await runtime.drain()
                    if receive.statistics().current_buffer_used == 0 and await _done(store):
                        break
                    await anyio.sleep(0.05)
                else:
                    await runtime.drain()
                tg.cancel_scope.cancel()
            dead = len(await store.list_dead_letters())
            left = await _in_flight(store)
            stats = runtime.statistics()
    finally:
        if sidecar is not None:
            sidecar.write_text(json.dumps(outcomes))
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in set(outcomes.values())}
    result = DemoResult(
        orders=orders,
        completed=counts.get("completed", 0),
        compensated=counts.get("compensated", 0),
        timed_out=counts.get("timed out", 0),
        dead_letters=dead,
        in_flight=left,
        resumed_instances=resumed,
        events_handled=stats.events_handled,
        seconds=time.monotonic() - started,
        finished=finished and left == 0,
    )
    if progress:
        print(file=out)
    _summary(out, result, db)
    return result


async def _in_flight(store: Store) -> int:
    active = await store.list_instances(saga="order", status=ACTIVE)
    return len(active) + len(await store.list_instances(saga="order", status=COMPLETING))


async def _done(store: Store) -> bool:
    if await store.next_due() is not None:
        return False
    if await store.list_outbox():
        return False
    for status in (ACTIVE, COMPLETING):
        if await store.list_instances(saga="order", status=status, limit=1):
            return False
    return True


def _progress(
    out: Any, runtime: Runtime, outcomes: dict[str, str], orders: int, started: float
) -> None:
    stats = runtime.statistics()
    elapsed = max(time.monotonic() - started, 1e-9)
    done = len(outcomes)
    line = (
        f"orders finished {done}/{orders}  handled {stats.events_handled} events "
        f"({stats.events_handled / elapsed:,.0f}/s)  dispatched {stats.commands_dispatched}  "
        f"outbox {stats.outbox_depth}"
    )
    if getattr(out, "isatty", lambda: False)():
        print("\r" + line, end="", file=out, flush=True)
    else:
        print(line, file=out)


def _summary(out: Any, r: DemoResult, db: str | None) -> None:
    where = "memory" if db == ":memory:" else (db or "sagaflow-demo.db")
    rate = r.events_handled / r.seconds if r.seconds else 0.0
    print(f"sagaflow demo on {where}", file=out)
    if r.resumed_instances:
        print(f"  resumed      {r.resumed_instances} order(s) left by an earlier run", file=out)
    print(f"  completed    {r.completed}", file=out)
    print(f"  compensated  {r.compensated}", file=out)
    print(f"  timed out    {r.timed_out}", file=out)
    print(f"  dead letters {r.dead_letters}", file=out)
    print(f"  in flight    {r.in_flight}", file=out)
    print(
        f"  events       {r.events_handled} in {r.seconds:.2f} s ({rate:,.0f} events/s)", file=out
    )
    if not r.finished:
        print("  stopped early: run the same command again to resume", file=out)
