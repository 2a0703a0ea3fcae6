"""Cluster mode: several runtimes sharing one PostgreSQL schema (`Runtime(cluster=True)`).

In-process tests run two or three runtimes, each with a store object of its own (its own
connection pool, like separate processes), on one fresh schema: they compete for inbox
rows, commands and schedules; leases left by a claimer that "died" (rows claimed under
another owner name) are taken over once they expire. The multi-process test runs
`cluster_worker.py` in several processes, SIGKILLs one mid-run, starts it again, and
checks the shared dispatch log and the store afterwards.

Needs a PostgreSQL server (see `_postgres_server.py`); on CI these tests must run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import psycopg
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from cluster_worker import HOT_KEYS, failing, order_id
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagaflow import (
    Associate,
    CommandFailed,
    Complete,
    DispatchMeta,
    Dissociate,
    Registry,
    RetryPolicy,
    Runtime,
    Schedule,
    Send,
    correlate,
    on,
)
from sagaflow.exceptions import ConflictError, StoreError
from sagaflow.otel import OpenTelemetryHooks
from sagaflow.stores import (
    Changes,
    InstanceRecord,
    InstanceWrite,
    MemoryStore,
    OutboxRecord,
    OutboxUpdate,
    PostgresStore,
    ScheduleRecord,
)
from sagaflow.stores import _postgres as postgres_module
from sagaflow.stores._claims import InboxRecord
from sagaflow.stores._postgres_cluster import FAILED_LEASES

pytestmark = pytest.mark.postgres

SECRET = "s3cr3t-Pa55"
LEASE = 1.0  # seconds: short, so that take-overs happen within a test
WAKE_AFTER = 0.3  # seconds until `Go` wakes its instance, which then completes
POLL = 0.1
FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.02, jitter=False)


# -- messages and sagas ---------------------------------------------------------------


@attrs.frozen
class Step:
    key: str
    i: int


@attrs.frozen
class Did:
    key: str
    i: int
    n: int


@attrs.frozen
class Bump:
    key: str
    tag: str


@attrs.frozen
class Bumped:
    key: str
    count: int
    tag: str


@attrs.frozen
class Go:
    key: str


@attrs.frozen
class Wake:
    key: str


@attrs.frozen
class Cmd:
    key: str
    label: str


@attrs.define
class Steps:
    done: list[int] = attrs.Factory(list)


@attrs.define
class Count:
    count: int = 0
    woken: int = 0
    failures: list[str] = attrs.Factory(list)


COUNT_ZERO = '{"count": 0, "woken": 0, "failures": []}'


class StepSaga:
    """Records the steps of a key in order; one `Did` per step."""

    @correlate
    def key(self, event: Step) -> str:
        return event.key

    @on(Step, start=True)
    def step(self, state: Steps, event: Step) -> Send[Did]:
        state.done.append(event.i)
        return Send(Did(event.key, event.i, len(state.done)))


class CounterSaga:
    """Counts bumps; the handler yields to the event loop, widening every race."""

    @correlate
    def key(self, event: Bump | Go | Wake) -> str:
        return event.key

    @on(Bump, start=True)
    async def bump(self, state: Count, event: Bump) -> Send[Bumped]:
        state.count += 1
        await anyio.sleep(0.001)
        return Send(Bumped(event.key, state.count, event.tag))

    @on(Go, start=True)
    def go(self, state: Count, event: Go) -> list[Any]:
        """Sends `first` (fails for good when told to) and `second`, and schedules a
        command and a wake-up to itself."""
        return [
            Send(Cmd(event.key, "first")),
            Send(Cmd(event.key, "second")),
            Schedule(Cmd(event.key, "scheduled"), after=0.2, name="cmd"),
            Schedule(Wake(event.key), after=WAKE_AFTER, name="wake", to_self=True),
        ]

    @on(Wake)
    def wake(self, state: Count, event: Wake) -> list[Any]:
        state.woken += 1
        return [Send(Cmd(event.key, "woken")), Complete()]

    @on(CommandFailed)
    def failed(self, state: Count, event: CommandFailed[Cmd]) -> Send[Cmd]:
        state.failures.append(event.command.label)
        return Send(Cmd(event.command.key, f"after {event.command.label}"))


def make_registry() -> Registry:
    registry = Registry()
    registry.register(StepSaga(), state=Steps, name="steps")
    registry.register(CounterSaga(), state=Count, name="counter")
    return registry


@attrs.define
class Log:
    """A dispatcher for several runtimes: records every call, fails the labels told."""

    failing: set[str] = attrs.Factory(set)
    calls: list[tuple[Any, DispatchMeta, int]] = attrs.Factory(list)
    events: list[str] = attrs.Factory(list)

    def dispatcher(self, runtime: int) -> Callable[[Any, DispatchMeta], Any]:
        async def dispatch(command: Any, meta: DispatchMeta) -> None:
            await anyio.lowlevel.checkpoint()
            self.calls.append((command, meta, runtime))
            label = getattr(command, "label", None)
            if label is not None:
                self.events.append(f"{label} #{meta.attempt}")
            if label in self.failing:
                raise ConnectionError(f"{label} is down")

        return dispatch

    def ok(self, cls: type) -> list[Any]:
        """Commands of `cls` that were dispatched and did not fail, in dispatch order."""
        return [
            c
            for c, _, _ in self.calls
            if isinstance(c, cls) and getattr(c, "label", None) not in self.failing
        ]


def make_store(dsn: str, schema: str, **options: Any) -> PostgresStore:
    options.setdefault("lease", LEASE)
    options.setdefault("poll_interval", POLL)
    return PostgresStore(dsn, schema=schema, max_size=6, **options)


@asynccontextmanager
async def cluster(
    dsn: str, schema: str, log: Log, count: int = 2, **options: Any
) -> AsyncIterator[list[Runtime]]:
    """`count` cluster-mode runtimes on `schema`, each with its own store object."""
    registry = make_registry()
    store_options = {k: options.pop(k) for k in ("lease", "poll_interval") if k in options}
    async with AsyncExitStack() as stack:
        runtimes = []
        for i in range(count):
            runtime = Runtime(
                registry,
                store=make_store(dsn, schema, **store_options),
                dispatch=log.dispatcher(i),
                cluster=True,
                **{"retry": FAST_RETRY, **options},
            )
            runtimes.append(await stack.enter_async_context(runtime))
        with anyio.fail_after(30):
            yield runtimes


def once_per_command(log: Log, cls: type) -> list[Any]:
    """The commands of `cls` that went out, one per command id: a lease that ran out
    while a stalled process was sending lets another process send it again (at least
    once), with the same id. Two commands equal but for their id would both count."""
    seen: dict[str, Any] = {}
    for command, meta, _ in log.calls:
        if isinstance(command, cls) and getattr(command, "label", None) not in log.failing:
            seen.setdefault(meta.id, command)
    return list(seen.values())


async def settle(runtimes: list[Runtime]) -> None:
    """Drain every runtime until the schema's inbox and outbox are empty."""
    store = runtimes[0].store
    assert isinstance(store, PostgresStore)
    while True:
        for runtime in runtimes:
            await runtime.drain()
        if not (await store.list_inbox() or await store.list_outbox()):
            for runtime in runtimes:
                await runtime.drain()
            return
        await anyio.sleep(0.02)


def execute(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def instance(saga: str, key: str, state: str, now: float) -> InstanceRecord:
    return InstanceRecord(saga, key, 1, "active", state, f"iid-{key}", now, now)


# -- runtimes competing in one process --------------------------------------------------


@pytest.mark.anyio
async def test_runtimes_sharing_a_schema_handle_each_event_once_and_in_order(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """Events of one key published one after the other, from alternating runtimes, are
    handled once each, in order, and their commands dispatched once each, in order;
    the work is spread over the runtimes."""
    log = Log()
    keys = [f"k{i}" for i in range(12)]
    async with cluster(postgres_dsn, pg_schema, log, count=3) as runtimes:

        async def feed(key: str) -> None:
            for i in range(8):
                await runtimes[i % 3].publish(Step(key, i))

        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(feed, key)
        await settle(runtimes)
        store = runtimes[0].store
        states = {r.key: json.loads(r.state) for r in await store.list_instances()}
        handled = [r.statistics().events_handled for r in runtimes]

    assert states == {key: {"done": list(range(8))} for key in keys}
    dids = log.ok(Did)
    assert sorted((d.key, d.i) for d in dids) == sorted((k, i) for k in keys for i in range(8))
    for key in keys:
        assert [d.n for d in dids if d.key == key] == list(range(1, 9))
    ids = [meta.id for _, meta, _ in log.calls]
    assert len(ids) == len(set(ids))
    assert sum(handled) == len(keys) * 8
    assert sum(1 for n in handled if n) >= 2, handled


@pytest.mark.anyio
async def test_a_hot_instance_loses_no_update_through_the_inbox(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """Three runtimes publish 40 bumps each to one key at once, and redeliver a third of
    them: the counter ends at 120, and every count from 1 to 120 went out once."""
    log = Log()
    async with cluster(postgres_dsn, pg_schema, log, count=3) as runtimes:

        async def feed(r: int) -> None:
            for i in range(40):
                await runtimes[r].publish(Bump("hot", f"{r}:{i}"), id=f"{r}:{i}")
            for i in range(0, 40, 3):
                await runtimes[(r + 1) % 3].publish(Bump("hot", f"{r}:{i}"), id=f"{r}:{i}")

        async with anyio.create_task_group() as tg:
            for r in range(3):
                tg.start_soon(feed, r)
        await settle(runtimes)
        (record,) = await runtimes[0].store.list_instances()
        duplicates = sum(r.statistics().events_duplicate for r in runtimes)

    assert json.loads(record.state)["count"] == 120
    bumped = once_per_command(log, Bumped)
    assert sorted(b.count for b in bumped) == list(range(1, 121))
    assert sorted(b.tag for b in bumped) == sorted(f"{r}:{i}" for r in range(3) for i in range(40))
    assert duplicates == 3 * 14


@pytest.mark.anyio
async def test_a_hot_instance_fed_by_run_everywhere_settles_races_by_version(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """`run(source)` in three runtimes at once on one key (no inbox in between): commits
    that lose the race are handled again, and no update is lost. A batch that lost every
    race it was allowed fails `run` with `ConflictError`; feeding it again, as a broker
    redelivers, applies each event once thanks to its id."""
    log = Log()
    async with cluster(postgres_dsn, pg_schema, log, count=3, max_batch=4) as runtimes:

        async def feed(r: int) -> None:
            async def source() -> AsyncIterator[Bump]:
                for i in range(40):
                    yield Bump("hot", f"{r}:{i}")
                    await anyio.sleep(0)

            while True:
                try:
                    await runtimes[r].run(source(), id=lambda bump: bump.tag)
                    return
                except ConflictError:
                    continue

        async with anyio.create_task_group() as tg:
            for r in range(3):
                tg.start_soon(feed, r)
        await settle(runtimes)
        (record,) = await runtimes[0].store.list_instances()
        conflicts = sum(r.statistics().conflicts for r in runtimes)

    assert json.loads(record.state)["count"] == 120
    assert sorted(b.count for b in once_per_command(log, Bumped)) == list(range(1, 121))
    assert conflicts > 0  # the races did happen


@pytest.mark.anyio
async def test_schedules_fire_once_in_a_cluster_and_completed_instances_end(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scheduled commands go out once and scheduled events are handled once, whichever
    runtime claims them; each instance completes and is deleted once its commands went
    out, though another runtime may have dispatched them."""
    # `scheduled` (0.2 s) must fire before the wake-up completes the instance, which
    # drops pending schedules: with 0.3 s, a process stalled on a loaded machine let
    # another one's wake-up come first (and `scheduled` was rightly dropped).
    monkeypatch.setattr(sys.modules[__name__], "WAKE_AFTER", 2.0)
    log = Log()
    keys = [f"g{i}" for i in range(20)]
    async with cluster(postgres_dsn, pg_schema, log, count=3) as runtimes:
        async with anyio.create_task_group() as tg:
            for i, key in enumerate(keys):
                tg.start_soon(runtimes[i % 3].publish, Go(key))
        await anyio.sleep(2.1)
        with anyio.fail_after(60):
            while await runtimes[0].store.list_instances():
                await settle(runtimes)
                await anyio.sleep(0.05)
        store = runtimes[0].store
        left = (await store.list_schedules(), await store.list_outbox())

    assert left == ([], [])
    labels = sorted((c.key, c.label) for c in log.ok(Cmd))
    want = sorted((k, label) for k in keys for label in ("first", "second", "scheduled", "woken"))
    assert labels == want


@pytest.mark.anyio
async def test_a_command_that_fails_for_good_holds_its_instance_until_handled(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`first` fails three times; `second` waits until `CommandFailed` was handled (in
    whichever runtime), and what that handler sent goes after it."""
    # The wake-up (which completes the instance) must not come while the test looks,
    # however slowly a loaded machine gets there.
    monkeypatch.setattr(sys.modules[__name__], "WAKE_AFTER", 3600.0)
    log = Log(failing={"first"})
    async with cluster(postgres_dsn, pg_schema, log, count=2) as runtimes:
        await runtimes[0].publish(Go("f1"))
        await settle(runtimes)
        (record,) = await runtimes[1].store.list_instances()

    assert log.events[:5] == ["first #1", "first #2", "first #3", "second #1", "after first #1"]
    assert json.loads(record.state)["failures"] == ["first"]


# -- leases ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_work_claimed_by_a_process_that_died_is_taken_over_after_its_lease(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """Commands, a due schedule and inbox rows leased to an owner that stopped renewing
    are left alone until the lease expires, then taken over; commands keep their ids."""
    store = make_store(postgres_dsn, pg_schema)
    await store.open()
    now = time.time()
    rows = [
        OutboxRecord(
            f"c{i}",
            "counter",
            "a",
            i,
            "send",
            "test_cluster.Cmd",
            f'{{"key": "a", "label": "c{i}"}}',
        )
        for i in range(3)
    ]
    wake = ScheduleRecord(
        "w1", "counter", "a", "wake", now - 1, True, "test_cluster.Wake", '{"key": "a"}'
    )
    await store.commit(
        Changes(
            writes=[InstanceWrite(instance("counter", "a", COUNT_ZERO, now), 0)],
            outbox_adds=rows,
            schedule_puts=[wake],
        )
    )
    await store.put_inbox([inbox_row("counter", "b", "e1", Bump("b", "x"), now)])
    dead = "dead-process"
    claimed = await store.claim_commands(dead, now, 10, sagas=["counter"], mine=[])
    assert [c.row.id for c in claimed] == ["c0", "c1", "c2"]  # the first row, its followers
    assert len(await store.claim_schedules(dead, now, 10, sagas=["counter"])) == 1
    assert len(await store.claim_inbox(dead, now, 10, sagas=["counter"], mine=[])) == 1
    await store.close()

    log = Log()
    async with cluster(postgres_dsn, pg_schema, log, count=1) as (runtime,):
        await anyio.sleep(LEASE / 2)
        before = list(log.calls)
        with anyio.fail_after(60):
            while len(log.calls) < 5:
                await anyio.sleep(0.05)
        await settle([runtime])
        taken_at = time.time()

    assert before == []
    commands = [(meta.id, c) for c, meta, _ in log.calls if isinstance(c, Cmd)]
    assert commands[:3] == [(f"c{i}", Cmd("a", f"c{i}")) for i in range(3)]
    assert [c for _, c in commands[3:]] == [Cmd("a", "woken")]
    assert log.ok(Bumped) == [Bumped("b", 1, "x")]
    assert taken_at - now >= LEASE


@pytest.mark.anyio
async def test_a_give_up_left_by_a_process_that_died_reaches_the_instance_once(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """A command marked failed for good by a process that died before its instance
    handled `CommandFailed` is handed to the instance by another process, once, after a
    longer lease than other rows get (`FAILED_LEASES`); the command behind it waits
    until then."""
    lease = 0.4
    store = make_store(postgres_dsn, pg_schema, lease=lease)
    await store.open()
    now = time.time()
    payload = '{{"key": "a", "label": "{}"}}'
    rows = [
        OutboxRecord(f"c{i}", "counter", "a", i, "send", "test_cluster.Cmd", payload.format(label))
        for i, label in enumerate(("first", "second"))
    ]
    await store.commit(
        Changes(
            writes=[InstanceWrite(instance("counter", "a", COUNT_ZERO, now), 0)], outbox_adds=rows
        )
    )
    dead = "dead-process"
    claimed = await store.claim_commands(dead, now, 10, sagas=["counter"], mine=[])
    failed = OutboxUpdate("c0", 3, 0.0, "ConnectionError: first is down")
    await store.settle_commands(dead, now, failed=[failed])
    later = now + 2 * lease  # an ordinary lease would have expired by then
    assert await store.claim_commands("other", later, 10, sagas=["counter"], mine=[]) == []
    await store.close()

    log = Log()
    async with cluster(postgres_dsn, pg_schema, log, count=2, lease=lease) as runtimes:
        with anyio.fail_after(60):
            while len(log.calls) < 2:
                await anyio.sleep(0.05)
        handed_at = time.time()
        await settle(runtimes)
        (record,) = await runtimes[0].store.list_instances()

    assert [c.row.id for c in claimed] == ["c0", "c1"]
    assert log.events == ["second #1", "after first #1"]
    assert json.loads(record.state)["failures"] == ["first"]
    assert handed_at - now >= FAILED_LEASES * lease


@pytest.mark.anyio
async def test_an_event_handled_but_not_acknowledged_is_applied_once(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """A process commits an event but dies before deleting its inbox row: the next one
    gets the row again, the dedup mark makes it a no-op, and the mark of an id the
    publisher did not give is deleted with the row."""
    log = Log()
    registry = make_registry()
    crashing = make_store(postgres_dsn, pg_schema)

    async def no_ack(owner: str, positions: Any) -> None:
        raise StoreError("the process died before acknowledging")

    crashing.ack_inbox = no_ack  # type: ignore[method-assign]
    async with Runtime(
        registry, store=crashing, dispatch=log.dispatcher(0), retry=FAST_RETRY, cluster=True
    ) as first:
        await first.publish(Bump("a", "no id"))
        await first.publish(Bump("b", "with id"), id="given")
    assert len(await inbox_of(postgres_dsn, pg_schema)) == 2

    async with cluster(postgres_dsn, pg_schema, log, count=1) as (second,):
        with anyio.fail_after(60):
            while await inbox_of(postgres_dsn, pg_schema):
                await anyio.sleep(0.05)
        await settle([second])
        duplicates = second.statistics().events_duplicate
        records = await second.store.list_instances()

    assert [json.loads(r.state)["count"] for r in records] == [1, 1]
    assert duplicates == 2
    assert sorted(b.tag for b in log.ok(Bumped)) == ["no id", "with id"]
    marks = execute(postgres_dsn, f'SELECT event_id FROM "{pg_schema}".dedup_marks')
    assert marks == [("given",)]


async def inbox_of(dsn: str, schema: str) -> list[tuple[Any, ...]]:
    return execute(dsn, f'SELECT pos, lease_owner FROM "{schema}".inbox')


def inbox_row(saga: str, key: str, event_id: str, event: Any, now: float) -> Any:
    from sagaflow.stores._claims import InboxRecord

    type_name, payload = make_registry().serializer.encode(event)
    return InboxRecord(0, saga, key, event_id, False, type_name, payload, now)


@pytest.mark.anyio
async def test_an_inbox_event_no_saga_can_take_is_dead_lettered(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """An event whose type cannot be resolved any more does not block its instance: it
    becomes a dead letter, and the events behind it are handled."""
    from sagaflow.stores._claims import InboxRecord

    store = make_store(postgres_dsn, pg_schema)
    await store.open()
    now = time.time()
    await store.put_inbox(
        [
            InboxRecord(0, "counter", "a", "e1", False, "gone.Module", "{}", now),
            inbox_row("counter", "a", "e2", Bump("a", "after"), now),
        ]
    )
    await store.close()
    log = Log()
    async with cluster(postgres_dsn, pg_schema, log, count=1) as (runtime,):
        with anyio.fail_after(60):
            while not log.calls:
                await anyio.sleep(0.05)
        await settle([runtime])
        (letter,) = await runtime.store.list_dead_letters()

    assert (letter.id, letter.kind, letter.type_name) == ("counter:a:e1", "event", "gone.Module")
    assert "gone.Module" in letter.error
    assert log.ok(Bumped) == [Bumped("a", 1, "after")]


@pytest.mark.anyio
async def test_other_processes_are_woken_by_notify_not_by_polling(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """With a poll interval of a minute, an event published by another process is
    handled within a second or two: its NOTIFY woke the runtime."""
    log = Log()
    async with cluster(postgres_dsn, pg_schema, log, count=1, lease=120.0, poll_interval=60.0) as (
        runtime,
    ):
        await runtime.drain()
        publisher = make_store(postgres_dsn, pg_schema)
        await publisher.open()
        try:
            await publisher.put_inbox([inbox_row("counter", "n", "e1", Bump("n", "x"), 0.0)])
            # Notify until heard: the listener connects in the background.
            with anyio.fail_after(60):
                while not log.calls:
                    await publisher.notify(["iother"])
                    await anyio.sleep(0.2)
        finally:
            await publisher.close()

    assert log.ok(Bumped) == [Bumped("n", 1, "x")]


@pytest.mark.anyio
async def test_a_runtime_that_stops_gives_its_leases_back(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """A runtime stopped while it holds a command (its dispatcher hangs) releases it:
    another runtime dispatches it at once, not a lease (a minute here) later, under
    the same id."""
    hanging = anyio.Event()
    registry = make_registry()

    async def hang(command: Any, meta: DispatchMeta) -> None:
        hanging.set()
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        store = make_store(postgres_dsn, pg_schema, lease=60.0)
        async with Runtime(registry, store=store, dispatch=hang, cluster=True) as first:
            await first.publish(Step("s", 1))
            await hanging.wait()
            scope.cancel()
    log = Log()
    async with cluster(postgres_dsn, pg_schema, log, count=1, lease=60.0) as (second,):
        with anyio.fail_after(60):
            while not log.calls:
                await anyio.sleep(0.02)
        await settle([second])

    assert [(c, meta.attempt) for c, meta, _ in log.calls] == [(Did("s", 1, 1), 1)]


@pytest.mark.anyio
async def test_logs_in_cluster_mode_never_show_the_password(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Everything logged while runtimes compete, retry and give up (with the DSN in
    their stores' reprs) masks the password."""
    scheme, _, rest = postgres_dsn.partition("://")
    userinfo, _, host = rest.rpartition("@")
    dsn = f"{scheme}://{userinfo or 'postgres'}:{SECRET}@{host}"
    caplog.set_level(logging.DEBUG)
    log = Log(failing={"first"})
    async with cluster(dsn, pg_schema, log, count=2) as runtimes:
        await runtimes[0].publish(Go("p1"))
        await settle(runtimes)
        shown = repr(runtimes[1]) + repr(runtimes[1].store)

    assert "first #3" in log.events
    assert SECRET not in caplog.text + shown
    assert ":***@" in shown


# -- setup, schema and errors -------------------------------------------------------------


def test_cluster_mode_needs_a_store_that_can_be_shared() -> None:
    with pytest.raises(TypeError, match="store that several processes can share"):
        Runtime(make_registry(), store=MemoryStore(), dispatch=Log().dispatcher(0), cluster=True)


def test_lease_and_poll_interval_are_checked() -> None:
    with pytest.raises(ValueError, match="0 < poll_interval < lease"):
        PostgresStore("postgresql://h/db", lease=1.0, poll_interval=2.0)


@pytest.mark.anyio
async def test_a_version_1_schema_is_migrated_for_cluster_mode(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A schema written before cluster mode gains the inbox and the failed mark; its
    rows are kept."""
    old = make_store(postgres_dsn, pg_schema)
    with monkeypatch.context() as patch:
        patch.setattr(postgres_module, "SCHEMA_VERSION", 1)
        patch.setattr(postgres_module, "_MIGRATIONS", postgres_module._MIGRATIONS[:1])
        await old.open()
        await old.close()
    # What sagaflow's version 1 wrote (its statements know no `failed` column).
    execute(
        postgres_dsn,
        f'INSERT INTO "{pg_schema}".outbox (id, saga, key, seq, kind, type_name, payload, '
        "attempts, due) VALUES ('c1', 'counter', 'a', 1, 'send', 'test_cluster.Cmd', '{}', 0, 0)",
    )
    row = OutboxRecord("c1", "counter", "a", 1, "send", "test_cluster.Cmd", "{}")

    store = make_store(postgres_dsn, pg_schema)
    await store.open()
    try:
        assert await store.list_outbox() == [row]
        assert await store.list_inbox() == []
        claimed = await store.claim_commands("me", time.time(), 5, sagas=["counter"], mine=[])
        assert [(c.row, c.failed) for c in claimed] == [(row, False)]
    finally:
        await store.close()
    version = execute(postgres_dsn, f'SELECT value FROM "{pg_schema}".meta')
    assert version == [(str(postgres_module.SCHEMA_VERSION),)]


@pytest.mark.anyio
async def test_a_version_3_schema_gains_traces_and_keeps_its_rows(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Version 4 adds a trace column to the outbox, the schedules and the inbox: rows
    written before have none; new ones keep theirs through every read and claim."""
    old = make_store(postgres_dsn, pg_schema)
    with monkeypatch.context() as patch:
        patch.setattr(postgres_module, "SCHEMA_VERSION", 3)
        patch.setattr(postgres_module, "_MIGRATIONS", postgres_module._MIGRATIONS[:3])
        await old.open()
        await old.close()
    # What sagaflow's version 3 wrote (its statements know no `trace` column).
    s = f'"{pg_schema}"'
    execute(
        postgres_dsn,
        f"INSERT INTO {s}.outbox (id, saga, key, seq, kind, type_name, payload, attempts, due) "
        "VALUES ('c1', 'counter', 'a', 1, 'send', 'test_cluster.Cmd', '{}', 0, 0)",
    )
    execute(
        postgres_dsn,
        f"INSERT INTO {s}.schedules (id, saga, key, name, due, to_self, type_name, payload, "
        "seq, attempts) VALUES ('s1', 'counter', 'a', 'wake', 1, true, 'test_cluster.Wake', "
        "'{}', 0, 0)",
    )
    execute(
        postgres_dsn,
        f"INSERT INTO {s}.inbox (saga, key, event_id, generated, type_name, payload, "
        "created_at) VALUES ('counter', 'a', 'e1', false, 'test_cluster.Bump', '{}', 1)",
    )
    trace = '{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}'

    store = make_store(postgres_dsn, pg_schema)
    await store.open()
    try:
        await store.commit(
            Changes(
                outbox_adds=[OutboxRecord("c2", "counter", "b", 1, "send", "T", "{}", trace=trace)],
                schedule_puts=[
                    ScheduleRecord("s2", "counter", "b", "w", 1.0, True, "T", "{}", trace=trace)
                ],
            )
        )
        await store.put_inbox([InboxRecord(0, "counter", "b", "e2", False, "T", "{}", 2.0, trace)])
        now = time.time()
        commands = await store.claim_commands("me", now, 5, sagas=["counter"], mine=[])
        schedules = await store.claim_schedules("me", now, 5, sagas=["counter"])
        inbox = await store.claim_inbox("me", now, 5, sagas=["counter"], mine=[])
    finally:
        await store.close()

    assert sorted((c.row.id, c.row.trace) for c in commands) == [("c1", None), ("c2", trace)]
    assert [(r.id, r.trace) for r in schedules] == [("s1", None), ("s2", trace)]
    assert [(r.event_id, r.trace) for r in inbox] == [("e1", None), ("e2", trace)]
    version = execute(postgres_dsn, f"SELECT value FROM {s}.meta")
    assert version == [(str(postgres_module.SCHEMA_VERSION),)]


@pytest.mark.anyio
async def test_the_publishers_trace_crosses_the_inbox_to_handler_timer_and_command(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In cluster mode the trace travels in the inbox row, the outbox rows and the
    schedules: one trace shows the request, both handlings and every dispatch, whichever
    runtime took each part."""
    # The scheduled command (0.2 s) goes out before the wake-up completes the instance
    # and drops what is still pending (see the schedules test above).
    monkeypatch.setattr(sys.modules[__name__], "WAKE_AFTER", 2.0)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hooks = OpenTelemetryHooks(tracer_provider=provider, propagator=TraceContextTextMapPropagator())
    log = Log()
    async with cluster(postgres_dsn, pg_schema, log, count=2, hooks=hooks) as runtimes:
        with provider.get_tracer("app").start_as_current_span("request") as request:
            await runtimes[0].publish(Go("k"))
        with anyio.fail_after(30):
            while "woken #1" not in log.events:
                await anyio.sleep(0.02)
        await settle(runtimes)

    spans = exporter.get_finished_spans()
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in spans if s.context} == {trace_id}
    names = {s.name: s for s in spans}
    assert sorted(s.name for s in spans) == [
        "dispatch Cmd",
        "dispatch Cmd",
        "dispatch Cmd",
        "dispatch Cmd",
        "handle Go",
        "handle Wake",
        "request",
    ]
    go, wake = names["handle Go"].context, names["handle Wake"].context
    assert go is not None and wake is not None
    parents = [s.parent.span_id if s.parent else None for s in spans if s.name != "request"]
    # first, second and the scheduled command come of Go's handling, woken of Wake's.
    assert sorted(parents, key=str) == sorted(
        [
            request.get_span_context().span_id,
            go.span_id,
            go.span_id,
            go.span_id,
            go.span_id,
            wake.span_id,
        ],
        key=str,
    )
    by_label = {c.label: m.trace for c, m, _ in log.calls}
    assert set(by_label) == {"first", "second", "scheduled", "woken"}
    assert all(
        t is not None and t["traceparent"][3:35] == f"{trace_id:032x}" for t in by_label.values()
    )


def test_listener_errors_never_show_the_password() -> None:
    """LISTEN on a server that cannot be reached fails with a StoreError that masks the
    password, in its message and in its causes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = PostgresStore(f"postgresql://alice:{SECRET}@127.0.0.1:{port}/db", timeout=1)
    listener = store.listener()
    try:
        with pytest.raises(StoreError) as caught:
            listener.wait(0.1)
    finally:
        listener.close()
    text = str(caught.value)
    cause: BaseException | None = caught.value
    while cause is not None:
        assert SECRET not in str(cause)
        cause = cause.__cause__
    assert "postgresql://alice:***@127.0.0.1" in text


# -- several processes, one killed ----------------------------------------------------------

WORKER = Path(__file__).with_name("cluster_worker.py")


@attrs.frozen
class Line:
    """One dispatch attempt, as a worker logged it."""

    id: str
    key: tuple[str, str, str]
    n: int | None
    ok: bool


def read_log(path: Path) -> list[Line]:
    lines = []
    for text in path.read_text().splitlines():
        entry = json.loads(text)
        payload, kind = entry["payload"], entry["type"]
        if kind == "Bumped":
            key = (kind, payload["key"], f"{payload['worker']}:{payload['seq']}")
            n = payload["count"]
        else:
            key = (kind, payload["order"], payload.get("event", ""))
            n = payload.get("n")
        lines.append(Line(entry["id"], key, n, entry["ok"]))
    return lines


def check_cluster_log(log: Path, *, orders: int, hot: int, workers: int) -> None:
    """What the script must produce, whatever process did what and whoever died."""
    lines = read_log(log)

    # At least once, with a stable id: one id per logical command and one command per id.
    ids: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    by_id: dict[str, set[tuple[tuple[str, str, str], int | None]]] = defaultdict(set)
    for line in lines:
        ids[line.key].add(line.id)
        by_id[line.id].add((line.key, line.n))
    assert {k: v for k, v in ids.items() if len(v) > 1} == {}, "a command got a new id"
    assert {i: v for i, v in by_id.items() if len(v) > 1} == {}, "an id was reused"

    # Every command delivered: the acks of all events, every schedule (Nudge, Reminded),
    # refunds of failed payments, Done; nothing else.
    delivered = {line.key for line in lines if line.ok}
    want: set[tuple[str, str, str]] = set()
    for i in range(orders):
        oid = order_id(i)
        events = ["placed", "packed", "nudged"] + ([] if failing(oid) else ["paid"])
        want.update(("Ack", oid, e) for e in events)
        want.update((kind, oid, "") for kind in ("Nudge", "Reminded", "Done"))
        if failing(oid):
            want.add(("Refund", oid, ""))
    for key in HOT_KEYS:
        want.update(("Bumped", key, f"{w}:{s}") for w in range(workers) for s in range(hot))
    assert len(delivered - want) == 0, sorted(delivered - want)[:10]
    assert len(want - delivered) == 0, sorted(want - delivered)[:10]

    # No lost update and no event applied twice: per order, every handled event bumped
    # `n` once (1..m without a gap or a repeat, m = events handled) and Done carries m.
    steps: dict[str, set[int]] = defaultdict(set)
    done: dict[str, int] = {}
    for line in lines:
        kind, order, _ = line.key
        if kind == "Done" and line.n is not None:
            done[order] = line.n
        elif kind in ("Ack", "Reminded", "Refund") and line.n is not None:
            steps[order].add(line.n)
    for i in range(orders):
        oid = order_id(i)
        m = 6 if failing(oid) else 5
        assert (sorted(steps[oid]), done.get(oid)) == (list(range(1, m + 1)), m), oid
    # Hot instances: every count from 1 to the total went to exactly one bump.
    for key in HOT_KEYS:
        counts: dict[int, set[tuple[str, str, str]]] = defaultdict(set)
        for line in lines:
            if line.key[0] == "Bumped" and line.key[1] == key and line.n is not None:
                counts[line.n].add(line.key)
        assert sorted(counts) == list(range(1, hot * workers + 1)), key
        assert {n: ks for n, ks in counts.items() if len(ks) > 1} == {}, key

    # Per instance, commands are first delivered in the order they were produced.
    seen: set[tuple[str, str, str]] = set()
    last: dict[str, int] = {}
    for line in lines:
        kind, order, _ = line.key
        if not line.ok or line.key in seen or line.n is None or kind == "Bumped":
            continue
        seen.add(line.key)
        assert line.n >= last.get(order, 0), (order, line)
        last[order] = line.n


def start_worker(
    tmp: Path, dsn: str, schema: str, index: int, *, workers: int, orders: int, hot: int
) -> tuple[subprocess.Popen[str], Path]:
    out = tmp / f"worker-{index}-{time.monotonic_ns()}.out"
    backend = ("asyncio", "trio")[index % 2]
    command = [
        sys.executable,
        str(WORKER),
        "--schema",
        schema,
        "--log",
        str(tmp / "dispatch.log"),
        "--index",
        str(index),
        "--workers",
        str(workers),
        "--orders",
        str(orders),
        "--hot",
        str(hot),
        "--backend",
        backend,
    ]
    env = {**os.environ, "SAGAFLOW_PG_DSN": dsn}
    with out.open("w") as stdout, (tmp / f"worker-{index}.err").open("a") as stderr:
        proc = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, text=True, env=env
        )
    return proc, out


def wait_for(out: Path, word: str, proc: subprocess.Popen[str], timeout: float) -> bool:
    """Whether `word` appeared in the worker's output before it exited or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if word in out.read_text().split():
            return True
        if proc.poll() is not None:
            return word in out.read_text().split()
        time.sleep(0.02)
    return False


def summary_of(out: Path) -> dict[str, Any] | None:
    for line in out.read_text().splitlines():
        if line.startswith("DONE "):
            summary: dict[str, Any] = json.loads(line[len("DONE ") :])
            return summary
    return None


def stuck(dsn: str, schema: str) -> str:
    """What is left in the schema, with its leases: for the report of a run that hung."""
    queries = {
        "instances": "saga, key, version, status, updated_at",
        "outbox": "id, key, seq, attempts, due, failed, lease_owner, lease_expires",
        "inbox": "pos, saga, key, event_id, lease_owner, lease_expires",
        "schedules": "id, key, name, due, lease_owner, lease_expires",
    }
    report = [f"now {time.time():.3f}"]
    for table, columns in queries.items():
        rows = execute(dsn, f'SELECT {columns} FROM "{schema}".{table} LIMIT 8')
        count = execute(dsn, f'SELECT count(*) FROM "{schema}".{table}')[0][0]
        report.append(f"{table} ({count}): " + "\n  ".join(map(str, rows)))
    return "\n".join(report)


@attrs.define
class Fleet:
    """Worker processes on one schema; stops whatever is still running at the end."""

    tmp: Path
    dsn: str
    schema: str
    workers: int
    orders: int
    hot: int
    procs: dict[int, tuple[subprocess.Popen[str], Path]] = attrs.Factory(dict)

    def start(self, index: int) -> None:
        self.procs[index] = start_worker(
            self.tmp,
            self.dsn,
            self.schema,
            index,
            workers=self.workers,
            orders=self.orders,
            hot=self.hot,
        )

    def kill(self, index: int, *, after: float) -> None:
        """SIGKILL worker `index` `after` seconds after it started its runtime."""
        proc, out = self.procs[index]
        assert wait_for(out, "STARTED", proc, 30), self.stderr(index)
        time.sleep(after)
        assert proc.poll() is None, f"worker {index} ended before the kill:\n{self.stderr(index)}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        summaries = []
        deadline = time.monotonic() + timeout
        for index, (proc, out) in sorted(self.procs.items()):
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"worker {index} did not finish in {timeout} s:\n{self.stderr(index)}\n"
                    f"{stuck(self.dsn, self.schema)}"
                )
            summary = summary_of(out)
            assert code == 0 and summary is not None, f"worker {index}:\n{self.stderr(index)}"
            summaries.append(summary)
        return summaries

    def stderr(self, index: int) -> str:
        path = self.tmp / f"worker-{index}.err"
        text = path.read_text() if path.exists() else ""
        return "\n".join(text.splitlines()[-30:])

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def fleet_factory(
    tmp_path: Path,
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(*, workers: int, orders: int, hot: int) -> Fleet:
        fleet = Fleet(tmp_path, postgres_dsn, pg_schema, workers, orders, hot)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.stop()


def run_fleet(
    make: Callable[..., Fleet], *, workers: int, orders: int, hot: int, kills: int, seed: int
) -> list[dict[str, Any]]:
    """Start the workers, kill one at a random moment `kills` times (restarting it each
    time), let everyone finish, check the log and the store."""
    rng = random.Random(seed)
    fleet = make(workers=workers, orders=orders, hot=hot)
    for index in range(workers):
        fleet.start(index)
    for _ in range(kills):
        victim = rng.randrange(workers)
        fleet.kill(victim, after=rng.uniform(0.5, 2.5))
        fleet.start(victim)
    summaries = fleet.finish(timeout=120)
    for summary in summaries:
        assert summary["dead_letters"] == []
    check_cluster_log(fleet.tmp / "dispatch.log", orders=orders, hot=hot, workers=workers)
    schema = f'"{fleet.schema}"'
    left = {
        table: execute(fleet.dsn, f"SELECT count(*) FROM {schema}.{table}")[0][0]
        for table in ("instances", "outbox", "schedules", "inbox", "dead_letters")
    }
    assert left == dict.fromkeys(left, 0), "an instance or a row is stuck"
    return summaries


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_several_processes_one_killed_and_restarted_lose_and_repeat_nothing(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """Three processes, 600 orders whose events come from three different processes and
    two hot counters bumped by all of them; one process is SIGKILLed mid-run and
    started again. Afterwards: no lost update, every command dispatched at least once
    under one stable id, every schedule fired, nothing stuck."""
    summaries = run_fleet(fleet_factory, workers=3, orders=2000, hot=100, kills=1, seed=5)
    assert sum(s["conflicts"] for s in summaries) > 0  # the hot-run races happened


@pytest.mark.soak
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
@pytest.mark.skipif(os.environ.get("SAGAFLOW_SOAK") != "1", reason="set SAGAFLOW_SOAK=1")
def test_several_processes_killed_again_and_again_soak(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """Four processes, 3000 orders, five kills at random moments."""
    seed = int(os.environ.get("SAGAFLOW_SOAK_SEED", "1"))
    run_fleet(fleet_factory, workers=4, orders=3000, hot=200, kills=5, seed=seed)


@pytest.mark.anyio
async def test_an_ack_from_a_process_whose_lease_was_taken_over_deletes_nothing(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """A stalled process that committed an event after its lease ran out must not delete
    the row (nor its dedup mark) that another process took over: that one would find no
    mark and apply the event a second time."""
    from sagaflow.stores import Changes, DedupMark
    from sagaflow.stores._claims import InboxRecord

    store = make_store(postgres_dsn, pg_schema)
    await store.open()
    try:
        type_name, payload = make_registry().serializer.encode(Bump("a", "x"))
        row = InboxRecord(0, "counter", "a", "made-up", True, type_name, payload, 0.0)
        (pos,) = await store.put_inbox([row])
        await store.claim_inbox("stalled", 1.0, 10, sagas=["counter"], mine=[])
        later = 1.0 + store.lease_seconds + 1
        taken = await store.claim_inbox("other", later, 10, sagas=["counter"], mine=[])
        await store.commit(Changes(marks=[DedupMark("counter", "a", "made-up", later + 60)]))

        await store.ack_inbox("stalled", [pos])
        after_stale_ack = await inbox_of(postgres_dsn, pg_schema)
        marks = execute(postgres_dsn, f'SELECT event_id FROM "{pg_schema}".dedup_marks')
        await store.ack_inbox("other", [pos])
        after_ack = await inbox_of(postgres_dsn, pg_schema)
    finally:
        await store.close()

    assert [r.pos for r in taken] == [pos]
    assert (after_stale_ack, marks, after_ack) == ([(pos, "other")], [("made-up",)], [])


# -- associations in cluster mode ---------------------------------------------------------


@attrs.frozen
class Join:
    key: str
    group: str


@attrs.frozen
class Leave:
    key: str
    group: str


@attrs.frozen
class Call:
    group: str
    n: int


@attrs.frozen
class End:
    key: str


@attrs.frozen
class Answer:
    key: str
    n: int


@attrs.define
class Member:
    key: str = ""
    calls: list[int] = attrs.Factory(list)


class GroupSaga:
    """Members join and leave groups; a `Call` to a group reaches every member."""

    @correlate(Join, Leave, End)
    def key(self, event: Join | Leave | End) -> str:
        return event.key

    @correlate(Call, via="group")
    def group(self, event: Call) -> str:
        return event.group

    @on(Join, start=True)
    def join(self, state: Member, event: Join) -> Associate:
        state.key = event.key
        return Associate("group", event.group)

    @on(Leave)
    def leave(self, state: Member, event: Leave) -> Dissociate:
        return Dissociate("group", event.group)

    @on(Call)
    def call(self, state: Member, event: Call) -> Send[Answer]:
        state.calls.append(event.n)
        return Send(Answer(state.key, event.n))

    @on(End)
    def end(self, state: Member, event: End) -> list[Any]:
        return [Send(Answer(state.key, -1)), Complete()]


@asynccontextmanager
async def group_cluster(
    dsn: str, schema: str, log: Log, count: int
) -> AsyncIterator[list[Runtime]]:
    """`count` cluster-mode runtimes of `GroupSaga` on `schema`."""
    registry = Registry()
    registry.register(GroupSaga(), state=Member, name="members")
    async with AsyncExitStack() as stack:
        runtimes = [
            await stack.enter_async_context(
                Runtime(
                    registry,
                    store=make_store(dsn, schema),
                    dispatch=log.dispatcher(i),
                    retry=FAST_RETRY,
                    cluster=True,
                )
            )
            for i in range(count)
        ]
        with anyio.fail_after(30):
            yield runtimes


async def members(store: Any) -> dict[str, list[int]]:
    return {r.key: json.loads(r.state)["calls"] for r in await store.list_instances()}


@pytest.mark.anyio
async def test_publish_via_an_association_reaches_every_member_once_in_a_cluster(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """Members joined through different runtimes; a call published from a third one
    reaches each member of its group once (one inbox row per member, handled by
    whichever runtime), and a call to an empty group is unmatched where published."""
    log = Log()
    keys = [f"m{i:02}" for i in range(16)]
    async with group_cluster(postgres_dsn, pg_schema, log, count=3) as runtimes:
        for i, key in enumerate(keys):
            await runtimes[i % 2].publish(Join(key, "g1" if i % 4 else "g2"))

        await runtimes[2].publish(Call("g1", 1))
        await runtimes[2].publish(Call("nobody", 2))
        await settle(runtimes)
        found = await members(runtimes[0].store)
        unmatched = [r.statistics().events_unmatched for r in runtimes]

    assert found == {k: [1] if i % 4 else [] for i, k in enumerate(keys)}
    answers = sorted((c.key, meta.key) for c, meta, _ in log.calls if isinstance(c, Answer))
    assert answers == [(k, k) for i, k in enumerate(keys) if i % 4]
    assert unmatched == [0, 0, 1]


@pytest.mark.anyio
async def test_routing_by_association_in_a_cluster_reads_the_store_not_a_cache(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """Another process may change any association: `run` in cluster mode looks them up
    in the store for every batch, so it sees a member leave through another runtime."""
    log = Log()
    async with group_cluster(postgres_dsn, pg_schema, log, count=2) as (one, two):
        await one.publish(Join("a", "g"))
        await one.publish(Join("b", "g"))
        await two.run(stream([Call("g", 1)]))
        await one.publish(Leave("a", "g"))

        await two.run(stream([Call("g", 2)]))
        await settle([one, two])
        found = await members(one.store)
        unmatched = two.statistics().events_unmatched

    assert (found, unmatched) == ({"a": [1], "b": [1, 2]}, 0)


@pytest.mark.anyio
async def test_a_member_that_ended_in_a_cluster_leaves_no_association(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """An instance that completed ends once its last command went out, in whichever
    runtime dispatched it: its associations go with it."""
    log = Log()
    async with group_cluster(postgres_dsn, pg_schema, log, count=2) as (one, two):
        await one.publish(Join("a", "g"))
        await one.publish(Join("b", "g"))
        await two.publish(End("a"))
        with anyio.fail_after(30):
            while len(await one.store.list_instances()) > 1:
                await settle([one, two])
                await anyio.sleep(0.05)

        associations = await one.store.list_associations()
        await two.publish(Call("g", 1))
        await settle([one, two])
        found = await members(one.store)

    assert [(a.key, a.value) for a in associations] == [("b", "g")]
    assert found == {"b": [1]}


async def stream(events: list[Any]) -> AsyncIterator[Any]:
    for event in events:
        yield event


@pytest.mark.anyio
async def test_a_process_holds_at_most_its_outbox_capacity_during_an_outage(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the downstream down, each process claims at most `outbox_capacity` commands;
    the others wait in the store, and all go out once it is back."""
    monkeypatch.setattr(sys.modules[__name__], "WAKE_AFTER", 3600.0)
    down = {"first", "second", "scheduled"}
    log = Log(failing=down)
    held: list[int] = []
    patient = RetryPolicy(max_attempts=1_000, initial_delay=0.01, max_delay=0.05, jitter=False)
    async with cluster(
        postgres_dsn, pg_schema, log, count=2, outbox_capacity=3, retry=patient
    ) as runtimes:
        for i in range(10):
            await runtimes[i % 2].publish(Go(f"o{i}"))
        with anyio.fail_after(60):
            while len(log.calls) < 30:  # failed attempts: the outage goes on a while
                held.extend(r.statistics().outbox_depth for r in runtimes)
                await anyio.sleep(0.01)
        held.extend(r.statistics().outbox_depth for r in runtimes)
        down.clear()  # the downstream is back
        with anyio.fail_after(60):
            while await runtimes[0].store.list_outbox():
                await settle(runtimes)
                await anyio.sleep(0.05)
        # A row leaves the outbox only once its dispatch succeeded (none gave up).
        dead = await runtimes[0].store.list_dead_letters()

    assert (max(held) <= 3, dead) == (True, [])
    tried = {(c.key, c.label) for c, _, _ in log.calls}
    assert tried == {(f"o{i}", x) for i in range(10) for x in ("first", "second", "scheduled")}
