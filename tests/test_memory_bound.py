"""Memory stays bounded with the number of live instances (durable stores)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from sagaflow import Complete, DispatchMeta, Registry, Runtime, Send, correlate, on
from sagaflow.stores import SQLiteStore


@attrs.frozen
class Opened:
    key: str


@attrs.frozen
class Bumped:
    key: str


@attrs.frozen
class Closed:
    key: str


@attrs.frozen
class Bump:
    key: str
    count: int


@attrs.define
class Counter:
    count: int = 0


registry = Registry()


@registry.saga(state=Counter)
class CounterSaga:
    @correlate
    def key(self, event: Opened | Bumped | Closed) -> str:
        return event.key

    @on(Opened, start=True)
    def opened(self, state: Counter, event: Opened) -> None:
        return None

    @on(Bumped)
    def bumped(self, state: Counter, event: Bumped) -> Send[Bump]:
        state.count += 1
        return Send(Bump(event.key, state.count))

    @on(Closed)
    def closed(self, state: Counter, event: Closed) -> Complete:
        return Complete()


@pytest.mark.anyio
async def test_live_instances_beyond_the_cache_live_in_the_file_not_in_memory(
    tmp_path: Path,
) -> None:
    """With 2,000 live instances and a cache of 64 states, at most 64 states are held;
    the others are read back from the file when their next event arrives."""
    n = 2000
    sent: list[Bump] = []

    async def dispatch(command: Any, meta: DispatchMeta) -> None:
        sent.append(command)

    async def events(kind: type) -> Any:
        for i in range(n):
            yield kind(f"k{i}")

    store = SQLiteStore(tmp_path / "bound.db")
    with anyio.fail_after(60):
        async with Runtime(
            registry, store=store, dispatch=dispatch, cache_size=64, shards=4
        ) as runtime:
            await runtime.run(events(Opened))
            assert runtime.statistics().cached_states <= 64
            assert len(await store.list_instances()) == n

            await runtime.run(events(Bumped))
            await runtime.run(events(Bumped))
            await runtime.drain()
            assert runtime.statistics().cached_states <= 64

            await runtime.run(events(Closed))
    assert sorted(sent, key=lambda b: (int(b.key[1:]), b.count)) == [
        Bump(f"k{i}", c) for i in range(n) for c in (1, 2)
    ]
    await store.open()
    try:
        assert await store.list_instances() == []
    finally:
        await store.close()
