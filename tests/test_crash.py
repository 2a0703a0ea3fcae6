"""Crash safety on SQLite: SIGKILL a real worker process anywhere, restart it, check.

`crash_worker.py` runs an order saga on a SQLite file and logs every dispatch attempt
(fsync'd before the dispatcher returns). These tests kill it with SIGKILL at chosen
points (before and after a commit, while a timer is due, in the middle of a dispatch,
during a compensation, around the commit that handles a command failed for good) and
at random moments, start it again on the same file until it
finishes, and check the log against a model of what the event script must produce:

- every command is delivered, and each one (type, order, event) under one command id
  only: a repeat is a redelivery of the same id (at least once, never a new command);
- no event is applied twice: every handler bumps a counter that the commands carry, so
  a second application shows up as another `n` (and another id);
- every due timeout fires exactly once, and none that was cancelled fires;
- a command that failed for good is handled once: one compensation chain, under one
  set of ids, whether the crash came before or after its handler's commit;
- compensations run in order and continue where the crash stopped them;
- an instance's commands are first delivered in the order they were produced;
- nothing is left over: no instance, outbox row, schedule, dead letter or unmatched event.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from crash_worker import kind, order_id

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="needs SIGKILL and select() on pipes"
)

WORKER = Path(__file__).with_name("crash_worker.py")
ORDERS = 40
RUN_TIMEOUT = 30.0  # seconds one worker run may take
KILLED = -signal.SIGKILL
BACKENDS = ("asyncio", "trio")


class Key(NamedTuple):
    """One logical command: what it is, for which order, caused by which event."""

    type: str
    order: str
    event: str


class Line(NamedTuple):
    """One dispatch attempt as the worker logged it."""

    id: str
    key: Key
    n: int
    kind: str
    ok: bool


# -- the model ----------------------------------------------------------------------


def expected(orders: int) -> tuple[dict[Key, int], dict[Key, int], dict[str, list[Key]]]:
    """What the script must produce.

    Returns:
        The delivered commands with their counter `n`, the commands that are attempted
        but never delivered (the charges that fail for good), and for every order its
        delivered commands in the order they are produced.
    """
    delivered: dict[Key, int] = {}
    failing: dict[Key, int] = {}
    order: dict[str, list[Key]] = {}
    for i in range(orders):
        oid = order_id(i)
        reserve = Key("Reserve", oid, f"{oid}:placed")
        charge = Key("Charge", oid, f"{oid}:pay")
        plan = kind(i)
        if plan == "fail":
            undos = [Key(f"Undo{j}", oid, "") for j in (1, 2, 3)]
            commands = {reserve: 1, **dict.fromkeys(undos, 3)}
            failing[charge] = 2
        elif plan == "expire":
            commands = {reserve: 1, Key("Expired", oid, ""): 2}
        else:
            commands = {reserve: 1, charge: 2, Key("Shipped", oid, f"{oid}:ship"): 3}
        delivered.update(commands)
        order[oid] = list(commands)
    return delivered, failing, order


def read_log(path: Path) -> list[Line]:
    lines = []
    for text in path.read_text().splitlines():
        entry = json.loads(text)
        payload = entry["payload"]
        key = Key(entry["type"], entry["order"], payload.get("event_id", ""))
        lines.append(Line(entry["id"], key, payload["n"], entry["kind"], entry["ok"]))
    return lines


def check_invariants(log: Path, orders: int, summary: dict[str, Any]) -> None:
    """Compare the dispatch log and the last run's summary with the model."""
    lines = read_log(log)
    want_delivered, want_failing, want_order = expected(orders)

    # At least once, with a stable id: one id per logical command and vice versa.
    ids: dict[Key, set[str]] = defaultdict(set)
    commands: dict[str, set[tuple[Key, int]]] = defaultdict(set)
    for line in lines:
        ids[line.key].add(line.id)
        commands[line.id].add((line.key, line.n))
    assert {k: v for k, v in ids.items() if len(v) > 1} == {}, "a command got a new id"
    assert {i: v for i, v in commands.items() if len(v) > 1} == {}, "an id was reused"

    # Every expected command delivered with the counter of one application per event,
    # and nothing else: no unexpected command, no timeout of a paid order.
    delivered = {line.key: line.n for line in lines if line.ok}
    assert delivered == want_delivered, (
        f"missing: {sorted(want_delivered.keys() - delivered.keys())}; "
        f"unexpected: {sorted(delivered.keys() - want_delivered.keys())}"
    )
    never = {line.key: line.n for line in lines if not line.ok and line.key not in delivered}
    assert never == want_failing

    # No event applied twice: per order, the counters seen are 1..m without a gap.
    counters: dict[str, set[int]] = defaultdict(set)
    for line in lines:
        counters[line.key.order].add(line.n)
    gaps = {
        o: sorted(ns) for o, ns in counters.items() if sorted(ns) != list(range(1, max(ns) + 1))
    }
    assert gaps == {}

    # Per instance, first deliveries follow the order the commands were produced in:
    # Reserve < Charge < Shipped, and each compensation chain Undo1 < Undo2 < Undo3
    # complete (it continued where a crash stopped it).
    first: dict[str, list[Key]] = defaultdict(list)
    seen: set[Key] = set()
    for line in lines:
        if line.ok and line.key not in seen:
            seen.add(line.key)
            first[line.key.order].append(line.key)
    assert dict(first) == want_order

    assert summary["dead_letters"] == []
    assert summary["events_unmatched"] == 0
    assert summary["events_dead_lettered"] == 0


# -- driving the worker ---------------------------------------------------------------


def worker_command(
    tmp: Path,
    *,
    backend: str,
    orders: int = ORDERS,
    pace: float = 0.0,
    crash: str | None = None,
    max_batch: int = 16,
) -> list[str]:
    command = [sys.executable, str(WORKER), "--db", str(tmp / "sagas.db")]
    command += ["--log", str(tmp / "dispatch.log"), "--orders", str(orders)]
    command += ["--backend", backend, "--pace", str(pace), "--max-batch", str(max_batch)]
    if crash is not None:
        command += ["--crash", crash]
    return command


def run_worker(
    tmp: Path,
    *,
    backend: str,
    orders: int = ORDERS,
    pace: float = 0.0,
    crash: str | None = None,
    max_batch: int = 16,
) -> subprocess.CompletedProcess[str]:
    command = worker_command(
        tmp, backend=backend, orders=orders, pace=pace, crash=crash, max_batch=max_batch
    )
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=os.environ.copy(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"{command} did not finish in {RUN_TIMEOUT} s:\n{tail(stderr or '')}")


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any] | None:
    """The worker's summary if it printed DONE, else None."""
    for line in result.stdout.splitlines():
        if line.startswith("DONE "):
            summary: dict[str, Any] = json.loads(line[len("DONE ") :])
            return summary
    return None


def finish(tmp: Path, *, backend: str, orders: int = ORDERS, pace: float = 0.0) -> dict[str, Any]:
    """Run the worker without a crash; it must finish. Returns its summary."""
    result = run_worker(tmp, backend=backend, orders=orders, pace=pace)
    summary = summary_of(result)
    if result.returncode == 0 and summary is not None:
        return summary
    pytest.fail(
        f"the worker did not finish (exit {result.returncode}):\n"
        f"{result.stdout}\n{tail(result.stderr)}"
    )


def crash_at(tmp: Path, *, backend: str, point: str, k: int) -> None:
    """Run the worker until the K-th `point`, where it must die (see `ROUNDS`)."""
    result = run_worker(tmp, backend=backend, crash=f"{point}:{k}", max_batch=1)
    assert result.returncode == KILLED, (
        f"expected a SIGKILL at {point}:{k}, got exit {result.returncode}:\n"
        f"{result.stdout}\n{tail(result.stderr)}"
    )
    assert summary_of(result) is None


# -- chosen crash points ------------------------------------------------------------

# Each point is hit in three runs in a row, at the K-th occurrence counted from the
# start of that run. Whether a run reaches its K must not depend on the machine's
# speed: with group commit, a slow commit lets more items pile up for the next one, so
# a run under load makes fewer commits (a third round once finished in fewer than 20).
# The crashing runs therefore take one item per batch (`--max-batch 1`): a commit
# applies at most one event, fired timeout or handled failure. The script has 90 events,
# 11 timeouts, 8 charges that fail for good, 117 deliveries and 24 compensation
# dispatches (40 orders), and a run killed at the K-th occurrence has got at most K of
# them done, so every K below is at most what the earlier rounds can have left over:
# `after-commit` 20 of at least 109 - 1 - 8 items (one commit each), and at the
# tightest, `timer-fired` 4 of at least 11 - 1 - 3 timeouts.
ROUNDS = {
    "before-commit": (1, 6, 15),
    "after-commit": (1, 8, 20),
    "timer-due": (1, 3, 4),
    "timer-fired": (1, 3, 4),
    "mid-dispatch": (1, 20, 40),
    "compensation": (1, 4, 7),
    "failure-before-commit": (1, 2, 3),
    "failure-after-commit": (1, 2, 3),
}


@pytest.mark.parametrize("point", list(ROUNDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_at_chosen_points_loses_and_repeats_nothing(
    tmp_path: Path, backend: str, point: str
) -> None:
    """Killed three times at `point`, the worker still produces exactly the model."""
    for k in ROUNDS[point]:
        crash_at(tmp_path, backend=backend, point=point, k=k)
    summary = finish(tmp_path, backend=backend)
    check_invariants(tmp_path / "dispatch.log", ORDERS, summary)


def test_sigkill_with_backend_switch_resumes_the_other_backends_file(tmp_path: Path) -> None:
    """A file left by a killed asyncio worker is finished by trio, and the other way."""
    crash_at(tmp_path, backend="asyncio", point="after-commit", k=10)
    crash_at(tmp_path, backend="trio", point="mid-dispatch", k=30)
    crash_at(tmp_path, backend="asyncio", point="compensation", k=3)
    summary = finish(tmp_path, backend="trio")
    check_invariants(tmp_path / "dispatch.log", ORDERS, summary)


# -- random kills -------------------------------------------------------------------


def kill_after_start(tmp: Path, *, backend: str, delay: float, orders: int, pace: float) -> bool:
    """Start the worker, SIGKILL it `delay` seconds after it reports STARTED.

    Returns:
        Whether the kill interrupted it (rather than finding it finished).
    """
    command = worker_command(tmp, backend=backend, orders=orders, pace=pace)
    with (tmp / "stderr.log").open("a") as stderr:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=os.environ.copy()
        )
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + RUN_TIMEOUT
            started = False
            while not started:
                ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
                if not ready:
                    pytest.fail(f"the worker did not start in {RUN_TIMEOUT} s")
                line = proc.stdout.readline()
                if not line:
                    break  # exited before it started: reported below
                started = line.strip() == "STARTED"
            if started:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    if code == KILLED:
        return True
    assert code == 0, f"the worker failed (exit {code}):\n{tail((tmp / 'stderr.log').read_text())}"
    return False


def random_kills(tmp: Path, *, kills: int, seed: int, orders: int = ORDERS) -> int:
    """Kill `kills` runs at random moments (alternating backends), finish, check.

    The events trickle in over a few seconds (`--pace`), so that the kills land in
    every phase: placing, paying, failing charges, compensating, firing timeouts.

    Returns:
        How many runs the kill actually interrupted (the others had finished).
    """
    rng = random.Random(seed)
    pace = 0.04
    interrupted = 0
    for round_ in range(kills):
        interrupted += kill_after_start(
            tmp,
            backend=BACKENDS[round_ % 2],
            delay=rng.uniform(0.05, 0.8),
            orders=orders,
            pace=pace,
        )
    summary = finish(tmp, backend=BACKENDS[kills % 2], orders=orders, pace=pace)
    check_invariants(tmp / "dispatch.log", orders, summary)
    return interrupted


def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Five kills at random moments, then a clean run: the log matches the model."""
    interrupted = random_kills(tmp_path, kills=5, seed=20240611)
    # Most kills must interrupt work, or the test proves little.
    assert interrupted >= 3, f"only {interrupted} of 5 kills interrupted the worker"


@pytest.mark.parametrize(
    ("point", "backend"),
    [("after-commit", "asyncio"), ("mid-dispatch", "trio"), ("compensation", "asyncio")],
)
def test_sigkill_at_chosen_points_with_a_tiny_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, backend: str
) -> None:
    """The chosen points again, with room for two commands in memory (the rest are read
    back from the store): killed three times, the worker still produces the model."""
    monkeypatch.setenv("CRASH_OUTBOX_CAPACITY", "2")
    for k in ROUNDS[point]:
        crash_at(tmp_path, backend=backend, point=point, k=k)
    summary = finish(tmp_path, backend=backend)
    check_invariants(tmp_path / "dispatch.log", ORDERS, summary)


def test_sigkill_with_a_tiny_outbox_loses_and_repeats_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for two commands in memory, nearly every command waits in the store and
    is read back a page at a time, and completed instances end through the store: five
    kills at random moments, then a clean run, and the log still matches the model."""
    monkeypatch.setenv("CRASH_OUTBOX_CAPACITY", "2")
    # 80 orders trickle in for longer than five kills can take: every kill interrupts.
    interrupted = random_kills(tmp_path, kills=5, seed=20261207, orders=80)
    assert interrupted >= 3, f"only {interrupted} of 5 kills interrupted the worker"


@pytest.mark.soak
@pytest.mark.skipif(os.environ.get("SAGAFLOW_SOAK") != "1", reason="set SAGAFLOW_SOAK=1")
def test_sigkill_soak(tmp_path: Path) -> None:
    """Fifty random kills: ten fresh files with five kills each, every one checked."""
    seed = int(os.environ.get("SAGAFLOW_SOAK_SEED", "1"))
    for campaign in range(10):
        directory = tmp_path / f"campaign-{campaign}"
        directory.mkdir()
        random_kills(directory, kills=5, seed=seed * 1000 + campaign, orders=60)


@pytest.mark.soak
@pytest.mark.skipif(os.environ.get("SAGAFLOW_SOAK") != "1", reason="set SAGAFLOW_SOAK=1")
@pytest.mark.parametrize(
    ("backend", "crash"), [("asyncio", "after-commit:1"), ("trio", "before-commit:2")]
)
def test_sigkill_after_every_single_commit_soak(tmp_path: Path, backend: str, crash: str) -> None:
    """Every run gets exactly one commit through and dies: restarts from every state."""
    for _ in range(300):
        result = run_worker(tmp_path, backend=backend, crash=crash)
        summary = summary_of(result)
        if result.returncode == 0 and summary is not None:
            break
        assert result.returncode == KILLED, tail(result.stderr)
    else:
        pytest.fail("no progress after 300 runs")
    check_invariants(tmp_path / "dispatch.log", ORDERS, summary)
