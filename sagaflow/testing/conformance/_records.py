"""Records and small helpers the conformance suites are written with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ...stores import (
    ACTIVE,
    Changes,
    DeadLetter,
    InboxRecord,
    InstanceRecord,
    InstanceWrite,
    Loaded,
    OutboxRecord,
    ScheduleRecord,
    Store,
    Tombstone,
)

SAGA = "OrderSaga"
"""The saga name the records of the suite belong to."""
TRACE = '{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}'
"""A trace context as the runtime stores it (JSON text of a W3C carrier)."""


def instance(
    key: str = "k1",
    *,
    saga: str = SAGA,
    version: int = 1,
    status: str = ACTIVE,
    state: str = '{"status": "new", "amount": 0}',
    last_event: str | None = "shop.OrderPlaced",
    completed: bool = False,
) -> InstanceRecord:
    """An instance record with every field set."""
    return InstanceRecord(
        saga=saga,
        key=key,
        version=version,
        status=status,
        state=state,
        instance_id=f"{saga}/{key}/i{version}",
        created_at=1000.5,
        updated_at=1000.5 + version,
        last_event=last_event,
        completed=completed,
    )


def outbox_row(
    id: str,
    *,
    saga: str = SAGA,
    key: str = "k1",
    seq: int = 1,
    kind: str = "send",
    attempts: int = 0,
    due: float = 0.0,
    error: str | None = None,
    trace: str | None = None,
) -> OutboxRecord:
    """An outbox row with a payload derived from its id."""
    return OutboxRecord(
        id=id,
        saga=saga,
        key=key,
        seq=seq,
        kind=kind,
        type_name="shop.ReserveStock",
        payload=f'{{"command": "{id}"}}',
        attempts=attempts,
        due=due,
        error=error,
        trace=trace,
    )


def schedule(
    id: str,
    *,
    saga: str = SAGA,
    key: str = "k1",
    name: str | None = None,
    due: float = 10.0,
    to_self: bool = False,
    seq: int = 0,
    attempts: int = 0,
    trace: str | None = None,
) -> ScheduleRecord:
    """A schedule named after its id unless `name` is given."""
    return ScheduleRecord(
        id=id,
        saga=saga,
        key=key,
        name=id if name is None else name,
        due=due,
        to_self=to_self,
        type_name="shop.PaymentTimedOut",
        payload=f'{{"schedule": "{id}"}}',
        seq=seq,
        attempts=attempts,
        trace=trace,
    )


def dead_letter(
    id: str,
    *,
    saga: str = SAGA,
    key: str = "k1",
    failed_at: float = 50.0,
    kind: str = "send",
    seq: int = 0,
) -> DeadLetter:
    """A dead letter with every field set."""
    return DeadLetter(
        id=id,
        saga=saga,
        key=key,
        kind=kind,
        type_name="shop.CapturePayment",
        payload=f'{{"dead": "{id}"}}',
        error="ConnectionError: payment gateway down",
        attempts=5,
        failed_at=failed_at,
        seq=seq,
    )


def tombstone(
    key: str = "k1",
    *,
    saga: str = SAGA,
    ended: str = "completed",
    expires_at: float = 1000.0,
    version: int = 2,
    state: str | None = '{"status": "done"}',
) -> Tombstone:
    """A tombstone with every field set."""
    return Tombstone(
        saga=saga,
        key=key,
        ended=ended,
        ended_at=40.25,
        expires_at=expires_at,
        instance_id=f"{saga}/{key}/i1",
        version=version,
        state=state,
        state_version=3,
    )


def create(*records: InstanceRecord) -> Changes:
    """Changes that create `records` as new instances."""
    return Changes(writes=[InstanceWrite(r, expected_version=0) for r in records])


def empty_loaded() -> Loaded:
    """What `load` answers when nothing asked for is there."""
    return Loaded(instances={}, marks=set(), schedule_ids=set())


async def everything(store: Store) -> tuple[Any, ...]:
    """Every listing of `store`, to check that a commit changed nothing."""
    return (
        await store.list_instances(),
        await store.list_outbox(),
        await store.list_schedules(),
        await store.list_dead_letters(),
        await store.next_due(),
    )


async def scan_pages(
    scan: Callable[..., Awaitable[list[Any]]], last: Callable[[Any], Any], *, limit: int
) -> list[list[Any]]:
    """Every page of a `scan_*` method, each read after the last key of the one before."""
    pages: list[list[Any]] = []
    after = None
    while rows := await scan(after=after, limit=limit):
        pages.append(rows)
        after = last(rows[-1])
    return pages


def everything_once() -> Changes:
    """One row of every kind."""
    return Changes(
        writes=[InstanceWrite(instance(), expected_version=0)],
        schedule_puts=[schedule("s1")],
        outbox_adds=[outbox_row("c1")],
        dead_letters=[dead_letter("d1")],
    )


def inbox_row(key: str, event_id: str, *, saga: str = SAGA, generated: bool = False) -> InboxRecord:
    """An inbox row as `put_inbox` takes it (its `pos` is assigned by the store)."""
    return InboxRecord(
        0, saga, key, event_id, generated, "shop.OrderPlaced", f'{{"e": "{event_id}"}}', 1_000.0
    )
