"""What the benchmark programs measure besides the clock: GC work and the loop's longest block.

Wall time on a shared 2-core machine drifts from run to run; the figures here do not (or
much less), so a change can be judged by them when events/s is too noisy.

- `GcCounter`: how many GC-tracked objects the run allocated, and how many collections of
  each generation it caused. CPython counts, in `gc.get_count()[0]`, the GC-tracked
  objects allocated minus those freed since the last collection, and starts a collection
  when that count passes the young generation's threshold (`gc.get_threshold()[0]`,
  700 by default); a collection resets it to zero. A `gc.callback` reads the count when
  each collection starts, so the sum of those readings plus the count at the end, minus
  the count at the start, is the number of net young-generation allocations over the
  run: objects allocated and not freed before the next collection, which is what makes
  the collector run. Per event, that is `gc_tracked_allocs_per_event`. An object that is
  allocated and freed between two collections (a short-lived tuple, say) adds nothing,
  as it costs the collector nothing. The collections per generation come from the deltas
  of `gc.get_stats()`.
- `LoopBlock`: a task that sleeps 1 ms in a loop (anyio, so asyncio and trio alike) and
  keeps the largest gap between falling asleep and waking up, minus the 1 ms: the longest
  time anything held the event loop during the run. The gap still open when the run ends
  counts too, so a run that never lets the ticker in reports its whole length. The
  ticker wakes on the wall clock: `instructions.py`, under which a program runs some 50
  times slower, turns it off (`BENCH_LOOP_TICKER=off`, reported as null), lest its
  wake-ups count as the program's instructions.
- `Recorder`: the hand-written baselines' dispatcher (sagaflow's runs have their own in
  `bench_orders.py`), kept here so that both baselines record commands alike.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import anyio

TICK = 0.001  # seconds the loop-block ticker sleeps
TICKER = os.environ.get("BENCH_LOOP_TICKER", "on") != "off"


class GcCounter:
    """Counts net young-generation allocations and collections between `start` and `stop`."""

    def __init__(self) -> None:
        self._at_collections = 0
        self._count0 = 0
        self._stats0: list[int] = []

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._at_collections += gc.get_count()[0]

    def start(self) -> None:
        self._at_collections = 0
        self._stats0 = [s["collections"] for s in gc.get_stats()]
        self._count0 = gc.get_count()[0]
        gc.callbacks.append(self._callback)

    def stop(self, events: int) -> dict[str, Any]:
        """The figures for the report: allocations per event, collections per generation."""
        count1 = gc.get_count()[0]
        gc.callbacks.remove(self._callback)
        collections = [
            s["collections"] - c0 for s, c0 in zip(gc.get_stats(), self._stats0, strict=True)
        ]
        allocs = self._at_collections + count1 - self._count0
        return {
            "gc_tracked_allocs": allocs,
            "gc_tracked_allocs_per_event": round(allocs / events, 2) if events else None,
            "gc_collections": collections,
            "gc_threshold": list(gc.get_threshold()),
        }


class LoopBlock:
    """The longest time the event loop was held by anything else, from a 1 ms ticker."""

    def __init__(self) -> None:
        self.max_seconds = 0.0
        self.ticks = 0
        self._asleep = time.perf_counter()

    def start(self) -> None:
        """Count from now (call it where the timed run begins)."""
        self.max_seconds = 0.0
        self.ticks = 0
        self._asleep = time.perf_counter()

    async def tick(self) -> None:
        """Run until cancelled (start it in the task group that runs the benchmark)."""
        if not TICKER:
            return
        clock = time.perf_counter
        while True:
            self._asleep = clock()
            await anyio.sleep(TICK)
            late = clock() - self._asleep - TICK
            self.ticks += 1
            if late > self.max_seconds:
                self.max_seconds = late

    def stop(self) -> dict[str, Any]:
        """The figure for the report (call it where the timed run ends)."""
        if not TICKER:
            return {"loop_block_max_ms": None}
        still_open = time.perf_counter() - self._asleep - TICK
        self.max_seconds = max(self.max_seconds, still_open)
        return {"loop_block_max_ms": round(self.max_seconds * 1000, 3)}


class Recorder:
    """The baselines' dispatcher: keeps every command (or, with --discard, only counts them)."""

    def __init__(self, discard: bool) -> None:
        self.sent: list[Any] = []
        self.count = 0
        if discard:
            del self.sent
            self.send = self._count  # type: ignore[method-assign]

    async def send(self, command: Any) -> None:
        self.sent.append(command)

    async def _count(self, command: Any) -> None:
        self.count += 1
