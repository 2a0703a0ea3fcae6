"""A saga worker that `test_crash.py` kills with SIGKILL and starts again on the same file.

Run it as::

    python tests/crash_worker.py --db PATH --log PATH --orders N
        [--pace SECONDS] [--crash POINT:K] [--max-batch N] [--backend asyncio|trio]

Every start publishes the whole event script from the beginning, with event ids, like
a broker that redelivers everything it has not seen acknowledged: deduplication must
make that idempotent. With `--pace`, event `i` becomes available `i * pace` seconds
after the first start on this file (kept in `PATH.start`), so the work spreads out in
time and a kill at a random moment can land in any phase.

The dispatcher appends one JSON line per attempt to `--log`, written and fsync'd
before it returns, so a line with `"ok": true` means "the receiver got it". The worker
prints `STARTED` once the runtime runs, and `DONE` followed by a JSON summary once the
store holds no instance, outbox row or schedule.

Order `i` follows the plan of `kind(i)`:

- `"fail"` (every 5th): placed, paid; the charge fails for good, so the saga
  compensates with `Undo1`, `Undo2`, `Undo3` and completes.
- `"expire"` (every 3rd of the rest): placed, never paid; its short `timeout`
  schedule fires and the saga sends `Expired` and completes.
- `"ship"` (the rest): placed, paid, shipped; the saga unschedules its (long) timeout,
  sends `Shipped` and completes.

Every handler increments the state's counter `n` and puts it into the commands it
returns, so a handler applied twice shows up as a repeated or skipped `n`.

`--crash POINT:K` kills the process with SIGKILL at the K-th occurrence of POINT:

- `before-commit` / `after-commit`: just before / after the K-th store commit.
- `timer-due` / `timer-fired`: just before / after the commit that fires the K-th due
  schedule (several may fire in one commit).
- `mid-dispatch`: after the K-th successful command reached the log, before the
  dispatcher returns (the delivery is never recorded in the store).
- `compensation`: in the K-th dispatch of a compensation, before it reaches the log.
- `failure-before-commit` / `failure-after-commit`: just before / after the commit that
  applies the K-th `CommandFailed` (a charge failed for good, the handler compensates;
  several may be applied in one commit).

`--max-batch 1` makes every event, fired schedule and handled failure take a commit of
its own, so the number of commits and points a run passes no longer depends on how
fast the machine is (group commit takes more items at once when commits are slow).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
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
    Unschedule,
    correlate,
    on,
)
from sagaflow.stores import (
    Changes,
    DeadLetter,
    InstanceRecord,
    Loaded,
    LoadRequest,
    OutboxRecord,
    PendingCommand,
    ScheduleRecord,
    SQLiteStore,
    Tombstone,
)

POINTS = (
    "before-commit",
    "after-commit",
    "timer-due",
    "timer-fired",
    "mid-dispatch",
    "compensation",
    "failure-before-commit",
    "failure-after-commit",
)
SHORT_TIMEOUT = 0.2  # seconds, plus STAGGER per order: expiring orders fire one by one
STAGGER = 0.015
LONG_TIMEOUT = 3600.0  # never reached: paid orders unschedule or complete first


def order_id(i: int) -> str:
    return f"o-{i:03d}"


def kind(i: int) -> str:
    """The plan of order `i`: `"fail"`, `"expire"` or `"ship"`."""
    if i % 5 == 0:
        return "fail"
    if i % 3 == 0:
        return "expire"
    return "ship"


# -- events (each carries the id it is published with) -------------------------------


@attrs.frozen
class OrderPlaced:
    order_id: str
    event_id: str
    timeout: float


@attrs.frozen
class Pay:
    order_id: str
    event_id: str


@attrs.frozen
class Ship:
    order_id: str
    event_id: str


@attrs.frozen
class Timeout:
    order_id: str


# -- commands ------------------------------------------------------------------------


@attrs.frozen
class Reserve:
    order_id: str
    event_id: str
    n: int


@attrs.frozen
class Charge:
    order_id: str
    event_id: str
    n: int


@attrs.frozen
class Shipped:
    order_id: str
    event_id: str
    n: int


@attrs.frozen
class Expired:
    order_id: str
    n: int


@attrs.frozen
class Undo1:
    order_id: str
    n: int


@attrs.frozen
class Undo2:
    order_id: str
    n: int


@attrs.frozen
class Undo3:
    order_id: str
    n: int


@attrs.define
class OrderState:
    n: int = 0
    status: str = "new"


registry = Registry()


@registry.saga(state=OrderState)
class CrashSaga:
    @correlate
    def key(self, event: OrderPlaced | Pay | Ship | Timeout) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, state: OrderState, event: OrderPlaced) -> list[Any]:
        state.n += 1
        state.status = "placed"
        return [
            Send(Reserve(event.order_id, event.event_id, state.n)),
            Schedule(Timeout(event.order_id), after=event.timeout, name="timeout", to_self=True),
        ]

    @on(Pay)
    async def paid(self, state: OrderState, event: Pay) -> Send[Charge]:
        state.n += 1
        state.status = "paid"
        return Send(Charge(event.order_id, event.event_id, state.n))

    @on(Ship)
    def shipped(self, state: OrderState, event: Ship) -> list[Any]:
        state.n += 1
        state.status = "shipped"
        return [
            Send(Shipped(event.order_id, event.event_id, state.n)),
            Unschedule("timeout"),
            Complete(),
        ]

    @on(Timeout)
    def timed_out(self, state: OrderState, event: Timeout) -> list[Any]:
        state.n += 1
        state.status = "expired"
        return [Send(Expired(event.order_id, state.n)), Complete()]

    @on(CommandFailed)
    def failed(self, state: OrderState, event: CommandFailed[Any]) -> list[Any]:
        state.n += 1
        state.status = "compensating"
        oid = event.command.order_id
        return [
            Compensate([Undo1(oid, state.n), Undo2(oid, state.n), Undo3(oid, state.n)]),
            Complete(),
        ]


def script(orders: int) -> Iterator[Any]:
    """The deterministic event script: every order placed, then payments, then shipments."""
    for i in range(orders):
        short = SHORT_TIMEOUT + STAGGER * i
        timeout = short if kind(i) == "expire" else LONG_TIMEOUT
        yield OrderPlaced(order_id(i), f"{order_id(i)}:placed", timeout)
    for i in range(orders):
        if kind(i) != "expire":
            yield Pay(order_id(i), f"{order_id(i)}:pay")
    for i in range(orders):
        if kind(i) == "ship":
            yield Ship(order_id(i), f"{order_id(i)}:ship")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@attrs.define(eq=False)
class Trigger:
    """Counts the crash points passed and kills the process at the K-th `point`."""

    point: str | None
    k: int
    seen: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(POINTS, 0))

    def hit(self, point: str, times: int = 1) -> None:
        before = self.seen[point]
        self.seen[point] += times
        if point == self.point and before < self.k <= self.seen[point]:
            die()


@attrs.define(eq=False)
class CrashingStore:
    """A `Store` that delegates to a real one and kills the process at commit points.

    Commits go through one at a time (as `SQLiteStore` runs them anyway), so that "before
    the K-th commit" means that the K - 1 before it are done and no other is under way.
    """

    inner: SQLiteStore
    trigger: Trigger
    _due: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)
    _lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def load(self, request: LoadRequest) -> Loaded:
        return await self.inner.load(request)

    async def commit(self, changes: Changes) -> None:
        if not changes:
            await self.inner.commit(changes)
            return
        # Schedules fired and failures handled by this commit are counted one by one:
        # a batch may take several. Only the CommandFailed handler compensates.
        fires = sum((d.saga, d.key, d.name) in self._due for d in changes.schedule_deletes)
        failures = len({(r.saga, r.key) for r in changes.outbox_adds if r.kind == "compensate"})
        async with self._lock:
            self.trigger.hit("before-commit")
            self.trigger.hit("timer-due", fires)
            self.trigger.hit("failure-before-commit", failures)
            await self.inner.commit(changes)
            self.trigger.hit("after-commit")
            self.trigger.hit("timer-fired", fires)
            self.trigger.hit("failure-after-commit", failures)

    async def next_due(self, *, sagas: Collection[str] | None = None) -> float | None:
        return await self.inner.next_due(sagas=sagas)

    async def due_schedules(
        self, now: float, limit: int, *, sagas: Collection[str] | None = None
    ) -> list[ScheduleRecord]:
        rows = await self.inner.due_schedules(now, limit, sagas=sagas)
        self._due.update((r.saga, r.key, r.name) for r in rows)
        return rows

    async def saga_names(self) -> set[str]:
        return await self.inner.saga_names()

    async def rename_saga(self, old: str, new: str) -> int:
        return await self.inner.rename_saga(old, new)

    async def list_instances(
        self, *, saga: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[InstanceRecord]:
        return await self.inner.list_instances(saga=saga, status=status, limit=limit)

    async def scan_instances(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[InstanceRecord]:
        return await self.inner.scan_instances(after=after, limit=limit)

    async def scan_outbox(self, *, after: str | None = None, limit: int) -> list[OutboxRecord]:
        return await self.inner.scan_outbox(after=after, limit=limit)

    async def scan_schedules(
        self, *, after: tuple[str, str, str] | None = None, limit: int
    ) -> list[ScheduleRecord]:
        return await self.inner.scan_schedules(after=after, limit=limit)

    async def scan_dead_letters(self, *, after: str | None = None, limit: int) -> list[DeadLetter]:
        return await self.inner.scan_dead_letters(after=after, limit=limit)

    async def list_outbox(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[OutboxRecord]:
        return await self.inner.list_outbox(saga=saga, key=key)

    async def scan_tombstones(
        self, *, after: tuple[str, str] | None = None, limit: int
    ) -> list[Tombstone]:
        return await self.inner.scan_tombstones(after=after, limit=limit)

    async def list_tombstones(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[Tombstone]:
        return await self.inner.list_tombstones(saga=saga, key=key)

    async def pending_commands(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[PendingCommand]:
        return await self.inner.pending_commands(after=after, limit=limit, sagas=sagas)

    async def drained_instances(
        self,
        *,
        after: tuple[str, str] | None = None,
        limit: int,
        sagas: Collection[str] | None = None,
    ) -> list[tuple[str, str]]:
        return await self.inner.drained_instances(after=after, limit=limit, sagas=sagas)

    async def list_schedules(
        self, *, saga: str | None = None, key: str | None = None
    ) -> list[ScheduleRecord]:
        return await self.inner.list_schedules(saga=saga, key=key)

    async def list_dead_letters(self, *, saga: str | None = None) -> list[DeadLetter]:
        return await self.inner.list_dead_letters(saga=saga)


@attrs.define(eq=False)
class Dispatcher:
    """Appends every attempt to the log (fsync'd) before it returns or raises."""

    fd: int
    trigger: Trigger

    def record(self, command: Any, meta: DispatchMeta, ok: bool) -> None:
        line = {
            "id": meta.id,
            "type": type(command).__name__,
            "order": command.order_id,
            "payload": attrs.asdict(command),
            "kind": meta.kind,
            "attempt": meta.attempt,
            "ok": ok,
        }
        os.write(self.fd, (json.dumps(line, sort_keys=True) + "\n").encode())
        os.fsync(self.fd)

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        await anyio.lowlevel.checkpoint()
        if meta.kind == "compensate":
            self.trigger.hit("compensation")
        if isinstance(command, Charge) and kind(int(command.order_id[2:])) == "fail":
            self.record(command, meta, ok=False)
            raise ConnectionError(f"payment service rejects {command.order_id}")
        self.record(command, meta, ok=True)
        self.trigger.hit("mid-dispatch")


def first_start(db: str) -> float:
    """When the worker first ran on `db` (kept next to it): the script's time zero."""
    path = Path(f"{db}.start")
    try:
        return float(path.read_text())
    except FileNotFoundError:
        now = time.time()
        path.write_text(repr(now))
        return now


async def events(orders: int, start: float, pace: float) -> AsyncIterator[Any]:
    """The script, event `i` available `i * pace` seconds after the first start.

    Like a broker, a restarted worker gets at once every event already available.
    """
    for index, event in enumerate(script(orders)):
        delay = start + index * pace - time.time()
        if delay > 0:
            await anyio.sleep(delay)
        yield event


async def main(args: argparse.Namespace) -> dict[str, Any]:
    point, k = None, 0
    if args.crash:
        point, _, count = args.crash.partition(":")
        if point not in POINTS:
            raise SystemExit(f"unknown crash point {point!r}; one of {', '.join(POINTS)}")
        k = int(count or 1)
    trigger = Trigger(point, k)
    store = CrashingStore(SQLiteStore(args.db), trigger)
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        runtime = Runtime(
            registry,
            store=store,
            dispatch=Dispatcher(fd, trigger),
            retry=RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05),
            shards=4,
            max_batch=args.max_batch,
            outbox_capacity=args.outbox_capacity,
        )
        async with runtime:
            print("STARTED", flush=True)
            source = events(args.orders, first_start(args.db), args.pace)
            await runtime.run(source, id=lambda event: event.event_id)
            while True:
                await runtime.drain()
                if not (
                    await store.list_instances()
                    or await store.list_outbox()
                    or await store.list_schedules()
                ):
                    break
                await anyio.sleep(0.05)
            dead = await store.list_dead_letters()
            stats = runtime.statistics()
    finally:
        os.close(fd)
    return {
        "dead_letters": [attrs.asdict(d) for d in dead],
        "events_duplicate": stats.events_duplicate,
        "events_unmatched": stats.events_unmatched,
        "events_dead_lettered": stats.events_dead_lettered,
        "points": trigger.seen,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--orders", type=int, default=40)
    parser.add_argument("--pace", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--crash", default=None, metavar="POINT:K")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N")
    parser.add_argument(
        "--outbox-capacity",
        type=int,
        default=int(os.environ.get("CRASH_OUTBOX_CAPACITY", "4096")),
        metavar="N",
        help="Runtime(outbox_capacity=); default $CRASH_OUTBOX_CAPACITY or 4096",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    summary = anyio.run(main, arguments, backend=arguments.backend)
    print("DONE", json.dumps(summary, sort_keys=True), flush=True)
