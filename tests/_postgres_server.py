"""A PostgreSQL server for the tests, and a fresh schema per test.

The server is the one `SAGAFLOW_PG_DSN` names (CI exports it, see `.ci/pg.sh`). Without
it, a throwaway server is started for the session from the local PostgreSQL binaries
(`initdb`/`pg_ctl` on PATH or under `/usr/lib/postgresql/*/bin`), in a temporary
directory, on 127.0.0.1 at a free port, with trust authentication and `fsync=off`. As
root it runs as the `postgres` system user, since PostgreSQL refuses to run as root.

If no server can be had, the tests that need one are skipped with the reason, except on
CI (`CI` set), where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

from sagaflow.stores._postgres import redact_dsn

__all__ = ["drop_schema", "pg_schema", "postgres_dsn"]


class _Unavailable(Exception):
    """No throwaway server can be started here."""


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _find_bin() -> Path:
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        directory = Path(on_path).resolve().parent
        if (directory / "initdb").exists():
            return directory

    def major(path: Path) -> float:
        try:
            return float(path.parent.name)
        except ValueError:
            return 0.0

    # Debian keeps the server binaries off PATH: take the newest major version.
    for directory in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True):
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    raise _Unavailable("initdb and pg_ctl were not found (Debian: apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _ThrowawayServer:
    """A PostgreSQL cluster in a temporary directory, deleted by `stop`."""

    def __init__(self) -> None:
        self._bin = _find_bin()
        self._prefix: list[str] = []
        base: str | None = None
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise _Unavailable(
                    "running as root and there is no `postgres` user to run the server as"
                ) from None
            if shutil.which("runuser") is None:
                raise _Unavailable("running as root and `runuser` is missing")
            self._prefix = ["runuser", "-u", "postgres", "--"]
            base = "/tmp"  # the postgres user must reach it, and the socket path stay short
        self._dir = Path(tempfile.mkdtemp(prefix="sagaflow-pg-", dir=base))
        if owner is not None:
            os.chown(self._dir, owner.pw_uid, owner.pw_gid)
        self._data = self._dir / "data"
        self._log = self._dir / "log.txt"
        self._started = False
        self.dsn = ""

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            [*self._prefix, *argv],
            cwd=self._dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise _Unavailable(
                f"{Path(argv[0]).name} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-800:]}"
            )

    def start(self) -> None:
        self._run(
            str(self._bin / "initdb"),
            f"--pgdata={self._data}",
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        # A free port may be taken by someone else before the server binds it.
        failure: _Unavailable | None = None
        for _ in range(5):
            port = _free_port()
            options = (
                f"-p {port} -k {self._dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200"
            )
            try:
                self._run(
                    str(self._bin / "pg_ctl"),
                    f"--pgdata={self._data}",
                    f"--log={self._log}",
                    "--wait",
                    "--timeout=60",
                    "--silent",
                    "-o",
                    options,
                    "start",
                )
            except _Unavailable as exc:
                failure = exc
                continue
            self._started = True
            self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            return
        assert failure is not None
        raise _Unavailable(f"{failure}; server log: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " | ".join(self._log.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(none)"

    def stop(self) -> None:
        try:
            if self._started:
                self._run(
                    str(self._bin / "pg_ctl"),
                    f"--pgdata={self._data}",
                    "--mode=fast",
                    "--wait",
                    "--timeout=60",
                    "--silent",
                    "stop",
                )
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


def _check_reachable(dsn: str) -> None:
    try:
        with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(
            f"SAGAFLOW_PG_DSN={redact_dsn(dsn)} is set but the server cannot be reached: "
            f"{type(exc).__name__}: {str(exc).strip()}",
            pytrace=False,
        )


def _no_server(reason: str) -> NoReturn:
    message = (
        "PostgreSQL tests need a server: set SAGAFLOW_PG_DSN, or make initdb/pg_ctl "
        f"available so the tests can start one ({reason})"
    )
    if _on_ci():
        pytest.fail(f"CI is set and no PostgreSQL server is reachable. {message}", False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """The DSN of a PostgreSQL server for this test session.

    `SAGAFLOW_PG_DSN` when set (it must be reachable); otherwise a throwaway server that
    is stopped and deleted at the end of the session. No server: skip, or fail on CI.
    """
    dsn = os.environ.get("SAGAFLOW_PG_DSN")
    if dsn:
        _check_reachable(dsn)
        yield dsn
        return
    try:
        server = _ThrowawayServer()
    except _Unavailable as exc:
        _no_server(str(exc))
    try:
        server.start()
    except _Unavailable as exc:
        server.stop()
        _no_server(str(exc))
    try:
        yield server.dsn
    finally:
        server.stop()


def drop_schema(dsn: str, schema: str) -> None:
    """Drop `schema` and everything in it, if it exists."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    """A schema name no other test uses; the schema is dropped after the test."""
    schema = f"sagaflow_test_{uuid.uuid4().hex[:12]}"
    yield schema
    drop_schema(postgres_dsn, schema)
