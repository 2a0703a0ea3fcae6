"""Associations: fan-out to many instances, and routing by association against by key.

    python benchmarks/associations.py                       # memory, sqlite (and postgres)
    python benchmarks/associations.py --store sqlite --backend trio --rounds 5
    python benchmarks/associations.py --fanout 200 --instances 100 --events 400   # short

Two measurements, each checked (every instance handled exactly what it should, every
command dispatched once), run `--rounds` times (3) with the variants alternated, so that
drift of the machine's speed hits all of them alike, and printed as medians, in a table
and as one JSON line per store:

- fan-out: `--fanout` instances (10,000) are associated with one value; one event routed
  via that association reaches all of them. Timed: from `publish` to the last command
  dispatched (`drain`); the instances and their associations are made before.
- routing: `--events` events (20,000) round-robin over `--instances` instances (2,000),
  each associated with a value of its own, fed with `Runtime.run`, routed once by key,
  once via the association (the shards' cache of lookups on, as in one process), and
  once via the association with `cache_size=0` (a store read per batch, as in cluster
  mode, though then no state is cached either). Timed: from the first event to the last
  one committed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs

from sagaflow import (
    Associate,
    DispatchMeta,
    Registry,
    Runtime,
    Send,
    correlate,
    on,
)
from sagaflow.stores import MemoryStore, SQLiteStore, Store


@attrs.frozen
class Join:
    key: str
    group: str
    alias: str


@attrs.frozen
class Call:  # via the association "group"
    group: str


@attrs.frozen
class Ping:  # by key
    key: str


@attrs.frozen
class Poke:  # via the association "alias": the same work as Ping
    alias: str


@attrs.frozen
class Answer:
    key: str


@attrs.define
class Member:
    key: str = ""
    calls: int = 0
    pings: int = 0


registry = Registry()


@registry.saga(state=Member, name="members")
class MemberSaga:
    @correlate(Join, Ping)
    def key(self, event: Join | Ping) -> str:
        return event.key

    @correlate(Call, via="group")
    def group(self, event: Call) -> str:
        return event.group

    @correlate(Poke, via="alias")
    def alias(self, event: Poke) -> str:
        return event.alias

    @on(Join, start=True)
    def join(self, state: Member, event: Join) -> list[Associate]:
        state.key = event.key
        return [Associate("group", event.group), Associate("alias", event.alias)]

    @on(Call)
    def call(self, state: Member, event: Call) -> Send[Answer]:
        state.calls += 1
        return Send(Answer(state.key))

    @on(Ping, Poke)
    def ping(self, state: Member, event: Ping | Poke) -> None:
        state.pings += 1


@attrs.define
class Counter:
    answered: dict[str, int] = attrs.Factory(dict)

    async def __call__(self, command: Answer, meta: DispatchMeta) -> None:
        assert meta.key == command.key
        self.answered[command.key] = self.answered.get(command.key, 0) + 1


LOOKUPS = [0]
"""Association lookups that reached the store, since the last reset."""


def counting(cls: type[Any]) -> type[Any]:
    """`cls`, counting its `find_associated` calls in `LOOKUPS`."""

    class Counting(cls):  # type: ignore[misc, valid-type]
        async def find_associated(self, saga: str, name: str, values: Any) -> Any:
            LOOKUPS[0] += 1
            return await super().find_associated(saga, name, values)

    return Counting


def make_store(kind: str, directory: str, name: str) -> Store:
    store: Store
    if kind == "memory":
        store = counting(MemoryStore)()
    elif kind == "sqlite":
        store = counting(SQLiteStore)(Path(directory) / f"{name}.db", power_safe=False)
    else:
        from sagaflow.stores import PostgresStore

        schema = f"bench_{name}_{os.getpid()}"
        store = counting(PostgresStore)(os.environ["SAGAFLOW_PG_DSN"], schema=schema)
    return store


async def drop(store: Store) -> None:
    """Drop a PostgreSQL benchmark schema (the other stores are thrown away anyway)."""
    from sagaflow.stores import PostgresStore

    if isinstance(store, PostgresStore):
        import psycopg

        def run() -> None:
            with psycopg.connect(os.environ["SAGAFLOW_PG_DSN"], autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{store._schema}" CASCADE')

        await anyio.to_thread.run_sync(run)


async def stream(events: Any) -> AsyncIterator[Any]:
    for event in events:
        yield event


async def joined(runtime: Runtime, n: int) -> None:
    """`n` members, in group "all", each with an alias of its own."""
    await runtime.run(stream(Join(f"m{i:06}", "all", f"a{i:06}") for i in range(n)))
    await runtime.drain()


async def fan_out(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    counter = Counter()
    store = make_store(args.store, directory, "fanout")
    options = {"shards": args.shards}
    try:
        async with Runtime(registry, store=store, dispatch=counter, **options) as runtime:
            await joined(runtime, args.fanout)
            started = time.perf_counter()
            await runtime.publish(Call("all"))
            await runtime.drain()
            seconds = time.perf_counter() - started
            states = await store.list_instances()
    finally:
        await drop(store)
    problems = []
    if sorted(counter.answered.values()) != [1] * args.fanout:
        problems.append(f"{len(counter.answered)} instances answered, not {args.fanout} once")
    if any(json.loads(r.state)["calls"] != 1 for r in states) or len(states) != args.fanout:
        problems.append("an instance did not handle the call exactly once")
    return {"instances": args.fanout, "seconds": seconds, "problems": problems}


async def routing(
    args: argparse.Namespace,
    directory: str,
    name: str,
    event: Callable[[int], Any],
    **options: Any,
) -> dict[str, Any]:
    store = make_store(args.store, directory, name)
    try:
        async with Runtime(
            registry, store=store, dispatch=Counter(), shards=args.shards, **options
        ) as runtime:
            await joined(runtime, args.instances)
            LOOKUPS[0] = 0
            started = time.perf_counter()
            await runtime.run(stream(event(i % args.instances) for i in range(args.events)))
            await runtime.drain()
            seconds = time.perf_counter() - started
            states = await store.list_instances()
            batches = runtime.statistics().batches_committed
    finally:
        await drop(store)
    want = {f"m{i:06}": 0 for i in range(args.instances)}
    for i in range(args.events):
        want[f"m{i % args.instances:06}"] += 1
    got = {r.key: json.loads(r.state)["pings"] for r in states}
    problems = [] if got == want else [f"{name}: the instances did not get their events"]
    return {
        "events": args.events,
        "seconds": seconds,
        "events_per_s": args.events / seconds,
        "store_lookups": LOOKUPS[0],
        "batches": batches,
        "problems": problems,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement `args.rounds` times, alternated; the medians."""
    runs: dict[str, list[dict[str, Any]]] = {
        "fan_out": [],
        "by_key": [],
        "via": [],
        "via_nocache": [],
    }
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DATA_DIR")) as directory:
            runs["fan_out"].append(await fan_out(args, directory))
            runs["by_key"].append(await routing(args, directory, "key", lambda i: Ping(f"m{i:06}")))
            runs["via"].append(await routing(args, directory, "via", lambda i: Poke(f"a{i:06}")))
            runs["via_nocache"].append(
                await routing(
                    args, directory, "via_nocache", lambda i: Poke(f"a{i:06}"), cache_size=0
                )
            )
    return {name: _median(rows) for name, rows in runs.items()}


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time, with every run's problems."""
    middle = sorted(rows, key=lambda row: row["seconds"])[len(rows) // 2]
    return {**middle, "problems": [p for row in rows for p in row["problems"]]}


def report(args: argparse.Namespace, result: dict[str, Any]) -> bool:
    fan, by_key, via, uncached = (result[k] for k in ("fan_out", "by_key", "via", "via_nocache"))
    print(
        f"store={args.store} backend={args.backend} shards={args.shards}, "
        f"medians of {args.rounds} alternated rounds"
    )
    print(
        f"  fan-out to {fan['instances']:,} instances: {fan['seconds']:.3f} s, "
        f"{fan['instances'] / fan['seconds']:,.0f} instances/s"
    )
    print(f"  routing {args.events:,} events over {args.instances:,} instances:")
    for label, row in (
        ("by key", by_key),
        ("by association (cached)", via),
        ("by association (cache_size=0)", uncached),
    ):
        ratio = row["events_per_s"] / by_key["events_per_s"]
        print(
            f"    {label:30} {row['events_per_s']:>10,.0f} events/s  {ratio:5.2f} x by key"
            f"  ({row['store_lookups']} store lookups, {row['batches']} batches)"
        )
    problems = [p for row in result.values() for p in row["problems"]]
    for problem in problems:
        print("PROBLEM:", problem)
    line = {
        "store": args.store,
        "backend": args.backend,
        "fanout_instances": fan["instances"],
        "fanout_seconds": round(fan["seconds"], 4),
        "fanout_instances_per_s": round(fan["instances"] / fan["seconds"], 1),
        **{
            f"{name}_events_per_s": round(result[name]["events_per_s"], 1)
            for name in ("by_key", "via", "via_nocache")
        },
        "ok": not problems,
    }
    print(json.dumps(line), flush=True)
    return not problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--store", choices=("memory", "sqlite", "postgres", "all"), default="all")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    p.add_argument("--fanout", type=int, default=10_000, help="instances one event reaches")
    p.add_argument("--instances", type=int, default=2_000, help="instances the routing run uses")
    p.add_argument("--events", type=int, default=20_000, help="events of the routing run")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stores = ["memory", "sqlite"] if args.store == "all" else [args.store]
    if args.store == "all" and os.environ.get("SAGAFLOW_PG_DSN"):
        stores.append("postgres")
    ok = True
    for kind in stores:
        args.store = kind
        ok = report(args, anyio.run(measure, args, backend=args.backend)) and ok
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
