"""`ClusterStoreConformance`: the behaviour every `ClusterStore` must show."""

from __future__ import annotations

import anyio
import anyio.to_thread
import attrs

from ...stores import (
    COMPENSATION_FAILED,
    COMPLETED,
    COMPLETING,
    Changes,
    ClaimedCommand,
    ClusterStore,
    DedupMark,
    InboxRecord,
    InstanceWrite,
    LoadRequest,
    OutboxUpdate,
    Settled,
    Store,
    Tombstone,
    TombstonePolicy,
    TombstoneWrite,
)
from ._records import SAGA, TRACE, inbox_row, instance, outbox_row, scan_pages, schedule
from ._store import StoreConformance

_NOW = 1_000.0
"""The time the cluster tests claim at (wall-clock seconds)."""


async def _put(store: ClusterStore, *rows: InboxRecord) -> list[InboxRecord]:
    """Put `rows` in the inbox; return them as stored (with their positions)."""
    positions = await store.put_inbox(rows)
    return [attrs.evolve(r, pos=p) for r, p in zip(rows, positions, strict=True)]


def _ids(claimed: list[ClaimedCommand]) -> list[tuple[str, bool]]:
    return [(c.row.id, c.failed) for c in claimed]


class ClusterStoreConformance(StoreConformance):
    """Tests of the `ClusterStore` protocol, on top of the `Store` ones."""

    async def test_satisfies_the_cluster_store_protocol(self, store: Store) -> None:
        assert isinstance(store, ClusterStore)
        assert store.lease_seconds > 0
        assert store.poll_interval > 0

    # -- the inbox

    async def test_inbox_rows_get_increasing_positions_and_round_trip(
        self, store: ClusterStore
    ) -> None:
        first = await _put(
            store, inbox_row("a", "e1"), attrs.evolve(inbox_row("b", "e2"), trace=TRACE)
        )
        second = await _put(store, inbox_row("a", "e3", generated=True))
        rows = first + second
        positions = [r.pos for r in rows]

        assert positions == sorted(set(positions))
        assert await store.list_inbox() == rows
        assert await store.pending_inbox([*positions, max(positions) + 1000]) == set(positions)
        assert await scan_pages(store.scan_inbox, lambda r: r.pos, limit=2) == [rows[:2], rows[2:]]
        assert await store.put_inbox([]) == []

    async def test_an_instances_inbox_rows_are_held_by_one_owner_in_order(
        self, store: ClusterStore
    ) -> None:
        a1, b1, a2 = await _put(
            store, inbox_row("a", "e1"), inbox_row("b", "e2"), inbox_row("a", "e3")
        )
        sagas = [SAGA]

        first = await store.claim_inbox("p1", _NOW, 1, sagas=sagas, mine=[])
        other = await store.claim_inbox("p2", _NOW, 10, sagas=sagas, mine=[])
        following = await store.claim_inbox("p1", _NOW, 10, sagas=sagas, mine=[(SAGA, "a")])
        nothing = await store.claim_inbox("p3", _NOW, 10, sagas=sagas, mine=[])

        assert (first, other, following, nothing) == ([a1], [b1], [a2], [])
        assert await store.claim_inbox("p1", _NOW, 10, sagas=["Other"], mine=[]) == []

    async def test_an_expired_inbox_lease_is_taken_over_and_a_renewed_one_is_not(
        self, store: ClusterStore
    ) -> None:
        a1, b1 = await _put(store, inbox_row("a", "e1"), inbox_row("b", "e2"))
        lease = store.lease_seconds
        assert await store.claim_inbox("p1", _NOW, 10, sagas=[SAGA], mine=[]) == [a1, b1]

        await store.renew_leases("p1", _NOW + lease / 2, inbox=[b1.pos])
        taken = await store.claim_inbox("p2", _NOW + lease, 10, sagas=[SAGA], mine=[])

        assert taken == [a1]

    async def test_acked_rows_go_with_the_marks_of_made_up_ids_and_released_rows_are_free(
        self, store: ClusterStore
    ) -> None:
        given, made_up, kept = await _put(
            store,
            inbox_row("a", "given"),
            inbox_row("b", "made-up", generated=True),
            inbox_row("c", "kept", generated=True),
        )
        marks = [DedupMark(SAGA, r.key, r.event_id, _NOW + 100) for r in (given, made_up, kept)]
        await store.commit(Changes(marks=marks))
        await store.claim_inbox("p1", _NOW, 2, sagas=[SAGA], mine=[])
        await store.claim_inbox("p2", _NOW, 2, sagas=[SAGA], mine=[])

        await store.ack_inbox("p1", [given.pos, made_up.pos, kept.pos])  # kept is p2's
        await store.release_inbox("p2", [kept.pos])
        left = await store.load(
            LoadRequest(marks=[(SAGA, m.key, m.event_id) for m in marks], now=_NOW)
        )

        assert await store.list_inbox() == [kept]
        assert left.marks == {(SAGA, "a", "given"), (SAGA, "c", "kept")}
        assert await store.claim_inbox("p3", _NOW, 5, sagas=[SAGA], mine=[]) == [kept]

    # -- commands

    async def test_due_head_commands_are_claimed_with_their_followers(
        self, store: ClusterStore
    ) -> None:
        stuck = instance("c", status=COMPENSATION_FAILED)
        lease = store.lease_seconds
        await store.commit(
            Changes(
                writes=[InstanceWrite(stuck, 0)],
                outbox_adds=[
                    outbox_row("a1", key="a", seq=1, trace=TRACE),
                    outbox_row("a2", key="a", seq=2),
                    outbox_row("b1", key="b", seq=1, due=_NOW + lease / 2),  # backing off
                    outbox_row("c1", key="c", seq=1),  # its compensation failed: held
                ],
            )
        )

        claimed = await store.claim_commands("p1", _NOW, 10, sagas=[SAGA], mine=[])
        other = await store.claim_commands("p2", _NOW + lease / 2, 10, sagas=[SAGA], mine=[])

        assert claimed == [
            ClaimedCommand(outbox_row("a1", key="a", seq=1, trace=TRACE)),
            ClaimedCommand(outbox_row("a2", key="a", seq=2)),
        ]
        assert _ids(other) == [("b1", False)]

    async def test_settled_commands_are_deleted_retried_failed_or_released(
        self, store: ClusterStore
    ) -> None:
        rows = [outbox_row(f"{k}1", key=k) for k in "abcd"]
        await store.commit(Changes(outbox_adds=rows))
        lease = store.lease_seconds
        await store.claim_commands("p1", _NOW, 10, sagas=[SAGA], mine=[])

        settled = await store.settle_commands(
            "p1",
            _NOW,
            delivered=["a1"],
            retries=[OutboxUpdate("b1", 1, _NOW + 5, "E: later")],
            failed=[OutboxUpdate("c1", 3, 0.0, "E: for good")],
            released=["d1"],
        )

        assert settled == Settled([(SAGA, "a")], ["c1"])
        assert [r.id for r in await store.list_outbox()] == ["b1", "c1", "d1"]
        # Released: free at once. Retried: held until its due time plus a lease.
        assert _ids(await store.claim_commands("p2", _NOW, 10, sagas=[SAGA], mine=[])) == [
            ("d1", False)
        ]
        retried = await store.claim_commands("p3", _NOW + 5 + lease, 10, sagas=[SAGA], mine=[])
        assert [c.row for c in retried if c.row.id == "b1"] == [
            outbox_row("b1", key="b", attempts=1, due=_NOW + 5, error="E: later")
        ]
        # Failed for good: leased for longer than a lease; whoever takes it over once
        # that lease expired must hand the failure to its instance.
        taken = await store.claim_commands("p4", _NOW + 1e6 * lease, 10, sagas=[SAGA], mine=[])
        assert ("c1", True) in _ids(taken)

    async def test_only_the_owner_settles_or_keeps_its_commands(self, store: ClusterStore) -> None:
        await store.commit(Changes(outbox_adds=[outbox_row("a1", key="a")]))
        lease = store.lease_seconds
        await store.claim_commands("p1", _NOW, 10, sagas=[SAGA], mine=[])
        await store.claim_commands("p2", _NOW + lease, 10, sagas=[SAGA], mine=[])  # took over

        lost = await store.renew_leases("p1", _NOW + lease, commands=["a1"])
        settled = await store.settle_commands(
            "p1", _NOW + lease, failed=[OutboxUpdate("a1", 2, 0.0, "E")]
        )

        assert (lost, settled) == (["a1"], Settled([], []))
        assert await store.list_outbox() == [outbox_row("a1", key="a")]

    async def test_completed_instances_end_once_their_outbox_is_empty(
        self, store: ClusterStore
    ) -> None:
        done = instance("done", status=COMPLETING, completed=True)
        waiting = instance("waiting", status=COMPLETING, completed=True)
        await store.commit(
            Changes(
                writes=[InstanceWrite(r, 0) for r in (done, waiting, instance("active"))],
                schedule_puts=[schedule("s1", key="done")],
                outbox_adds=[outbox_row("w1", key="waiting")],
            )
        )

        policies = {SAGA: TombstonePolicy(60.0, keep_state=True)}
        ended = await store.finish_completed(
            [(SAGA, "done"), (SAGA, "waiting")],
            sagas=[SAGA],
            limit=10,
            now=_NOW,
            tombstones=policies,
        )
        again = await store.finish_completed(
            None, sagas=[SAGA], limit=10, now=_NOW, tombstones=policies
        )

        assert (ended, again) == ([(SAGA, "done")], [])
        assert [r.key for r in await store.list_instances()] == ["active", "waiting"]
        assert await store.list_schedules() == []
        assert await store.list_tombstones() == [
            Tombstone(SAGA, "done", COMPLETED, _NOW, _NOW + 60.0, done.instance_id, 1, done.state)
        ]

    async def test_completed_instances_leave_tombstones_as_their_saga_says(
        self, store: ClusterStore
    ) -> None:
        """The final state only for sagas that keep it, nothing for a retention of 0 or
        a saga without a policy; an older tombstone of the key is replaced."""
        finished = [
            instance(key, saga=saga, version=3, status=COMPLETING, completed=True)
            for saga in ("Keep", "Plain", "None", "Unknown")
            for key in ("k1",)
        ]
        stale = Tombstone("Plain", "k1", "aborted", 1.0, 2.0, "old", 9)
        await store.commit(
            Changes(
                writes=[InstanceWrite(r, 0) for r in finished],
                tombstones=[TombstoneWrite(stale)],
            )
        )
        sagas = ["Keep", "Plain", "None", "Unknown"]
        policies = {
            "Keep": TombstonePolicy(10.0, keep_state=True),
            "Plain": TombstonePolicy(20.0),
            "None": TombstonePolicy(0.0, keep_state=True),
        }

        ended = await store.finish_completed(
            None, sagas=sagas, limit=10, now=_NOW, tombstones=policies
        )

        assert ended == sorted((s, "k1") for s in sagas)
        keep, plain = finished[0], finished[1]
        assert await store.list_tombstones() == [
            Tombstone("Keep", "k1", COMPLETED, _NOW, _NOW + 10.0, keep.instance_id, 3, keep.state),
            Tombstone("Plain", "k1", COMPLETED, _NOW, _NOW + 20.0, plain.instance_id, 3),
        ]

    # -- schedules

    async def test_due_schedules_are_claimed_under_a_lease(self, store: ClusterStore) -> None:
        timers = [
            schedule("s1", key="a", due=_NOW - 1, trace=TRACE),
            schedule("s2", key="b", due=_NOW),
            schedule("s3", key="c", due=_NOW + 10),
        ]
        await store.commit(Changes(schedule_puts=timers))
        lease = store.lease_seconds

        first = await store.claim_schedules("p1", _NOW, 1, sagas=[SAGA])
        second = await store.claim_schedules("p2", _NOW, 10, sagas=[SAGA])
        due_for_p3 = await store.next_claimable_due("p3", _NOW, sagas=[SAGA])
        await store.release_schedules(["s2"], owner="p2")
        after_release = await store.claim_schedules("p3", _NOW, 10, sagas=[SAGA])
        own_again = await store.claim_schedules("p1", _NOW + 1, 10, sagas=[SAGA])
        expired = await store.claim_schedules("p4", _NOW + 10 + lease, 10, sagas=[SAGA])

        assert (first, second, after_release) == ([timers[0]], [timers[1]], [timers[1]])
        assert due_for_p3 == _NOW + 10
        assert own_again == [timers[0]]
        assert expired == timers
        assert await store.next_claimable_due("p5", _NOW, sagas=["Other"]) is None

    # -- wake-ups

    async def test_a_listener_hears_what_is_notified(self, store: ClusterStore) -> None:
        listener = store.listener()
        try:
            await anyio.to_thread.run_sync(listener.wait, 0.1)  # connects and listens
            await store.notify(["i-token", "o-token"])
            heard: list[str] = []
            with anyio.fail_after(30):
                while len(heard) < 2:
                    heard += await anyio.to_thread.run_sync(listener.wait, 1.0)
            listener.interrupt()
            with anyio.fail_after(30):
                await anyio.to_thread.run_sync(listener.wait, 60.0)  # returns at once
        finally:
            await anyio.to_thread.run_sync(listener.close)

        assert heard == ["i-token", "o-token"]
