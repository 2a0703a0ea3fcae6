"""Generated interleavings of events over several instances, against a sequential model.

Hypothesis draws a history of starts, mid events, finishes and redeliveries (same event,
same id) over a few keys, and how the runtime is fed and configured. The runtime's end
result (commands dispatched per instance in order, final states, completed instances,
duplicate and unmatched counts) must equal what a plain sequential model computes.

A fresh start for a key after its finish is turned into a mid event before the run:
whether it lands while the old instance is still completing (unmatched) or after it is
gone (a new instance) is a race the contract leaves open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sagas_for_tests import (
    Cmd,
    Finished,
    Log,
    Recorder,
    Started,
    Touched,
    label,
    running,
    scripted_registry,
)

from sagaflow import Complete, Send

KEYS = ["k0", "k1", "k2", "k3"]
KINDS = {"start": Started, "mid": Touched, "finish": Finished}


@attrs.frozen
class Delivery:
    """One delivery of an event; a redelivery repeats an earlier one exactly."""

    event: Any
    id: str | None


def command_label(event: Any) -> str:
    return f"{type(event).__name__}:{event.tag}"


def script(state: Log, event: Any) -> Any:
    """Every event sends one command named after it; a finish also completes."""
    command = Send(Cmd(event.key, command_label(event)))
    return [command, Complete()] if isinstance(event, Finished) else command


def flaky_script(tags: set[str]) -> Any:
    """`script`, but the handler raises on its first call for events with these tags."""
    raised: set[str] = set()

    def flaky(state: Log, event: Any) -> Any:
        if event.tag in tags and event.tag not in raised:
            raised.add(event.tag)
            raise RuntimeError(f"flaky {event.tag}")
        return script(state, event)

    return flaky


@st.composite
def histories(draw: st.DrawFn) -> list[Delivery]:
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["start", "mid", "finish", "redeliver"]),
                st.sampled_from(KEYS),
                st.booleans(),  # with an id?
                st.integers(min_value=0, max_value=10_000),  # which earlier one to repeat
            ),
            min_size=1,
            max_size=40,
        )
    )
    deliveries: list[Delivery] = []
    for i, (kind, key, with_id, pick) in enumerate(steps):
        if kind == "redeliver":
            if not deliveries:
                continue
            deliveries.append(deliveries[pick % len(deliveries)])
            continue
        deliveries.append(Delivery(KINDS[kind](key, str(i)), f"e{i}" if with_id else None))
    return deliveries


@attrs.define
class Model:
    """The sequential meaning of a history."""

    live: dict[str, list[str]] = attrs.Factory(dict)
    completed: set[str] = attrs.Factory(set)
    commands: dict[str, list[str]] = attrs.Factory(dict)
    applied: set[tuple[str, str]] = attrs.Factory(set)
    duplicates: int = 0
    unmatched: int = 0

    def deliver(self, d: Delivery) -> None:
        key = d.event.key
        if d.id is not None and (key, d.id) in self.applied:
            self.duplicates += 1
            return
        if key in self.completed or (key not in self.live and not isinstance(d.event, Started)):
            self.unmatched += 1
            return
        seen = self.live.setdefault(key, [])
        seen.append(label(d.event))
        self.commands.setdefault(key, []).append(command_label(d.event))
        if d.id is not None:
            self.applied.add((key, d.id))
        if isinstance(d.event, Finished):
            self.completed.add(key)
            del self.live[key]


def settle(history: list[Delivery]) -> list[Delivery]:
    """Turn fresh starts after a finish into mid events (see the module docstring)."""
    model = Model()
    out = []
    for d in history:
        key = d.event.key
        is_duplicate = d.id is not None and (key, d.id) in model.applied
        if isinstance(d.event, Started) and key in model.completed and not is_duplicate:
            d = Delivery(Touched(key, d.event.tag), d.id)
        model.deliver(d)
        out.append(d)
    return out


def model_of(history: list[Delivery]) -> Model:
    model = Model()
    for d in history:
        model.deliver(d)
    return model


def test_settle_and_model_on_a_known_history() -> None:
    """The model itself, on a history whose meaning is worked out by hand."""
    history = settle(
        [
            Delivery(Touched("a", "0"), "e0"),  # unmatched: no instance yet
            Delivery(Started("a", "1"), "e1"),
            Delivery(Touched("a", "0"), "e0"),  # redelivery of an unmatched event: applied
            Delivery(Started("a", "1"), "e1"),  # duplicate
            Delivery(Finished("a", "2"), None),
            Delivery(Started("a", "3"), "e3"),  # fresh start after finish: made a mid event
            Delivery(Started("a", "1"), "e1"),  # still a duplicate after completion
            Delivery(Started("b", "4"), None),
        ]
    )
    model = model_of(history)

    assert history[5] == Delivery(Touched("a", "3"), "e3")
    assert (model.live, model.completed, model.commands) == (
        {"b": ["Started:4"]},
        {"a"},
        {"a": ["Started:1", "Touched:0", "Finished:2"], "b": ["Started:4"]},
    )
    assert (model.duplicates, model.unmatched) == (2, 2)


async def _feed_per_key(runtime: Any, history: list[Delivery]) -> None:
    """One publishing task per key: cross-key order is up to the scheduler."""

    async def publish_all(key: str) -> None:
        for d in history:
            if d.event.key == key:
                await runtime.publish(d.event, id=d.id)

    async with anyio.create_task_group() as tg:
        for key in KEYS:
            tg.start_soon(publish_all, key)


async def _run_history(
    history: list[Delivery],
    *,
    shards: int,
    max_batch: int,
    cache_size: int,
    feed: str,
    flaky_dispatch: bool,
    flaky_handlers: bool,
) -> tuple[dict[str, list[str]], dict[str, tuple[str, list[str]]], tuple[int, int, int]]:
    tags = [d.event.tag for d in history]
    failures = {
        command_label(d.event): 1 for d in history if flaky_dispatch and int(d.event.tag) % 3 == 0
    }
    raising = {t for t in tags if flaky_handlers and int(t) % 4 == 1}
    recorder = Recorder(failures)
    async with running(
        scripted_registry(flaky_script(raising)),
        recorder=recorder,
        shards=shards,
        max_batch=max_batch,
        cache_size=cache_size,
        dedup_retention=1e9,
    ) as h:
        fed = anyio.Event()

        async def tick() -> None:
            # Handler retries hold publish() until they are done: move time meanwhile.
            while not fed.is_set():
                await h.runtime.drain()
                h.clock.advance(1)
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            if feed == "publish":
                await _feed_per_key(h.runtime, history)
            else:
                for d in history:
                    await h.runtime.publish(d.event, id=d.id)
            fed.set()
        # Failed dispatches of one instance are retried one after the other.
        for _ in range(len(history) + 2):
            await h.advance(1)
        stats = h.runtime.statistics()
        dispatched: dict[str, list[str]] = {}
        for command, meta in recorder.calls:
            if meta.attempt > failures.get(command.label, 0):
                dispatched.setdefault(command.key, []).append(command.label)
        outbox = len(await h.store.list_outbox())
        counts = (stats.events_duplicate, stats.events_unmatched, outbox)
        return dispatched, await h.summary(), counts


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=30, deadline=None)
@given(
    history=histories().map(settle),
    shards=st.integers(min_value=1, max_value=3),
    max_batch=st.integers(min_value=1, max_value=4),
    cache_size=st.sampled_from([1, 10_000]),  # 1: states are read back from the store
    feed=st.sampled_from(["publish", "sequential"]),
    flaky_dispatch=st.booleans(),
    flaky_handlers=st.booleans(),
)
def test_runtime_matches_the_sequential_model(
    backend: str,
    history: list[Delivery],
    shards: int,
    max_batch: int,
    cache_size: int,
    feed: str,
    flaky_dispatch: bool,
    flaky_handlers: bool,
) -> None:
    """Also with dispatches failing once (retried) and handlers raising once (retried)."""
    model = model_of(history)

    async def main() -> Any:
        return await _run_history(
            history,
            shards=shards,
            max_batch=max_batch,
            cache_size=cache_size,
            feed=feed,
            flaky_dispatch=flaky_dispatch,
            flaky_handlers=flaky_handlers,
        )

    dispatched, instances, (duplicates, unmatched, outbox) = anyio.run(main, backend=backend)

    assert dispatched == model.commands
    assert instances == {key: ("active", seen) for key, seen in model.live.items()}
    assert set(model.commands) - set(instances) == model.completed
    assert (duplicates, unmatched, outbox) == (model.duplicates, model.unmatched, 0)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=15, deadline=None)
@given(history=histories().map(settle), max_batch=st.integers(min_value=1, max_value=8))
def test_run_from_a_source_matches_the_sequential_model(
    backend: str, history: list[Delivery], max_batch: int
) -> None:
    """The same, fed through `run(source, id=...)` in one go."""
    model = model_of(history)

    async def main() -> Any:
        async with running(scripted_registry(script), max_batch=max_batch, shards=2) as h:

            async def source() -> AsyncIterator[Any]:
                for d in history:
                    yield d

            count = await h.runtime.run(_unwrap(source()), id=_id_of(history))
            await h.runtime.drain()
            return count, h.dispatched.calls, await h.summary()

    count, calls, instances = anyio.run(main, backend=backend)

    dispatched: dict[str, list[str]] = {}
    for command, _ in calls:
        dispatched.setdefault(command.key, []).append(command.label)
    assert count == len(history)
    assert dispatched == model.commands
    assert instances == {key: ("active", seen) for key, seen in model.live.items()}


async def _unwrap(deliveries: AsyncIterator[Delivery]) -> AsyncIterator[Any]:
    async for d in deliveries:
        yield d.event


def _id_of(history: list[Delivery]) -> Any:
    """Event -> id; equal events in a history always carry the same id (redeliveries)."""
    ids = {d.event: d.id for d in history}
    return lambda event: ids[event]
