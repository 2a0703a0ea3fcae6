"""`PostgresStore`: the store protocol on PostgreSQL, so many processes can share it.

psycopg 3 is blocking here on purpose: every call runs in a worker thread
(`anyio.to_thread`) on a connection from a `psycopg_pool.ConnectionPool`, so the store
works on asyncio and trio alike. Each protocol method is one thread hop; `commit` is one
transaction of batched statements, one per kind of row.

The tables live in their own PostgreSQL schema (`sagaflow` unless told otherwise), created
or migrated by `open` under a transaction-level advisory lock, so several processes may
start at once. What cluster mode adds (the inbox, claims, LISTEN/NOTIFY) lives in
`_postgres_cluster.py`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs

from ..exceptions import ConflictError, SchemaVersionError, StoreError
from ._protocol import (
    COMPLETING,
    Association,
    Changes,
    DeadLetter,
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

try:
    import psycopg
    import psycopg.errors
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg.rows import TupleRow, class_row
    from psycopg_pool import ConnectionPool
except ImportError as exc:
    raise ImportError(
        "PostgresStore needs psycopg 3 and psycopg-pool, which come with sagaflow's "
        f"`postgres` extra: pip install 'sagaflow[postgres]' ({exc})"
    ) from exc

from ._postgres_cluster import CLUSTER_SQL, ClusterMethods, PostgresListener  # needs psycopg

__all__ = ["PostgresListener", "PostgresStore", "SCHEMA_VERSION", "redact_dsn"]

log = logging.getLogger("sagaflow.stores.postgres")

T = TypeVar("T")
_Ref = tuple[str, str]
_Pool = ConnectionPool[psycopg.Connection[TupleRow]]

# -- DSN redaction

_URL_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
# libpq keyword values: quoted with backslash escapes, or unquoted up to whitespace (a
# backslash escapes a space there too). An unterminated quote runs to the end.
_KEYWORD_PASSWORD = re.compile(
    r"\b((?:ssl)?password)\s*=\s*('(?:[^'\\]|\\.)*'?|(?:\\.|\S)*)", re.IGNORECASE | re.DOTALL
)
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password)=([^&]*)", re.IGNORECASE)
_MASK = "***"


def _redact(dsn: str) -> tuple[str, list[str]]:
    """`dsn` with its passwords masked, and the passwords (as written and decoded)."""
    secrets: list[str] = []
    scheme = _URL_SCHEME.match(dsn)
    if scheme is None:

        def mask(m: re.Match[str]) -> str:
            value = m.group(2)
            secrets.append(value)
            if value.startswith("'"):
                value = value[1:-1] if len(value) > 1 and value.endswith("'") else value[1:]
            secrets.append(re.sub(r"\\(.)", r"\1", value, flags=re.DOTALL))
            return f"{m.group(1)}={_MASK}"

        return _KEYWORD_PASSWORD.sub(mask, dsn), secrets

    start = scheme.end()
    rest = dsn[start:]
    # userinfo ends at the last "@" before the query, so an unencoded "@", "/" or ":" in
    # a password is masked too (at worst, more than the password is).
    query = rest.find("?")
    head = rest if query < 0 else rest[:query]
    at = head.rfind("@")
    if at >= 0 and (colon := head.find(":", 0, at)) >= 0:
        secrets.append(head[colon + 1 : at])
        rest = f"{rest[: colon + 1]}{_MASK}{rest[at:]}"

    def mask_query(m: re.Match[str]) -> str:
        secrets.append(m.group(2))
        return f"{m.group(1)}={_MASK}"

    rest = _QUERY_PASSWORD.sub(mask_query, rest)
    secrets.extend([urllib.parse.unquote(s) for s in secrets])
    return dsn[:start] + rest, secrets


def redact_dsn(dsn: str) -> str:
    """`dsn` with every password replaced by `***`, fit for logs, reprs and messages.

    Both forms libpq accepts are understood: URLs (`postgresql://user:secret@host/db`,
    `...?password=secret`) and keyword/value strings (`host=db password=secret`, quoted
    values included). `sslpassword` is masked as well.

    Args:
        dsn: A PostgreSQL connection string.

    Returns:
        The connection string with its passwords masked; the rest is unchanged.
    """
    return _redact(dsn)[0]


# -- schema

SCHEMA_VERSION = 6
"""The newest schema version this sagaflow writes; stored in the `meta` table."""

# Each step migrates from the version equal to its index to the next one. `{s}` is the
# quoted schema name. Text that identifies or orders rows is `COLLATE "C"`, so listings
# sort as Python sorts strings whatever the database's locale.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        'CREATE TABLE {s}.meta (key text COLLATE "C" PRIMARY KEY, value text NOT NULL)',
        """CREATE TABLE {s}.instances (
            saga text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            version bigint NOT NULL,
            status text NOT NULL,
            state text NOT NULL,
            instance_id text NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            last_event text,
            completed boolean NOT NULL DEFAULT false,
            PRIMARY KEY (saga, key)
        )""",
        "CREATE INDEX instances_status ON {s}.instances (status, saga, key)",
        """CREATE TABLE {s}.outbox (
            id text COLLATE "C" PRIMARY KEY,
            saga text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            seq bigint NOT NULL,
            kind text NOT NULL,
            type_name text NOT NULL,
            payload text NOT NULL,
            attempts integer NOT NULL,
            due double precision NOT NULL,
            error text,
            lease_owner text,
            lease_expires double precision
        )""",
        "CREATE INDEX outbox_instance ON {s}.outbox (saga, key, seq)",
        "CREATE INDEX outbox_due ON {s}.outbox (due)",
        """CREATE TABLE {s}.schedules (
            saga text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            name text COLLATE "C" NOT NULL,
            id text COLLATE "C" NOT NULL,
            due double precision NOT NULL,
            to_self boolean NOT NULL,
            type_name text NOT NULL,
            payload text NOT NULL,
            seq bigint NOT NULL,
            attempts integer NOT NULL,
            pos bigint GENERATED BY DEFAULT AS IDENTITY,
            lease_owner text,
            lease_expires double precision,
            PRIMARY KEY (saga, key, name)
        )""",
        "CREATE INDEX schedules_due ON {s}.schedules (due, seq)",
        "CREATE INDEX schedules_id ON {s}.schedules (id)",
        """CREATE TABLE {s}.dead_letters (
            id text COLLATE "C" PRIMARY KEY,
            saga text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            kind text NOT NULL,
            type_name text NOT NULL,
            payload text NOT NULL,
            error text NOT NULL,
            attempts integer NOT NULL,
            failed_at double precision NOT NULL,
            seq bigint NOT NULL,
            pos bigint GENERATED BY DEFAULT AS IDENTITY
        )""",
        "CREATE INDEX dead_letters_failed ON {s}.dead_letters (failed_at, pos)",
        """CREATE TABLE {s}.dedup_marks (
            saga text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            event_id text COLLATE "C" NOT NULL,
            expires_at double precision NOT NULL,
            PRIMARY KEY (saga, key, event_id)
        )""",
        "CREATE INDEX dedup_marks_expires ON {s}.dedup_marks (expires_at)",
    ),
    # 1 -> 2: cluster mode. The shared inbox, and outbox rows that failed for good stay
    # (leased, marked failed) until their instance has handled `CommandFailed`.
    (
        "ALTER TABLE {s}.outbox ADD COLUMN failed boolean NOT NULL DEFAULT false",
        """CREATE TABLE {s}.inbox (
            pos bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            saga text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            event_id text COLLATE "C" NOT NULL,
            generated boolean NOT NULL,
            type_name text NOT NULL,
            payload text NOT NULL,
            created_at double precision NOT NULL,
            lease_owner text,
            lease_expires double precision
        )""",
        "CREATE INDEX inbox_instance ON {s}.inbox (saga, key, pos)",
    ),
    # 2 -> 3: every state row records the saga state version it was written at, and the
    # dead letter of an undeliverable timer its schedule's name (to schedule it again).
    (
        "ALTER TABLE {s}.instances ADD COLUMN state_version integer NOT NULL DEFAULT 1",
        "ALTER TABLE {s}.dead_letters ADD COLUMN name text",
    ),
    # 3 -> 4: commands, schedules and inbox events keep the trace context they were
    # produced or published in (JSON text; NULL when the hooks capture no trace).
    (
        "ALTER TABLE {s}.outbox ADD COLUMN trace text",
        "ALTER TABLE {s}.schedules ADD COLUMN trace text",
        "ALTER TABLE {s}.inbox ADD COLUMN trace text",
    ),
    # 4 -> 5: finished instances leave a tombstone for a while (how and when they ended,
    # the final state for sagas with late handlers); expired ones are purged by expiry.
    (
        """CREATE TABLE {s}.tombstones (
            saga text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            ended text NOT NULL,
            ended_at double precision NOT NULL,
            expires_at double precision NOT NULL,
            instance_id text NOT NULL,
            version bigint NOT NULL,
            state text,
            state_version integer NOT NULL,
            PRIMARY KEY (saga, key)
        )""",
        "CREATE INDEX tombstones_expires ON {s}.tombstones (expires_at)",
    ),
    # 5 -> 6: associations, the other ways than its key to find an instance. The primary
    # key answers "which instances have this value" (routing), the second index "which
    # associations has this instance" (deleting them with it, showing them).
    (
        """CREATE TABLE {s}.associations (
            saga text COLLATE "C" NOT NULL,
            name text COLLATE "C" NOT NULL,
            value text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            PRIMARY KEY (saga, name, value, key)
        )""",
        "CREATE INDEX associations_instance ON {s}.associations (saga, key)",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_INSTANCE = (
    "saga, key, version, status, state, instance_id, created_at, updated_at, last_event, "
    "completed, state_version"
)
_OUTBOX = "id, saga, key, seq, kind, type_name, payload, attempts, due, error, trace"
_SCHEDULE = "id, saga, key, name, due, to_self, type_name, payload, seq, attempts, trace"
_DEAD = "id, saga, key, kind, type_name, payload, error, attempts, failed_at, seq, name"
_TOMBSTONE = "saga, key, ended, ended_at, expires_at, instance_id, version, state, state_version"
_TOMBSTONE_TYPES = (
    "%b::text[], %b::text[], %b::text[], %b::float8[], %b::float8[], %b::text[], "
    "%b::int8[], %b::text[], %b::int4[]"
)
_TEXTS2 = "unnest(%b::text[], %b::text[])"

# `{s}` is the quoted schema name; column lists are spliced in now.
_SQL = {
    "version": "SELECT value FROM {s}.meta WHERE key = 'schema_version'",
    "set_version": (
        "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', %s) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    ),
    # -- load
    # An instance, or else its unexpired tombstone, in one statement: the common case
    # (the instance exists) pays one more index probe, not one more round trip.
    "load_instances": (
        "SELECT r.saga, r.key, i.version, i.status, i.state, i.instance_id, i.created_at, "
        "i.updated_at, i.last_event, i.completed, i.state_version, t.ended, t.ended_at, "
        "t.expires_at, t.instance_id, t.version, t.state, t.state_version "
        f"FROM {_TEXTS2} AS r(saga, key) "
        "LEFT JOIN {s}.instances i ON i.saga = r.saga AND i.key = r.key "
        "LEFT JOIN {s}.tombstones t ON i.saga IS NULL AND t.saga = r.saga AND t.key = r.key "
        "AND t.expires_at >= %b::float8 "
        "WHERE i.saga IS NOT NULL OR t.saga IS NOT NULL"
    ),
    "load_marks": (
        "SELECT saga, key, event_id FROM {s}.dedup_marks "
        "JOIN unnest(%b::text[], %b::text[], %b::text[]) AS r(saga, key, event_id) "
        "USING (saga, key, event_id) WHERE expires_at >= %s"
    ),
    "load_schedule_ids": "SELECT DISTINCT id FROM {s}.schedules WHERE id = ANY(%b::text[])",
    "prune_marks": "DELETE FROM {s}.dedup_marks WHERE expires_at < %s",
    # -- commit: instances
    "delete_instances": (
        "DELETE FROM {s}.instances i "
        "USING unnest(%b::text[], %b::text[], %b::int8[]) AS d(saga, key, version) "
        "WHERE i.saga = d.saga AND i.key = d.key AND i.version = d.version "
        "RETURNING i.saga, i.key"
    ),
    "existing_instances": (
        f"SELECT saga, key FROM {{s}}.instances JOIN {_TEXTS2} AS r(saga, key) USING (saga, key)"
    ),
    "update_instances": (
        "UPDATE {s}.instances i SET version = w.version, status = w.status, state = w.state, "
        "instance_id = w.instance_id, created_at = w.created_at, updated_at = w.updated_at, "
        "last_event = w.last_event, completed = w.completed, state_version = w.state_version "
        "FROM unnest(%b::text[], %b::text[], %b::int8[], %b::int8[], %b::text[], %b::text[], "
        "%b::text[], %b::float8[], %b::float8[], %b::text[], %b::bool[], %b::int4[]) "
        "AS w(saga, key, expected, version, status, state, instance_id, created_at, "
        "updated_at, last_event, completed, state_version) "
        "WHERE i.saga = w.saga AND i.key = w.key AND i.version = w.expected "
        "RETURNING i.saga, i.key"
    ),
    "insert_instances": (
        f"INSERT INTO {{s}}.instances ({_INSTANCE}) "
        "SELECT * FROM unnest(%b::text[], %b::text[], %b::int8[], %b::text[], %b::text[], "
        "%b::text[], %b::float8[], %b::float8[], %b::text[], %b::bool[], %b::int4[]) "
        "ON CONFLICT (saga, key) DO NOTHING RETURNING saga, key"
    ),
    # -- commit: associations
    "clear_associations": (
        f"DELETE FROM {{s}}.associations t USING {_TEXTS2} AS c(saga, key) "
        "WHERE t.saga = c.saga AND t.key = c.key"
    ),
    "delete_associations": (
        "DELETE FROM {s}.associations t "
        "USING unnest(%b::text[], %b::text[], %b::text[], %b::text[]) AS d(saga, name, value, key) "
        "WHERE t.saga = d.saga AND t.name = d.name AND t.value = d.value AND t.key = d.key"
    ),
    "put_associations": (
        "INSERT INTO {s}.associations (saga, name, value, key) "
        "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[]) "
        "ON CONFLICT DO NOTHING"
    ),
    # -- commit: tombstones
    "delete_tombstones": (
        f"DELETE FROM {{s}}.tombstones t USING {_TEXTS2} AS d(saga, key) "
        "WHERE t.saga = d.saga AND t.key = d.key"
    ),
    "put_tombstones": (
        f"INSERT INTO {{s}}.tombstones ({_TOMBSTONE}) SELECT * FROM unnest({_TOMBSTONE_TYPES}) "
        "ON CONFLICT (saga, key) DO UPDATE SET ended = excluded.ended, "
        "ended_at = excluded.ended_at, expires_at = excluded.expires_at, "
        "instance_id = excluded.instance_id, version = excluded.version, "
        "state = excluded.state, state_version = excluded.state_version"
    ),
    "update_tombstones": (
        "UPDATE {s}.tombstones t SET ended = u.ended, ended_at = u.ended_at, "
        "expires_at = u.expires_at, instance_id = u.instance_id, version = u.version, "
        "state = u.state, state_version = u.state_version "
        f"FROM unnest({_TOMBSTONE_TYPES}, %b::int8[]) AS u({_TOMBSTONE}, expected) "
        "WHERE t.saga = u.saga AND t.key = u.key AND t.version = u.expected "
        "RETURNING t.saga, t.key"
    ),
    # Bounded: a commit that writes tombstones drops at most this many expired ones.
    "purge_tombstones": (
        "DELETE FROM {s}.tombstones WHERE (saga, key) IN (SELECT saga, key FROM "
        "{s}.tombstones WHERE expires_at < %s ORDER BY expires_at LIMIT %s)"
    ),
    # -- commit: schedules
    "clear_schedules": (
        f"DELETE FROM {{s}}.schedules t USING {_TEXTS2} AS c(saga, key) "
        "WHERE t.saga = c.saga AND t.key = c.key"
    ),
    "delete_schedules": (
        "DELETE FROM {s}.schedules t "
        "USING unnest(%b::text[], %b::text[], %b::text[]) AS d(saga, key, name) "
        "WHERE t.saga = d.saga AND t.key = d.key AND t.name = d.name"
    ),
    "put_schedules": (
        f"INSERT INTO {{s}}.schedules ({_SCHEDULE}) "
        "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::float8[], "
        "%b::bool[], %b::text[], %b::text[], %b::int8[], %b::int4[], %b::text[]) "
        "ON CONFLICT (saga, key, name) DO UPDATE SET id = excluded.id, due = excluded.due, "
        "to_self = excluded.to_self, type_name = excluded.type_name, "
        "payload = excluded.payload, seq = excluded.seq, attempts = excluded.attempts, "
        "trace = excluded.trace, pos = excluded.pos, lease_owner = NULL, "
        "lease_expires = NULL"
    ),
    # -- commit: outbox
    "clear_outbox": (
        f"DELETE FROM {{s}}.outbox t USING {_TEXTS2} AS c(saga, key) "
        "WHERE t.saga = c.saga AND t.key = c.key"
    ),
    "delete_outbox": "DELETE FROM {s}.outbox WHERE id = ANY(%b::text[])",
    "add_outbox": (
        f"INSERT INTO {{s}}.outbox ({_OUTBOX}) "
        "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::int8[], %b::text[], "
        "%b::text[], %b::text[], %b::int4[], %b::float8[], %b::text[], %b::text[]) "
        "ON CONFLICT (id) DO UPDATE SET saga = excluded.saga, key = excluded.key, "
        "seq = excluded.seq, kind = excluded.kind, type_name = excluded.type_name, "
        "payload = excluded.payload, attempts = excluded.attempts, due = excluded.due, "
        "error = excluded.error, trace = excluded.trace, failed = false, "
        "lease_owner = NULL, lease_expires = NULL"
    ),
    "update_outbox": (
        "UPDATE {s}.outbox t SET attempts = u.attempts, due = u.due, error = u.error, "
        "failed = false, lease_owner = NULL, lease_expires = NULL "
        "FROM unnest(%b::text[], %b::int4[], %b::float8[], %b::text[]) "
        "AS u(id, attempts, due, error) WHERE t.id = u.id"
    ),
    # -- commit: dead letters and marks
    "delete_dead_letters": "DELETE FROM {s}.dead_letters WHERE id = ANY(%b::text[])",
    "add_dead_letters": (
        f"INSERT INTO {{s}}.dead_letters ({_DEAD}) "
        "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], "
        "%b::text[], %b::text[], %b::int4[], %b::float8[], %b::int8[], %b::text[]) "
        "ON CONFLICT (id) DO UPDATE SET saga = excluded.saga, key = excluded.key, "
        "kind = excluded.kind, type_name = excluded.type_name, payload = excluded.payload, "
        "error = excluded.error, attempts = excluded.attempts, "
        "failed_at = excluded.failed_at, seq = excluded.seq, name = excluded.name"
    ),
    "put_marks": (
        "INSERT INTO {s}.dedup_marks (saga, key, event_id, expires_at) "
        "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::float8[]) "
        "ON CONFLICT (saga, key, event_id) DO UPDATE SET expires_at = excluded.expires_at"
    ),
    # -- reads
    "next_due": (
        "SELECT min(due) FROM {s}.schedules WHERE %s::text[] IS NULL OR saga = ANY(%s::text[])"
    ),
    "due_schedules": (
        f"SELECT {_SCHEDULE} FROM {{s}}.schedules WHERE due <= %s "
        "AND (%s::text[] IS NULL OR saga = ANY(%s::text[])) ORDER BY due, seq, id LIMIT %s"
    ),
    # A loose index scan: one index seek per saga name, not a read of every row.
    "saga_names": " UNION ".join(
        f"(WITH RECURSIVE n(saga) AS (SELECT min(saga) FROM {{s}}.{table} UNION ALL "
        f"SELECT (SELECT min(saga) FROM {{s}}.{table} WHERE saga > n.saga) FROM n "
        "WHERE n.saga IS NOT NULL) SELECT saga FROM n WHERE saga IS NOT NULL)"
        for table in ("instances", "schedules", "outbox")
    ),
    # Moves the rows of saga old to new except the keys new has an instance of (and rows
    # whose primary key new already holds); instances go last, so the test sees them unmoved.
    "rename_saga": ";".join(
        f"UPDATE {{s}}.{table} t SET saga = %(new)s WHERE t.saga = %(old)s AND NOT EXISTS "
        f"(SELECT FROM {{s}}.instances i WHERE i.saga = %(new)s AND i.key = t.key){extra}"
        for table, extra in (
            (
                "schedules",
                " AND NOT EXISTS (SELECT FROM {s}.schedules x WHERE x.saga = %(new)s "
                "AND x.key = t.key AND x.name = t.name)",
            ),
            ("outbox", ""),
            ("inbox", ""),
            ("dead_letters", ""),
            (
                "associations",
                " AND NOT EXISTS (SELECT FROM {s}.associations x WHERE x.saga = %(new)s "
                "AND x.name = t.name AND x.value = t.value AND x.key = t.key)",
            ),
            (
                "dedup_marks",
                " AND NOT EXISTS (SELECT FROM {s}.dedup_marks x WHERE x.saga = %(new)s "
                "AND x.key = t.key AND x.event_id = t.event_id)",
            ),
            (
                "tombstones",
                " AND NOT EXISTS (SELECT FROM {s}.tombstones x WHERE x.saga = %(new)s "
                "AND x.key = t.key)",
            ),
            ("instances", ""),
        )
    ),
    "find_associated": (
        "SELECT value, key FROM {s}.associations "
        "WHERE saga = %s AND name = %s AND value = ANY(%s::text[]) ORDER BY value, key"
    ),
    "list_associations": "SELECT saga, name, value, key FROM {s}.associations",
    "count_rows": (
        "SELECT 'i', status, count(*) FROM {s}.instances GROUP BY status "
        "UNION ALL SELECT 'o', NULL, count(*) FROM {s}.outbox "
        "UNION ALL SELECT 's', NULL, count(*) FROM {s}.schedules "
        "UNION ALL SELECT 'd', NULL, count(*) FROM {s}.schedules WHERE due <= %s "
        "UNION ALL SELECT 'l', NULL, count(*) FROM {s}.dead_letters"
    ),
    "list_instances": f"SELECT {_INSTANCE} FROM {{s}}.instances",
    "list_outbox": f"SELECT {_OUTBOX} FROM {{s}}.outbox",
    # The outbox rows of the instances after (%s, %s), by instance and seq, with their
    # instances' statuses: a walk of the outbox_instance index.
    "pending_commands": (
        f"SELECT {', '.join('o.' + c for c in _OUTBOX.split(', '))}, i.status "
        "FROM {s}.outbox o LEFT JOIN {s}.instances i ON i.saga = o.saga AND i.key = o.key "
        "WHERE (%(after)s::text IS NULL OR (o.saga, o.key) > (%(after)s, %(after_key)s)) "
        "AND (%(sagas)s::text[] IS NULL OR o.saga = ANY(%(sagas)s::text[])) "
        "ORDER BY o.saga, o.key, o.seq LIMIT %(limit)s"
    ),
    "drained_instances": (
        "SELECT i.saga, i.key FROM {s}.instances i WHERE i.status = %(status)s "
        "AND (%(after)s::text IS NULL OR (i.saga, i.key) > (%(after)s, %(after_key)s)) "
        "AND (%(sagas)s::text[] IS NULL OR i.saga = ANY(%(sagas)s::text[])) "
        "AND NOT EXISTS (SELECT FROM {s}.outbox o WHERE o.saga = i.saga AND o.key = i.key) "
        "ORDER BY i.saga, i.key LIMIT %(limit)s"
    ),
    "list_schedules": f"SELECT {_SCHEDULE} FROM {{s}}.schedules",
    "list_dead_letters": f"SELECT {_DEAD} FROM {{s}}.dead_letters",
    "list_tombstones": f"SELECT {_TOMBSTONE} FROM {{s}}.tombstones",
    # -- leases (PostgreSQL only)
    "claim_outbox": (
        "WITH picked AS ("
        " SELECT o.id FROM {s}.outbox o"
        " WHERE o.due <= %(now)s"
        " AND (o.lease_owner IS NULL OR o.lease_owner = %(owner)s"
        " OR o.lease_expires <= %(now)s)"
        " AND NOT EXISTS (SELECT FROM {s}.outbox p"
        " WHERE p.saga = o.saga AND p.key = o.key AND p.seq < o.seq)"
        " ORDER BY o.due, o.saga, o.key, o.seq LIMIT %(limit)s"
        " FOR UPDATE OF o SKIP LOCKED) "
        "UPDATE {s}.outbox t SET lease_owner = %(owner)s, lease_expires = %(expires)s "
        "FROM picked WHERE t.id = picked.id "
        "RETURNING t.id, t.saga, t.key, t.seq, t.kind, t.type_name, t.payload, t.attempts, "
        "t.due, t.error, t.trace"
    ),
    "release_outbox": (
        "UPDATE {s}.outbox SET lease_owner = NULL, lease_expires = NULL "
        "WHERE id = ANY(%(ids)s::text[]) "
        "AND (%(owner)s::text IS NULL OR lease_owner = %(owner)s::text)"
    ),
    "claim_schedules": (
        "WITH picked AS ("
        " SELECT saga, key, name FROM {s}.schedules"
        " WHERE due <= %(now)s"
        " AND (lease_owner IS NULL OR lease_owner = %(owner)s OR lease_expires <= %(now)s)"
        " ORDER BY due, seq, id LIMIT %(limit)s"
        " FOR UPDATE SKIP LOCKED) "
        "UPDATE {s}.schedules t SET lease_owner = %(owner)s, lease_expires = %(expires)s "
        "FROM picked WHERE t.saga = picked.saga AND t.key = picked.key "
        "AND t.name = picked.name "
        "RETURNING t.id, t.saga, t.key, t.name, t.due, t.to_self, t.type_name, t.payload, "
        "t.seq, t.attempts, t.trace"
    ),
    "release_schedules": (
        "UPDATE {s}.schedules SET lease_owner = NULL, lease_expires = NULL "
        "WHERE id = ANY(%(ids)s::text[]) "
        "AND (%(owner)s::text IS NULL OR lease_owner = %(owner)s::text)"
    ),
    **CLUSTER_SQL,
}


def _locking(statement: str) -> str:
    """`statement` (with a `WHERE`, then `RETURNING`) that first locks the instances of
    its first two parameters, in one order.

    Commits racing over the same instances then queue up instead of deadlocking. The
    lock is a condition on no row, evaluated once before the statement reads any, so
    the statement needs no round trip of its own for it.
    """
    head, returning = statement.split(" RETURNING ")
    return (
        "WITH locked AS MATERIALIZED (SELECT 1 FROM {s}.instances WHERE (saga, key) IN "
        f"(SELECT * FROM {_TEXTS2}) ORDER BY saga, key FOR UPDATE) "
        f"{head} AND (SELECT count(*) FROM locked) >= 0 RETURNING {returning}"
    )


_SQL["delete_instances_locking"] = _locking(_SQL["delete_instances"])
_SQL["update_instances_locking"] = _locking(_SQL["update_instances"])

# Marks expire but are not deleted by reads; every this many loads one also prunes them.
_PRUNE_EVERY = 1024
# Every this many commits that write tombstones, one drops expired ones: this many, plus
# twice as many as were written since the last such drop.
_PURGE_EVERY = 16
_PURGE = 256
# Deadlocks and serialization failures abort a commit before anything is applied, so it is
# simply run again, this many times at most.
_TRANSIENT_ATTEMPTS = 3


def _ref(item: InstanceDelete | OutboxRecord) -> _Ref:
    return (item.saga, item.key)


def _write_ref(write: InstanceWrite) -> _Ref:
    return (write.record.saga, write.record.key)


def _instance_row(r: InstanceRecord) -> tuple[Any, ...]:
    """The columns of `r`, in the order of `_INSTANCE`."""
    return (
        r.saga,
        r.key,
        r.version,
        r.status,
        r.state,
        r.instance_id,
        float(r.created_at),
        float(r.updated_at),
        r.last_event,
        r.completed,
        r.state_version,
    )


def _association(a: Association) -> tuple[str, str, str, str]:
    return (a.saga, a.name, a.value, a.key)


def _tombstone_row(t: Tombstone) -> tuple[Any, ...]:
    """The columns of `t`, in the order of `_TOMBSTONE`."""
    return (
        t.saga,
        t.key,
        t.ended,
        float(t.ended_at),
        float(t.expires_at),
        t.instance_id,
        t.version,
        t.state,
        t.state_version,
    )


def _tombstone_ref(write: TombstoneWrite) -> _Ref:
    return (write.tombstone.saga, write.tombstone.key)


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows to columns, each a list (psycopg sends lists as arrays, not tuples)."""
    return [list(column) for column in zip(*rows, strict=True)]


def _last_by(items: Sequence[T], key: Callable[[T], Any]) -> list[T]:
    """`items` without earlier duplicates of a key (the last one wins), sorted by key.

    One statement may not touch a row twice, and a stable order keeps concurrent commits
    from locking the same rows in opposite orders.
    """
    return sorted({key(item): item for item in items}.values(), key=key)


def _lock_key(schema: str) -> int:
    """The advisory lock that serializes creating and migrating `schema`."""
    digest = hashlib.blake2b(f"sagaflow schema {schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of `schema` (a channel name has at most 63 bytes)."""
    channel = f"sagaflow.{schema}"
    if len(channel) <= 63:
        return channel
    return f"sagaflow.{hashlib.blake2b(schema.encode(), digest_size=16).hexdigest()}"


def _check_schema(_: object, __: attrs.Attribute[str], value: str) -> None:
    if not _SCHEMA_NAME.fullmatch(value):
        raise ValueError(
            f"PostgresStore schema name {value!r} is not a plain identifier: use letters, "
            "digits and underscores, not starting with a digit, at most 63 characters"
        )


@attrs.define(eq=False, repr=False)
class PostgresStore(ClusterMethods):
    """Keeps instances, outbox, schedules, dead letters and dedup marks in PostgreSQL.

    Several runtime processes may share one database with `Runtime(cluster=True)`:
    events go through a shared inbox, instance versions settle races on an instance
    (optimistic concurrency), and inbox rows, commands and due schedules are claimed
    with leases, so each is worked on by one process at a time (see the how-to
    "Scaling out"). Needs the `postgres` extra (`pip install 'sagaflow[postgres]'`).

    The DSN's password never appears in a repr, a log record or an error message.

    Args:
        dsn: A libpq connection string, as a URL (`postgresql://user:pw@host/db`) or as
            keywords (`host=... dbname=...`).
        schema: The PostgreSQL schema holding sagaflow's tables; created by `open` if
            missing. Separate schemas keep separate stores in one database.
        min_size: Connections the pool keeps open.
        max_size: Connections the pool opens at most; also the number of store calls
            that run at once.
        timeout: Seconds to wait for a connection (when connecting, and when the pool is
            busy) before failing with `StoreError`.
        lease: Cluster mode (`Runtime(cluster=True)`): seconds a claimed inbox row,
            command or due schedule stays with its process before another may take it
            over. Processes renew the leases of rows they still work on, so this bounds
            how long the work of a process that died waits.
        poll_interval: Cluster mode: seconds between looks at the tables when no
            wake-up (LISTEN/NOTIFY) arrives; it also bounds how soon expired leases are
            noticed.
        migrate: `True` (the default): `open` creates the schema, or migrates an
            older one. `False`: `open` changes nothing; the schema must exist at this
            sagaflow's version (read-only tools such as `sagaflow check` open a store so).

    Raises:
        ValueError: The schema name, the pool sizes, `lease` or `poll_interval` are
            invalid.
        StoreError: The DSN cannot be parsed.
    """

    _dsn: str
    _schema: str = attrs.field(default="sagaflow", kw_only=True, validator=_check_schema)
    _min_size: int = attrs.field(default=1, kw_only=True)
    _max_size: int = attrs.field(default=10, kw_only=True)
    _timeout: float = attrs.field(default=30.0, kw_only=True)
    _lease: float = attrs.field(default=30.0, kw_only=True)
    _poll_interval: float = attrs.field(default=2.0, kw_only=True)
    _migrates: bool = attrs.field(default=True, kw_only=True, alias="migrate")
    _channel: str = attrs.field(init=False)
    _redacted: str = attrs.field(init=False)
    _secrets: tuple[str, ...] = attrs.field(init=False)
    _sql: dict[str, str] = attrs.field(init=False)
    _conninfo: str = attrs.field(init=False)
    _pool: _Pool | None = attrs.field(default=None, init=False)
    _limiter: anyio.CapacityLimiter | None = attrs.field(default=None, init=False)
    _loads: int = attrs.field(default=0, init=False)
    _now: float | None = attrs.field(default=None, init=False)
    _purge_in: int = attrs.field(default=0, init=False)
    _tombstones_put: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        redacted, secrets = _redact(self._dsn)
        self._redacted = redacted
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        if not 0 <= self._min_size <= self._max_size or self._max_size < 1:
            raise ValueError(
                f"PostgresStore needs 0 <= min_size <= max_size and max_size >= 1, got "
                f"min_size={self._min_size}, max_size={self._max_size}"
            )
        if self._timeout <= 0:
            raise ValueError(f"PostgresStore timeout must be positive, got {self._timeout}")
        if not 0 < self._poll_interval < self._lease:
            raise ValueError(
                f"PostgresStore needs 0 < poll_interval < lease, got "
                f"poll_interval={self._poll_interval}, lease={self._lease}"
            )
        self._channel = _channel(self._schema)
        try:
            params = conninfo_to_dict(self._dsn)
        except psycopg.Error as exc:
            raise StoreError(
                f"PostgresStore cannot parse its DSN {self._redacted!r}: {self._scrub(exc)}"
            ) from None
        # Fail fast on an unreachable host unless the DSN says otherwise.
        self._conninfo = self._dsn
        if "connect_timeout" not in params:
            self._conninfo = make_conninfo(self._dsn, connect_timeout=max(1, round(self._timeout)))
        quoted = f'"{self._schema}"'
        self._sql = {name: text.replace("{s}", quoted) for name, text in _SQL.items()}

    def __repr__(self) -> str:
        return f"PostgresStore({self._redacted!r}, schema={self._schema!r})"

    # -- plumbing

    def _scrub(self, exc: BaseException) -> str:
        """`exc` as text, with the DSN and its passwords masked."""
        text = f"{type(exc).__name__}: {str(exc).strip()}"
        text = text.replace(self._dsn, self._redacted)
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text

    def _leaks(self, exc: BaseException) -> bool:
        text = str(exc)
        return any(secret in text for secret in self._secrets)

    @contextmanager
    def _translate(self, doing: str) -> Iterator[None]:
        """Turn driver errors into `StoreError`s that do not show the password."""
        try:
            yield
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"{self!r} could not {doing}: {self._scrub(exc)}; check that the server "
                "is running and reachable, and that the DSN is right"
            ) from (None if self._leaks(exc) else exc)
        except psycopg.Error as exc:
            raise StoreError(f"{self!r} could not {doing}: {self._scrub(exc)}") from (
                None if self._leaks(exc) else exc
            )

    async def _run(self, func: Callable[[_Pool], T]) -> T:
        pool, limiter = self._pool, self._limiter
        if pool is None or limiter is None:
            raise StoreError(
                f"{self!r} is not open: call `await store.open()` first "
                "(a Runtime does it when it starts)"
            )
        return await anyio.to_thread.run_sync(func, pool, limiter=limiter)

    # -- open and close

    async def open(self) -> None:
        """Connect, then create the schema or migrate it to `SCHEMA_VERSION`.

        Safe when several processes open the same database at once. Opening an open store
        does nothing.

        Raises:
            StoreError: The server cannot be reached, or the schema holds tables that
                sagaflow did not create.
            SchemaVersionError: The schema was written by a newer sagaflow.
        """
        if self._pool is not None:
            await anyio.lowlevel.checkpoint()
            return
        limiter = anyio.CapacityLimiter(self._max_size)
        pool = await anyio.to_thread.run_sync(self._open_sync, limiter=limiter)
        if self._pool is not None:  # a concurrent open() was quicker
            await anyio.to_thread.run_sync(pool.close)
            return
        self._pool, self._limiter = pool, limiter

    def _open_sync(self) -> _Pool:
        with self._translate("connect"):
            conn = psycopg.connect(self._conninfo)
        with conn, self._translate("create or migrate its schema"):
            self._migrate(conn)
        pool: _Pool = ConnectionPool(
            self._conninfo,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._timeout,
            kwargs={"autocommit": True},
            name=f"sagaflow:{self._schema}",
            open=False,
        )
        pool.open(wait=False)
        return pool

    def _read_version(self, conn: psycopg.Connection[TupleRow]) -> tuple[int | None, int]:
        """The schema version (`None` without a `meta` table) and the number of tables."""
        # A query on pg_tables, unlike to_regclass(), sees what a concurrent opener has
        # just committed.
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE tablename = 'meta'), count(*) "
            "FROM pg_tables WHERE schemaname = %s",
            (self._schema,),
        ).fetchone()
        assert row is not None
        if not row[0]:
            return None, row[1]
        found = conn.execute(self._sql["version"]).fetchone()
        try:
            return (int(found[0]) if found is not None else -1), row[1]
        except ValueError:
            return -1, row[1]

    def _check_version(self, found: int) -> None:
        if found > SCHEMA_VERSION or found < 0:
            what = (
                f"was written by a newer sagaflow (schema version {found})"
                if found > SCHEMA_VERSION
                else "has a meta table without a readable schema version"
            )
            raise SchemaVersionError(
                f"PostgreSQL schema {self._schema!r} of {self._redacted!r} {what}; this "
                f"sagaflow knows schema versions up to {SCHEMA_VERSION}: upgrade sagaflow, "
                "or use another schema",
                found=found,
                supported=SCHEMA_VERSION,
            )

    def _refuse_migration(self, found: int | None) -> None:
        where = f"PostgreSQL schema {self._schema!r} of {self._redacted!r}"
        if found is None:
            raise StoreError(
                f"{where} holds no sagaflow store; it was opened with migrate=False, so "
                "nothing was created"
            )
        self._check_version(found)  # a newer one
        raise SchemaVersionError(
            f"{where} has schema version {found}, but this sagaflow reads version "
            f"{SCHEMA_VERSION} without migrating (migrate=False); work on a copy of the "
            "schema, which opening with migrate=True migrates (the sagaflow that wrote it "
            "cannot open a migrated schema)",
            found=found,
            supported=SCHEMA_VERSION,
        )

    def _migrate(self, conn: psycopg.Connection[TupleRow]) -> None:
        # Most opens find the current version and need no lock and no DDL privileges.
        with conn.transaction():
            found, _ = self._read_version(conn)
        if found == SCHEMA_VERSION:
            return
        if not self._migrates:
            self._refuse_migration(found)
        if found is not None:
            self._check_version(found)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self._schema),))
            found, tables = self._read_version(conn)  # someone may have done it meanwhile
            if found is None:
                if tables:
                    raise StoreError(
                        f"PostgreSQL schema {self._schema!r} of {self._redacted!r} already "
                        f"holds {tables} table(s) that sagaflow did not create; choose "
                        "another schema with PostgresStore(..., schema=...)"
                    )
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                found = 0
            self._check_version(found)
            if found == SCHEMA_VERSION:
                return
            quoted = f'"{self._schema}"'
            for step in _MIGRATIONS[found:]:
                for statement in step:
                    conn.execute(statement.replace("{s}", quoted))
            conn.execute(self._sql["set_version"], (str(SCHEMA_VERSION),))
        log.info(
            "%s PostgreSQL schema %r in %s to version %d",
            "created" if found == 0 else "migrated",
            self._schema,
            self._redacted,
            SCHEMA_VERSION,
        )

    async def close(self) -> None:
        """Close the connection pool; the store can be opened again later."""
        pool, self._pool, self._limiter = self._pool, None, None
        if pool is None:
            await anyio.lowlevel.checkpoint()
            return
        await anyio.to_thread.run_sync(pool.close)

    # -- the store protocol

    async def load(self, request: LoadRequest) -> Loaded:
        """Read instances (or their unexpired tombstones), unexpired dedup marks and
        pending schedule ids in one go."""
        self._now = request.now if self._now is None else max(self._now, request.now)
        self._loads += 1
        prune = self._loads % _PRUNE_EVERY == 0
        if not (prune or request.instances or request.marks or request.schedule_ids):
            await anyio.lowlevel.checkpoint()
            return Loaded(instances={}, marks=set(), schedule_ids=set())
        return await self._run(lambda pool: self._load_sync(pool, request, prune))

    def _load_sync(self, pool: _Pool, request: LoadRequest, prune: bool) -> Loaded:
        sql = self._sql
        instances: dict[_Ref, InstanceRecord] = {}
        tombstones: dict[_Ref, Tombstone] = {}
        marks: set[tuple[str, str, str]] = set()
        schedule_ids: set[str] = set()
        with self._translate("load"), pool.connection() as conn:
            if request.instances:
                params = [*_columns(request.instances), float(request.now)]
                for row in conn.execute(sql["load_instances"], params):
                    ref = (row[0], row[1])
                    if row[2] is not None:
                        instances[ref] = InstanceRecord(*row[:11])
                    else:
                        tombstones[ref] = Tombstone(*ref, *row[11:])
            if request.marks:
                params = [*_columns(request.marks), request.now]
                rows = conn.execute(sql["load_marks"], params).fetchall()
                marks = {(saga, key, event_id) for saga, key, event_id in rows}
            if request.schedule_ids:
                rows = conn.execute(
                    sql["load_schedule_ids"], (list(request.schedule_ids),)
                ).fetchall()
                schedule_ids = {sid for (sid,) in rows}
            if prune:
                conn.execute(sql["prune_marks"], (request.now,))
        return Loaded(
            instances=instances, marks=marks, schedule_ids=schedule_ids, tombstones=tombstones
        )

    async def commit(self, changes: Changes) -> None:
        """Apply `changes` in one transaction (all or nothing).

        Raises:
            ConflictError: An `expected_version` did not match; it names every such
                instance, and nothing was applied.
            StoreError: The database failed.
        """
        if not changes:
            await anyio.lowlevel.checkpoint()
            return
        await self._run(lambda pool: self._commit_sync(pool, changes))

    def _commit_sync(self, pool: _Pool, changes: Changes) -> None:
        with self._translate("commit"):
            for attempt in range(1, _TRANSIENT_ATTEMPTS + 1):
                try:
                    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                        self._apply(cur, changes)
                    return
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    if attempt == _TRANSIENT_ATTEMPTS:
                        raise

    def _apply(self, cur: psycopg.Cursor[TupleRow], ch: Changes) -> None:
        sql = self._sql
        deletes = sorted(ch.deletes, key=_ref)
        updates = sorted((w for w in ch.writes if w.expected_version), key=_write_ref)
        inserts = sorted((w for w in ch.writes if not w.expected_version), key=_write_ref)

        # The first of these statements locks the rows this commit expects to exist.
        expected = {_ref(d) for d in deletes if d.expected_version}
        expected.update(_write_ref(w) for w in updates)
        lock = _columns(sorted(expected)) if expected else []

        conflicts: set[_Ref] = set()
        if existing := [d for d in deletes if d.expected_version]:
            rows: list[tuple[Any, ...]] = [(d.saga, d.key, d.expected_version) for d in existing]
            cur.execute(sql["delete_instances_locking"], [*lock, *_columns(rows)])
            lock = []
            gone = {(saga, key) for saga, key in cur.fetchall()}
            conflicts.update(_ref(d) for d in existing if _ref(d) not in gone)
        if absent := [_ref(d) for d in deletes if not d.expected_version]:
            cur.execute(sql["existing_instances"], _columns(absent))
            conflicts.update((saga, key) for saga, key in cur.fetchall())
        if updates:
            rows = [
                (*_write_ref(w), w.expected_version, *_instance_row(w.record)[2:]) for w in updates
            ]
            statement = sql["update_instances_locking" if lock else "update_instances"]
            cur.execute(statement, [*lock, *_columns(rows)])
            done = {(saga, key) for saga, key in cur.fetchall()}
            conflicts.update(_write_ref(w) for w in updates if _write_ref(w) not in done)
        if inserts:
            cur.execute(
                sql["insert_instances"], _columns([_instance_row(w.record) for w in inserts])
            )
            done = {(saga, key) for saga, key in cur.fetchall()}
            # Two creations of one instance in a commit: only the first can succeed.
            seen: set[_Ref] = set()
            for w in inserts:
                if _write_ref(w) not in done or _write_ref(w) in seen:
                    conflicts.add(_write_ref(w))
                seen.add(_write_ref(w))
        if ch.tombstone_deletes:
            cur.execute(sql["delete_tombstones"], _columns(sorted(set(ch.tombstone_deletes))))
        if ch.tombstones:
            conflicts.update(self._write_tombstones(cur, ch.tombstones))
        if conflicts:
            order = [_write_ref(w) for w in ch.writes] + [_ref(d) for d in ch.deletes]
            order += [_tombstone_ref(t) for t in ch.tombstones]
            raise ConflictError(list(dict.fromkeys(r for r in order if r in conflicts)))

        gone_refs = sorted({_ref(d) for d in deletes})
        if gone_refs:
            cur.execute(sql["clear_associations"], _columns(gone_refs))
        if ch.association_deletes:
            cur.execute(
                sql["delete_associations"],
                _columns(sorted(set(map(_association, ch.association_deletes)))),
            )
        if ch.association_puts:
            cur.execute(
                sql["put_associations"],
                _columns(sorted(set(map(_association, ch.association_puts)))),
            )
        if cleared := sorted({*gone_refs, *((saga, key) for saga, key in ch.schedule_clears)}):
            cur.execute(sql["clear_schedules"], _columns(cleared))
        if ch.schedule_deletes:
            keys = sorted({(d.saga, d.key, d.name) for d in ch.schedule_deletes})
            cur.execute(sql["delete_schedules"], _columns(keys))
        if ch.schedule_puts:
            puts = _last_by(ch.schedule_puts, lambda s: (s.saga, s.key, s.name))
            rows = [
                (
                    s.id,
                    s.saga,
                    s.key,
                    s.name,
                    float(s.due),
                    s.to_self,
                    s.type_name,
                    s.payload,
                    s.seq,
                    s.attempts,
                    s.trace,
                )
                for s in puts
            ]
            cur.execute(sql["put_schedules"], _columns(rows))

        if gone_refs:
            cur.execute(sql["clear_outbox"], _columns(gone_refs))
        if ch.outbox_deletes:
            cur.execute(sql["delete_outbox"], (sorted(set(ch.outbox_deletes)),))
        if ch.outbox_adds:
            adds = _last_by(ch.outbox_adds, lambda o: o.id)
            rows = [
                (
                    o.id,
                    o.saga,
                    o.key,
                    o.seq,
                    o.kind,
                    o.type_name,
                    o.payload,
                    o.attempts,
                    float(o.due),
                    o.error,
                    o.trace,
                )
                for o in adds
            ]
            cur.execute(sql["add_outbox"], _columns(rows))
        if ch.outbox_updates:
            ups = _last_by(ch.outbox_updates, lambda u: u.id)
            rows = [(u.id, u.attempts, float(u.due), u.error) for u in ups]
            cur.execute(sql["update_outbox"], _columns(rows))

        if ch.dead_letter_deletes:
            cur.execute(sql["delete_dead_letters"], (sorted(set(ch.dead_letter_deletes)),))
        if ch.dead_letters:
            dead = _last_by(ch.dead_letters, lambda d: d.id)
            rows = [
                (
                    d.id,
                    d.saga,
                    d.key,
                    d.kind,
                    d.type_name,
                    d.payload,
                    d.error,
                    d.attempts,
                    float(d.failed_at),
                    d.seq,
                    d.name,
                )
                for d in dead
            ]
            cur.execute(sql["add_dead_letters"], _columns(rows))
        if ch.marks:
            marks = _last_by(ch.marks, lambda m: (m.saga, m.key, m.event_id))
            rows = [(m.saga, m.key, m.event_id, float(m.expires_at)) for m in marks]
            cur.execute(sql["put_marks"], _columns(rows))

    def _write_tombstones(
        self, cur: psycopg.Cursor[TupleRow], writes: Sequence[TombstoneWrite]
    ) -> set[_Ref]:
        """Put and update tombstones (see `TombstoneWrite`); returns the conflicts."""
        sql = self._sql
        conflicts: set[_Ref] = set()
        puts = _last_by([t for t in writes if not t.expected_version], _tombstone_ref)
        updates = _last_by([t for t in writes if t.expected_version], _tombstone_ref)
        if updates:
            rows = [(*_tombstone_row(t.tombstone), t.expected_version) for t in updates]
            cur.execute(sql["update_tombstones"], _columns(rows))
            done = {(saga, key) for saga, key in cur.fetchall()}
            conflicts.update(_tombstone_ref(t) for t in updates if _tombstone_ref(t) not in done)
        if puts:
            rows = [_tombstone_row(t.tombstone) for t in puts]
            cur.execute(sql["put_tombstones"], _columns(rows))
            # Expired tombstones never count again: drop some, faster than they come,
            # every few commits (a statement is a round trip).
            self._tombstones_put += len(puts)
            self._purge_in -= 1
            if self._now is not None and self._purge_in < 0:
                limit = _PURGE + 2 * self._tombstones_put
                cur.execute(sql["purge_tombstones"], (self._now, limit))
                self._tombstones_put, self._purge_in = 0, _PURGE_EVERY - 1
        return conflicts

    async def next_due(self, *, sagas: Collection[str] | None = None) -> float | None:
        """The earliest due time of any pending schedule (of `sagas`, if given), or `None`."""
        among = None if sagas is None else list(sagas)

        def query(pool: _Pool) -> float | None:
            with self._translate("read the next due time"), pool.connection() as conn:
                row = conn.execute(self._sql["next_due"], (among, among)).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run(query)

    async def due_schedules(
        self, now: float, limit: int, *, sagas: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        """Up to `limit` schedules (of `sagas`, if given) due at or before `now`,
        earliest first.

        Leases taken with `claim_due_schedules` are not looked at: this is the
        single-process read.
        """
        among = None if sagas is None else list(sagas)
        return await self._run(
            lambda pool: self._select(
                pool,
                ScheduleRecord,
                "read due schedules",
                "due_schedules",
                (now, among, among, limit),
            )
        )

    async def saga_names(self) -> set[str]:
        """The names of the sagas that have instances, schedules or outbox rows."""

        def query(pool: _Pool) -> set[str]:
            with self._translate("read saga names"), pool.connection() as conn:
                return {name for (name,) in conn.execute(self._sql["saga_names"]).fetchall()}

        return await self._run(query)

    async def rename_saga(self, old: str, new: str) -> int:
        """Move the rows of saga `old` to `new`, except keys `new` already has."""

        def rename(pool: _Pool) -> int:
            moved = 0
            with (
                self._translate("rename a saga"),
                pool.connection() as conn,
                conn.transaction(),
            ):
                for statement in self._sql["rename_saga"].split(";"):
                    moved = conn.execute(statement, {"old": old, "new": new}).rowcount
            return moved

        return await self._run(rename)

    def _select(
        self,
        pool: _Pool,
        cls: type[T],
        doing: str,
        name: str,
        params: Sequence[Any] | dict[str, Any] = (),
        suffix: str = "",
    ) -> list[T]:
        with (
            self._translate(doing),
            pool.connection() as conn,
            conn.cursor(row_factory=class_row(cls)) as cur,
        ):
            cur.execute(self._sql[name] + suffix, params)
            return cur.fetchall()

    def _listing(
        self, name: str, filters: dict[str, Any], order: str, limit: int | None = None
    ) -> Callable[[_Pool], list[Any]]:
        cls = {
            "list_associations": Association,
            "list_instances": InstanceRecord,
            "list_outbox": OutboxRecord,
            "list_schedules": ScheduleRecord,
            "list_dead_letters": DeadLetter,
            "list_tombstones": Tombstone,
        }[name]
        wanted = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"{column} = %s" for column in wanted)
        suffix = (f" WHERE {where}" if where else "") + f" ORDER BY {order}"
        params: list[Any] = list(wanted.values())
        if limit is not None:
            suffix += " LIMIT %s"
            params.append(limit)
        return lambda pool: self._select(pool, cls, "list rows", name, params, suffix)

    async def list_instances(
        self, *, saga: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[InstanceRecord]:
        """Instances, optionally of one saga or status, ordered by saga and key."""
        filters = {"saga": saga, "status": status}
        found: list[InstanceRecord] = await self._run(
            self._listing("list_instances", filters, "saga, key", limit)
        )
        return found

    async def list_outbox(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[OutboxRecord]:
        """Pending outbox rows, ordered by saga, key and seq."""
        filters = {"saga": saga, "key": key}
        found: list[OutboxRecord] = await self._run(
            self._listing("list_outbox", filters, "saga, key, seq, id")
        )
        return found

    async def pending_commands(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[PendingCommand]:
        """Up to `limit` outbox rows of the instances after `after`, by instance and seq,
        with their instances' statuses."""
        params = _page(after, limit, sagas)

        def query(pool: _Pool) -> list[PendingCommand]:
            with self._translate("read pending commands"), pool.connection() as conn:
                rows = conn.execute(self._sql["pending_commands"], params).fetchall()
            return [PendingCommand(OutboxRecord(*row[:-1]), row[-1]) for row in rows]

        return await self._run(query)

    async def drained_instances(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[tuple[str, str]]:
        """Up to `limit` completing instances without outbox rows, by saga and key."""
        params = {**_page(after, limit, sagas), "status": COMPLETING}

        def query(pool: _Pool) -> list[tuple[str, str]]:
            with self._translate("read drained instances"), pool.connection() as conn:
                rows = conn.execute(self._sql["drained_instances"], params).fetchall()
            return [(saga, key) for saga, key in rows]

        return await self._run(query)

    async def scan_instances(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[InstanceRecord]:
        """Up to `limit` instances ordered by `(saga, key)`, those after `after` only."""
        return await self._run(
            self._scan(InstanceRecord, "list_instances", "saga, key", after, limit)
        )

    async def scan_outbox(self, *, after: str | None = None, limit: int) -> list[OutboxRecord]:
        """Up to `limit` outbox rows ordered by id, those after `after` only."""
        key = None if after is None else (after,)
        return await self._run(self._scan(OutboxRecord, "list_outbox", "id", key, limit))

    async def scan_schedules(
        self, *, after: tuple[str, str, str] | None = None, limit: int
    ) -> list[ScheduleRecord]:
        """Up to `limit` schedules ordered by `(saga, key, name)`, those after `after` only."""
        scan = self._scan(ScheduleRecord, "list_schedules", "saga, key, name", after, limit)
        return await self._run(scan)

    async def scan_dead_letters(self, *, after: str | None = None, limit: int) -> list[DeadLetter]:
        """Up to `limit` dead letters ordered by id, those after `after` only."""
        key = None if after is None else (after,)
        return await self._run(self._scan(DeadLetter, "list_dead_letters", "id", key, limit))

    async def scan_tombstones(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[Tombstone]:
        """Up to `limit` tombstones ordered by `(saga, key)`, those after `after` only."""
        return await self._run(self._scan(Tombstone, "list_tombstones", "saga, key", after, limit))

    def _scan(
        self, cls: type[T], name: str, key: str, after: Sequence[str] | None, limit: int
    ) -> Callable[[_Pool], list[T]]:
        """One page of a table in primary-key order, after the key `after` (a row
        comparison, which the primary key's index answers)."""
        where = "" if after is None else f" WHERE ({key}) > ({', '.join(['%s'] * len(after))})"
        params = [*(after or ()), limit]
        suffix = f"{where} ORDER BY {key} LIMIT %s"
        return lambda pool: self._select(pool, cls, "scan rows", name, params, suffix)

    async def count_rows(self, *, now: float) -> RowCounts:
        """How many rows of each kind the store holds, in one statement (see
        `Store.count_rows`); it counts every instance row, so call it seldom."""

        def query(pool: _Pool) -> RowCounts:
            with self._translate("count rows"), pool.connection() as conn:
                rows = conn.execute(self._sql["count_rows"], (now,)).fetchall()
            statuses = {status: n for kind, status, n in rows if kind == "i"}
            totals = {kind: n for kind, _, n in rows if kind != "i"}
            return row_counts(statuses, totals["o"], totals["s"], totals["d"], totals["l"])

        return await self._run(query)

    async def list_schedules(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[ScheduleRecord]:
        """Pending schedules, ordered by due time, then seq."""
        filters = {"saga": saga, "key": key}
        found: list[ScheduleRecord] = await self._run(
            self._listing("list_schedules", filters, "due, seq, pos")
        )
        return found

    async def find_associated(
        self, saga: str, name: str, values: Sequence[str]
    ) -> dict[str, list[str]]:
        """The keys of the instances of `saga` associated with each of `values`."""
        if not values:
            await anyio.lowlevel.checkpoint()
            return {}
        params = (saga, name, sorted(set(values)))

        def query(pool: _Pool) -> dict[str, list[str]]:
            found: dict[str, list[str]] = {}
            with self._translate("read associations"), pool.connection() as conn:
                for value, key in conn.execute(self._sql["find_associated"], params):
                    found.setdefault(value, []).append(key)
            return found

        return await self._run(query)

    async def list_associations(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Association]:
        """Associations, optionally of one saga or instance, ordered by saga, key, name
        and value."""
        filters = {"saga": saga, "key": key}
        found: list[Association] = await self._run(
            self._listing("list_associations", filters, "saga, key, name, value")
        )
        return found

    async def list_dead_letters(self, *, saga: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        found: list[DeadLetter] = await self._run(
            self._listing("list_dead_letters", {"saga": saga}, "failed_at, pos")
        )
        return found

    async def list_tombstones(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Tombstone]:
        """Tombstones, optionally of one saga or key, ordered by saga and key."""
        found: list[Tombstone] = await self._run(
            self._listing("list_tombstones", {"saga": saga, "key": key}, "saga, key")
        )
        return found

    # -- leases: PostgreSQL-only extensions for several processes

    async def claim_outbox(
        self, owner: str, now: float, lease_seconds: float, limit: int
    ) -> list[OutboxRecord]:
        """Lease the due head commands of up to `limit` instances to `owner`.

        A PostgreSQL-only extension of the store protocol, for several processes sharing
        one database. A row is claimed when it is the head of its instance's outbox
        (lowest `seq`), due at or before `now`, and not leased to another owner (or that
        lease expired). Claimed rows are leased until `now + lease_seconds`; no other
        owner gets them meanwhile, and once the lease expires, anyone may claim them
        again (the process holding them died or stalled). Rows `owner` already holds are
        returned again with a renewed lease. Rows are picked with
        `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait for one another.

        Deleting a row (it was dispatched) ends its lease; an `OutboxUpdate` (a failed
        attempt) releases it, and so does `release_outbox`.

        Args:
            owner: Identifies the claiming process, e.g. host, pid and a random part.
            now: Wall-clock seconds.
            lease_seconds: How long the claim holds.
            limit: The most rows to claim.

        Returns:
            The claimed rows, earliest due first.
        """
        if limit < 0 or lease_seconds <= 0:
            raise ValueError(
                f"claim_outbox needs limit >= 0 and lease_seconds > 0, got limit={limit}, "
                f"lease_seconds={lease_seconds}"
            )
        params = {"owner": owner, "now": now, "expires": now + lease_seconds, "limit": limit}
        rows: list[OutboxRecord] = await self._run(
            lambda pool: self._claim(pool, OutboxRecord, "claim_outbox", params)
        )
        return sorted(rows, key=lambda o: (o.due, o.saga, o.key, o.seq))

    async def release_outbox(self, ids: Sequence[str], *, owner: str | None = None) -> None:
        """Give up the leases on outbox rows `ids`, so anyone may claim them at once.

        A PostgreSQL-only extension of the store protocol (see `claim_outbox`).

        Args:
            ids: Outbox row ids; unknown ids are ignored.
            owner: Release only leases held by this owner (recommended: a lease that
                expired may have been claimed by someone else since).
        """
        if not ids:
            await anyio.lowlevel.checkpoint()
            return
        params = {"ids": list(ids), "owner": owner}
        await self._run(lambda pool: self._execute(pool, "release_outbox", params))

    async def claim_due_schedules(
        self, owner: str, now: float, lease_seconds: float, limit: int
    ) -> list[ScheduleRecord]:
        """Lease up to `limit` schedules due at or before `now` to `owner`.

        A PostgreSQL-only extension of the store protocol, for several processes sharing
        one database; `due_schedules` is its single-process counterpart. Schedules leased
        to another owner are skipped until their lease expires; those `owner` already
        holds are returned again with a renewed lease. Putting a schedule again (same
        saga, key and name) drops its lease; so does deleting it, or `release_schedules`.

        Args:
            owner: Identifies the claiming process.
            now: Wall-clock seconds.
            lease_seconds: How long the claim holds.
            limit: The most schedules to claim.

        Returns:
            The claimed schedules, earliest due first.
        """
        if limit < 0 or lease_seconds <= 0:
            raise ValueError(
                f"claim_due_schedules needs limit >= 0 and lease_seconds > 0, got "
                f"limit={limit}, lease_seconds={lease_seconds}"
            )
        params = {"owner": owner, "now": now, "expires": now + lease_seconds, "limit": limit}
        rows: list[ScheduleRecord] = await self._run(
            lambda pool: self._claim(pool, ScheduleRecord, "claim_schedules", params)
        )
        return sorted(rows, key=lambda s: (s.due, s.seq, s.id))

    async def release_schedules(self, ids: Sequence[str], *, owner: str | None = None) -> None:
        """Give up the leases on the schedules with these ids.

        A PostgreSQL-only extension of the store protocol (see `claim_due_schedules`).

        Args:
            ids: Schedule ids; unknown ids are ignored.
            owner: Release only leases held by this owner.
        """
        if not ids:
            await anyio.lowlevel.checkpoint()
            return
        params = {"ids": list(ids), "owner": owner}
        await self._run(lambda pool: self._execute(pool, "release_schedules", params))

    def _claim(self, pool: _Pool, cls: type[T], name: str, params: dict[str, Any]) -> list[T]:
        with (
            self._translate("claim rows"),
            pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=class_row(cls)) as cur,
        ):
            cur.execute(self._sql[name], params)
            return cur.fetchall()

    def _execute(self, pool: _Pool, name: str, params: dict[str, Any]) -> None:
        with self._translate("release leases"), pool.connection() as conn:
            conn.execute(self._sql[name], params)


def _page(
    after: tuple[str, str] | None, limit: int, sagas: Collection[str] | None
) -> dict[str, Any]:
    """The parameters of a keyset page by instance (`pending_commands`, `drained_instances`)."""
    return {
        "after": None if after is None else after[0],
        "after_key": None if after is None else after[1],
        "sagas": None if sagas is None else list(sagas),
        "limit": limit,
    }
