"""A consuming runtime between two Redis streams; `test_redis_crash.py` SIGKILLs it.

    SAGAFLOW_REDIS_URL=... python tests/redis_worker.py --prefix P --db PATH
        [--schema S --cluster] [--consumer NAME] [--backend asyncio|trio]

It reads the stream `P:in` through the consumer group `sagas` (`RedisStreamSource`,
acknowledging after commit), runs `CounterSaga` on SQLite (`--db`) or on PostgreSQL
(`--schema`, with `SAGAFLOW_PG_DSN`; `--cluster` for `Runtime(cluster=True)`), and
appends its commands to `P:out` (`RedisStreamDispatcher`). It prints `STARTED` once it
consumes, and `DONE` with a JSON summary once the producer is done (the key `P:done`
holds the id of the last entry it wrote), the group has read up to that entry, nothing
is pending in the group and the store's outbox is empty.

Every event `Bump(key, seq)` (written with the id `"{key}:{seq}"`) increments the
instance's counter `n` and sends `Bumped(key, seq, n)`: an event applied twice shows as a
repeated `n` or a second command id for one `(key, seq)`, a lost one as a gap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import anyio
import attrs
import redis

from sagaflow import Registry, RetryPolicy, Runtime, Send, correlate, on
from sagaflow.exceptions import ConflictError
from sagaflow.redis import RedisStreamDispatcher, RedisStreamSource
from sagaflow.stores import SQLiteStore, Store

GROUP = "sagas"


@attrs.frozen
class Bump:
    key: str
    seq: int


@attrs.frozen
class Bumped:
    key: str
    seq: int
    n: int


@attrs.define
class Counter:
    n: int = 0


registry = Registry()
registry.message(Bump, name="Bump")
registry.message(Bumped, name="Bumped")


@registry.saga(state=Counter)
class CounterSaga:
    @correlate
    def key(self, event: Bump) -> str:
        return event.key

    @on(Bump, start=True)
    async def bump(self, state: Counter, event: Bump) -> Send[Bumped]:
        state.n += 1
        await anyio.lowlevel.checkpoint()  # let other batches (and processes) race
        return Send(Bumped(event.key, event.seq, state.n))


def make_store(args: argparse.Namespace) -> Store:
    if args.schema:
        from sagaflow.stores import PostgresStore

        return PostgresStore(  # type: ignore[no-any-return]
            os.environ["SAGAFLOW_PG_DSN"], schema=args.schema, lease=2.0, poll_interval=0.2
        )
    return SQLiteStore(args.db)


async def finished(client: redis.Redis, store: Store, prefix: str) -> bool:
    def look() -> bool:
        done = client.get(f"{prefix}:done")
        if done is None:
            return False
        (group,) = [g for g in client.xinfo_groups(f"{prefix}:in") if g["name"] == GROUP.encode()]
        return bool(group["last-delivered-id"] == done and group["pending"] == 0)

    return await anyio.to_thread.run_sync(look) and not await store.list_outbox()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    client = redis.Redis.from_url(os.environ["SAGAFLOW_REDIS_URL"])
    store = make_store(args)
    dispatch = RedisStreamDispatcher(client, registry, stream=f"{args.prefix}:out")
    runtime = Runtime(
        registry,
        store=store,
        dispatch=dispatch,
        retry=RetryPolicy(max_attempts=5, initial_delay=0.01, max_delay=0.05),
        shards=4,
        max_batch=16,
        cluster=args.cluster,
    )
    source = RedisStreamSource(
        client,
        registry,
        stream=f"{args.prefix}:in",
        group=GROUP,
        consumer=args.consumer,
        count=32,
        block=0.1,
        claim_idle=args.claim_idle,
        max_deliveries=1000,  # every kill counts a delivery: none is poison here
    )

    async def watch() -> None:
        while not await finished(client, store, args.prefix):
            await anyio.sleep(0.1)
        while True:  # again, in case the source is being opened anew
            source.stop()
            await anyio.sleep(0.1)

    gave_up = 0
    async with runtime:
        print("STARTED", flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            while True:
                # A run that fails leaves its entries unacknowledged: opened again, the
                # source reads them again (they are ours), and dedup skips what was
                # committed.
                async with source:
                    try:
                        await runtime.run(
                            source, id=source.event_id, trace=source.trace, ack=source.ack
                        )
                        break
                    except ConflictError:
                        gave_up += 1  # hot keys: a batch lost too many races
            tg.cancel_scope.cancel()
        await runtime.drain()
        stats = runtime.statistics()
    client.close()
    return {
        "events_handled": stats.events_handled,
        "events_duplicate": stats.events_duplicate,
        "conflicts": stats.conflicts,
        "dead_letters": stats.dead_letters,
        "run_gave_up": gave_up,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--db", default=None)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--cluster", action="store_true")
    parser.add_argument("--consumer", default=None)
    parser.add_argument("--claim-idle", type=float, default=1.0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    summary = anyio.run(main, arguments, backend=arguments.backend)
    print("DONE", json.dumps(summary, sort_keys=True), flush=True)
