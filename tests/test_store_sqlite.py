"""`SQLiteStore`: the conformance suite, schema versions and durability."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import anyio
import attrs
import pytest

from sagaflow.exceptions import ConflictError, SchemaVersionError, StoreError
from sagaflow.stores import (
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
    SQLiteStore,
    Store,
    TombstoneWrite,
)
from sagaflow.stores import _sqlite as sqlite_module
from sagaflow.stores._sqlite import SCHEMA_VERSION
from sagaflow.testing.conformance import (
    SAGA,
    TRACE,
    StoreConformance,
    create,
    dead_letter,
    instance,
    outbox_row,
    schedule,
    tombstone,
)

pytestmark = pytest.mark.anyio


def query(path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Run `sql` on its own connection to `path` and commit."""
    with closing(sqlite3.connect(path)) as conn, conn:
        return conn.execute(sql, args).fetchall()


class TestSQLiteStore(StoreConformance):
    """The conformance suite on a new database file per test."""

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[Store]:
        store = SQLiteStore(tmp_path / "sagas.db")
        await store.open()
        yield store
        await store.close()


class TestSQLiteStoreOnTheLoop(StoreConformance):
    """The conformance suite with `power_safe=False`: loads and commits run on the event
    loop's thread."""

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[Store]:
        store = SQLiteStore(tmp_path / "sagas.db", power_safe=False)
        await store.open()
        yield store
        await store.close()


def everything_changes() -> Changes:
    """A commit with one row of every kind."""
    return Changes(
        writes=[InstanceWrite(instance(completed=True), expected_version=0)],
        schedule_puts=[schedule("s1", to_self=True, attempts=2)],
        outbox_adds=[outbox_row("c1", error="E: x")],
        dead_letters=[dead_letter("d1")],
        marks=[DedupMark(SAGA, "k1", "e1", expires_at=100.0)],
    )


async def test_a_commit_is_durable_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    store = SQLiteStore(path)
    await store.open()
    await store.commit(everything_changes())
    await store.close()

    reopened = SQLiteStore(str(path))
    await reopened.open()
    try:
        loaded = await reopened.load(
            LoadRequest(
                instances=[(SAGA, "k1")], marks=[(SAGA, "k1", "e1")], schedule_ids=["s1"], now=1.0
            )
        )
        assert loaded == Loaded(
            instances={(SAGA, "k1"): instance(completed=True)},
            marks={(SAGA, "k1", "e1")},
            schedule_ids={"s1"},
        )
        assert await reopened.list_outbox() == [outbox_row("c1", error="E: x")]
        assert await reopened.list_schedules() == [schedule("s1", to_self=True, attempts=2)]
        assert await reopened.list_dead_letters() == [dead_letter("d1")]
    finally:
        await reopened.close()


async def test_a_commit_is_visible_to_another_connection_before_close(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    store = SQLiteStore(path)
    await store.open()
    await store.commit(everything_changes())

    rows = query(path, "SELECT saga, key, version FROM instances")
    mode = query(path, "PRAGMA journal_mode")
    await store.close()

    assert (rows, mode) == ([(SAGA, "k1", 1)], [("wal",)])


async def test_the_connection_is_durable_before_acknowledging(tmp_path: Path) -> None:
    """WAL, and `synchronous=FULL`: a commit is on disk when `commit()` returns."""
    store = SQLiteStore(tmp_path / "sagas.db")
    await store.open()
    conn = store._conn
    assert conn is not None

    settings = [conn.execute(f"PRAGMA {p}").fetchone() for p in ("journal_mode", "synchronous")]

    await store.close()
    assert settings == [("wal",), (2,)]


async def test_two_stores_on_one_file_settle_races_by_version(tmp_path: Path) -> None:
    """As two processes would: each create of a key wins on exactly one of them."""
    path = tmp_path / "shared.db"
    first, second = SQLiteStore(path), SQLiteStore(path)
    await first.open()
    await second.open()
    won: list[tuple[int, str]] = []

    async def create(n: int, store: SQLiteStore, key: str) -> None:
        try:
            await store.commit(Changes(writes=[InstanceWrite(instance(key), 0)]))
        except ConflictError:
            return
        won.append((n, key))

    try:
        async with anyio.create_task_group() as tg:
            for key in ("a", "b", "c", "d", "e"):
                tg.start_soon(create, 1, first, key)
                tg.start_soon(create, 2, second, key)
        assert sorted(key for _, key in won) == ["a", "b", "c", "d", "e"]
        assert await first.list_instances() == await second.list_instances()
    finally:
        await first.close()
        await second.close()


async def test_a_commit_checks_versions_in_its_writes_and_reads_only_on_a_conflict(
    tmp_path: Path,
) -> None:
    """The version check costs no statement of its own: a commit that does not
    conflict runs no SELECT; one that does reads the versions once to name them."""
    store = SQLiteStore(tmp_path / "sagas.db")
    await store.open()
    await store.commit(create(instance("a"), instance("b")))
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)  # type: ignore[union-attr]
    good = Changes(
        writes=[InstanceWrite(instance("a", version=2), 1), InstanceWrite(instance("c"), 0)],
        deletes=[InstanceDelete(SAGA, "b", 1)],
        tombstones=[TombstoneWrite(tombstone("b"))],
    )
    try:
        await store.commit(good)
        clean = [s.split()[0] for s in statements]
        statements.clear()
        with pytest.raises(ConflictError) as caught:
            await store.commit(
                Changes(
                    writes=[
                        InstanceWrite(instance("a", version=3), 2),
                        InstanceWrite(instance("c", version=9), 8),
                    ]
                )
            )
        missed = [s.split()[0] for s in statements]
    finally:
        await store.close()

    # The instance delete and its cascade, the update, the create, the tombstone put.
    assert clean == ["BEGIN", *["DELETE"] * 4, "UPDATE", "INSERT", "INSERT", "COMMIT"]
    assert caught.value.instances == ((SAGA, "c"),)
    assert missed == ["BEGIN", "UPDATE", "UPDATE", "ROLLBACK", "BEGIN", "SELECT", "ROLLBACK"]


async def test_a_new_file_gets_the_current_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()

    version = query(path, "SELECT value FROM meta WHERE name = 'schema_version'")
    tables = query(path, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")

    assert version == [(str(SCHEMA_VERSION),)]
    assert tables == [
        ("associations",),
        ("dead_letters",),
        ("instances",),
        ("marks",),
        ("meta",),
        ("outbox",),
        ("schedules",),
        ("tombstones",),
    ]


async def test_an_empty_sqlite_file_gets_the_schema_when_asked_to_create(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    query(path, "PRAGMA user_version")
    store = SQLiteStore(path, create=True)

    await store.open()
    await store.commit(Changes(writes=[InstanceWrite(instance(), 0)]))

    assert await store.list_instances() == [instance()]
    await store.close()


async def test_a_file_with_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    query(path, "UPDATE meta SET value = ? WHERE name = 'schema_version'", "99")

    with pytest.raises(SchemaVersionError) as caught:
        await SQLiteStore(path).open()

    assert (caught.value.found, caught.value.supported) == (99, SCHEMA_VERSION)
    assert str(caught.value) == (
        f"SQLite store {str(path)!r} has schema version 99, but this sagaflow supports "
        f"versions 1 to {SCHEMA_VERSION}; open it with the sagaflow that wrote it, or a newer one"
    )


async def test_an_older_file_is_migrated_once_step_by_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "old.db"
    with monkeypatch.context() as version_1:
        version_1.setattr(sqlite_module, "_MIGRATIONS", ())
        version_1.setattr(sqlite_module, "SCHEMA_VERSION", 1)
        store = SQLiteStore(path)
        await store.open()
        await store.close()
    write_version_1_instance(path, instance())
    steps: list[str] = []
    real = sqlite_module._MIGRATIONS

    def to_2(conn: sqlite3.Connection) -> None:
        steps.append("1->2")
        conn.execute("CREATE TABLE added_in_2 (x INTEGER)")
        real[0](conn)

    def to_3(conn: sqlite3.Connection) -> None:
        steps.append("2->3")
        conn.execute("INSERT INTO added_in_2 (x) VALUES (3)")
        real[1](conn)

    monkeypatch.setattr(sqlite_module, "_MIGRATIONS", (to_2, to_3))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", 3)
    for _ in range(2):
        store = SQLiteStore(path)
        await store.open()
        assert await store.list_instances() == [instance()]
        await store.close()

    assert steps == ["1->2", "2->3"]
    assert query(path, "SELECT value FROM meta WHERE name = 'schema_version'") == [("3",)]
    assert query(path, "SELECT x FROM added_in_2") == [(3,)]


async def test_without_migrate_a_current_file_opens_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sagas.db"
    store = SQLiteStore(path)
    await store.open()
    await store.commit(everything_changes())
    await store.close()
    before = path.read_bytes()

    reader = SQLiteStore(path, migrate=False)
    await reader.open()
    found = await reader.scan_instances(limit=10)
    await reader.close()

    assert found == [instance(completed=True)]
    assert path.read_bytes() == before


async def test_without_migrate_nothing_is_created_or_migrated(tmp_path: Path) -> None:
    missing, old = tmp_path / "missing.db", tmp_path / "old.db"
    with pytest.MonkeyPatch.context() as version_2:
        version_2.setattr(sqlite_module, "_MIGRATIONS", sqlite_module._MIGRATIONS[:1])
        version_2.setattr(sqlite_module, "SCHEMA_VERSION", 2)
        store = SQLiteStore(old)
        await store.open()
        await store.close()
    before = old.read_bytes()

    with pytest.raises(StoreError, match="unable to open database file"):
        await SQLiteStore(missing, migrate=False).open()
    with pytest.raises(SchemaVersionError) as caught:
        await SQLiteStore(old, migrate=False).open()

    assert not missing.exists()
    assert old.read_bytes() == before
    assert (caught.value.found, caught.value.supported) == (2, SCHEMA_VERSION)
    assert str(caught.value) == (
        f"SQLite store {str(old)!r} has schema version 2, but this sagaflow reads version "
        f"{SCHEMA_VERSION} without migrating (migrate=False); work on a copy of the file, "
        "which opening with migrate=True migrates (the sagaflow that wrote it cannot open "
        "a migrated file)"
    )


def write_version_1_instance(path: Path, record: InstanceRecord) -> None:
    """Write an instance row as schema version 1 has it (no `state_version` column)."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            attrs.astuple(record)[:10],
        )


async def test_a_version_2_file_records_state_versions_and_timer_names(tmp_path: Path) -> None:
    """Version 3 adds `instances.state_version` (1 for existing rows) and
    `dead_letters.name`; rows written before keep their meaning."""
    path = tmp_path / "v2.db"
    with pytest.MonkeyPatch.context() as version_2:
        version_2.setattr(sqlite_module, "_MIGRATIONS", sqlite_module._MIGRATIONS[:1])
        version_2.setattr(sqlite_module, "SCHEMA_VERSION", 2)
        store = SQLiteStore(path)
        await store.open()
        await store.close()
    write_version_1_instance(path, instance())

    store = SQLiteStore(path)
    await store.open()
    letter = DeadLetter("d1", "OrderSaga", "k1", "event", "T", "{}", "boom", 1, 5.0, 7, "pay")
    await store.commit(Changes(dead_letters=[letter]))
    found = (await store.list_instances(), await store.list_dead_letters())
    await store.close()

    assert found == ([attrs.evolve(instance(), state_version=1)], [letter])
    assert query(path, "SELECT value FROM meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]


def _v3(record: object) -> tuple[object, ...]:
    """The columns of an outbox row or schedule in schema 3 (no `trace`)."""
    values = attrs.astuple(record)
    assert values[-1] is None  # the trace, added in schema 4
    return values[:-1]


async def test_a_version_3_file_keeps_its_rows_and_gains_traces(tmp_path: Path) -> None:
    """Version 4 adds `outbox.trace` and `schedules.trace`: commands and schedules
    written before it have no trace, new ones keep theirs."""
    path = tmp_path / "v3.db"
    with pytest.MonkeyPatch.context() as version_3:
        version_3.setattr(sqlite_module, "_MIGRATIONS", sqlite_module._MIGRATIONS[:2])
        version_3.setattr(sqlite_module, "SCHEMA_VERSION", 3)
        store = SQLiteStore(path)
        await store.open()
        await store.close()
    # Rows as the schema 3 code writes them.
    query(path, "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", *_v3(outbox_row("c1")))
    query(
        path,
        "INSERT INTO schedules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        *_v3(schedule("s1", due=5.0)),
    )
    columns_before = [row[1] for row in query(path, "PRAGMA table_info(outbox)")]

    store = SQLiteStore(path)
    await store.open()
    await store.commit(
        Changes(
            outbox_adds=[outbox_row("c2", seq=2, trace=TRACE)],
            schedule_puts=[schedule("s2", due=6.0, trace=TRACE)],
        )
    )
    found = (await store.list_outbox(), await store.due_schedules(10.0, 10))
    await store.close()

    assert "trace" not in columns_before
    assert found == (
        [outbox_row("c1"), outbox_row("c2", seq=2, trace=TRACE)],
        [schedule("s1", due=5.0), schedule("s2", due=6.0, trace=TRACE)],
    )
    assert query(path, "SELECT value FROM meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]


async def test_a_version_1_file_gets_the_index_of_unusual_statuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2 indexes the instances that are not active (what sweeps look for)."""
    path = tmp_path / "v1.db"
    completing = instance("k2", status=COMPLETING)
    with monkeypatch.context() as version_1:
        version_1.setattr(sqlite_module, "_MIGRATIONS", ())
        version_1.setattr(sqlite_module, "SCHEMA_VERSION", 1)
        store = SQLiteStore(path)
        await store.open()
        await store.close()
    write_version_1_instance(path, instance())
    write_version_1_instance(path, completing)
    indexes_before = query(path, "SELECT name FROM sqlite_master WHERE name = 'instances_unusual'")

    store = SQLiteStore(path)
    await store.open()
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)  # type: ignore[union-attr]
    found = (
        await store.list_instances(status=COMPLETING),
        await store.list_instances(status="active"),
    )
    await store.close()

    plan = query(path, "EXPLAIN QUERY PLAN " + statements[0])
    assert indexes_before == []
    assert query(path, "SELECT value FROM meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    assert found == ([completing], [instance()])
    assert "INDEX instances_unusual (status=?)" in plan[0][-1]


async def test_a_file_with_an_unreadable_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    query(path, "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")

    with pytest.raises(StoreError, match="has no valid schema version \\(None in its meta"):
        await SQLiteStore(path).open()


async def test_a_file_that_is_not_sqlite_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the sagas you are looking for\n" * 200)

    with pytest.raises(StoreError) as caught:
        await SQLiteStore(path).open()

    assert type(caught.value) is StoreError
    assert str(caught.value) == (
        f"cannot open SQLite store {str(path)!r}: file is not a database; "
        "is it a SQLite database written by sagaflow?"
    )


async def test_a_file_in_a_missing_folder_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "sagas.db"

    with pytest.raises(StoreError) as caught:
        await SQLiteStore(path).open()

    assert str(caught.value) == (
        f"cannot open SQLite store {str(path)!r}: unable to open database file"
    )


async def test_a_relative_path_without_a_folder_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("sagas.db")

    await store.open()
    await store.close()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["sagas.db"]


async def test_calls_on_a_store_that_is_not_open_fail_clearly(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sagas.db")

    with pytest.raises(StoreError, match="is not open; call open\\(\\) first"):
        await store.list_instances()


async def test_a_store_can_be_opened_again_after_close_but_not_twice(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sagas.db")
    await store.open()
    await store.commit(Changes(writes=[InstanceWrite(instance(), 0)]))
    await store.close()
    await store.close()  # closing twice is harmless

    await store.open()
    with pytest.raises(StoreError, match="is already open"):
        await store.open()
    assert await store.list_instances() == [instance()]
    await store.close()


async def test_expired_marks_are_purged_by_later_commits(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    store = SQLiteStore(path)
    await store.open()
    old = [DedupMark(SAGA, f"k{i}", "e", expires_at=10.0) for i in range(300)]
    await store.commit(Changes(marks=[*old, DedupMark(SAGA, "k0", "fresh", expires_at=99.0)]))
    await store.load(LoadRequest(now=50.0))

    await store.commit(Changes(writes=[InstanceWrite(instance(), 0)]))
    await store.commit(Changes(writes=[InstanceWrite(instance("k2"), 0)]))
    await store.close()

    rows = query(path, "SELECT saga, key, event_id, expires_at FROM marks")
    assert rows == [(SAGA, "k0", "fresh", 99.0)]


def test_the_repr_shows_the_path() -> None:
    assert repr(SQLiteStore(Path("sagas.db"))) == (
        "SQLiteStore('sagas.db', busy_timeout=5.0, power_safe=True)"
    )


@pytest.mark.parametrize(("power_safe", "level"), [(True, 2), (False, 1)])
async def test_power_safe_chooses_full_or_normal_synchronous(
    tmp_path: Path, power_safe: bool, level: int
) -> None:
    """`power_safe=False` trades power-loss safety for speed: synchronous=NORMAL (1)."""
    store = SQLiteStore(tmp_path / "sagas.db", power_safe=power_safe)
    await store.open()
    conn = store._conn
    assert conn is not None
    setting = conn.execute("PRAGMA synchronous").fetchone()
    await store.close()
    assert (setting, repr(store).endswith(f"power_safe={power_safe})")) == ((level,), True)


async def test_an_empty_file_is_refused_unless_asked_to_create_a_store(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.write_bytes(b"")

    with pytest.raises(StoreError) as caught:
        await SQLiteStore(path).open()
    store = SQLiteStore(path, create=True)
    await store.open()
    await store.close()

    assert str(caught.value) == (
        f"SQLite file {str(path)!r} is empty (0 bytes), so it holds no sagaflow store: check "
        "the path (or restore the copy it should be); to start a new store in it, pass "
        "SQLiteStore(..., create=True) or delete the file"
    )
    assert query(path, "SELECT value FROM meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]


async def test_a_new_store_file_appears_only_with_its_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that dies while creating a store (here: the schema fails half-way, as a
    kill would stop it) leaves no empty file that the next start would refuse; a stray
    file of a dead creator is removed by the next creation."""
    path = tmp_path / "new.db"
    stray = tmp_path / "new.db.creating-999999999"  # no such process
    stray.write_bytes(b"")

    def dies(store: SQLiteStore, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        raise KeyboardInterrupt  # stands for the kill: nothing after this runs

    with monkeypatch.context() as patched:
        patched.setattr(SQLiteStore, "_migrate", dies)
        with pytest.raises(KeyboardInterrupt):
            await SQLiteStore(path).open()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    store = SQLiteStore(path)
    await store.open()
    await store.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [
        "new.db"
    ]
    assert query(path, "SELECT value FROM meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]


async def test_a_database_of_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    query(path, "CREATE TABLE customers (id INTEGER)")

    with pytest.raises(StoreError, match="holds 1 table\\(s\\) that sagaflow did not create"):
        await SQLiteStore(path, create=True).open()

    assert query(path, "SELECT name FROM sqlite_master") == [("customers",)]


async def test_a_schema_3_file_gains_associations_and_keeps_every_row(tmp_path: Path) -> None:
    """A file of the release before traces, tombstones and associations (schema 3), with
    rows of every kind as that release wrote them, is migrated in place through every
    later version: its rows are kept as they were, and associations work, looked up
    through their primary key."""
    path = tmp_path / "v3.db"
    with pytest.MonkeyPatch.context() as version_3:
        version_3.setattr(sqlite_module, "_MIGRATIONS", sqlite_module._MIGRATIONS[:2])
        version_3.setattr(sqlite_module, "SCHEMA_VERSION", 3)
        store = SQLiteStore(path)
        await store.open()
        # Instances, dead letters and marks have the same columns in schema 3.
        await store.commit(
            Changes(
                writes=[InstanceWrite(instance("k1"), 0), InstanceWrite(instance("k2"), 0)],
                dead_letters=[dead_letter("d1")],
                marks=[DedupMark(SAGA, "k1", "e1", expires_at=100.0)],
            )
        )
        await store.close()
    query(path, "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", *_v3(outbox_row("c1")))
    query(
        path,
        "INSERT INTO schedules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        *_v3(schedule("s1", due=5.0)),
    )
    assert query(path, "SELECT value FROM meta WHERE name = 'schema_version'") == [("3",)]

    store = SQLiteStore(path)
    await store.open()
    found = (
        await store.list_instances(),
        await store.list_schedules(),
        await store.list_outbox(),
        await store.list_dead_letters(),
        (await store.load(LoadRequest(marks=[(SAGA, "k1", "e1")], now=50.0))).marks,
    )
    pair = Association(SAGA, "customer", "c1", "k2")
    await store.commit(Changes(association_puts=[pair]))
    associated = await store.find_associated(SAGA, "customer", ["c1"])
    await store.close()

    assert found == (
        [instance("k1"), instance("k2")],
        [schedule("s1", due=5.0)],
        [outbox_row("c1")],
        [dead_letter("d1")],
        {(SAGA, "k1", "e1")},
    )
    assert associated == {"c1": ["k2"]}
    version = query(path, "SELECT value FROM meta WHERE name = 'schema_version'")
    assert version == [(str(SCHEMA_VERSION),)]
    plan = query(
        path,
        "EXPLAIN QUERY PLAN SELECT key FROM associations WHERE saga = ? AND name = ? AND value = ?",
        SAGA,
        "customer",
        "c1",
    )
    assert "USING PRIMARY KEY (saga=? AND name=? AND value=?)" in plan[0][-1]


def trace_threads(store: SQLiteStore) -> list[tuple[bool, str]]:
    """`(on the calling thread, statement)` of each statement `store` runs from now on."""
    caller = threading.get_ident()
    seen: list[tuple[bool, str]] = []
    trace = lambda sql: seen.append((threading.get_ident() == caller, sql))  # noqa: E731
    store._conn.set_trace_callback(trace)  # type: ignore[union-attr]
    return seen


@pytest.mark.parametrize(
    ("power_safe", "inline", "on_loop"),
    [(False, True, True), (False, False, False), (True, True, False)],
)
async def test_commits_and_loads_run_on_the_loop_unless_power_safe_or_not_inline(
    tmp_path: Path, power_safe: bool, inline: bool, on_loop: bool
) -> None:
    """Without a flush per commit, a commit is shorter than a thread's round trip; with
    one (`power_safe=True`), or with `inline=False`, it stays in a worker thread. Other
    calls always do."""
    store = SQLiteStore(tmp_path / "sagas.db", power_safe=power_safe, inline=inline)
    await store.open()
    seen = trace_threads(store)
    try:
        await store.load(LoadRequest(instances=[(SAGA, "k1")]))
        await store.commit(create(instance()))
        await store.list_instances()
    finally:
        await store.close()

    # The load's statements, the commit's (with its purge of expired marks), the listing.
    assert [(loop, sql.split()[0]) for loop, sql in seen if not sql.startswith("PRAGMA")] == [
        *[(on_loop, "BEGIN"), (on_loop, "SELECT"), (on_loop, "SELECT"), (on_loop, "COMMIT")],
        *[(on_loop, "BEGIN"), (on_loop, "INSERT"), (on_loop, "DELETE"), (on_loop, "COMMIT")],
        (False, "SELECT"),
    ]


async def test_checkpoints_run_in_a_worker_thread_not_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_CHECKPOINT_ROWS", 3)
    path = tmp_path / "sagas.db"
    store = SQLiteStore(path, power_safe=False)
    await store.open()
    seen = trace_threads(store)
    try:
        await store.commit(create(instance("a"), instance("b"), instance("c")))
        await store.commit(create(instance("d")))  # a checkpoint is due: a thread does both
        await store.commit(create(instance("e")))
    finally:
        await store.close()

    assert [(loop, sql) for loop, sql in seen if sql.split()[0] != "INSERT"] == [
        (True, "BEGIN IMMEDIATE"),
        (True, "COMMIT"),
        (False, "PRAGMA busy_timeout = 5000"),
        (False, "BEGIN IMMEDIATE"),
        (False, "COMMIT"),
        (False, "PRAGMA wal_checkpoint(PASSIVE)"),
        (False, "PRAGMA busy_timeout = 0"),
        (True, "BEGIN IMMEDIATE"),
        (True, "COMMIT"),
    ]
    assert [r.key for r in await reopened_instances(path)] == ["a", "b", "c", "d", "e"]


async def reopened_instances(path: Path) -> list[InstanceRecord]:
    store = SQLiteStore(path)
    await store.open()
    try:
        return await store.list_instances()
    finally:
        await store.close()


async def test_a_commit_waits_for_another_connections_lock_in_a_thread(tmp_path: Path) -> None:
    """The loop never waits for a lock: a commit that finds the file locked by another
    connection waits in a worker thread, and the loop runs on meanwhile."""
    path = tmp_path / "sagas.db"
    store = SQLiteStore(path, power_safe=False, busy_timeout=30.0)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    done = anyio.Event()

    async def commit() -> None:
        await store.commit(create(instance()))
        done.set()

    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit)
            await anyio.wait_all_tasks_blocked()  # the commit waits, the loop does not
            waiting = (done.is_set(), store._limiter.borrowed_tokens)  # type: ignore[union-attr]
            other.execute("ROLLBACK")
        assert (waiting, await store.list_instances()) == ((False, 1), [instance()])
    finally:
        other.close()
        await store.close()


async def test_a_commit_too_long_for_the_loop_runs_in_a_thread_and_counts_to_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_SHORT", 2)
    monkeypatch.setattr(sqlite_module, "_CHECKPOINT_ROWS", 3)
    store = SQLiteStore(tmp_path / "sagas.db", power_safe=False)
    await store.open()
    seen = trace_threads(store)
    try:
        await store.commit(create(instance("a"), instance("b"), instance("c")))
    finally:
        await store.close()

    assert [(loop, sql) for loop, sql in seen if sql.split()[0] != "INSERT"] == [
        (False, "PRAGMA busy_timeout = 5000"),
        (False, "BEGIN IMMEDIATE"),
        (False, "COMMIT"),
        (False, "PRAGMA wal_checkpoint(PASSIVE)"),
        (False, "PRAGMA busy_timeout = 0"),
    ]
