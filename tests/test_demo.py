"""`python -m sagaflow demo`: the same mix of outcomes at any size, a summary that adds up,
and a run that resumes, after a stop or a crash, from the SQLite file.

Every order's fate is decided by its number (o3, o13, ... declined; o7, o17, ... never
answered; o23, o123, ... declined and their cancellation fails), and time is virtual,
moved only when the runtime is idle: the counts below are exact on any machine.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sagaflow._demo import DemoResult, run_demo

ROOT = Path(__file__).resolve().parent.parent


def command(*args: str) -> list[str]:
    return [sys.executable, "-W", "error", "-m", "sagaflow", *args]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def demo(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        command("demo", "--db", "orders.db", "--quiet", *args),
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    return done.stdout


def summary(text: str) -> dict[str, int]:
    names = "completed|compensated|timed out|dead letters|unfinished|in flight|resumed"
    return {name: int(value) for name, value in re.findall(rf"^  ({names})\s+(\d+)", text, re.M)}


def mix(orders: int) -> dict[str, int]:
    """The summary of `orders` orders run to the end (in this file's first run)."""
    tens, ones = divmod(orders, 10)
    declined = tens + (ones > 3)
    dead = orders // 100 + (orders % 100 > 23)
    unanswered = tens + (ones > 7)
    return {
        "completed": orders - declined - unanswered,
        "compensated": declined - dead,
        "timed out": unanswered,
        "dead letters": dead,
        "unfinished": 0,
        "in flight": dead,
    }


def test_mix_counts_the_fates_by_number() -> None:
    """The helper the other tests compare with, checked by hand once."""
    assert mix(2000) == {
        "completed": 1600,
        "compensated": 180,
        "timed out": 200,
        "dead letters": 20,
        "unfinished": 0,
        "in flight": 20,
    }
    assert mix(124) == {
        "completed": 99,  # 124 - 13 declined (o3 .. o123) - 12 unanswered (o7 .. o117)
        "compensated": 11,
        "timed out": 12,
        "dead letters": 2,  # o23, o123
        "unfinished": 0,
        "in flight": 2,
    }


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_stopped_demo_resumes_and_every_order_ends_one_way(tmp_path: Path, backend: str) -> None:
    """The first run places 60 of 100 orders and stops with what needs time unfinished
    (payments being retried, payments waiting for their timeout); the second resumes
    them, places the rest, and every order ends exactly one way."""
    first = demo(tmp_path, "--orders", "100", "--stop-after", "60", "--backend", backend)
    second = demo(tmp_path, "--orders", "100", "--backend", backend)

    assert first.startswith("sagaflow demo on orders.db: 60 orders\n")
    assert "stopped early: run the same command again to resume" in first
    assert summary(first) == {
        "completed": 48,
        "compensated": 0,
        "timed out": 0,
        "dead letters": 0,
        "unfinished": 12,  # o3 .. o53 still retried, o7 .. o57 waiting for the timeout
        "in flight": 12,
    }
    assert second.startswith(
        "resuming: 12 order(s) in flight from an earlier run\n"
        "sagaflow demo on orders.db: 100 orders\n"
    )
    assert summary(second) == {"resumed": 12, **mix(100)}
    assert "stopped early" not in second


@pytest.mark.anyio
async def test_the_mix_is_the_same_at_a_larger_size_and_the_summary_adds_up(
    tmp_path: Path,
) -> None:
    """3,000 orders in five rounds (with the wall-clock timeout of the first demo, most
    of 5,000 timed out): the counts are exact, and every order is counted once."""
    out = io.StringIO()

    result = await run_demo(
        orders=3000, db=str(tmp_path / "orders.db"), progress=False, out=out, round_size=700
    )

    assert result == DemoResult(
        orders=3000,
        completed=2400,
        compensated=270,
        timed_out=300,
        dead_letters=30,
        unfinished=0,
        in_flight=30,
        resumed_instances=0,
        events_handled=3 * 3000 + 30,  # placed, reserved, paid/failed/timed out; + failed
        seconds=result.seconds,
        finished=True,
    )
    counted = (result.completed, result.compensated, result.timed_out, result.dead_letters)
    assert sum(counted) + result.unfinished == result.orders
    assert summary(out.getvalue()) == mix(3000)


def test_in_flight_is_what_sagaflow_instances_lists(tmp_path: Path) -> None:
    """The summary's "in flight" counts the instances the file keeps, as `instances`
    does: the orders whose cancellation failed, held for an operator."""
    text = demo(tmp_path, "--orders", "300")
    listed = subprocess.run(
        command("instances", "sqlite:orders.db", "--json"),
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    instances = json.loads(listed.stdout)
    assert summary(text)["in flight"] == len(instances) == 3
    assert [(i["key"], i["status"]) for i in instances] == [
        ("o123", "compensation_failed"),
        ("o223", "compensation_failed"),
        ("o23", "compensation_failed"),
    ]
    hint = "the dead letters' and unfinished instances: sagaflow instances sqlite:orders.db"
    assert f"  in flight      3  {hint}\n" in text


def test_a_demo_killed_midway_resumes_with_the_same_mix(tmp_path: Path) -> None:
    """SIGKILL as soon as the first orders have finished: the rerun counts every order
    once, with the same outcomes as a run never interrupted (no reply lost, none
    applied twice, no outcome lost)."""
    outcomes = tmp_path / "orders.db.outcomes"
    process = subprocess.Popen(
        command("demo", "--db", "orders.db", "--quiet", "--orders", "5000"),
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (outcomes.exists() and outcomes.stat().st_size) and process.poll() is None:
            assert time.monotonic() < deadline, "the demo finished no order in 60 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL  # it was still running

    second = demo(tmp_path, "--orders", "5000")

    resumed = summary(second).pop("resumed")
    assert resumed > 0  # the kill left orders in flight
    assert second.startswith(f"resuming: {resumed} order(s) in flight from an earlier run\n")
    assert "sagaflow demo on orders.db: 5000 orders\n" in second
    assert {k: v for k, v in summary(second).items() if k != "resumed"} == mix(5000)


@pytest.mark.anyio
async def test_outcomes_of_a_deleted_file_are_forgotten(tmp_path: Path) -> None:
    """The outcomes file belongs to its SQLite file: with the SQLite file gone, a new
    run starts from nothing instead of counting the old orders."""
    db = tmp_path / "orders.db"
    await run_demo(orders=30, db=str(db), progress=False, out=io.StringIO())
    for path in tmp_path.glob("orders.db*"):
        if path.suffix != ".outcomes":
            path.unlink()

    result = await run_demo(orders=20, db=str(db), progress=False, out=io.StringIO())

    assert (result.orders, result.completed) == (20, 16)


@pytest.mark.soak
@pytest.mark.skipif(os.environ.get("SAGAFLOW_SOAK") != "1", reason="set SAGAFLOW_SOAK=1")
def test_thirty_thousand_orders_end_with_the_same_mix(tmp_path: Path) -> None:
    """The size that once waited for ever on a held outbox, and timed out most orders."""
    assert summary(demo(tmp_path, "--orders", "30000")) == mix(30000)
