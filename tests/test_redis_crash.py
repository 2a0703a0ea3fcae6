"""Redis Streams in and out, proven on the real server with SIGKILLs.

A producer (a thread here) writes `Bump` events to the stream `P:in` while
`redis_worker.py` consumes them (acknowledging after commit) and appends `Bumped`
commands to `P:out`:

- on SQLite, one worker is SIGKILLed at random moments again and again and started
  again (same consumer name: it reads its own pending entries first);
- on PostgreSQL with `cluster=True`, several workers share the consumer group and the
  schema, one is SIGKILLed and started again under a new consumer name (the others take
  its pending entries over once idle), and a few hot keys make them race on instances.

Then a model check on the output stream: every event reached its output at least once,
each `(key, seq)` under one stable command id, and per key the counters `n` are exactly
1..m (no event lost, none applied twice, no lost update); nothing is pending or
dead-lettered. CI runs a short form; `SAGAFLOW_SOAK=1` runs longer ones.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from _redis_server import redis_client, redis_url, stream_name  # noqa: F401

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL"),
]

WORKER = Path(__file__).with_name("redis_worker.py")
KILLED = -signal.SIGKILL
SOAK = os.environ.get("SAGAFLOW_SOAK") == "1"


def produce(client: Any, prefix: str, events: list[tuple[str, int]], pace: float) -> None:
    """Write the events (with their ids) at `pace` seconds apart, then mark the end."""
    last = b""
    for key, seq in events:
        data = json.dumps({"key": key, "seq": seq})
        last = client.xadd(f"{prefix}:in", {"type": "Bump", "data": data, "id": f"{key}:{seq}"})
        if pace:
            time.sleep(pace)
    client.set(f"{prefix}:done", last)


def script(keys: int, count: int, seed: int) -> list[tuple[str, int]]:
    """`count` events over `keys` keys in a random order, numbered per key."""
    rng = random.Random(seed)
    seqs: dict[str, int] = defaultdict(int)
    events = []
    for _ in range(count):
        key = f"k{rng.randrange(keys)}"
        events.append((key, seqs[key]))
        seqs[key] += 1
    return events


class Workers:
    """Worker processes; whatever still runs at the end is killed."""

    def __init__(self, tmp: Path, url: str, prefix: str, store: list[str]) -> None:
        self.tmp, self.prefix, self.store = tmp, prefix, store
        self.env = {**os.environ, "SAGAFLOW_REDIS_URL": url}
        self.procs: list[tuple[subprocess.Popen[str], Path]] = []

    def start(self, *args: str, backend: str) -> tuple[subprocess.Popen[str], Path]:
        out = self.tmp / f"worker-{len(self.procs)}.out"
        command = [sys.executable, str(WORKER), "--prefix", self.prefix, *self.store, *args]
        command += ["--backend", backend]
        with out.open("w") as stdout, (self.tmp / "workers.err").open("a") as stderr:
            proc = subprocess.Popen(
                command,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                text=True,
                env=self.env,
            )
        self.procs.append((proc, out))
        return proc, out

    def wait_started(self, proc: subprocess.Popen[str], out: Path) -> None:
        deadline = time.monotonic() + 60
        while "STARTED" not in out.read_text():
            assert proc.poll() is None, f"the worker exited early:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"the worker did not start:\n{self.stderr()}"
            time.sleep(0.02)

    def kill(self, proc: subprocess.Popen[str]) -> bool:
        """SIGKILL it; whether it was still running (not finished already)."""
        if proc.poll() is not None:
            assert proc.returncode == 0, f"the worker failed:\n{self.stderr()}"
            return False
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=30)
        # It may have finished just before the signal.
        assert code in (0, KILLED), f"the worker failed (exit {code}):\n{self.stderr()}"
        return code == KILLED

    def finish(
        self, proc: subprocess.Popen[str], out: Path, timeout: float = 120
    ) -> dict[str, Any]:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish in {timeout} s:\n{self.stderr()}")
        lines = [line for line in out.read_text().splitlines() if line.startswith("DONE ")]
        assert code == 0 and lines, f"the worker failed (exit {code}):\n{self.stderr()}"
        summary: dict[str, Any] = json.loads(lines[-1][len("DONE ") :])
        return summary

    def stderr(self) -> str:
        path = self.tmp / "workers.err"
        return "\n".join(path.read_text().splitlines()[-40:]) if path.exists() else ""

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers_factory(tmp_path: Path, redis_url: str, stream_name: str) -> Iterator[Any]:  # noqa: F811
    made: list[Workers] = []

    def make(store: list[str]) -> Workers:
        workers = Workers(tmp_path, redis_url, stream_name, store)
        made.append(workers)
        return workers

    yield make
    for workers in made:
        workers.stop()


def check_model(client: Any, prefix: str, events: list[tuple[str, int]]) -> None:
    """The output stream against what the events must produce (see the module doc)."""
    ids: dict[tuple[str, int], set[str]] = defaultdict(set)
    payloads: dict[str, set[tuple[str, int, int]]] = defaultdict(set)
    for _, raw in client.xrange(f"{prefix}:out"):
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        assert fields["type"] == "Bumped"
        data = json.loads(fields["data"])
        ids[(data["key"], data["seq"])].add(fields["id"])
        payloads[fields["id"]].add((data["key"], data["seq"], data["n"]))

    # At least once: every event's command reached the output.
    assert sorted(ids) == sorted(events), "a command is missing or unexpected"
    # One stable id per event, one event per id.
    assert {e: i for e, i in ids.items() if len(i) > 1} == {}, "an event got two command ids"
    assert {i: p for i, p in payloads.items() if len(p) > 1} == {}, "an id was reused"
    # Applied once each, none lost, no lost update: per key, n is 1..m over its events.
    counters: dict[str, list[int]] = defaultdict(list)
    for key, _, n in (next(iter(p)) for p in payloads.values()):
        counters[key].append(n)
    assert {k: sorted(ns) for k, ns in counters.items()} == {
        k: list(range(1, len(ns) + 1)) for k, ns in counters.items()
    }
    # Nothing pending, nothing dead-lettered.
    assert client.xpending(f"{prefix}:in", "sagas")["pending"] == 0
    assert client.xlen(f"{prefix}:in:dead") == 0


def sqlite_kills(workers: Workers, client: Any, *, kills: int, count: int, seed: int) -> int:
    """SIGKILL the worker `kills` times at random moments while the producer writes;
    then let it finish. Returns how many kills interrupted it."""
    rng = random.Random(seed)
    events = script(keys=12, count=count, seed=seed)
    producer = threading.Thread(
        target=produce, args=(client, workers.prefix, events, 4.0 / count), daemon=True
    )
    producer.start()
    interrupted = 0
    try:
        for round_ in range(kills):
            proc, out = workers.start(
                "--consumer", "worker", backend=("asyncio", "trio")[round_ % 2]
            )
            workers.wait_started(proc, out)
            time.sleep(rng.uniform(0.1, 0.8))
            interrupted += workers.kill(proc)
        proc, out = workers.start("--consumer", "worker", backend=("asyncio", "trio")[kills % 2])
        summary = workers.finish(proc, out)
    finally:
        producer.join(timeout=60)
    assert summary["dead_letters"] == 0
    check_model(client, workers.prefix, events)
    return interrupted


def test_random_sigkills_of_the_consumer_lose_and_repeat_nothing(
    workers_factory: Any,
    redis_client: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """SQLite, one consumer, four kills while 400 events arrive."""
    workers = workers_factory(["--db", str(tmp_path / "sagas.db")])
    interrupted = sqlite_kills(workers, redis_client, kills=4, count=400, seed=7)
    assert interrupted >= 3, f"only {interrupted} of 4 kills interrupted the worker"


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="set SAGAFLOW_SOAK=1")
def test_random_sigkills_of_the_consumer_soak(
    workers_factory: Any,
    redis_client: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """SQLite, thirty kills while 3000 events arrive."""
    seed = int(os.environ.get("SAGAFLOW_SOAK_SEED", "1"))
    workers = workers_factory(["--db", str(tmp_path / "sagas.db")])
    sqlite_kills(workers, redis_client, kills=30, count=3000, seed=seed)


def cluster_run(
    workers: Workers, client: Any, *, processes: int, count: int, kills: int, seed: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = script(keys=5, count=count, seed=seed)  # few keys: the processes race
    producer = threading.Thread(
        target=produce, args=(client, workers.prefix, events, 3.0 / count), daemon=True
    )
    running = [
        workers.start("--cluster", backend=("asyncio", "trio")[i % 2]) for i in range(processes)
    ]
    for proc, out in running:
        workers.wait_started(proc, out)
    producer.start()
    try:
        for _ in range(kills):
            victim = rng.randrange(processes)
            time.sleep(rng.uniform(0.3, 1.5))
            assert workers.kill(running[victim][0]), "the victim had finished already"
            running[victim] = workers.start("--cluster", backend="trio")
        summaries = [workers.finish(proc, out) for proc, out in running]
    finally:
        producer.join(timeout=60)
    check_model(client, workers.prefix, events)
    return summaries


@pytest.mark.postgres
def test_several_consumers_on_postgres_one_killed_lose_no_update(
    workers_factory: Any,
    redis_client: Any,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    """Three cluster-mode processes in one consumer group, one SIGKILLed mid-run and
    started again under a new name; its pending entries are taken over."""
    workers = workers_factory(["--schema", pg_schema])
    workers.env["SAGAFLOW_PG_DSN"] = postgres_dsn
    summaries = cluster_run(workers, redis_client, processes=3, count=600, kills=1, seed=3)
    assert sum(s["dead_letters"] for s in summaries) == 0
    assert sum(s["conflicts"] for s in summaries) > 0  # the processes did race


@pytest.mark.postgres
@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="set SAGAFLOW_SOAK=1")
def test_several_consumers_on_postgres_killed_again_and_again_soak(
    workers_factory: Any,
    redis_client: Any,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    seed = int(os.environ.get("SAGAFLOW_SOAK_SEED", "1"))
    workers = workers_factory(["--schema", pg_schema])
    workers.env["SAGAFLOW_PG_DSN"] = postgres_dsn
    cluster_run(workers, redis_client, processes=4, count=4000, kills=6, seed=seed)
