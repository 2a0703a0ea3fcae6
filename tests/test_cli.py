"""The `sagaflow` command line, driven as a user drives it: a subprocess on real files.

The SQLite files are left by a real runtime (`ops_sagas.prepare`). Durations in tables
depend on the wall clock, so table outputs are compared with every duration replaced
by `<t>`; the JSON outputs are compared with the numbers read back from the store.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import ops_sagas
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from json_meaning import JsonText
from ops_sagas import Services, prepare

import sagaflow
from sagaflow import Runtime
from sagaflow._cli import format_duration, parse_duration
from sagaflow.stores import DeadLetter, InstanceRecord, OutboxRecord, SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SECRET = "s3cr3t-Pa55"


def cli(
    *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m sagaflow ARGS` and return what it printed and its exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(TESTS), env.get("PYTHONPATH")])
    )
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "sagaflow", *args],
        cwd=cwd or TESTS,
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def durations(text: str) -> str:
    """`text` with every duration (`42s`, `12m05s`, `3h00m`, `10d00h`) as `<t>`."""
    return re.sub(r"\b\d+(?:d\d\dh|h\d\dm|m\d\ds|s)\b", "<t>", text)


def cells(table: str, headers: list[str]) -> list[list[str]]:
    """The cells of an aligned table, cut where the header line's columns start.

    A row that is not aligned with the header comes out cut in the wrong places.
    """
    lines = table.splitlines()
    starts, at = [], 0
    for header in headers:
        at = lines[0].index(header, at)
        starts.append(at)
    ends = [*starts[1:], None]
    return [[line[a:b].rstrip() for a, b in zip(starts, ends, strict=True)] for line in lines]


def timestamps(text: str) -> str:
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", "<when>", text)


def read(path: Path) -> tuple[list[InstanceRecord], list[OutboxRecord], list[DeadLetter]]:
    """What the SQLite file holds: instances, outbox rows, dead letters."""

    async def go() -> tuple[list[InstanceRecord], list[OutboxRecord], list[DeadLetter]]:
        store = SQLiteStore(path)
        await store.open()
        try:
            return (
                await store.list_instances(),
                await store.list_outbox(),
                await store.list_dead_letters(),
            )
        finally:
            await store.close()

    return anyio.run(go)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A SQLite file prepared by a runtime (see `ops_sagas`)."""
    path = tmp_path / "ops.db"
    anyio.run(prepare, SQLiteStore(path))
    return path


@pytest.fixture
def url(db: Path) -> str:
    return f"sqlite://{db}"


def instance(path: Path, saga: str, key: str) -> InstanceRecord:
    (found,) = [r for r in read(path)[0] if (r.saga, r.key) == (saga, key)]
    return found


def letter_of(path: Path, kind: str) -> DeadLetter:
    (found,) = [d for d in read(path)[2] if d.kind == kind]
    return found


# -- instances -------------------------------------------------------------------------


INSTANCE_HEADERS = [
    "SAGA",
    "KEY",
    "STATUS",
    "AGE",
    "IDLE",
    "LAST EVENT",
    "DEAD",
    "SCHEDULES",
    "COMMANDS",
]


def test_instances_prints_an_aligned_table(url: str) -> None:
    result = cli("instances", url)

    assert (result.returncode, result.stderr) == (0, "")
    table, summary = result.stdout.split("\n\n")
    assert cells(table, INSTANCE_HEADERS) == [
        INSTANCE_HEADERS,
        ["order", "a1", "active", "10d00h", "10d00h", "Opened", "1", "expiry in 19d23h", "-"],
        [
            "order",
            "a2",
            "active",
            "3h00m",
            "3h00m",
            "Opened",
            "-",
            "expiry in 29d20h",
            "1 waiting; Reserve failed 1x, retry 2h59m overdue: "
            "ConnectionFailed: Reserve service down",
        ],
        ["order", "c1", "compensation_failed", "10d00h", "9d23h", "-", "1", "-", "1 held"],
        ["order", "n1", "active", "3h00m", "3h00m", "Opened", "-", "expiry in 29d20h", "-"],
        ["shipping", "s1", "active", "10d00h", "10d00h", "Paid", "1", "-", "-"],
    ]
    assert summary == "5 instance(s): order 4, shipping 1\n"


def test_instances_json_has_the_records_ages_and_pending_rows(db: Path, url: str) -> None:
    instances, outbox, letters = read(db)

    result = cli("instances", url, "--json")

    assert result.returncode == 0
    listed = json.loads(result.stdout)
    ages = [(row.pop("age"), row.pop("idle")) for row in listed]
    expected = []
    for r in instances:
        mine = [o for o in outbox if (o.saga, o.key) == (r.saga, r.key)]
        dead = [d for d in letters if (d.saga, d.key) == (r.saga, r.key)]
        expected.append(
            {
                "saga": r.saga,
                "key": r.key,
                "version": r.version,
                "status": r.status,
                "instance_id": r.instance_id,
                "created_at": r.created_at,
                "updated_at": r.updated_at,
                "last_event": r.last_event,
                "completed": r.completed,
                "state_version": 1,
                "schedules": [
                    {
                        "id": s["id"],
                        "saga": r.saga,
                        "key": r.key,
                        "name": "expiry",
                        "due": s["due"],
                        "to_self": True,
                        "type_name": "ops_sagas.Expired",
                        "seq": s["seq"],
                        "attempts": 0,
                        "trace": None,
                    }
                    for s in next(x for x in listed if x["key"] == r.key)["schedules"]
                ],
                "outbox": [
                    {
                        "id": o.id,
                        "saga": o.saga,
                        "key": o.key,
                        "seq": o.seq,
                        "kind": o.kind,
                        "type_name": o.type_name,
                        "attempts": o.attempts,
                        "due": o.due,
                        "error": o.error,
                        "trace": None,
                    }
                    for o in mine
                ],
                "dead_letters": [
                    {
                        "id": d.id,
                        "saga": d.saga,
                        "key": d.key,
                        "kind": d.kind,
                        "type_name": d.type_name,
                        "error": d.error,
                        "attempts": d.attempts,
                        "failed_at": d.failed_at,
                        "seq": d.seq,
                        "name": d.name,
                    }
                    for d in dead
                ],
                "associations": [],
            }
        )
    assert listed == expected
    assert [len(row["schedules"]) for row in listed] == [1, 1, 0, 1, 0]
    assert [(round(age / 3600), round(idle / 3600)) for age, idle in ages] == [
        (240, 240),
        (3, 3),
        (240, 240),
        (3, 3),
        (240, 240),
    ]


@pytest.mark.parametrize(
    ("options", "keys"),
    [
        (["--saga", "shipping"], ["s1"]),
        (["--status", "compensation_failed"], ["c1"]),
        (["--stalled", "1d"], ["a1", "c1", "s1"]),
        (["--stalled", "2h"], ["a1", "a2", "c1", "n1", "s1"]),
        (["--stalled", "1h30m", "--saga", "order"], ["a1", "a2", "c1", "n1"]),
        (["--stalled", "9d23h58m"], ["a1", "s1"]),
    ],
)
def test_instances_filters(url: str, options: list[str], keys: list[str]) -> None:
    result = cli("instances", url, "--json", *options)

    assert (result.returncode, [row["key"] for row in json.loads(result.stdout)]) == (0, keys)


def test_instances_finding_nothing_exits_1(url: str) -> None:
    table = cli("instances", url, "--saga", "order", "--status", "completing", "--stalled", "90m")
    as_json = cli("instances", url, "--json", "--stalled", "20d")

    assert (table.returncode, table.stdout, table.stderr) == (
        1,
        "",
        "no instances in flight (saga 'order', status 'completing', no progress for 1h30m)\n",
    )
    assert (as_json.returncode, as_json.stdout, as_json.stderr) == (
        1,
        "[]\n",
        "no instances in flight (no progress for 20d00h)\n",
    )


UNKNOWN_SAGA = (
    "no saga named 'OrderSaga' is in this store, only 'order', 'shipping': a saga goes by "
    "the name it was registered with (its class name, unless @registry.saga(name=...) gave "
    "another)\n"
)


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (["instances", "--saga", "OrderSaga"], ""),
        (["instances", "--saga", "OrderSaga", "--status", "active", "--json"], ""),
        (["dead-letters", "--saga", "OrderSaga"], ""),
        (["show", "OrderSaga", "a1"], "sagaflow show: "),
        (["abort", "OrderSaga", "a1", "--yes"], "sagaflow abort: "),
    ],
)
def test_a_saga_name_the_store_does_not_know_is_named_with_the_ones_it_does(
    url: str, args: list[str], prefix: str
) -> None:
    """A class name where the registered name belongs (`OrderSaga` for "order") is not
    "nothing found": the message lists the sagas the store holds."""
    command, *rest = args
    result = cli(command, url, *rest)

    assert (result.returncode, result.stderr) == (1, prefix + UNKNOWN_SAGA)
    assert result.stdout in ("", "[]\n")


def test_an_empty_store_says_it_holds_no_saga(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"

    async def create() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    anyio.run(create)
    result = cli("instances", f"sqlite://{path}", "--saga", "order")

    assert (result.returncode, result.stderr) == (
        1,
        "no saga named 'order' is in this store, which holds no instances at all\n",
    )


# -- show ------------------------------------------------------------------------------


def test_show_prints_one_instance_whole(db: Path, url: str) -> None:
    c1 = instance(db, "order", "c1")
    dead = letter_of(db, "compensate")
    (refund,) = [o for o in read(db)[1] if o.key == "c1"]

    result = cli("show", url, "order", "c1")

    assert result.returncode == 0
    head, state, schedules, outbox, letters, associations = result.stdout.split("\n\n")
    assert timestamps(durations(head)) == (
        "order c1\n"
        "  status       compensation_failed (completed)\n"
        f"  instance id  {c1.instance_id}\n"
        "  version      3\n"
        "  started      <when> (<t> ago)\n"
        "  last write   <when> (<t> ago)\n"
        "  last event   -"
    )
    assert state == 'state\n  {\n    "status": "failed: Release"\n  }'
    assert schedules == "schedules\n  none"
    outbox_lines = outbox.splitlines()
    assert outbox_lines[0] == "outbox"
    assert outbox_lines[-1] == (
        "  (held until the failed compensation is retried, or the instance aborted)"
    )
    outbox_headers = ["ID", "KIND", "TYPE", "ATTEMPTS", "NEXT", "PAYLOAD", "ERROR"]
    assert cells("\n".join(outbox_lines[1:-1]), outbox_headers) == [
        outbox_headers,
        [refund.id, "compensate", "Refund", "0", "-", JsonText('{"key": "c1"}'), "-"],
    ]
    assert letters.startswith("dead letters\n")
    letter_headers = ["ID", "KIND", "TYPE", "ATTEMPTS", "FAILED", "ERROR"]
    assert cells(letters.removeprefix("dead letters\n"), letter_headers) == [
        letter_headers,
        [
            dead.id,
            "compensate",
            "Release",
            "3",
            "9d23h ago",
            "ConnectionFailed: Release service down",
        ],
    ]
    assert all(line.startswith("  ") for line in letters.splitlines()[1:])
    assert associations == "associations\n  none\n"


def test_show_json_has_the_state_and_payloads(db: Path, url: str) -> None:
    c1 = instance(db, "order", "c1")

    result = cli("show", url, "order", "c1", "--json")

    shown = json.loads(result.stdout)
    assert (result.returncode, shown["state"], shown["version"], shown["instance_id"]) == (
        0,
        {"status": "failed: Release"},
        c1.version,
        c1.instance_id,
    )
    assert [(o["type_name"], o["payload"]) for o in shown["outbox"]] == [
        ("ops_sagas.Refund", {"key": "c1"})
    ]
    assert [(d["kind"], d["payload"]) for d in shown["dead_letters"]] == [
        ("compensate", {"key": "c1"})
    ]


def test_show_of_an_unknown_instance_exits_1(url: str) -> None:
    result = cli("show", url, "order", "zz")

    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        "sagaflow show: no instance of saga 'order' has key 'zz' (it never started, or it "
        "ended or was aborted)\n",
    )


# -- dead letters ----------------------------------------------------------------------


def test_dead_letters_prints_a_table_oldest_first(db: Path, url: str) -> None:
    compensate, send = letter_of(db, "compensate"), letter_of(db, "send")
    headers = ["ID", "SAGA", "KEY", "KIND", "TYPE", "ATTEMPTS", "FAILED", "ERROR"]

    result = cli("dead-letters", url)

    assert result.returncode == 0
    rows = cells(result.stdout, headers)
    assert [rows[0], rows[1], *sorted(rows[2:])] == [
        headers,
        [
            "order:a1:broken-1",
            "order",
            "a1",
            "event",
            "Broken",
            "1",
            "10d00h ago",
            "RuntimeError: cannot handle Broken('a1')",
        ],
        *sorted(
            [
                [
                    compensate.id,
                    "order",
                    "c1",
                    "compensate",
                    "Release",
                    "3",
                    "9d23h ago",
                    "ConnectionFailed: Release service down",
                ],
                [
                    send.id,
                    "shipping",
                    "s1",
                    "send",
                    "Notify",
                    "3",
                    "9d23h ago",
                    "ConnectionFailed: Notify service down",
                ],
            ]
        ),
    ]


def test_dead_letters_json_and_filter(db: Path, url: str) -> None:
    send = letter_of(db, "send")

    result = cli("dead-letters", url, "--saga", "shipping", "--json")

    assert (result.returncode, json.loads(result.stdout)) == (
        0,
        [
            {
                "id": send.id,
                "saga": "shipping",
                "key": "s1",
                "kind": "send",
                "type_name": "ops_sagas.Notify",
                "error": "ConnectionFailed: Notify service down",
                "attempts": 3,
                "failed_at": send.failed_at,
                "seq": send.seq,
                "name": None,
                "payload": {"key": "s1"},
            }
        ],
    )
    nothing = cli("dead-letters", url, "--saga", "OrderSaga")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (1, "", UNKNOWN_SAGA)


# -- retry, discard, abort -------------------------------------------------------------


async def run_sagas(path: Path) -> Services:
    """Start a runtime on the file (nothing fails now), let it do what is due, stop."""
    services = Services()
    async with Runtime(ops_sagas.registry, store=SQLiteStore(path), dispatch=services) as rt:
        await rt.drain()
    return services


def test_retry_puts_a_failed_compensation_back_and_a_runtime_resumes_it(db: Path, url: str) -> None:
    dead = letter_of(db, "compensate")
    before = instance(db, "order", "c1")

    result = cli("retry", url, dead.id)

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"retried {dead.id}: compensate Release of order c1 is back in the outbox, with its "
        "attempts reset\n"
        "instance order c1 is completing\n"
        "a runtime dispatches it when it starts on this store, or when a running one reads "
        "the store's outbox again\n"
    )
    after = instance(db, "order", "c1")
    assert (after.status, after.version, after.state) == (
        "completing",
        before.version + 1,
        before.state,
    )
    assert next((o.id, o.seq, o.attempts, o.error) for o in read(db)[1] if o.key == "c1") == (
        dead.id,
        dead.seq,
        0,
        None,
    )
    assert sorted(d.kind for d in read(db)[2]) == ["event", "send"]

    services = anyio.run(run_sagas, db)

    assert [s for s in services.sent() if s[1] == "c1"] == [
        ("Release", "c1", "compensate", 1),
        ("Refund", "c1", "compensate", 1),
    ]
    assert [r.key for r in read(db)[0]] == ["a1", "a2", "n1", "s1"]


def test_retry_json(db: Path, url: str) -> None:
    dead = letter_of(db, "send")

    result = cli("retry", url, dead.id, "--json")

    assert (result.returncode, json.loads(result.stdout)) == (
        0,
        {
            "retried": {
                "id": dead.id,
                "saga": "shipping",
                "key": "s1",
                "kind": "send",
                "type_name": "ops_sagas.Notify",
                "error": "ConnectionFailed: Notify service down",
                "attempts": 3,
                "failed_at": dead.failed_at,
                "seq": dead.seq,
                "name": None,
                "payload": {"key": "s1"},
            },
            "instance_status": "active",
        },
    )


def test_retry_refuses_events_and_unknown_ids(db: Path, url: str) -> None:
    before = read(db)

    event = cli("retry", url, "order:a1:broken-1")
    unknown = cli("retry", url, "nope")

    assert (event.returncode, event.stdout, event.stderr) == (
        1,
        "",
        "sagaflow retry: dead letter 'order:a1:broken-1' is an event (ops_sagas.Broken for "
        "order/a1): it is published again through a running runtime, "
        "Admin.retry(id, runtime=runtime); the command line cannot do it\n",
    )
    assert (unknown.returncode, unknown.stderr) == (
        1,
        "sagaflow retry: no dead letter has the id 'nope'; list them with `sagaflow "
        "dead-letters` or Admin.list_dead_letters()\n",
    )
    assert read(db) == before


def test_discard_deletes_the_dead_letter(db: Path, url: str) -> None:
    dead = letter_of(db, "send")
    instances, outbox, _ = read(db)

    result = cli("discard", url, dead.id)

    assert (result.returncode, result.stdout) == (
        0,
        f"discarded {dead.id}: send Notify of shipping s1\n",
    )
    assert read(db)[:2] == (instances, outbox)
    assert sorted(d.kind for d in read(db)[2]) == ["compensate", "event"]
    again = cli("discard", url, dead.id, "--json")
    assert again.returncode == 1


def test_abort_deletes_the_instance_and_keeps_its_dead_letters(db: Path, url: str) -> None:
    result = cli("abort", url, "order", "c1", "--yes")

    assert (result.returncode, result.stdout) == (
        0,
        "aborted order c1 (compensation_failed): deleted with 0 schedule(s) and 1 "
        "command(s); 1 dead letter(s) kept\n",
    )
    instances, outbox, letters = read(db)
    assert ([r.key for r in instances], [o.key for o in outbox]) == (
        ["a1", "a2", "n1", "s1"],
        ["a2"],
    )
    assert sorted(d.key for d in letters) == ["a1", "c1", "s1"]

    again = cli("abort", url, "order", "c1")
    assert again.returncode == 1
    assert re.fullmatch(
        r"sagaflow abort: no instance of saga 'order' has key 'c1' \(it was aborted "
        r"0:0\d:\d\d ago; its tombstone counts for (6 days, 23:5\d:\d\d|7 days, 0:00:00) "
        r"more\); 1 dead "
        r"letter\(s\) of it remain\n",
        again.stderr,
    ), again.stderr


class Terminal:
    """A stdin that is a terminal, answering `answer` to a question."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        return self.answer + "\n"


@pytest.mark.parametrize(
    ("answer", "code", "kept"), [("n", 1, True), ("", 1, True), ("y", 0, False)]
)
def test_on_a_terminal_abort_and_discard_ask_first(
    db: Path,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
    code: int,
    kept: bool,
) -> None:
    from sagaflow._cli import main

    dead = letter_of(db, "send")
    monkeypatch.setattr(sys, "stdin", Terminal(answer))

    assert main(["abort", url, "order", "a2"]) == code
    assert main(["discard", url, dead.id]) == code
    assert main(["abort", url, "order", "n1", "--yes"]) == 0

    out, err = capsys.readouterr()
    assert (
        "abort order a2 (active), deleting its state, 1 schedule(s) and 1 command(s)? [y/N]" in out
    )
    assert "discard send Notify of shipping s1? [y/N]" in out
    instances, _, letters = read(db)
    assert ("a2" in [r.key for r in instances], dead in letters) == (kept, kept)
    assert "n1" not in [r.key for r in instances]
    assert ("nothing aborted" in err) == kept


def test_abort_json(db: Path, url: str) -> None:
    a2 = instance(db, "order", "a2")

    result = cli("abort", url, "order", "a2", "--json")

    aborted = json.loads(result.stdout)["aborted"]
    assert (result.returncode, aborted["instance_id"], aborted["state"]) == (
        0,
        a2.instance_id,
        {"status": "open"},
    )
    assert [o["type_name"] for o in aborted["outbox"]] == ["ops_sagas.Reserve"]


# -- URLs, usage and store errors ------------------------------------------------------


def test_a_relative_sqlite_url_is_read_from_the_current_directory(db: Path) -> None:
    result = cli("instances", f"sqlite:{db.name}", "--json", cwd=db.parent)

    assert (result.returncode, len(json.loads(result.stdout))) == (0, 5)


def test_three_slashes_name_an_absolute_path_and_the_error_says_so(db: Path) -> None:
    result = cli("instances", f"sqlite:///{db.name}", cwd=db.parent)

    assert (result.returncode, result.stderr) == (
        3,
        f"sagaflow instances: no sagaflow store at '/{db.name}': sqlite:/// names an "
        f"absolute path; for '{db.name}' in the current directory write sqlite:{db.name}\n",
    )


def test_four_slashes_name_an_absolute_path_too(db: Path) -> None:
    """`sqlite:////abs/path.db`, SQLAlchemy's spelling, names the same file as three."""
    four = cli("instances", f"sqlite:///{db}", "--json")
    three = cli("instances", f"sqlite://{db}", "--json")

    assert (four.returncode, four.stderr) == (0, "")
    assert [r["instance_id"] for r in json.loads(four.stdout)] == [
        r["instance_id"] for r in json.loads(three.stdout)
    ]
    assert len(json.loads(four.stdout)) == 5


def test_a_directory_is_not_taken_for_a_store(tmp_path: Path) -> None:
    (tmp_path / "data.db").mkdir()

    result = cli("instances", "sqlite:data.db", cwd=tmp_path)

    assert (result.returncode, result.stdout, result.stderr) == (
        3,
        "",
        "sagaflow instances: no sagaflow store at 'data.db': it is a directory; name the "
        "store's file in it\n",
    )


def test_version() -> None:
    result = cli("--version")

    assert sagaflow.__version__ == importlib.metadata.version("sagaflow")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"sagaflow {sagaflow.__version__}\n",
        "",
    )


def test_a_reader_that_stops_reading_ends_the_command_quietly(url: str) -> None:
    """`sagaflow instances URL | head`: the pipe closes early; the command ends with
    exit code 141 (as if killed by SIGPIPE) and no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-W", "error", "-m", "sagaflow", "instances", url],
            cwd=TESTS,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])},
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)

    assert (result.returncode, result.stderr) == (141, "")


def test_the_trio_backend_without_trio_installed_is_a_usage_error(tmp_path: Path) -> None:
    """`--backend trio` where trio cannot be imported: one line saying what to install."""
    script = (
        "import sys; sys.modules['trio'] = None\n"  # what a missing package looks like
        "from sagaflow.__main__ import main\n"
        "sys.exit(main(['demo', '--backend', 'trio', '--orders', '5']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(
        "sagaflow demo: error: the trio backend needs the trio package, which cannot be imported ("
    )
    assert result.stderr.endswith(
        "): install it (python -m pip install trio) or use --backend asyncio\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "import attrs\nraise RuntimeError('no configuration')\n",
            "importing module 'broken' failed ({path}, line 2): RuntimeError: no configuration",
        ),
        (
            "import no_such_dependency\n",
            "importing module 'broken' failed ({path}, line 1): ModuleNotFoundError: No "
            "module named 'no_such_dependency'",
        ),
        (
            "from sagaflow import Registry\nregistry = Registry()\n\n"
            "@registry.saga(state=int)\nclass Empty:\n    pass\n",
            "importing module 'broken' failed ({path}, line 4): RegistrationError: saga "
            "'Empty': Empty has no @on handlers",
        ),
        (
            "registry = (\n",
            "importing module 'broken' failed: SyntaxError: '(' was never closed "
            "(broken.py, line 1)",
        ),
    ],
)
def test_a_registry_module_that_fails_to_import_is_a_usage_error(
    tmp_path: Path, source: str, message: str
) -> None:
    """The module's own error, and where it was raised, in one line: exit code 2."""
    path = tmp_path / "broken.py"
    path.write_text(source)

    result = cli("diagram", "broken:registry", cwd=tmp_path)

    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        f"sagaflow diagram: error: {message.format(path=path)}\n",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["instances"], "the following arguments are required: URL"),
        (["instances", "sqlite:x.db", "--stalled", "soon"], "'soon' is not a duration"),
        (["instances", "sqlite:x.db", "--status", "done"], "invalid choice: 'done'"),
        (["show", "sqlite:x.db", "order"], "the following arguments are required: KEY"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["instances", "x.db"], "the store must be given as a URL"),
        (["instances", "mysql://u:pw@h/db"], "unsupported store URL scheme 'mysql'"),
        (["instances", "sqlite://host/x.db"], "a sqlite URL names a local file"),
        (["instances", "sqlite:x.db", "--schema", "s"], "--schema is for PostgreSQL stores only"),
        (["instances", "postgresql://u:pw@h/db", "--schema", "a b"], "not a plain identifier"),
        (["diagram", "ops_sagas"], "'ops_sagas' is not module:attribute"),
        (["diagram", "no_such_module:registry"], "no module named 'no_such_module'"),
        (["diagram", "ops_sagas:nope"], "module 'ops_sagas' has no attribute 'nope'"),
        (["diagram", "ops_sagas:Order"], "ops_sagas:Order is a type, not a sagaflow Registry"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = cli(*args, cwd=tmp_path)

    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr
    assert "pw" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_is_everywhere() -> None:
    for command in ["", "instances", "show", "dead-letters", "retry", "discard", "abort"]:
        result = cli(*filter(None, [command]), "--help")
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.startswith(f"usage: sagaflow {command}".rstrip())
    diagram = cli("diagram", "--help")
    assert "--format {mermaid,dot}" in diagram.stdout
    assert "exit codes: 0 done, 1 nothing found" in cli("--help").stdout


def test_a_missing_or_foreign_store_exits_3_and_is_left_alone(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database")
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    foreign_bytes = foreign.read_bytes()

    missing = cli("instances", "sqlite:missing.db", cwd=tmp_path)
    not_sqlite = cli("instances", f"sqlite://{text}")
    not_ours = cli("dead-letters", f"sqlite://{foreign}")

    assert (missing.returncode, missing.stderr) == (
        3,
        "sagaflow instances: no sagaflow store at 'missing.db': the file does not exist\n",
    )
    assert (not_sqlite.returncode, not_sqlite.stderr) == (
        3,
        f"sagaflow instances: cannot read {str(text)!r} as a SQLite database: file is not a "
        "database\n",
    )
    assert (not_ours.returncode, not_ours.stderr) == (
        3,
        f"sagaflow dead-letters: {str(foreign)!r} is a SQLite database, but not a sagaflow store\n",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "notes.txt"]
    assert foreign.read_bytes() == foreign_bytes


def test_a_store_written_by_a_newer_sagaflow_exits_3(db: Path, url: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    conn.close()

    result = cli("instances", url)

    assert (result.returncode, result.stdout) == (3, "")
    assert "has schema version 99, but this sagaflow supports versions 1 to" in result.stderr


def test_an_unreachable_postgres_exits_3_without_showing_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    result = cli("instances", f"postgresql://alice:{SECRET}@127.0.0.1:{port}/app")

    assert (result.returncode, result.stdout) == (3, "")
    assert "could not connect" in result.stderr
    assert "postgresql://alice:***@127.0.0.1" in result.stderr
    assert SECRET not in result.stderr


@pytest.mark.postgres
def test_the_commands_work_on_postgres_and_never_print_the_password(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
) -> None:
    from sagaflow.stores import PostgresStore

    anyio.run(prepare, PostgresStore(postgres_dsn, schema=pg_schema))
    scheme, _, rest = postgres_dsn.partition("://")
    userinfo, _, host = rest.rpartition("@")
    with_password = f"{scheme}://{userinfo or 'postgres'}:{SECRET}@{host}"

    listed = cli("instances", with_password, "--schema", pg_schema, "--json")
    letters = cli("dead-letters", with_password, "--schema", pg_schema, "--json")
    (send,) = [d for d in json.loads(letters.stdout) if d["kind"] == "send"]
    retried = cli("retry", with_password, send["id"], "--schema", pg_schema)
    wrong = cli("instances", with_password.replace("/postgres", "/no_such_db"))

    assert [row["key"] for row in json.loads(listed.stdout)] == ["a1", "a2", "c1", "n1", "s1"]
    assert retried.returncode == 0
    assert wrong.returncode == 3
    for result in (listed, letters, retried, wrong):
        assert SECRET not in result.stdout + result.stderr


# -- diagram ---------------------------------------------------------------------------

MERMAID = """\
flowchart LR
    subgraph s0 ["order"]
        direction LR
        s0_start(("start"))
        s0_e0(["Opened"])
        s0_h0["opened"]
        s0_e1(["Paid"])
        s0_h1["paid"]
        s0_e2(["Cancelled"])
        s0_h2["cancelled"]
        s0_e3(["Broken"])
        s0_h3["broken"]
        s0_e4(["Expired"])
        s0_h4["expired"]
        s0_e5(["CommandFailed"])
        s0_h5["failed"]
        s0_c0[/"Reserve"/]
        s0_c1[/"Charge"/]
        s0_done((("complete")))
        s0_comp[\\"compensate"\\]
        s0_start --> s0_e0
        s0_e0 --> s0_h0
        s0_e1 --> s0_h1
        s0_e2 --> s0_h2
        s0_e3 --> s0_h3
        s0_e4 --> s0_h4
        s0_e5 --> s0_h5
        s0_h0 -->|send| s0_c0
        s0_h0 -.->|schedule| s0_e4
        s0_h1 -->|send| s0_c1
        s0_h1 --> s0_done
        s0_h2 -->|compensate| s0_comp
        s0_h2 --> s0_done
        s0_h4 -->|compensate| s0_comp
        s0_h4 --> s0_done
    end
    subgraph s1 ["shipping"]
        direction LR
        s1_start(("start"))
        s1_e0(["Paid"])
        s1_h0["paid"]
        s1_c0[/"Notify"/]
        s1_start --> s1_e0
        s1_e0 --> s1_h0
        s1_h0 -->|send| s1_c0
    end
"""


def test_diagram_draws_the_registry_as_mermaid() -> None:
    result = cli("diagram", "ops_sagas:registry")

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == MERMAID


def test_diagram_draws_graphviz_dot_of_one_saga() -> None:
    result = cli("diagram", "ops_sagas:registry", "--format", "dot", "--saga", "shipping")

    assert (result.returncode, result.stdout) == (
        0,
        "digraph sagaflow {\n"
        "    rankdir=LR;\n"
        "    subgraph cluster_s0 {\n"
        '        label="shipping";\n'
        '        s0_start [label="start", shape=circle];\n'
        '        s0_e0 [label="Paid", shape=box, style=rounded];\n'
        '        s0_h0 [label="paid", shape=box];\n'
        '        s0_c0 [label="Notify", shape=parallelogram];\n'
        "        s0_start -> s0_e0;\n"
        "        s0_e0 -> s0_h0;\n"
        '        s0_h0 -> s0_c0 [label="send"];\n'
        "    }\n"
        "}\n",
    )


def test_diagram_of_an_unknown_saga_exits_1() -> None:
    result = cli("diagram", "ops_sagas:registry", "--saga", "nope")

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("sagaflow diagram: no saga named 'nope' is registered")


# -- the demo and the helpers ----------------------------------------------------------


def test_the_demo_still_runs(tmp_path: Path) -> None:
    result = cli("demo", "--orders", "20", "--db", "demo.db", "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sagaflow demo on demo.db: 20 orders\n  completed")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        ("1d2h3m4s", 93784.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "0s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (86399, "23h59m"),
        (90061, "1d01h"),
        (-5, "0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
