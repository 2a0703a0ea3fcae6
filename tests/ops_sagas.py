"""Sagas for the operations tests, and `prepare`: a store left worth operating on.

`prepare(store)` runs a real `Runtime` on a `VirtualClock` set in the past and leaves,
when it returns (times relative to the wall clock at that moment):

- `order a1`: active, started 10 days ago, schedule `expiry` pending; a `Broken` event
  of it is a dead letter (id `order:a1:broken-1`).
- `order c1`: started 10 days ago, cancelled: its compensation `Release` failed for
  good, so it is in status `compensation_failed` (completed) with `Refund` held in its
  outbox and a `compensate` dead letter.
- `shipping s1`: active, started 10 days ago; its `Notify` failed for good, and the
  shipping saga has no `CommandFailed` handler: a `send` dead letter.
- `order a2`: active, started 3 hours ago, its `Reserve` waiting for a retry (1 failed
  attempt), schedule `expiry` pending.
- `order n1`: active, started 3 hours ago, schedule `expiry` pending.

The return annotations are precise on purpose: `sagaflow diagram` draws them.
"""

from __future__ import annotations

import time
from datetime import timedelta
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
from sagaflow._clock import VirtualClock
from sagaflow.stores import Store

DAY = 86400.0
EXPIRY = timedelta(days=30)
RETRY = RetryPolicy(max_attempts=3, initial_delay=60, jitter=False)
"""Three calls, a minute apart (on the virtual clock; `max_delay` caps the second wait)."""


# -- events and commands ---------------------------------------------------------------


@attrs.frozen
class Opened:
    key: str


@attrs.frozen
class Paid:
    key: str


@attrs.frozen
class Cancelled:
    key: str


@attrs.frozen
class Broken:
    key: str


@attrs.frozen
class Expired:
    key: str


@attrs.frozen
class Reserve:
    key: str


@attrs.frozen
class Charge:
    key: str


@attrs.frozen
class Release:
    key: str


@attrs.frozen
class Refund:
    key: str


@attrs.frozen
class Notify:
    key: str


@attrs.define
class Order:
    status: str = "new"


# -- sagas -----------------------------------------------------------------------------


class OrderSaga:
    """Opened orders reserve stock and expire; cancelled ones are compensated.

    `Broken` events fail for good, unless the saga is created `fixed=True` (the bug was
    fixed and deployed): see `make_registry`.
    """

    def __init__(self, *, fixed: bool = False) -> None:
        self.fixed = fixed

    @correlate
    def key(self, event: Opened | Paid | Cancelled | Broken) -> str:
        return event.key

    @on(Opened, start=True)
    def opened(self, order: Order, event: Opened) -> list[Send[Reserve] | Schedule[Expired]]:
        order.status = "open"
        return [
            Send(Reserve(event.key)),
            Schedule(Expired(event.key), after=EXPIRY, name="expiry", to_self=True),
        ]

    @on(Paid)
    def paid(self, order: Order, event: Paid) -> tuple[Send[Charge], Unschedule, Complete]:
        order.status = "paid"
        return Send(Charge(event.key)), Unschedule("expiry"), Complete()

    @on(Cancelled)
    def cancelled(self, order: Order, event: Cancelled) -> list[Compensate | Complete]:
        order.status = "cancelled"
        return [Compensate([Release(event.key), Refund(event.key)]), Complete()]

    @on(Broken, retry=RetryPolicy(max_attempts=1))
    def broken(self, order: Order, event: Broken) -> None:
        if not self.fixed:
            raise RuntimeError(f"cannot handle Broken({event.key!r})")
        order.status = "repaired"

    @on(Expired, internal=True)
    def expired(self, order: Order, event: Expired) -> Compensate | Complete | None:
        order.status = "expired"
        return Compensate([Release(event.key)])

    @on(CommandFailed)
    def failed(self, order: Order, event: CommandFailed[Any]) -> None:
        order.status = f"failed: {type(event.command).__name__}"


class ShippingSaga:
    """Paid orders are shipped; no `CommandFailed` handler, so failures are dead letters."""

    @correlate
    def key(self, event: Paid) -> str:
        return event.key

    @on(Paid, start=True)
    def paid(self, order: Order, event: Paid) -> Send[Notify] | None:
        order.status = "shipping"
        return Send(Notify(event.key))


def make_registry(*, fixed: bool = False) -> Registry:
    """The order and shipping sagas; with `fixed`, `Broken` events are handled."""
    made = Registry()
    made.register(OrderSaga(fixed=fixed), state=Order, name="order")
    made.register(ShippingSaga(), state=Order, name="shipping")
    return made


registry = make_registry()
"""The sagas as deployed when the store was prepared (`Broken` fails)."""


# -- the store an operator finds -------------------------------------------------------


class ConnectionFailed(Exception):
    """A downstream service cannot be reached."""


@attrs.define
class Services:
    """Fails the commands it is told to fail (by type name and key); records the rest."""

    failing: set[tuple[str, str]] = attrs.Factory(set)
    calls: list[tuple[Any, DispatchMeta]] = attrs.Factory(list)

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        self.calls.append((command, meta))
        await anyio.lowlevel.checkpoint()
        if (type(command).__name__, command.key) in self.failing:
            raise ConnectionFailed(f"{type(command).__name__} service down")

    def sent(self) -> list[tuple[str, str, str, int]]:
        """`(command type, key, kind, attempt)` of every call, in order."""
        return [(type(c).__name__, c.key, m.kind, m.attempt) for c, m in self.calls]


async def prepare(store: Store, now: float | None = None) -> None:
    """Run the sagas on `store` until it holds what the module docstring lists."""
    now = time.time() if now is None else now
    clock = VirtualClock(start=now - 10 * DAY)
    services = Services({("Release", "c1"), ("Notify", "s1"), ("Reserve", "a2")})
    # Frequent sweeps while the virtual clock jumps: they must not release an instance
    # whose compensation is giving up (a sweep acts only on what it read).
    async with Runtime(
        registry, store=store, dispatch=services, retry=RETRY, clock=clock, sweep_interval=0.5
    ) as rt:
        await rt.publish(Opened("a1"))
        await rt.publish(Opened("c1"))
        await rt.publish(Cancelled("c1"))
        await rt.publish(Paid("s1"))  # reaches no order, starts shipping s1
        await rt.publish(Broken("a1"), id="broken-1")
        await rt.drain()
        for step in (60, 120):  # attempts 2 and 3: Release c1 and Notify s1 fail for good
            clock.advance(step)
            await rt.drain()
        clock.set(now - 3 * 3600)
        await rt.publish(Opened("a2"))  # Reserve a2 fails once, retried in 60 s
        await rt.publish(Opened("n1"))
        await rt.drain()
