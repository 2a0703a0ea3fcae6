"""The orders workload written by hand, in memory, with no framework: sagaflow's baseline.

This is the program a user could write instead of using sagaflow, when nothing has to
survive a restart: what sagaflow's memory store is compared with (`compare.py`).

- the instances' states live in a dict keyed by order id (a small class with slots);
- a table maps each event type to its handler (a coroutine method), which changes the
  state and hands the commands to an async dispatcher that records them;
- the 30-minute timeout of each order waits in a dict of order id -> (due, command);
  completing the order removes it. A timer task would send due commands; every
  timeout is 30 minutes, so the dict's first entry is always the next one due, and none
  falls due during the run.

Feeds (`--feed`): `direct` pulls events from the workload's generator in the handling
task; `stream` hands them over from a producer task through an anyio memory object
stream (what compare.py runs, as sagaflow's `run(source)` also reads from another task).

    python benchmarks/baseline_memory.py --feed stream --n 20000 --w 1000
    python benchmarks/baseline_memory.py --backend trio --discard

Prints one JSON line with the fields of `bench_orders.py` after checking that the
dispatcher received exactly the expected commands, per order and in order, and that no
state and no timeout is left.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import _workload as wl
import anyio
from _measure import GcCounter, LoopBlock, Recorder


class Order:
    """One order's saga state."""

    __slots__ = ("amount", "status")

    def __init__(self, status: str, amount: int) -> None:
        self.status = status
        self.amount = amount


class Orders:
    """Every order saga of the run."""

    def __init__(self, dispatcher: Recorder) -> None:
        self.orders: dict[str, Order] = {}
        self.timeouts: dict[str, tuple[float, Any]] = {}
        self.send = dispatcher.send
        self.fired = 0
        self.handlers = {
            wl.OrderPlaced: self.placed,
            wl.StockReserved: self.reserved,
            wl.PaymentCaptured: self.captured,
            wl.PaymentFailed: self.failed,
            wl.OrderShipped: self.shipped,
        }

    async def placed(self, event: wl.OrderPlaced) -> None:
        key = event.order_id
        self.orders[key] = Order("placed", event.amount)
        await self.send(wl.ReserveStock(key, event.amount))
        due = time.monotonic() + wl.TIMEOUT_SECONDS
        self.timeouts[key] = (due, wl.CancelOrder(key, wl.TIMEOUT_REASON))

    async def reserved(self, event: wl.StockReserved) -> None:
        order = self.orders[event.order_id]
        order.status = "reserved"
        await self.send(wl.CapturePayment(event.order_id, order.amount))

    async def captured(self, event: wl.PaymentCaptured) -> None:
        self.orders[event.order_id].status = "paid"
        await self.send(wl.ShipOrder(event.order_id))

    async def failed(self, event: wl.PaymentFailed) -> None:
        key = event.order_id
        await self.send(wl.ReleaseStock(key))
        await self.send(wl.CancelOrder(key, event.reason))
        self.complete(key)

    async def shipped(self, event: wl.OrderShipped) -> None:
        self.complete(event.order_id)

    def complete(self, key: str) -> None:
        del self.orders[key]
        self.timeouts.pop(key, None)

    async def timer(self) -> None:
        """Send timeouts as they fall due (the first entry is always the next one)."""
        while True:
            if not self.timeouts:
                await anyio.sleep(1.0)
                continue
            key = next(iter(self.timeouts))
            due, command = self.timeouts[key]
            wait = due - time.monotonic()
            if wait > 0:
                await anyio.sleep(min(wait, 1.0))
                continue
            del self.timeouts[key]
            self.fired += 1
            await self.send(command)


async def feed_direct(orders: Orders, n: int, w: int, buffer: int) -> int:
    handlers = orders.handlers
    handled = 0
    for event in wl.stream(n, w):
        await handlers[event.__class__](event)
        handled += 1
    return handled


async def feed_stream(orders: Orders, n: int, w: int, buffer: int) -> int:
    sender, receiver = anyio.create_memory_object_stream[Any](buffer)
    handlers = orders.handlers
    handled = 0

    async def produce() -> None:
        async with sender:
            for event in wl.stream(n, w):
                await sender.send(event)

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        async with receiver:
            async for event in receiver:
                await handlers[event.__class__](event)
                handled += 1
    return handled


FEEDS = {"direct": feed_direct, "stream": feed_stream}


async def main(args: argparse.Namespace) -> None:
    n, w = args.n, args.w
    recorder = Recorder(args.discard)
    orders = Orders(recorder)
    gc_counter, loop = GcCounter(), LoopBlock()
    async with anyio.create_task_group() as tg:
        tg.start_soon(orders.timer)
        tg.start_soon(loop.tick)
        if args.gc == "off":
            gc.disable()
        rss_start = wl.peak_rss_mib()
        gc_counter.start()
        loop.start()
        t0, cpu0 = time.perf_counter(), time.process_time()
        handled = await FEEDS[args.feed](orders, n, w, args.buffer)
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0
        gc_figures = gc_counter.stop(handled)
        loop_figures = loop.stop()
        peak = wl.peak_rss_mib()
        tg.cancel_scope.cancel()
    gc.enable()
    problems = wl.check_commands(n, recorder)
    if handled != wl.total_events(n):
        problems.append(f"handled {handled} events, expected {wl.total_events(n)}")
    if orders.orders:
        problems.append(f"{len(orders.orders)} order states remain")
    if orders.timeouts:
        problems.append(f"{len(orders.timeouts)} timeouts pending")
    if orders.fired:
        problems.append(f"{orders.fired} timeouts fired during the run")
    wl.report(
        system="baseline_memory",
        mode="memory",
        n=n,
        w=w,
        events=handled,
        seconds=seconds,
        peak_rss=peak,
        ok=not problems,
        problems=problems,
        backend=args.backend,
        feed=args.feed,
        commands=recorder.count if args.discard else len(recorder.sent),
        gc=args.gc,
        rss_start_mib=round(rss_start, 1),
        cpu_seconds=round(cpu_seconds, 4),
        **gc_figures,
        **loop_figures,
    )
    if problems:
        raise SystemExit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--w", type=int, default=1_000)
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    p.add_argument("--feed", choices=tuple(FEEDS), default="direct")
    p.add_argument("--buffer", type=int, default=1024, help="the stream feed's buffer")
    p.add_argument("--gc", choices=("on", "off"), default="on", help="off: gc.disable()")
    p.add_argument("--discard", action="store_true", help="count commands, don't keep them")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    anyio.run(main, a, backend=a.backend)
