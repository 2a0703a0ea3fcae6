"""Run sagaflow and the hand-written limit programs alternately; print medians and ratios.

    python benchmarks/compare.py                 # N=20,000, W=1,000, 5 rounds
    python benchmarks/compare.py --rounds 1 --n 2000    # the short form CI runs

Each round runs every program once, in turn, so that drift of the machine's speed hits
all of them alike. The limit programs are read from $SAGAFLOW_BENCH_DIR, else
../shared/bench next to the repository. Every program checks its own result (`ok`);
a run that is not ok fails this script.
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


def programs(args: argparse.Namespace) -> dict[str, list[str]]:
    size = ["--n", str(args.n), "--w", str(args.w)]
    own = [sys.executable, str(HERE / "bench_orders.py"), *size]
    limit_memory = [sys.executable, str(BENCH_DIR / "limit_memory.py"), *size]
    limit_sqlite = [sys.executable, str(BENCH_DIR / "limit_sqlite.py"), *size]
    runs = {
        "limit_memory --feed stream": [*limit_memory, "--feed", "stream"],
        "sagaflow memory asyncio": [*own, "--store", "memory"],
        "sagaflow memory trio": [*own, "--store", "memory", "--backend", "trio"],
        "sagaflow memory shards=1": [*own, "--store", "memory", "--shards", "1"],
        "limit_sqlite --batch 256": [*limit_sqlite, "--batch", "256", "--sync", "normal"],
        "sagaflow sqlite asyncio": [*own, "--store", "sqlite", "--sync", "normal"],
        "sagaflow sqlite trio": [
            *own,
            "--store",
            "sqlite",
            "--sync",
            "normal",
            "--backend",
            "trio",
        ],
        "sagaflow sqlite shards=1": [
            *own,
            "--store",
            "sqlite",
            "--sync",
            "normal",
            "--shards",
            "1",
        ],
    }
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--w", type=int, default=1_000)
    parser.add_argument("--postgres", action="store_true", help="also run on $SAGAFLOW_PG_DSN")
    args = parser.parse_args()
    runs = programs(args)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    rss: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, command in runs.items():
            result = run(command)
            rates[name].append(float(result["events_per_s"]))  # type: ignore[arg-type]
            rss[name].append(float(result["peak_rss_mib"]))  # type: ignore[arg-type]
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"N={args.n} W={args.w}, medians of {args.rounds} alternated runs")
    print(f"{'program':32} {'events/s':>12} {'peak RSS MiB':>13}")
    # "shards=1": the same, with Runtime(shards=1), the fastest setting when handlers
    # do not wait on I/O (one batch at a time, so no concurrency between instances).
    for name in runs:
        print(f"{name:32} {median[name]:>12,.0f} {statistics.median(rss[name]):>13.1f}")
    ratios = {
        "memory asyncio / limit_memory stream (target >= 0.6)": median["sagaflow memory asyncio"]
        / median["limit_memory --feed stream"],
        "sqlite asyncio / limit_sqlite batch 256 (target >= 0.5)": median["sagaflow sqlite asyncio"]
        / median["limit_sqlite --batch 256"],
        "memory shards=1 / limit_memory stream": median["sagaflow memory shards=1"]
        / median["limit_memory --feed stream"],
        "sqlite shards=1 / limit_sqlite batch 256": median["sagaflow sqlite shards=1"]
        / median["limit_sqlite --batch 256"],
        "memory trio / memory asyncio (target >= 0.8)": median["sagaflow memory trio"]
        / median["sagaflow memory asyncio"],
        "sqlite trio / sqlite asyncio (target >= 0.8)": median["sagaflow sqlite trio"]
        / median["sagaflow sqlite asyncio"],
    }
    for label, ratio in ratios.items():
        print(f"{label:58} {ratio:5.2f}")


if __name__ == "__main__":
    main()
