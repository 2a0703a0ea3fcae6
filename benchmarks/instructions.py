"""Instructions per event under callgrind: a figure that a busy machine does not blur.

    python benchmarks/instructions.py      # sagaflow and the baselines, memory and SQLite
    python benchmarks/instructions.py --n0 300 --n1 900 --only "baseline memory"
    python benchmarks/instructions.py -- python benchmarks/bench_orders.py --store memory

Each program runs twice under `valgrind --tool=callgrind`, with `--n N0` and `--n N1`
orders appended to its command line (2,000 and 6,000 by default; W = 1,000), and with
PYTHONHASHSEED=0 so that the runs repeat exactly (and BENCH_LOOP_TICKER=off: the
loop-block ticker of `_measure.py` wakes on the wall clock, which callgrind slows down).
The startup (imports, opening the store) costs the same in both runs, so the difference
of the two totals over the difference of the events handled is what one event costs:

    instructions per event = (Ir(N1) - Ir(N0)) / (events(N1) - events(N0))

Ir counts the instructions of every thread (SQLite's worker thread too); the events come
from the program's own JSON line, which must say `ok`. Callgrind runs a program some
50 times slower than usual: the default sizes take a few minutes in all. Valgrind must
be installed (Debian: `apt-get install valgrind`). Prints one line per program, then a
JSON line with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROGRAMS = {
    "sagaflow memory": ["bench_orders.py", "--store", "memory"],
    "sagaflow sqlite": ["bench_orders.py", "--store", "sqlite", "--sync", "normal"],
    "baseline memory": ["baseline_memory.py", "--feed", "stream"],
    "baseline sqlite": ["baseline_sqlite.py", "--batch", "256", "--sync", "normal"],
}


def callgrind(command: list[str], tmp: Path) -> tuple[int, dict[str, object]]:
    """Run `command` under callgrind: its total instructions and its JSON line."""
    out = tmp / "callgrind.out"
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--dump-instr=no",
            "--compress-strings=no",
            *command,
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0", "BENCH_LOOP_TICKER": "off"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, object] = json.loads(lines[-1])
    if not result.get("ok"):
        raise SystemExit(f"{' '.join(command)} is not ok:\n{done.stderr}")
    totals = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if totals is None:
        raise SystemExit(f"no instruction total in {out}")
    return int(totals.group(1)), result


def per_event(command: list[str], n0: int, n1: int, w: int) -> dict[str, object]:
    """Instructions per event of `command`, from one run with N0 and one with N1 orders."""
    with tempfile.TemporaryDirectory() as tmp:
        ir0, small = callgrind([*command, "--n", str(n0), "--w", str(w)], Path(tmp))
        ir1, large = callgrind([*command, "--n", str(n1), "--w", str(w)], Path(tmp))
    events = int(large["events"]) - int(small["events"])  # type: ignore[call-overload]
    return {
        "n0": n0,
        "n1": n1,
        "w": w,
        "ir_n0": ir0,
        "ir_n1": ir1,
        "events": events,
        "instructions_per_event": round((ir1 - ir0) / events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n0", type=int, default=2_000, help="orders of the short run")
    parser.add_argument("--n1", type=int, default=6_000, help="orders of the long run")
    parser.add_argument("--w", type=int, default=1_000)
    parser.add_argument(
        "--only", action="append", choices=tuple(PROGRAMS), help="run only these programs"
    )
    parser.add_argument(
        "command", nargs="*", help="a program of your own (after --): it must take --n and --w"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    if args.command:
        commands = {" ".join(args.command): args.command}
    else:
        commands = {
            name: [sys.executable, str(HERE / script), *options]
            for name, (script, *options) in PROGRAMS.items()
            if not args.only or name in args.only
        }
    figures = {}
    print(f"instructions per event under callgrind, N {args.n0:,} -> {args.n1:,}, W={args.w:,}")
    for name, command in commands.items():
        figures[name] = per_event(command, args.n0, args.n1, args.w)
        print(f"{name:24} {figures[name]['instructions_per_event']:>10,}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
