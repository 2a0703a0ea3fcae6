"""`SQLiteStore`: the embedded durable store, on the standard library's `sqlite3`.

One connection per store, used one call at a time. Every protocol method is a single
thread hop, and `commit` writes a whole batch in one transaction with one `executemany`
per kind of row (group commit): a thread round trip costs far more than a row, so nothing
here crosses to a thread per row. Without a disk flush per commit (`power_safe=False`),
loads and commits are shorter than that round trip and run on the event loop's thread
instead; checkpoints (which flush) and waits for other connections' locks stay in a
worker thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Sequence
from itertools import groupby
from operator import attrgetter, itemgetter
from typing import Any, TypeVar, TypeVarTuple

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs

from ..exceptions import ConflictError, SchemaVersionError, StoreError
from ._protocol import (
    ACTIVE,
    COMPLETING,
    Association,
    Changes,
    DeadLetter,
    DedupMark,
    InstanceDelete,
    InstanceRecord,
    InstanceWrite,
    Loaded,
    LoadRequest,
    OutboxRecord,
    PendingCommand,
    RowCounts,
    ScheduleRecord,
    Tombstone,
    TombstoneWrite,
    row_counts,
)

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")
_Ref = tuple[str, str]

# Version 1 of the schema. It never changes: later versions are reached by migrations.
_SCHEMA_V1 = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    """CREATE TABLE instances (
        saga TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
        status TEXT NOT NULL, state TEXT NOT NULL, instance_id TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, last_event TEXT,
        completed INTEGER NOT NULL, PRIMARY KEY (saga, key)) WITHOUT ROWID""",
    """CREATE TABLE outbox (
        id TEXT PRIMARY KEY, saga TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
        kind TEXT NOT NULL, type_name TEXT NOT NULL, payload TEXT NOT NULL,
        attempts INTEGER NOT NULL, due REAL NOT NULL, error TEXT) WITHOUT ROWID""",
    "CREATE INDEX outbox_order ON outbox (saga, key, seq)",
    """CREATE TABLE schedules (
        id TEXT NOT NULL UNIQUE, saga TEXT NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL,
        due REAL NOT NULL, to_self INTEGER NOT NULL, type_name TEXT NOT NULL,
        payload TEXT NOT NULL, seq INTEGER NOT NULL, attempts INTEGER NOT NULL,
        PRIMARY KEY (saga, key, name)) WITHOUT ROWID""",
    "CREATE INDEX schedules_due ON schedules (due, seq, id)",
    """CREATE TABLE dead_letters (
        id TEXT PRIMARY KEY, saga TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL,
        type_name TEXT NOT NULL, payload TEXT NOT NULL, error TEXT NOT NULL,
        attempts INTEGER NOT NULL, failed_at REAL NOT NULL, seq INTEGER NOT NULL)
        WITHOUT ROWID""",
    "CREATE INDEX dead_letters_age ON dead_letters (failed_at, id)",
    """CREATE TABLE marks (
        saga TEXT NOT NULL, key TEXT NOT NULL, event_id TEXT NOT NULL,
        expires_at REAL NOT NULL, PRIMARY KEY (saga, key, event_id)) WITHOUT ROWID""",
    "CREATE INDEX marks_expiry ON marks (expires_at)",
)

_Migration = Callable[[sqlite3.Connection], None]


def _index_unusual_statuses(conn: sqlite3.Connection) -> None:
    """Version 2: find the instances that are not active without reading them all.

    The runtime's periodic sweep and the operator's listings ask for completing and
    compensation-failed instances; a partial index holds only those, so it costs the
    writes of active instances nothing.
    """
    conn.execute(
        "CREATE INDEX instances_unusual ON instances (status, saga, key) "
        f"WHERE status != '{ACTIVE}'"
    )


def _record_versions(conn: sqlite3.Connection) -> None:
    """Version 3: every state row records the saga state version it was written at, and
    a dead letter of an undeliverable timer its schedule's name (to schedule it again)."""
    conn.execute("ALTER TABLE instances ADD COLUMN state_version INTEGER NOT NULL DEFAULT 1")
    conn.execute("ALTER TABLE dead_letters ADD COLUMN name TEXT")


def _carry_traces(conn: sqlite3.Connection) -> None:
    """Version 4: commands and schedules keep the trace context of the handling that
    produced them (JSON text; NULL when the runtime's hooks capture no trace)."""
    conn.execute("ALTER TABLE outbox ADD COLUMN trace TEXT")
    conn.execute("ALTER TABLE schedules ADD COLUMN trace TEXT")


def _add_tombstones(conn: sqlite3.Connection) -> None:
    """Version 5: finished instances leave a tombstone for a while (how and when they
    ended, the final state for sagas with late handlers); expired ones are purged by
    their expiry time."""
    conn.execute(
        """CREATE TABLE tombstones (
        saga TEXT NOT NULL, key TEXT NOT NULL, ended TEXT NOT NULL, ended_at REAL NOT NULL,
        expires_at REAL NOT NULL, instance_id TEXT NOT NULL, version INTEGER NOT NULL,
        state TEXT, state_version INTEGER NOT NULL, PRIMARY KEY (saga, key)) WITHOUT ROWID"""
    )
    conn.execute("CREATE INDEX tombstones_expiry ON tombstones (expires_at)")


def _add_associations(conn: sqlite3.Connection) -> None:
    """Version 6: associations, the other ways than its key to find an instance.

    The primary key answers "which instances have this value" (routing an event via an
    association); the second index "which associations has this instance" (deleting
    them with it, showing them).
    """
    conn.execute(
        """CREATE TABLE associations (
        saga TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, key TEXT NOT NULL,
        PRIMARY KEY (saga, name, value, key)) WITHOUT ROWID"""
    )
    conn.execute("CREATE INDEX associations_instance ON associations (saga, key)")


# `_MIGRATIONS[n - 1]` turns schema version n into n + 1, inside the opening transaction.
_MIGRATIONS: tuple[_Migration, ...] = (
    _index_unusual_statuses,
    _record_versions,
    _carry_traces,
    _add_tombstones,
    _add_associations,
)
SCHEMA_VERSION = 1 + len(_MIGRATIONS)
"""The schema version this sagaflow writes."""


def _names(cls: type[attrs.AttrsInstance]) -> tuple[str, ...]:
    return tuple(field.name for field in attrs.fields(cls))


# Columns are named after the records' attributes (a new attribute needs a migration).
_INSTANCE = _names(InstanceRecord)
_OUTBOX = _names(OutboxRecord)
_SCHEDULE = _names(ScheduleRecord)
_DEAD = _names(DeadLetter)
_MARK = _names(DedupMark)
_ASSOCIATION = _names(Association)
_TOMBSTONE = _names(Tombstone)
_CHUNK = 300  # keys per lookup query: 3 * 300 variables stay under SQLite's old 999 limit
_PURGE = 256  # expired marks removed per commit, plus twice the marks the commit adds
_SHORT = 4096  # rows of a load or commit that may run on the event loop's thread
_CHECKPOINT_ROWS = 8192  # rows changed on the loop's thread between checkpoints
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _columns(names: Sequence[str]) -> str:
    return ", ".join(names)


def _insert(table: str, names: Sequence[str]) -> str:
    marks = ", ".join("?" * len(names))
    return f"INSERT OR REPLACE INTO {table} ({_columns(names)}) VALUES ({marks})"


def _upsert(table: str, names: Sequence[str], key: Sequence[str]) -> str:
    """Insert, or update the row with the same `key` in place (cheaper than a REPLACE,
    which deletes the row and inserts it again)."""
    updates = ", ".join(f"{name} = excluded.{name}" for name in names if name not in key)
    return (
        f"INSERT INTO {table} ({_columns(names)}) VALUES ({', '.join('?' * len(names))}) "
        f"ON CONFLICT ({_columns(key)}) DO UPDATE SET {updates}"
    )


_get_instance = attrgetter(*_INSTANCE)
_get_tombstone = attrgetter(*_TOMBSTONE)
_DELETE_INSTANCE = "DELETE FROM instances WHERE saga = ? AND key = ?"
_PUT_INSTANCE = _upsert("instances", _INSTANCE, ("saga", "key"))
_PUT_TOMBSTONE = _insert("tombstones", _TOMBSTONE)
_STATEMENTS: tuple[tuple[str, str, Callable[[Any], tuple[Any, ...]]], ...] = (
    # (Changes attribute, statement, parameters of one item), in the documented order.
    ("deletes", _DELETE_INSTANCE, attrgetter("saga", "key")),
    ("deletes", "DELETE FROM schedules WHERE saga = ? AND key = ?", attrgetter("saga", "key")),
    ("deletes", "DELETE FROM outbox WHERE saga = ? AND key = ?", attrgetter("saga", "key")),
    ("deletes", "DELETE FROM associations WHERE saga = ? AND key = ?", attrgetter("saga", "key")),
    ("writes", _PUT_INSTANCE, lambda w: _get_instance(w.record)),
    (
        "association_deletes",
        "DELETE FROM associations WHERE saga = ? AND name = ? AND value = ? AND key = ?",
        attrgetter(*_ASSOCIATION),
    ),
    (
        "association_puts",
        f"INSERT OR IGNORE INTO associations ({_columns(_ASSOCIATION)}) VALUES (?, ?, ?, ?)",
        attrgetter(*_ASSOCIATION),
    ),
    ("tombstone_deletes", "DELETE FROM tombstones WHERE saga = ? AND key = ?", tuple),
    ("tombstones", _PUT_TOMBSTONE, lambda t: _get_tombstone(t.tombstone)),
    ("schedule_clears", "DELETE FROM schedules WHERE saga = ? AND key = ?", tuple),
    (
        "schedule_deletes",
        "DELETE FROM schedules WHERE saga = ? AND key = ? AND name = ?",
        attrgetter("saga", "key", "name"),
    ),
    ("schedule_puts", _insert("schedules", _SCHEDULE), attrgetter(*_SCHEDULE)),
    ("outbox_deletes", "DELETE FROM outbox WHERE id = ?", lambda i: (i,)),
    ("outbox_adds", _insert("outbox", _OUTBOX), attrgetter(*_OUTBOX)),
    (
        "outbox_updates",
        "UPDATE outbox SET attempts = ?, due = ?, error = ? WHERE id = ?",
        attrgetter("attempts", "due", "error", "id"),
    ),
    ("dead_letter_deletes", "DELETE FROM dead_letters WHERE id = ?", lambda i: (i,)),
    ("dead_letters", _insert("dead_letters", _DEAD), attrgetter(*_DEAD)),
    ("marks", _insert("marks", _MARK), attrgetter(*_MARK)),
)


def _update(table: str, names: Sequence[str]) -> tuple[str, Callable[[Any], tuple[Any, ...]]]:
    """An update of the row of `table` with a record's key at an expected version (the
    last parameter), and the other parameters of a record for it."""
    values = [name for name in names if name not in ("saga", "key")]
    sql = f"UPDATE {table} SET {', '.join(f'{name} = ?' for name in values)} "
    return sql + "WHERE saga = ? AND key = ? AND version = ?", attrgetter(*values, "saga", "key")


_UPDATE_INSTANCE, _get_update_instance = _update("instances", _INSTANCE)
_UPDATE_TOMBSTONE, _get_update_tombstone = _update("tombstones", _TOMBSTONE)
_INSERT_INSTANCE = _insert("instances", _INSTANCE).replace(" OR REPLACE", "")
_INSERT_INSTANCE += " ON CONFLICT DO NOTHING"
_DELETE_VERSION = "DELETE FROM instances WHERE saga = ? AND key = ? AND version = ?"
_UNCHECKED = -1
# A version-checked statement of one item: (statement, parameters, rows it changes
# unless the version differs, or `_UNCHECKED`).
_Checked = tuple[str, tuple[Any, ...], int]


def _checked_delete(d: InstanceDelete) -> _Checked:
    if d.expected_version:
        return _DELETE_VERSION, (d.saga, d.key, d.expected_version), 1
    # Expected to be absent: a row deleted all the same is a conflict.
    return _DELETE_INSTANCE, (d.saga, d.key), 0


def _checked_write(w: InstanceWrite) -> _Checked:
    if w.expected_version:
        return _UPDATE_INSTANCE, (*_get_update_instance(w.record), w.expected_version), 1
    return _INSERT_INSTANCE, _get_instance(w.record), 1  # a new incarnation: absent


def _checked_tombstone(t: TombstoneWrite) -> _Checked:
    if t.expected_version:
        return _UPDATE_TOMBSTONE, (*_get_update_tombstone(t.tombstone), t.expected_version), 1
    return _PUT_TOMBSTONE, _get_tombstone(t.tombstone), _UNCHECKED


# The statements of `_STATEMENTS` that check versions, by what checks them instead.
_CHECKS: dict[str, Callable[[Any], _Checked]] = {
    _DELETE_INSTANCE: _checked_delete,
    _PUT_INSTANCE: _checked_write,
    _PUT_TOMBSTONE: _checked_tombstone,
}


def _size(changes: Changes) -> int:
    """How many rows `changes` writes, about."""
    return sum(len(getattr(changes, attribute)) for attribute in _ATTRIBUTES)


_ATTRIBUTES = tuple(attrs.fields_dict(Changes))


def _fspath(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


@attrs.define(eq=False)
class SQLiteStore:
    """The embedded durable store: one SQLite file in WAL mode, nothing to install.

    By default a commit is on disk (`synchronous=FULL`) when `commit()` returns. The store uses one
    connection, from worker threads (`anyio.to_thread`), one call at a time, so it works
    on asyncio and trio alike (see `inline` for the exception). Several processes may
    open the same file; SQLite's locks and the instances' versions keep them apart.

    Args:
        path: The database file; it is created with the schema if it does not exist.
        busy_timeout: Seconds to wait for another connection's write lock before a call
            fails with `StoreError`.
        power_safe: `True` (the default): every commit is flushed to the disk before
            `commit()` returns (`synchronous=FULL`), so it survives a power loss.
            `False` (`synchronous=NORMAL`): a commit survives a crash of the process,
            `kill -9` included, but the last commits before a power loss or an
            operating-system crash may be lost; commits cost no disk flush each.
        migrate: `True` (the default): `open` creates the file and its schema, or
            migrates an older schema. `False`: `open` changes nothing on disk; the file
            must exist at this sagaflow's schema version (read-only tools such as
            `sagaflow check` open a store so).
        create: Also turn an existing empty (0-byte) file into a store. By default such
            a file is refused, since it is more likely a failed copy or a wrong path
            than a store to start afresh; a missing file is always created (with
            `migrate=True`). A SQLite database holding tables sagaflow did not create is
            always refused.
        inline: With `power_safe=False`, `True` (the default) runs loads and commits of
            up to a few thousand rows on the event loop's thread: each saves a thread's
            round trip (the orders benchmark handles a tenth to a fifth more events per
            second) but holds the loop while it runs (a commit of a batch of 256 events:
            3 to 8 ms), so other tasks on the loop wait longer. Checkpoints, waits for
            another process's lock and every other call still run in a worker thread.
            `False` runs every call in a worker thread, for applications whose other
            tasks must not wait that long. With `power_safe=True` every call runs in a
            worker thread.
    """

    _path: str = attrs.field(converter=_fspath)
    _busy_timeout: float = attrs.field(default=5.0, kw_only=True)
    _power_safe: bool = attrs.field(default=True, kw_only=True)
    _migrates: bool = attrs.field(default=True, kw_only=True, alias="migrate")
    _create: bool = attrs.field(default=False, kw_only=True, alias="create")
    _inline: bool = attrs.field(default=True, kw_only=True)
    _was_empty: bool = attrs.field(default=False, init=False, repr=False)
    _conn: sqlite3.Connection | None = attrs.field(default=None, init=False, repr=False)
    _limiter: anyio.CapacityLimiter | None = attrs.field(default=None, init=False, repr=False)
    _now: float | None = attrs.field(default=None, init=False, repr=False)
    _on_loop: bool = attrs.field(default=False, init=False, repr=False)
    _unchecked: int = attrs.field(default=0, init=False, repr=False)

    def __repr__(self) -> str:
        return (
            f"SQLiteStore({self._path!r}, busy_timeout={self._busy_timeout!r}, "
            f"power_safe={self._power_safe!r})"
        )

    async def open(self) -> None:
        """Open the file, then create the schema or migrate it to this version.

        Raises:
            SchemaVersionError: The file was written by a newer sagaflow, or (with
                `migrate=False`) by an older one.
            StoreError: The file cannot be opened or is not a sagaflow SQLite database.
        """
        if self._conn is not None:
            raise StoreError(f"SQLite store {self._path!r} is already open")
        limiter = anyio.CapacityLimiter(1)
        with anyio.CancelScope(shield=True):  # a connection made must not be lost
            self._conn = await anyio.to_thread.run_sync(self._connect, limiter=limiter)
        self._limiter = limiter

    async def close(self) -> None:
        """Close the connection; a closed store may be opened again."""
        conn, limiter = self._conn, self._limiter
        self._conn = self._limiter = None
        if conn is not None and limiter is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(conn.close, limiter=limiter)

    async def load(self, request: LoadRequest) -> Loaded:
        """Read instances, unexpired dedup marks and pending schedule ids in one go."""
        self._now = request.now if self._now is None else max(self._now, request.now)
        short = len(request.instances) + len(request.marks) + len(request.schedule_ids)
        if short <= _SHORT:
            return await self._run_short(_load, request)
        return await self._run(_load, request)

    async def commit(self, changes: Changes) -> None:
        """Apply `changes` in one durable transaction (all or nothing).

        Raises:
            ConflictError: An `expected_version` did not match; nothing was applied.
            StoreError: SQLite failed (disk full, lock timeout, ...); nothing was applied.
        """
        if not changes:
            await anyio.lowlevel.checkpoint()
            return
        if _size(changes) <= _SHORT:
            await self._run_short(_commit, changes, self._now)
        else:
            await self._run(_commit, changes, self._now)

    async def next_due(self, *, sagas: Collection[str] | None = None) -> float | None:
        """The earliest due time of any pending schedule (of `sagas`, if given), or `None`."""
        among, args = _among(sagas)
        sql = f"SELECT min(due) FROM schedules{' WHERE ' + among if among else ''}"
        rows = await self._run(_fetch, sql, args)
        due: float | None = rows[0][0]
        return due

    async def due_schedules(
        self, now: float, limit: int, *, sagas: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        """Up to `limit` schedules (of `sagas`, if given) due at or before `now`,
        earliest first."""
        among, args = _among(sagas)
        sql = f"SELECT {_columns(_SCHEDULE)} FROM schedules WHERE due <= ? "
        sql += f"{'AND ' + among if among else ''} ORDER BY due, seq, id LIMIT ?"
        rows = await self._run(_fetch, sql, (now, *args, limit))
        return [_schedule(row) for row in rows]

    async def saga_names(self) -> set[str]:
        """The names of the sagas that have instances, schedules or outbox rows."""
        return await self._run(_saga_names)

    async def rename_saga(self, old: str, new: str) -> int:
        """Move the rows of saga `old` to `new`, except keys `new` already has."""
        return await self._run(_rename_saga, old, new)

    async def list_instances(
        self, *, saga: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[InstanceRecord]:
        """Instances, optionally of one saga or status, ordered by saga and key."""
        where, args = _where(saga=saga, status=status)
        if status is not None and status != ACTIVE:
            where += f" AND status != '{ACTIVE}'"  # the same term as the index: it is used
        sql = f"SELECT {_columns(_INSTANCE)} FROM instances{where} ORDER BY saga, key LIMIT ?"
        rows = await self._run(_fetch, sql, (*args, -1 if limit is None else limit))
        return [_instance(row) for row in rows]

    async def list_outbox(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[OutboxRecord]:
        """Pending outbox rows, ordered by saga, key and seq."""
        where, args = _where(saga=saga, key=key)
        sql = f"SELECT {_columns(_OUTBOX)} FROM outbox{where} ORDER BY saga, key, seq, id"
        rows = await self._run(_fetch, sql, args)
        return [OutboxRecord(**dict(zip(_OUTBOX, row, strict=True))) for row in rows]

    async def pending_commands(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[PendingCommand]:
        """Up to `limit` outbox rows of the instances after `after`, by instance and seq,
        with their instances' statuses (one walk of the `outbox_order` index)."""
        among, args = _among(sagas)
        terms = [among.replace("saga IN", "o.saga IN")] if among else []
        if after is not None:
            terms.append("(o.saga, o.key) > (?, ?)")
            args = (*args, *after)
        where = f" WHERE {' AND '.join(terms)}" if terms else ""
        sql = (
            f"SELECT {', '.join('o.' + c for c in _OUTBOX)}, i.status FROM outbox o "
            f"LEFT JOIN instances i ON i.saga = o.saga AND i.key = o.key{where} "
            "ORDER BY o.saga, o.key, o.seq LIMIT ?"
        )
        rows = await self._run(_fetch, sql, (*args, limit))
        return [PendingCommand(OutboxRecord(*row[:-1]), row[-1]) for row in rows]

    async def drained_instances(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[tuple[str, str]]:
        """Up to `limit` completing instances without outbox rows, by saga and key."""
        among, args = _among(sagas)
        terms = [among.replace("saga IN", "i.saga IN")] if among else []
        if after is not None:
            terms.append("(i.saga, i.key) > (?, ?)")
            args = (*args, *after)
        # `status != active` as well: the term of the partial index, so it is used.
        sql = (
            "SELECT i.saga, i.key FROM instances i WHERE i.status = ? "
            f"AND i.status != '{ACTIVE}' {''.join(' AND ' + t for t in terms)} AND NOT EXISTS "
            "(SELECT 1 FROM outbox o WHERE o.saga = i.saga AND o.key = i.key) "
            "ORDER BY i.saga, i.key LIMIT ?"
        )
        rows = await self._run(_fetch, sql, (COMPLETING, *args, limit))
        return [(saga, key) for saga, key in rows]

    async def scan_instances(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[InstanceRecord]:
        """Up to `limit` instances ordered by `(saga, key)`, those after `after` only."""
        rows = await self._run(
            _fetch, *_scan("instances", _INSTANCE, ("saga", "key"), after, limit)
        )
        return [_instance(row) for row in rows]

    async def scan_outbox(self, *, after: str | None = None, limit: int) -> list[OutboxRecord]:
        """Up to `limit` outbox rows ordered by id, those after `after` only."""
        key = None if after is None else (after,)
        rows = await self._run(_fetch, *_scan("outbox", _OUTBOX, ("id",), key, limit))
        return [OutboxRecord(**dict(zip(_OUTBOX, row, strict=True))) for row in rows]

    async def scan_schedules(
        self, *, after: tuple[str, str, str] | None = None, limit: int
    ) -> list[ScheduleRecord]:
        """Up to `limit` schedules ordered by `(saga, key, name)`, those after `after` only."""
        scan = _scan("schedules", _SCHEDULE, ("saga", "key", "name"), after, limit)
        return [_schedule(row) for row in await self._run(_fetch, *scan)]

    async def scan_dead_letters(self, *, after: str | None = None, limit: int) -> list[DeadLetter]:
        """Up to `limit` dead letters ordered by id, those after `after` only."""
        key = None if after is None else (after,)
        rows = await self._run(_fetch, *_scan("dead_letters", _DEAD, ("id",), key, limit))
        return [DeadLetter(**dict(zip(_DEAD, row, strict=True))) for row in rows]

    async def list_schedules(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[ScheduleRecord]:
        """Pending schedules, ordered by due time, then seq."""
        where, args = _where(saga=saga, key=key)
        sql = f"SELECT {_columns(_SCHEDULE)} FROM schedules{where} ORDER BY due, seq, id"
        return [_schedule(row) for row in await self._run(_fetch, sql, args)]

    async def find_associated(
        self, saga: str, name: str, values: Sequence[str]
    ) -> dict[str, list[str]]:
        """The keys of the instances of `saga` associated with each of `values`."""
        if not values:
            await anyio.lowlevel.checkpoint()
            return {}
        return await self._run(_find_associated, saga, name, values)

    async def list_associations(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Association]:
        """Associations, optionally of one saga or instance, ordered by saga, key, name
        and value."""
        where, args = _where(saga=saga, key=key)
        sql = f"SELECT {_columns(_ASSOCIATION)} FROM associations{where} "
        sql += "ORDER BY saga, key, name, value"
        return [Association(*row) for row in await self._run(_fetch, sql, args)]

    async def list_dead_letters(self, *, saga: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        where, args = _where(saga=saga)
        sql = f"SELECT {_columns(_DEAD)} FROM dead_letters{where} ORDER BY failed_at, id"
        rows = await self._run(_fetch, sql, args)
        return [DeadLetter(**dict(zip(_DEAD, row, strict=True))) for row in rows]

    async def scan_tombstones(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[Tombstone]:
        """Up to `limit` tombstones ordered by `(saga, key)`, those after `after` only."""
        scan = _scan("tombstones", _TOMBSTONE, ("saga", "key"), after, limit)
        return [Tombstone(*row) for row in await self._run(_fetch, *scan)]

    async def list_tombstones(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Tombstone]:
        """Tombstones, optionally of one saga or key, ordered by saga and key."""
        where, args = _where(saga=saga, key=key)
        sql = f"SELECT {_columns(_TOMBSTONE)} FROM tombstones{where} ORDER BY saga, key"
        return [Tombstone(*row) for row in await self._run(_fetch, sql, args)]

    async def count_rows(self, *, now: float) -> RowCounts:
        """How many rows of each kind the store holds (see `Store.count_rows`)."""
        return await self._run(_count_rows, now)

    async def _run(self, fn: Callable[[sqlite3.Connection, *_Ts], _T], *args: *_Ts) -> _T:
        """Run `fn(connection, *args)` in a worker thread, one call at a time."""
        conn, limiter = self._conn, self._limiter
        if conn is None or limiter is None:
            raise StoreError(f"SQLite store {self._path!r} is not open; call open() first")
        try:
            if not self._on_loop:
                return await anyio.to_thread.run_sync(fn, conn, *args, limiter=limiter)
            return await anyio.to_thread.run_sync(self._patiently, fn, conn, *args, limiter=limiter)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self._path!r} failed: {exc}") from exc

    def _patiently(
        self, fn: Callable[[sqlite3.Connection, *_Ts], _T], conn: sqlite3.Connection, *args: *_Ts
    ) -> _T:
        """`fn(conn, *args)` in a worker thread of a store that runs short calls on the
        loop's thread: waiting for other connections' locks, then checkpointing if due."""
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        try:
            before = conn.total_changes
            result = fn(conn, *args)
            self._unchecked += conn.total_changes - before
            if self._unchecked >= _CHECKPOINT_ROWS:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self._unchecked = 0
            return result
        finally:
            conn.execute("PRAGMA busy_timeout = 0")

    async def _run_short(self, fn: Callable[[sqlite3.Connection, *_Ts], _T], *args: *_Ts) -> _T:
        """Run `fn(connection, *args)`, a short call, on the event loop's thread unless
        another connection holds a lock it needs or a checkpoint is due (then in a
        worker thread, as `_run` does).

        On the loop's thread, a commit writes to the operating system's cache and does
        not wait for the disk (`synchronous=NORMAL` in WAL mode flushes in checkpoints
        only), nor for another connection (a zero busy timeout): it is shorter than a
        thread's round trip.
        """
        conn, limiter = self._conn, self._limiter
        if not self._on_loop or conn is None or limiter is None:
            return await self._run(fn, *args)
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            await limiter.acquire()  # a worker thread has the connection: wait for it
        try:
            if self._unchecked < _CHECKPOINT_ROWS:
                before = conn.total_changes
                try:
                    result = fn(conn, *args)
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode & 0xFF not in _BUSY:
                        raise StoreError(f"SQLite store {self._path!r} failed: {exc}") from exc
                    # Another connection holds a lock: wait for it in a thread.
                except sqlite3.Error as exc:
                    raise StoreError(f"SQLite store {self._path!r} failed: {exc}") from exc
                else:
                    self._unchecked += conn.total_changes - before
                    return result
            with anyio.CancelScope(shield=True):  # as `anyio.to_thread` does it
                result = await anyio.to_thread.run_sync(self._patiently, fn, conn, *args)
            return result
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self._path!r} failed: {exc}") from exc
        finally:
            limiter.release()
            await anyio.lowlevel.cancel_shielded_checkpoint()

    def _connect(self) -> sqlite3.Connection:
        if self._migrates and self._path != ":memory:" and not os.path.exists(self._path):
            self._create_atomically()
        # Without migrating, nothing may be created either: not even an empty file.
        path = self._path
        self._was_empty = os.path.isfile(path) and os.path.getsize(path) == 0
        if not self._migrates:
            path = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
        try:
            conn = sqlite3.connect(
                path,
                uri=not self._migrates,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self._path!r}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._power_safe else 'NORMAL'}")
            if self._migrates:
                conn.execute("PRAGMA journal_mode = WAL")  # kept in the file from then on
                _transaction(conn, self._migrate)
            else:
                self._require_current(conn)
            self._on_loop = self._inline and not self._power_safe
            if self._on_loop:  # a checkpoint or a wait would block the loop: threads do them
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(
                f"cannot open SQLite store {self._path!r}: {exc}; "
                "is it a SQLite database written by sagaflow?"
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_atomically(self) -> None:
        """Create a new store file with its schema, all at once.

        The schema is written into a file beside it, which then takes the store's name:
        a process killed while creating a store leaves no file (or an empty one that
        would be refused) behind, only a stray `.creating-<pid>` file that the next
        creation removes.
        """
        directory, name = os.path.split(os.path.abspath(self._path))
        if not os.path.isdir(directory):
            return  # opening it says so
        prefix = f"{name}.creating-"
        for stray in os.listdir(directory or "."):
            pid = stray[len(prefix) :]
            if stray.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, stray))
        creating = os.path.join(directory, f"{prefix}{os.getpid()}")
        try:
            conn = sqlite3.connect(creating, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                self._was_empty = False
                _transaction(conn, self._migrate)
            finally:
                conn.close()  # the last connection: SQLite folds the WAL into the file
            os.link(creating, self._path)  # fails if another process created it first
        except FileExistsError:
            pass  # it did: open theirs
        except sqlite3.Error as exc:
            raise StoreError(f"cannot create SQLite store {self._path!r}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(creating)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new file, or bring an older one up to date."""
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if has_meta is None:
            tables = _scalar(conn, "SELECT count(*) FROM sqlite_master WHERE type = 'table'")
            if tables:
                raise StoreError(
                    f"SQLite file {self._path!r} holds {tables} table(s) that sagaflow did "
                    "not create; give sagaflow a file of its own"
                )
            if self._was_empty and not self._create:
                raise StoreError(
                    f"SQLite file {self._path!r} is empty (0 bytes), so it holds no sagaflow "
                    "store: check the path (or restore the copy it should be); to start a new "
                    "store in it, pass SQLiteStore(..., create=True) or delete the file"
                )
            for statement in _SCHEMA_V1:
                conn.execute(statement)
            conn.execute("INSERT INTO meta (name, value) VALUES ('schema_version', '1')")
        value = _scalar(conn, "SELECT value FROM meta WHERE name = 'schema_version'")
        try:
            found = int(value)
        except (TypeError, ValueError):
            raise StoreError(
                f"SQLite store {self._path!r} has no valid schema version ({value!r} in its "
                "meta table); it was not written by sagaflow"
            ) from None
        if not 1 <= found <= SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SQLite store {self._path!r} has schema version {found}, but this sagaflow "
                f"supports versions 1 to {SCHEMA_VERSION}; open it with the sagaflow that "
                "wrote it, or a newer one",
                found=found,
                supported=SCHEMA_VERSION,
            )
        for step in _MIGRATIONS[found - 1 :]:
            step(conn)
        if found != SCHEMA_VERSION:
            conn.execute(
                "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION),)
            )

    def _require_current(self, conn: sqlite3.Connection) -> None:
        """Check, changing nothing, that the file is a store at this schema version."""
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if has_meta is None:
            raise StoreError(
                f"SQLite store {self._path!r} is not a sagaflow store (it has no meta table); "
                "it was opened with migrate=False, so nothing was created"
            )
        value = _scalar(conn, "SELECT value FROM meta WHERE name = 'schema_version'")
        found = int(value) if str(value).isdigit() else -1
        if found != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SQLite store {self._path!r} has schema version {found}, but this sagaflow "
                f"reads version {SCHEMA_VERSION} without migrating (migrate=False); "
                + (
                    "open it with the sagaflow that wrote it, or a newer one"
                    if found > SCHEMA_VERSION
                    else "work on a copy of the file, which opening with migrate=True "
                    "migrates (the sagaflow that wrote it cannot open a migrated file)"
                ),
                found=found,
                supported=SCHEMA_VERSION,
            )


def _transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], None]) -> None:
    """Run `body` in a write transaction; roll back if anything (even COMMIT) fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        body(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class _Missed(Exception):
    """A version-checked write changed other rows than it does at the expected versions."""


def _commit(conn: sqlite3.Connection, changes: Changes, now: float | None) -> None:
    """Apply `changes` in one transaction, its writes checking the versions themselves.

    A write at an expected version is an `UPDATE ... WHERE version = ?`, of a new
    incarnation an insert of an absent row, so the usual commit reads nothing first.
    Only when one misses is the transaction rolled back and the commit run again the
    slow way: the versions are read first, which names the conflicts.
    """
    try:
        _transaction(conn, lambda conn: _apply(conn, changes, now, checked=True))
    except _Missed:
        _transaction(conn, lambda conn: _apply(conn, changes, now, checked=False))


def _apply(conn: sqlite3.Connection, changes: Changes, now: float | None, *, checked: bool) -> None:
    """Write `changes`; `checked`: the writes check the versions (`_Missed` if one does
    not match), else the versions are read first (`ConflictError` names the misses)."""
    if not checked and (conflicts := _conflicts(conn, changes)):
        raise ConflictError(conflicts)
    for attribute, sql, params in _STATEMENTS:
        items: Sequence[Any] = getattr(changes, attribute)
        if not items:
            continue
        check = _CHECKS.get(sql) if checked else None
        if check is None:
            conn.executemany(sql, map(params, items))
            continue
        # Runs of one statement in the given order: each sees the rows of the last.
        for (statement, rows), run in groupby(map(check, items), itemgetter(0, 2)):
            args = [args for _, args, _ in run]
            changed = conn.executemany(statement, args).rowcount
            if rows != _UNCHECKED and changed != rows * len(args):
                raise _Missed
    if now is not None:
        # Expired marks never count again: drop some, at least as fast as they come.
        conn.execute(
            "DELETE FROM marks WHERE (saga, key, event_id) IN (SELECT saga, key, event_id "
            "FROM marks WHERE expires_at < ? LIMIT ?)",
            (now, _PURGE + 2 * len(changes.marks)),
        )
        if changes.tombstones:  # the same for tombstones, when some come
            conn.execute(
                "DELETE FROM tombstones WHERE (saga, key) IN (SELECT saga, key "
                "FROM tombstones WHERE expires_at < ? LIMIT ?)",
                (now, _PURGE + 2 * len(changes.tombstones)),
            )


def _conflicts(conn: sqlite3.Connection, changes: Changes) -> list[_Ref]:
    """The instances whose expected version does not match, in the order applied.

    Deletes apply before writes, so a write after a delete of the same instance expects
    version 0 (a new incarnation).
    """
    checks = [((d.saga, d.key), d.expected_version, 0) for d in changes.deletes]
    checks += [
        ((w.record.saga, w.record.key), w.expected_version, w.record.version)
        for w in changes.writes
    ]
    refs = list(dict.fromkeys(ref for ref, _, _ in checks))
    sql = "SELECT i.saga, i.key, i.version FROM {values} CROSS JOIN instances AS i "
    sql += "ON i.saga = v.column1 AND i.key = v.column2"
    versions: dict[_Ref, int] = {(s, k): v for s, k, v in _lookup(conn, sql, refs)}
    conflicts: dict[_Ref, None] = {}
    for ref, expected, after in checks:
        if versions.get(ref, 0) != expected:
            conflicts[ref] = None
        versions[ref] = after
    updates = [t for t in changes.tombstones if t.expected_version]
    if updates:
        gone = set(changes.tombstone_deletes)
        refs = list(dict.fromkeys((t.tombstone.saga, t.tombstone.key) for t in updates))
        sql = "SELECT t.saga, t.key, t.version FROM {values} CROSS JOIN tombstones AS t "
        sql += "ON t.saga = v.column1 AND t.key = v.column2"
        stored = {(s, k): v for s, k, v in _lookup(conn, sql, refs)}
        for t in updates:
            ref = (t.tombstone.saga, t.tombstone.key)
            if ref in gone or stored.get(ref) != t.expected_version:
                conflicts[ref] = None
    return list(conflicts)


def _load(conn: sqlite3.Connection, request: LoadRequest) -> Loaded:
    conn.execute("BEGIN")  # one snapshot for the three reads
    try:
        sql = f"SELECT {_columns(_INSTANCE)} FROM {{values}} CROSS JOIN instances AS i "
        sql += "ON i.saga = v.column1 AND i.key = v.column2"
        refs = list(dict.fromkeys(request.instances))
        instances = {(r.saga, r.key): r for r in map(_instance, _lookup(conn, sql, refs))}
        tombstones: dict[_Ref, Tombstone] = {}
        if len(instances) < len(refs):
            sql = f"SELECT {_columns(_TOMBSTONE)} FROM {{values}} CROSS JOIN tombstones AS t "
            sql += "ON t.saga = v.column1 AND t.key = v.column2 WHERE t.expires_at >= ?"
            missing = [ref for ref in refs if ref not in instances]
            for row in _lookup(conn, sql, missing, request.now):
                tombstones[(row[0], row[1])] = Tombstone(*row)
        sql = "SELECT m.saga, m.key, m.event_id FROM {values} CROSS JOIN marks AS m "
        sql += "ON m.saga = v.column1 AND m.key = v.column2 AND m.event_id = v.column3 "
        sql += "WHERE m.expires_at >= ?"
        marks = set(_lookup(conn, sql, list(dict.fromkeys(request.marks)), request.now))
        sql = "SELECT s.id FROM {values} CROSS JOIN schedules AS s ON s.id = v.column1"
        ids = [(i,) for i in dict.fromkeys(request.schedule_ids)]
        schedule_ids = {row[0] for row in _lookup(conn, sql, ids)}
    finally:
        conn.execute("COMMIT")
    return Loaded(
        instances=instances, marks=marks, schedule_ids=schedule_ids, tombstones=tombstones
    )


def _count_rows(conn: sqlite3.Connection, now: float) -> RowCounts:
    conn.execute("BEGIN")  # one snapshot for the counts
    try:
        statuses = dict(conn.execute("SELECT status, count(*) FROM instances GROUP BY status"))
        outbox = _scalar(conn, "SELECT count(*) FROM outbox")
        schedules = _scalar(conn, "SELECT count(*) FROM schedules")
        due = conn.execute("SELECT count(*) FROM schedules WHERE due <= ?", (now,)).fetchone()[0]
        dead = _scalar(conn, "SELECT count(*) FROM dead_letters")
    finally:
        conn.execute("COMMIT")
    return row_counts(statuses, outbox, schedules, due, dead)


def _find_associated(
    conn: sqlite3.Connection, saga: str, name: str, values: Sequence[str]
) -> dict[str, list[str]]:
    # The values drive the join, so each is one seek in the primary key's b-tree.
    sql = "SELECT a.value, a.key FROM {values} CROSS JOIN associations AS a "
    sql += "ON a.saga = ? AND a.name = ? AND a.value = v.column1"
    found: dict[str, list[str]] = {}
    keys = [(value,) for value in dict.fromkeys(values)]
    conn.execute("BEGIN")  # one snapshot, however many chunks
    try:
        for value, key in _lookup(conn, sql, keys, saga, name):
            found.setdefault(value, []).append(key)
    finally:
        conn.execute("COMMIT")
    return {value: sorted(keys) for value, keys in found.items()}


def _lookup(
    conn: sqlite3.Connection, sql: str, keys: Sequence[tuple[Any, ...]], *extra: Any
) -> Iterator[Any]:
    """Rows of `sql` joined with `keys` as `v`, a few hundred keys per query."""
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        row = "(" + ", ".join("?" * len(chunk[0])) + ")"
        values = f"(VALUES {', '.join([row] * len(chunk))}) AS v"
        yield from conn.execute(
            sql.format(values=values), [*(k for key in chunk for k in key), *extra]
        )


def _among(sagas: Collection[str] | None) -> tuple[str, tuple[str, ...]]:
    """A `saga IN (...)` term for `sagas` (none at all: a term that is never true)."""
    if sagas is None:
        return "", ()
    names = tuple(sagas)
    return (f"saga IN ({', '.join('?' * len(names))})" if names else "0"), names


def _saga_names(conn: sqlite3.Connection) -> set[str]:
    # One index seek per saga name (a loose index scan), not a read of every row.
    names: set[str] = set()
    for table in ("instances", "schedules", "outbox"):
        found = conn.execute(f"SELECT min(saga) FROM {table}").fetchone()[0]
        while found is not None:
            names.add(found)
            sql = f"SELECT min(saga) FROM {table} WHERE saga > ?"
            found = conn.execute(sql, (found,)).fetchone()[0]
    return names


# Each moves the rows of saga ?1 to ?2 except the keys ?2 has an instance of (and rows
# whose primary key ?2 already holds); instances go last, so the test sees them unmoved.
_RENAMES = tuple(
    f"UPDATE {table} SET saga = ?2 WHERE saga = ?1 AND NOT EXISTS (SELECT 1 FROM "
    f"instances AS i WHERE i.saga = ?2 AND i.key = {table}.key){extra}"
    for table, extra in (
        (
            "schedules",
            " AND NOT EXISTS (SELECT 1 FROM schedules AS s WHERE s.saga = ?2 "
            "AND s.key = schedules.key AND s.name = schedules.name)",
        ),
        ("outbox", ""),
        ("dead_letters", ""),
        (
            "associations",
            " AND NOT EXISTS (SELECT 1 FROM associations AS a WHERE a.saga = ?2 "
            "AND a.name = associations.name AND a.value = associations.value "
            "AND a.key = associations.key)",
        ),
        (
            "marks",
            " AND NOT EXISTS (SELECT 1 FROM marks AS m WHERE m.saga = ?2 "
            "AND m.key = marks.key AND m.event_id = marks.event_id)",
        ),
        (
            "tombstones",
            " AND NOT EXISTS (SELECT 1 FROM tombstones AS t WHERE t.saga = ?2 "
            "AND t.key = tombstones.key)",
        ),
        ("instances", ""),
    )
)


def _rename_saga(conn: sqlite3.Connection, old: str, new: str) -> int:
    moved = 0

    def rename(conn: sqlite3.Connection) -> None:
        nonlocal moved
        for sql in _RENAMES:
            moved = conn.execute(sql, (old, new)).rowcount

    _transaction(conn, rename)
    return moved


def _fetch(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[Any]:
    return conn.execute(sql, args).fetchall()


def _scalar(conn: sqlite3.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    return None if row is None else row[0]


def _where(**filters: str | None) -> tuple[str, tuple[str, ...]]:
    """A `WHERE` clause matching the filters that are not `None`."""
    given = {column: value for column, value in filters.items() if value is not None}
    if not given:
        return "", ()
    return " WHERE " + " AND ".join(f"{c} = ?" for c in given), tuple(given.values())


def _scan(
    table: str,
    names: Sequence[str],
    key: Sequence[str],
    after: Sequence[str] | None,
    limit: int,
) -> tuple[str, tuple[Any, ...]]:
    """One page of `table` in primary-key order, after the key `after` (a row value
    comparison, which walks the primary key's b-tree from there)."""
    columns = _columns(key)
    where = "" if after is None else f" WHERE ({columns}) > ({', '.join('?' * len(key))})"
    sql = f"SELECT {_columns(names)} FROM {table}{where} ORDER BY {columns} LIMIT ?"
    return sql, (*(after or ()), limit)


def _instance(row: Sequence[Any]) -> InstanceRecord:
    # Columns in the order of the record's attributes; SQLite has no booleans.
    saga, key, version, status, state, instance_id, created, updated, last, completed, sv = row
    return InstanceRecord(
        saga, key, version, status, state, instance_id, created, updated, last, bool(completed), sv
    )


def _schedule(row: Sequence[Any]) -> ScheduleRecord:
    fields = dict(zip(_SCHEDULE, row, strict=True))
    fields["to_self"] = bool(fields["to_self"])
    return ScheduleRecord(**fields)


def _alive(pid: int) -> bool:
    """Whether a process with this id runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
