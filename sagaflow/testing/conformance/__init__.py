"""The behaviour every store must show, as reusable pytest test classes.

`StoreConformance` pins the `Store` protocol: atomic commits and their order of
application, optimistic versions, schedules by due time, dedup marks, listings, keyset
scans, row counts, trace contexts, tombstones. `ClusterStoreConformance` adds the `ClusterStore`
protocol that `Runtime(cluster=True)` needs: the shared inbox, commands and schedules
claimed with leases, settling, the end of completed instances, and wake-ups. sagaflow's
own stores run these suites; a store of your own runs them the same way.

A test module subclasses one of them and provides a `store` fixture that yields an
opened, empty store and closes it afterwards:

```python
import pytest
from sagaflow.testing.conformance import StoreConformance

from mypackage import MyStore


class TestMyStore(StoreConformance):
    @pytest.fixture
    async def store(self):
        store = MyStore()
        await store.open()
        yield store
        await store.close()
```

This module needs pytest (and anyio's pytest plugin, which comes with anyio); every test
runs on asyncio and, when trio is installed, on trio (override the class's
`anyio_backend` fixture to choose). For pytest's detailed assertion messages, register the
module for assertion rewriting before it is imported, in `conftest.py`:
`pytest.register_assert_rewrite("sagaflow.testing.conformance")`. The record factories
(`instance`, `outbox_row`, `schedule`, `dead_letter`, `inbox_row`, `tombstone`, ...) help write more
tests of your own in the same terms.
"""

from ._cluster import ClusterStoreConformance
from ._records import (
    SAGA,
    TRACE,
    create,
    dead_letter,
    everything,
    inbox_row,
    instance,
    outbox_row,
    scan_pages,
    schedule,
    tombstone,
)
from ._store import StoreConformance

__all__ = [
    "ClusterStoreConformance",
    "SAGA",
    "StoreConformance",
    "TRACE",
    "create",
    "dead_letter",
    "everything",
    "inbox_row",
    "instance",
    "outbox_row",
    "scan_pages",
    "schedule",
    "tombstone",
]
