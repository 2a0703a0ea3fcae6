"""What acknowledgement after commit costs: `run(source)` against `run(source, ack=...)`.

    python benchmarks/ack_overhead.py                     # memory and SQLite, 5 rounds
    python benchmarks/ack_overhead.py --store sqlite --rounds 9

Runs the orders workload (`bench_orders.py`) in fresh processes, alternating without and
with `--ack` so that both see the same machine load, and prints the events/s of each
(the median and the best of the rounds) and their ratio (the target: acknowledged runs
within 10% of plain ones), by the wall clock and by the process's CPU time (steadier on
a shared machine; the best round is the one least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rate(store: str, n: int, w: int, backend: str, ack: bool) -> tuple[float, float]:
    """Events/s of one run, by the wall clock and by CPU time."""
    command = [sys.executable, str(HERE / "bench_orders.py"), "--store", store]
    command += ["--n", str(n), "--w", str(w), "--backend", backend, "--discard"]
    if ack:
        command.append("--ack")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    result = json.loads(lines[-1])
    if not result["ok"]:
        raise SystemExit(f"{' '.join(command)} dispatched the wrong commands")
    return float(result["events_per_s"]), result["events"] / result["cpu_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", nargs="+", default=["memory", "sqlite"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--w", type=int, default=1_000)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    header = f"{'store':<8} {'clock':<5} {'of':<7} {'run() ev/s':>12} {'run(ack=) ev/s':>15}"
    print(f"{header} {'ack/plain':>10}")
    for store in args.store:
        plain: list[tuple[float, float]] = []
        acked: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            plain.append(rate(store, args.n, args.w, args.backend, ack=False))
            acked.append(rate(store, args.n, args.w, args.backend, ack=True))
        for i, clock in enumerate(("wall", "cpu")):
            for label, pick in (("median", statistics.median), ("best", max)):
                a = pick(r[i] for r in plain)
                b = pick(r[i] for r in acked)
                print(
                    f"{store:<8} {clock:<5} {label:<7} {a:>12,.0f} {b:>15,.0f} {b / a:>10.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
