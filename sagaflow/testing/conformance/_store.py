"""`StoreConformance`: the behaviour every `Store` must show."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import attrs
import pytest

from ...exceptions import ConflictError
from ...stores import (
    ABORTED,
    ACTIVE,
    COMPENSATION_FAILED,
    COMPLETING,
    Association,
    Changes,
    DedupMark,
    InstanceDelete,
    InstanceWrite,
    Loaded,
    LoadRequest,
    OutboxUpdate,
    PendingCommand,
    RowCounts,
    ScheduleDelete,
    Store,
    Tombstone,
    TombstoneWrite,
)
from ._records import (
    SAGA,
    TRACE,
    create,
    dead_letter,
    empty_loaded,
    everything,
    everything_once,
    instance,
    outbox_row,
    scan_pages,
    schedule,
    tombstone,
)

_BACKENDS = ["asyncio", *(["trio"] if importlib.util.find_spec("trio") else [])]


@pytest.mark.anyio
class StoreConformance:
    """Tests of the `Store` protocol; subclasses provide the `store` fixture."""

    @pytest.fixture(params=_BACKENDS)
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        """Every test runs on each installed backend: asyncio, and trio if installed."""
        return str(request.param)

    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        """An opened, empty store, closed after the test: subclasses provide it."""
        raise NotImplementedError("subclass StoreConformance and define the `store` fixture")
        yield  # pragma: no cover - a generator fixture

    # -- basics

    async def test_satisfies_the_store_protocol(self, store: Store) -> None:
        assert isinstance(store, Store)

    async def test_a_fresh_store_is_empty(self, store: Store) -> None:
        assert await everything(store) == ([], [], [], [], None)
        request = LoadRequest(
            instances=[(SAGA, "k1")],
            marks=[(SAGA, "k1", "e1")],
            schedule_ids=["s1"],
            now=0.0,
        )
        assert await store.load(request) == empty_loaded()

    async def test_empty_changes_commit_and_change_nothing(self, store: Store) -> None:
        await store.commit(create(instance()))
        before = await everything(store)

        await store.commit(Changes())

        assert bool(Changes()) is False
        assert await everything(store) == before

    # -- instances and versions

    async def test_a_new_instance_round_trips(self, store: Store) -> None:
        record = instance(state='{"status": "placed", "note": "caf\\u00e9 \\"x\\"\\n", "a": 1}')
        other = instance("k2", saga="Shipping", last_event=None)

        await store.commit(create(record, other))

        loaded = await store.load(LoadRequest(instances=[(SAGA, "k1"), ("Shipping", "k2")]))
        assert loaded == Loaded(
            instances={(SAGA, "k1"): record, ("Shipping", "k2"): other},
            marks=set(),
            schedule_ids=set(),
        )

    async def test_keys_with_unusual_characters_round_trip(self, store: Store) -> None:
        records = [instance(k) for k in ["", "a/b", "ünïcødé 🚀", "it's", "x\ny", "%_*"]]

        await store.commit(create(*records))

        refs = [(SAGA, r.key) for r in records]
        loaded = await store.load(LoadRequest(instances=refs))
        assert loaded == Loaded(
            instances={(SAGA, r.key): r for r in records}, marks=set(), schedule_ids=set()
        )

    async def test_load_leaves_out_missing_instances(self, store: Store) -> None:
        record = instance()
        await store.commit(create(record))

        loaded = await store.load(
            LoadRequest(instances=[(SAGA, "k1"), (SAGA, "missing"), ("Other", "k1")])
        )

        assert loaded == Loaded(instances={(SAGA, "k1"): record}, marks=set(), schedule_ids=set())

    async def test_an_update_with_the_current_version_replaces_the_record(
        self, store: Store
    ) -> None:
        await store.commit(create(instance()))
        updated = instance(
            version=2,
            status=COMPLETING,
            state='{"status": "paid"}',
            last_event=None,
            completed=True,
        )

        await store.commit(Changes(writes=[InstanceWrite(updated, expected_version=1)]))

        assert await store.list_instances() == [updated]

    async def test_load_of_many_instances_marks_and_schedules_at_once(self, store: Store) -> None:
        n = 1500
        records = [instance(f"k{i:05}") for i in range(n)]
        schedules = [schedule(f"s{i}", key=f"k{i:05}", due=float(i)) for i in range(n)]
        marks = [DedupMark(SAGA, f"k{i:05}", f"e{i}", expires_at=100.0) for i in range(n)]
        await store.commit(Changes(writes=[InstanceWrite(r, 0) for r in records]))
        await store.commit(Changes(schedule_puts=schedules, marks=marks))

        loaded = await store.load(
            LoadRequest(
                instances=[(SAGA, r.key) for r in records] + [(SAGA, "missing")],
                marks=[(m.saga, m.key, m.event_id) for m in marks] + [(SAGA, "k1", "nope")],
                schedule_ids=[s.id for s in schedules] + ["nope"],
                now=50.0,
            )
        )

        assert loaded == Loaded(
            instances={(SAGA, r.key): r for r in records},
            marks={(m.saga, m.key, m.event_id) for m in marks},
            schedule_ids={s.id for s in schedules},
        )

    @pytest.mark.parametrize(
        ("existing", "write"),
        [
            pytest.param(1, InstanceWrite(instance(), expected_version=0), id="create-existing"),
            pytest.param(1, InstanceWrite(instance(version=3), expected_version=2), id="stale"),
            pytest.param(2, InstanceWrite(instance(version=2), expected_version=1), id="behind"),
            pytest.param(None, InstanceWrite(instance(version=2), 1), id="update-missing"),
        ],
    )
    async def test_a_write_with_the_wrong_version_conflicts(
        self, store: Store, existing: int | None, write: InstanceWrite
    ) -> None:
        if existing is not None:
            await store.commit(create(instance(version=existing)))
        before = await everything(store)

        with pytest.raises(ConflictError) as caught:
            await store.commit(Changes(writes=[write]))

        assert caught.value.instances == ((SAGA, "k1"),)
        assert await everything(store) == before

    @pytest.mark.parametrize(
        ("existing", "expected_version"),
        [
            pytest.param(None, 1, id="missing"),
            pytest.param(2, 1, id="stale"),
            pytest.param(1, 2, id="ahead"),
            pytest.param(1, 0, id="expects-absent"),
        ],
    )
    async def test_a_delete_with_the_wrong_version_conflicts(
        self, store: Store, existing: int | None, expected_version: int
    ) -> None:
        if existing is not None:
            await store.commit(
                Changes(
                    writes=[InstanceWrite(instance(version=existing), 0)],
                    schedule_puts=[schedule("s1")],
                    outbox_adds=[outbox_row("c1")],
                )
            )
        before = await everything(store)

        with pytest.raises(ConflictError) as caught:
            await store.commit(Changes(deletes=[InstanceDelete(SAGA, "k1", expected_version)]))

        assert caught.value.instances == ((SAGA, "k1"),)
        assert await everything(store) == before

    async def test_a_conflict_names_every_conflicting_instance_and_applies_nothing(
        self, store: Store
    ) -> None:
        await store.commit(
            Changes(
                writes=[InstanceWrite(instance("a"), 0), InstanceWrite(instance("b"), 0)],
                schedule_puts=[schedule("s-a", key="a"), schedule("s-b", key="b", due=20.0)],
                outbox_adds=[outbox_row("c-a", key="a"), outbox_row("c-b", key="b")],
                dead_letters=[dead_letter("d1")],
                marks=[DedupMark(SAGA, "a", "e1", expires_at=100.0)],
            )
        )
        before = await everything(store)
        marks = [(SAGA, "a", "e1"), (SAGA, "b", "e2")]
        loaded_before = await store.load(
            LoadRequest(instances=[(SAGA, "a"), (SAGA, "b"), (SAGA, "new")], marks=marks)
        )

        with pytest.raises(ConflictError) as caught:
            await store.commit(
                Changes(
                    writes=[
                        InstanceWrite(instance("new"), 0),  # fine on its own
                        InstanceWrite(instance("a", version=9), 7),  # conflict
                        InstanceWrite(instance("b", version=2), 1),  # fine on its own
                    ],
                    deletes=[InstanceDelete(SAGA, "gone", 1)],  # conflict: no such instance
                    schedule_clears=[(SAGA, "a")],
                    schedule_deletes=[ScheduleDelete(SAGA, "b", "s-b")],
                    schedule_puts=[schedule("s-new", key="new", due=1.0)],
                    outbox_deletes=["c-a"],
                    outbox_adds=[outbox_row("c-new", key="new")],
                    outbox_updates=[OutboxUpdate("c-b", attempts=1, due=5.0, error="boom")],
                    dead_letter_deletes=["d1"],
                    dead_letters=[dead_letter("d2")],
                    marks=[DedupMark(SAGA, "b", "e2", expires_at=100.0)],
                )
            )

        assert sorted(caught.value.instances) == [(SAGA, "a"), (SAGA, "gone")]
        assert await everything(store) == before
        loaded_after = await store.load(
            LoadRequest(instances=[(SAGA, "a"), (SAGA, "b"), (SAGA, "new")], marks=marks)
        )
        assert loaded_after == loaded_before

    @pytest.mark.parametrize(
        "conflicting",
        [
            pytest.param(InstanceWrite(instance("b", version=6), 5), id="stale-update"),
            pytest.param(InstanceWrite(instance("b"), 0), id="create-existing"),
            pytest.param(InstanceWrite(instance("none", version=2), 1), id="update-missing"),
        ],
    )
    async def test_a_conflict_after_good_writes_undoes_them_and_names_only_itself(
        self, store: Store, conflicting: InstanceWrite
    ) -> None:
        """Writes before the conflicting one (updates, a create, a delete, a tombstone
        update) leave no trace, and the conflict names that one instance only."""
        await store.commit(create(instance("a"), instance("b"), instance("c"), instance("d")))
        await store.commit(Changes(tombstones=[TombstoneWrite(tombstone("t", version=4))]))
        before = await everything(store)
        tombstones_before = await store.list_tombstones()

        with pytest.raises(ConflictError) as caught:
            await store.commit(
                Changes(
                    deletes=[InstanceDelete(SAGA, "d", 1)],
                    writes=[
                        InstanceWrite(instance("a", version=2), 1),
                        InstanceWrite(instance("new"), 0),
                        conflicting,
                        InstanceWrite(instance("c", version=2), 1),
                    ],
                    association_puts=[Association(SAGA, "customer", "c1", "a")],
                    tombstones=[
                        TombstoneWrite(tombstone("t", version=5), 4),
                        TombstoneWrite(tombstone("d", version=1)),
                    ],
                    outbox_adds=[outbox_row("c-a", key="a")],
                    marks=[DedupMark(SAGA, "a", "e1", expires_at=100.0)],
                )
            )

        assert caught.value.instances == ((conflicting.record.saga, conflicting.record.key),)
        assert await everything(store) == before
        assert await store.list_tombstones() == tombstones_before
        assert await store.list_associations() == []
        loaded = await store.load(LoadRequest(marks=[(SAGA, "a", "e1")]))
        assert loaded.marks == set()

    async def test_a_tombstone_update_conflict_after_good_ones_names_only_its_key(
        self, store: Store
    ) -> None:
        await store.commit(
            Changes(
                tombstones=[
                    TombstoneWrite(tombstone("t1", version=4)),
                    TombstoneWrite(tombstone("t2", version=4)),
                ]
            )
        )
        before = await store.list_tombstones()

        with pytest.raises(ConflictError) as caught:
            await store.commit(
                Changes(
                    tombstones=[
                        TombstoneWrite(tombstone("t1", version=5), 4),
                        TombstoneWrite(tombstone("t2", version=5), 3),
                    ],
                    writes=[InstanceWrite(instance("new"), 0)],
                )
            )

        assert caught.value.instances == ((SAGA, "t2"),)
        assert (await store.list_tombstones(), await store.list_instances()) == (before, [])

    async def test_the_store_keeps_working_after_a_conflict(self, store: Store) -> None:
        await store.commit(create(instance()))
        with pytest.raises(ConflictError):
            await store.commit(create(instance(), instance("k2")))

        await store.commit(create(instance("k2")))

        assert await store.list_instances() == [instance(), instance("k2")]

    async def test_concurrent_creates_of_one_instance_let_exactly_one_win(
        self, store: Store
    ) -> None:
        outcomes: list[tuple[str, Any]] = []

        async def attempt(i: int) -> None:
            try:
                await store.commit(create(instance(state=f'{{"writer": {i}}}')))
            except ConflictError as exc:
                outcomes.append(("lost", exc.instances))
            else:
                outcomes.append(("won", i))

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(attempt, i)

        winners = [i for outcome, i in outcomes if outcome == "won"]
        assert sorted(outcome for outcome, _ in outcomes) == ["lost"] * 7 + ["won"]
        assert [lost for outcome, lost in outcomes if outcome == "lost"] == [((SAGA, "k1"),)] * 7
        assert await store.list_instances() == [instance(state=f'{{"writer": {winners[0]}}}')]

    async def test_concurrent_commits_of_different_instances_all_apply(self, store: Store) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(store.commit, create(instance(f"k{i:02}")))

        assert await store.list_instances() == [instance(f"k{i:02}") for i in range(20)]

    # -- deletes

    async def test_a_delete_cascades_to_schedules_and_outbox_but_keeps_dead_letters(
        self, store: Store
    ) -> None:
        await store.commit(
            Changes(
                writes=[InstanceWrite(instance("a"), 0), InstanceWrite(instance("b"), 0)],
                schedule_puts=[
                    schedule("s-a1", key="a", due=1.0),
                    schedule("s-a2", key="a", due=2.0),
                    schedule("s-b", key="b", due=3.0),
                ],
                outbox_adds=[
                    outbox_row("c-a1", key="a", seq=1),
                    outbox_row("c-a2", key="a", seq=2),
                    outbox_row("c-b", key="b"),
                ],
                dead_letters=[dead_letter("d-a", key="a"), dead_letter("d-b", key="b")],
                marks=[DedupMark(SAGA, "a", "e1", expires_at=100.0)],
            )
        )

        await store.commit(Changes(deletes=[InstanceDelete(SAGA, "a", expected_version=1)]))

        assert await everything(store) == (
            [instance("b")],
            [outbox_row("c-b", key="b")],
            [schedule("s-b", key="b", due=3.0)],
            [dead_letter("d-a", key="a"), dead_letter("d-b", key="b")],
            3.0,
        )
        loaded = await store.load(
            LoadRequest(
                instances=[(SAGA, "a")],
                marks=[(SAGA, "a", "e1")],
                schedule_ids=["s-a1", "s-a2", "s-b"],
                now=0.0,
            )
        )
        # Dedup marks outlive their instance.
        assert loaded == Loaded(instances={}, marks={(SAGA, "a", "e1")}, schedule_ids={"s-b"})

    async def test_a_delete_does_not_touch_another_saga_with_the_same_key(
        self, store: Store
    ) -> None:
        await store.commit(
            Changes(
                writes=[InstanceWrite(instance(), 0), InstanceWrite(instance(saga="Other"), 0)],
                schedule_puts=[schedule("s1"), schedule("s2", saga="Other")],
                outbox_adds=[outbox_row("c1"), outbox_row("c2", saga="Other")],
            )
        )

        await store.commit(Changes(deletes=[InstanceDelete(SAGA, "k1", 1)]))

        assert await everything(store) == (
            [instance(saga="Other")],
            [outbox_row("c2", saga="Other")],
            [schedule("s2", saga="Other")],
            [],
            10.0,
        )

    async def test_deleting_an_absent_instance_expecting_version_0_drops_its_rows(
        self, store: Store
    ) -> None:
        await store.commit(Changes(schedule_puts=[schedule("s1")], outbox_adds=[outbox_row("c1")]))

        await store.commit(Changes(deletes=[InstanceDelete(SAGA, "k1", expected_version=0)]))

        assert await everything(store) == ([], [], [], [], None)

    async def test_an_instance_deleted_and_created_again_in_one_commit(self, store: Store) -> None:
        """Deletes apply before writes, so the new incarnation expects version 0."""
        await store.commit(
            Changes(
                writes=[InstanceWrite(instance(version=4), 0)],
                schedule_puts=[schedule("old")],
                outbox_adds=[outbox_row("c-old")],
            )
        )
        reborn = instance(state='{"status": "placed", "again": true}')

        await store.commit(
            Changes(
                deletes=[InstanceDelete(SAGA, "k1", expected_version=4)],
                writes=[InstanceWrite(reborn, expected_version=0)],
                schedule_puts=[schedule("new")],
                outbox_adds=[outbox_row("c-new")],
            )
        )

        assert await everything(store) == (
            [reborn],
            [outbox_row("c-new")],
            [schedule("new")],
            [],
            10.0,
        )

    # -- application order within one commit

    async def test_schedule_clears_apply_before_puts(self, store: Store) -> None:
        await store.commit(
            Changes(
                schedule_puts=[
                    schedule("s1", due=1.0),
                    schedule("s2", due=2.0),
                    schedule("s3", key="k2", due=3.0),
                ]
            )
        )

        await store.commit(
            Changes(
                schedule_clears=[(SAGA, "k1")],
                schedule_puts=[schedule("s4", due=4.0), schedule("s5", key="k2", due=5.0)],
            )
        )

        assert await store.list_schedules() == [
            schedule("s3", key="k2", due=3.0),
            schedule("s4", due=4.0),
            schedule("s5", key="k2", due=5.0),
        ]

    async def test_schedule_deletes_remove_only_the_named_schedule(self, store: Store) -> None:
        await store.commit(
            Changes(
                schedule_puts=[
                    schedule("s1", name="payment", due=1.0),
                    schedule("s2", name="reminder", due=2.0),
                    schedule("s3", key="k2", name="payment", due=3.0),
                ]
            )
        )

        await store.commit(
            Changes(
                schedule_deletes=[
                    ScheduleDelete(SAGA, "k1", "payment"),
                    ScheduleDelete(SAGA, "k1", "never-scheduled"),
                ],
                schedule_puts=[schedule("s4", name="shipping", due=4.0)],
            )
        )

        assert await store.list_schedules() == [
            schedule("s2", name="reminder", due=2.0),
            schedule("s3", key="k2", name="payment", due=3.0),
            schedule("s4", name="shipping", due=4.0),
        ]

    async def test_a_schedule_put_replaces_the_same_saga_key_and_name(self, store: Store) -> None:
        await store.commit(
            Changes(
                schedule_puts=[
                    schedule("s1", name="payment", due=10.0),
                    schedule("s-other", key="k2", name="payment", due=30.0),
                ]
            )
        )
        replacement = schedule("s2", name="payment", due=20.0, to_self=True, seq=3)

        await store.commit(Changes(schedule_puts=[replacement]))

        assert await store.list_schedules() == [
            replacement,
            schedule("s-other", key="k2", name="payment", due=30.0),
        ]
        loaded = await store.load(LoadRequest(schedule_ids=["s1", "s2", "s-other"]))
        assert loaded == Loaded(instances={}, marks=set(), schedule_ids={"s2", "s-other"})
        assert await store.next_due() == 20.0
        assert await store.due_schedules(15.0, 10) == []

    async def test_instance_deletes_apply_before_the_puts_and_adds_of_the_commit(
        self, store: Store
    ) -> None:
        await store.commit(
            Changes(
                writes=[InstanceWrite(instance(), 0)],
                schedule_puts=[schedule("s-old")],
                outbox_adds=[outbox_row("c-old", seq=1)],
            )
        )

        await store.commit(
            Changes(
                deletes=[InstanceDelete(SAGA, "k1", 1)],
                schedule_puts=[schedule("s-new")],
                outbox_adds=[outbox_row("c-new", seq=2)],
            )
        )

        assert await everything(store) == (
            [],
            [outbox_row("c-new", seq=2)],
            [schedule("s-new")],
            [],
            10.0,
        )

    async def test_outbox_adds_apply_before_updates(self, store: Store) -> None:
        await store.commit(
            Changes(
                outbox_adds=[outbox_row("c1")],
                outbox_updates=[OutboxUpdate("c1", attempts=1, due=7.5, error="Timeout: slow")],
            )
        )

        assert await store.list_outbox() == [
            outbox_row("c1", attempts=1, due=7.5, error="Timeout: slow")
        ]

    async def test_outbox_deletes_apply_before_adds(self, store: Store) -> None:
        await store.commit(Changes(outbox_adds=[outbox_row("c1"), outbox_row("c2", seq=2)]))

        await store.commit(
            Changes(outbox_deletes=["c1", "c2"], outbox_adds=[outbox_row("c2", seq=5)])
        )

        assert await store.list_outbox() == [outbox_row("c2", seq=5)]

    async def test_an_outbox_update_records_a_failed_attempt(self, store: Store) -> None:
        await store.commit(Changes(outbox_adds=[outbox_row("c1"), outbox_row("c2", seq=2)]))

        await store.commit(
            Changes(outbox_updates=[OutboxUpdate("c1", attempts=2, due=99.0, error="E: x")])
        )
        assert await store.list_outbox() == [
            outbox_row("c1", attempts=2, due=99.0, error="E: x"),
            outbox_row("c2", seq=2),
        ]

        await store.commit(
            Changes(outbox_updates=[OutboxUpdate("c1", attempts=3, due=100.0, error=None)])
        )
        assert await store.list_outbox() == [
            outbox_row("c1", attempts=3, due=100.0),
            outbox_row("c2", seq=2),
        ]

    async def test_an_outbox_update_of_a_missing_row_is_a_no_op(self, store: Store) -> None:
        await store.commit(Changes(outbox_adds=[outbox_row("c1")]))

        await store.commit(
            Changes(
                outbox_deletes=["c1"],
                outbox_updates=[
                    OutboxUpdate("c1", attempts=1, due=1.0, error="x"),
                    OutboxUpdate("never", attempts=1, due=1.0, error="x"),
                ],
            )
        )

        assert await store.list_outbox() == []

    async def test_dead_letter_deletes_apply_before_adds(self, store: Store) -> None:
        await store.commit(Changes(dead_letters=[dead_letter("d1"), dead_letter("d2")]))
        again = dead_letter("d1", failed_at=60.0, kind="compensate", seq=4)

        await store.commit(Changes(dead_letter_deletes=["d1", "d2"], dead_letters=[again]))

        assert await store.list_dead_letters() == [again]

    # -- schedules by due time

    async def test_next_due_is_the_earliest_pending_schedule(self, store: Store) -> None:
        assert await store.next_due() is None
        await store.commit(
            Changes(
                schedule_puts=[
                    schedule("s1", due=30.0),
                    schedule("s2", key="k2", due=10.0),
                    schedule("s3", key="k3", due=20.0),
                ]
            )
        )
        assert await store.next_due() == 10.0

        await store.commit(Changes(schedule_deletes=[ScheduleDelete(SAGA, "k2", "s2")]))
        assert await store.next_due() == 20.0

        await store.commit(Changes(schedule_puts=[schedule("s3", key="k3", due=40.0)]))
        assert await store.next_due() == 30.0

        await store.commit(Changes(schedule_puts=[schedule("s4", key="k3", name="s3", due=5.0)]))
        assert await store.next_due() == 5.0

        await store.commit(Changes(schedule_clears=[(SAGA, "k1"), (SAGA, "k3")]))
        assert await store.next_due() is None

    async def test_due_schedules_earliest_first_up_to_the_limit(self, store: Store) -> None:
        s = {
            "late": schedule("late", due=50.0),
            "d3": schedule("d3", key="k3", due=3.0),
            "d1b": schedule("a-second", key="k2", due=1.0, seq=2),
            "d2": schedule("d2", key="k4", due=2.0),
            "d1a": schedule("z-first", key="k5", due=1.0, seq=1),
            "now": schedule("now", key="k6", due=5.0),
        }
        await store.commit(Changes(schedule_puts=list(s.values())))

        assert await store.due_schedules(5.0, 100) == [
            s["d1a"],
            s["d1b"],
            s["d2"],
            s["d3"],
            s["now"],
        ]
        assert await store.due_schedules(5.0, 2) == [s["d1a"], s["d1b"]]
        assert await store.due_schedules(2.5, 10) == [s["d1a"], s["d1b"], s["d2"]]
        assert await store.due_schedules(0.5, 10) == []
        # Reading does not consume: the runtime deletes what it fired.
        assert await store.due_schedules(1.0, 10) == [s["d1a"], s["d1b"]]

    async def test_due_schedules_skip_replaced_and_deleted_ones(self, store: Store) -> None:
        await store.commit(
            Changes(
                schedule_puts=[
                    schedule("first", key="k0", due=1.0),
                    schedule("moved", due=5.0),
                    schedule("dropped", key="k2", due=6.0),
                    schedule("cleared", key="k3", due=7.0),
                    schedule("same", key="k4", due=8.0),
                ]
            )
        )
        await store.commit(
            Changes(
                schedule_clears=[(SAGA, "k3")],
                schedule_deletes=[ScheduleDelete(SAGA, "k2", "dropped")],
                schedule_puts=[
                    schedule("moved", due=50.0),  # same id and name, later
                    schedule("same", key="k4", due=8.0),  # put again unchanged
                ],
            )
        )

        assert await store.due_schedules(10.0, 10) == [
            schedule("first", key="k0", due=1.0),
            schedule("same", key="k4", due=8.0),
        ]
        assert await store.due_schedules(100.0, 10) == [
            schedule("first", key="k0", due=1.0),
            schedule("same", key="k4", due=8.0),
            schedule("moved", due=50.0),
        ]

    async def test_many_replaced_schedules_still_come_out_in_order(self, store: Store) -> None:
        for round_ in range(5):
            await store.commit(
                Changes(
                    schedule_puts=[
                        schedule(f"s{i}", key=f"k{i:03}", due=float(100 * round_ + i))
                        for i in range(100)
                    ]
                )
            )

        due = await store.due_schedules(450.0, 20)

        assert due == [schedule(f"s{i}", key=f"k{i:03}", due=400.0 + i) for i in range(20)]
        assert await store.next_due() == 400.0

    async def test_load_reports_only_pending_schedule_ids(self, store: Store) -> None:
        await store.commit(
            Changes(
                schedule_puts=[schedule("s1"), schedule("s2"), schedule("s3", key="k2")],
            )
        )
        await store.commit(
            Changes(
                schedule_deletes=[ScheduleDelete(SAGA, "k1", "s2")],
                schedule_clears=[(SAGA, "k2")],
            )
        )

        loaded = await store.load(LoadRequest(schedule_ids=["s1", "s2", "s3", "unknown"]))

        assert loaded == Loaded(instances={}, marks=set(), schedule_ids={"s1"})

    # -- dedup marks

    async def test_dedup_marks_are_visible_until_they_expire(self, store: Store) -> None:
        await store.commit(
            Changes(
                marks=[
                    DedupMark(SAGA, "k1", "e1", expires_at=100.0),
                    DedupMark(SAGA, "k1", "e2", expires_at=200.0),
                ]
            )
        )
        asked = [(SAGA, "k1", "e1"), (SAGA, "k1", "e2"), (SAGA, "k1", "e3")]

        async def load_at(now: float) -> Loaded:
            return await store.load(LoadRequest(marks=asked, now=now))

        def found(*event_ids: str) -> Loaded:
            marks = {(SAGA, "k1", e) for e in event_ids}
            return Loaded(instances={}, marks=marks, schedule_ids=set())

        assert await load_at(50.0) == found("e1", "e2")
        assert await load_at(100.0) == found("e1", "e2")
        assert await load_at(100.5) == found("e2")
        assert await load_at(300.0) == found()

    async def test_dedup_marks_belong_to_one_instance(self, store: Store) -> None:
        await store.commit(Changes(marks=[DedupMark(SAGA, "k1", "e1", expires_at=100.0)]))

        loaded = await store.load(
            LoadRequest(
                marks=[(SAGA, "k1", "e1"), (SAGA, "k2", "e1"), ("Other", "k1", "e1")],
                now=1.0,
            )
        )

        assert loaded == Loaded(instances={}, marks={(SAGA, "k1", "e1")}, schedule_ids=set())

    async def test_many_expired_marks_do_not_hide_new_ones(self, store: Store) -> None:
        for batch in range(10):
            await store.commit(
                Changes(
                    marks=[
                        DedupMark(SAGA, f"k{i}", f"b{batch}", expires_at=float(batch))
                        for i in range(100)
                    ]
                )
            )
            await store.load(LoadRequest(now=float(batch)))
        await store.commit(Changes(marks=[DedupMark(SAGA, "k0", "fresh", expires_at=1000.0)]))

        loaded = await store.load(
            LoadRequest(
                marks=[(SAGA, "k0", "fresh"), (SAGA, "k0", "b9"), (SAGA, "k0", "b8")], now=9.0
            )
        )

        assert loaded == Loaded(
            instances={}, marks={(SAGA, "k0", "fresh"), (SAGA, "k0", "b9")}, schedule_ids=set()
        )

    # -- listings

    async def test_list_instances_filters_orders_and_limits(self, store: Store) -> None:
        records = {
            "b2": instance("2", saga="B"),
            "a9": instance("9", saga="A", status=COMPLETING),
            "b1": instance("1", saga="B", status=COMPENSATION_FAILED),
            "a10": instance("10", saga="A"),
            "c1": instance("1", saga="C", status=COMPLETING),
        }
        await store.commit(create(*records.values()))
        r = records

        assert await store.list_instances() == [r["a10"], r["a9"], r["b1"], r["b2"], r["c1"]]
        assert await store.list_instances(saga="A") == [r["a10"], r["a9"]]
        assert await store.list_instances(status=COMPLETING) == [r["a9"], r["c1"]]
        assert await store.list_instances(saga="B", status=ACTIVE) == [r["b2"]]
        assert await store.list_instances(saga="Z") == []
        assert await store.list_instances(limit=3) == [r["a10"], r["a9"], r["b1"]]
        assert await store.list_instances(status=COMPLETING, limit=1) == [r["a9"]]
        assert await store.list_instances(limit=0) == []

    async def test_list_outbox_filters_and_orders_by_saga_key_seq(self, store: Store) -> None:
        rows = [
            outbox_row("b-k1-2", saga="B", key="k1", seq=2),
            outbox_row("a-k2-1", saga="A", key="k2", seq=1, kind="compensate"),
            outbox_row("a-k1-10", saga="A", key="k1", seq=10, due=3.0),
            outbox_row("a-k1-9", saga="A", key="k1", seq=9),
            outbox_row("b-k1-1", saga="B", key="k1", seq=1),
        ]
        await store.commit(Changes(outbox_adds=rows))
        r = {row.id: row for row in rows}

        assert await store.list_outbox() == [
            r["a-k1-9"],
            r["a-k1-10"],
            r["a-k2-1"],
            r["b-k1-1"],
            r["b-k1-2"],
        ]
        assert await store.list_outbox(saga="A") == [r["a-k1-9"], r["a-k1-10"], r["a-k2-1"]]
        assert await store.list_outbox(key="k1") == [
            r["a-k1-9"],
            r["a-k1-10"],
            r["b-k1-1"],
            r["b-k1-2"],
        ]
        assert await store.list_outbox(saga="A", key="k2") == [r["a-k2-1"]]
        assert await store.list_outbox(saga="C") == []

    async def test_list_schedules_filters_and_orders_by_due_then_seq(self, store: Store) -> None:
        rows = [
            schedule("s1", saga="B", key="k1", due=5.0),
            schedule("s2", saga="A", key="k2", due=1.0, to_self=True),
            schedule("s3", saga="A", key="k1", due=5.0, seq=2),
            schedule("s4", saga="A", key="k1", name="other", due=5.0, seq=1),
            schedule("s5", saga="B", key="k2", due=0.5),
        ]
        await store.commit(Changes(schedule_puts=rows))
        r = {row.id: row for row in rows}

        assert await store.list_schedules() == [r["s5"], r["s2"], r["s1"], r["s4"], r["s3"]]
        assert await store.list_schedules(saga="A") == [r["s2"], r["s4"], r["s3"]]
        assert await store.list_schedules(key="k1") == [r["s1"], r["s4"], r["s3"]]
        assert await store.list_schedules(saga="B", key="k2") == [r["s5"]]
        assert await store.list_schedules(key="nope") == []

    async def test_list_dead_letters_filters_and_orders_oldest_first(self, store: Store) -> None:
        rows = [
            dead_letter("d1", saga="B", failed_at=30.0),
            dead_letter("d2", saga="A", failed_at=10.0, kind="event"),
            dead_letter("d3", saga="A", failed_at=20.0, kind="compensate", seq=3),
            dead_letter("d4", saga="B", failed_at=5.0),
        ]
        await store.commit(Changes(dead_letters=rows))
        r = {row.id: row for row in rows}

        assert await store.list_dead_letters() == [r["d4"], r["d2"], r["d3"], r["d1"]]
        assert await store.list_dead_letters(saga="A") == [r["d2"], r["d3"]]
        assert await store.list_dead_letters(saga="C") == []

    # -- scans: every row in pages, by primary key

    async def test_scans_of_an_empty_store_are_empty(self, store: Store) -> None:
        assert await store.scan_instances(limit=10) == []
        assert await store.scan_outbox(limit=10) == []
        assert await store.scan_schedules(limit=10) == []
        assert await store.scan_dead_letters(limit=10) == []

    async def test_scan_instances_pages_by_saga_and_key(self, store: Store) -> None:
        # Keys that sort differently by bytes, by locale and by number: code point order.
        keys = ["", "B", "a", "a/b", "ab", "k10", "k2", "é", "ünï", "🚀", "x\ny", "Z"]
        records = [instance(k, saga=saga) for saga in ("Ship", SAGA) for k in keys]
        await store.commit(create(*records))
        expected = sorted(records, key=lambda r: (r.saga, r.key))

        pages = await scan_pages(store.scan_instances, lambda r: (r.saga, r.key), limit=5)

        assert pages == [expected[i : i + 5] for i in range(0, len(expected), 5)]
        assert (
            await store.scan_instances(after=(expected[-1].saga, expected[-1].key), limit=5) == []
        )
        assert await store.scan_instances(after=("Ship", "k10"), limit=2) == [
            instance("k2", saga="Ship"),
            instance("x\ny", saga="Ship"),
        ]

    async def test_scan_outbox_pages_by_id(self, store: Store) -> None:
        rows = [
            outbox_row(id, saga=saga, key=key, seq=seq)
            for id, saga, key, seq in [
                ("c3", "B", "k1", 1),
                ("c1", "A", "k2", 2),
                ("c10", "A", "k1", 1),
                ("c2", "B", "k1", 2),
                ("ç", "A", "k1", 3),
            ]
        ]
        await store.commit(Changes(outbox_adds=rows))
        by_id = sorted(rows, key=lambda o: o.id)

        pages = await scan_pages(store.scan_outbox, lambda o: o.id, limit=2)

        assert pages == [by_id[0:2], by_id[2:4], by_id[4:]]
        assert await store.scan_outbox(after="c10", limit=10) == by_id[2:]

    async def test_scan_schedules_pages_by_saga_key_and_name(self, store: Store) -> None:
        rows = [
            schedule(id, saga=saga, key=key, name=name, due=due)
            for id, saga, key, name, due in [
                ("s1", "B", "k1", "b", 1.0),
                ("s2", "A", "k2", "a", 2.0),
                ("s3", "A", "k1", "b", 3.0),
                ("s4", "A", "k1", "a", 4.0),
                ("s5", "A", "k1", "ab", 0.5),
            ]
        ]
        await store.commit(Changes(schedule_puts=rows))
        by_key = sorted(rows, key=lambda s: (s.saga, s.key, s.name))

        pages = await scan_pages(store.scan_schedules, lambda s: (s.saga, s.key, s.name), limit=2)

        assert pages == [by_key[0:2], by_key[2:4], by_key[4:]]
        assert await store.scan_schedules(after=("A", "k1", "ab"), limit=10) == by_key[2:]

    async def test_scan_dead_letters_pages_by_id(self, store: Store) -> None:
        rows = [dead_letter(id, failed_at=t) for id, t in [("d2", 1.0), ("d1", 3.0), ("d3", 2.0)]]
        await store.commit(Changes(dead_letters=rows))
        by_id = sorted(rows, key=lambda d: d.id)

        pages = await scan_pages(store.scan_dead_letters, lambda d: d.id, limit=1)

        assert pages == [[d] for d in by_id]
        assert await store.scan_dead_letters(after="d1", limit=10) == by_id[1:]

    async def test_scans_change_nothing(self, store: Store) -> None:
        await store.commit(everything_once())
        before = await everything(store)

        await store.scan_instances(limit=1)
        await store.scan_outbox(limit=1)
        await store.scan_schedules(limit=1)
        await store.scan_dead_letters(limit=1)

        assert await everything(store) == before

    # -- the outbox a page at a time, by instance

    async def test_pending_commands_pages_by_instance_and_seq_with_statuses(
        self, store: Store
    ) -> None:
        await store.commit(
            create(
                instance("k1"),
                instance("k2", status=COMPLETING),
                instance("k1", saga="B", status=COMPENSATION_FAILED),
            )
        )
        rows = [
            outbox_row(id, saga=saga, key=key, seq=seq)
            for id, saga, key, seq in [
                ("c5", SAGA, "k1", 2),
                ("c4", SAGA, "k1", 1),
                ("c1", SAGA, "k2", 3),
                ("c9", "B", "k1", 1),
                ("c2", SAGA, "gone", 1),
                ("c3", "A", "é", 1),
            ]
        ]
        await store.commit(Changes(outbox_adds=rows))
        by_id = {row.id: row for row in rows}
        statuses = {"k1": ACTIVE, "k2": COMPLETING}

        def expected(*ids: str, saga: str = SAGA) -> list[PendingCommand]:
            found = [by_id[i] for i in ids]
            return [
                PendingCommand(r, COMPENSATION_FAILED if r.saga == "B" else statuses.get(r.key))
                for r in found
            ]

        assert await store.pending_commands(limit=100) == [
            *expected("c3"),
            *expected("c9"),
            *expected("c2", "c4", "c5", "c1"),
        ]
        # A full page may cut an instance short; the next page starts after `after`.
        assert await store.pending_commands(limit=4) == expected("c3", "c9", "c2", "c4")
        assert await store.pending_commands(after=(SAGA, "gone"), limit=2) == expected("c4", "c5")
        assert await store.pending_commands(after=(SAGA, "k1"), limit=9) == expected("c1")
        assert await store.pending_commands(after=(SAGA, "k2"), limit=9) == []
        assert await store.pending_commands(limit=9, sagas=[SAGA, "C"]) == expected(
            "c2", "c4", "c5", "c1"
        )
        assert await store.pending_commands(limit=9, sagas=[]) == []

    async def test_drained_instances_are_completing_ones_without_commands(
        self, store: Store
    ) -> None:
        await store.commit(
            create(
                instance("a", status=COMPLETING),
                instance("b", status=COMPLETING),
                instance("c", status=COMPLETING),
                instance("d"),
                instance("e", status=COMPENSATION_FAILED),
                instance("a", saga="B", status=COMPLETING),
            )
        )
        await store.commit(Changes(outbox_adds=[outbox_row("c1", key="b")]))

        assert await store.drained_instances(limit=10) == [("B", "a"), (SAGA, "a"), (SAGA, "c")]
        assert await store.drained_instances(limit=1, after=("B", "a")) == [(SAGA, "a")]
        assert await store.drained_instances(limit=10, sagas=[SAGA]) == [(SAGA, "a"), (SAGA, "c")]
        assert await store.drained_instances(limit=10, sagas=[]) == []

    # -- dead letters

    async def test_dead_letters_are_added_replaced_and_deleted(self, store: Store) -> None:
        await store.commit(Changes(dead_letters=[dead_letter("d1"), dead_letter("d2")]))
        replaced = dead_letter("d2", failed_at=70.0, seq=2)

        await store.commit(Changes(dead_letters=[replaced]))
        assert await store.list_dead_letters() == [dead_letter("d1"), replaced]

        await store.commit(Changes(dead_letter_deletes=["d1", "missing"]))
        assert await store.list_dead_letters() == [replaced]

    async def test_records_round_trip_with_every_field(self, store: Store) -> None:
        row = outbox_row("c1", seq=7, kind="compensate", attempts=2, due=1.25, error="E: e")
        timer = schedule("t1", name="payment", due=1e9 + 0.123, to_self=True, seq=11, attempts=3)
        dead = dead_letter("d1", kind="event", seq=9, failed_at=1.7e9 + 0.5)

        await store.commit(Changes(outbox_adds=[row], schedule_puts=[timer], dead_letters=[dead]))

        assert await store.list_outbox() == [row]
        assert await store.list_schedules() == [timer]
        assert await store.list_dead_letters() == [dead]

    # -- associations

    async def test_associations_are_found_by_value_with_sorted_keys(self, store: Store) -> None:
        await store.commit(create(instance("k2"), instance("k1"), instance("k3")))
        await store.commit(
            Changes(
                association_puts=[
                    Association(SAGA, "customer", "c1", "k2"),
                    Association(SAGA, "customer", "c1", "k1"),
                    Association(SAGA, "customer", "c2", "k3"),
                    Association(SAGA, "shipment", "c1", "k3"),  # another name
                    Association("Other", "customer", "c1", "k9"),  # another saga
                ]
            )
        )

        found = await store.find_associated(SAGA, "customer", ["c1", "c2", "nobody", "c1"])

        assert found == {"c1": ["k1", "k2"], "c2": ["k3"]}
        assert await store.find_associated(SAGA, "customer", []) == {}
        assert await store.find_associated(SAGA, "nothing", ["c1"]) == {}

    async def test_associations_are_listed_by_saga_and_key(self, store: Store) -> None:
        rows = [
            Association(SAGA, "shipment", "s1", "k1"),
            Association(SAGA, "customer", "c1", "k1"),
            Association(SAGA, "customer", "c1", "k0"),
            Association("Other", "customer", "c1", "k1"),
        ]
        await store.commit(Changes(association_puts=rows))

        assert await store.list_associations() == [rows[2], rows[1], rows[0], rows[3]]
        assert await store.list_associations(saga=SAGA, key="k1") == [rows[1], rows[0]]
        assert await store.list_associations(key="k1") == [rows[1], rows[0], rows[3]]
        assert await store.list_associations(saga="Other") == [rows[3]]

    async def test_putting_an_association_twice_and_deleting_a_missing_one_are_no_ops(
        self, store: Store
    ) -> None:
        a = Association(SAGA, "customer", "c1", "k1")
        await store.commit(Changes(association_puts=[a, a]))
        await store.commit(Changes(association_puts=[a]))

        await store.commit(
            Changes(association_deletes=[Association(SAGA, "customer", "c1", "missing")])
        )

        assert await store.list_associations() == [a]
        await store.commit(Changes(association_deletes=[a]))
        assert await store.list_associations() == []
        assert await store.find_associated(SAGA, "customer", ["c1"]) == {}

    async def test_association_deletes_apply_before_puts(self, store: Store) -> None:
        """One commit may move an instance from one value to another, or keep a pair it
        deletes and puts again (the put wins)."""
        old, new = (
            Association(SAGA, "shipment", "s1", "k1"),
            Association(SAGA, "shipment", "s2", "k1"),
        )
        await store.commit(Changes(association_puts=[old]))

        await store.commit(Changes(association_deletes=[old, new], association_puts=[new]))

        assert await store.list_associations() == [new]

    async def test_associations_are_committed_with_the_state_or_not_at_all(
        self, store: Store
    ) -> None:
        await store.commit(create(instance()))
        a = Association(SAGA, "customer", "c1", "k1")

        with pytest.raises(ConflictError):
            await store.commit(
                Changes(writes=[InstanceWrite(instance(version=3), 2)], association_puts=[a])
            )
        assert await store.list_associations() == []

        await store.commit(
            Changes(writes=[InstanceWrite(instance(version=2), 1)], association_puts=[a])
        )
        assert (await store.list_instances(), await store.list_associations()) == (
            [instance(version=2)],
            [a],
        )

    async def test_deleting_an_instance_deletes_its_associations_only(self, store: Store) -> None:
        await store.commit(create(instance("a"), instance("b"), instance("a", saga="Other")))
        kept = [
            Association(SAGA, "customer", "c1", "b"),
            Association("Other", "customer", "c1", "a"),
        ]
        await store.commit(
            Changes(
                association_puts=[
                    Association(SAGA, "customer", "c1", "a"),
                    Association(SAGA, "shipment", "s1", "a"),
                    *kept,
                ]
            )
        )

        await store.commit(Changes(deletes=[InstanceDelete(SAGA, "a", expected_version=1)]))

        assert await store.list_associations() == kept
        assert await store.find_associated(SAGA, "customer", ["c1"]) == {"c1": ["b"]}

    async def test_many_values_are_looked_up_at_once(self, store: Store) -> None:
        n = 1500
        rows = [Association(SAGA, "customer", f"c{i:05}", f"k{i % 7}") for i in range(n)]
        await store.commit(Changes(association_puts=rows))

        found = await store.find_associated(SAGA, "customer", [r.value for r in rows])

        assert found == {r.value: [r.key] for r in rows}

    async def test_association_values_with_unusual_characters_round_trip(
        self, store: Store
    ) -> None:
        values = ["", "a/b", "ünïcødé 🚀", "it's", "x\ny", "%_*", "c1 "]
        rows = [Association(SAGA, "n", v, f"k{i}") for i, v in enumerate(values)]
        await store.commit(Changes(association_puts=rows))

        found = await store.find_associated(SAGA, "n", values)

        assert found == {r.value: [r.key] for r in rows}
        assert await store.find_associated(SAGA, "n", ["c1", "A/B"]) == {}

    async def test_rename_saga_moves_associations_except_keys_the_new_name_has(
        self, store: Store
    ) -> None:
        await store.commit(create(instance("a", saga="Old"), instance("b", saga="Old")))
        await store.commit(create(instance("b", saga="New")))
        await store.commit(
            Changes(
                association_puts=[
                    Association("Old", "customer", "c1", "a"),
                    Association("Old", "customer", "c1", "b"),
                    Association("New", "customer", "c2", "b"),
                ]
            )
        )

        moved = await store.rename_saga("Old", "New")
        again = await store.rename_saga("Old", "New")

        assert (moved, again) == (1, 0)
        assert await store.list_associations() == [
            Association("New", "customer", "c1", "a"),
            Association("New", "customer", "c2", "b"),
            Association("Old", "customer", "c1", "b"),
        ]
        assert await store.find_associated("New", "customer", ["c1", "c2"]) == {
            "c1": ["a"],
            "c2": ["b"],
        }

    # -- tombstones

    async def test_a_tombstone_is_written_with_the_delete_of_its_instance(
        self, store: Store
    ) -> None:
        await store.commit(Changes(writes=[InstanceWrite(instance(version=2), 0)]))
        gone = tombstone(version=2, state='{"status": "paid"}')

        await store.commit(
            Changes(deletes=[InstanceDelete(SAGA, "k1", 2)], tombstones=[TombstoneWrite(gone)])
        )

        loaded = await store.load(LoadRequest(instances=[(SAGA, "k1"), (SAGA, "k2")], now=50.0))
        assert loaded == Loaded(
            instances={}, marks=set(), schedule_ids=set(), tombstones={(SAGA, "k1"): gone}
        )
        assert await store.list_tombstones() == [gone]

    async def test_a_tombstone_is_not_written_when_the_delete_conflicts(self, store: Store) -> None:
        await store.commit(create(instance(version=3)))

        with pytest.raises(ConflictError) as caught:
            await store.commit(
                Changes(
                    deletes=[InstanceDelete(SAGA, "k1", 2)],
                    tombstones=[TombstoneWrite(tombstone(version=2))],
                )
            )

        assert caught.value.instances == ((SAGA, "k1"),)
        assert await store.list_tombstones() == []
        assert await store.list_instances() == [instance(version=3)]

    async def test_a_key_with_an_instance_loads_no_tombstone(self, store: Store) -> None:
        await store.commit(create(instance()))
        await store.commit(Changes(tombstones=[TombstoneWrite(tombstone())]))

        loaded = await store.load(LoadRequest(instances=[(SAGA, "k1")], now=50.0))

        assert loaded == Loaded(
            instances={(SAGA, "k1"): instance()}, marks=set(), schedule_ids=set()
        )

    async def test_a_tombstone_counts_until_it_expires(self, store: Store) -> None:
        await store.commit(Changes(tombstones=[TombstoneWrite(tombstone(expires_at=100.0))]))

        async def load_at(now: float) -> dict[tuple[str, str], Tombstone]:
            return (await store.load(LoadRequest(instances=[(SAGA, "k1")], now=now))).tombstones

        assert await load_at(100.0) == {(SAGA, "k1"): tombstone(expires_at=100.0)}
        assert await load_at(100.5) == {}

    async def test_a_tombstone_update_checks_the_version_it_expects(self, store: Store) -> None:
        await store.commit(Changes(tombstones=[TombstoneWrite(tombstone(version=4))]))
        later = tombstone(version=5)

        await store.commit(
            Changes(tombstones=[TombstoneWrite(later, 4)], outbox_adds=[outbox_row("late")])
        )
        with pytest.raises(ConflictError) as stale:
            await store.commit(
                Changes(
                    tombstones=[TombstoneWrite(tombstone(version=5), 4)],
                    outbox_adds=[outbox_row("lost")],
                )
            )
        with pytest.raises(ConflictError) as missing:
            await store.commit(Changes(tombstones=[TombstoneWrite(tombstone("k9", version=2), 1)]))

        assert (stale.value.instances, missing.value.instances) == (
            ((SAGA, "k1"),),
            ((SAGA, "k9"),),
        )
        assert await store.list_tombstones() == [later]
        assert [o.id for o in await store.list_outbox()] == ["late"]

    async def test_a_tombstone_put_replaces_the_one_of_its_key(self, store: Store) -> None:
        await store.commit(Changes(tombstones=[TombstoneWrite(tombstone(version=9))]))
        again = tombstone(version=3, ended=ABORTED, state=None)

        await store.commit(Changes(tombstones=[TombstoneWrite(again)]))

        assert await store.list_tombstones() == [again]

    async def test_a_key_started_again_drops_its_tombstone_in_the_same_commit(
        self, store: Store
    ) -> None:
        await store.commit(Changes(tombstones=[TombstoneWrite(tombstone(version=2))]))
        restarted = instance(version=3)

        await store.commit(
            Changes(writes=[InstanceWrite(restarted, 0)], tombstone_deletes=[(SAGA, "k1")])
        )

        loaded = await store.load(LoadRequest(instances=[(SAGA, "k1")], now=50.0))
        assert loaded == Loaded(
            instances={(SAGA, "k1"): restarted}, marks=set(), schedule_ids=set()
        )
        assert await store.list_tombstones() == []

    async def test_tombstone_deletes_apply_before_tombstone_writes(self, store: Store) -> None:
        await store.commit(Changes(tombstones=[TombstoneWrite(tombstone(version=2))]))
        fresh = tombstone(version=7)

        await store.commit(
            Changes(tombstone_deletes=[(SAGA, "k1")], tombstones=[TombstoneWrite(fresh)])
        )

        assert await store.list_tombstones() == [fresh]

    async def test_commits_that_write_tombstones_purge_expired_ones(self, store: Store) -> None:
        old = [tombstone(f"old{i}", expires_at=10.0 + i) for i in range(20)]
        await store.commit(Changes(tombstones=[TombstoneWrite(t) for t in old]))
        await store.load(LoadRequest(now=100.0))  # the stores' notion of now
        fresh = tombstone("new", expires_at=500.0)

        await store.commit(Changes(tombstones=[TombstoneWrite(fresh)]))

        assert await store.list_tombstones() == [fresh]

    async def test_list_tombstones_filters_and_orders_by_saga_and_key(self, store: Store) -> None:
        rows = [tombstone("b"), tombstone("a"), tombstone("a", saga="Other")]
        await store.commit(Changes(tombstones=[TombstoneWrite(t) for t in rows]))

        assert await store.list_tombstones() == [rows[1], rows[0], rows[2]]
        assert await store.list_tombstones(saga=SAGA) == [rows[1], rows[0]]
        assert await store.list_tombstones(saga=SAGA, key="b") == [rows[0]]
        assert await store.list_tombstones(key="a") == [rows[1], rows[2]]

    async def test_rename_saga_moves_tombstones_except_keys_the_new_name_has(
        self, store: Store
    ) -> None:
        await store.commit(create(instance("live", saga="New")))
        old = [tombstone(k, saga="Old", version=2) for k in ("a", "b", "live")]
        kept = tombstone("b", saga="New", version=8)
        await store.commit(Changes(tombstones=[TombstoneWrite(t) for t in [*old, kept]]))

        await store.rename_saga("Old", "New")

        assert await store.list_tombstones() == [
            attrs.evolve(old[0], saga="New"),
            kept,
            old[1],
            old[2],
        ]

    async def test_scan_tombstones_pages_by_saga_and_key(self, store: Store) -> None:
        rows = [tombstone(k, saga=s) for s in ("B", "A") for k in ("k2", "k1", "k3")]
        await store.commit(Changes(tombstones=[TombstoneWrite(t) for t in rows]))

        pages = await scan_pages(store.scan_tombstones, lambda t: (t.saga, t.key), limit=4)

        assert [[(t.saga, t.key) for t in page] for page in pages] == [
            [("A", "k1"), ("A", "k2"), ("A", "k3"), ("B", "k1")],
            [("B", "k2"), ("B", "k3")],
        ]

    # -- trace contexts

    async def test_the_trace_of_commands_and_schedules_is_kept(self, store: Store) -> None:
        """Every read of outbox rows and schedules gives their trace back; an update of
        a failed attempt keeps it; a replacing row brings its own."""
        other = TRACE.replace("b7ad6b7169203331", "00f067aa0ba902b7")
        rows = [outbox_row("c1", trace=TRACE), outbox_row("c2", seq=2)]
        timers = [schedule("t1", due=5.0, trace=TRACE), schedule("t2", due=6.0)]
        await store.commit(Changes(outbox_adds=rows, schedule_puts=timers))
        await store.commit(Changes(outbox_updates=[OutboxUpdate("c1", 1, 3.0, "E: x")]))
        await store.commit(Changes(outbox_adds=[outbox_row("c2", seq=2, trace=other)]))

        failed = outbox_row("c1", attempts=1, due=3.0, error="E: x", trace=TRACE)
        replaced = outbox_row("c2", seq=2, trace=other)
        assert await store.list_outbox() == [failed, replaced]
        assert await store.scan_outbox(limit=10) == [failed, replaced]
        assert await store.list_schedules() == timers
        assert await store.scan_schedules(limit=10) == timers
        assert await store.due_schedules(10.0, 10) == timers

    # -- counting rows

    async def test_a_fresh_store_counts_no_rows(self, store: Store) -> None:
        counts = await store.count_rows(now=100.0)

        assert counts == RowCounts(
            instances={ACTIVE: 0, COMPLETING: 0, COMPENSATION_FAILED: 0},
            outbox=0,
            schedules=0,
            due_schedules=0,
            dead_letters=0,
        )

    async def test_rows_are_counted_by_kind_and_instances_by_status(self, store: Store) -> None:
        """Schedules due at `now` exactly count as due."""
        await store.commit(
            Changes(
                writes=[
                    InstanceWrite(instance("a"), 0),
                    InstanceWrite(instance("b"), 0),
                    InstanceWrite(instance("c", status=COMPLETING, completed=True), 0),
                    InstanceWrite(instance("d", saga="Other", status=COMPENSATION_FAILED), 0),
                ],
                outbox_adds=[outbox_row("c1"), outbox_row("c2", seq=2), outbox_row("c3", key="b")],
                schedule_puts=[schedule("s1", due=10.0), schedule("s2", due=20.0)],
                dead_letters=[dead_letter("d1")],
            )
        )

        counts = [await store.count_rows(now=now) for now in (9.0, 10.0, 99.0)]

        expected = RowCounts(
            instances={ACTIVE: 2, COMPLETING: 1, COMPENSATION_FAILED: 1},
            outbox=3,
            schedules=2,
            due_schedules=0,
            dead_letters=1,
        )
        assert counts == [
            expected,
            attrs.evolve(expected, due_schedules=1),
            attrs.evolve(expected, due_schedules=2),
        ]
