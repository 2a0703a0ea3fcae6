"""Throughput and peak memory as the number of live instances W grows (SQLite store).

    python benchmarks/scaling.py                       # W = 1,000 .. 1,000,000
    python benchmarks/scaling.py --w 1000 10000        # a subset

N is max(20,000, W) (`--min-n`) so that the window is full; commands are counted, not kept
(`--discard`), so peak RSS shows the runtime's own memory. Prints one line per W and the
ratio of events/s to the W=1,000 run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--w", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--store", default="sqlite")
    parser.add_argument("--sync", default="normal")
    parser.add_argument("--min-n", type=int, default=20_000, help="N is max(min-n, W)")
    args = parser.parse_args()
    base = None
    print(f"{'W':>10} {'N':>10} {'events/s':>10} {'peak RSS MiB':>13} {'vs W=1k':>8}")
    for w in args.w:
        n = max(args.min_n, w)
        command = [
            sys.executable,
            str(HERE / "bench_orders.py"),
            "--store",
            args.store,
            "--sync",
            args.sync,
            "--n",
            str(n),
            "--w",
            str(w),
            "--discard",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"W={w} failed:\n{done.stdout}\n{done.stderr}")
        result = json.loads(lines[-1])
        rate = float(result["events_per_s"])
        base = base or rate
        print(
            f"{w:>10,} {n:>10,} {rate:>10,.0f} {result['peak_rss_mib']:>13.1f} {rate / base:>8.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
