"""Events/s on PostgreSQL with 1, 2 and 4 runtime processes in cluster mode, one server.

    SAGAFLOW_PG_DSN=postgresql://... python benchmarks/cluster.py      # 1, 2, 4 processes
    python benchmarks/cluster.py --processes 2 --n 300 --w 50          # a short run

The orders workload of `bench_orders.py` (the same saga), with `Runtime(cluster=True)` on
one `PostgresStore` schema shared by P processes. The orders are spread over the
processes by key, as a broker partitions a stream (a Kafka topic keyed by order id, say):
process k feeds the events of the orders i with i % P == k to its own
`run(source)`, in the workload's order. Commands are dispatched by whichever process
claims them from the shared outbox, as cluster mode does.

Timed: from the moment the processes are told to go (each has opened its store and
started its runtime) until the schema holds no instance, command, schedule or inbox row,
i.e. every event was handled and every command dispatched. Checked afterwards: the
commands of all processes together, ordered by the time each was dispatched (one clock,
one machine), are exactly the expected ones, per order and in order, none twice; and
the processes handled as many events as the workload has. Prints one JSON line per
run, then the medians of the rounds (`--rounds`, alternated) and their ratios to the
first process count.

On a machine with fewer cores than processes plus the server, the processes share the
cores with PostgreSQL and each other, so the figures show the cost of coordination
rather than what more machines would add.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs

HERE = Path(__file__).resolve().parent
TABLES = ("instances", "outbox", "schedules", "inbox")


# -- a worker process -----------------------------------------------------------------


async def worker(args: argparse.Namespace) -> None:
    import bench_orders as bench

    from sagaflow import DispatchMeta, Runtime
    from sagaflow.stores import PostgresStore

    wl = bench.wl
    sent: list[tuple[int, str, dict[str, Any]]] = []
    clock = time.monotonic_ns

    async def dispatch(command: Any, meta: DispatchMeta) -> None:
        sent.append((clock(), type(command).__name__, attrs.asdict(command)))

    async def mine() -> AsyncIterator[Any]:
        for event in wl.stream(args.n, args.w):
            if int(event.order_id[1:]) % args.parts == args.index:
                yield event

    store = PostgresStore(os.environ["SAGAFLOW_PG_DSN"], schema=args.schema)
    runtime = Runtime(bench.registry, store=store, dispatch=dispatch, cluster=True)
    async with runtime:
        print("READY", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # GO
        count = await runtime.run(mine())
        await runtime.drain()
        print("FED", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # STOP
    stats = runtime.statistics()
    Path(args.out).write_text(json.dumps(sent))
    summary = {
        "consumed": count,
        "handled": stats.events_handled,
        "dispatched": stats.commands_dispatched,
        "conflicts": stats.conflicts,
    }
    print(json.dumps(summary), flush=True)


# -- the parent -----------------------------------------------------------------------


def leftovers(conn: Any, schema: str) -> int:
    counts = [f'(SELECT count(*) FROM "{schema}".{table})' for table in TABLES]
    return int(conn.execute("SELECT " + " + ".join(counts)).fetchone()[0])


def measure(processes: int, args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    """One run with `processes` workers on a fresh schema; its JSON line's fields."""
    import psycopg

    sys.path.insert(0, str(HERE))
    import _workload as wl

    schema = f"bench_cluster_{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as tmp, psycopg.connect(dsn, autocommit=True) as conn:
        try:
            for k in range(processes):
                command = [sys.executable, __file__, "worker", "--schema", schema]
                command += ["--index", str(k), "--parts", str(processes)]
                command += ["--n", str(args.n), "--w", str(args.w), "--out", f"{tmp}/{k}.json"]
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
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "FED":
                    raise SystemExit("a worker failed while handling its events")
            while leftovers(conn, schema):
                time.sleep(0.01)
            seconds = time.perf_counter() - started
            outputs = [proc.communicate("STOP\n", timeout=120)[0] for proc in procs]
            if any(proc.returncode for proc in procs):
                raise SystemExit(f"a worker failed: {outputs}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        summaries = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
        sent = [
            item
            for k in range(processes)
            for item in json.loads(Path(f"{tmp}/{k}.json").read_text())
        ]
    sent.sort(key=lambda item: item[0])
    commands = [wl.COMMAND_BY_NAME[name](**fields) for _, name, fields in sent]
    problems = wl.verify_commands(args.n, commands)
    events = wl.total_events(args.n)
    handled = sum(s["handled"] for s in summaries)
    consumed = sum(s["consumed"] for s in summaries)
    if (consumed, handled) != (events, events):
        problems.append(f"consumed {consumed} and handled {handled} events of {events}")
    for problem in problems[:20]:
        print("PROBLEM:", problem, file=sys.stderr)
    return {
        "system": "sagaflow",
        "mode": "postgres cluster",
        "processes": processes,
        "n": args.n,
        "w": args.w,
        "events": events,
        "seconds": round(seconds, 4),
        "events_per_s": round(events / seconds, 1),
        "ok": not problems,
        "commands": len(commands),
        "handled_per_process": [s["handled"] for s in summaries],
        "dispatched_per_process": [s["dispatched"] for s in summaries],
        "conflicts": sum(s["conflicts"] for s in summaries),
        "cores": os.cpu_count(),
    }


def main(args: argparse.Namespace) -> None:
    dsn = os.environ.get("SAGAFLOW_PG_DSN")
    if not dsn:
        raise SystemExit("set SAGAFLOW_PG_DSN to a PostgreSQL database")
    rates: dict[int, list[float]] = {processes: [] for processes in args.processes}
    ok = True
    for _ in range(args.rounds):
        for processes in args.processes:
            result = measure(processes, args, dsn)
            print(json.dumps(result), flush=True)
            rates[processes].append(result["events_per_s"])
            ok = ok and result["ok"]
    median = {processes: statistics.median(values) for processes, values in rates.items()}
    base = median[args.processes[0]]
    print(f"medians of {args.rounds} alternated runs, N={args.n:,} W={args.w:,}")
    for processes, rate in median.items():
        print(f"{processes} process(es): {rate:>9,.0f} events/s, {rate / base:.2f}x")
    if not ok:
        raise SystemExit(1)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("role", nargs="?", choices=("bench", "worker"), default="bench")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds (medians)")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--w", type=int, default=1_000)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.role == "worker":
        anyio.run(worker, arguments)
    else:
        main(arguments)
