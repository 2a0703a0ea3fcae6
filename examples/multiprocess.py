"""Three runtime processes sharing one PostgreSQL database (`Runtime(cluster=True)`).

Run it: `python examples/multiprocess.py`, with `SAGAFLOW_PG_DSN` naming a database you
may create schemas in, or without it on a machine with PostgreSQL's server programs
(`initdb`, `pg_ctl`), from which it starts a throwaway server. Without either it says
so and exits (on CI, where `CI` is set, that is an error).

It starts three worker processes (this file with `worker ...`). Each runs the order
saga on the same schema and publishes a third of the orders; the shared inbox hands
every event to whichever worker gets there first, commands and due timeouts are
claimed the same way, and optimistic concurrency keeps an order's state right whatever
process touches it. The saga code is the same as for one process: only the store and
`cluster=True` differ. At the end the example checks, from the commands the workers
logged, that every order went through once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs

from sagaflow import (
    Compensate,
    Complete,
    DispatchMeta,
    Registry,
    Runtime,
    Schedule,
    Send,
    Unschedule,
    correlate,
    on,
)
from sagaflow.stores import PostgresStore

WORKERS = 3
ORDERS = 300

# -- the saga: the same code as in a single process --------------------------------------


@attrs.frozen
class OrderPlaced:
    order_id: str
    amount: int


@attrs.frozen
class PaymentCaptured:
    order_id: str


@attrs.frozen
class PaymentTimedOut:
    order_id: str


@attrs.frozen
class ReserveStock:
    order_id: str
    amount: int


@attrs.frozen
class ShipOrder:
    order_id: str


@attrs.frozen
class ReleaseStock:
    order_id: str


@attrs.frozen
class CancelOrder:
    order_id: str


@attrs.define
class Order:
    status: str = "new"
    amount: int = 0


registry = Registry()


@registry.saga(state=Order)
class OrderSaga:
    @correlate
    def order_id(self, event: OrderPlaced | PaymentCaptured | PaymentTimedOut) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, order: Order, event: OrderPlaced) -> list[Any]:
        order.status, order.amount = "placed", event.amount
        return [
            Send(ReserveStock(event.order_id, event.amount)),
            # Long enough that a paid order's payment, published right after, always
            # wins on a busy machine; the unpaid half waits for it before compensating.
            Schedule(PaymentTimedOut(event.order_id), after=2.0, name="payment", to_self=True),
        ]

    @on(PaymentCaptured)
    def captured(self, order: Order, event: PaymentCaptured) -> list[Any]:
        order.status = "paid"
        return [Unschedule("payment"), Send(ShipOrder(event.order_id)), Complete()]

    @on(PaymentTimedOut)
    def timed_out(self, order: Order, event: PaymentTimedOut) -> list[Any] | None:
        if order.status == "paid":
            return None
        return [Compensate([ReleaseStock(event.order_id), CancelOrder(event.order_id)]), Complete()]


# -- a worker process ---------------------------------------------------------------------


async def worker(args: argparse.Namespace) -> None:
    """Run the saga in cluster mode; publish this worker's orders; stop when all are done."""
    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def dispatch(command: Any, meta: DispatchMeta) -> None:
        # A real dispatcher sends to a broker with meta.id as the idempotency key.
        line = {"id": meta.id, "command": type(command).__name__, "worker": args.index}
        line["order"] = command.order_id
        os.write(log, (json.dumps(line) + "\n").encode())

    store = PostgresStore(os.environ["SAGAFLOW_PG_DSN"], schema=args.schema, lease=5.0)
    async with Runtime(registry, store=store, dispatch=dispatch, cluster=True) as runtime:
        async with anyio.create_task_group() as tg:
            for i in range(args.index, ORDERS, WORKERS):
                tg.start_soon(place_order, runtime, i)
        with anyio.fail_after(60):
            while await store.list_instances(limit=1):  # other workers' orders too
                await anyio.sleep(0.1)
        handled = runtime.statistics().events_handled
    os.close(log)
    print(f"worker {args.index} ({args.backend}) handled {handled} events")


async def place_order(runtime: Runtime, i: int) -> None:
    order = f"o-{i:04d}"
    await runtime.publish(OrderPlaced(order, 10 * i), id=f"{order}:placed")
    if i % 2 == 0:  # odd orders are never paid: their timeout compensates them
        await runtime.publish(PaymentCaptured(order), id=f"{order}:paid")


# -- the launcher ---------------------------------------------------------------------------


def main() -> int:
    with database() as dsn:
        if dsn is None:
            return 0
        schema = f"example_{uuid.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "commands.log"
            env = {**os.environ, "SAGAFLOW_PG_DSN": dsn}
            this = [sys.executable, *(f"-W{w}" for w in sys.warnoptions), __file__, "worker"]
            procs = [
                subprocess.Popen(
                    [*this, "--index", str(i), "--schema", schema, "--log", str(log)], env=env
                )
                for i in range(WORKERS)
            ]
            try:
                codes = [proc.wait(timeout=90) for proc in procs]
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                drop_schema(dsn, schema)
            lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert codes == [0] * WORKERS, codes
    check(lines)
    return 0


def check(lines: list[dict[str, Any]]) -> None:
    """Every order's commands went out once, whichever worker dispatched them."""
    sent = Counter((line["order"], line["command"]) for line in lines)
    want = Counter()
    for i in range(ORDERS):
        order = f"o-{i:04d}"
        paid = ["ReserveStock", "ShipOrder"]
        expired = ["ReserveStock", "ReleaseStock", "CancelOrder"]
        want.update((order, c) for c in (paid if i % 2 == 0 else expired))
    assert sent == want, sorted((sent - want) + (want - sent))[:10]
    by_worker = Counter(line["worker"] for line in lines)
    print(f"{ORDERS} orders, {len(lines)} commands; dispatched per worker: {dict(by_worker)}")


def drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- a database to run on (scaffolding, not part of the lesson) --------------------------------


@contextlib.contextmanager
def database() -> Iterator[str | None]:
    """`$SAGAFLOW_PG_DSN`, else a throwaway server, else `None` (after saying why)."""
    dsn = os.environ.get("SAGAFLOW_PG_DSN")
    if dsn:
        yield dsn
        return
    programs = next(
        (
            d
            for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
            if (d / "initdb").exists()
        ),
        Path(shutil.which("initdb") or "/nonexistent").parent,
    )
    if not (programs / "initdb").exists():
        on_ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
        print("skipped: set SAGAFLOW_PG_DSN or install PostgreSQL (initdb, pg_ctl)")
        if on_ci:
            raise SystemExit("CI is set but there is no PostgreSQL to run on")
        yield None
        return
    with throwaway_server(programs) as started:
        yield started


@contextlib.contextmanager
def throwaway_server(programs: Path) -> Iterator[str]:
    """A PostgreSQL server in a temporary directory, for this run only."""
    as_owner: list[str] = []
    base = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_owner, base = ["runuser", "-u", "postgres", "--"], "/tmp"
    directory = Path(tempfile.mkdtemp(prefix="sagaflow-example-", dir=base))
    if as_owner:
        shutil.chown(directory, "postgres", "postgres")
    data = directory / "data"

    def run(*argv: str) -> None:
        command = [*as_owner, *argv]
        subprocess.run(command, check=True, capture_output=True, cwd=directory, timeout=60)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        run(str(programs / "initdb"), f"--pgdata={data}", "--username=postgres", "--auth=trust")
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = f"--log={directory / 'log.txt'}"  # not our pipes: the server outlives pg_ctl
        run(str(programs / "pg_ctl"), f"--pgdata={data}", log, "--wait", "-o", options, "start")
        started = time.monotonic()
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            run(str(programs / "pg_ctl"), f"--pgdata={data}", "--mode=fast", "stop")
            print(f"(throwaway PostgreSQL server ran for {time.monotonic() - started:.1f} s)")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--index", type=int, required=True)
        parser.add_argument("--schema", required=True)
        parser.add_argument("--log", required=True)
        arguments = parser.parse_args(sys.argv[2:])
        arguments.backend = ("asyncio", "trio")[arguments.index % 2]
        anyio.run(worker, arguments, backend=arguments.backend)
    else:
        sys.exit(main())
