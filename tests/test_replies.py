"""Replies: a dispatcher may publish a service's reply into the runtime it serves.

The how-to "Handling replies" promises that `runtime.publish(...)` from inside the
dispatcher does not deadlock, however small the mailboxes and however few the
dispatcher workers: shard workers hand commands to the outbox without waiting for it,
so a dispatcher blocked on a full mailbox is always freed by a shard that keeps going.
These tests hold it to that with one-item mailboxes, one dispatcher worker and many
instances at once, on every store and both event loops; `fail_after` only turns a
deadlock into a failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401

from sagaflow import Complete, DispatchMeta, Registry, Runtime, Send, correlate, on
from sagaflow.stores import MemoryStore, PostgresStore, SQLiteStore, Store

ORDERS = 60
DEADLOCK = 60  # seconds: a safety net only; the work takes well under a second alone


@attrs.frozen
class PaymentRequested:
    order_id: str


@attrs.frozen
class Charge:
    order_id: str


@attrs.frozen
class Charged:
    order_id: str
    command_id: str


@attrs.define
class Payment:
    status: str = "new"
    charge: str = ""


registry = Registry()


@registry.saga(state=Payment)
class PaymentSaga:
    @correlate
    def order_id(self, event: PaymentRequested | Charged) -> str:
        return event.order_id

    @on(PaymentRequested, start=True)
    def requested(self, payment: Payment, event: PaymentRequested) -> Send[Charge]:
        payment.status = "charging"
        return Send(Charge(event.order_id))

    @on(Charged)
    def charged(self, payment: Payment, event: Charged) -> Complete:
        payment.status, payment.charge = "charged", event.command_id
        return Complete()


@attrs.define
class Replying:
    """A dispatcher whose service answers at once: it publishes the reply itself."""

    runtime: Runtime | None = None
    calls: list[tuple[str, int]] = attrs.Factory(list)

    async def __call__(self, command: Charge, meta: DispatchMeta) -> None:
        assert self.runtime is not None
        self.calls.append((command.order_id, meta.attempt))
        await self.runtime.publish(Charged(command.order_id, meta.id), id=f"reply:{meta.id}")


TIGHT = {"shards": 1, "queue_size": 1, "max_batch": 1, "dispatch_concurrency": 1}
WIDER = {"shards": 2, "queue_size": 2, "max_batch": 8, "dispatch_concurrency": 4}


def _sqlite(tmp_path: Path) -> Store:
    return SQLiteStore(tmp_path / "replies.db")


STORES: dict[str, Callable[[Path], Store]] = {"memory": lambda _: MemoryStore(), "sqlite": _sqlite}


@asynccontextmanager
async def replying(store: Store, **options: Any) -> AsyncIterator[tuple[Runtime, Replying]]:
    dispatch = Replying()
    async with Runtime(registry, store=store, dispatch=dispatch, **options) as runtime:
        dispatch.runtime = runtime
        yield runtime, dispatch


def _expected_calls() -> list[tuple[str, int]]:
    return sorted((f"o{i}", 1) for i in range(ORDERS))


async def _publish_all(runtime: Runtime) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(ORDERS):
            tg.start_soon(runtime.publish, PaymentRequested(f"o{i}"))


@pytest.mark.anyio
@pytest.mark.parametrize("options", [TIGHT, WIDER], ids=["tight", "wider"])
@pytest.mark.parametrize("store_name", sorted(STORES))
async def test_publish_from_the_dispatcher_does_not_deadlock_under_backpressure(
    store_name: str, options: dict[str, int], tmp_path: Path
) -> None:
    """Many instances at once fill one-item mailboxes while the dispatcher publishes."""
    store = STORES[store_name](tmp_path)
    with anyio.fail_after(DEADLOCK):
        async with replying(store, **options) as (runtime, dispatch):
            await _publish_all(runtime)
            await runtime.drain()
            stats = runtime.statistics()
            remaining = await store.list_instances()
    assert sorted(dispatch.calls) == _expected_calls()
    assert (stats.events_handled, stats.commands_dispatched, stats.commands_failed) == (
        2 * ORDERS,
        ORDERS,
        0,
    )
    assert (stats.events_unmatched, stats.events_dead_lettered) == (0, 0)
    assert remaining == []


@pytest.mark.anyio
async def test_publish_from_the_dispatcher_while_run_feeds_a_stream() -> None:
    """`run(source)` keeps feeding the mailbox the dispatcher's replies also go to."""
    send, receive = anyio.create_memory_object_stream[PaymentRequested](0)

    async def feed() -> None:
        async with send:
            for i in range(ORDERS):
                await send.send(PaymentRequested(f"o{i}"))

    with anyio.fail_after(DEADLOCK):
        async with replying(MemoryStore(), **TIGHT) as (runtime, dispatch):
            async with receive, anyio.create_task_group() as tg:
                tg.start_soon(feed)
                assert await runtime.run(receive) == ORDERS
            await runtime.drain()
            stats = runtime.statistics()
    assert sorted(dispatch.calls) == _expected_calls()
    assert (stats.events_handled, stats.commands_dispatched) == (2 * ORDERS, ORDERS)


@pytest.mark.anyio
async def test_leaving_the_context_waits_for_replies_published_by_the_dispatcher(
    tmp_path: Path,
) -> None:
    """The drain on leaving the context counts a dispatch, and so the reply it publishes."""
    with anyio.fail_after(DEADLOCK):
        async with replying(SQLiteStore(tmp_path / "replies.db"), **TIGHT) as (runtime, _):
            await _publish_all(runtime)
        stats = runtime.statistics()
        store = SQLiteStore(tmp_path / "replies.db")
        await store.open()
        try:
            remaining = await store.list_instances()
            outbox = await store.list_outbox()
        finally:
            await store.close()
    assert (stats.events_handled, stats.commands_dispatched) == (2 * ORDERS, ORDERS)
    assert (remaining, outbox) == ([], [])


@pytest.mark.anyio
@pytest.mark.postgres
async def test_publish_from_the_dispatcher_does_not_deadlock_in_cluster_mode(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """Through the shared inbox too, with a small connection pool."""
    store = PostgresStore(postgres_dsn, schema=pg_schema, max_size=2, poll_interval=0.1)
    with anyio.fail_after(DEADLOCK):
        async with replying(store, cluster=True, **TIGHT) as (runtime, dispatch):
            await _publish_all(runtime)
            await runtime.drain()
            stats = runtime.statistics()
            remaining = await store.list_instances()
    assert sorted(dispatch.calls) == _expected_calls()
    assert (stats.commands_dispatched, stats.commands_failed, remaining) == (ORDERS, 0, [])
