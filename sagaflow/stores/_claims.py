"""What a store must offer so that several runtime processes can share it (cluster mode).

`Runtime(cluster=True)` needs more than the `Store` protocol: an inbox that processes
consume as competing consumers, outbox rows and due schedules handed out with leases,
a cleanup for completed instances whose commands another process dispatched, and a way
to wake the other processes. `PostgresStore` implements it; this module holds the
protocol and its records, free of any database driver.

Leases: a claimed row belongs to its `owner` until `lease_expires` (wall-clock seconds).
Nobody else claims it meanwhile; once the lease expires (its process died or stalled),
anyone may. Owners renew the leases of rows they still work on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from ._protocol import OutboxRecord, OutboxUpdate, ScheduleRecord, Store, TombstonePolicy

__all__ = ["ClaimedCommand", "ClusterStore", "InboxRecord", "Listener", "Settled"]

_Ref = tuple[str, str]


@attrs.frozen
class InboxRecord:
    """An event waiting in the shared inbox for one instance (one row per routed target).

    Attributes:
        pos: Position in the inbox, assigned on insert; orders an instance's events.
        saga: The saga's name.
        key: The instance key.
        event_id: The publisher's event id, or one made up for this publish.
        generated: `event_id` was made up: its dedup mark can go once the row is done.
        type_name: The event's stable type name.
        payload: The event as JSON text.
        created_at: Wall-clock seconds when it was published.
        trace: The trace context current where it was published, as JSON text, or
            `None`.
    """

    pos: int
    saga: str
    key: str
    event_id: str
    generated: bool
    type_name: str
    payload: str
    created_at: float
    trace: str | None = None


@attrs.frozen
class ClaimedCommand:
    """An outbox row leased to the claimer.

    Attributes:
        row: The command.
        failed: It failed for good in a process that did not finish handing the failure
            to its instance (that process died); the claimer must do it.
    """

    row: OutboxRecord
    failed: bool = False


@attrs.frozen
class Settled:
    """What `ClusterStore.settle_commands` did.

    Attributes:
        instances: The instances whose rows were deleted, sorted.
        failed: The rows marked failed for good; the others asked for had been taken
            over by another owner (who must deal with them now).
    """

    instances: list[tuple[str, str]]
    failed: list[str]


class Listener(Protocol):
    """Blocking calls for one worker thread that waits for other processes' wake-ups."""

    def wait(self, timeout: float) -> list[str]:
        """Wait up to `timeout` seconds; return the payloads received (maybe none).

        Raises:
            StoreError: The connection failed; call `wait` again to reconnect.
        """
        ...

    def interrupt(self) -> None:
        """Make a `wait` under way (or the next one) return at once; any thread may call."""
        ...

    def close(self) -> None:
        """Close the connection; waits for a `wait` under way to return."""
        ...


@runtime_checkable
class ClusterStore(Store, Protocol):
    """A `Store` that several runtime processes can share (`Runtime(cluster=True)`).

    Attributes:
        lease_seconds: How long a claim holds before someone else may take the row.
        poll_interval: Seconds between looks at the store when no wake-up arrives.
    """

    @property
    def lease_seconds(self) -> float: ...

    @property
    def poll_interval(self) -> float: ...

    async def claim_commands(
        self, owner: str, now: float, limit: int, *, sagas: Sequence[str], mine: Sequence[_Ref]
    ) -> list[ClaimedCommand]:
        """Lease due outbox rows to `owner`, keeping each instance's rows in one hand.

        An instance's first row is claimed when it is due, unleased (or its lease
        expired) and the instance's compensation has not failed; the rows behind a
        first row leased to `owner` are claimed for the instances in `mine`. No other
        owner gets rows of an instance while its first row is leased.
        """
        ...

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
        """Record what became of leased rows, in one transaction.

        Deletes `delivered` rows; records `retries` (kept leased until their due time
        plus a lease); marks `failed` rows as failed for good (still leased, for longer);
        releases the leases of `released` rows. Only rows `owner` holds are updated.
        """
        ...

    async def finish_completed(
        self,
        refs: Sequence[_Ref] | None,
        *,
        sagas: Sequence[str],
        limit: int,
        now: float,
        tombstones: Mapping[str, TombstonePolicy],
    ) -> list[_Ref]:
        """Delete completing instances (of `refs`, or any) that have no outbox row left,
        each leaving a `"completed"` tombstone as its saga's policy in `tombstones` says,
        in the same transaction.

        Returns the instances deleted.
        """
        ...

    async def claim_schedules(
        self, owner: str, now: float, limit: int, *, sagas: Sequence[str]
    ) -> list[ScheduleRecord]:
        """Lease due schedules to `owner` (those it holds already come again)."""
        ...

    async def release_schedules(self, ids: Sequence[str], *, owner: str | None = None) -> None:
        """Give up `owner`'s leases on these schedules."""
        ...

    async def next_claimable_due(
        self, owner: str, now: float, *, sagas: Sequence[str]
    ) -> float | None:
        """The earliest due time of a schedule `owner` could claim, if any."""
        ...

    async def put_inbox(self, rows: Sequence[InboxRecord]) -> list[int]:
        """Insert events into the inbox in one transaction; returns their positions.

        The `pos` of the given records is ignored.
        """
        ...

    async def claim_inbox(
        self, owner: str, now: float, limit: int, *, sagas: Sequence[str], mine: Sequence[_Ref]
    ) -> list[InboxRecord]:
        """Lease inbox rows to `owner`: the first row of instances nobody holds, and the
        rows behind a first row `owner` holds for the instances in `mine`."""
        ...

    async def ack_inbox(self, owner: str, positions: Sequence[int]) -> None:
        """Delete handled inbox rows that `owner` still holds, with the dedup marks of
        their made-up event ids (a row another process took over stays, with its mark)."""
        ...

    async def release_inbox(self, owner: str, positions: Sequence[int]) -> None:
        """Give up `owner`'s leases on these inbox rows."""
        ...

    async def pending_inbox(self, positions: Sequence[int]) -> set[int]:
        """Which of these positions are still in the inbox."""
        ...

    async def list_inbox(self) -> list[InboxRecord]:
        """Every inbox row, in inbox order."""
        ...

    async def scan_inbox(self, *, after: int | None = None, limit: int) -> list[InboxRecord]:
        """Up to `limit` inbox rows ordered by position, those after `after` only (keyset
        pagination, as `Store.scan_instances`)."""
        ...

    async def renew_leases(
        self,
        owner: str,
        now: float,
        *,
        commands: Sequence[str] = (),
        schedules: Sequence[str] = (),
        inbox: Sequence[int] = (),
    ) -> list[str]:
        """Extend `owner`'s leases on these rows to `now + lease_seconds`.

        Returns the ids of the `commands` someone else holds now (`owner` lost them).
        """
        ...

    async def notify(self, payloads: Sequence[str]) -> None:
        """Wake the other processes' listeners with these payloads."""
        ...

    def listener(self) -> Listener:
        """A new listener on this store's wake-up channel (its connection opens lazily)."""
        ...
