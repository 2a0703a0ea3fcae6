"""The benchmarks stay runnable and correct (their speed is measured elsewhere, not here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _postgres_server import postgres_dsn  # noqa: F401
from _redis_server import redis_url  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("SAGAFLOW_BENCH_DIR", ROOT.parent / "shared" / "bench"))

needs_limits = pytest.mark.skipif(
    not (BENCH_DIR / "limit_memory.py").exists(),
    reason=f"the shared limit programs are not at {BENCH_DIR} (set SAGAFLOW_BENCH_DIR)",
)

# The fields every orders program prints (bench_orders.py and the baselines alike).
FIELDS = {
    "system",
    "mode",
    "n",
    "w",
    "events",
    "seconds",
    "events_per_s",
    "peak_rss_mib",
    "ok",
    "backend",
    "feed",
    "commands",
    "gc",
    "rss_start_mib",
    "cpu_seconds",
    "gc_tracked_allocs",
    "gc_tracked_allocs_per_event",
    "gc_collections",
    "gc_threshold",
    "loop_block_max_ms",
}


def _run(name: str, *args: str, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**(os.environ if env is None else env), "BENCH_DATA_DIR": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _result(name: str, *args: str, tmp_path: Path) -> dict[str, Any]:
    """The JSON line of a short run (N=300, W=50) of one orders program."""
    out = _run(name, "--n", "300", "--w", "50", *args, tmp_path=tmp_path)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _checked(result: dict[str, Any]) -> tuple[object, ...]:
    """What a short run must show: ok, the workload's event and command counts, the
    figures next to events/s."""
    return (
        result["ok"],
        result["events"],
        result["commands"],
        FIELDS - result.keys(),
        result["gc_tracked_allocs_per_event"] > 0,
        [isinstance(c, int) and c >= 0 for c in result["gc_collections"]],
        result["loop_block_max_ms"] >= 0,
    )


EXPECTED = (True, 1170, 930, set(), True, [True, True, True], True)


@pytest.mark.parametrize(
    ("store", "backend"), [("memory", "asyncio"), ("memory", "trio"), ("sqlite", "asyncio")]
)
def test_orders_benchmark_runs_and_dispatches_exactly_the_expected_commands(
    store: str, backend: str, tmp_path: Path
) -> None:
    """A short run (N=300, W=50) checks every command, as the full run does, and reports
    allocations, collections and the loop's longest block with the interpreter's GC
    settings."""
    result = _result("bench_orders.py", "--store", store, "--backend", backend, tmp_path=tmp_path)
    assert (*_checked(result), result["gc_freeze"]) == (*EXPECTED, False)


def test_orders_benchmark_applies_and_reports_the_opt_in_gc_tuning(tmp_path: Path) -> None:
    """--gc-threshold sets the young generation's threshold, --gc-freeze freezes the
    setup's objects; the output says so."""
    result = _result("bench_orders.py", "--gc-threshold", "5000", "--gc-freeze", tmp_path=tmp_path)
    assert (*_checked(result), result["gc_threshold"][0], result["gc_freeze"]) == (
        *EXPECTED,
        5000,
        True,
    )


@pytest.mark.parametrize(
    "options",
    [
        ["--feed", "stream"],
        ["--feed", "direct", "--backend", "trio"],
        ["--feed", "stream", "--discard"],
    ],
)
def test_baseline_memory_does_the_workload_and_reports_the_benchmark_fields(
    options: list[str], tmp_path: Path
) -> None:
    """The hand-written in-memory baseline dispatches exactly the expected commands and
    prints the fields bench_orders.py prints."""
    result = _result("baseline_memory.py", *options, tmp_path=tmp_path)
    assert (*_checked(result), result["system"]) == (*EXPECTED, "baseline_memory")


@pytest.mark.parametrize(
    "options",
    [
        ["--batch", "256", "--sync", "normal"],
        ["--batch", "1", "--sync", "full", "--backend", "trio"],
        ["--batch", "7", "--inline"],
    ],
)
def test_baseline_sqlite_does_the_workload_and_leaves_an_empty_database(
    options: list[str], tmp_path: Path
) -> None:
    """The hand-written SQLite baseline dispatches exactly the expected commands, one
    transaction per batch (plus the last one for the sent commands' rows), and leaves no
    state or outbox row."""
    result = _result("baseline_sqlite.py", *options, tmp_path=tmp_path)
    batch = int(options[1])
    assert (*_checked(result), result["batches"]) == (*EXPECTED, -(-1170 // batch) + 1)


def _table(out: str) -> tuple[list[str], list[str]]:
    """The row names and the ratio labels of compare.py's table."""
    lines = out.splitlines()
    rows = [line[:42].rstrip() for line in lines[2:] if " / " not in line]
    ratios = [line[:66].rstrip() for line in lines[2:] if " / " in line]
    return rows, ratios


def test_compare_runs_sagaflow_against_the_own_baselines_and_prints_the_ratios(
    tmp_path: Path,
) -> None:
    """The short form of the comparison: every program runs once and checks its commands;
    the shared limits stay out unless asked for."""
    env = {k: v for k, v in os.environ.items() if k != "SAGAFLOW_BENCH_DIR"}
    out = _run(
        "compare.py",
        *("--rounds", "1", "--n", "300", "--w", "50", "--big-w", "100"),
        tmp_path=tmp_path,
        env=env,
    )
    assert _table(out) == (
        [
            "baseline memory",
            "sagaflow memory asyncio",
            "sagaflow memory trio",
            "sagaflow memory shards=1",
            "baseline sqlite",
            "sagaflow sqlite asyncio",
            "sagaflow sqlite trio",
            "sagaflow sqlite shards=1",
            "baseline memory W=100",
            "sagaflow memory asyncio W=100",
        ],
        [
            "sagaflow memory asyncio / baseline memory (target >= 0.6)",
            "sagaflow sqlite asyncio / baseline sqlite (target >= 0.5)",
            "sagaflow memory shards=1 / baseline memory",
            "sagaflow sqlite shards=1 / baseline sqlite",
            "memory trio / memory asyncio (target >= 0.8)",
            "sqlite trio / sqlite asyncio (target >= 0.8)",
            "memory / baseline at W=100 (target >= 0.5)",
        ],
    )


@needs_limits
def test_compare_adds_the_shared_limits_and_the_gc_tuned_row_on_request(tmp_path: Path) -> None:
    """--limits DIR runs the shared limit programs in the same rounds, --gc-tuned the
    opt-in GC tuning; both get their rows and ratios."""
    out = _run(
        "compare.py",
        *("--rounds", "1", "--n", "300", "--w", "50", "--big-w", "0"),
        *("--limits", str(BENCH_DIR), "--gc-tuned"),
        tmp_path=tmp_path,
    )
    rows, ratios = _table(out)
    assert (rows[:6], rows[6:8], ratios[-5:]) == (
        [
            "limit_memory --feed stream",
            "baseline memory",
            "sagaflow memory asyncio",
            "sagaflow memory trio",
            "sagaflow memory shards=1",
            "sagaflow memory asyncio gc-tuned",
        ],
        ["limit_sqlite --batch 256", "baseline sqlite"],
        [
            "sagaflow memory asyncio gc-tuned / baseline memory",
            "sagaflow memory asyncio / limit_memory --feed stream",
            "sagaflow sqlite asyncio / limit_sqlite --batch 256",
            "baseline memory / limit_memory --feed stream",
            "baseline sqlite / limit_sqlite --batch 256",
        ],
    )


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instructions_counts_instructions_per_event_under_callgrind(tmp_path: Path) -> None:
    """Two tiny runs of the in-memory baseline under callgrind give a positive figure per
    event, from the difference of their totals."""
    out = _run(
        "instructions.py",
        *("--n0", "20", "--n1", "60", "--w", "10", "--only", "baseline memory"),
        tmp_path=tmp_path,
    )
    figures = json.loads(out.strip().splitlines()[-1])["baseline memory"]
    assert (figures["events"], figures["ir_n1"] > figures["ir_n0"]) == (156, True)
    assert figures["instructions_per_event"] > 0


@pytest.mark.postgres
def test_cluster_runs_one_and_two_processes_and_checks_every_command(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The short form of the cluster run: one and two processes on one PostgreSQL, every
    command dispatched exactly once across the processes, every event handled once."""
    env = {**os.environ, "SAGAFLOW_PG_DSN": request.getfixturevalue("postgres_dsn")}
    out = _run(
        "cluster.py",
        *("--processes", "1", "2", "--n", "100", "--w", "20"),
        tmp_path=tmp_path,
        env=env,
    )
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [
        (r["processes"], r["ok"], r["events"], r["commands"], sum(r["handled_per_process"]))
        for r in results
    ] == [(1, True, 390, 310, 390), (2, True, 390, 310, 390)]


def test_scaling_prints_one_line_per_window(tmp_path: Path) -> None:
    """The short form of the scaling run: two windows, the first one is the baseline."""
    out = _run("scaling.py", "--w", "50", "100", "--min-n", "300", tmp_path=tmp_path)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(row[0], row[1], row[-1]) for row in rows][:1] == [("50", "300", "1.00")]
    assert [row[0] for row in rows] == ["50", "100"]


def test_ablate_runs_every_variant_against_the_baseline(tmp_path: Path) -> None:
    """The short form of the ablation: each variant still dispatches the expected commands,
    measured against the own baseline."""
    out = _run("ablate.py", "--rounds", "1", "--n", "300", "--w", "50", tmp_path=tmp_path)
    names = [line[:24].strip() for line in out.splitlines()[2:]]
    assert names == [
        "baseline_memory",
        "as shipped",
        "no commit",
        "no JSON",
        "no commit, no JSON",
        "gc off",
    ]


def test_associations_measures_fan_out_and_routing_and_checks_the_results(tmp_path: Path) -> None:
    """The short form of the associations benchmark: every measurement runs on memory
    and SQLite, checks what every instance handled, and prints its figures."""
    out = _run(
        "associations.py",
        *("--fanout", "200", "--instances", "50", "--events", "300", "--rounds", "1"),
        *("--store", "memory"),
        tmp_path=tmp_path,
    )
    out += _run(
        "associations.py",
        *("--fanout", "200", "--instances", "50", "--events", "300", "--rounds", "1"),
        *("--store", "sqlite", "--backend", "trio"),
        tmp_path=tmp_path,
    )
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["store"], r["backend"], r["fanout_instances"], r["ok"]) for r in results] == [
        ("memory", "asyncio", 200, True),
        ("sqlite", "trio", 200, True),
    ]
    assert "fan-out to 200 instances" in out
    assert out.count("by association (cached)") == 2


def test_ack_overhead_compares_runs_with_and_without_acknowledgements(tmp_path: Path) -> None:
    """The short form: one round per store, both kinds of run dispatch the right commands."""
    out = _run("ack_overhead.py", "--rounds", "1", "--n", "300", "--w", "50", tmp_path=tmp_path)
    rows = [line.split()[:3] for line in out.splitlines()[1:]]
    assert rows == [
        [store, clock, pick]
        for store in ("memory", "sqlite")
        for clock in ("wall", "cpu")
        for pick in ("median", "best")
    ]


@pytest.mark.redis
@pytest.mark.parametrize(("store", "processes"), [("sqlite", "1"), ("postgres", "2")])
def test_redis_benchmark_runs_and_checks_every_command(
    store: str,
    processes: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The short form of the Redis end-to-end run: one process on SQLite, two sharing
    PostgreSQL in one consumer group."""
    env = {"SAGAFLOW_REDIS_URL": request.getfixturevalue("redis_url")}
    if store == "postgres":
        env["SAGAFLOW_PG_DSN"] = request.getfixturevalue("postgres_dsn")
    script = str(ROOT / "benchmarks" / "bench_redis.py")
    done = subprocess.run(
        [sys.executable, script, "--n", "300", "--store", store, "--processes", processes],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env, "BENCH_DATA_DIR": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["ok"], result["events"], result["processes"]) == (True, 300, int(processes))
