"""Stores: where instances, the outbox, schedules, dedup marks and dead letters live.

`MemoryStore` keeps everything in the process; `SQLiteStore` is the embedded durable
default; `PostgresStore` (extra `sagaflow[postgres]`) lets many processes share one
database. All implement the `Store` protocol.
"""

from ._memory import MemoryStore
from ._protocol import (
    ACTIVE,
    COMPENSATION_FAILED,
    COMPLETING,
    Changes,
    DeadLetter,
    DedupMark,
    InstanceDelete,
    InstanceRecord,
    InstanceWrite,
    Loaded,
    LoadRequest,
    OutboxRecord,
    OutboxUpdate,
    ScheduleDelete,
    ScheduleRecord,
    Store,
)
from ._sqlite import SQLiteStore

__all__ = [
    "ACTIVE",
    "COMPENSATION_FAILED",
    "COMPLETING",
    "Changes",
    "DeadLetter",
    "DedupMark",
    "InstanceDelete",
    "InstanceRecord",
    "InstanceWrite",
    "LoadRequest",
    "Loaded",
    "MemoryStore",
    "OutboxRecord",
    "OutboxUpdate",
    "SQLiteStore",
    "ScheduleDelete",
    "ScheduleRecord",
    "Store",
]
