"""A registry at its third state version, and `fill`: stored rows of every kind for the check.

`registry` is the code about to be deployed: saga `Orders` (once stored as `OldOrders`)
keeps its state `Order` at version 3 (version 1 had no `currency`, version 2 called
`total` `count`), the message `Placed` is at version 2 (version 1 had no `currency`), and
the command `Ship` and the scheduled `Remind` at version 1. `fill(store)` writes rows
that the check must find ok, would upcast or would fail.

(`Placed` is not handled by the saga: registering a handled event type under a stable
name or version fails today, whether `registry.message` comes before or after the saga.)
"""

from __future__ import annotations

from typing import Any

import attrs

from sagaflow import Registry, correlate, on, upcast
from sagaflow.stores import (
    Changes,
    DeadLetter,
    InstanceRecord,
    InstanceWrite,
    OutboxRecord,
    ScheduleRecord,
    Store,
)


@attrs.frozen
class Started:
    order_id: str


@attrs.frozen
class Placed:
    order_id: str
    currency: str


@attrs.frozen
class Ship:
    order_id: str


@attrs.frozen
class Remind:
    order_id: str


@attrs.define
class Order:
    status: str = "new"
    total: int = 0
    currency: str = "EUR"


def add_currency(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "currency": "EUR"}


def make_registry() -> Registry:
    registry = Registry()
    registry.message(Placed, name="Placed", version=2, upcasters={1: add_currency})
    registry.message(Ship, name="Ship")
    registry.message(Remind, name="Remind")

    @registry.saga(state=Order, name="Orders", version=3, aliases=("OldOrders",))
    class OrderSaga:
        @upcast(1)
        @staticmethod
        def add_currency(data: dict[str, Any]) -> dict[str, Any]:
            return add_currency(data)

        @upcast(2)
        @staticmethod
        def rename_count(data: dict[str, Any]) -> dict[str, Any]:
            data = dict(data)
            data["total"] = data.pop("count")
            return data

        @correlate
        def order_id(self, event: Started) -> str:
            return event.order_id

        @on(Started, start=True)
        def started(self, order: Order, event: Started) -> None:
            order.status = "started"

    return registry


registry = make_registry()


def state(saga: str, key: str, text: str, version: int) -> InstanceRecord:
    return InstanceRecord(
        saga, key, 1, "active", text, f"{saga}-{key}", 100.0, 100.0, state_version=version
    )


def state_rows() -> list[InstanceRecord]:
    """Instances: 2 ok (one under the alias), 2 would upcast, 5 would fail."""
    return [
        state("Orders", "ok", '{"status": "placed", "total": 5, "currency": "EUR"}', 3),
        state("Orders", "v1", '{"status": "placed", "count": 5}', 1),
        state("Orders", "v2", '{"status": "placed", "count": 5, "currency": "USD"}', 2),
        state("Orders", "renamed", '{"status": "placed", "amount": 5, "currency": "EUR"}', 3),
        state("Orders", "array", "[1, 2]", 3),
        state("Orders", "newer", '{"status": "placed", "total": 5, "currency": "EUR"}', 4),
        state("Orders", "no-count", '{"status": "placed", "currency": "EUR"}', 2),
        state("OldOrders", "aliased", '{"status": "new", "total": 0, "currency": "EUR"}', 3),
        state("Removed", "r1", '{"anything": 1}', 1),
    ]


def command(id: str, saga: str, type_name: str, payload: str) -> OutboxRecord:
    return OutboxRecord(id, saga, "ok", 1, "send", type_name, payload)


def outbox_rows() -> list[OutboxRecord]:
    """Outbox: 1 ok, 1 would upcast, 3 would fail."""
    return [
        command("c-ok", "Orders", "Ship", '{"order_id": "ok"}'),
        command("c-v1", "Orders", "Placed", '{"order_id": "ok"}'),
        command("c-newer", "Orders", "Placed@3", '{"order_id": "ok", "currency": "EUR"}'),
        command("c-unknown", "Orders", "gone.module.Cancel", '{"order_id": "ok"}'),
        command("c-orphan", "Removed", "Ship", '{"order_id": "r1"}'),
    ]


def timer(id: str, saga: str, key: str, payload: str) -> ScheduleRecord:
    return ScheduleRecord(id, saga, key, id, 500.0, True, "Remind", payload)


def schedule_rows() -> list[ScheduleRecord]:
    """Schedules: 1 ok, 2 would fail."""
    return [
        timer("s-ok", "Orders", "ok", '{"order_id": "ok"}'),
        timer("s-renamed", "Orders", "ok", '{"order": "ok"}'),
        timer("s-orphan", "Removed", "r1", '{"order_id": "r1"}'),
    ]


def letter(id: str, kind: str, type_name: str, payload: str) -> DeadLetter:
    return DeadLetter(id, "Orders", "ok", kind, type_name, payload, "E: x", 3, 200.0)


def dead_letter_rows() -> list[DeadLetter]:
    """Dead letters: 1 ok, 1 would upcast, 1 would fail."""
    return [
        letter("d-send", "send", "Ship", '{"order_id": "ok"}'),
        letter("d-event-v1", "event", "Placed", '{"order_id": "ok"}'),
        letter("d-event-text", "event", "Placed@2", '"abc"'),
    ]


async def fill(store: Store) -> None:
    """Write every row above (the store must be open)."""
    await store.commit(
        Changes(
            writes=[InstanceWrite(r, expected_version=0) for r in state_rows()],
            outbox_adds=outbox_rows(),
            schedule_puts=schedule_rows(),
            dead_letters=dead_letter_rows(),
        )
    )


async def fill_file(path: str) -> None:
    """`fill` a SQLite file (created if missing)."""
    from sagaflow.stores import SQLiteStore

    store = SQLiteStore(path)
    await store.open()
    try:
        await fill(store)
    finally:
        await store.close()
