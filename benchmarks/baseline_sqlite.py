"""The orders workload written by hand, durable in SQLite, with no framework: sagaflow's baseline.

This is the program a user could write instead of using sagaflow's SQLite store: every
event's effects are in a SQLite file (WAL mode) before its commands go out, with a
transactional outbox. What `compare.py` sets against `sagaflow sqlite`.

- Table `states(order_id PRIMARY KEY, data)`: each order's state as JSON (a cattrs
  converter, as sagaflow and the shared limit use), written when it changes, deleted when
  the order completes.
- Table `outbox(id PRIMARY KEY, order_id, due, type, data)`: every command as JSON, with
  the time it is due: now for the sends, in 30 minutes for the timeout. A sent command's
  row is deleted in the next transaction (the last ones get a transaction of their own);
  the timeout's row is deleted when its order completes.
- Group commit: the events are handled in batches of `--batch` (256 by default; 1 for a
  transaction per event). A batch's effects are written in one transaction, one row per
  order however often the batch changed it, and only once it has committed are the
  batch's commands dispatched.
- This process is the only writer, so it keeps the states and the timeouts' row ids in
  dicts as well and never reads them back (the database is the copy a restart would
  recover from; no restart happens in the run).
- sqlite3 runs in a worker thread (`anyio.to_thread.run_sync`, one hop per
  transaction), so the event loop, asyncio or trio, never waits on the disk; `--inline`
  runs it on the loop's thread instead.

    python benchmarks/baseline_sqlite.py --batch 256 --sync normal --n 20000 --w 1000

Prints one JSON line with the fields of `bench_orders.py` after checking the commands
the dispatcher received (exactly the expected ones, per order and in order) and that the
database holds no state and no outbox row at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import _workload as wl
import anyio
import anyio.to_thread
import attrs
from _measure import GcCounter, LoopBlock, Recorder
from cattrs.preconf.json import make_converter

CREATE = (
    "CREATE TABLE states (order_id TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE outbox (id INTEGER PRIMARY KEY, order_id TEXT NOT NULL,"
    " due REAL NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL)",
)
WRITE_STATE = (
    "INSERT INTO states (order_id, data) VALUES (?, ?)"
    " ON CONFLICT (order_id) DO UPDATE SET data = excluded.data"
)
DELETE_STATE = "DELETE FROM states WHERE order_id = ?"
ADD_COMMAND = "INSERT INTO outbox (id, order_id, due, type, data) VALUES (?, ?, ?, ?, ?)"
REMOVE_COMMAND = "DELETE FROM outbox WHERE id = ?"

to_json = make_converter().dumps


@attrs.define
class Order:
    """One order's saga state (attrs, so that the converter can encode it)."""

    status: str
    amount: int


class Transaction:
    """The writes of one batch, ready for `write`."""

    __slots__ = ("commands_added", "commands_removed", "states_deleted", "states_written")

    def __init__(self) -> None:
        self.states_written: list[tuple[str, str]] = []
        self.states_deleted: list[tuple[str]] = []
        self.commands_added: list[tuple[int, str, float, str, str]] = []
        self.commands_removed: list[tuple[int]] = []


def write(db: sqlite3.Connection, txn: Transaction) -> None:
    """Make one batch durable (in the worker thread, or inline)."""
    db.execute("BEGIN")
    try:
        if txn.states_written:
            db.executemany(WRITE_STATE, txn.states_written)
        if txn.states_deleted:
            db.executemany(DELETE_STATE, txn.states_deleted)
        if txn.commands_added:
            db.executemany(ADD_COMMAND, txn.commands_added)
        if txn.commands_removed:
            db.executemany(REMOVE_COMMAND, txn.commands_removed)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class Orders:
    """Every order saga of the run; handlers only stage their effects for the batch."""

    def __init__(self) -> None:
        self.orders: dict[str, Order] = {}
        self.timeouts: dict[str, int] = {}  # order id -> the timeout's outbox row id
        self.last_id = 0
        self.changed: dict[str, Order | None] = {}  # None: completed
        self.txn = Transaction()
        self.outgoing: list[tuple[int, Any]] = []  # (row id, command) after the commit
        self.handlers = {
            wl.OrderPlaced: self.placed,
            wl.StockReserved: self.reserved,
            wl.PaymentCaptured: self.captured,
            wl.PaymentFailed: self.failed,
            wl.OrderShipped: self.shipped,
        }

    def add(self, command: Any, due: float) -> int:
        self.last_id = row = self.last_id + 1
        self.txn.commands_added.append(
            (row, command.order_id, due, command.__class__.__name__, to_json(command))
        )
        return row

    def send(self, command: Any, now: float) -> None:
        self.outgoing.append((self.add(command, now), command))

    def placed(self, event: wl.OrderPlaced) -> None:
        key, now = event.order_id, time.time()
        self.orders[key] = self.changed[key] = Order("placed", event.amount)
        self.send(wl.ReserveStock(key, event.amount), now)
        timeout = wl.CancelOrder(key, wl.TIMEOUT_REASON)
        self.timeouts[key] = self.add(timeout, now + wl.TIMEOUT_SECONDS)

    def reserved(self, event: wl.StockReserved) -> None:
        key = event.order_id
        order = self.changed[key] = self.orders[key]
        order.status = "reserved"
        self.send(wl.CapturePayment(key, order.amount), time.time())

    def captured(self, event: wl.PaymentCaptured) -> None:
        key = event.order_id
        order = self.changed[key] = self.orders[key]
        order.status = "paid"
        self.send(wl.ShipOrder(key), time.time())

    def failed(self, event: wl.PaymentFailed) -> None:
        key, now = event.order_id, time.time()
        self.send(wl.ReleaseStock(key), now)
        self.send(wl.CancelOrder(key, event.reason), now)
        self.complete(key)

    def shipped(self, event: wl.OrderShipped) -> None:
        self.complete(event.order_id)

    def complete(self, key: str) -> None:
        del self.orders[key]
        self.changed[key] = None
        row = self.timeouts.pop(key, None)
        if row is not None:
            self.txn.commands_removed.append((row,))

    def take(self) -> tuple[Transaction, list[tuple[int, Any]]]:
        """The staged batch as a transaction, and the commands to send once it committed."""
        txn, outgoing = self.txn, self.outgoing
        for key, order in self.changed.items():
            if order is None:
                txn.states_deleted.append((key,))
            else:
                txn.states_written.append((key, to_json(order)))
        self.changed, self.txn, self.outgoing = {}, Transaction(), []
        return txn, outgoing


async def handle_all(
    args: argparse.Namespace, orders: Orders, recorder: Recorder, commit: Any
) -> int:
    """Handle the stream in batches: commit each, then send its commands."""
    handlers = orders.handlers
    send = recorder.send
    handled = staged = 0

    async def flush() -> None:
        txn, outgoing = orders.take()
        await commit(txn)
        removed = orders.txn.commands_removed  # sent commands leave with the next batch
        for row, command in outgoing:
            await send(command)
            removed.append((row,))

    for event in wl.stream(args.n, args.w):
        handlers[event.__class__](event)
        handled += 1
        staged += 1
        if staged == args.batch:
            await flush()
            staged = 0
    if staged:
        await flush()
    txn, _ = orders.take()  # the last sent commands' rows (nothing new to send)
    await commit(txn)
    return handled


def leftovers(db: sqlite3.Connection) -> list[str]:
    problems = []
    for table in ("states", "outbox"):
        (rows,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
        if rows:
            problems.append(f"{rows} rows remain in {table}")
    return problems


async def main(args: argparse.Namespace) -> None:
    recorder = Recorder(args.discard)
    orders = Orders()
    transactions = 0
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DATA_DIR")) as tmp:
        path = Path(tmp) / "baseline.db"
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={args.sync.upper()}")
        for statement in CREATE:
            db.execute(statement)

        if args.inline:

            async def commit(txn: Transaction) -> None:
                nonlocal transactions
                write(db, txn)
                transactions += 1

        else:
            in_thread = anyio.to_thread.run_sync

            async def commit(txn: Transaction) -> None:
                nonlocal transactions
                await in_thread(write, db, txn)
                transactions += 1

        gc_counter, loop = GcCounter(), LoopBlock()
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.tick)
            if args.gc == "off":
                gc.disable()
            rss_start = wl.peak_rss_mib()
            gc_counter.start()
            loop.start()
            t0, cpu0 = time.perf_counter(), time.process_time()
            handled = await handle_all(args, orders, recorder, commit)
            seconds = time.perf_counter() - t0
            cpu_seconds = time.process_time() - cpu0
            gc_figures = gc_counter.stop(handled)
            loop_figures = loop.stop()
            peak = wl.peak_rss_mib()
            tg.cancel_scope.cancel()
        gc.enable()
        problems = wl.check_commands(args.n, recorder)
        if handled != wl.total_events(args.n):
            problems.append(f"handled {handled} events, expected {wl.total_events(args.n)}")
        if orders.orders or orders.timeouts:
            problems.append(f"{len(orders.orders)} states, {len(orders.timeouts)} timeouts left")
        problems += leftovers(db)
        db.close()
    wl.report(
        system="baseline_sqlite",
        mode="sqlite",
        n=args.n,
        w=args.w,
        events=handled,
        seconds=seconds,
        peak_rss=peak,
        ok=not problems,
        problems=problems,
        backend=args.backend,
        feed="generator, batches of " + str(args.batch),
        commands=recorder.count if args.discard else len(recorder.sent),
        batches=transactions,
        gc=args.gc,
        synchronous=args.sync,
        thread="inline" if args.inline else "anyio.to_thread",
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
    p.add_argument("--batch", type=int, default=256, help="events per transaction")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    p.add_argument(
        "--sync", choices=("normal", "full"), default="normal", help="PRAGMA synchronous"
    )
    p.add_argument("--inline", action="store_true", help="sqlite3 on the event loop's thread")
    p.add_argument("--gc", choices=("on", "off"), default="on", help="off: gc.disable()")
    p.add_argument("--discard", action="store_true", help="count commands, don't keep them")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    anyio.run(main, a, backend=a.backend)
