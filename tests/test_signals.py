"""Interrupts and signals: `KeyboardInterrupt`/`SystemExit` raised in user code reach the
runtime's owner as themselves, and the command line stops at the first SIGINT or SIGTERM,
says what is safe, and exits 130/143, after which a second run resumes.

Interrupt tests run `anyio.run` themselves (an interrupt must not cross pytest's own
event loop); signal tests run the command line in a subprocess and signal it once its
progress shows it busy.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from sagas_for_tests import Cmd, Log, Recorder, Started, Touched, scripted_registry

from sagaflow import DispatchMeta, Runtime, Send
from sagaflow.stores import MemoryStore, SQLiteStore

BACKENDS = ["asyncio", "trio"]
ROOT = Path(__file__).resolve().parent.parent


# -- KeyboardInterrupt and SystemExit ----------------------------------------------------


def raising(exc_type: type[BaseException], where: str) -> Any:
    """A script that raises `exc_type` in the sync handler (`Started`), in the async one
    (`Touched`), or not at all (the dispatcher raises it)."""

    async def in_async_handler() -> None:
        await anyio.lowlevel.checkpoint()
        raise exc_type()

    def script(state: Log, event: Any) -> Any:
        if where == "sync handler" and isinstance(event, Started):
            raise exc_type()
        if where == "async handler" and isinstance(event, Touched):
            return in_async_handler()
        if isinstance(event, Started):
            return Send(Cmd(event.key, "x"))
        return None

    return script


class RaisingDispatcher(Recorder):
    def __init__(self, exc_type: type[BaseException] | None) -> None:
        super().__init__()
        self.exc_type = exc_type

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        await anyio.lowlevel.checkpoint()
        if self.exc_type is not None:
            raise self.exc_type()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["sync handler", "async handler", "dispatcher"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_in_user_code_surfaces_as_itself(
    backend: str, where: str, exc_type: type[BaseException], tmp_path: Path
) -> None:
    """`except KeyboardInterrupt` (or `SystemExit`) around `async with Runtime(...)`
    catches it, not an ExceptionGroup; the store is closed and can be opened again."""
    registry = scripted_registry(raising(exc_type, where))
    path = tmp_path / "sagas.db"

    async def main() -> str:
        dispatcher = RaisingDispatcher(exc_type if where == "dispatcher" else None)
        try:
            with anyio.fail_after(60):
                async with Runtime(registry, store=SQLiteStore(path), dispatch=dispatcher) as rt:
                    await rt.publish(Started("k"))
                    await rt.publish(Touched("k"))
                    await rt.drain()
        except exc_type as exc:
            return f"caught {type(exc).__name__}"
        return "not raised"

    assert anyio.run(main, backend=backend) == f"caught {exc_type.__name__}"

    async def reopen() -> None:
        async with Runtime(registry, store=SQLiteStore(path), dispatch=Recorder()) as rt:
            await rt.drain()

    anyio.run(reopen, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_interrupt_in_the_body_surfaces_as_itself(backend: str) -> None:
    async def main() -> str:
        try:
            async with Runtime(scripted_registry(), store=MemoryStore(), dispatch=Recorder()) as rt:
                await rt.publish(Started("k"))
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            return "caught"

    assert anyio.run(main, backend=backend) == "caught"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_real_ctrl_c_in_a_program_without_signal_handling_is_a_keyboard_interrupt(
    backend: str, tmp_path: Path
) -> None:
    """SIGINT raised while a handler runs: `anyio.run` raises `KeyboardInterrupt`
    itself, not inside an ExceptionGroup (trio) and without hanging (asyncio)."""
    script = textwrap.dedent(
        f"""
        import signal, sys
        import anyio
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from sagas_for_tests import Recorder, Started, Touched, scripted_registry
        from sagaflow import Runtime
        from sagaflow.stores import SQLiteStore

        async def interrupt():
            signal.raise_signal(signal.SIGINT)
            await anyio.sleep(10)

        def script(state, event):
            return interrupt() if isinstance(event, Touched) else None

        async def main():
            store = SQLiteStore({str(tmp_path / "sagas.db")!r})
            async with Runtime(scripted_registry(script), store=store, dispatch=Recorder()) as rt:
                await rt.publish(Started("k"))
                await rt.publish(Touched("k"))

        try:
            anyio.run(main, backend={backend!r})
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "KeyboardInterrupt\n", "")


# -- the command line ------------------------------------------------------------------


def environment() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def demo(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sagaflow", "demo", "--db", "orders.db", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )


ORDERS = "2000"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_demo_stops_on_the_first_signal_and_a_second_run_resumes(
    tmp_path: Path, backend: str, signum: int, code: int
) -> None:
    """Signalled once its progress shows events handled, the demo stops, prints one line
    saying what is safe, no traceback, and exits 128 + the signal; run again, it resumes
    the orders in flight and every order ends exactly one way (completed, compensated,
    timed out or a dead letter)."""
    first = demo(tmp_path, "--orders", ORDERS, "--backend", backend)
    try:
        assert first.stdout is not None
        for line in first.stdout:
            handled = re.search(r"handled (\d+) events", line)
            if handled and int(handled.group(1)) > 0:
                break
        else:
            pytest.fail(f"the demo printed no progress: {first.communicate()}")
        first.send_signal(signum)
        _, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()

    assert (first.returncode, err) == (
        code,
        "stopped: everything committed is safe in orders.db; run the same command again "
        "to resume\n",
    )

    second = demo(tmp_path, "--orders", ORDERS, "--backend", backend, "--quiet")
    out, err = second.communicate(timeout=120)
    assert (second.returncode, err) == (0, "")
    counts = {
        name: int(n)
        for name, n in re.findall(
            r"^  (completed|compensated|timed out|dead letters|unfinished|in flight)\s+(\d+)",
            out,
            re.M,
        )
    }
    # The demo's mix does not depend on where it was stopped: replies are committed
    # before their command counts as delivered, and a command sent again answers once.
    assert counts == {
        "completed": 1600,
        "compensated": 180,
        "timed out": 200,
        "dead letters": 20,
        "unfinished": 0,
        "in flight": 20,
    }


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize(
    ("command", "line"),
    [
        ("instances", "stopped: nothing was changed\n"),
        (
            "abort",
            "stopped: abort changes the store in one transaction: it happened whole or not "
            "at all (look with `sagaflow show` or `sagaflow dead-letters`)\n",
        ),
    ],
)
def test_a_store_command_stops_on_the_first_signal(
    tmp_path: Path, signum: int, code: int, command: str, line: str
) -> None:
    """A store command that is slow to answer (here: one that waits for ever once the
    store is open) stops at the first signal with one line saying what is safe."""
    path = tmp_path / "sagas.db"

    async def create() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    anyio.run(create)
    url = f"sqlite://{path}"
    argv = [command, url, "s", "k", "--yes"] if command == "abort" else [command, url]
    script = textwrap.dedent(
        f"""
        import sys
        import anyio
        from sagaflow import _cli

        async def slow(admin, args, out):
            print("ready", flush=True)
            await anyio.sleep_forever()

        _cli._{command} = slow
        sys.exit(_cli.main({argv!r}))
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert (process.returncode, err) == (code, line)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_interrupt_while_leaving_the_runtime_surfaces_as_itself(backend: str) -> None:
    """The dispatcher raises KeyboardInterrupt while `__aexit__` waits for the work due
    now (another dispatch hangs): the caller still gets KeyboardInterrupt, not the
    cancellation the failing task brought on the runtime's task group."""

    class LateInterrupt(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.leaving = anyio.Event()

        async def __call__(self, command: Any, meta: DispatchMeta) -> None:
            if meta.key == "hung":  # keeps `__aexit__` waiting for the work due now
                await anyio.sleep_forever()
            await self.leaving.wait()
            raise KeyboardInterrupt

    registry = scripted_registry(raising(KeyboardInterrupt, "dispatcher"))

    async def main() -> str:
        dispatcher = LateInterrupt()
        try:
            with anyio.fail_after(60):
                async with Runtime(registry, store=MemoryStore(), dispatch=dispatcher) as rt:
                    await rt.publish(Started("hung"))
                    await rt.publish(Started("k"))
                    dispatcher.leaving.set()  # no await after it: __aexit__ is waiting then
        except KeyboardInterrupt:
            return "caught KeyboardInterrupt"
        return "not raised"

    assert anyio.run(main, backend=backend) == "caught KeyboardInterrupt"
