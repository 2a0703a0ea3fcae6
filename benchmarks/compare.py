"""Run sagaflow and the hand-written baselines alternately; print medians and ratios.

    python benchmarks/compare.py                    # N=20,000, W=1,000, 5 rounds
    python benchmarks/compare.py --rounds 1 --n 2000    # the short form CI runs
    python benchmarks/compare.py --limits ../shared/bench   # the shared limits as rows too
    python benchmarks/compare.py --gc-tuned         # and the opt-in GC tuning as a row

sagaflow (`bench_orders.py`) is compared with this directory's hand-written programs,
`baseline_memory.py --feed stream` and `baseline_sqlite.py --batch 256`: the same
workload, written with no framework. A second pair of rows runs the memory store and its
baseline with W = 100,000 live orders (`--big-w`; N is then at least W), where every
event misses sagaflow's state cache. `--limits DIR` (or $SAGAFLOW_BENCH_DIR) adds the
team's shared limit programs of that directory, `limit_memory.py` and `limit_sqlite.py`,
as rows, and the ratios against them. `--gc-tuned` adds a row with the process-wide
GC tuning an application may opt into (`bench_orders.py --gc-threshold 10000
--gc-freeze`); the headline rows use the interpreter's default GC settings.

Each round runs every program once, in turn, so that drift of the machine's speed hits
all of them alike; the table shows medians. Every program checks its own result (`ok`);
a run that is not ok fails this script. Next to events/s, the table shows the net
GC-tracked allocations per event and the longest block of the event loop (`_measure.py`),
which drift much less than wall time on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_DIR = Path(os.environ.get("SAGAFLOW_BENCH_DIR", HERE.parent.parent / "shared" / "bench"))

MEMORY, SQLITE = "sagaflow memory asyncio", "sagaflow sqlite asyncio"
BASE_MEMORY, BASE_SQLITE = "baseline memory", "baseline sqlite"
LIMIT_MEMORY, LIMIT_SQLITE = "limit_memory --feed stream", "limit_sqlite --batch 256"
GC_TUNED = "sagaflow memory asyncio gc-tuned"


def big(name: str, w: int) -> str:
    return f"{name} W={w:,}"


def programs(args: argparse.Namespace) -> dict[str, list[str]]:
    """The programs of one round, by row name, in the order they run and print."""
    size = ["--n", str(args.n), "--w", str(args.w)]
    py = sys.executable
    own = [py, str(HERE / "bench_orders.py"), *size]
    memory, sqlite = [*own, "--store", "memory"], [*own, "--store", "sqlite", "--sync", "normal"]
    runs: dict[str, list[str]] = {}
    if args.limits:
        runs[LIMIT_MEMORY] = [py, str(args.limits / "limit_memory.py"), *size, "--feed", "stream"]
    runs[BASE_MEMORY] = [py, str(HERE / "baseline_memory.py"), *size, "--feed", "stream"]
    runs[MEMORY] = memory
    runs["sagaflow memory trio"] = [*memory, "--backend", "trio"]
    # shards=1: the fastest setting when handlers do not wait on I/O (one batch at a time).
    runs["sagaflow memory shards=1"] = [*memory, "--shards", "1"]
    if args.gc_tuned:
        runs[GC_TUNED] = [*memory, "--gc-threshold", "10000", "--gc-freeze"]
    if args.limits:
        runs[LIMIT_SQLITE] = [py, str(args.limits / "limit_sqlite.py"), *size]
        runs[LIMIT_SQLITE] += ["--batch", "256", "--sync", "normal"]
    runs[BASE_SQLITE] = [py, str(HERE / "baseline_sqlite.py"), *size]
    runs[BASE_SQLITE] += ["--batch", "256", "--sync", "normal"]
    runs[SQLITE] = sqlite
    runs["sagaflow sqlite trio"] = [*sqlite, "--backend", "trio"]
    runs["sagaflow sqlite shards=1"] = [*sqlite, "--shards", "1"]
    if args.big_w:
        many = ["--n", str(max(args.n, args.big_w)), "--w", str(args.big_w)]
        runs[big(BASE_MEMORY, args.big_w)] = [
            *runs[BASE_MEMORY][:2],
            *many,
            "--feed",
            "stream",
        ]
        runs[big(MEMORY, args.big_w)] = [*own[:2], *many, "--store", "memory"]
    if args.postgres and os.environ.get("SAGAFLOW_PG_DSN"):
        runs["sagaflow postgres asyncio"] = [*own, "--store", "postgres"]
    return runs


def run(command: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Run one program; its last JSON line, after checking that it succeeded and is ok."""
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, object] = json.loads(lines[-1])
    if not result.get("ok"):
        raise SystemExit(f"{' '.join(command)} produced wrong commands:\n{done.stderr}")
    return result


def ratios(median: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    """The ratios the issue's targets are stated in, for the rows that ran."""
    pairs = [
        (f"{MEMORY} / {BASE_MEMORY} (target >= 0.6)", MEMORY, BASE_MEMORY),
        (f"{SQLITE} / {BASE_SQLITE} (target >= 0.5)", SQLITE, BASE_SQLITE),
        ("sagaflow memory shards=1 / baseline memory", "sagaflow memory shards=1", BASE_MEMORY),
        ("sagaflow sqlite shards=1 / baseline sqlite", "sagaflow sqlite shards=1", BASE_SQLITE),
        ("memory trio / memory asyncio (target >= 0.8)", "sagaflow memory trio", MEMORY),
        ("sqlite trio / sqlite asyncio (target >= 0.8)", "sagaflow sqlite trio", SQLITE),
        (
            f"memory / baseline at W={args.big_w:,} (target >= 0.5)",
            big(MEMORY, args.big_w),
            big(BASE_MEMORY, args.big_w),
        ),
        (f"{GC_TUNED} / {BASE_MEMORY}", GC_TUNED, BASE_MEMORY),
        (f"{MEMORY} / {LIMIT_MEMORY}", MEMORY, LIMIT_MEMORY),
        (f"{SQLITE} / {LIMIT_SQLITE}", SQLITE, LIMIT_SQLITE),
        (f"{BASE_MEMORY} / {LIMIT_MEMORY}", BASE_MEMORY, LIMIT_MEMORY),
        (f"{BASE_SQLITE} / {LIMIT_SQLITE}", BASE_SQLITE, LIMIT_SQLITE),
    ]
    return {
        label: median[top] / median[bottom]
        for label, top, bottom in pairs
        if top in median and bottom in median
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _cell(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--w", type=int, default=1_000)
    parser.add_argument(
        "--big-w",
        type=int,
        default=100_000,
        help="W of the second memory pair (N is at least W); 0 leaves the pair out",
    )
    parser.add_argument(
        "--limits",
        type=Path,
        default=os.environ.get("SAGAFLOW_BENCH_DIR") or None,
        metavar="DIR",
        help="also run the shared limit programs of DIR (default: $SAGAFLOW_BENCH_DIR)",
    )
    parser.add_argument(
        "--gc-tuned", action="store_true", help="also run the opt-in GC tuning as a row"
    )
    parser.add_argument("--postgres", action="store_true", help="also run on $SAGAFLOW_PG_DSN")
    args = parser.parse_args()
    runs = programs(args)
    results: dict[str, list[dict[str, object]]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, command in runs.items():
            results[name].append(run(command))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    def median_of(name: str, field: str) -> float | None:
        return _median([r.get(field) for r in results[name]])  # type: ignore[misc]

    median = {name: float(median_of(name, "events_per_s") or 0.0) for name in runs}
    print(f"N={args.n:,} W={args.w:,}, medians of {args.rounds} alternated runs")
    print(
        f"{'program':42} {'events/s':>10} {'peak RSS MiB':>13} {'allocs/event':>13}"
        f" {'loop block ms':>14}"
    )
    for name in runs:
        print(
            f"{name:42} {median[name]:>10,.0f} {median_of(name, 'peak_rss_mib') or 0:>13.1f}"
            f" {_cell(median_of(name, 'gc_tracked_allocs_per_event'), '.2f', 13)}"
            f" {_cell(median_of(name, 'loop_block_max_ms'), '.1f', 14)}"
        )
    for label, ratio in ratios(median, args).items():
        print(f"{label:66} {ratio:5.2f}")


if __name__ == "__main__":
    main()
