"""The `sagaflow` command line: the demo, store inspection and repair, saga diagrams.

Exit codes: 0 done; 1 nothing found, or the operation was refused; 2 a usage error (bad
arguments, a `module:attribute` that cannot be loaded, a backend that is not installed);
3 the store cannot be reached or its schema is not one this sagaflow reads; 141 the
reader of the output went away (`| head`), as a program killed by SIGPIPE reports it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import re
import signal
import sqlite3
import sys
import time
import traceback
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TextIO, TypeVar

import anyio
import attrs

from . import __version__
from ._admin import Admin, InstanceInfo
from ._check import CheckReport
from ._registry import Registry
from .exceptions import ConflictError, DeadLetterError, StoreError
from .stores._protocol import DeadLetter, OutboxRecord, ScheduleRecord, Store

__all__ = [
    "UsageError",
    "check_json",
    "format_duration",
    "load_registry",
    "main",
    "open_store",
    "parse_duration",
    "table",
]

OK, NOTHING, USAGE, UNREACHABLE = 0, 1, 2, 3
BROKEN_PIPE = 128 + 13  # what a shell reports for a program killed by SIGPIPE

_URL_HELP = (
    "the store: sqlite:///absolute/path.db (or sqlite:////absolute/path.db), "
    "sqlite:relative/path.db, or "
    "postgresql://user:password@host/dbname (the password is never printed)"
)


class UsageError(Exception):
    """An argument is wrong in a way argparse cannot see (exit code 2)."""


# -- durations -------------------------------------------------------------------------

_DURATION = re.compile(
    r"(?:(\d+(?:\.\d*)?)d)?(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?"
    r"(?:(\d+(?:\.\d*)?)s)?"
)


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `10m`, `1h30m`, `1.5h` or `2d`.

    Raises:
        argparse.ArgumentTypeError: The text is not a duration.
    """
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION.fullmatch(value)
        if not value or match is None:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration: write e.g. 90s, 10m, 1h30m or 2d"
            ) from None
        days, hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = days * 86400 + hours * 3600 + minutes * 60 + secs
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration of 0 or more")
    return seconds


def format_duration(seconds: float) -> str:
    """`42s`, `12m05s`, `3h05m` or `2d04h`: two units at most, rounded down."""
    s = int(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _until(due: float, now: float) -> str:
    return (
        f"in {format_duration(due - now)}"
        if due >= now
        else f"{format_duration(now - due)} overdue"
    )


def _ago(when: float, now: float) -> str:
    return f"{format_duration(now - when)} ago"


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(when))


def _short(type_name: str | None) -> str:
    """A stored type name without its module: `myapp.orders.OrderPlaced` -> `OrderPlaced`."""
    return "-" if not type_name else type_name.rpartition(".")[2]


# -- opening a store by URL ------------------------------------------------------------


def open_store(url: str, *, schema: str | None = None, migrate: bool = True) -> Store:
    """The store a URL names (not opened yet).

    Args:
        url: `sqlite:///absolute/path.db`, `sqlite:relative/path.db`, or a PostgreSQL URL
            (`postgresql://...` or `postgres://...`).
        schema: The PostgreSQL schema holding sagaflow's tables (default `sagaflow`).
        migrate: Whether opening the store may migrate an older schema (see the
            stores' `migrate` argument).

    Raises:
        UsageError: The URL is not one of these forms.
        StoreError: The SQLite file does not exist or is not a sagaflow store, or the
            PostgreSQL driver is not installed.
    """
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or len(scheme) == 1:
        raise UsageError(
            "the store must be given as a URL: sqlite:///absolute/path.db, "
            "sqlite:relative/path.db or postgresql://..."
        )
    if scheme == "sqlite":
        if schema is not None:
            raise UsageError("--schema is for PostgreSQL stores only")
        return _sqlite_store(rest, migrate=migrate)
    if scheme in ("postgresql", "postgres"):
        try:
            from .stores._postgres import PostgresStore
        except ImportError as exc:
            raise StoreError(str(exc)) from None
        try:
            return PostgresStore(
                url, schema=schema or "sagaflow", max_size=2, timeout=10, migrate=migrate
            )
        except ValueError as exc:  # the schema name
            raise UsageError(str(exc)) from None
    raise UsageError(f"unsupported store URL scheme {scheme!r}: use sqlite: or postgresql:")


def _sqlite_store(rest: str, *, migrate: bool = True) -> Store:
    from .stores._sqlite import SQLiteStore

    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        if authority not in ("", "localhost") or not slash:
            raise UsageError(
                "a sqlite URL names a local file: sqlite:///absolute/path.db or "
                "sqlite:relative/path.db"
            )
        # sqlite:////abs/path.db, SQLAlchemy's spelling, names the same file as
        # sqlite:///abs/path.db: the empty authority is followed by the absolute path.
        path = "/" + path.lstrip("/")
    else:
        path = rest
    path = urllib.parse.unquote(path)
    if not path or path == "/":
        raise UsageError("the sqlite URL names no file")
    relative = path.lstrip("/")
    if path.startswith("/") and not os.path.exists(path) and os.path.isfile(relative):
        raise StoreError(
            f"no sagaflow store at {path!r}: sqlite:/// names an absolute path; for "
            f"{relative!r} in the current directory write sqlite:{relative}"
        )
    _check_sqlite_file(path)
    return SQLiteStore(path, migrate=migrate)


def _check_sqlite_file(path: str) -> None:
    """Refuse a missing file, or one sagaflow did not write: opening it would write to it."""
    if os.path.isdir(path):
        raise StoreError(
            f"no sagaflow store at {path!r}: it is a directory; name the store's file in it"
        )
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise StoreError(f"no sagaflow store at {path!r}: the file {what}")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path!r} as a SQLite database: {exc}") from None
    if found is None:
        raise StoreError(f"{path!r} is a SQLite database, but not a sagaflow store")


# -- output ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Rows under headers in aligned columns; the last column is not padded."""
    lines = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers) - 1)]
    out = []
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out)


def _json_text(text: str) -> Any:
    """Stored JSON text as a value (as the text itself if it is not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _row_json(row: ScheduleRecord | OutboxRecord | DeadLetter, *, full: bool) -> dict[str, Any]:
    data = attrs.asdict(row)
    payload = data.pop("payload")
    if full:
        data["payload"] = _json_text(payload)
    if data.get("trace") is not None:
        data["trace"] = _json_text(data["trace"])  # the carrier, e.g. {"traceparent": ...}
    return data


def instance_json(info: InstanceInfo, *, full: bool) -> dict[str, Any]:
    """An instance as JSON: the record's fields, `age`, `idle` and its pending rows.

    With `full`, the state and the payloads are included (parsed from their JSON text).
    """
    data = attrs.asdict(info.record)
    state = data.pop("state")
    if full:
        data["state"] = _json_text(state)
    data["age"] = info.age
    data["idle"] = info.idle
    data["schedules"] = [_row_json(s, full=full) for s in info.schedules]
    data["outbox"] = [_row_json(o, full=full) for o in info.outbox]
    data["dead_letters"] = [_row_json(d, full=full) for d in info.dead_letters]
    return data


def _dump(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), file=out)


def _schedules_cell(info: InstanceInfo, now: float) -> str:
    if not info.schedules:
        return "-"
    first = info.schedules[0]
    more = f" (+{len(info.schedules) - 1})" if len(info.schedules) > 1 else ""
    return f"{first.name} {_until(first.due, now)}{more}"


def _commands_cell(info: InstanceInfo, now: float) -> str:
    rows = info.outbox
    if not rows:
        return "-"
    state = "held" if info.status == "compensation_failed" else "waiting"
    text = f"{len(rows)} {state}"
    head = rows[0]
    if head.attempts:
        text += (
            f"; {_short(head.type_name)} failed {head.attempts}x, "
            f"retry {_until(head.due, now)}: {head.error}"
        )
    return text


def _instances_table(infos: list[InstanceInfo], now: float) -> str:
    rows = [
        (
            i.saga,
            i.key,
            i.status,
            format_duration(i.age),
            format_duration(i.idle),
            _short(i.record.last_event),
            str(len(i.dead_letters)) if i.dead_letters else "-",
            _schedules_cell(i, now),
            _commands_cell(i, now),
        )
        for i in infos
    ]
    headers = ("SAGA", "KEY", "STATUS", "AGE", "IDLE", "LAST EVENT", "DEAD", "SCHEDULES")
    return table((*headers, "COMMANDS"), rows)


def _letters_table(letters: list[DeadLetter], now: float) -> str:
    rows = [
        (
            d.id,
            d.saga,
            d.key,
            d.kind,
            _short(d.type_name),
            str(d.attempts),
            _ago(d.failed_at, now),
            d.error,
        )
        for d in letters
    ]
    headers = ("ID", "SAGA", "KEY", "KIND", "TYPE", "ATTEMPTS", "FAILED", "ERROR")
    return table(headers, rows)


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


def _show_text(info: InstanceInfo, now: float) -> str:
    r = info.record
    status = r.status + (" (completed)" if r.completed and r.status != "completing" else "")
    facts = [
        ("status", status),
        ("instance id", r.instance_id),
        ("version", str(r.version)),
        ("started", f"{_timestamp(r.created_at)} ({_ago(r.created_at, now)})"),
        ("last write", f"{_timestamp(r.updated_at)} ({_ago(r.updated_at, now)})"),
        ("last event", r.last_event or "-"),
    ]
    width = max(len(k) for k, _ in facts)
    parts = [f"{r.saga} {r.key}", *(f"  {k.ljust(width)}  {v}" for k, v in facts)]
    parts += ["", "state", _indent(json.dumps(_json_text(r.state), indent=2, ensure_ascii=False))]
    parts += ["", "schedules"]
    if info.schedules:
        rows = [
            (
                s.name,
                _timestamp(s.due),
                _until(s.due, now),
                "self" if s.to_self else "dispatch",
                _short(s.type_name),
                s.payload,
            )
            for s in info.schedules
        ]
        parts.append(_indent(table(("NAME", "DUE", "", "TO", "TYPE", "PAYLOAD"), rows)))
    else:
        parts.append("  none")
    parts += ["", "outbox"]
    if info.outbox:
        orows = [
            (
                o.id,
                o.kind,
                _short(o.type_name),
                str(o.attempts),
                _until(o.due, now) if o.attempts else "-",
                o.payload,
                o.error or "-",
            )
            for o in info.outbox
        ]
        oheaders = ("ID", "KIND", "TYPE", "ATTEMPTS", "NEXT", "PAYLOAD", "ERROR")
        parts.append(_indent(table(oheaders, orows)))
        if r.status == "compensation_failed":
            parts.append(
                "  (held until the failed compensation is retried, or the instance aborted)"
            )
    else:
        parts.append("  none")
    parts += ["", "dead letters"]
    if info.dead_letters:
        drows = [
            (d.id, d.kind, _short(d.type_name), str(d.attempts), _ago(d.failed_at, now), d.error)
            for d in info.dead_letters
        ]
        dheaders = ("ID", "KIND", "TYPE", "ATTEMPTS", "FAILED", "ERROR")
        parts.append(_indent(table(dheaders, drows)))
    else:
        parts.append("  none")
    return "\n".join(parts)


# -- the store commands ----------------------------------------------------------------

_StoreCommand = Callable[[Admin, argparse.Namespace, TextIO], Awaitable[int]]


async def _unknown_saga(admin: Admin, saga: str) -> str | None:
    """Why nothing of `saga` was found, if the store holds nothing at all of that name.

    The store has no registry, so the names it knows are those of its instances,
    schedules, commands and dead letters. It runs only once a lookup has found nothing.
    """
    store = admin.store
    names = await store.saga_names()
    names.update(d.saga for d in await store.list_dead_letters())
    if saga in names:
        return None
    if not names:
        return f"no saga named {saga!r} is in this store, which holds no instances at all"
    known = ", ".join(repr(n) for n in sorted(names))
    return (
        f"no saga named {saga!r} is in this store, only {known}: a saga goes by the name "
        "it was registered with (its class name, unless @registry.saga(name=...) gave "
        "another)"
    )


async def _instances(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    now = time.time()
    infos = await admin.list_instances(saga=args.saga, status=args.status, stalled=args.stalled)
    if args.json:
        _dump([instance_json(i, full=False) for i in infos], out)
    elif infos:
        print(_instances_table(infos, now), file=out)
        counts = Counter(i.saga for i in infos)
        per_saga = ", ".join(f"{saga} {n}" for saga, n in sorted(counts.items()))
        print(f"\n{len(infos)} instance(s): {per_saga}", file=out)
    if not infos:
        which = [f"saga {args.saga!r}"] if args.saga else []
        which += [f"status {args.status!r}"] if args.status else []
        which += [f"no progress for {format_duration(args.stalled)}"] if args.stalled else []
        unknown = args.saga and await _unknown_saga(admin, args.saga)
        print(
            unknown or "no instances in flight" + (f" ({', '.join(which)})" if which else ""),
            file=sys.stderr,
        )
        return NOTHING
    return OK


async def _find(admin: Admin, saga: str, key: str) -> InstanceInfo:
    """`admin.show(saga, key)`, its error saying so when the store knows no such saga."""
    try:
        return await admin.show(saga, key)
    except DeadLetterError as exc:
        if await admin.store.list_tombstones(saga=saga, key=key):
            raise  # it says how and when the instance ended
        unknown = await _unknown_saga(admin, saga)
        if unknown is None:
            raise
        raise DeadLetterError(unknown) from exc


async def _show(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    info = await _find(admin, args.saga, args.key)
    if args.json:
        _dump(instance_json(info, full=True), out)
    else:
        print(_show_text(info, time.time()), file=out)
    return OK


async def _dead_letters(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    letters = await admin.list_dead_letters(saga=args.saga)
    if args.json:
        _dump([_row_json(d, full=True) for d in letters], out)
    elif letters:
        print(_letters_table(letters, time.time()), file=out)
    if not letters:
        which = f" of saga {args.saga!r}" if args.saga else ""
        unknown = args.saga and await _unknown_saga(admin, args.saga)
        print(unknown or f"no dead letters{which}", file=sys.stderr)
        return NOTHING
    return OK


async def _retry(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    letter = await admin.retry(args.id)
    status = None
    with contextlib.suppress(DeadLetterError):  # the instance has ended
        status = (await admin.show(letter.saga, letter.key)).status
    if args.json:
        _dump({"retried": _row_json(letter, full=True), "instance_status": status}, out)
        return OK
    where = f"{letter.saga} {letter.key}"
    if letter.name is not None:
        print(
            f"retried {letter.id}: scheduled {_short(letter.type_name)} of {where} is "
            "scheduled again, due now; a runtime delivers it to the instance",
            file=out,
        )
        return OK
    print(
        f"retried {letter.id}: {letter.kind} {_short(letter.type_name)} of {where} is back "
        "in the outbox, with its attempts reset",
        file=out,
    )
    if status is None:
        print(f"instance {where} has ended: the command is dispatched on its own", file=out)
    else:
        print(f"instance {where} is {status}", file=out)
    print(
        "a runtime dispatches it when it starts on this store, or when a running one "
        "reads the store's outbox again",
        file=out,
    )
    return OK


def _confirm(args: argparse.Namespace, question: str) -> bool:
    """Ask on a terminal unless --yes was given; never ask when stdin is not a terminal."""
    if args.yes or not sys.stdin.isatty():
        return True
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


async def _discard(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    letter = await admin.get_dead_letter(args.id)
    question = f"discard {letter.kind} {_short(letter.type_name)} of {letter.saga} {letter.key}?"
    if not _confirm(args, question):
        print("nothing discarded", file=sys.stderr)
        return NOTHING
    letter = await admin.discard(args.id)
    if args.json:
        _dump({"discarded": _row_json(letter, full=True)}, out)
    else:
        print(
            f"discarded {letter.id}: {letter.kind} {_short(letter.type_name)} of "
            f"{letter.saga} {letter.key}",
            file=out,
        )
    return OK


async def _abort(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    info = await _find(admin, args.saga, args.key)
    question = (
        f"abort {info.saga} {info.key} ({info.status}), deleting its state, "
        f"{len(info.schedules)} schedule(s) and {len(info.outbox)} command(s)?"
    )
    if not _confirm(args, question):
        print("nothing aborted", file=sys.stderr)
        return NOTHING
    info = await admin.abort(args.saga, args.key)
    if args.json:
        _dump({"aborted": instance_json(info, full=True)}, out)
    else:
        kept = f"; {len(info.dead_letters)} dead letter(s) kept" if info.dead_letters else ""
        print(
            f"aborted {info.saga} {info.key} ({info.status}): deleted with "
            f"{len(info.schedules)} schedule(s) and {len(info.outbox)} command(s){kept}",
            file=out,
        )
    return OK


def _run_store_command(
    args: argparse.Namespace,
    command: _StoreCommand,
    *,
    registry: Registry | None = None,
    migrate: bool = True,
) -> int:
    out = sys.stdout
    try:
        store = open_store(args.url, schema=args.schema, migrate=migrate)
    except UsageError as exc:
        print(f"sagaflow {args.command}: error: {exc}", file=sys.stderr)
        return USAGE
    except StoreError as exc:
        print(f"sagaflow {args.command}: {exc}", file=sys.stderr)
        return UNREACHABLE

    async def run() -> int:
        await store.open()
        try:
            return await command(Admin(store, registry=registry), args, out)
        finally:
            await store.close()

    try:
        return run_until_signal(run)
    except Stopped as stop:
        print(f"stopped: {_what_is_safe(args.command)}", file=sys.stderr)
        return stop.code
    except StoreError as exc:
        print(f"sagaflow {args.command}: {exc}", file=sys.stderr)
        return UNREACHABLE
    except (DeadLetterError, ConflictError) as exc:
        print(f"sagaflow {args.command}: {exc}", file=sys.stderr)
        return NOTHING


# -- diagram and demo ------------------------------------------------------------------


def load_registry(target: str) -> Registry:
    """The `Registry` that `module:attribute` names; the current directory is importable.

    Raises:
        UsageError: `target` is malformed, its module cannot be imported (it does not
            exist, or importing it raised), its attribute does not exist, or it is not
            a `Registry`.
    """
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"{target!r} is not module:attribute, e.g. myapp.sagas:registry")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name != missing and not module_name.startswith(missing + "."):
            # The module exists, but something it imports does not.
            raise _import_failed(module_name, exc) from None
        raise UsageError(
            f"no module named {missing!r} (is the current directory, or the package's, "
            "on the import path?)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, it did not load
        raise _import_failed(module_name, exc) from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(obj, Registry):
        raise UsageError(f"{target} is a {type(obj).__name__}, not a sagaflow Registry")
    return obj


def _import_failed(module_name: str, exc: Exception) -> UsageError:
    """The error for a module that raised while being imported, with where it raised.

    The place is the innermost line of the user's code: a registration error raised
    inside sagaflow points at the decorator or call that caused it.
    """
    where = ""
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(("<", ours))
    ]
    if frames and not isinstance(exc, SyntaxError):  # a SyntaxError names its own line
        where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
    return UsageError(
        f"importing module {module_name!r} failed{where}: {type(exc).__name__}: {exc}"
    )


def _diagram(args: argparse.Namespace) -> int:
    from ._diagram import dot, mermaid

    try:
        registry = load_registry(args.target)
    except UsageError as exc:
        print(f"sagaflow diagram: error: {exc}", file=sys.stderr)
        return USAGE
    render = mermaid if args.format == "mermaid" else dot
    try:
        text = render(registry, saga=args.saga)
    except LookupError as exc:
        print(f"sagaflow diagram: {exc.args[0]}", file=sys.stderr)
        return NOTHING
    print(text, end="")
    return OK


def _backend_missing(backend: str) -> str | None:
    """Why the event loop `backend` cannot run here, if it cannot."""
    if backend == "asyncio":
        return None
    try:
        importlib.import_module(backend)
    except ImportError as exc:
        return (
            f"the {backend} backend needs the {backend} package, which cannot be imported "
            f"({exc}): install it (python -m pip install {backend}) or use --backend asyncio"
        )
    return None


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    missing = _backend_missing(args.backend)
    if missing is not None:
        print(f"sagaflow demo: error: {missing}", file=sys.stderr)
        return USAGE
    # The demo's failures are on purpose: keep their log records out of the display.
    quiet = logging.getLogger("sagaflow")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False

    async def demo() -> bool:
        result = await run_demo(
            orders=args.orders,
            db=args.db,
            stop_after=args.stop_after,
            progress=not args.quiet,
        )
        return result.finished or args.stop_after is not None

    try:
        ok = run_until_signal(demo, backend=args.backend)
    except Stopped as stop:
        if sys.stdout.isatty() and not args.quiet:
            print()  # end the progress line
        where = (
            "nothing is kept in memory"
            if args.db == ":memory:"
            else (
                f"everything committed is safe in {args.db}; run the same command again to resume"
            )
        )
        print(f"stopped: {where}", file=sys.stderr)
        return stop.code
    return OK if ok else NOTHING


# -- check -----------------------------------------------------------------------------

_WOULD_FAIL = 1
_OUTCOMES = {"ok": "ok", "upcast": "would upcast", "fail": "would fail"}


def _failures_option(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows (0 or more) or 'all'")
    return value


def _page_option(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a page size (1 or more rows)")
    return value


def check_json(report: CheckReport) -> dict[str, Any]:
    """A check report as JSON: the verdict, the totals and every group with its failures."""
    return {
        "ok": report.ok,
        "rows": report.rows,
        "upcast": report.upcast,
        "failed": report.failed,
        "groups": [attrs.asdict(g) for g in report.groups],
    }


def _check_text(report: CheckReport) -> str:
    if not report.groups:
        return "the store holds no rows: nothing to check"
    rows = [
        [
            g.what.replace("_", " "),
            g.saga,
            g.type_name or "-",
            str(g.version),
            _OUTCOMES[g.outcome],
            str(g.count),
        ]
        for g in report.groups
    ]
    parts = [table(["KIND", "SAGA", "TYPE", "VERSION", "OUTCOME", "ROWS"], rows)]
    for g in report.groups:
        if g.outcome != "fail":
            continue
        kind = g.what.replace("_", " ")
        lines = [f"{kind} {g.saga} {g.type_name or '-'} version {g.version}: {g.count} would fail"]
        lines += [f"  {f.saga} {f.key} (id {f.id}): {f.error}" for f in g.failures]
        if g.count > len(g.failures):
            lines.append(f"  ... and {g.count - len(g.failures)} more")
        parts.append("\n".join(lines))
    ok = report.rows - report.upcast - report.failed
    summary = f"{report.rows} row(s): {ok} ok, {report.upcast} would upcast, "
    if report.ok:
        summary += "none would fail: this code can read everything stored"
    else:
        summary += f"{report.failed} would fail: this code cannot read them; do not deploy it yet"
    parts.append(summary)
    return "\n\n".join(parts)


async def _check(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    report = await admin.check(page=args.page, failures_per_group=args.failures)
    if args.json:
        _dump(check_json(report), out)
    else:
        print(_check_text(report), file=out)
    return OK if report.ok else _WOULD_FAIL


def _run_check(args: argparse.Namespace) -> int:
    try:
        registry = load_registry(args.target)
    except UsageError as exc:
        print(f"sagaflow check: error: {exc}", file=sys.stderr)
        return USAGE
    return _run_store_command(args, _check, registry=registry, migrate=args.migrate)


def _check_parser(commands: Any) -> None:
    check = commands.add_parser(
        "check",
        help="check that new code can read every stored row (run before a deploy)",
        description=(
            "Decode every stored row (instance states, outbox commands, scheduled "
            "messages, dead letters, the cluster inbox) with the registry of the code "
            "about to be deployed, and report, grouped by kind, saga, type and version, "
            "the rows that are ok, that would be upcast and that would fail. Changes "
            "nothing; an older store schema is not migrated (see --migrate). Exit "
            "status 0 when nothing would fail, 1 when something would."
        ),
    )
    check.add_argument(
        "target",
        metavar="MODULE:ATTRIBUTE",
        help="the new code's Registry, e.g. myapp.sagas:registry (the current directory is "
        "on the import path)",
    )
    check.add_argument("url", metavar="URL", help=_URL_HELP)
    check.add_argument(
        "--schema", help="the PostgreSQL schema holding sagaflow's tables (default sagaflow)"
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.add_argument(
        "--failures",
        type=_failures_option,
        default=20,
        metavar="N",
        help="failing rows listed per group (default 20; 'all' for every one)",
    )
    check.add_argument(
        "--page", type=_page_option, default=1000, metavar="N", help="rows per read (default 1000)"
    )
    check.add_argument(
        "--migrate",
        action="store_true",
        help="migrate an older store schema first: for a copy of the store only, since "
        "the sagaflow that wrote it cannot open it afterwards",
    )
    check.set_defaults(run=_run_check)


# -- stopping on a signal --------------------------------------------------------------

T = TypeVar("T")


class Stopped(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped a command.

    Attributes:
        code: The exit code: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.code = 128 + signum


def run_until_signal(main: Callable[[], Awaitable[T]], *, backend: str = "asyncio") -> T:
    """`anyio.run(main)`, cancelled by the first SIGINT or SIGTERM.

    Cancelling stops what `main` runs (a `Runtime` among them) at once and cleanly:
    what was committed stays committed. A second signal while it stops acts as usual.

    Raises:
        Stopped: A signal stopped `main` (also for a `KeyboardInterrupt` that came
            before the signal handlers were in place).
    """
    signals: list[int] = []

    async def watched() -> list[T]:
        result: list[T] = []
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, tg.cancel_scope, signals)
            try:
                result.append(await main())
            except Exception as exc:  # noqa: BLE001 - raised below as itself, not grouped
                failure = exc
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    try:
        result = anyio.run(watched, backend=backend)
    except KeyboardInterrupt:
        raise Stopped(signal.SIGINT) from None
    if not result:
        raise Stopped(signals[0] if signals else signal.SIGINT)
    return result[0]


async def _watch_signals(scope: anyio.CancelScope, signals: list[int]) -> None:
    try:
        receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        with receiver as received:
            async for signum in received:
                signals.append(signum)
                scope.cancel()
                return
    except NotImplementedError:  # no signal handlers here (Windows): Ctrl-C still works
        await anyio.sleep_forever()


def _what_is_safe(command: str) -> str:
    if command in {"retry", "discard", "abort"}:
        return (
            f"{command} changes the store in one transaction: it happened whole or not at "
            "all (look with `sagaflow show` or `sagaflow dead-letters`)"
        )
    return "nothing was changed"


# -- the parser ------------------------------------------------------------------------


def _store_parser(
    commands: Any, name: str, help: str, description: str, command: _StoreCommand
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("url", metavar="URL", help=_URL_HELP)
    parser.add_argument(
        "--schema", help="the PostgreSQL schema holding sagaflow's tables (default sagaflow)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=lambda args: _run_store_command(args, command))
    return parser


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `sagaflow` command line."""
    top = argparse.ArgumentParser(
        prog="sagaflow",
        description="Durable sagas for asyncio and trio.",
        epilog=(
            "exit codes: 0 done, 1 nothing found or operation refused, 2 usage error, "
            "3 store unreachable or schema error, 141 the output's reader went away"
        ),
    )
    top.add_argument("--version", action="version", version=f"sagaflow {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the order saga demo on a SQLite file",
        description=(
            "Run thousands of orders through the order saga against simulated services: "
            "most complete, some are compensated or time out, a few end as dead letters. "
            "Stop it and run it again: it resumes from the file."
        ),
    )
    demo.add_argument("--orders", type=int, default=2000, help="orders to place (default 2000)")
    demo.add_argument(
        "--db",
        default="sagaflow-demo.db",
        help="SQLite file (default sagaflow-demo.db); ':memory:' for no file",
    )
    demo.add_argument(
        "--stop-after", type=int, default=None, help="stop after placing this many orders"
    )
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    demo.add_argument("--quiet", action="store_true", help="no progress line")
    demo.set_defaults(run=_demo)

    instances = _store_parser(
        commands,
        "instances",
        "list the instances in flight",
        "List the instances in flight: age, time since their last write (idle), last "
        "event, dead letters, pending schedules and commands waiting or retrying.",
        _instances,
    )
    instances.add_argument("--saga", help="only the instances of this saga")
    instances.add_argument(
        "--status",
        choices=["active", "completing", "compensation_failed"],
        help="only the instances in this status",
    )
    instances.add_argument(
        "--stalled",
        type=parse_duration,
        metavar="DURATION",
        help="only the instances with no progress for longer than this (90s, 10m, 1h30m, 2d)",
    )

    show = _store_parser(
        commands,
        "show",
        "show one instance whole",
        "Show one instance: its status, its state, its pending schedules and commands, and "
        "its dead letters.",
        _show,
    )
    show.add_argument("saga", metavar="SAGA", help="the saga's name")
    show.add_argument("key", metavar="KEY", help="the instance key")

    dead = _store_parser(
        commands,
        "dead-letters",
        "list dead letters",
        "List the commands that failed for good and the events whose handler kept failing, "
        "oldest first.",
        _dead_letters,
    )
    dead.add_argument("--saga", help="only the dead letters of this saga")

    retry = _store_parser(
        commands,
        "retry",
        "put a dead command back in the outbox",
        "Put a command dead letter back into its instance's outbox with its attempts reset. "
        "A failed compensation resumes its chain. A timer that could not be delivered is "
        "scheduled again, due now. Other event dead letters are retried from code, "
        "with Admin.retry(id, runtime=runtime).",
        _retry,
    )
    retry.add_argument("id", metavar="ID", help="the dead letter's id (see dead-letters)")

    discard = _store_parser(
        commands,
        "discard",
        "delete a dead letter",
        "Delete a dead letter for good: nothing is dispatched or delivered.",
        _discard,
    )
    discard.add_argument("id", metavar="ID", help="the dead letter's id (see dead-letters)")
    discard.add_argument("--yes", action="store_true", help="do not ask on a terminal")

    abort = _store_parser(
        commands,
        "abort",
        "delete an instance with its schedules and commands",
        "Delete an instance with its state, pending schedules and commands; its dead "
        "letters stay. Use it for an instance that must not go on.",
        _abort,
    )
    abort.add_argument("saga", metavar="SAGA", help="the saga's name")
    abort.add_argument("key", metavar="KEY", help="the instance key")
    abort.add_argument("--yes", action="store_true", help="do not ask on a terminal")

    diagram = commands.add_parser(
        "diagram",
        help="draw a registry's sagas as Mermaid or Graphviz",
        description=(
            "Draw the sagas of a Registry: start events, handled events, and the commands, "
            "schedules and compensations each handler may produce, read from the handlers' "
            "return annotations where given."
        ),
    )
    diagram.add_argument(
        "target",
        metavar="MODULE:ATTRIBUTE",
        help="where the Registry is, e.g. myapp.sagas:registry (the current directory is "
        "on the import path)",
    )
    diagram.add_argument(
        "--format", choices=["mermaid", "dot"], default="mermaid", help="default mermaid"
    )
    diagram.add_argument("--saga", help="only this saga")
    diagram.set_defaults(run=_diagram)

    _check_parser(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = parser().parse_args(argv)
    code: int = OK
    try:
        code = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
    except* BrokenPipeError:
        code = BROKEN_PIPE
        # The reader stopped reading (`| head`): not an error worth a traceback. Python
        # flushes stdout once more at exit; pointing it at devnull keeps that quiet
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code
