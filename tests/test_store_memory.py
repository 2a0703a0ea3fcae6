"""`MemoryStore` passes the store conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sagaflow.stores import Changes, InstanceWrite, MemoryStore, Store
from sagaflow.testing.conformance import StoreConformance, instance


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
