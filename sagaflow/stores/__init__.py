"""Stores: where instances, the outbox, schedules, dedup marks and dead letters live.

`MemoryStore` keeps everything in the process; `SQLiteStore` is the embedded durable
default; `PostgresStore` (extra `sagaflow[postgres]`) lets many processes share one
database. All implement the `Store` protocol; `PostgresStore` also the `ClusterStore`
protocol that `Runtime(cluster=True)` needs. `sagaflow.testing.conformance` checks a
store of your own against them.
"""

from typing import TYPE_CHECKING

from ._claims import ClaimedCommand, ClusterStore, InboxRecord, Listener, Settled
from ._memory import MemoryStore
from ._protocol import (
    ABORTED,
    ACTIVE,
    COMPENSATION_FAILED,
    COMPLETED,
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
    PendingCommand,
    RowCounts,
    ScheduleDelete,
    ScheduleRecord,
    Store,
    Tombstone,
    TombstonePolicy,
    TombstoneWrite,
)
from ._sqlite import SQLiteStore

if TYPE_CHECKING:
    from ._postgres import PostgresStore


def __getattr__(name: str) -> object:
    # PostgresStore needs the `postgres` extra (psycopg): import it only when used.
    if name == "PostgresStore":
        from ._postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ABORTED",
    "ACTIVE",
    "COMPENSATION_FAILED",
    "COMPLETED",
    "COMPLETING",
    "Changes",
    "ClaimedCommand",
    "ClusterStore",
    "DeadLetter",
    "DedupMark",
    "InboxRecord",
    "InstanceDelete",
    "InstanceRecord",
    "InstanceWrite",
    "Listener",
    "LoadRequest",
    "Loaded",
    "MemoryStore",
    "OutboxRecord",
    "OutboxUpdate",
    "PendingCommand",
    "PostgresStore",
    "RowCounts",
    "SQLiteStore",
    "ScheduleDelete",
    "ScheduleRecord",
    "Settled",
    "Store",
    "Tombstone",
    "TombstonePolicy",
    "TombstoneWrite",
]
