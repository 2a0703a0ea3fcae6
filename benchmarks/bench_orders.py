"""The "orders" workload (`_workload.py`) through sagaflow's public API.

Prints one JSON line with the same fields as the hand-written limit programs
(`events_per_s`, `peak_rss_mib`, `ok`, ...), after checking that the dispatcher
received exactly the expected commands and that no state or schedule is left.

    python benchmarks/bench_orders.py --store memory --n 20000 --w 1000
    python benchmarks/bench_orders.py --store sqlite --backend trio
    python benchmarks/bench_orders.py --ack      # run(source, ack=...): acknowledged

The workload module is `_workload.py` next to this file; $SAGAFLOW_BENCH_DIR (or
../shared/bench next to the repository), when it holds one, takes precedence.

Besides events/s, the output carries figures that drift less than wall time on a busy
machine (how they are measured: `_measure.py`'s docstring):

- `gc_tracked_allocs_per_event`: net GC-tracked allocations per event, counted as
  CPython counts them to start young collections (the count `gc.get_count()[0]` read
  by a `gc.callback` as each collection starts, summed, plus the count at the end,
  minus the count at the start);
- `gc_collections`: the collections of each generation during the run;
- `loop_block_max_ms`: the longest time the event loop was held, seen by a task that
  sleeps 1 ms in a loop (asyncio and trio alike).

The run uses the interpreter's default GC settings. Two process-wide tunings an
application may choose are opt-in, and reported in the output:

    python benchmarks/bench_orders.py --gc-threshold 10000   # gc.set_threshold(10000, ...)
    python benchmarks/bench_orders.py --gc-freeze            # gc.freeze() after the setup

For instructions per event (callgrind), see `instructions.py`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs

HERE = Path(__file__).resolve().parent
BENCH_DIR = Path(os.environ.get("SAGAFLOW_BENCH_DIR", HERE.parent.parent / "shared" / "bench"))
sys.path.insert(0, str(BENCH_DIR))

import _workload as wl  # noqa: E402
from _measure import GcCounter, LoopBlock  # noqa: E402

from sagaflow import (  # noqa: E402
    Compensate,
    Complete,
    Consumed,
    DispatchMeta,
    Registry,
    Runtime,
    Schedule,
    Send,
    correlate,
    on,
)
from sagaflow.stores import MemoryStore, SQLiteStore, Store  # noqa: E402


@attrs.define
class OrderState:
    status: str = "new"
    amount: int = 0


registry = Registry(allow=["_workload"])


@registry.saga(state=OrderState, name="orders")
class OrderSaga:
    @correlate
    def order_id(self, event: Any) -> str:
        return str(event.order_id)

    @on(wl.OrderPlaced, start=True)
    def placed(self, st: OrderState, e: wl.OrderPlaced) -> list[Any]:
        st.status, st.amount = "placed", e.amount
        return [
            Send(wl.ReserveStock(e.order_id, e.amount)),
            Schedule(
                wl.CancelOrder(e.order_id, wl.TIMEOUT_REASON),
                after=timedelta(seconds=wl.TIMEOUT_SECONDS),
                name="timeout",
            ),
        ]

    @on(wl.StockReserved)
    def reserved(self, st: OrderState, e: wl.StockReserved) -> Send[Any]:
        st.status = "reserved"
        return Send(wl.CapturePayment(e.order_id, st.amount))

    @on(wl.PaymentCaptured)
    def captured(self, st: OrderState, e: wl.PaymentCaptured) -> Send[Any]:
        st.status = "paid"
        return Send(wl.ShipOrder(e.order_id))

    @on(wl.PaymentFailed)
    def payment_failed(self, st: OrderState, e: wl.PaymentFailed) -> list[Any]:
        return [
            Compensate([wl.ReleaseStock(e.order_id), wl.CancelOrder(e.order_id, e.reason)]),
            Complete(),
        ]

    @on(wl.OrderShipped)
    def shipped(self, st: OrderState, e: wl.OrderShipped) -> Complete:
        return Complete()


class Recorder:
    """Records every command (or only counts them with --discard)."""

    def __init__(self, discard: bool) -> None:
        self.sent: list[Any] = []
        self.count = 0
        self.discard = discard
        if discard:
            del self.sent

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        if self.discard:
            self.count += 1
        else:
            self.sent.append(command)


class Acks:
    """An `ack` for `run`: counts the events acknowledged and the calls."""

    def __init__(self) -> None:
        self.count = 0
        self.calls = 0

    async def __call__(self, consumed: list[Consumed]) -> None:
        self.calls += 1
        self.count += len(consumed)


async def events(n: int, w: int) -> AsyncIterator[Any]:
    for event in wl.stream(n, w):
        yield event


def make_store(kind: str, tmp: str, sync: str) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(Path(tmp) / "bench.db", power_safe=sync == "full")
    if kind == "postgres":
        from sagaflow.stores import PostgresStore  # type: ignore[attr-defined]

        return PostgresStore(os.environ["SAGAFLOW_PG_DSN"])  # type: ignore[no-any-return]
    raise SystemExit(f"unknown store {kind!r}")


def _given(**options: int | None) -> dict[str, int]:
    """The options given on the command line; the others keep the Runtime's defaults."""
    return {name: value for name, value in options.items() if value is not None}


async def main(args: argparse.Namespace) -> None:
    n, w = args.n, args.w
    recorder = Recorder(args.discard)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DATA_DIR")) as tmp:
        store = make_store(args.store, tmp, args.sync)
        runtime = Runtime(
            registry,
            store=store,
            dispatch=recorder,
            **_given(
                shards=args.shards,
                max_batch=args.max_batch,
                queue_size=args.queue_size,
                cache_size=args.cache,
            ),
        )
        gc_counter, loop = GcCounter(), LoopBlock()
        async with runtime:
            if args.gc == "off":
                gc.disable()
            if args.gc_freeze:
                gc.freeze()
            rss_start = wl.peak_rss_mib()
            acks = Acks() if args.ack else None
            async with anyio.create_task_group() as tg:
                tg.start_soon(loop.tick)
                gc_counter.start()
                loop.start()
                t0, cpu0 = time.perf_counter(), time.process_time()
                count = await runtime.run(events(n, w), ack=acks)
                await runtime.drain()
                seconds = time.perf_counter() - t0
                cpu_seconds = time.process_time() - cpu0
                gc_figures = gc_counter.stop(count)
                loop_figures = loop.stop()
                tg.cancel_scope.cancel()
            peak = wl.peak_rss_mib()
            stats = runtime.statistics()
            left = await store.list_instances(limit=5)
            schedules = await store.list_schedules()
            outbox = await store.list_outbox()
    problems = wl.check_commands(n, recorder)
    if count != wl.total_events(n):
        problems.append(f"consumed {count} events, expected {wl.total_events(n)}")
    if acks is not None and acks.count != count:
        problems.append(f"acknowledged {acks.count} events of {count}")
    if stats.events_handled != wl.total_events(n):
        problems.append(f"handled {stats.events_handled} events")
    if left:
        problems.append(f"instance states remain, e.g. {left[0]}")
    if schedules:
        problems.append(f"{len(schedules)} schedules pending")
    if outbox:
        problems.append(f"{len(outbox)} outbox rows pending")
    wl.report(
        system="sagaflow",
        mode=args.store,
        n=n,
        w=w,
        events=count,
        seconds=seconds,
        peak_rss=peak,
        ok=not problems,
        problems=problems,
        backend=args.backend,
        feed="Runtime.run(async generator" + (", ack=...)" if args.ack else ")"),
        ack_calls=None if acks is None else acks.calls,
        commands=recorder.count if args.discard else len(recorder.sent),
        batches=stats.batches_committed,
        shards=args.shards,
        gc=args.gc,
        synchronous=args.sync if args.store == "sqlite" else None,
        rss_start_mib=round(rss_start, 1),
        cpu_seconds=round(cpu_seconds, 4),
        gc_freeze=args.gc_freeze,
        **gc_figures,
        **loop_figures,
    )
    if problems:
        raise SystemExit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--store", choices=("memory", "sqlite", "postgres"), default="memory")
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--w", type=int, default=1_000)
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    # Runtime options: the Runtime's defaults unless given.
    p.add_argument("--shards", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--queue-size", type=int, default=None, help="a shard's mailbox size")
    p.add_argument(
        "--cache", type=int, default=None, help="state cache size (default: the Runtime's)"
    )
    p.add_argument("--gc", choices=("on", "off"), default="on")
    p.add_argument(
        "--gc-threshold",
        type=int,
        default=None,
        help="opt-in: the young generation's GC threshold (gc.set_threshold), process-wide",
    )
    p.add_argument("--gc-freeze", action="store_true", help="opt-in: gc.freeze() after the setup")
    p.add_argument(
        "--sync",
        choices=("normal", "full"),
        default="normal",
        help="SQLite: normal = SQLiteStore(power_safe=False), as limit_sqlite's default",
    )
    p.add_argument("--discard", action="store_true", help="count commands, don't keep them")
    p.add_argument("--ack", action="store_true", help="run(source, ack=...): acknowledge events")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    if a.gc_threshold is not None:
        gc.set_threshold(a.gc_threshold, *gc.get_threshold()[1:])
    anyio.run(main, a, backend=a.backend)
