"""Events/s through Redis Streams end to end: stream in, saga, stream out.

    SAGAFLOW_REDIS_URL=redis://127.0.0.1:6379/0 python benchmarks/bench_redis.py
    python benchmarks/bench_redis.py --store postgres --processes 3     # SAGAFLOW_PG_DSN too

N `Deposited` events are written to the stream `P:in` first (not timed). Then the worker
processes (this file with `worker ...`), all in one consumer group, read them with
`RedisStreamSource` (acknowledging after commit), run the account saga and append one
`Notify` command per event to `P:out` with `RedisStreamDispatcher`. Timed: from the
moment the workers are told to go until every command is in `P:out` and no entry is
pending. Several processes need a store they can share: PostgreSQL with `cluster=True`.
Prints one JSON line (`events_per_s`, `ok`, ...) after checking every command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import attrs
import redis

from sagaflow import Registry, Runtime, Send, correlate, on
from sagaflow.redis import RedisStreamDispatcher, RedisStreamSource
from sagaflow.stores import MemoryStore, SQLiteStore, Store

GROUP = "bench"


@attrs.frozen
class Deposited:
    account: str
    amount: int


@attrs.frozen
class Notify:
    account: str
    total: int


@attrs.define
class Balance:
    total: int = 0


registry = Registry()
registry.message(Deposited, name="Deposited")
registry.message(Notify, name="Notify")


@registry.saga(state=Balance)
class AccountSaga:
    @correlate
    def account(self, event: Deposited) -> str:
        return event.account

    @on(Deposited, start=True)
    def deposited(self, state: Balance, event: Deposited) -> Send[Notify]:
        state.total += event.amount
        return Send(Notify(event.account, state.total))


def accounts(n: int) -> int:
    return max(1, n // 4)


# -- a worker process -----------------------------------------------------------------


def make_store(args: argparse.Namespace) -> Store:
    if args.store == "memory":
        return MemoryStore()
    if args.store == "sqlite":
        return SQLiteStore(Path(args.dir) / "bench.db")
    from sagaflow.stores import PostgresStore

    return PostgresStore(os.environ["SAGAFLOW_PG_DSN"], schema=args.schema)  # type: ignore[no-any-return]


async def worker(args: argparse.Namespace) -> None:
    client = redis.Redis.from_url(os.environ["SAGAFLOW_REDIS_URL"])
    runtime = Runtime(
        registry,
        store=make_store(args),
        dispatch=RedisStreamDispatcher(client, registry, stream=f"{args.prefix}:out"),
        cluster=args.store == "postgres",
    )
    source = RedisStreamSource(
        client, registry, stream=f"{args.prefix}:in", group=GROUP, count=512, block=0.2
    )

    async def stop_on_stdin() -> None:
        await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        source.stop()

    async with runtime, source:
        print("READY", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # GO
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_stdin)
            count = await runtime.run(
                source, id=source.event_id, trace=source.trace, ack=source.ack
            )
            tg.cancel_scope.cancel()
    client.close()
    print(json.dumps({"consumed": count}), flush=True)


# -- the parent -----------------------------------------------------------------------


def produce(client: redis.Redis, prefix: str, n: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        event = Deposited(f"a{i % accounts(n)}", 1)
        pipe.xadd(f"{prefix}:in", {"type": "Deposited", "data": json.dumps(attrs.asdict(event))})
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()
    client.xgroup_create(f"{prefix}:in", GROUP, id="0")


def check(client: redis.Redis, prefix: str, n: int) -> list[str]:
    """Every event's command, once per id, with the running totals 1..m per account."""
    problems = []
    ids: set[bytes] = set()
    totals: dict[str, list[int]] = {}
    for _, fields in client.xrange(f"{prefix}:out"):
        if fields[b"id"] in ids:
            continue  # a redelivery: at least once
        ids.add(fields[b"id"])
        data = json.loads(fields[b"data"])
        totals.setdefault(data["account"], []).append(data["total"])
    if len(ids) != n:
        problems.append(f"{len(ids)} distinct commands for {n} events")
    wrong = [a for a, ts in totals.items() if sorted(ts) != list(range(1, len(ts) + 1))]
    if wrong:
        problems.append(f"wrong running totals for {len(wrong)} accounts, e.g. {wrong[0]}")
    if client.xpending(f"{prefix}:in", GROUP)["pending"]:
        problems.append("entries left pending")
    return problems


def main(args: argparse.Namespace) -> None:
    url = os.environ.get("SAGAFLOW_REDIS_URL")
    if not url:
        raise SystemExit("set SAGAFLOW_REDIS_URL (e.g. `source .ci/redis.sh; redis_start`)")
    if args.processes > 1 and args.store != "postgres":
        raise SystemExit("several processes need a store they share: --store postgres")
    client = redis.Redis.from_url(url)
    prefix = f"sagaflow-bench-{uuid.uuid4().hex[:8]}"
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[str]] = []
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DATA_DIR")) as tmp:
            produce(client, prefix, args.n)
            command = [sys.executable, __file__, "worker", "--prefix", prefix, "--store"]
            command += [args.store, "--dir", tmp, "--schema", schema, "--backend", args.backend]
            for _ in range(args.processes):
                procs.append(
                    subprocess.Popen(
                        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                    )
                )
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "READY":
                    raise SystemExit("a worker did not start")
            started = time.perf_counter()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("GO\n")
                proc.stdin.flush()
            while (
                client.xlen(f"{prefix}:out") < args.n
                or client.xpending(f"{prefix}:in", GROUP)["pending"]
            ):
                time.sleep(0.005)
            seconds = time.perf_counter() - started
            outputs = [proc.communicate("STOP\n", timeout=120)[0] for proc in procs]
            if any(proc.returncode for proc in procs):
                raise SystemExit(f"a worker failed: {outputs}")
            problems = check(client, prefix, args.n)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        if args.store == "postgres":
            import psycopg

            with psycopg.connect(os.environ["SAGAFLOW_PG_DSN"], autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    line = {
        "system": "sagaflow",
        "mode": f"redis+{args.store}",
        "processes": args.processes,
        "backend": args.backend,
        "events": args.n,
        "seconds": round(seconds, 4),
        "events_per_s": round(args.n / seconds, 1),
        "ok": not problems,
    }
    print(json.dumps(line), flush=True)
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    if problems:
        raise SystemExit(1)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("role", nargs="?", choices=("bench", "worker"), default="bench")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--store", choices=("memory", "sqlite", "postgres"), default="sqlite")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.role == "worker":
        anyio.run(worker, arguments, backend=arguments.backend)
    else:
        main(arguments)
