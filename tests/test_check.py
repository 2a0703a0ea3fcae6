"""The pre-deploy check: `Admin.check()` and `sagaflow check`, on every store.

`check_sagas.fill` writes rows of every kind that the new code (`check_sagas.registry`)
reads as they are, reads through upcasters, or cannot read; `ops_sagas.prepare` leaves a
store written by a real runtime, which its own code reads whole.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import check_sagas
import ops_sagas
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from test_cli import cli

from sagaflow import Admin, CheckFailure, CheckGroup, CheckReport, Registry, correlate, on, upcast
from sagaflow._cli import check_json
from sagaflow.stores import (
    Changes,
    DeadLetter,
    InstanceRecord,
    MemoryStore,
    OutboxRecord,
    ScheduleRecord,
    SQLiteStore,
    Store,
    Tombstone,
    TombstoneWrite,
)
from sagaflow.stores import _sqlite as sqlite_module
from sagaflow.testing.conformance import everything


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store, open."""
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "check.db")
    else:
        from sagaflow.stores import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        made = PostgresStore(dsn, schema=request.getfixturevalue("pg_schema"))
    await made.open()
    yield made
    await made.close()


def decode_error(
    name: str, key: str, reason: str, version: int, *, field: str | None = None
) -> str:
    """The `DecodeError` message of a row of saga `Orders`."""
    at = f" at field {field!r}" if field else ""
    return (
        f"stored {name!r} of saga 'Orders' key {key!r} cannot be decoded{at}: {reason} "
        f"(stored at version {version}); the row is kept: fix the class, add an upcaster "
        "or roll back, then retry"
    )


def orphan_error(row: str, key: str) -> str:
    return (
        f"saga 'Removed' is neither registered nor an alias of a registered saga: no runtime "
        f"would read this {row} of key {key!r}; register the saga again, name it in "
        "aliases=(...) of the saga that replaced it, or abort its instances and discard its "
        "dead letters"
    )


UNKNOWN_FIELD = (
    "unknown field(s) 'amount': the class has no such field (renamed or removed?); bump "
    "the version and add an upcaster that renames or drops it"
)
NEWER = "it was written at version {0}, newer than this code's version {1}; run the code that wrote it, or a newer one"  # noqa: E501


def group(
    what: str,
    saga: str,
    type_name: str,
    version: int,
    outcome: str,
    count: int,
    *failures: CheckFailure,
) -> CheckGroup:
    return CheckGroup(what, saga, type_name, version, outcome, count, failures)


def orders(key: str, id: str, error: str) -> CheckFailure:
    return CheckFailure("Orders", key, id, error)


EXPECTED = CheckReport(
    (
        group("state", "Orders", "Order", 1, "upcast", 1),
        group("state", "Orders", "Order", 2, "upcast", 1),
        group(
            "state",
            "Orders",
            "Order",
            2,
            "fail",
            1,
            orders(
                "no-count",
                "Orders-no-count",
                decode_error(
                    "Order",
                    "no-count",
                    "the upcaster from version 2 to 3 raised KeyError: 'count'",
                    2,
                ),
            ),
        ),
        # One of the two is stored under the alias OldOrders.
        group("state", "Orders", "Order", 3, "ok", 2),
        group(
            "state",
            "Orders",
            "Order",
            3,
            "fail",
            2,
            orders(
                "array",
                "Orders-array",
                decode_error("Order", "array", "the stored JSON is an array, not an object", 3),
            ),
            orders(
                "renamed",
                "Orders-renamed",
                decode_error("Order", "renamed", UNKNOWN_FIELD, 3, field="amount"),
            ),
        ),
        group(
            "state",
            "Orders",
            "Order",
            4,
            "fail",
            1,
            orders("newer", "Orders-newer", decode_error("Order", "newer", NEWER.format(4, 3), 4)),
        ),
        group(
            "state",
            "Removed",
            "",
            1,
            "fail",
            1,
            CheckFailure("Removed", "r1", "Removed-r1", orphan_error("state", "r1")),
        ),
        group("outbox", "Orders", "Placed", 1, "upcast", 1),
        group(
            "outbox",
            "Orders",
            "Placed",
            3,
            "fail",
            1,
            orders("ok", "c-newer", decode_error("Placed", "ok", NEWER.format(3, 2), 3)),
        ),
        group("outbox", "Orders", "Ship", 1, "ok", 1),
        group(
            "outbox",
            "Orders",
            "gone.module.Cancel",
            1,
            "fail",
            1,
            orders(
                "ok",
                "c-unknown",
                "type name 'gone.module.Cancel' is not on sagaflow's allow-list: register the "
                "class with registry.message(...) (aliases=... for a class that was renamed or "
                "moved) or allow its package with Registry(allow=[...]), and make sure its "
                "module is imported",
            ),
        ),
        group(
            "outbox",
            "Removed",
            "Ship",
            1,
            "fail",
            1,
            CheckFailure("Removed", "ok", "c-orphan", orphan_error("command", "ok")),
        ),
        group("schedule", "Orders", "Remind", 1, "ok", 1),
        group(
            "schedule",
            "Orders",
            "Remind",
            1,
            "fail",
            1,
            orders(
                "ok",
                "s-renamed",
                decode_error("Remind", "ok", "required field missing", 1, field="order_id"),
            ),
        ),
        group(
            "schedule",
            "Removed",
            "Remind",
            1,
            "fail",
            1,
            CheckFailure("Removed", "r1", "s-orphan", orphan_error("schedule", "r1")),
        ),
        group("dead_letter", "Orders", "Placed", 1, "upcast", 1),
        group(
            "dead_letter",
            "Orders",
            "Placed",
            2,
            "fail",
            1,
            orders(
                "ok",
                "d-event-text",
                decode_error("Placed", "ok", "the stored JSON is a str ('abc'), not an object", 2),
            ),
        ),
        group("dead_letter", "Orders", "Ship", 1, "ok", 1),
    )
)


# -- Admin.check -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_empty_store_passes(store: Store) -> None:
    report = await Admin(store, registry=check_sagas.registry).check()

    assert report == CheckReport(())
    assert (report.ok, report.rows, report.upcast, report.failed) == (True, 0, 0, 0)


@pytest.mark.anyio
async def test_every_row_a_runtime_wrote_is_ok_with_its_own_code(store: Store) -> None:
    """A store left by a real runtime (instances, a retrying and a held command, timers,
    event, send and compensate dead letters) at the code's current versions."""
    await store.close()
    await ops_sagas.prepare(store)
    await store.open()

    report = await Admin(store, registry=ops_sagas.registry).check()

    assert report == CheckReport(
        (
            group("state", "order", "Order", 1, "ok", 4),
            group("state", "shipping", "Order", 1, "ok", 1),
            group("outbox", "order", "ops_sagas.Refund", 1, "ok", 1),
            group("outbox", "order", "ops_sagas.Reserve", 1, "ok", 1),
            group("schedule", "order", "ops_sagas.Expired", 1, "ok", 3),
            group("dead_letter", "order", "ops_sagas.Broken", 1, "ok", 1),
            group("dead_letter", "order", "ops_sagas.Release", 1, "ok", 1),
            group("dead_letter", "shipping", "ops_sagas.Notify", 1, "ok", 1),
        )
    )
    assert (report.ok, report.rows, report.upcast, report.failed) == (True, 13, 0, 0)


@pytest.mark.anyio
async def test_each_row_is_ok_would_upcast_or_would_fail(store: Store) -> None:
    """Current versions; older ones through upcasters; a renamed field without an
    upcaster, a non-object JSON value, an unknown type, an upcaster that raises, a
    version newer than the code and the rows of a removed saga fail; rows under the
    saga's alias count as the saga's."""
    await check_sagas.fill(store)

    report = await Admin(store, registry=check_sagas.registry).check()

    assert report == EXPECTED
    assert (report.ok, report.rows, report.upcast, report.failed) == (False, 20, 4, 11)
    assert report.failures == tuple(f for g in EXPECTED.groups for f in g.failures)


@pytest.mark.anyio
async def test_the_check_changes_nothing(store: Store) -> None:
    await check_sagas.fill(store)
    before = await everything(store)

    await Admin(store, registry=check_sagas.registry).check(page=2)

    assert await everything(store) == before


@pytest.mark.anyio
@pytest.mark.parametrize("page", [1, 2, 3, 5, 1000])
async def test_pages_of_any_size_give_the_same_report(store: Store, page: int) -> None:
    await check_sagas.fill(store)

    assert await Admin(store, registry=check_sagas.registry).check(page=page) == EXPECTED


def _late_registry() -> Registry:
    """Saga `Orders` of `check_sagas` with a late handler, and `Plain`, without one."""
    registry = Registry()

    @registry.saga(state=check_sagas.Order, name="Orders", version=3)
    class LateOrderSaga:
        add_currency = upcast(1)(staticmethod(check_sagas.add_currency))

        @upcast(2)
        @staticmethod
        def rename_count(data: dict[str, Any]) -> dict[str, Any]:
            return {**{k: v for k, v in data.items() if k != "count"}, "total": data["count"]}

        @correlate
        def order_id(self, event: check_sagas.Started) -> str:
            return event.order_id

        @on(check_sagas.Started, start=True)
        def started(self, order: check_sagas.Order, event: check_sagas.Started) -> None: ...

        @on(check_sagas.Started, late=True)
        def again(self, order: check_sagas.Order, event: check_sagas.Started) -> None: ...

    @registry.saga(state=check_sagas.Order, name="Plain")
    class PlainSaga:
        @correlate
        def order_id(self, event: check_sagas.Started) -> str:
            return event.order_id

        @on(check_sagas.Started, start=True)
        def started(self, order: check_sagas.Order, event: check_sagas.Started) -> None: ...

    return registry


@pytest.mark.anyio
async def test_final_states_kept_for_late_handlers_are_checked(store: Store) -> None:
    """Only the states a late handler would read: tombstones without a state, of a saga
    without late handlers, or of a saga that is gone are never decoded."""

    def kept(saga: str, key: str, state: str | None, version: int = 3) -> TombstoneWrite:
        return TombstoneWrite(
            Tombstone(saga, key, "completed", 1.0, 9e9, f"i-{key}", 2, state, version)
        )

    good = '{"status": "done", "total": 5, "currency": "EUR"}'
    await store.commit(
        Changes(
            tombstones=[
                kept("Orders", "ok", good),
                kept("Orders", "v1", '{"status": "done", "count": 5}', 1),
                kept("Orders", "bad", '{"status": "done", "bogus": 1}'),
                kept("Orders", "no-state", None),
                kept("Plain", "p1", '{"bogus": 1}'),
                kept("Gone", "g1", '{"bogus": 1}'),
            ]
        )
    )

    report = await Admin(store, registry=_late_registry()).check()

    assert [
        (g.what, g.saga, g.type_name, g.version, g.outcome, g.count) for g in report.groups
    ] == [
        ("tombstone", "Orders", "Order", 1, "upcast", 1),
        ("tombstone", "Orders", "Order", 3, "ok", 1),
        ("tombstone", "Orders", "Order", 3, "fail", 1),
    ]
    (failure,) = report.failures
    assert (failure.saga, failure.key, failure.id) == ("Orders", "bad", "i-bad")
    assert "'bogus'" in failure.error


@attrs.define(eq=False)
class CountingStore(MemoryStore):
    """Records how many rows each scan call returned."""

    reads: list[tuple[str, Any, int]] = attrs.field(factory=list, init=False)

    async def scan_instances(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[InstanceRecord]:
        rows = await super().scan_instances(after=after, limit=limit)
        self.reads.append(("instances", after, len(rows)))
        return rows

    async def scan_outbox(self, *, after: str | None = None, limit: int) -> list[OutboxRecord]:
        rows = await super().scan_outbox(after=after, limit=limit)
        self.reads.append(("outbox", after, len(rows)))
        return rows

    async def scan_schedules(
        self, *, after: tuple[str, str, str] | None = None, limit: int
    ) -> list[ScheduleRecord]:
        rows = await super().scan_schedules(after=after, limit=limit)
        self.reads.append(("schedules", after, len(rows)))
        return rows

    async def scan_dead_letters(self, *, after: str | None = None, limit: int) -> list[DeadLetter]:
        rows = await super().scan_dead_letters(after=after, limit=limit)
        self.reads.append(("dead letters", after, len(rows)))
        return rows

    async def scan_tombstones(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[Tombstone]:
        rows = await super().scan_tombstones(after=after, limit=limit)
        self.reads.append(("tombstones", after, len(rows)))
        return rows


@pytest.mark.anyio
async def test_rows_are_read_in_pages_each_after_the_last_key_of_the_one_before() -> None:
    store = CountingStore()
    await check_sagas.fill(store)

    report = await Admin(store, registry=check_sagas.registry).check(page=3)

    assert report == EXPECTED
    assert store.reads == [
        ("instances", None, 3),
        ("instances", ("Orders", "newer"), 3),
        ("instances", ("Orders", "renamed"), 3),
        ("instances", ("Removed", "r1"), 0),  # a full last page: one more read finds the end
        ("outbox", None, 3),
        ("outbox", "c-orphan", 2),
        ("schedules", None, 3),
        ("schedules", ("Removed", "r1", "s-orphan"), 0),
        ("dead letters", None, 3),
        ("dead letters", "d-send", 0),
        ("tombstones", None, 0),
    ]


@pytest.mark.anyio
async def test_failures_per_group_lists_the_first_rows_and_counts_them_all(
    store: Store,
) -> None:
    await check_sagas.fill(store)
    admin = Admin(store, registry=check_sagas.registry)

    def trimmed(listed: int) -> CheckReport:
        return CheckReport(
            tuple(attrs.evolve(g, failures=g.failures[:listed]) for g in EXPECTED.groups)
        )

    assert await admin.check(failures_per_group=1) == trimmed(1)
    assert await admin.check(failures_per_group=0) == trimmed(0)
    assert await admin.check(failures_per_group=None) == EXPECTED
    assert (await admin.check(failures_per_group=0)).failed == 11


@pytest.mark.anyio
async def test_the_check_needs_a_registry_and_sensible_sizes() -> None:
    store = MemoryStore()

    with pytest.raises(TypeError, match=r"Admin\(store, registry=registry\)"):
        await Admin(store).check()
    with pytest.raises(ValueError, match="pages of at least 1 row, not page=0"):
        await Admin(store, registry=check_sagas.registry).check(page=0)
    with pytest.raises(ValueError, match="failures_per_group must be None or an int >= 0"):
        await Admin(store, registry=check_sagas.registry).check(failures_per_group=-1)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_the_cluster_inbox_is_checked_too(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    from sagaflow.stores import PostgresStore
    from sagaflow.stores._claims import InboxRecord

    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    try:
        rows = [
            ("Orders", "Placed@2", '{"order_id": "a", "currency": "EUR"}'),
            ("OldOrders", "Placed", '{"order_id": "b"}'),
            ("Orders", "gone.Started", '{"order_id": "c"}'),
            ("Removed", "Placed@2", '{"order_id": "d", "currency": "EUR"}'),
        ]
        positions = await store.put_inbox(
            [InboxRecord(0, saga, "k", "e", False, t, p, 1.0) for saga, t, p in rows]
        )
        report = await Admin(store, registry=check_sagas.registry).check(page=1)
    finally:
        await store.close()

    unknown = (
        "type name 'gone.Started' is not on sagaflow's allow-list: register the class with "
        "registry.message(...) (aliases=... for a class that was renamed or moved) or allow "
        "its package with Registry(allow=[...]), and make sure its module is imported"
    )
    assert report == CheckReport(
        (
            group("inbox", "Orders", "Placed", 1, "upcast", 1),
            group("inbox", "Orders", "Placed", 2, "ok", 1),
            group(
                "inbox",
                "Orders",
                "gone.Started",
                1,
                "fail",
                1,
                CheckFailure("Orders", "k", str(positions[2]), unknown),
            ),
            group(
                "inbox",
                "Removed",
                "Placed",
                2,
                "fail",
                1,
                CheckFailure("Removed", "k", str(positions[3]), orphan_error("inbox event", "k")),
            ),
        )
    )


def test_the_report_has_a_readable_repr() -> None:
    report = CheckReport(
        (group("state", "S", "St", 1, "fail", 2, CheckFailure("S", "k", "i", "e")),)
    )

    assert repr(report) == (
        "CheckReport(groups=(CheckGroup(what='state', saga='S', type_name='St', version=1, "
        "outcome='fail', count=2, failures=(CheckFailure(saga='S', key='k', id='i', "
        "error='e'),)),))"
    )


# -- sagaflow check --------------------------------------------------------------------


def fill_file(path: Path) -> None:
    anyio.run(check_sagas.fill_file, str(path))


def test_cli_exits_0_when_the_new_code_reads_everything(tmp_path: Path) -> None:
    path = tmp_path / "ops.db"
    anyio.run(ops_sagas.prepare, SQLiteStore(path))
    before = path.read_bytes()

    done = cli("check", "ops_sagas:registry", f"sqlite://{path}")

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "KIND         SAGA      TYPE               VERSION  OUTCOME  ROWS\n"
        "state        order     Order              1        ok       4\n"
        "state        shipping  Order              1        ok       1\n"
        "outbox       order     ops_sagas.Refund   1        ok       1\n"
        "outbox       order     ops_sagas.Reserve  1        ok       1\n"
        "schedule     order     ops_sagas.Expired  1        ok       3\n"
        "dead letter  order     ops_sagas.Broken   1        ok       1\n"
        "dead letter  order     ops_sagas.Release  1        ok       1\n"
        "dead letter  shipping  ops_sagas.Notify   1        ok       1\n"
        "\n"
        "13 row(s): 13 ok, 0 would upcast, none would fail: this code can read everything "
        "stored\n"
    )
    assert path.read_bytes() == before


def test_cli_exits_1_and_lists_what_would_fail(tmp_path: Path) -> None:
    path = tmp_path / "check.db"
    fill_file(path)
    before = path.read_bytes()

    done = cli("check", "check_sagas:registry", f"sqlite:{path}", "--failures", "1")

    assert (done.returncode, done.stderr) == (1, "")
    table, *failing, summary = done.stdout.rstrip("\n").split("\n\n")
    assert table.splitlines()[:3] == [
        "KIND         SAGA     TYPE                VERSION  OUTCOME       ROWS",
        "state        Orders   Order               1        would upcast  1",
        "state        Orders   Order               2        would upcast  1",
    ]
    assert len(table.splitlines()) == 1 + len(EXPECTED.groups)
    assert failing[1] == (
        "state Orders Order version 3: 2 would fail\n"
        f"  Orders array (id Orders-array): {EXPECTED.groups[4].failures[0].error}\n"
        "  ... and 1 more"
    )
    assert len(failing) == 10  # groups; 11 rows
    assert summary == (
        "20 row(s): 5 ok, 4 would upcast, 11 would fail: this code cannot read them; "
        "do not deploy it yet"
    )
    assert path.read_bytes() == before


def test_cli_json_is_the_whole_report(tmp_path: Path) -> None:
    path = tmp_path / "check.db"
    fill_file(path)

    done = cli("check", "check_sagas:registry", f"sqlite:{path}", "--json", "--page", "2")

    assert done.returncode == 1
    assert json.loads(done.stdout) == json.loads(json.dumps(check_json(EXPECTED)))
    assert json.loads(done.stdout)["failed"] == 11


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere:registry", "sqlite:x.db"], "no module named 'nowhere'"),
        (["ops_sagas:Order", "sqlite:x.db"], "is a type, not a sagaflow Registry"),
        (["ops_sagas:registry", "mysql://db"], "unsupported store URL scheme 'mysql'"),
        (["ops_sagas:registry", "sqlite:x.db", "--page", "0"], "'0' is not a page size"),
        (["ops_sagas:registry", "sqlite:x.db", "--failures", "some"], "or 'all'"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], message: str) -> None:
    done = cli("check", *args)

    assert done.returncode == 2
    assert message in done.stderr


def test_cli_does_not_migrate_an_older_store_but_checks_a_migrated_copy(tmp_path: Path) -> None:
    path, copy = tmp_path / "old.db", tmp_path / "copy.db"

    async def write_version_2() -> None:
        with pytest.MonkeyPatch.context() as version_2:
            version_2.setattr(sqlite_module, "_MIGRATIONS", sqlite_module._MIGRATIONS[:1])
            version_2.setattr(sqlite_module, "SCHEMA_VERSION", 2)
            store = SQLiteStore(path)
            await store.open()
            await store.close()

    anyio.run(write_version_2)
    before = path.read_bytes()
    shutil.copy(path, copy)

    refused = cli("check", "ops_sagas:registry", f"sqlite:{path}")
    migrated = cli("check", "ops_sagas:registry", f"sqlite:{copy}", "--migrate")

    assert refused.returncode == 3
    assert (
        f"has schema version 2, but this sagaflow reads version {sqlite_module.SCHEMA_VERSION} "
        "without migrating"
    ) in refused.stderr
    assert path.read_bytes() == before
    assert (migrated.returncode, migrated.stdout) == (
        0,
        "the store holds no rows: nothing to check\n",
    )


def test_cli_a_missing_store_exits_3_and_is_not_created(tmp_path: Path) -> None:
    done = cli("check", "ops_sagas:registry", f"sqlite:{tmp_path / 'missing.db'}")

    assert done.returncode == 3
    assert "no sagaflow store at" in done.stderr
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.postgres
def test_cli_checks_a_postgres_store(postgres_dsn: str, pg_schema: str) -> None:  # noqa: F811
    from sagaflow.stores import PostgresStore

    async def fill() -> None:
        store = PostgresStore(postgres_dsn, schema=pg_schema)
        await store.open()
        try:
            await check_sagas.fill(store)
        finally:
            await store.close()

    anyio.run(fill)

    done = cli(
        "check",
        "check_sagas:registry",
        postgres_dsn,
        "--schema",
        pg_schema,
        "--json",
        "--page",
        "4",
    )

    assert (done.returncode, done.stderr) == (1, "")
    assert json.loads(done.stdout) == json.loads(json.dumps(check_json(EXPECTED)))
