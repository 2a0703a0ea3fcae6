"""`PostgresStore`: the conformance suite, schema management, leases, DSN redaction.

Needs a PostgreSQL server (see `_postgres_server.py`); the redaction tests do not.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import anyio
import attrs
import psycopg
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401

from sagaflow.exceptions import ConflictError, SchemaVersionError, StoreError
from sagaflow.stores import (
    Changes,
    InstanceWrite,
    LoadRequest,
    OutboxUpdate,
    ScheduleDelete,
    Store,
    _postgres,
)
from sagaflow.stores._claims import InboxRecord
from sagaflow.stores._postgres import SCHEMA_VERSION, PostgresStore, redact_dsn
from sagaflow.testing.conformance import (
    SAGA,
    ClusterStoreConformance,
    create,
    instance,
    outbox_row,
    scan_pages,
    schedule,
)

SECRET = "s3cr3t-Pa55"


def with_password(dsn: str, password: str = SECRET) -> str:
    """`dsn` (a URL) with a password; trust authentication ignores it."""
    scheme, _, rest = dsn.partition("://")
    userinfo, _, hostpart = rest.rpartition("@")
    return f"{scheme}://{userinfo or 'postgres'}:{password}@{hostpart}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def pg_store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStore]:  # noqa: F811
    """An open `PostgresStore` on a fresh schema."""
    store = PostgresStore(postgres_dsn, schema=pg_schema, max_size=12)
    await store.open()
    yield store
    await store.close()


@pytest.mark.postgres
class TestPostgresStore(ClusterStoreConformance):
    """The conformance suites (of stores and of cluster stores) on a fresh schema per
    test."""

    @pytest.fixture
    async def store(self, pg_store: PostgresStore) -> AsyncIterator[Store]:
        yield pg_store


# -- DSN redaction (no server needed)


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        pytest.param(
            "postgresql://alice:s3cret@db.example:5432/app",
            "postgresql://alice:***@db.example:5432/app",
            id="url",
        ),
        pytest.param(
            "postgres://alice:s3cret@db/app?sslmode=require&application_name=x",
            "postgres://alice:***@db/app?sslmode=require&application_name=x",
            id="url-with-query",
        ),
        pytest.param(
            "postgresql://alice:p%40ss%2Fw0rd@h1:5432,h2:5433/app",
            "postgresql://alice:***@h1:5432,h2:5433/app",
            id="url-encoded-multi-host",
        ),
        pytest.param(
            "postgresql://alice:p@ss/w:rd@db/app",
            "postgresql://alice:***@db/app",
            id="url-unencoded-specials",
        ),
        pytest.param("postgresql://:s3cret@db/app", "postgresql://:***@db/app", id="no-user"),
        pytest.param(
            "postgresql://db/app?user=alice&password=s3cret&sslmode=require",
            "postgresql://db/app?user=alice&password=***&sslmode=require",
            id="url-query-password",
        ),
        pytest.param(
            "postgresql://alice@db/app?sslpassword=k3y",
            "postgresql://alice@db/app?sslpassword=***",
            id="url-sslpassword",
        ),
        pytest.param(
            "postgresql://alice@db:5432/app", "postgresql://alice@db:5432/app", id="url-no-pw"
        ),
        pytest.param(
            "host=db user=alice password=s3cret dbname=app",
            "host=db user=alice password=*** dbname=app",
            id="keywords",
        ),
        pytest.param(
            "host=db password = 's3 cr\\'et' dbname=app",
            "host=db password=*** dbname=app",
            id="keywords-quoted",
        ),
        pytest.param(
            "host=db password=s3\\ cret dbname=app",
            "host=db password=*** dbname=app",
            id="keywords-escaped-space",
        ),
        pytest.param("PASSWORD=s3cret host=db", "PASSWORD=*** host=db", id="keywords-case"),
        pytest.param(
            "host=db sslpassword=k3y passfile=/x", "host=db sslpassword=*** passfile=/x", id="ssl"
        ),
        pytest.param("host=db password='unterminated", "host=db password=***", id="open-quote"),
        pytest.param("host=db dbname=app", "host=db dbname=app", id="keywords-no-pw"),
        pytest.param("", "", id="empty"),
    ],
)
def test_redact_dsn_masks_every_password_and_keeps_the_rest(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted


def test_repr_shows_the_redacted_dsn_and_the_schema() -> None:
    store = PostgresStore(f"postgresql://alice:{SECRET}@db.example/app", schema="orders")

    assert repr(store) == "PostgresStore('postgresql://alice:***@db.example/app', schema='orders')"


def test_an_unparsable_dsn_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        PostgresStore(f"host=db password={SECRET} nonsense")

    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None
    assert "password=***" in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schema": "bad-name"}, "not a plain identifier"),
        ({"schema": "1abc"}, "not a plain identifier"),
        ({"min_size": 5, "max_size": 2}, "min_size <= max_size"),
        ({"max_size": 0, "min_size": 0}, "max_size >= 1"),
        ({"timeout": 0}, "timeout must be positive"),
    ],
)
def test_invalid_options_are_rejected_at_construction(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PostgresStore("postgresql://db/app", **kwargs)  # type: ignore[arg-type]


def test_importing_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "sagaflow.stores._postgres")

    with pytest.raises(ImportError, match=r"pip install 'sagaflow\[postgres\]'"):
        importlib.import_module("sagaflow.stores._postgres")


def test_sagaflow_stores_imports_without_psycopg() -> None:
    """Only `PostgresStore` needs the extra; asking for it names the extra."""
    code = """
import sys
sys.modules["psycopg"] = sys.modules["psycopg_pool"] = None
import sagaflow.stores
if "PostgresStore" in sagaflow.stores.__all__:
    try:
        sagaflow.stores.PostgresStore
    except ImportError as exc:
        assert "pip install 'sagaflow[postgres]'" in str(exc), exc
    else:
        raise AssertionError("PostgresStore imported without psycopg")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    assert (result.returncode, result.stderr) == (0, "")


# -- connecting


@pytest.mark.anyio
async def test_operations_before_open_say_how_to_fix_it() -> None:
    store = PostgresStore(f"postgresql://alice:{SECRET}@127.0.0.1:1/app")

    with pytest.raises(StoreError, match=r"is not open: call `await store.open\(\)` first"):
        await store.list_instances()


@pytest.mark.anyio
async def test_a_connection_failure_is_a_store_error_without_the_password() -> None:
    dsn = f"postgresql://alice:{SECRET}@127.0.0.1:{closed_port()}/app"
    store = PostgresStore(dsn, timeout=5)

    with pytest.raises(StoreError) as caught:
        await store.open()

    message = str(caught.value)
    assert message.startswith(
        f"PostgresStore({redact_dsn(dsn)!r}, schema='sagaflow') could not connect"
    )
    assert SECRET not in message
    cause = caught.value.__cause__
    assert cause is None or SECRET not in str(cause)
    await store.close()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_logs_never_show_the_password(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = with_password(postgres_dsn)
    store = PostgresStore(dsn, schema=pg_schema)

    with caplog.at_level(logging.DEBUG):
        await store.open()
        await store.commit(create(instance()))
        await store.close()

    assert f"created PostgreSQL schema {pg_schema!r} in {redact_dsn(dsn)}" in caplog.text
    assert SECRET not in caplog.text


# -- schema management


async def meta_version(dsn: str, schema: str) -> str:
    def read() -> str:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(f'SELECT value FROM "{schema}".meta').fetchone()
            assert row is not None
            return str(row[0])

    return await anyio.to_thread.run_sync(read)


async def execute(dsn: str, statement: str) -> None:
    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement)

    await anyio.to_thread.run_sync(run)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_many_processes_may_create_the_schema_at_once(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    stores = [PostgresStore(postgres_dsn, schema=pg_schema, min_size=0) for _ in range(8)]

    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.open)
    await stores[0].commit(create(instance()))

    assert [await s.list_instances() for s in stores] == [[instance()]] * 8
    assert await meta_version(postgres_dsn, pg_schema) == str(SCHEMA_VERSION)
    for store in stores:
        await store.close()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_data_outlives_the_store_object(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    first = PostgresStore(postgres_dsn, schema=pg_schema)
    await first.open()
    await first.commit(create(instance()))
    await first.close()
    await first.close()  # closing twice is fine

    second = PostgresStore(postgres_dsn, schema=pg_schema)
    await second.open()
    await second.open()  # opening twice is fine

    assert await second.list_instances() == [instance()]
    await second.close()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_a_schema_written_by_a_newer_sagaflow_is_refused(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    await store.close()
    await execute(postgres_dsn, f"UPDATE \"{pg_schema}\".meta SET value = '{SCHEMA_VERSION + 1}'")

    with pytest.raises(SchemaVersionError) as caught:
        await store.open()

    assert (caught.value.found, caught.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(caught.value)
    assert "upgrade sagaflow" in str(caught.value)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_an_unreadable_schema_version_is_refused(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    await store.close()
    await execute(postgres_dsn, f'DELETE FROM "{pg_schema}".meta')

    with pytest.raises(SchemaVersionError, match="without a readable schema version"):
        await store.open()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_a_schema_holding_foreign_tables_is_refused(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    await execute(postgres_dsn, f'CREATE SCHEMA "{pg_schema}"')
    await execute(postgres_dsn, f'CREATE TABLE "{pg_schema}".instances (id int)')

    with pytest.raises(StoreError, match=r"holds 1 table\(s\) that sagaflow did not create"):
        await PostgresStore(postgres_dsn, schema=pg_schema).open()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_an_older_schema_is_migrated_step_by_step(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    await store.commit(create(instance()))
    await store.close()
    step = ("CREATE TABLE {s}.extra (x int)", "INSERT INTO {s}.extra VALUES (42)")
    monkeypatch.setattr(_postgres, "_MIGRATIONS", (*_postgres._MIGRATIONS, step))
    monkeypatch.setattr(_postgres, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    await store.open()

    assert await store.list_instances() == [instance()]
    assert await meta_version(postgres_dsn, pg_schema) == str(SCHEMA_VERSION + 1)
    await execute(postgres_dsn, f'SELECT 1 / (x - 41) FROM "{pg_schema}".extra')
    await store.close()


@pytest.mark.postgres
@pytest.mark.anyio
async def test_without_migrate_nothing_is_created_or_migrated(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(StoreError, match="holds no sagaflow store"):
        await PostgresStore(postgres_dsn, schema=pg_schema, migrate=False).open()
    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    await store.commit(create(instance()))
    await store.close()
    reader = PostgresStore(postgres_dsn, schema=pg_schema, migrate=False)
    await reader.open()
    assert await reader.scan_instances(limit=5) == [instance()]
    await reader.close()
    step = ("CREATE TABLE {s}.extra (x int)",)
    monkeypatch.setattr(_postgres, "_MIGRATIONS", (*_postgres._MIGRATIONS, step))
    monkeypatch.setattr(_postgres, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    with pytest.raises(SchemaVersionError) as caught:
        await reader.open()

    assert (caught.value.found, caught.value.supported) == (SCHEMA_VERSION, SCHEMA_VERSION + 1)
    assert "without migrating (migrate=False); work on a copy" in str(caught.value)
    assert await meta_version(postgres_dsn, pg_schema) == str(SCHEMA_VERSION)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_scan_inbox_pages_by_position(pg_store: PostgresStore) -> None:
    rows = [
        InboxRecord(0, saga, key, f"e{n}", False, "shop.OrderPlaced", "{}", 5.0)
        for n, (saga, key) in enumerate([("B", "k1"), ("A", "k2"), ("A", "k1"), ("B", "k0")])
    ]
    positions = await pg_store.put_inbox(rows)
    stored = [attrs.evolve(r, pos=p) for r, p in zip(rows, positions, strict=True)]

    pages = await scan_pages(pg_store.scan_inbox, lambda r: r.pos, limit=3)

    assert pages == [stored[:3], stored[3:]]
    assert await pg_store.scan_inbox(after=positions[1], limit=10) == stored[2:]
    assert await pg_store.list_inbox() == stored


# -- fields beyond the conformance suite's


@pytest.mark.postgres
@pytest.mark.anyio
async def test_completed_and_schedule_attempts_round_trip(pg_store: PostgresStore) -> None:
    done = attrs.evolve(instance(), completed=True)
    timer = attrs.evolve(schedule("t1"), attempts=3)

    await pg_store.commit(Changes(writes=[InstanceWrite(done, 0)], schedule_puts=[timer]))

    assert await pg_store.list_instances() == [done]
    assert await pg_store.list_schedules() == [timer]
    assert await pg_store.due_schedules(100.0, 10) == [timer]


@pytest.mark.postgres
@pytest.mark.anyio
async def test_racing_commits_over_overlapping_instances_apply_or_conflict(
    pg_store: PostgresStore,
) -> None:
    """Writers lock instances in one order: no deadlock, and no update is lost."""
    keys = [f"k{i}" for i in range(6)]
    await pg_store.commit(create(*(instance(k) for k in keys)))
    applied = dict.fromkeys(keys, 0)

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(8):
            while True:
                chosen = rng.sample(keys, 3)
                loaded = await pg_store.load(LoadRequest(instances=[(SAGA, k) for k in chosen]))
                writes = [
                    InstanceWrite(attrs.evolve(r, version=r.version + 1), r.version)
                    for r in loaded.instances.values()
                ]
                rng.shuffle(writes)
                try:
                    await pg_store.commit(Changes(writes=writes))
                except ConflictError:
                    continue
                for k in chosen:
                    applied[k] += 1
                break

    async with anyio.create_task_group() as tg:
        for seed in range(8):
            tg.start_soon(writer, seed)

    versions = {r.key: r.version for r in await pg_store.list_instances()}
    assert versions == {k: 1 + applied[k] for k in keys}


# -- leases (PostgreSQL-only extensions)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_claim_outbox_leases_the_due_head_of_each_instance(pg_store: PostgresStore) -> None:
    rows = {
        "a1": outbox_row("a1", key="a", seq=1, due=5.0),
        "a2": outbox_row("a2", key="a", seq=2),
        "b1": outbox_row("b1", key="b", seq=1, due=50.0),  # backing off: holds b2 back
        "b2": outbox_row("b2", key="b", seq=2),
        "c7": outbox_row("c7", key="c", seq=7, due=1.0),
    }
    await pg_store.commit(Changes(outbox_adds=list(rows.values())))

    assert await pg_store.claim_outbox("p1", now=10.0, lease_seconds=30.0, limit=10) == [
        rows["c7"],
        rows["a1"],
    ]
    assert await pg_store.claim_outbox("p2", now=10.0, lease_seconds=30.0, limit=10) == []
    # The owner gets its own rows again (a renewed lease).
    assert await pg_store.claim_outbox("p1", now=11.0, lease_seconds=30.0, limit=1) == [rows["c7"]]

    # Dispatched: deleting a head lets the next row of its instance be claimed.
    await pg_store.commit(Changes(outbox_deletes=["a1"]))
    assert await pg_store.claim_outbox("p2", now=12.0, lease_seconds=30.0, limit=10) == [rows["a2"]]
    assert await pg_store.claim_outbox("p2", now=50.0, lease_seconds=30.0, limit=10) == [
        rows["a2"],
        rows["c7"],
        rows["b1"],
    ]


@pytest.mark.postgres
@pytest.mark.anyio
async def test_an_expired_outbox_lease_can_be_claimed_again(pg_store: PostgresStore) -> None:
    row = outbox_row("c1")
    await pg_store.commit(Changes(outbox_adds=[row]))

    assert await pg_store.claim_outbox("p1", now=100.0, lease_seconds=10.0, limit=5) == [row]
    assert await pg_store.claim_outbox("p2", now=109.9, lease_seconds=10.0, limit=5) == []
    assert await pg_store.claim_outbox("p2", now=110.0, lease_seconds=10.0, limit=5) == [row]
    assert await pg_store.claim_outbox("p1", now=115.0, lease_seconds=10.0, limit=5) == []


@pytest.mark.postgres
@pytest.mark.anyio
async def test_released_or_retried_outbox_rows_are_free_to_claim(pg_store: PostgresStore) -> None:
    rows = [outbox_row("c1", key="a"), outbox_row("c2", key="b")]
    await pg_store.commit(Changes(outbox_adds=rows))
    assert await pg_store.claim_outbox("p1", now=1.0, lease_seconds=60.0, limit=5) == rows

    await pg_store.release_outbox(["c1"], owner="someone-else")
    assert await pg_store.claim_outbox("p2", now=2.0, lease_seconds=60.0, limit=5) == []

    await pg_store.release_outbox(["c1", "unknown"], owner="p1")
    await pg_store.commit(
        Changes(outbox_updates=[OutboxUpdate("c2", attempts=1, due=3.0, error="E: x")])
    )
    assert await pg_store.claim_outbox("p2", now=3.0, lease_seconds=60.0, limit=5) == [
        rows[0],
        attrs.evolve(rows[1], attempts=1, due=3.0, error="E: x"),
    ]

    await pg_store.release_outbox(["c1", "c2"])
    assert len(await pg_store.claim_outbox("p3", now=3.0, lease_seconds=60.0, limit=5)) == 2


@pytest.mark.postgres
@pytest.mark.anyio
async def test_concurrent_outbox_claimers_never_get_the_same_row(pg_store: PostgresStore) -> None:
    heads = [outbox_row(f"c{i}-1", key=f"k{i:03}", seq=1) for i in range(300)]
    later = [outbox_row(f"c{i}-2", key=f"k{i:03}", seq=2) for i in range(300)]
    await pg_store.commit(Changes(outbox_adds=heads + later))
    claimed: list[tuple[str, str]] = []

    async def claimer(process: str) -> None:
        # A fresh owner per call: an owner would get its own leased rows back.
        for call in itertools.count():
            rows = await pg_store.claim_outbox(f"{process}.{call}", 1.0, 60.0, limit=7)
            if not rows:
                return
            claimed.extend((process, row.id) for row in rows)

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(claimer, f"p{n}")

    ids = [row_id for _, row_id in claimed]
    assert sorted(ids) == sorted(row.id for row in heads)
    assert len({owner for owner, _ in claimed}) > 1


@pytest.mark.postgres
@pytest.mark.anyio
async def test_claim_due_schedules_leases_due_schedules(pg_store: PostgresStore) -> None:
    s = {
        "s1": schedule("s1", due=1.0),
        "s2": schedule("s2", key="k2", due=2.0),
        "late": schedule("late", key="k3", due=100.0),
    }
    await pg_store.commit(Changes(schedule_puts=list(s.values())))

    assert await pg_store.claim_due_schedules("p1", now=5.0, lease_seconds=10.0, limit=1) == [
        s["s1"]
    ]
    assert await pg_store.claim_due_schedules("p2", now=5.0, lease_seconds=10.0, limit=10) == [
        s["s2"]
    ]
    assert await pg_store.claim_due_schedules("p3", now=5.0, lease_seconds=10.0, limit=10) == []
    # Expired leases are free again; putting a schedule again drops its lease.
    assert await pg_store.claim_due_schedules("p3", now=15.0, lease_seconds=10.0, limit=10) == [
        s["s1"],
        s["s2"],
    ]
    moved = schedule("s1", due=16.0)
    await pg_store.commit(Changes(schedule_puts=[moved]))
    assert await pg_store.claim_due_schedules("p4", now=16.0, lease_seconds=10.0, limit=10) == [
        moved
    ]
    await pg_store.release_schedules(["s2"], owner="p3")
    await pg_store.commit(Changes(schedule_deletes=[ScheduleDelete(SAGA, "k1", "s1")]))
    assert await pg_store.claim_due_schedules("p4", now=17.0, lease_seconds=10.0, limit=10) == [
        s["s2"]
    ]


@pytest.mark.postgres
@pytest.mark.anyio
async def test_concurrent_schedule_claimers_never_get_the_same_row(
    pg_store: PostgresStore,
) -> None:
    timers = [schedule(f"s{i}", key=f"k{i:03}", due=float(i % 10)) for i in range(300)]
    await pg_store.commit(Changes(schedule_puts=timers))
    claimed: list[str] = []

    async def claimer(process: str) -> None:
        for call in itertools.count():
            rows = await pg_store.claim_due_schedules(f"{process}.{call}", 100.0, 60.0, limit=7)
            if not rows:
                return
            claimed.extend(row.id for row in rows)

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(claimer, f"p{n}")

    assert sorted(claimed) == sorted(t.id for t in timers)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_claim_arguments_are_checked(pg_store: PostgresStore) -> None:
    with pytest.raises(ValueError, match="lease_seconds > 0"):
        await pg_store.claim_outbox("p", now=1.0, lease_seconds=0.0, limit=1)
    with pytest.raises(ValueError, match="limit >= 0"):
        await pg_store.claim_due_schedules("p", now=1.0, lease_seconds=1.0, limit=-1)
