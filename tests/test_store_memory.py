"""`MemoryStore` passes the store conformance suite."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import pytest

from sagaflow.stores import (
    Changes,
    InstanceRecord,
    InstanceWrite,
    MemoryStore,
    ScheduleRecord,
    Store,
    Tombstone,
    TombstoneWrite,
)
from sagaflow.testing.conformance import StoreConformance, instance, schedule, tombstone


class TestMemoryStore(StoreConformance):
    """The conformance suite on a fresh `MemoryStore` per test."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        store = MemoryStore()
        await store.open()
        yield store
        await store.close()


@pytest.mark.anyio
async def test_data_outlives_close_for_the_next_runtime_on_the_same_object() -> None:
    store = MemoryStore()
    await store.open()
    await store.commit(Changes(writes=[InstanceWrite(instance(), expected_version=0)]))
    await store.close()

    await store.open()

    assert await store.list_instances() == [instance()]
    await store.close()


@pytest.mark.anyio
async def test_stored_records_leave_the_garbage_collector_nothing_to_walk() -> None:
    """Instances, schedules and tombstones are kept as tuples of plain values, which the
    cyclic garbage collector stops tracking, so a store with many live instances does
    not make every full collection walk them; reads build the records again."""
    store = MemoryStore()
    await store.open()
    saga = "Collected"
    records = [instance(f"k{i}", saga=saga) for i in range(200)]
    timers = [schedule(f"s{i}", saga=saga, key=f"k{i}") for i in range(200)]
    ends = [TombstoneWrite(tombstone(f"t{i}", saga=saga)) for i in range(200)]
    await store.commit(
        Changes(
            writes=[InstanceWrite(r, expected_version=0) for r in records],
            schedule_puts=timers,
            tombstones=ends,
        )
    )
    del records, timers, ends
    gc.collect()

    kept = (InstanceRecord, ScheduleRecord, Tombstone)
    assert [o for o in gc.get_objects() if type(o) in kept and o.saga == saga] == []
    assert await store.list_instances(limit=1) == [instance("k0", saga=saga)]
    assert len(await store.list_schedules()) == 200
    assert len(await store.list_tombstones()) == 200
    await store.close()
