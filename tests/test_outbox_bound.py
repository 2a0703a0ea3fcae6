"""A downstream outage: commands pile up in the store, not in memory.

The outbox holds at most `outbox_capacity` commands; the rest wait in the store and are
read back a page at a time (`Store.pending_commands`), never the whole outbox at once.
Once the downstream is back, every command goes out once, in its instance's order, and
the instances that completed meanwhile end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from sagas_for_tests import (
    T0,
    Cmd,
    Started,
    Touched,
    running,
    scripted_registry,
)

from sagaflow import Complete, DispatchMeta, RetryPolicy, Runtime, Send
from sagaflow._clock import VirtualClock
from sagaflow.stores import Changes, MemoryStore, PendingCommand, SQLiteStore, Store

pytestmark = pytest.mark.anyio

CAPACITY = 8
KEYS = [f"k{i:03}" for i in range(60)]
# Never gives up during the test's outage: every command stays in the outbox.
PATIENT = RetryPolicy(max_attempts=1000, initial_delay=1, max_delay=4, jitter=False)


def script(state: Any, event: Any) -> Any:
    if isinstance(event, Started):
        return [Send(Cmd(event.key, "a")), Send(Cmd(event.key, "b"))]
    if isinstance(event, Touched):
        return [Send(Cmd(event.key, "c")), Complete()]
    return None


class Downstream:
    """A dispatcher that fails while `down`, and records what the outbox holds at each call."""

    def __init__(self) -> None:
        self.down = True
        self.runtime: Runtime | None = None
        self.delivered: list[tuple[str, str, str]] = []
        self.most_held = 0

    async def __call__(self, command: Cmd, meta: DispatchMeta) -> None:
        if self.runtime is not None:
            self.most_held = max(self.most_held, self.runtime.statistics().outbox_depth)
        await anyio.lowlevel.checkpoint()
        if self.down:
            raise ConnectionError("the downstream service is down")
        self.delivered.append((command.key, command.label, meta.id))

    def labels(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for key, label, _ in self.delivered:
            found.setdefault(key, []).append(label)
        return found


class PagedOnly(MemoryStore):
    """Records the pages the runtime reads, and refuses a read of the whole outbox."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: list[int] = []

    async def list_outbox(self, *, saga: str | None = None, key: str | None = None) -> Any:
        if saga is None or key is None:
            raise AssertionError("the runtime read the whole outbox")
        return await super().list_outbox(saga=saga, key=key)

    async def pending_commands(self, **options: Any) -> list[PendingCommand]:
        found = await super().pending_commands(**options)
        self.pages.append(len(found))
        return found


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield PagedOnly()
    elif request.param == "sqlite":
        yield SQLiteStore(tmp_path / "s.db")
    else:
        from sagaflow.stores import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        yield PostgresStore(dsn, schema=request.getfixturevalue("pg_schema"))


async def outbox_size(store: Store) -> int:
    """How many rows the outbox has (read as a test reads it, not as the runtime does)."""
    rows, after = 0, None
    while page := await store.scan_outbox(after=after, limit=100):
        rows, after = rows + len(page), page[-1].id
    return rows


async def until_empty(store: Store, clock: VirtualClock, runtime: Runtime) -> None:
    """Let virtual time pass until the outbox and the instances are gone."""
    while await outbox_size(store) or await store.scan_instances(limit=1):
        await runtime.drain()
        clock.advance(1)
    await runtime.drain()


async def test_an_outage_holds_at_most_the_capacity_and_loses_nothing(store: Store) -> None:
    downstream = Downstream()
    async with running(
        scripted_registry(script),
        store=store,  # type: ignore[arg-type]
        recorder=downstream,  # type: ignore[arg-type]
        retry=PATIENT,
        outbox_capacity=CAPACITY,
    ) as h:
        downstream.runtime = h.runtime
        for key in KEYS:
            await h.runtime.publish(Started(key))
        for key in KEYS:
            await h.runtime.publish(Touched(key))  # completes, with commands left
        await h.advance(10)

        assert await outbox_size(store) == 3 * len(KEYS)
        assert h.runtime.statistics().outbox_depth <= CAPACITY

        downstream.down = False
        await until_empty(store, h.clock, h.runtime)

    assert downstream.most_held <= CAPACITY
    assert downstream.labels() == {key: ["a", "b", "c"] for key in KEYS}
    assert len({id for _, _, id in downstream.delivered}) == 3 * len(KEYS)
    if isinstance(store, PagedOnly):
        assert store.pages and max(store.pages) <= 512


async def test_a_restart_reads_a_backlog_back_a_page_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = VirtualClock(start=T0)
    downstream = Downstream()
    options: dict[str, Any] = {"retry": PATIENT, "clock": clock, "outbox_capacity": CAPACITY}
    async with running(
        scripted_registry(script),
        store=SQLiteStore(path),  # type: ignore[arg-type]
        recorder=downstream,  # type: ignore[arg-type]
        **options,
    ) as h:
        for key in KEYS:
            await h.runtime.publish(Started(key))
            await h.runtime.publish(Touched(key))
        await h.advance(3)  # some commands wait for a retry, most were never tried

    downstream.down = False
    store = SQLiteStore(path)
    async with running(
        scripted_registry(script),
        store=store,  # type: ignore[arg-type]
        recorder=downstream,  # type: ignore[arg-type]
        **options,
    ) as h:
        downstream.runtime = h.runtime
        await until_empty(store, clock, h.runtime)

    assert downstream.most_held <= CAPACITY
    assert downstream.labels() == {key: ["a", "b", "c"] for key in KEYS}


async def test_a_completed_instance_whose_rows_end_a_full_page_ends_after_a_restart(
    tmp_path: Path,
) -> None:
    """The read of a full page cuts its last instance's queue (more rows may follow on the
    next page). When that instance completed and the page held all its rows, it has to
    end once they went out: it once stayed `completing` for ever (found by killing the
    demo)."""
    page = 512  # the outbox reads pages of this many rows

    def two_then_complete(state: Any, event: Any) -> Any:
        if isinstance(event, Started):
            return [Send(Cmd(event.key, "a")), Send(Cmd(event.key, "b"))]
        if isinstance(event, Touched):
            return Complete()
        return None

    path = tmp_path / "s.db"
    clock = VirtualClock(start=T0)
    downstream = Downstream()
    options: dict[str, Any] = {"retry": PATIENT, "clock": clock}
    live = [f"a{i:03}" for i in range(page // 2 - 1)]  # 2 rows each, then "z"'s 2 rows
    async with running(
        scripted_registry(two_then_complete),
        store=SQLiteStore(path),  # type: ignore[arg-type]
        recorder=downstream,  # type: ignore[arg-type]
        **options,
    ) as h:
        for key in [*live, "z"]:
            await h.runtime.publish(Started(key))
        await h.runtime.publish(Touched("z"))  # completes with its two commands left
        await h.advance(3)
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await outbox_size(store) == page
        assert [r.key for r in await store.list_instances(status="completing")] == ["z"]
    finally:
        await store.close()

    downstream.down = False
    store = SQLiteStore(path)
    async with running(
        scripted_registry(two_then_complete),
        store=store,  # type: ignore[arg-type]
        recorder=downstream,  # type: ignore[arg-type]
        **options,
    ) as h:
        with anyio.fail_after(30):  # virtual time: sweeps included, an hour at most
            for _ in range(3600):
                if not await store.list_instances(status="completing"):
                    break
                await h.advance(1)
        assert [r.key for r in await store.list_instances(status="completing")] == []
        assert await outbox_size(store) == 0

    assert downstream.labels()["z"] == ["a", "b"]


@attrs.define(eq=False)
class HeldFlushes(MemoryStore):
    """A memory store whose commits of delivered commands' deletes alone (the outbox's
    own flushes) wait for `release` while `hold` is set; it counts its looks for
    drained instances."""

    hold: bool = False
    held: anyio.Event = attrs.field(factory=anyio.Event)
    release: anyio.Event = attrs.field(factory=anyio.Event)
    looks: int = 0

    async def commit(self, changes: Changes) -> None:
        others = [
            v for k, v in attrs.asdict(changes, recurse=False).items() if k != "outbox_deletes"
        ]
        if self.hold and changes.outbox_deletes and not any(others):
            self.held.set()
            await self.release.wait()
        await super().commit(changes)

    async def drained_instances(self, **options: Any) -> list[tuple[str, str]]:
        self.looks += 1
        return await super().drained_instances(**options)


async def test_a_completed_instance_ends_once_its_last_delivered_command_is_deleted() -> None:
    """The look for completed instances with no command left reads the store: made while
    the deletion of x's delivered command was still on its way to the store, it saw that
    command and passed x by, and nothing looked again (x stayed completing for ever)."""
    store = HeldFlushes()
    gate = anyio.Event()
    sent: list[tuple[str, str]] = []

    async def downstream(command: Cmd, meta: DispatchMeta) -> None:
        sent.append((command.key, command.label))
        if command.key == "y":
            await gate.wait()

    def one_then_complete(state: Any, event: Any) -> Any:
        if isinstance(event, Started):
            return Send(Cmd(event.key, "a"))
        if isinstance(event, Touched):
            return Complete()
        return None

    async with running(
        scripted_registry(one_then_complete),
        store=store,
        recorder=downstream,  # type: ignore[arg-type]
        outbox_capacity=1,
    ) as h:
        store.hold = True
        await h.runtime.publish(Started("x"))
        with anyio.fail_after(10):
            await store.held.wait()  # x's command went out; its deletion waits
        await h.runtime.publish(Started("y"))  # y's command holds the one place ...
        await h.runtime.publish(Started("z"))  # ... so z's waits in the store only
        await h.runtime.publish(Touched("x"))  # x completes: it may end once drained
        await anyio.wait_all_tasks_blocked()
        assert [r.key for r in await store.list_instances(status="completing")] == ["x"]

        store.hold = False
        store.release.set()
        gate.set()
        with anyio.fail_after(10):  # virtual time: an hour at most
            for _ in range(720):
                if not await store.list_instances(status="completing"):
                    break
                await h.advance(5)
        assert await store.list_instances(status="completing") == []
        assert store.looks  # x ended through the look, not by luck
    assert sorted(sent) == [("x", "a"), ("y", "a"), ("z", "a")]


async def test_commands_waiting_for_a_retry_in_the_store_are_read_back_when_due() -> None:
    """A previous run left every first command backing off; the next run holds one
    command at a time, skips the instances that are not due, and comes back for them."""
    store = MemoryStore()
    clock = VirtualClock(start=T0)
    downstream = Downstream()
    async with running(
        scripted_registry(script), store=store, clock=clock, recorder=downstream, retry=PATIENT
    ) as h:
        for key in KEYS[:5]:
            await h.runtime.publish(Started(key))
        await h.runtime.drain()
    assert {row.attempts for row in await store.list_outbox() if row.seq % 2 == 0} >= {1}

    downstream.down = False
    async with running(
        scripted_registry(script),
        store=store,
        clock=clock,
        recorder=downstream,
        retry=PATIENT,
        outbox_capacity=1,
    ) as h:
        downstream.runtime = h.runtime
        await h.runtime.drain()  # returns: nothing is due before the retries
        assert downstream.delivered == []
        while await store.list_outbox():
            await h.advance(1)

    assert downstream.most_held <= 1
    assert downstream.labels() == {key: ["a", "b"] for key in KEYS[:5]}


async def test_an_instance_with_more_commands_than_the_capacity_keeps_their_order() -> None:
    def many(state: Any, event: Any) -> Any:
        if isinstance(event, Started):
            return [Send(Cmd(event.key, str(i))) for i in range(25)]
        return None

    downstream = Downstream()
    downstream.down = False
    store = PagedOnly()
    async with running(
        scripted_registry(many),
        store=store,
        recorder=downstream,  # type: ignore[arg-type]
        outbox_capacity=3,
    ) as h:
        downstream.runtime = h.runtime
        for key in ("x", "y"):
            await h.runtime.publish(Started(key))
        with anyio.fail_after(60):
            while await outbox_size(store):
                await h.advance(1)

    assert downstream.most_held <= 3
    assert downstream.labels() == {key: [str(i) for i in range(25)] for key in ("x", "y")}


async def test_outbox_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="outbox_capacity"):
        Runtime(scripted_registry(), store=MemoryStore(), dispatch=Downstream(), outbox_capacity=0)


def test_the_outage_benchmark_runs_and_delivers_every_command() -> None:
    """The short form of `benchmarks/outage.py` (its figures are measured elsewhere)."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "outage.py"
    done = subprocess.run(
        [sys.executable, str(script), "--commands", "300", "--capacity", "16"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["ok"], result["commands"], result["delivered"]) == (True, 300, 300)
