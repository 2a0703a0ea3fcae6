"""`python -m sagaflow demo`: runs the order saga on SQLite, and a second run resumes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def demo(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sagaflow", "demo", "--db", "orders.db", "--quiet", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def summary(text: str) -> dict[str, int]:
    return {
        name: int(value)
        for name, value in re.findall(
            r"^  (completed|compensated|timed out|dead letters|in flight|resumed)\s+(\d+)",
            text,
            re.M,
        )
    }


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_stopped_demo_resumes_and_every_order_ends_one_way(tmp_path: Path, backend: str) -> None:
    """The first run places 60 of 100 orders and stops with orders in flight; the second
    resumes them, places the rest, and every order ends exactly one way: shipped,
    compensated (payment declined), timed out (no answer), or a dead letter (its
    cancellation failed for good)."""
    first = demo(tmp_path, "--orders", "100", "--stop-after", "60", "--backend", backend)
    assert "stopped early: run the same command again to resume" in first
    # Unpaid orders wait a second for their payment timeout, so some are normally still
    # in flight when the first run stops (none only on a very slow machine).
    in_flight = summary(first)["in flight"]

    second = demo(tmp_path, "--orders", "100", "--backend", backend)
    expected = {"completed": 80, "compensated": 9, "timed out": 10, "dead letters": 1}
    if in_flight:
        assert f"resuming: {in_flight} order(s) in flight from an earlier run" in second
        expected["resumed"] = in_flight
    assert summary(second) == {**expected, "in flight": 0}
