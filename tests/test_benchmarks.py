"""The benchmark stays runnable and correct (its speed is measured elsewhere, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
