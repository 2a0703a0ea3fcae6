"""`PostgresStore` in cluster mode: the shared inbox, claims with leases, LISTEN/NOTIFY.

These are the `ClusterStore` methods (see `sagaflow.stores._claims`) that let several
runtime processes share one database (`Runtime(cluster=True)`), kept apart from the
single-process store protocol in `_postgres.py`. `PostgresStore` inherits them.
"""

from __future__ import annotations

import contextlib
import hashlib
import select
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel
import psycopg
import psycopg.errors
from psycopg.rows import TupleRow

from ..exceptions import StoreError
from ._claims import ClaimedCommand, InboxRecord, Settled
from ._protocol import OutboxRecord, OutboxUpdate, ScheduleRecord, TombstonePolicy

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    _Pool = ConnectionPool[psycopg.Connection[TupleRow]]

__all__ = ["CLUSTER_SQL", "FAILED_LEASES", "ClusterMethods", "PostgresListener"]

T = TypeVar("T")
_Ref = tuple[str, str]
_Cursor = psycopg.Cursor[TupleRow]
# A command that failed for good is leased for this many leases: handing its failure to
# its instance twice (after a take-over from a process that only stalled) would run the
# saga's `CommandFailed` handler twice, so it is taken over only after a longer wait.
FAILED_LEASES = 5
# Deadlocks and serialization failures abort a transaction before anything is applied,
# so it is simply run again, this many times at most.
_TRANSIENT_ATTEMPTS = 3
# Expired tombstones a cleanup drops, plus twice the tombstones it leaves.
_PURGE = 256

# Cluster mode (see `sagaflow.stores._claims`). An instance's outbox and inbox rows stay
# in one owner's hands: its first row is claimed when nobody holds it, the rows behind
# it only by the owner of that first row ("followers"), and only up to a row someone
# else still holds. A claim first takes a transaction-level advisory lock per instance
# it means to claim for (skipping instances another claimer is busy with), then decides
# in new statements, which see every claim committed before: two claimers never
# decide about one instance from snapshots that miss each other's claims.
_LEASABLE = "(t.lease_owner IS NULL OR t.lease_expires <= %(now)s)"
_MINE = "unnest(%(msaga)s::text[], %(mkey)s::text[]) AS m(saga, key)"
_LOCKED = "unnest(%(lsaga)s::text[], %(lkey)s::text[]) AS l(saga, key)"
# A row leased to someone else: nothing behind it may be claimed (its lease may expire
# later than the first row's, which someone else took over meanwhile).
_OTHERS = "p.lease_owner <> %(owner)s AND p.lease_expires > %(now)s"
_CLAIMED_OUTBOX = (
    "RETURNING u.id, u.saga, u.key, u.seq, u.kind, u.type_name, u.payload, u.attempts, "
    "u.due, u.error, u.trace, u.failed"
)
_CLAIMED_INBOX = (
    "RETURNING u.pos, u.saga, u.key, u.event_id, u.generated, u.type_name, u.payload, "
    "u.created_at, u.trace"
)


def _claim_statements(table: str, order: str, head: str, head_order: str) -> dict[str, str]:
    """The three statements of a claim on `table` (`outbox` or `inbox`).

    `order` is the column that orders an instance's rows, `head` more conditions on a
    first row, `head_order` the order in which first rows are taken.
    """
    heads = (
        f"t.saga = ANY(%(sagas)s::text[]) AND {_LEASABLE} {head}"
        f" AND NOT EXISTS (SELECT FROM {{s}}.{table} p"
        f" WHERE p.saga = t.saga AND p.key = t.key AND p.{order} < t.{order})"
    )
    row = "id" if table == "outbox" else "pos"
    returning = _CLAIMED_OUTBOX if table == "outbox" else _CLAIMED_INBOX
    expires = (
        "CASE WHEN u.failed THEN %(expires_failed)s ELSE %(expires)s END"
        if table == "outbox"
        else "%(expires)s"
    )
    # A row marked failed is always a first row (later ones wait behind it).
    not_failed = " AND NOT t.failed" if table == "outbox" else ""
    return {
        f"lock_{table}": (
            "WITH c AS MATERIALIZED ("
            f"(SELECT t.saga, t.key FROM {{s}}.{table} t WHERE {heads}"
            f" ORDER BY {head_order} LIMIT %(limit)s)"
            f" UNION SELECT m.saga, m.key FROM {_MINE}) "
            "SELECT c.saga, c.key FROM c WHERE pg_try_advisory_xact_lock("
            "%(space)s::int4, hashtext(c.saga || chr(31) || c.key))"
        ),
        f"claim_{table}_heads": (
            "WITH picked AS ("
            f" SELECT t.{row} FROM {{s}}.{table} t JOIN {_LOCKED}"
            " ON t.saga = l.saga AND t.key = l.key"
            f" WHERE {heads} ORDER BY {head_order} LIMIT %(limit)s"
            " FOR UPDATE OF t SKIP LOCKED) "
            f"UPDATE {{s}}.{table} u SET lease_owner = %(owner)s, lease_expires = {expires} "
            f"FROM picked WHERE u.{row} = picked.{row} {returning}"
        ),
        f"claim_{table}_followers": (
            "WITH picked AS ("
            f" SELECT t.{row} FROM {{s}}.{table} t JOIN {_LOCKED}"
            " ON t.saga = l.saga AND t.key = l.key"
            f" WHERE {_LEASABLE}{not_failed}"
            " AND (SELECT h.lease_owner = %(owner)s AND h.lease_expires > %(now)s"
            f" FROM {{s}}.{table} h WHERE h.saga = t.saga AND h.key = t.key"
            f" ORDER BY h.{order} LIMIT 1)"
            f" AND NOT EXISTS (SELECT FROM {{s}}.{table} p WHERE p.saga = t.saga"
            f" AND p.key = t.key AND p.{order} < t.{order} AND {_OTHERS})"
            f" ORDER BY t.saga, t.key, t.{order} LIMIT %(limit)s"
            # No SKIP LOCKED: a row skipped here would leave a gap in the instance's order.
            " FOR UPDATE OF t) "
            f"UPDATE {{s}}.{table} u SET lease_owner = %(owner)s, lease_expires = %(expires)s "
            f"FROM picked WHERE u.{row} = picked.{row} {returning}"
        ),
    }


CLUSTER_SQL = {
    **_claim_statements(
        "outbox",
        "seq",
        "AND t.due <= %(now)s AND NOT EXISTS (SELECT FROM {s}.instances i"
        " WHERE i.saga = t.saga AND i.key = t.key AND i.status = 'compensation_failed')",
        "t.due, t.saga, t.key, t.seq",
    ),
    **_claim_statements("inbox", "pos", "", "t.pos"),
    "deliver_commands": (
        "DELETE FROM {s}.outbox WHERE id = ANY(%(ids)s::text[]) RETURNING saga, key"
    ),
    "retry_commands": (
        "UPDATE {s}.outbox t SET attempts = r.attempts, due = r.due, error = r.error, "
        "lease_expires = r.due + %(lease)s "
        "FROM unnest(%(ids)s::text[], %(attempts)s::int4[], %(due)s::float8[], "
        "%(error)s::text[]) AS r(id, attempts, due, error) "
        "WHERE t.id = r.id AND t.lease_owner = %(owner)s"
    ),
    "fail_commands": (
        "UPDATE {s}.outbox t SET attempts = r.attempts, error = r.error, failed = true, "
        "lease_expires = %(expires)s "
        "FROM unnest(%(ids)s::text[], %(attempts)s::int4[], %(error)s::text[]) "
        "AS r(id, attempts, error) WHERE t.id = r.id AND t.lease_owner = %(owner)s "
        "RETURNING t.id"
    ),
    "release_commands": (
        "UPDATE {s}.outbox SET lease_owner = NULL, lease_expires = NULL "
        "WHERE id = ANY(%(ids)s::text[]) AND lease_owner = %(owner)s"
    ),
    # Finishing completed instances: lock the candidates, then check again in a new
    # statement (a fresh snapshot): a commit that changed one of them before we locked it
    # is seen, and one after it waits for us and then finds the instance gone.
    "finishable_refs": (
        f"SELECT i.saga, i.key FROM {{s}}.instances i JOIN {_MINE}"
        " ON i.saga = m.saga AND i.key = m.key"
        " WHERE i.status = 'completing' AND NOT EXISTS (SELECT FROM {s}.outbox o"
        " WHERE o.saga = i.saga AND o.key = i.key)"
        " ORDER BY i.saga, i.key FOR UPDATE OF i SKIP LOCKED"
    ),
    "finishable_any": (
        "SELECT i.saga, i.key FROM {s}.instances i"
        " WHERE i.status = 'completing' AND i.saga = ANY(%(sagas)s::text[])"
        " AND NOT EXISTS (SELECT FROM {s}.outbox o WHERE o.saga = i.saga AND o.key = i.key)"
        " ORDER BY i.saga, i.key LIMIT %(limit)s FOR UPDATE OF i SKIP LOCKED"
    ),
    # The instances end and leave their tombstones in one statement (per-saga retention
    # and whether the final state is kept come as arrays); a key reused in between
    # replaces an older tombstone.
    "finish": (
        "WITH gone AS ("
        f" DELETE FROM {{s}}.instances i USING {_MINE}"
        " WHERE i.saga = m.saga AND i.key = m.key AND i.status = 'completing'"
        " AND NOT EXISTS (SELECT FROM {s}.outbox o WHERE o.saga = i.saga AND o.key = i.key)"
        " RETURNING i.saga, i.key, i.instance_id, i.version, i.state, i.state_version),"
        " kept AS ("
        " INSERT INTO {s}.tombstones (saga, key, ended, ended_at, expires_at, instance_id,"
        " version, state, state_version)"
        " SELECT g.saga, g.key, 'completed', %(now)s::float8, %(now)s::float8 + p.retention,"
        " g.instance_id, g.version, CASE WHEN p.keep THEN g.state END, g.state_version FROM gone g"
        " JOIN unnest(%(psaga)s::text[], %(pretention)s::float8[], %(pkeep)s::bool[])"
        " AS p(saga, retention, keep) ON p.saga = g.saga WHERE p.retention > 0"
        " ON CONFLICT (saga, key) DO UPDATE SET ended = excluded.ended,"
        " ended_at = excluded.ended_at, expires_at = excluded.expires_at,"
        " instance_id = excluded.instance_id, version = excluded.version,"
        " state = excluded.state, state_version = excluded.state_version)"
        " SELECT saga, key FROM gone"
    ),
    "finish_purge": (
        "DELETE FROM {s}.tombstones WHERE (saga, key) IN (SELECT saga, key FROM"
        " {s}.tombstones WHERE expires_at < %(now)s ORDER BY expires_at LIMIT %(limit)s)"
    ),
    "finish_schedules": (
        f"DELETE FROM {{s}}.schedules t USING {_MINE} WHERE t.saga = m.saga AND t.key = m.key"
    ),
    "claim_schedules_of": (
        "WITH picked AS ("
        " SELECT t.saga, t.key, t.name FROM {s}.schedules t"
        " WHERE t.due <= %(now)s AND t.saga = ANY(%(sagas)s::text[])"
        f" AND ({_LEASABLE} OR t.lease_owner = %(owner)s)"
        " ORDER BY t.due, t.seq, t.id LIMIT %(limit)s"
        " FOR UPDATE OF t SKIP LOCKED) "
        "UPDATE {s}.schedules u SET lease_owner = %(owner)s, lease_expires = %(expires)s "
        "FROM picked WHERE u.saga = picked.saga AND u.key = picked.key "
        "AND u.name = picked.name "
        "RETURNING u.id, u.saga, u.key, u.name, u.due, u.to_self, u.type_name, u.payload, "
        "u.seq, u.attempts, u.trace"
    ),
    "next_claimable_due": (
        "SELECT t.due FROM {s}.schedules t WHERE t.saga = ANY(%(sagas)s::text[])"
        f" AND ({_LEASABLE} OR t.lease_owner = %(owner)s) ORDER BY t.due LIMIT 1"
    ),
    "put_inbox": (
        "INSERT INTO {s}.inbox (saga, key, event_id, generated, type_name, payload, "
        "created_at, trace) SELECT saga, key, event_id, generated, type_name, payload, "
        "created_at, trace FROM unnest(%(saga)s::text[], %(key)s::text[], "
        "%(event_id)s::text[], %(generated)s::bool[], %(type_name)s::text[], "
        "%(payload)s::text[], %(created_at)s::float8[], %(trace)s::text[]) WITH ORDINALITY "
        "AS r(saga, key, event_id, generated, type_name, payload, created_at, trace, n) "
        "ORDER BY n RETURNING pos"
    ),
    "ack_inbox": (
        "WITH gone AS (DELETE FROM {s}.inbox WHERE pos = ANY(%(positions)s::int8[]) "
        "AND lease_owner = %(owner)s RETURNING saga, key, event_id, generated) "
        "DELETE FROM {s}.dedup_marks d USING gone WHERE gone.generated "
        "AND d.saga = gone.saga AND d.key = gone.key AND d.event_id = gone.event_id"
    ),
    "release_inbox": (
        "UPDATE {s}.inbox SET lease_owner = NULL, lease_expires = NULL "
        "WHERE pos = ANY(%(positions)s::int8[]) AND lease_owner = %(owner)s"
    ),
    "pending_inbox": "SELECT pos FROM {s}.inbox WHERE pos = ANY(%(positions)s::int8[])",
    "list_inbox": (
        "SELECT pos, saga, key, event_id, generated, type_name, payload, created_at, trace "
        "FROM {s}.inbox ORDER BY pos"
    ),
    "scan_inbox": (
        "SELECT pos, saga, key, event_id, generated, type_name, payload, created_at, trace "
        "FROM {s}.inbox WHERE pos > %(after)s ORDER BY pos LIMIT %(limit)s"
    ),
    "renew_commands": (
        "UPDATE {s}.outbox SET lease_expires = greatest(lease_expires, "
        "CASE WHEN failed THEN %(expires_failed)s ELSE %(expires)s END) "
        "WHERE id = ANY(%(ids)s::text[]) AND lease_owner = %(owner)s"
    ),
    "lost_commands": (
        "SELECT id FROM {s}.outbox WHERE id = ANY(%(ids)s::text[]) "
        "AND lease_owner IS DISTINCT FROM %(owner)s"
    ),
    "renew_schedules": (
        "UPDATE {s}.schedules SET lease_expires = %(expires)s "
        "WHERE id = ANY(%(ids)s::text[]) AND lease_owner = %(owner)s"
    ),
    "renew_inbox": (
        "UPDATE {s}.inbox SET lease_expires = %(expires)s "
        "WHERE pos = ANY(%(positions)s::int8[]) AND lease_owner = %(owner)s"
    ),
    "notify": "SELECT pg_notify(%(channel)s, p) FROM unnest(%(payloads)s::text[]) AS p",
}


def _last_by(items: Sequence[OutboxUpdate]) -> list[OutboxUpdate]:
    """`items` without earlier updates of the same row, sorted by id (a stable lock order)."""
    return sorted({item.id: item for item in items}.values(), key=lambda u: u.id)


def _lock_space(schema: str, table: str) -> int:
    """The first key of the advisory locks that claims on `schema.table` take."""
    digest = hashlib.blake2b(f"sagaflow claims {schema}.{table}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _arrays(refs: Sequence[_Ref]) -> dict[str, list[str]]:
    """`(saga, key)` pairs as the `msaga`/`mkey` arrays the statements unnest."""
    return {"msaga": [r[0] for r in refs], "mkey": [r[1] for r in refs]}


class ClusterMethods:
    """The `ClusterStore` methods of `PostgresStore` (see its documentation)."""

    _sql: dict[str, str]
    _lease: float
    _poll_interval: float
    _conninfo: str
    _channel: str
    _schema: str

    if TYPE_CHECKING:  # provided by PostgresStore

        async def _run(self, func: Callable[[_Pool], T]) -> T: ...

        def _translate(self, doing: str) -> contextlib.AbstractContextManager[None]: ...

        def _claim(
            self, pool: _Pool, cls: type[T], name: str, params: dict[str, Any]
        ) -> list[T]: ...

        def _execute(self, pool: _Pool, name: str, params: dict[str, Any]) -> None: ...

        def _select(
            self,
            pool: _Pool,
            cls: type[T],
            doing: str,
            name: str,
            params: Sequence[Any] | dict[str, Any] = (),
            suffix: str = "",
        ) -> list[T]: ...

    @property
    def lease_seconds(self) -> float:
        """Seconds a claim holds in cluster mode (the `lease` argument)."""
        return self._lease

    @property
    def poll_interval(self) -> float:
        """Seconds between looks at the tables in cluster mode when nothing wakes us."""
        return self._poll_interval

    def _claim_rows(
        self, cur: _Cursor, table: str, params: dict[str, Any], mine: Sequence[_Ref]
    ) -> list[tuple[Any, ...]]:
        """Lock the instances to claim for, then claim their first rows and followers."""
        limit = params["limit"]
        params.update(_arrays(sorted(set(mine))), space=_lock_space(self._schema, table))
        cur.execute(self._sql[f"lock_{table}"], params)
        locked = [(saga, key) for saga, key in cur.fetchall()]
        if not locked:
            return []
        params.update(lsaga=[r[0] for r in locked], lkey=[r[1] for r in locked])
        cur.execute(self._sql[f"claim_{table}_heads"], params)
        rows = cur.fetchall()
        params["limit"] = limit - len(rows)
        if params["limit"] > 0:
            cur.execute(self._sql[f"claim_{table}_followers"], params)
            rows.extend(cur.fetchall())
        return rows

    def _transaction(self, pool: _Pool, doing: str, work: Callable[[_Cursor], T]) -> T:
        """Run `work` in one transaction, again if a deadlock or serialization failure
        aborted it (before anything was applied)."""
        with self._translate(doing):
            for attempt in range(1, _TRANSIENT_ATTEMPTS + 1):
                try:
                    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                        return work(cur)
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    if attempt == _TRANSIENT_ATTEMPTS:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def claim_commands(
        self,
        owner: str,
        now: float,
        limit: int,
        *,
        sagas: Sequence[str],
        mine: Sequence[_Ref],
    ) -> list[ClaimedCommand]:
        """Lease due outbox rows to `owner`, keeping each instance's rows in one hand.

        An instance's first row (lowest `seq`) is claimed when it is due, nobody holds it
        (or the lease expired) and the instance's compensation has not failed; a first
        row marked failed comes back as `ClaimedCommand(failed=True)`. For the instances
        in `mine`, the rows behind a first row that `owner` holds are claimed too. No
        other owner gets rows of an instance while its first row is leased.

        Args:
            owner: The claiming process.
            now: Wall-clock seconds.
            limit: The most rows to claim.
            sagas: Claim rows of these sagas only.
            mine: Instances whose following rows to claim.

        Returns:
            The claimed rows, ordered by saga, key and seq.
        """
        if limit <= 0 or not sagas:
            await anyio.lowlevel.checkpoint()
            return []
        params: dict[str, Any] = {
            "owner": owner,
            "now": now,
            "expires": now + self._lease,
            "expires_failed": now + self._lease * FAILED_LEASES,
            "limit": limit,
            "sagas": list(sagas),
        }

        def claim(cur: _Cursor) -> list[tuple[Any, ...]]:
            return self._claim_rows(cur, "outbox", params, mine)

        found = await self._run(lambda pool: self._transaction(pool, "claim commands", claim))
        claimed = [ClaimedCommand(OutboxRecord(*row[:11]), row[11]) for row in found]
        return sorted(claimed, key=lambda c: (c.row.saga, c.row.key, c.row.seq))

    async def settle_commands(
        self,
        owner: str,
        now: float,
        *,
        delivered: Sequence[str] = (),
        retries: Sequence[OutboxUpdate] = (),
        failed: Sequence[OutboxUpdate] = (),
        released: Sequence[str] = (),
    ) -> Settled:
        """Record what became of `owner`'s leased outbox rows, in one transaction.

        Deletes the `delivered` rows; records `retries` (the row stays leased until its
        new due time plus a lease); marks `failed` rows failed for good (still leased,
        so their instance's later rows stay held until the failure is handled); gives
        up the leases of `released` rows. Updates of rows `owner` no longer holds are
        skipped.

        Returns:
            The instances whose rows were deleted, and the rows marked failed (those
            `owner` still held).
        """
        if not (delivered or retries or failed or released):
            await anyio.lowlevel.checkpoint()
            return Settled([], [])
        sql = self._sql

        def settle(cur: _Cursor) -> Settled:
            refs: set[_Ref] = set()
            marked: list[str] = []
            if delivered:
                cur.execute(sql["deliver_commands"], {"ids": sorted(set(delivered))})
                refs.update((saga, key) for saga, key in cur.fetchall())
            if retries:
                ups = _last_by(retries)
                cur.execute(
                    sql["retry_commands"],
                    {
                        "owner": owner,
                        "lease": self._lease,
                        "ids": [u.id for u in ups],
                        "attempts": [u.attempts for u in ups],
                        "due": [float(u.due) for u in ups],
                        "error": [u.error for u in ups],
                    },
                )
            if failed:
                ups = _last_by(failed)
                cur.execute(
                    sql["fail_commands"],
                    {
                        "owner": owner,
                        "expires": now + self._lease * FAILED_LEASES,
                        "ids": [u.id for u in ups],
                        "attempts": [u.attempts for u in ups],
                        "error": [u.error for u in ups],
                    },
                )
                marked = sorted(row_id for (row_id,) in cur.fetchall())
            if released:
                cur.execute(sql["release_commands"], {"owner": owner, "ids": sorted(set(released))})
            return Settled(sorted(refs), marked)

        return await self._run(lambda pool: self._transaction(pool, "settle commands", settle))

    async def finish_completed(
        self,
        refs: Sequence[_Ref] | None,
        *,
        sagas: Sequence[str],
        limit: int,
        now: float,
        tombstones: Mapping[str, TombstonePolicy],
    ) -> list[_Ref]:
        """Delete completing instances that have no outbox row left, leaving tombstones.

        A completed instance ends once its last command is dispatched, possibly by
        another process than the one that completed it: whoever dispatched it calls this.
        Instances locked by a commit under way are skipped (a later call gets them).
        In the same transaction, each instance leaves a tombstone (`"completed"`, at
        `now`) as its saga's policy says, and a bounded number of expired tombstones is
        purged.

        Args:
            refs: The instances to look at, or `None` for any (up to `limit`).
            sagas: With `refs=None`, look at instances of these sagas only.
            limit: With `refs=None`, the most instances to delete.
            now: Wall-clock seconds: when they ended.
            tombstones: Each saga's tombstone policy; a saga missing here leaves none.

        Returns:
            The instances deleted, sorted.
        """
        if (refs is not None and not refs) or (refs is None and not sagas):
            await anyio.lowlevel.checkpoint()
            return []
        sql = self._sql
        names = sorted(tombstones)
        policies = {
            "now": now,
            "psaga": names,
            "pretention": [float(tombstones[n].retention) for n in names],
            "pkeep": [tombstones[n].keep_state for n in names],
        }

        def finish(cur: _Cursor) -> list[_Ref]:
            if refs is None:
                cur.execute(sql["finishable_any"], {"sagas": list(sagas), "limit": limit})
            else:
                wanted = sorted(set(refs))
                cur.execute(sql["finishable_refs"], _arrays(wanted))
            candidates = [(saga, key) for saga, key in cur.fetchall()]
            if not candidates:
                return []
            cur.execute(sql["finish"], {**_arrays(candidates), **policies})
            gone = sorted((saga, key) for saga, key in cur.fetchall())
            if gone:
                cur.execute(sql["finish_schedules"], _arrays(gone))
                purge = {"now": now, "limit": _PURGE + 2 * len(gone)}
                cur.execute(sql["finish_purge"], purge)
            return gone

        return await self._run(lambda pool: self._transaction(pool, "finish instances", finish))

    async def claim_schedules(
        self, owner: str, now: float, limit: int, *, sagas: Sequence[str]
    ) -> list[ScheduleRecord]:
        """Lease up to `limit` schedules of `sagas` due at or before `now` to `owner`.

        Like `claim_due_schedules`, with a lease of `lease` seconds: schedules `owner`
        holds already come again, with the lease renewed.

        Returns:
            The claimed schedules, earliest due first.
        """
        if limit <= 0 or not sagas:
            await anyio.lowlevel.checkpoint()
            return []
        params = {
            "owner": owner,
            "now": now,
            "expires": now + self._lease,
            "limit": limit,
            "sagas": list(sagas),
        }
        rows: list[ScheduleRecord] = await self._run(
            lambda pool: self._claim(pool, ScheduleRecord, "claim_schedules_of", params)
        )
        return sorted(rows, key=lambda s: (s.due, s.seq, s.id))

    async def next_claimable_due(
        self, owner: str, now: float, *, sagas: Sequence[str]
    ) -> float | None:
        """The earliest due time of a schedule of `sagas` that `owner` could claim."""
        if not sagas:
            await anyio.lowlevel.checkpoint()
            return None
        params = {"owner": owner, "now": now, "sagas": list(sagas)}

        def query(pool: _Pool) -> float | None:
            with self._translate("read the next due time"), pool.connection() as conn:
                row = conn.execute(self._sql["next_claimable_due"], params).fetchone()
            return None if row is None else float(row[0])

        return await self._run(query)

    async def put_inbox(self, rows: Sequence[InboxRecord]) -> list[int]:
        """Insert events into the shared inbox in one transaction.

        Args:
            rows: One row per routed instance; their `pos` is ignored.

        Returns:
            The positions the rows got, in their order.
        """
        if not rows:
            await anyio.lowlevel.checkpoint()
            return []
        params = {
            "saga": [r.saga for r in rows],
            "key": [r.key for r in rows],
            "event_id": [r.event_id for r in rows],
            "generated": [r.generated for r in rows],
            "type_name": [r.type_name for r in rows],
            "payload": [r.payload for r in rows],
            "created_at": [float(r.created_at) for r in rows],
            "trace": [r.trace for r in rows],
        }

        def put(cur: _Cursor) -> list[int]:
            cur.execute(self._sql["put_inbox"], params)
            return [pos for (pos,) in cur.fetchall()]

        return await self._run(lambda pool: self._transaction(pool, "publish to the inbox", put))

    async def claim_inbox(
        self,
        owner: str,
        now: float,
        limit: int,
        *,
        sagas: Sequence[str],
        mine: Sequence[_Ref],
    ) -> list[InboxRecord]:
        """Lease inbox rows to `owner`, keeping each instance's events in one hand.

        An instance's first row is claimed when nobody holds it (or the lease expired);
        for the instances in `mine`, the rows behind a first row `owner` holds are
        claimed too. So one process at a time handles an instance's events, in order.

        Args:
            owner: The claiming process.
            now: Wall-clock seconds.
            limit: The most rows to claim.
            sagas: Claim rows of these sagas only.
            mine: Instances whose following rows to claim.

        Returns:
            The claimed rows, in inbox order.
        """
        if limit <= 0 or not sagas:
            await anyio.lowlevel.checkpoint()
            return []
        params: dict[str, Any] = {
            "owner": owner,
            "now": now,
            "expires": now + self._lease,
            "limit": limit,
            "sagas": list(sagas),
        }

        def claim(cur: _Cursor) -> list[tuple[Any, ...]]:
            return self._claim_rows(cur, "inbox", params, mine)

        found = await self._run(lambda pool: self._transaction(pool, "claim inbox rows", claim))
        return sorted((InboxRecord(*row) for row in found), key=lambda r: r.pos)

    async def ack_inbox(self, owner: str, positions: Sequence[int]) -> None:
        """Delete handled inbox rows that `owner` still holds, and the dedup marks of
        their made-up event ids (a row that is gone cannot be delivered again, so its
        mark has done its job). A row whose lease another process took over (this one
        stalled past it) stays, and so does its mark: that process finds the event
        applied, as a duplicate, and acknowledges it itself."""
        if not positions:
            await anyio.lowlevel.checkpoint()
            return
        params = {"owner": owner, "positions": sorted(set(positions))}
        await self._run(
            lambda pool: self._transaction(
                pool,
                "acknowledge inbox rows",
                lambda cur: cur.execute(self._sql["ack_inbox"], params),
            )
        )

    async def release_inbox(self, owner: str, positions: Sequence[int]) -> None:
        """Give up `owner`'s leases on these inbox rows: anyone may claim them again."""
        if not positions:
            await anyio.lowlevel.checkpoint()
            return
        params = {"owner": owner, "positions": sorted(set(positions))}
        await self._run(lambda pool: self._execute(pool, "release_inbox", params))

    async def pending_inbox(self, positions: Sequence[int]) -> set[int]:
        """Which of these positions are still in the inbox (not handled yet)."""
        if not positions:
            await anyio.lowlevel.checkpoint()
            return set()
        params = {"positions": list(positions)}

        def query(pool: _Pool) -> set[int]:
            with self._translate("read the inbox"), pool.connection() as conn:
                return {pos for (pos,) in conn.execute(self._sql["pending_inbox"], params)}

        return await self._run(query)

    async def list_inbox(self) -> list[InboxRecord]:
        """Every inbox row (events published but not handled yet), in inbox order."""
        return await self._run(
            lambda pool: self._select(pool, InboxRecord, "list rows", "list_inbox")
        )

    async def scan_inbox(self, *, after: int | None = None, limit: int) -> list[InboxRecord]:
        """Up to `limit` inbox rows ordered by position, those after `after` only (see
        `Store.scan_instances`)."""
        params = {"after": -(2**63) if after is None else after, "limit": limit}
        return await self._run(
            lambda pool: self._select(pool, InboxRecord, "scan rows", "scan_inbox", params)
        )

    async def renew_leases(
        self,
        owner: str,
        now: float,
        *,
        commands: Sequence[str] = (),
        schedules: Sequence[str] = (),
        inbox: Sequence[int] = (),
    ) -> list[str]:
        """Extend `owner`'s leases on these rows to at least `now + lease`.

        Returns:
            The ids of the `commands` that someone else holds now: `owner` lost their
            leases (it stalled for longer than a lease) and must leave them alone.
        """
        if not (commands or schedules or inbox):
            await anyio.lowlevel.checkpoint()
            return []
        expires = now + self._lease
        sql = self._sql

        def renew(cur: _Cursor) -> list[str]:
            lost: list[str] = []
            if commands:
                params = {
                    "owner": owner,
                    "expires": expires,
                    "expires_failed": now + self._lease * FAILED_LEASES,
                    "ids": sorted(set(commands)),
                }
                cur.execute(sql["renew_commands"], params)
                cur.execute(sql["lost_commands"], params)
                lost = [row_id for (row_id,) in cur.fetchall()]
            if schedules:
                params = {"owner": owner, "expires": expires, "ids": sorted(set(schedules))}
                cur.execute(sql["renew_schedules"], params)
            if inbox:
                params = {"owner": owner, "expires": expires, "positions": sorted(set(inbox))}
                cur.execute(sql["renew_inbox"], params)
            return lost

        return await self._run(lambda pool: self._transaction(pool, "renew leases", renew))

    async def notify(self, payloads: Sequence[str]) -> None:
        """Send `payloads` on this store's channel to every listener (other processes).

        Sent after the commits they announce, in a statement of their own: a NOTIFY
        inside a commit would serialize commits on PostgreSQL's notification queue lock.
        """
        if not payloads:
            await anyio.lowlevel.checkpoint()
            return
        params = {"channel": self._channel, "payloads": list(payloads)}
        await self._run(lambda pool: self._execute(pool, "notify", params))

    def listener(self) -> PostgresListener:
        """A new listener on this store's channel, on a connection of its own."""
        return PostgresListener(self)


class PostgresListener:
    """LISTENs on a store's channel on a dedicated connection, for one worker thread.

    `wait` blocks (in a worker thread) until notifications arrive, the timeout passes,
    or `interrupt` is called from any thread. The connection opens on first use and
    again after it failed.
    """

    def __init__(self, store: ClusterMethods) -> None:
        self._store = store
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False

    def __repr__(self) -> str:
        return f"<PostgresListener on {self._store!r}>"

    def wait(self, timeout: float) -> list[str]:
        """Wait up to `timeout` seconds; return the payloads received (maybe none).

        Raises:
            StoreError: The connection failed (the next call connects again).
        """
        with self._lock:
            if self._closed:
                return []
            store = self._store
            try:
                with store._translate("listen for notifications"):
                    if self._conn is None:
                        conn = psycopg.connect(store._conninfo, autocommit=True)
                        conn.execute(f'LISTEN "{store._channel}"')
                        self._conn = conn
                    conn = self._conn
                    wake = self._wake_r.fileno()
                    ready, _, _ = select.select([conn.fileno(), wake], [], [], timeout)
                    if wake in ready:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                    return [n.payload for n in conn.notifies(timeout=0)]
            except StoreError:
                self._disconnect()
                raise

    def interrupt(self) -> None:
        """Make a `wait` under way (or the next one) return at once."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close the connection (after a `wait` under way returned)."""
        self.interrupt()
        with self._lock:
            self._closed = True
            self._disconnect()
            self._wake_r.close()
            self._wake_w.close()
