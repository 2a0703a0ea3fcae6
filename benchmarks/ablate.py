"""Where the memory store's time goes: the benchmark with parts of sagaflow taken out.

    python benchmarks/ablate.py                  # N=20,000, W=1,000, medians of 5
    python benchmarks/ablate.py --rounds 1 --n 300 --w 50

Each variant runs `bench_orders.py --store memory` in a fresh process, alternated round
by round, with one part replaced in that process only:

- `no commit`: `MemoryStore.commit` does nothing (the store keeps nothing);
- `no JSON`: states and messages are not encoded (a constant stands for the JSON);
- `no commit, no JSON`: both;
- `gc off`: the cyclic garbage collector is disabled during the run.

These are analyses, not configurations: without its commit the run dispatches the same
commands, but nothing is stored. The printed ratios are against the hand-written
`baseline_memory.py --feed stream`, run in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys

from compare import HERE, run

VARIANTS = {
    "as shipped": ([], ""),
    "no commit": ([], "commit"),
    "no JSON": ([], "json"),
    "no commit, no JSON": ([], "commit,json"),
    "gc off": (["--gc", "off"], ""),
}


def _without(parts: str) -> None:
    """Replace the named parts of sagaflow in this process (see the module docstring)."""
    import anyio.lowlevel

    from sagaflow._serialization import Serializer
    from sagaflow.stores import Changes, MemoryStore

    if "commit" in parts:

        async def commit(self: MemoryStore, changes: Changes) -> None:
            await anyio.lowlevel.checkpoint()

        MemoryStore.commit = commit  # type: ignore[method-assign]
    if "json" in parts:

        def encode(self: Serializer, value: object) -> tuple[str, str]:
            return "x", "{}"

        def dumps(self: Serializer, value: object, name: str) -> str:
            return "{}"

        Serializer.encode = encode  # type: ignore[method-assign]
        Serializer.dumps = dumps  # type: ignore[method-assign]


def _run(command: list[str], parts: str = "") -> dict[str, object]:
    return run(command, env={**os.environ, "SAGAFLOW_ABLATE": parts})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--w", type=int, default=1_000)
    args = parser.parse_args()
    size = ["--n", str(args.n), "--w", str(args.w)]
    baseline = [sys.executable, str(HERE / "baseline_memory.py"), *size, "--feed", "stream"]
    own = [sys.executable, __file__, "--bench", *size]
    rates: dict[str, list[float]] = {name: [] for name in ["baseline_memory", *VARIANTS]}
    for round_ in range(args.rounds):
        rates["baseline_memory"].append(float(_run(baseline)["events_per_s"]))
        for name, (options, parts) in VARIANTS.items():
            rates[name].append(float(_run([*own, *options], parts)["events_per_s"]))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"N={args.n} W={args.w}, MemoryStore, medians of {args.rounds} alternated runs")
    print(f"{'run':24} {'events/s':>10} {'vs baseline':>16}")
    for name, rate in median.items():
        print(f"{name:24} {rate:>10,.0f} {rate / median['baseline_memory']:>16.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bench"]:
        _without(os.environ.get("SAGAFLOW_ABLATE", ""))
        sys.argv = [str(HERE / "bench_orders.py"), "--store", "memory", *sys.argv[2:]]
        runpy.run_path(str(HERE / "bench_orders.py"), run_name="__main__")
    else:
        main()
