"""The demo behind `python -m sagaflow demo`: the order saga against simulated services.

Thousands of orders run through the saga on a SQLite file: most are paid and shipped,
some payments are declined (compensated), some never answered (timed out), and a few
cancellations fail for good (dead letters). Stop it (Ctrl-C or `--stop-after`) and run
it again: it resumes from the file.

What happens to an order is decided by its number alone, and time is virtual: the
clock moves on only when the runtime is idle, so however many orders there are and
however slow the machine, an answered payment always beats its timeout and the mix of
outcomes stays the same. Orders are placed in rounds; after each round the clock is
moved through the round's retries and timeouts.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import attrs

from ._actions import CommandFailed, Compensate, Complete, Schedule, Send, Unschedule
from ._clock import VirtualClock
from ._decorators import correlate, on
from ._records import DispatchMeta
from ._registry import Registry
from ._retry import RetryPolicy
from ._runtime import Runtime, Statistics
from .stores._protocol import ACTIVE, COMPENSATION_FAILED, COMPLETING, Store
from .testing import advance

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
"""Seconds of virtual time an order waits for its payment."""

ROUND = 1000
"""Orders placed between two moves of the virtual clock."""

RETRY = RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.5, jitter=False)
"""Three calls within 0.15 s of virtual time: a declined payment fails for good long
before its timeout. No jitter, so one round's retries fall due together."""

registry = Registry()


@registry.saga(state=Order, name="order")
class OrderSaga:
    """The order saga of DESIGN.md, with a payment step and a payment timeout."""

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
        if order.status not in ("placed", "reserved"):
            return None  # paid or declined meanwhile: nothing to undo twice
        order.status = "timed out"
        return [
            Compensate([ReleaseStock(event.order_id), CancelOrder(event.order_id, "timeout")]),
            Complete(),
        ]

    @on(CommandFailed)
    def failed(self, order: Order, event: CommandFailed[Any]) -> list[Any] | None:
        command = event.command
        if isinstance(command, CapturePayment) and order.status == "reserved":
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


def declined(n: int) -> bool:
    """Order `n`'s card is declined: the saga compensates."""
    return n % 10 == 3


def unanswered(n: int) -> bool:
    """The payment service never answers for order `n`: the saga times out."""
    return n % 10 == 7


def cancel_fails(n: int) -> bool:
    """Cancelling order `n` fails for good (a declined one): a dead letter."""
    return n % 100 == 23


@attrs.define(eq=False)
class Services:
    """Simulated downstream services: each command may answer with an event.

    An answer is published before the command counts as delivered, with an id made of
    the command's, so a command dispatched again after a crash answers only once: no
    answer is lost between two runs. Shipping and cancelling record the order's outcome
    in `outcomes`, and append it to `log` before returning, for the same reason.
    """

    publish: Callable[..., Awaitable[None]]
    outcomes: dict[str, str]
    log: TextIO | None = None

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        n = _number(command.order_id)
        if isinstance(command, ReserveStock):
            await self.publish(StockReserved(command.order_id), id=f"reply:{meta.id}")
        elif isinstance(command, CapturePayment):
            if declined(n):
                raise PaymentDeclined(f"card of order {command.order_id} declined")
            if not unanswered(n):
                await self.publish(PaymentCaptured(command.order_id), id=f"reply:{meta.id}")
        elif isinstance(command, ShipOrder):
            self._record(command.order_id, "completed")
        elif isinstance(command, CancelOrder):
            if cancel_fails(n):
                raise ConnectionError(f"order service unreachable for {command.order_id}")
            self._record(
                command.order_id, "timed out" if command.reason == "timeout" else "compensated"
            )

    def _record(self, order_id: str, outcome: str) -> None:
        self.outcomes[order_id] = outcome
        if self.log is not None:
            self.log.write(f"{order_id} {outcome}\n")


@attrs.frozen
class DemoResult:
    """What one demo run saw.

    Every order known to the file ends in exactly one of `completed`, `compensated`,
    `timed_out`, `dead_letters` (its cancellation failed for good: the instance stays,
    status "compensation failed") or `unfinished` (waiting for an answer or a timeout);
    they add up to `orders`. `in_flight` counts the instances the store still holds, as
    `sagaflow instances` lists them: the dead letters' and the unfinished ones.
    """

    orders: int
    completed: int
    compensated: int
    timed_out: int
    dead_letters: int
    unfinished: int
    in_flight: int
    resumed_instances: int
    events_handled: int
    seconds: float
    finished: bool


def _default_store(db: str) -> Store:
    if db == ":memory:":
        from .stores import MemoryStore

        return MemoryStore()
    from .stores import SQLiteStore

    return SQLiteStore(db)


def _load_outcomes(path: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            order_id, _, outcome = line.rstrip("\n").partition(" ")
            if outcome:  # a line cut short by a crash is not an outcome
                outcomes[order_id] = outcome
    return outcomes


async def _start_time(store: Store) -> tuple[float, int]:
    """Where the virtual clock starts, and how many orders an earlier run left in flight.

    It starts at the wall clock, or earlier if the file holds work due before that: at
    the earliest of it, so the retries and timeouts an earlier run left fall due in
    their own order, never all at once.
    """
    await store.open()
    try:
        held = {r.key for r in await store.list_instances(saga="order", status=COMPENSATION_FAILED)}
        # A command never tried yet is due at once (whatever its `due`); one waiting for
        # a retry is due at its time.
        outbox = await store.list_outbox(saga="order")
        dues = [o.due for o in outbox if o.attempts and o.key not in held]
        schedule = await store.next_due()
        dues += [] if schedule is None else [schedule]
        left = 0
        for status in (ACTIVE, COMPLETING):
            left += len(await store.list_instances(saga="order", status=status))
    finally:
        await store.close()
    return min([time.time(), *dues]), left


async def run_demo(
    *,
    orders: int = 2000,
    db: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    out: Any = None,
    round_size: int = ROUND,
) -> DemoResult:
    """Run the demo and return its summary.

    Args:
        orders: How many orders to place (ids `o0` .. `o{orders-1}`).
        db: The SQLite file (default `sagaflow-demo.db`), or `":memory:"`. The orders'
            outcomes are kept next to it, in the file of the same name plus `.outcomes`.
        stop_after: Place only the first `stop_after` orders, handle what is due now,
            and stop, leaving the orders in flight in the file for the next run.
        progress: Print a progress line while running.
        out: Where progress and the summary go (default stdout).
        round_size: Orders placed between two moves of the virtual clock.
    """
    out = out or sys.stdout
    db = db or "sagaflow-demo.db"
    store = _default_store(db)
    sidecar = None if db == ":memory:" else Path(f"{db}.outcomes")
    if sidecar is not None and not os.path.exists(db):
        sidecar.unlink(missing_ok=True)  # outcomes of a file that is gone
    outcomes = {} if sidecar is None or not sidecar.exists() else _load_outcomes(sidecar)
    start, resumed = await _start_time(store)
    clock = VirtualClock(start=start)
    runtime: Runtime | None = None

    async def publish(event: object, *, id: str) -> None:
        assert runtime is not None
        await runtime.publish(event, id=id)

    log = None if sidecar is None else sidecar.open("a", encoding="utf-8", buffering=1)
    services = Services(publish, outcomes, log)
    runtime = Runtime(
        registry,
        store=store,
        dispatch=services,
        retry=RETRY,
        clock=clock,
        dispatch_concurrency=64,
    )
    limit = orders if stop_after is None else min(orders, stop_after)
    show = _Progress(out, runtime, outcomes, orders, enabled=progress)
    settled = True
    try:
        async with runtime:
            if resumed:
                print(f"resuming: {resumed} order(s) in flight from an earlier run", file=out)
            for first in range(0, limit, max(1, round_size)):
                last = min(first + max(1, round_size), limit)
                # Placing again an order that an earlier run placed is harmless: the id
                # makes it a duplicate, applied at most once.
                await runtime.run(_orders(first, last, show), id=lambda e: f"placed-{e.order_id}")
                if last < limit or limit == orders:  # not the round it stops after
                    settled = await _settle(runtime, clock, store)
                show.tick()
            if limit == orders == 0:
                settled = await _settle(runtime, clock, store)
            await runtime.drain()
            result = await _result(store, outcomes, limit, resumed, runtime.statistics())
    finally:
        if log is not None:
            log.close()
    result = attrs.evolve(
        result,
        seconds=time.monotonic() - show.started,
        finished=settled and limit == orders and result.unfinished == 0,
    )
    if progress:
        print(file=out)
    _summary(out, result, db)
    return result


async def _orders(first: int, last: int, show: _Progress) -> AsyncIterator[OrderPlaced]:
    for i in range(first, last):
        show.tick()
        yield OrderPlaced(f"o{i}", 100 + i % 900)


def _moves(stats: Statistics) -> int:
    return stats.events_handled + stats.commands_dispatched + stats.command_retries


async def _settle(runtime: Runtime, clock: VirtualClock, store: Store) -> bool:
    """Move the clock on, through due retries and timeouts, until no order is unfinished.

    Returns `False` if orders are still unfinished although a whole payment timeout
    went by with nothing handled or dispatched and no schedule is pending: they wait
    for something that will not come, and the demo reports them rather than wait for
    ever.
    """
    while await _unfinished(store, limit=1):
        before = _moves(runtime.statistics())
        await advance(runtime, clock, PAYMENT_TIMEOUT)
        if _moves(runtime.statistics()) == before:
            due = await store.next_due()
            if due is None or due <= clock.now():
                return not await _unfinished(store, limit=1)
            await advance(runtime, clock, due - clock.now())
    return True


async def _unfinished(store: Store, *, limit: int | None = None) -> set[str]:
    """The keys of the orders still active or completing."""
    keys: set[str] = set()
    for status in (ACTIVE, COMPLETING):
        keys.update(
            r.key for r in await store.list_instances(saga="order", status=status, limit=limit)
        )
    return keys


async def _result(
    store: Store, outcomes: dict[str, str], placed: int, resumed: int, stats: Statistics
) -> DemoResult:
    """Every order the file knows, counted once: by its outcome, or its instance's status."""
    instances = {r.key: r.status for r in await store.list_instances(saga="order")}
    known = set(outcomes) | set(instances) | {f"o{i}" for i in range(placed)}
    counts = dict.fromkeys(("completed", "compensated", "timed out", "dead", "unfinished"), 0)
    for order_id in known:
        status = instances.get(order_id)
        if status == COMPENSATION_FAILED:
            counts["dead"] += 1
        elif order_id in outcomes:
            counts[outcomes[order_id]] += 1
        else:
            counts["unfinished"] += 1
    return DemoResult(
        orders=len(known),
        completed=counts["completed"],
        compensated=counts["compensated"],
        timed_out=counts["timed out"],
        dead_letters=counts["dead"],
        unfinished=counts["unfinished"],
        in_flight=len(instances),
        resumed_instances=resumed,
        events_handled=stats.events_handled,
        seconds=0.0,
        finished=False,
    )


@attrs.define(eq=False)
class _Progress:
    """The progress line, printed at most every quarter of a second.

    Ticked from the demo's own task (no task of its own), so that an interrupt reaches
    the caller as itself, not inside an exception group.
    """

    out: Any
    runtime: Runtime
    outcomes: dict[str, str]
    orders: int
    enabled: bool
    started: float = attrs.field(factory=time.monotonic)
    _shown: float = attrs.field(default=-math.inf, init=False)

    def tick(self) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._shown < 0.25:
            return
        self._shown = now
        stats = self.runtime.statistics()
        elapsed = max(now - self.started, 1e-9)
        line = (
            f"orders finished {len(self.outcomes)}/{self.orders}  handled "
            f"{stats.events_handled} events ({stats.events_handled / elapsed:,.0f}/s)  "
            f"dispatched {stats.commands_dispatched}  outbox {stats.outbox_depth}"
        )
        if getattr(self.out, "isatty", lambda: False)():
            print("\r" + line, end="", file=self.out, flush=True)
        else:
            print(line, file=self.out)


def _summary(out: Any, r: DemoResult, db: str) -> None:
    where = "memory" if db == ":memory:" else db
    rate = r.events_handled / r.seconds if r.seconds else 0.0
    listing = "" if db == ":memory:" else f": sagaflow instances sqlite:{db}"
    lines = [
        ("completed", r.completed, "paid and shipped"),
        ("compensated", r.compensated, "payment declined: stock released, order cancelled"),
        ("timed out", r.timed_out, "payment never answered: stock released, order cancelled"),
        ("dead letters", r.dead_letters, "payment declined, cancelling failed for good"),
        ("unfinished", r.unfinished, "waiting for an answer or a timeout"),
        ("in flight", r.in_flight, f"the dead letters' and unfinished instances{listing}"),
    ]
    width = len(str(r.orders))
    print(f"sagaflow demo on {where}: {r.orders} orders", file=out)
    if r.resumed_instances:
        print(f"  resumed      {r.resumed_instances} order(s) left by an earlier run", file=out)
    for name, count, meaning in lines:
        print(f"  {name:<12} {count:>{width}}  {meaning}", file=out)
    print(
        f"  events       {r.events_handled} in {r.seconds:.2f} s ({rate:,.0f} events/s)", file=out
    )
    if not r.finished:
        print("  stopped early: run the same command again to resume", file=out)
