"""One of several runtime processes sharing a PostgreSQL schema; `test_cluster.py` runs a
few, SIGKILLs one mid-run and starts it again.

Run it as::

    SAGAFLOW_PG_DSN=... python tests/cluster_worker.py --schema S --log PATH
        --index I --workers W --orders N --hot H [--lease S] [--poll S]
        [--backend asyncio|trio]

Every start runs the worker's whole share of the script from the beginning, with event
ids, like a broker redelivering what it has not seen acknowledged: deduplication must
make that idempotent. The worker prints `STARTED` once its runtime runs, `PUBLISHED`
once its share is in, and `DONE` with a JSON summary once the schema holds no instance,
outbox row, schedule or inbox row (every process's work is done).

The script, spread over the workers so that every instance gets events from several
processes:

- Orders: `Placed`, `Paid` and `Packed` of order `i` are published (through the shared
  inbox) by workers `i`, `i + 1` and `i + 2` (mod W), in any order: each may start the
  instance. `Placed` schedules a `Remind` to the instance and a `Nudge` command; the
  dispatcher answers a `Nudge` by publishing `Nudged` back. The `Ack` of `Paid` fails
  for good for every 7th order, and the saga compensates with `Refund`. Once all of
  that happened, the saga sends `Done` and completes.
- Hot instances: every worker bumps the counter `hot-run` with its own `run(source)`
  (the processes race on one instance: optimistic concurrency settles it) and the
  counter `hot-inbox` with `publish` (the inbox hands it to one process at a time).

Every handler increments the state's counter `n` and puts it into the commands it
returns, so a lost update or an event applied twice shows as a wrong or repeated `n`.
The dispatcher appends one JSON line per attempt to the shared `--log` (O_APPEND: one
write per line, so lines of several processes do not mix, and a process killed by
SIGKILL loses nothing it wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs

from sagaflow import (
    CommandFailed,
    Compensate,
    Complete,
    DispatchMeta,
    Registry,
    RetryPolicy,
    Runtime,
    Schedule,
    Send,
    correlate,
    on,
)
from sagaflow.exceptions import ConflictError, StoreError
from sagaflow.stores import PostgresStore

HOT_KEYS = ("hot-run", "hot-inbox")
NUDGE_AFTER = 0.2  # seconds
REMIND_AFTER = 0.4
PUBLISHERS = 16  # concurrent publishes per worker


def order_id(i: int) -> str:
    return f"o-{i:05d}"


def failing(order: str) -> bool:
    """Whether the `Ack` of this order's payment fails for good."""
    return int(order[2:]) % 7 == 3


# -- events ------------------------------------------------------------------------------


@attrs.frozen
class Placed:
    order: str


@attrs.frozen
class Paid:
    order: str


@attrs.frozen
class Packed:
    order: str


@attrs.frozen
class Remind:
    order: str


@attrs.frozen
class Nudged:
    order: str


@attrs.frozen
class Bump:
    key: str
    worker: int
    seq: int
    total: int


# -- commands ----------------------------------------------------------------------------


@attrs.frozen
class Ack:
    order: str
    event: str
    n: int


@attrs.frozen
class Nudge:
    order: str


@attrs.frozen
class Reminded:
    order: str
    n: int


@attrs.frozen
class Refund:
    order: str
    n: int


@attrs.frozen
class Done:
    order: str
    n: int


@attrs.frozen
class Bumped:
    key: str
    count: int
    worker: int
    seq: int


@attrs.define
class OrderState:
    n: int = 0
    seen: list[str] = attrs.Factory(list)
    reminded: bool = False
    nudged: bool = False
    refunded: bool = False


@attrs.define
class Counter:
    count: int = 0


registry = Registry()


@registry.saga(state=OrderState)
class OrderSaga:
    @correlate
    def order(self, event: Placed | Paid | Packed | Remind | Nudged) -> str:
        return event.order

    def _step(self, state: OrderState, event: str) -> list[Any]:
        state.n += 1
        if event in ("placed", "paid", "packed"):
            state.seen.append(event)
        return []

    def _maybe_done(self, state: OrderState, order: str) -> list[Any]:
        complete = (
            len(state.seen) == 3
            and state.reminded
            and state.nudged
            and (state.refunded or not failing(order))
        )
        return [Send(Done(order, state.n)), Complete()] if complete else []

    @on(Placed, start=True)
    def placed(self, state: OrderState, event: Placed) -> list[Any]:
        self._step(state, "placed")
        return [
            Send(Ack(event.order, "placed", state.n)),
            Schedule(Nudge(event.order), after=NUDGE_AFTER, name="nudge"),
            Schedule(Remind(event.order), after=REMIND_AFTER, name="remind", to_self=True),
            *self._maybe_done(state, event.order),
        ]

    @on(Paid, start=True)
    def paid(self, state: OrderState, event: Paid) -> list[Any]:
        self._step(state, "paid")
        return [Send(Ack(event.order, "paid", state.n)), *self._maybe_done(state, event.order)]

    @on(Packed, start=True)
    async def packed(self, state: OrderState, event: Packed) -> list[Any]:
        self._step(state, "packed")
        return [Send(Ack(event.order, "packed", state.n)), *self._maybe_done(state, event.order)]

    @on(Remind)
    def remind(self, state: OrderState, event: Remind) -> list[Any]:
        self._step(state, "remind")
        state.reminded = True
        return [Send(Reminded(event.order, state.n)), *self._maybe_done(state, event.order)]

    @on(Nudged)
    def nudged(self, state: OrderState, event: Nudged) -> list[Any]:
        self._step(state, "nudged")
        state.nudged = True
        return [Send(Ack(event.order, "nudged", state.n)), *self._maybe_done(state, event.order)]

    @on(CommandFailed)
    def failed(self, state: OrderState, event: CommandFailed[Any]) -> list[Any]:
        self._step(state, "failed")
        state.refunded = True
        order = event.command.order
        return [Compensate([Refund(order, state.n)]), *self._maybe_done(state, order)]


@registry.saga(state=Counter)
class HotSaga:
    @correlate
    def key(self, event: Bump) -> str:
        return event.key

    @on(Bump, start=True)
    async def bump(self, state: Counter, event: Bump) -> list[Any]:
        state.count += 1
        await anyio.sleep(0)  # let the other processes' commits race ours
        out: list[Any] = [Send(Bumped(event.key, state.count, event.worker, event.seq))]
        if state.count == event.total:
            out.append(Complete())
        return out


# -- the worker ----------------------------------------------------------------------------


@attrs.define(eq=False)
class Dispatcher:
    """Logs every attempt to the shared log; fails the Acks of failing payments; answers
    a `Nudge` by publishing `Nudged`."""

    fd: int
    worker: int
    runtime: Runtime | None = None

    def record(self, command: Any, meta: DispatchMeta, ok: bool) -> None:
        line = {
            "id": meta.id,
            "type": type(command).__name__,
            "payload": attrs.asdict(command),
            "kind": meta.kind,
            "attempt": meta.attempt,
            "ok": ok,
            "worker": self.worker,
        }
        os.write(self.fd, (json.dumps(line, sort_keys=True) + "\n").encode())

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        await anyio.lowlevel.checkpoint()
        if isinstance(command, Ack) and command.event == "paid" and failing(command.order):
            self.record(command, meta, ok=False)
            raise ConnectionError(f"payment service rejects {command.order}")
        if isinstance(command, Nudge):
            assert self.runtime is not None
            await self.runtime.publish(Nudged(command.order), id=f"{command.order}:nudged")
        self.record(command, meta, ok=True)


def share(args: argparse.Namespace) -> list[tuple[Any, str]]:
    """This worker's order events with their ids."""
    events: list[tuple[Any, str]] = []
    for i in range(args.orders):
        oid = order_id(i)
        for k, cls in enumerate((Placed, Paid, Packed)):
            if (i + k) % args.workers == args.index:
                events.append((cls(oid), f"{oid}:{cls.__name__.lower()}"))
    return events


def bumps(args: argparse.Namespace, key: str) -> list[Bump]:
    total = args.hot * args.workers
    return [Bump(key, args.index, seq, total) for seq in range(args.hot)]


async def publish_all(runtime: Runtime, events: list[tuple[Any, str]]) -> None:
    send, receive = anyio.create_memory_object_stream[tuple[Any, str]](len(events) or 1)
    for item in events:
        send.send_nowait(item)
    send.close()

    async def publisher() -> None:
        async with receive.clone() as mine:
            async for event, event_id in mine:
                await runtime.publish(event, id=event_id)

    async with anyio.create_task_group() as tg:
        for _ in range(PUBLISHERS):
            tg.start_soon(publisher)
    receive.close()


async def run_hot(runtime: Runtime, events: list[Bump]) -> int:
    """Feed the bumps through `run`; a batch that lost too many races is fed again."""
    conflicts = 0

    async def source() -> AsyncIterator[Bump]:
        for event in events:
            yield event

    while True:
        try:
            await runtime.run(source(), id=lambda e: f"{e.key}:{e.worker}:{e.seq}")
            return conflicts
        except ConflictError:
            conflicts += 1


async def empty(store: PostgresStore) -> bool:
    return not (
        await store.list_instances(limit=1)
        or await store.list_outbox()
        or await store.list_schedules()
        or await store.list_inbox()
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    store = PostgresStore(
        os.environ["SAGAFLOW_PG_DSN"],
        schema=args.schema,
        lease=args.lease,
        poll_interval=args.poll,
        max_size=8,
    )
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    dispatcher = Dispatcher(fd, args.index)
    runtime = Runtime(
        registry,
        store=store,
        dispatch=dispatcher,
        retry=RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05),
        shards=4,
        max_batch=64,
        cluster=True,
    )
    dispatcher.runtime = runtime
    started = time.monotonic()
    try:
        async with runtime:
            print("STARTED", flush=True)
            gave_up = 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_all, runtime, share(args))
                inbox = [(b, f"{b.key}:{b.worker}:{b.seq}") for b in bumps(args, "hot-inbox")]
                tg.start_soon(publish_all, runtime, inbox)
                gave_up = await run_hot(runtime, bumps(args, "hot-run"))
            print("PUBLISHED", flush=True)
            quiet = 0
            while quiet < 2:
                await runtime.drain()
                try:
                    quiet = quiet + 1 if await empty(store) else 0
                except StoreError:
                    quiet = 0
                await anyio.sleep(0.1)
            stats = runtime.statistics()
            dead = await store.list_dead_letters()
    finally:
        os.close(fd)
    return {
        "dead_letters": [attrs.asdict(d) for d in dead],
        "conflicts": stats.conflicts,
        "run_gave_up": gave_up,
        "events_handled": stats.events_handled,
        "commands_dispatched": stats.commands_dispatched,
        "seconds": round(time.monotonic() - started, 2),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schema", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--hot", type=int, default=50, help="bumps per worker and hot key")
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--poll", type=float, default=0.25)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    summary = anyio.run(main, arguments, backend=arguments.backend)
    print("DONE", json.dumps(summary, sort_keys=True), flush=True)
