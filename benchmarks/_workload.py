"""Shared pieces of the "orders" saga workload.

A copy of the team's shared workload definition, so that `bench_orders.py` and
`scaling.py` run from the repository alone. The workload: N orders, W live at a time;
every tenth order fails payment and is compensated, the others are reserved, paid and
shipped; a 30-minute schedule per order that never fires in the run.

Every benchmark program imports this module so that all systems see exactly the
same stream and are checked against exactly the same expected commands:

- the event and command types (attrs classes with slots, frozen),
- ``stream(n, w)``: the round-robin event generator (window of W live orders),
- ``expected_commands(i)`` and ``verify_commands(...)``: the exact commands each
  order must have produced, checked per order and in order,
- ``peak_rss_mib()`` and ``report(...)``: the one JSON line every program prints.

Nothing here is timed except ``stream`` itself, which is part of every timed
region ("first event in" is the first event the generator yields).
"""

from __future__ import annotations

import json
import resource
import sys
from collections import defaultdict

import attrs

# --------------------------------------------------------------------------- events


@attrs.frozen(slots=True)
class OrderPlaced:
    order_id: str
    amount: int


@attrs.frozen(slots=True)
class StockReserved:
    order_id: str


@attrs.frozen(slots=True)
class PaymentCaptured:
    order_id: str


@attrs.frozen(slots=True)
class PaymentFailed:
    order_id: str
    reason: str


@attrs.frozen(slots=True)
class OrderShipped:
    order_id: str


EVENT_TYPES = (OrderPlaced, StockReserved, PaymentCaptured, PaymentFailed, OrderShipped)

# ------------------------------------------------------------------------- commands


@attrs.frozen(slots=True)
class ReserveStock:
    order_id: str
    amount: int


@attrs.frozen(slots=True)
class CapturePayment:
    order_id: str
    amount: int


@attrs.frozen(slots=True)
class ShipOrder:
    order_id: str


@attrs.frozen(slots=True)
class ReleaseStock:
    order_id: str


@attrs.frozen(slots=True)
class CancelOrder:
    order_id: str
    reason: str


COMMAND_TYPES = (ReserveStock, CapturePayment, ShipOrder, ReleaseStock, CancelOrder)
COMMAND_BY_NAME = {c.__name__: c for c in COMMAND_TYPES}

# ----------------------------------------------------------------------- constants

FAIL_REASON = "card declined"  # PaymentFailed.reason used by the stream
TIMEOUT_REASON = "payment timeout"  # reason of the scheduled CancelOrder
TIMEOUT_SECONDS = 30 * 60  # the scheduled CancelOrder is due after 30 minutes


def order_fails(i: int) -> bool:
    return i % 10 == 9


def amount_of(i: int) -> int:
    return 100 + i % 900


def total_events(n: int) -> int:
    fails = sum(1 for i in range(n) if order_fails(i))
    return fails * 3 + (n - fails) * 4


def total_commands(n: int) -> int:
    fails = sum(1 for i in range(n) if order_fails(i))
    return fails * 4 + (n - fails) * 3


# -------------------------------------------------------------------------- stream


def stream(n: int, w: int):
    """Yield the workload's events.

    A window of ``w`` live orders; each round emits one event of every live order
    (in window order); an order that has emitted its last event is replaced by the
    next new order, whose first event comes in the next round.
    """
    nxt = 0
    live: list[list] = []  # slot = [i, order_id, step]
    while nxt < n and len(live) < w:
        live.append([nxt, f"o{nxt}", 0])
        nxt += 1
    while live:
        new_live = []
        append = new_live.append
        for slot in live:
            i, oid, step = slot
            if step == 0:
                yield OrderPlaced(oid, 100 + i % 900)
            elif step == 1:
                yield StockReserved(oid)
            elif i % 10 == 9:  # failing order: its 3rd and last event
                yield PaymentFailed(oid, FAIL_REASON)
                if nxt < n:
                    append([nxt, f"o{nxt}", 0])
                    nxt += 1
                continue
            elif step == 2:
                yield PaymentCaptured(oid)
            else:
                yield OrderShipped(oid)
                if nxt < n:
                    append([nxt, f"o{nxt}", 0])
                    nxt += 1
                continue
            slot[2] = step + 1
            append(slot)
        live = new_live


# -------------------------------------------------------------------- verification


def expected_commands(i: int) -> list:
    oid = f"o{i}"
    amount = amount_of(i)
    if order_fails(i):
        return [
            ReserveStock(oid, amount),
            CapturePayment(oid, amount),
            ReleaseStock(oid),
            CancelOrder(oid, FAIL_REASON),
        ]
    return [ReserveStock(oid, amount), CapturePayment(oid, amount), ShipOrder(oid)]


def verify_commands(n: int, received) -> list[str]:
    """Check that ``received`` (an iterable of command objects, in dispatch order)
    is exactly the expected set: per order, the expected commands in the expected
    order, nothing missing, nothing extra, no CancelOrder("payment timeout").
    Returns a list of problems (empty when correct)."""
    problems: list[str] = []
    by_order: dict[str, list] = defaultdict(list)
    count = 0
    for cmd in received:
        by_order[cmd.order_id].append(cmd)
        count += 1
    if count != total_commands(n):
        problems.append(f"received {count} commands, expected {total_commands(n)}")
    if len(by_order) != n:
        problems.append(f"commands for {len(by_order)} orders, expected {n}")
    for i in range(n):
        got = by_order.get(f"o{i}", [])
        exp = expected_commands(i)
        if got != exp:
            problems.append(f"order o{i}: got {got!r}, expected {exp!r}")
            if len(problems) > 10:
                break
    return problems


def check_commands(n: int, dispatcher) -> list[str]:
    """verify_commands for a recording dispatcher (``.sent``); for a counting one
    (``.count``, used for memory measurements) only the number is checked."""
    if hasattr(dispatcher, "sent"):
        return verify_commands(n, dispatcher.sent)
    if dispatcher.count != total_commands(n):
        return [f"received {dispatcher.count} commands, expected {total_commands(n)}"]
    return []


# ------------------------------------------------------------------------ reporting


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(
    *,
    system: str,
    mode: str,
    n: int,
    w: int,
    events: int,
    seconds: float,
    peak_rss: float,
    ok: bool,
    problems=(),
    **extra,
) -> None:
    line = {
        "system": system,
        "mode": mode,
        "n": n,
        "w": w,
        "events": events,
        "seconds": round(seconds, 4),
        "events_per_s": round(events / seconds, 1) if seconds > 0 else None,
        "peak_rss_mib": round(peak_rss, 1),
        "ok": bool(ok),
    }
    line.update(extra)
    print(json.dumps(line), flush=True)
    for p in list(problems)[:20]:
        print("PROBLEM:", p, file=sys.stderr)
