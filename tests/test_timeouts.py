"""Timeouts and stops: `handler_timeout`, `dispatch_timeout`, `shutdown_timeout`, calls
that raise a cancellation nobody asked for, and cancellation of the runtime from outside.

Hung calls wait on an `anyio.Event` that is never set, and timeouts are tiny: tests
assert on outcomes (what was retried, dead-lettered, dispatched, kept), never on how
long something took. Retry delays run on a `VirtualClock`, so a timed-out call waits
for its retry until the test moves the clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from sagas_for_tests import (
    SAGA,
    Cmd,
    Log,
    Recorder,
    Started,
    Touched,
    label,
    running,
    scripted_registry,
)

from sagaflow import CommandFailed, DispatchMeta, RetryPolicy, Runtime, Schedule, Send
from sagaflow._clock import VirtualClock
from sagaflow.exceptions import RuntimeClosedError
from sagaflow.stores import MemoryStore, PostgresStore, SQLiteStore, Store

TIMEOUT = 0.05
TWICE = RetryPolicy(max_attempts=2, initial_delay=1, jitter=False)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "sagas.db")


async def never() -> None:
    """A call that hangs: it waits for an event nobody sets."""
    await anyio.Event().wait()


class Hanging:
    """A dispatcher that hangs on commands labelled `hang`, records the others."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str]] = []
        self.hung: list[tuple[str, int]] = []
        self.entered = anyio.Event()

    async def __call__(self, command: Cmd, meta: DispatchMeta) -> None:
        if command.label == "hang":
            self.hung.append((command.key, meta.attempt))
            self.entered.set()
            await never()
        self.delivered.append((command.key, command.label))


def failures_and_sends(errors: list[str]) -> Any:
    """A script: `Started` sends `Cmd(key, tag)`; `CommandFailed` records its error."""

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, CommandFailed):
            errors.append(event.error)
            return None
        if isinstance(event, Started):
            return Send(Cmd(event.key, event.tag))
        return None

    return script


# -- options ---------------------------------------------------------------------------


def test_timeouts_take_seconds_a_timedelta_or_none() -> None:
    registry = scripted_registry()
    for value in (0.5, 2, timedelta(milliseconds=500), None):
        Runtime(
            registry,
            store=MemoryStore(),
            dispatch=Recorder(),
            handler_timeout=value,
            dispatch_timeout=value,
            shutdown_timeout=value,
        )


@pytest.mark.parametrize("name", ["handler_timeout", "dispatch_timeout", "shutdown_timeout"])
@pytest.mark.parametrize("value", [0, -1, timedelta(0)])
def test_a_timeout_that_is_not_positive_is_refused(name: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        Runtime(scripted_registry(), store=MemoryStore(), dispatch=Recorder(), **{name: value})
    assert str(info.value) == (
        f"Runtime({name}=...) must be a positive number of seconds, a timedelta, or None "
        f"for no limit; got {value!r}"
    )


# -- handlers --------------------------------------------------------------------------


class Entered:
    """The keys whose hanging handler was entered, in order, and an event per entry."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.event = anyio.Event()

    def add(self, key: str) -> None:
        self.keys.append(key)
        self.event.set()
        self.event = anyio.Event()


def hang_on_touched(entered: Entered) -> Any:
    """A script: the async `Touched` handler hangs when the tag is `hang`."""

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Touched) and event.tag == "hang":
            entered.add(event.key)
            return never()
        return None

    return script


@pytest.mark.anyio
async def test_a_hung_handler_times_out_is_retried_then_dead_lettered(store: Store) -> None:
    """Each attempt is cancelled after `handler_timeout`; the last one dead-letters the
    event with an error saying so, and the state is as before the event."""
    entered = Entered()
    registry = scripted_registry(hang_on_touched(entered))
    async with running(registry, store=store, retry=TWICE, handler_timeout=TIMEOUT) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Started("k"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.runtime.publish, Touched("k", "hang"))
            await entered.event.wait()
            await h.runtime.drain()  # the first attempt times out, the retry waits
            assert (entered.keys, h.runtime.statistics().handler_retries) == (["k"], 1)
            h.clock.advance(1)
        letters = await store.list_dead_letters()
        summary = await h.summary()

    assert entered.keys == ["k", "k"]
    assert [(d.saga, d.key, d.kind, d.error, d.attempts) for d in letters] == [
        (
            SAGA,
            "k",
            "event",
            "TimeoutError: handler touched of saga 'S' on Touched (key 'k') timed out "
            f"after {TIMEOUT:g} s (handler_timeout)",
            2,
        )
    ]
    assert summary == {"k": ("active", ["Started"])}


@pytest.mark.anyio
async def test_a_hung_handler_does_not_hold_other_instances_past_its_timeout(
    store: Store,
) -> None:
    """With one shard, the instances published after a hung handler are handled once it
    timed out, while the hung one waits for its retry (the clock does not move)."""
    entered = Entered()
    registry = scripted_registry(hang_on_touched(entered))
    async with running(registry, store=store, retry=TWICE, handler_timeout=TIMEOUT, shards=1) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Started("a"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.runtime.publish, Touched("a", "hang"))
            await entered.event.wait()
            for key in "bcdefgh":
                await h.runtime.publish(Started(key))
            summary = await h.summary()
            tg.cancel_scope.cancel()  # the hung event's publisher stops waiting

    assert entered.keys == ["a"]
    assert summary == {key: ("active", ["Started"]) for key in "abcdefgh"}


# -- dispatchers -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_hung_dispatches_hold_only_their_own_instances(store: Store) -> None:
    """16 hung dispatches (as many as `dispatch_concurrency`) time out and wait for their
    retry; the other instances' commands go out meanwhile. Retries exhausted, each hung
    instance hears `CommandFailed` with an error saying the dispatch timed out."""
    errors: list[str] = []
    dispatcher = Hanging()
    registry = scripted_registry(failures_and_sends(errors))
    hung = [f"h{i:02}" for i in range(16)]
    async with running(
        registry, store=store, recorder=dispatcher, retry=TWICE, dispatch_timeout=TIMEOUT
    ) as h:  # type: ignore[arg-type]
        for key in hung:
            await h.runtime.publish(Started(key, "hang"))
        await dispatcher.entered.wait()
        for i in range(16):
            await h.runtime.publish(Started(f"ok{i:02}", "fine"))
        await h.runtime.drain()
        delivered = sorted(dispatcher.delivered)
        first_attempts = sorted(dispatcher.hung)
        await h.advance(1)
        summary = await h.summary()

    assert delivered == [(f"ok{i:02}", "fine") for i in range(16)]
    assert first_attempts == [(key, 1) for key in hung]
    assert sorted(dispatcher.hung) == sorted([(key, n) for key in hung for n in (1, 2)])
    assert sorted(errors) == [
        f"TimeoutError: the dispatch of Cmd for S/{key} (attempt 2) timed out after "
        f"{TIMEOUT:g} s (dispatch_timeout)"
        for key in hung
    ]
    assert {k: v for k, v in summary.items() if k in hung} == {
        key: ("active", ["Started:hang", "CommandFailed:hang:2"]) for key in hung
    }


@pytest.mark.anyio
async def test_hung_dispatches_in_cluster_mode_hold_only_their_own_instances(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """The cluster outbox applies `dispatch_timeout` the same way."""
    errors: list[str] = []
    dispatcher = Hanging()
    store = PostgresStore(postgres_dsn, schema=pg_schema, lease=5.0, poll_interval=0.1)
    hung = [f"h{i:02}" for i in range(16)]
    fast = RetryPolicy(max_attempts=2, initial_delay=0.01, jitter=False)
    with anyio.fail_after(30):
        async with Runtime(
            scripted_registry(failures_and_sends(errors)),
            store=store,
            dispatch=dispatcher,
            retry=fast,
            dispatch_timeout=TIMEOUT,
            cluster=True,
        ) as runtime:
            for key in hung:
                await runtime.publish(Started(key, "hang"))
            await dispatcher.entered.wait()
            for i in range(8):
                await runtime.publish(Started(f"ok{i}", "fine"))
            while len(errors) < len(hung) or await store.list_outbox():
                await runtime.drain()
                await anyio.sleep(0.02)

    assert sorted(dispatcher.delivered) == [(f"ok{i}", "fine") for i in range(8)]
    assert sorted(dispatcher.hung) == sorted([(key, n) for key in hung for n in (1, 2)])
    assert sorted(errors) == [
        f"TimeoutError: the dispatch of Cmd for S/{key} (attempt 2) timed out after "
        f"{TIMEOUT:g} s (dispatch_timeout)"
        for key in hung
    ]


# -- cancellations user code raises ----------------------------------------------------


async def stray_cancellation() -> None:
    """What a call meets that awaited a future someone else cancelled (on asyncio; trio
    has no such thing, so there it is raised outright, and fails the call the same way)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        raise asyncio.CancelledError() from None
    future = loop.create_future()
    loop.call_soon(future.cancel)
    await future


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [60.0, None])
async def test_a_dispatcher_raising_cancelled_error_fails_that_call_only(
    store: Store, limit: float | None
) -> None:
    """The command is retried and then fails for good like any failure (with a
    `dispatch_timeout` or without); dispatching goes on for the other instances, and
    drain() returns."""
    errors: list[str] = []
    calls: list[tuple[str, int]] = []

    class Cancelling(Recorder):
        async def __call__(self, command: Any, meta: DispatchMeta) -> None:
            calls.append((command.key, meta.attempt))
            if command.label == "cancel":
                await stray_cancellation()

    registry = scripted_registry(failures_and_sends(errors))
    async with running(
        registry, store=store, recorder=Cancelling(), retry=TWICE, dispatch_timeout=limit
    ) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Started("bad", "cancel"))
        for key in ("a", "b"):
            await h.runtime.publish(Started(key, "fine"))
        await h.runtime.drain()
        await h.advance(1)
        outbox = await store.list_outbox()
        stats = h.runtime.statistics()

    assert sorted(calls) == [("a", 1), ("b", 1), ("bad", 1), ("bad", 2)]
    assert errors == [
        "RuntimeError: the dispatch of Cmd for S/bad (attempt 2) raised CancelledError "
        "although the runtime was not cancelled (did it await something that another "
        "task cancelled?)"
    ]
    assert (outbox, stats.commands_dispatched, stats.commands_failed) == ([], 2, 1)


@pytest.mark.anyio
async def test_a_handler_raising_cancelled_error_is_retried_then_dead_lettered(
    store: Store,
) -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Touched):
            return stray_cancellation()
        return None

    async with running(scripted_registry(script), store=store, retry=TWICE) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Started("k"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.runtime.publish, Touched("k"))
            await h.runtime.drain()
            while h.runtime.statistics().handler_retries == 0:
                await h.runtime.drain()
            h.clock.advance(1)
        letters = await store.list_dead_letters()
        await h.runtime.publish(Started("other"))
        summary = await h.summary()

    assert [(d.key, d.error, d.attempts) for d in letters] == [
        (
            "k",
            "RuntimeError: handler touched of saga 'S' on Touched (key 'k') raised "
            "CancelledError although the runtime was not cancelled (did it await "
            "something that another task cancelled?)",
            2,
        )
    ]
    assert summary == {"k": ("active", ["Started"]), "other": ("active", ["Started"])}


# -- stopping --------------------------------------------------------------------------


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING, logger="sagaflow")
    yield caplog


def stop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "shutdown_timeout" in r.getMessage()]


@pytest.mark.anyio
async def test_leaving_with_a_hung_dispatch_stops_after_shutdown_timeout_and_keeps_it(
    tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    """No dispatch timeout: leaving waits `shutdown_timeout`, warns, and stops; the
    command stays in the file and the next start dispatches it, under the same id."""
    path = tmp_path / "sagas.db"
    dispatcher = Hanging()
    registry = scripted_registry(failures_and_sends([]))
    with anyio.fail_after(60):
        async with Runtime(
            registry,
            store=SQLiteStore(path),
            dispatch=dispatcher,
            dispatch_timeout=None,
            shutdown_timeout=TIMEOUT,
        ) as runtime:
            await runtime.publish(Started("k", "hang"))
            await dispatcher.entered.wait()
        kept = await stored_outbox(path)

        recorder = Recorder()
        async with Runtime(registry, store=SQLiteStore(path), dispatch=recorder) as runtime:
            await runtime.drain()
        left = await stored_outbox(path)

    assert stop_warnings(warnings) == [
        f"stopping after waiting {TIMEOUT:g} s (shutdown_timeout) for the work due now, "
        "with 0 event(s) queued, 1 task(s) under way and 1 command(s) not yet dispatched: "
        "what was committed (state, commands, schedules) stays in the store for the next "
        "start; events not yet committed were never acknowledged to their publishers"
    ]
    assert [(row.key, row.type_name.rpartition(".")[2]) for row in kept] == [("k", "Cmd")]
    assert [(c, m.id) for c, m in recorder.calls] == [(Cmd("k", "hang"), kept[0].id)]
    assert left == []


async def stored_outbox(path: Path) -> list[Any]:
    store = SQLiteStore(path)
    await store.open()
    try:
        return await store.list_outbox()
    finally:
        await store.close()


@pytest.mark.anyio
async def test_leaving_with_a_hung_handler_stops_after_shutdown_timeout_and_keeps_it(
    tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    """A due schedule whose handler hangs (no handler timeout): leaving stops it after
    `shutdown_timeout`; the schedule stays in the file and fires on the next start."""
    path = tmp_path / "sagas.db"
    entered = Entered()

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return Schedule(Touched(event.key, "hang"), after=1, to_self=True)
        return hang_on_touched(entered)(state, event)

    clock = VirtualClock()
    with anyio.fail_after(60):
        async with running(
            scripted_registry(script),
            store=SQLiteStore(path),  # type: ignore[arg-type]
            clock=clock,
            handler_timeout=None,
            shutdown_timeout=TIMEOUT,
        ) as h:
            await h.runtime.publish(Started("k"))
            h.clock.advance(1)
            await entered.event.wait()
        after_stop = await stored(path)

        async with running(scripted_registry(), store=SQLiteStore(path), clock=clock) as h:  # type: ignore[arg-type]
            await h.runtime.drain()
        after_restart = await stored(path)

    assert len(stop_warnings(warnings)) == 1
    assert "0 event(s) queued, 1 task(s) under way and 0 command(s)" in stop_warnings(warnings)[0]
    assert after_stop == ([("k", ["Started"])], ["Touched"])
    assert after_restart == ([("k", ["Started", "Touched:hang"])], [])


async def stored(path: Path) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The instances (key, seen) and the pending schedules' type names in a file."""
    store = SQLiteStore(path)
    await store.open()
    try:
        instances = [(r.key, json.loads(r.state)["seen"]) for r in await store.list_instances()]
        schedules = [s.type_name.rpartition(".")[2] for s in await store.list_schedules()]
        return instances, schedules
    finally:
        await store.close()


@pytest.mark.anyio
async def test_cancelling_a_busy_runtime_stops_it_and_the_file_stays_consistent(
    tmp_path: Path,
) -> None:
    """A cancel scope around a runtime fed by `run()` stops it mid-stream (the source
    gives 200 events, then waits); a second runtime on the same file, fed all 300
    events with ids, applies each exactly once."""
    path = tmp_path / "sagas.db"
    events = [Started(f"k{i:03}") for i in range(300)]

    async def source(stall_at: int | None = None) -> AsyncIterator[Started]:
        for i, event in enumerate(events):
            if i == stall_at:
                await never()
            yield event

    def event_id(event: Started) -> str:
        return event.key

    registry = scripted_registry()
    with anyio.fail_after(30):
        with anyio.CancelScope() as scope:
            store = SQLiteStore(path)
            async with (
                Runtime(registry, store=store, dispatch=Recorder()) as rt,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(lambda: rt.run(source(200), id=event_id))
                while rt.statistics().events_handled < 50:
                    await anyio.sleep(0.005)
                scope.cancel()
        assert scope.cancelled_caught
        first, _ = await stored(path)

        async with Runtime(registry, store=SQLiteStore(path), dispatch=Recorder()) as rt:
            await rt.run(source(), id=event_id)
        second, _ = await stored(path)

    assert 50 <= len(first) <= 200
    assert sorted(second) == [(e.key, [label(e)]) for e in events]


@pytest.mark.anyio
async def test_publishers_still_waiting_when_the_runtime_stops_hear_so(store: Store) -> None:
    """Publishers in tasks outside the runtime's context (a web server's requests, say):
    one whose handler hangs, one queued behind it on the same shard. Once leaving the
    runtime gave up after `shutdown_timeout`, both get `RuntimeClosedError` instead of
    waiting for ever."""
    entered = Entered()
    registry = scripted_registry(hang_on_touched(entered))
    outcomes: list[tuple[str, str]] = []

    async def publish(runtime: Runtime, event: Touched) -> None:
        try:
            await runtime.publish(event)
            outcomes.append((event.key, "committed"))
        except RuntimeClosedError as exc:
            outcomes.append((event.key, str(exc)))

    with anyio.fail_after(60):  # without the fix: the publishers wait for ever
        async with (
            anyio.create_task_group() as tg,
            running(
                registry, store=store, shards=1, handler_timeout=None, shutdown_timeout=TIMEOUT
            ) as h,  # type: ignore[arg-type]
        ):
            await h.runtime.publish(Started("a"))
            await h.runtime.publish(Started("b"))
            tg.start_soon(publish, h.runtime, Touched("a", "hang"))
            await entered.event.wait()
            tg.start_soon(publish, h.runtime, Touched("b"))
            await anyio.wait_all_tasks_blocked()
            assert h.runtime.statistics().queued_events == 1

    stopped = (
        "the runtime stopped while this event was being handled or waiting to be; it may "
        "not be committed: publish it again to a running runtime (with an id, it is "
        "applied at most once)"
    )
    assert sorted(outcomes) == [("a", stopped), ("b", stopped)]


@pytest.mark.anyio
async def test_calls_with_cancel_scopes_and_task_groups_of_their_own_run_normally(
    store: Store,
) -> None:
    """The runtime drives an async call's first step itself (a call that does not wait
    needs no deadline): calls that open scopes and task groups and wait inside them, or
    that never wait, return their results as usual."""
    calls: list[str] = []

    async def busy() -> None:
        with anyio.move_on_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.sleep, 0)
                await anyio.sleep(0)
        await anyio.sleep(0)

    class Scoped(Recorder):
        async def __call__(self, command: Any, meta: DispatchMeta) -> None:
            if command.label == "wait":
                await busy()
            calls.append(command.label)

    async def handled(state: Log, event: Touched) -> Any:
        if event.tag == "wait":
            await busy()
        return Send(Cmd(event.key, event.tag))

    def script(state: Log, event: Any) -> Any:
        return handled(state, event) if isinstance(event, Touched) else None

    async with running(scripted_registry(script), store=store, recorder=Scoped()) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Started("k"))
        for tag in ("wait", "now", "wait"):
            await h.runtime.publish(Touched("k", tag))
        await h.runtime.drain()
        summary = await h.summary()

    assert calls == ["wait", "now", "wait"]
    assert summary == {"k": ("active", ["Started", "Touched:wait", "Touched:now", "Touched:wait"])}


@pytest.mark.anyio
async def test_a_dispatch_limit_is_armed_only_while_its_call_waits(store: Store) -> None:
    """A dispatcher worker keeps one cancel scope for its calls and sets the
    `dispatch_timeout` deadline once a call suspends: a call that has not waited yet sees
    no deadline, one that waited sees it, and the next call on the same worker starts
    without it again (it was taken off, so it cannot cut a later call short)."""
    seen: list[tuple[str, bool, bool]] = []

    class Probing(Recorder):
        async def __call__(self, command: Any, meta: DispatchMeta) -> None:
            # Only the test's own limit of an hour applies, or the 30 s of the dispatch.
            before = anyio.current_effective_deadline() <= anyio.current_time() + 30
            await anyio.sleep(0)
            after = anyio.current_effective_deadline() <= anyio.current_time() + 30
            seen.append((command.label, before, after))

    def script(state: Log, event: Any) -> Any:
        return Send(Cmd(event.key, event.tag)) if isinstance(event, Touched) else None

    async with running(
        scripted_registry(script),
        store=store,
        recorder=Probing(),
        dispatch_concurrency=1,
        dispatch_timeout=30,
        timeout=3600,
    ) as h:
        await h.runtime.publish(Started("k"))
        for tag in ("one", "two", "three"):
            await h.runtime.publish(Touched("k", tag))
        await h.runtime.drain()

    assert seen == [("one", False, True), ("two", False, True), ("three", False, True)]
