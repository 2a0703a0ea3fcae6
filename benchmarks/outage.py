"""A downstream outage: commands pile up while the dispatcher fails, then drain.

    python benchmarks/outage.py                          # 1,000,000 commands, SQLite
    python benchmarks/outage.py --commands 100000 --capacity 1024

Phase 1 feeds `--commands` events through `Runtime.run` (one saga instance and one
command each) while every dispatch fails: the commands pile up in the store, the outbox
holds at most `--capacity` of them. Phase 2 brings the downstream back and waits until
the outbox is empty. Prints the peak RSS after each phase (the process's high-water
mark: phase 1 includes the events' handling), the time each phase took and the drain
rate, then one JSON line. Every command must be delivered; the run fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs

from sagaflow import DispatchMeta, Registry, RetryPolicy, Runtime, Send, correlate, on
from sagaflow.stores import SQLiteStore


@attrs.frozen
class OrderPlaced:
    order_id: str


@attrs.frozen
class ChargeCard:
    order_id: str


@attrs.define
class Order:
    charged: bool = False


registry = Registry(allow=("__main__", "outage"))


@registry.saga(state=Order)
class Checkout:
    @correlate
    def order(self, event: OrderPlaced) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, state: Order, event: OrderPlaced) -> Any:
        return Send(ChargeCard(event.order_id))


class Downstream:
    """Fails every call while `down`; counts the calls that succeed."""

    def __init__(self) -> None:
        self.down = True
        self.delivered = 0
        self.refused = 0

    async def __call__(self, command: ChargeCard, meta: DispatchMeta) -> None:
        if self.down:
            self.refused += 1
            raise ConnectionError("the payment service is down")
        self.delivered += 1


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def orders(n: int) -> AsyncIterator[OrderPlaced]:
    for i in range(n):
        yield OrderPlaced(f"o{i:08}")


async def outbox_empty(store: SQLiteStore) -> bool:
    return not await store.scan_outbox(limit=1)


async def main(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    downstream = Downstream()
    store = SQLiteStore(path, power_safe=False)
    retry = RetryPolicy(max_attempts=1_000_000, initial_delay=0.05, max_delay=0.5)
    async with Runtime(
        registry,
        store=store,
        dispatch=downstream,
        retry=retry,
        outbox_capacity=args.capacity,
        shards=1,
        dispatch_timeout=None,
        handler_timeout=None,
    ) as runtime:
        started = time.perf_counter()
        await runtime.run(orders(args.commands))
        await runtime.drain()
        fed = time.perf_counter() - started
        held = runtime.statistics().outbox_depth
        outage_rss = peak_rss_mib()
        print(
            f"outage: {args.commands:,} commands piled up in {fed:.1f} s, "
            f"{held:,} held in memory (capacity {args.capacity:,}), "
            f"peak RSS {outage_rss:.0f} MiB, {downstream.refused:,} refused attempts",
            flush=True,
        )

        downstream.down = False
        started = time.perf_counter()
        while not await outbox_empty(store):
            await runtime.drain()
            await anyio.sleep(0.05)  # a retry backoff may still be running out
        drained = time.perf_counter() - started
        drain_rss = peak_rss_mib()
        print(
            f"back up: drained in {drained:.1f} s ({args.commands / drained:,.0f} commands/s), "
            f"peak RSS {drain_rss:.0f} MiB",
            flush=True,
        )
    ok = downstream.delivered >= args.commands
    return {
        "ok": ok,
        "commands": args.commands,
        "delivered": downstream.delivered,
        "capacity": args.capacity,
        "outage_seconds": round(fed, 2),
        "outage_peak_rss_mib": round(outage_rss),
        "drain_seconds": round(drained, 2),
        "drain_commands_per_second": round(args.commands / drained),
        "peak_rss_mib": round(drain_rss),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--commands", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=4096, help="Runtime(outbox_capacity=)")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    # Every refused attempt is logged at WARNING: a million lines tell nothing here.
    logging.getLogger("sagaflow.outbox").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="sagaflow-outage-") as tmp:
        result = anyio.run(main, args, Path(tmp) / "outage.db", backend=args.backend)
    print(json.dumps(result))
    if not result["ok"]:
        sys.exit(f"only {result['delivered']:,} of {result['commands']:,} commands delivered")


if __name__ == "__main__":
    cli()
