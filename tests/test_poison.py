"""Poison isolation: one event whose effects a store refuses fails alone.

Its batch is committed without it, it is kept as a dead letter (escaped so the store takes
it), `publish` of it raises `UnstorableError` naming saga, key and type, and `run` goes on.
Proved on every store with 255 good events and one poison event at a random position.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from json_meaning import JsonText

from sagaflow import Admin, DispatchMeta, Registry, Runtime, correlate, on
from sagaflow.exceptions import UnstorableError
from sagaflow.stores import Changes, MemoryStore, SQLiteStore, Store

pytestmark = pytest.mark.anyio


@attrs.frozen
class Bump:
    key: str


@attrs.define
class Count:
    count: int = 0


class CounterSaga:
    @correlate
    def key(self, event: Bump) -> str:
        return event.key

    @on(Bump, start=True)
    def bump(self, state: Count, event: Bump) -> None:
        state.count += 1


def registry() -> Registry:
    made = Registry()
    made.register(CounterSaga(), state=Count, name="counter")
    return made


async def dispatch(command: object, meta: DispatchMeta) -> None:
    raise AssertionError("nothing is sent")


class RefusingStore(MemoryStore):
    """A `MemoryStore` that refuses any commit writing the instance key `"poison"`,
    as a real store refuses a value it cannot encode."""

    async def commit(self, changes: Changes) -> None:
        if any(w.record.key == "poison" for w in changes.writes):
            raise ValueError("this store cannot hold the key 'poison'")
        await super().commit(changes)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def poison_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Callable[[], Store], str, str, str]]:
    """A store factory, a key that store refuses, and how the dead letter shows the key
    (escaped) in its key column and in its JSON payload."""
    if request.param == "memory":
        store = RefusingStore()
        yield (lambda: store), "poison", "poison", "poison"
    elif request.param == "sqlite":
        path = tmp_path / "poison.db"
        yield (lambda: SQLiteStore(path)), "bad\ud800key", "bad\\ud800key", "bad\\ud800key"
    else:
        from sagaflow.stores import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("pg_schema")
        yield (
            (lambda: PostgresStore(dsn, schema=schema)),
            "bad\x00key",
            "bad\\x00key",
            ("bad\\u0000key"),
        )


async def events(keys: list[str]) -> AsyncIterator[Bump]:
    for key in keys:
        yield Bump(key)


async def test_one_poison_event_among_255_is_dead_lettered_and_the_rest_committed(
    poison_store: tuple[Callable[[], Store], str, str, str],
) -> None:
    make, bad, shown, in_json = poison_store
    keys = [f"k{i:03}" for i in range(255)]
    position = random.Random(len(bad)).randrange(256)
    keys.insert(position, bad)
    batches: list[int] = []

    class Batches:
        def __getattr__(self, name: str) -> Any:
            return lambda *args: batches.append(args[0]) if name == "batch_committed" else None

    with anyio.fail_after(60):
        async with Runtime(
            registry(),
            store=make(),
            dispatch=dispatch,
            shards=1,
            max_batch=256,
            queue_size=512,
            hooks=Batches(),  # type: ignore[arg-type]
        ) as runtime:
            consumed = await runtime.run(events(keys))
            with pytest.raises(UnstorableError) as caught:
                await runtime.publish(Bump(bad))
            instances = await runtime.store.list_instances()
            letters = await runtime.store.list_dead_letters()
            stats = runtime.statistics()

    assert consumed == 256
    assert sorted(r.key for r in instances) == sorted(k for k in keys if k != bad)
    assert [(d.saga, d.key, d.kind, d.type_name, d.payload) for d in letters] == [
        ("counter", shown, "event", "test_poison.Bump", f'{{"key": "{in_json}"}}')
    ] * 2
    assert all("the store refused it" in d.error for d in letters)
    error = caught.value
    assert (error.saga, error.key, error.type_name, error.dead_lettered) == (
        "counter",
        bad,
        "test_poison.Bump",
        True,
    )
    assert f"Bump for saga 'counter' key {bad!r} could not be stored" in str(error)
    assert stats.dead_letters == 2
    # The first batch held all 256 and failed; its good part was committed in halves.
    assert sum(batches) == 255 + 0 and max(batches) >= 127


async def test_a_failing_store_fails_the_whole_batch_without_dead_letters() -> None:
    """When every half fails too, it is the store, not one event: nothing is
    dead-lettered and the publishers get the store's error."""

    class DownStore(MemoryStore):
        down = False

        async def commit(self, changes: Changes) -> None:
            if self.down:
                raise OSError("db down")
            await super().commit(changes)

    store = DownStore()
    with anyio.fail_after(30):
        async with Runtime(registry(), store=store, dispatch=dispatch, shards=1) as runtime:
            store.down = True
            with pytest.raises(OSError, match="db down"):
                await runtime.run(events([f"k{i}" for i in range(8)]))
            store.down = False
            letters = await store.list_dead_letters()
            instances = await store.list_instances()

    assert (letters, instances) == ([], [])


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [("status", "'archived'", "status 'archived'"), ("version", "'abc'", "version 'abc'")],
)
async def test_a_corrupt_instance_row_holds_only_that_instance(
    tmp_path: Path, column: str, value: str, shown: str
) -> None:
    """An unknown status or a version that is not a number: that instance's events wait
    as dead letters naming the column; other instances go on."""
    import sqlite3
    from contextlib import closing

    path = tmp_path / "corrupt.db"
    with anyio.fail_after(30):
        async with Runtime(registry(), store=SQLiteStore(path), dispatch=dispatch) as runtime:
            await runtime.run(events(["a", "b"]))
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"UPDATE instances SET {column} = {value} WHERE key = 'a'")

    with anyio.fail_after(60):
        async with Runtime(registry(), store=SQLiteStore(path), dispatch=dispatch) as runtime:
            await runtime.run(events(["a", "b"]))
            letters = await runtime.store.list_dead_letters()
            counts = {r.key: r.state for r in await runtime.store.list_instances()}
            report = await Admin(runtime.store, registry=registry()).check()

    assert [(d.key, d.kind) for d in letters] == [("a", "event")]
    assert f"stored instance of saga 'counter' key 'a' has {shown}" in letters[0].error
    assert counts == {"a": JsonText('{"count": 1}'), "b": JsonText('{"count": 2}')}
    # The pre-deploy check reads instance rows as the runtime does: it sees the same fault.
    (failure,) = report.failures
    assert (failure.key, report.failed) == ("a", 1)
    assert f"has {shown}, which sagaflow never writes" in failure.error


@attrs.frozen
class Note:
    key: str
    text: str


@attrs.define
class Noted:
    text: str = ""


class NoteSaga:
    @correlate
    def key(self, event: Note) -> str:
        return event.key

    @on(Note, start=True)
    def note(self, state: Noted, event: Note) -> None:
        # A bug of the kind a store refuses: "!" becomes a lone surrogate, which no
        # UTF-8 column takes (the event itself, with its "!", was stored fine).
        state.text = event.text.replace("!", "\ud800")


async def test_in_cluster_mode_an_event_whose_state_the_store_refuses_is_dead_lettered_once(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """The inbox takes the event, but the state its handler makes cannot be stored: the event
    is dead-lettered and acknowledged (not delivered again and again), the others of its
    batch are committed."""
    from sagaflow.stores import PostgresStore

    made = Registry()
    made.register(NoteSaga(), state=Noted, name="notes")
    notes = [Note(f"k{i}", "fine") for i in range(20)]
    notes.insert(7, Note("bad", "bang!"))
    with anyio.fail_after(60):
        async with Runtime(
            made,
            store=PostgresStore(postgres_dsn, schema=pg_schema, poll_interval=0.05),
            dispatch=dispatch,
            cluster=True,
        ) as runtime:
            async with anyio.create_task_group() as tg:
                for note in notes:
                    tg.start_soon(runtime.publish, note)
            await runtime.drain()
            store = runtime.store
            instances = sorted(r.key for r in await store.list_instances())
            letters = [(d.key, d.type_name) for d in await store.list_dead_letters()]
            inbox = await store.list_inbox()  # type: ignore[attr-defined]

    assert instances == sorted(f"k{i}" for i in range(20))
    assert (letters, inbox) == ([("bad", "test_poison.Note")], [])
