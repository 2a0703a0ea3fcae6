"""The benchmark stays runnable and correct (its speed is measured elsewhere, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _postgres_server import postgres_dsn  # noqa: F401
from _redis_server import redis_url  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("SAGAFLOW_BENCH_DIR", ROOT.parent / "shared" / "bench"))

pytestmark = pytest.mark.skipif(
    not (BENCH_DIR / "_workload.py").exists() and not os.environ.get("CI"),
    reason=f"the shared workload is not at {BENCH_DIR} (set SAGAFLOW_BENCH_DIR)",
)


@pytest.mark.parametrize(
    ("store", "backend"), [("memory", "asyncio"), ("memory", "trio"), ("sqlite", "asyncio")]
)
def test_orders_benchmark_runs_and_dispatches_exactly_the_expected_commands(
    store: str, backend: str, tmp_path: Path
) -> None:
    """A short run (N=300, W=50) checks every command, as the full run does."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_orders.py"),
            "--store",
            store,
            "--backend",
            backend,
            "--n",
            "300",
            "--w",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BENCH_DATA_DIR": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["ok"], result["events"], result["commands"]) == (True, 1170, 930)


def _script(name: str, *args: str, tmp_path: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BENCH_DATA_DIR": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_compare_runs_every_program_and_prints_the_ratios(tmp_path: Path) -> None:
    """The short form of the comparison: every program runs once and checks its commands."""
    out = _script("compare.py", "--rounds", "1", "--n", "300", "--w", "50", tmp_path=tmp_path)
    programs = [line.split()[0] for line in out.splitlines()[2:10]]
    ratios = [line for line in out.splitlines() if "/" in line and "target" in line]
    assert (programs, len(ratios)) == (
        ["limit_memory"] + ["sagaflow"] * 3 + ["limit_sqlite"] + ["sagaflow"] * 3,
        4,
    )


def test_scaling_prints_one_line_per_window(tmp_path: Path) -> None:
    """The short form of the scaling run: two windows, the first one is the baseline."""
    out = _script("scaling.py", "--w", "50", "100", "--min-n", "300", tmp_path=tmp_path)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(row[0], row[1], row[-1]) for row in rows][:1] == [("50", "300", "1.00")]
    assert [row[0] for row in rows] == ["50", "100"]


def test_ablate_runs_every_variant_against_the_limit(tmp_path: Path) -> None:
    """The short form of the ablation: each variant still dispatches the expected commands."""
    out = _script("ablate.py", "--rounds", "1", "--n", "300", "--w", "50", tmp_path=tmp_path)
    names = [line[:24].strip() for line in out.splitlines()[2:]]
    assert names == [
        "limit_memory",
        "as shipped",
        "no commit",
        "no JSON",
        "no commit, no JSON",
        "gc off",
    ]


def test_associations_measures_fan_out_and_routing_and_checks_the_results(tmp_path: Path) -> None:
    """The short form of the associations benchmark: every measurement runs on memory
    and SQLite, checks what every instance handled, and prints its figures."""
    out = _script(
        "associations.py",
        *("--fanout", "200", "--instances", "50", "--events", "300", "--rounds", "1"),
        *("--store", "memory"),
        tmp_path=tmp_path,
    )
    out += _script(
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
    out = _script("ack_overhead.py", "--rounds", "1", "--n", "300", "--w", "50", tmp_path=tmp_path)
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
