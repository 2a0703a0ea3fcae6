"""The outbox's bookkeeping of delivered commands, against sweeps of the store."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from sagas_for_tests import Cmd, Recorder, Started, running, scripted_registry

from sagaflow import DispatchMeta, Send
from sagaflow.stores import Changes, MemoryStore, PendingCommand


class StaleReadStore(MemoryStore):
    """A store whose `pending_commands` is slow: it reads the rows, and returns them only
    once a commit has deleted one of them (the read went stale meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.read = anyio.Event()
        self.deleted = anyio.Event()
        self._watch: set[str] = set()

    async def pending_commands(self, **kwargs: Any) -> Any:
        rows: list[PendingCommand] = await super().pending_commands(**kwargs)
        if rows and not self.read.is_set():
            self._watch = {p.row.id for p in rows}
            self.read.set()
            await self.deleted.wait()
        return rows

    async def commit(self, changes: Changes) -> None:
        await super().commit(changes)
        if self._watch.intersection(changes.outbox_deletes):
            self.deleted.set()


class GatedRecorder(Recorder):
    """Dispatches only once the store's sweep has read the outbox."""

    gate: anyio.Event | None = None

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        assert self.gate is not None
        await self.gate.wait()
        await super().__call__(command, meta)


@pytest.mark.anyio
async def test_a_sweep_that_read_a_row_before_its_delivery_does_not_dispatch_it_again() -> None:
    """The sweep reads the outbox, the command is delivered and its row deleted, then the
    sweep's stale rows come back: the command is not taken for a new one."""
    store = StaleReadStore()
    recorder = GatedRecorder()
    recorder.gate = store.read

    def script(state: Any, event: Any) -> Any:
        return Send(Cmd(event.key, "c1"))

    async with running(
        scripted_registry(script), store=store, recorder=recorder, sweep_interval=1
    ) as h:
        await h.runtime.publish(Started("k"))
        h.clock.advance(1)  # the sweep falls due while c1 waits for its dispatch
        with anyio.fail_after(60):
            await store.deleted.wait()
        await h.runtime.drain()
        h.clock.advance(1)  # one more sweep, now with nothing stale
        await h.runtime.drain()

    assert (recorder.labels(), await store.list_outbox()) == (["c1"], [])


@pytest.mark.anyio
async def test_commands_of_an_aborted_instance_are_not_retried() -> None:
    """An operator aborts an instance whose command backs off in the runtime's memory:
    before its next attempt the runtime sees the row is gone, and drops it."""
    from sagas_for_tests import SAGA

    from sagaflow import Admin, RetryPolicy

    def script(state: Any, event: Any) -> Any:
        return Send(Cmd(event.key, "x"))

    recorder = Recorder({"x": 1_000})
    patient = RetryPolicy(max_attempts=1_000, initial_delay=1, max_delay=1, jitter=False)
    async with running(scripted_registry(script), recorder=recorder, retry=patient) as h:
        await h.runtime.publish(Started("k"))
        await h.advance(1.5)  # the first attempt and one retry failed
        assert recorder.labels() == ["x", "x"]

        await Admin(h.store, clock=h.clock).abort(SAGA, "k")
        for _ in range(5):
            await h.advance(1)

        assert (recorder.labels(), h.runtime.statistics().outbox_depth) == (["x", "x"], 0)
