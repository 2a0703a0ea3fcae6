"""Acknowledgement after commit: `Runtime.run(source, ack=...)`.

`ack` hears of every consumed event once nothing of it can be lost, in consumption
order and in batches, with what became of it (`Outcome`); a failed event stops the
acknowledgements before it, a slow `ack` slows the consumption down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import pytest
from sagas_for_tests import (
    T0,
    Cmd,
    Finished,
    Log,
    ScriptedSaga,
    Started,
    Touched,
    running,
    scripted_registry,
)

from sagaflow import Complete, Consumed, Outcome, Registry, Send, correlate, on
from sagaflow.exceptions import MessageError, RuntimeClosedError
from sagaflow.stores import Changes, MemoryStore

pytestmark = pytest.mark.anyio

C, D, U, X = Outcome.COMMITTED, Outcome.DUPLICATE, Outcome.UNMATCHED, Outcome.DEAD_LETTERED


class _aiter:
    """The events as an async iterator (not a generator: nothing to close if the run
    stops early)."""

    def __init__(self, *events: Any) -> None:
        self._events = iter(events)

    def __aiter__(self) -> _aiter:
        return self

    async def __anext__(self) -> Any:
        await anyio.lowlevel.checkpoint()
        try:
            return next(self._events)
        except StopIteration:
            raise StopAsyncIteration from None


def _id(event: Any) -> str | None:
    tag = getattr(event, "tag", "")
    return f"{type(event).__name__}:{event.key}:{tag}" if tag else None


class Acks:
    """An `ack` that records each call's batch."""

    def __init__(self) -> None:
        self.calls: list[list[Consumed]] = []

    async def __call__(self, consumed: list[Consumed]) -> None:
        await anyio.lowlevel.checkpoint()
        self.calls.append(consumed)

    def flat(self) -> list[tuple[Any, Outcome]]:
        return [(c.event, c.outcome) for batch in self.calls for c in batch]


async def test_every_consumed_event_is_acknowledged_in_order_with_its_outcome() -> None:
    """Committed, duplicate (same id again), unmatched (no live instance; a key the
    correlate function declined; a type no saga handles) and dead-lettered (a handler
    whose result cannot be applied), each once, in consumption order."""

    def script(state: Log, event: Any) -> Any:
        return "not an action" if event.tag == "bad" else None

    events = [
        Started("a", "1"),
        Touched("a", "2"),
        Touched("a", "2"),  # redelivered: same id
        Touched("nobody", "3"),  # no instance, not a start handler
        Started("skip-me"),  # the correlate function returns None
        Cmd("a", "x"),  # no saga handles Cmd
        Touched("a", "bad"),  # dead-lettered
        Started("b"),
    ]
    acks = Acks()
    async with running(scripted_registry(script)) as h:
        assert await h.runtime.run(_aiter(*events), id=_id, ack=acks) == len(events)

        assert acks.flat() == list(zip(events, [C, C, D, U, U, U, X, C], strict=True))
        ids = [c.id for batch in acks.calls for c in batch]
        assert ids == [_id(e) for e in events]
        assert await h.summary() == {
            "a": ("active", ["Started:1", "Touched:2"]),
            "b": ("active", ["Started"]),
        }


async def test_an_event_for_several_sagas_reports_the_outcome_that_says_most() -> None:
    """Committed in one saga and unmatched in the other is committed; dead-lettered in
    one is dead-lettered."""
    registry = Registry()
    registry.register(ScriptedSaga(), state=Log, name="plain")
    registry.register(
        ScriptedSaga(lambda s, e: "nope" if e.tag == "bad" else None), state=Log, name="picky"
    )
    acks = Acks()
    async with running(registry) as h:
        await h.runtime.publish(Started("a"))
        events = [Touched("a", "ok"), Touched("a", "bad"), Touched("new", "x")]
        await h.runtime.run(_aiter(*events), ack=acks)

        assert acks.flat() == [(events[0], C), (events[1], X), (events[2], U)]


async def test_a_handler_waiting_for_a_retry_holds_back_the_acknowledgements_after_it() -> None:
    """The event being retried is not done, so neither is anything consumed after it
    (an offset cannot skip it); once the retry commits, all of them are acknowledged."""
    failed: list[str] = []

    def script(state: Log, event: Any) -> Any:
        if event.tag == "flaky" and not failed:
            failed.append(event.tag)
            raise RuntimeError("try again")
        return None

    acks = Acks()
    events = [Started("a"), Started("b"), Touched("a", "flaky"), Touched("b", "after")]
    async with running(scripted_registry(script)) as h:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.runtime.run(_aiter(*events), ack=acks))
            await h.runtime.drain()
            await anyio.wait_all_tasks_blocked()
            # "b" has committed "after", but it was consumed after the flaky event.
            assert acks.flat() == [(events[0], C), (events[1], C)]
            assert (await h.summary())["b"][1] == ["Started", "Touched:after"]
            h.clock.advance(1)

        assert acks.flat() == [(e, C) for e in events]


async def test_acknowledgements_come_one_call_at_a_time_in_batches() -> None:
    """A slow `ack` is never called again before it returns; what was done meanwhile
    comes in the next call, together."""
    gate = anyio.Event()
    calls: list[list[str]] = []
    running_calls = 0
    overlapped = False

    async def ack(consumed: list[Consumed]) -> None:
        nonlocal running_calls, overlapped
        running_calls += 1
        overlapped |= running_calls > 1
        calls.append([c.event.key for c in consumed])  # type: ignore[attr-defined]
        if len(calls) == 1:
            await gate.wait()
        running_calls -= 1

    async def events() -> AsyncIterator[Any]:
        yield Started("k0")
        while not calls:
            await anyio.sleep(0)  # the first acknowledgement is under way
        for i in range(1, 20):
            yield Started(f"k{i}")
        gate.set()

    async with running(scripted_registry()) as h:
        assert await h.runtime.run(events(), ack=ack) == 20

    assert not overlapped
    assert calls[0] == ["k0"]
    assert [k for batch in calls for k in batch] == [f"k{i}" for i in range(20)]
    assert len(calls) < 20  # the 19 events done while the first call waited came batched


async def test_a_plain_function_can_acknowledge() -> None:
    seen: list[Consumed] = []
    async with running(scripted_registry()) as h:
        await h.runtime.run(_aiter(Started("a"), Started("b")), ack=seen.extend)

    assert seen == [Consumed(Started("a"), None, C), Consumed(Started("b"), None, C)]


async def test_a_slow_acknowledgement_slows_the_consumption_down() -> None:
    """While `ack` does not return, the run takes no more than its window of events
    from the source (twice what the mailboxes hold: 4 here), plus the batch in the
    hands of `ack`, not the whole source."""
    gate = anyio.Event()
    taken = 0

    async def events() -> AsyncIterator[Any]:
        nonlocal taken
        for i in range(100):
            taken += 1
            yield Started(f"k{i}")

    async def ack(consumed: list[Consumed]) -> None:
        await gate.wait()

    async with running(scripted_registry(), shards=1, queue_size=2) as h:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: h.runtime.run(events(), ack=ack))
            await h.runtime.drain()
            await anyio.wait_all_tasks_blocked()
            assert 4 <= taken <= 4 + 4 + 1
            gate.set()

        assert taken == 100


async def test_an_ack_that_raises_stops_the_run_with_its_error() -> None:
    consumed = 0

    async def events() -> AsyncIterator[Any]:
        nonlocal consumed
        for i in range(1000):
            consumed += 1
            yield Started(f"k{i}")
            await anyio.sleep(0)

    async def ack(done: list[Consumed]) -> None:
        raise ConnectionError("the broker went away")

    async with running(scripted_registry()) as h:
        async with aclosing(events()) as source:
            with pytest.raises(ConnectionError, match="the broker went away"):
                await h.runtime.run(source, ack=ack)

        assert consumed < 1000


class FailingStore(MemoryStore):
    """Fails (as a store that went away) any commit that writes the key `"down"`."""

    async def commit(self, changes: Changes) -> None:
        if any(w.record.key == "down" for w in changes.writes):
            raise ConnectionError("the database went away")
        await super().commit(changes)


async def test_an_event_that_cannot_be_committed_ends_the_run_unacknowledged() -> None:
    """The events before it are acknowledged; it and the ones after it never are."""
    acks = Acks()
    events = [Started("a"), Started("b"), Started("down"), Started("c")]
    async with running(scripted_registry(), store=FailingStore(), max_batch=1, shards=1) as h:
        with pytest.raises(ConnectionError, match="the database went away"):
            await h.runtime.run(_aiter(*events), ack=acks)

    assert acks.flat() == [(events[0], C), (events[1], C)]


class RefusingStore(MemoryStore):
    """Refuses the key `"poison"` as a store refuses a value it cannot encode."""

    async def commit(self, changes: Changes) -> None:
        if any(w.record.key == "poison" for w in changes.writes):
            raise ValueError("this store cannot hold the key 'poison'")
        await super().commit(changes)


async def test_a_poison_event_is_acknowledged_as_dead_lettered_and_the_run_goes_on() -> None:
    acks = Acks()
    events = [Started("a"), Started("poison"), Started("b")]
    async with running(scripted_registry(), store=RefusingStore()) as h:
        await h.runtime.run(_aiter(*events), ack=acks)

        assert acks.flat() == [(events[0], C), (events[1], X), (events[2], C)]
        assert [d.key for d in await h.store.list_dead_letters()] == ["poison"]


async def test_a_source_that_fails_raises_after_what_it_gave_is_acknowledged() -> None:
    async def events() -> AsyncIterator[Any]:
        yield Started("a")
        yield Started("b")
        raise OSError("the connection broke")

    acks = Acks()
    async with running(scripted_registry()) as h:
        with pytest.raises(OSError, match="the connection broke"):
            await h.runtime.run(events(), ack=acks)

    assert acks.flat() == [(Started("a"), C), (Started("b"), C)]


async def test_something_that_is_not_a_message_stops_the_run_after_the_rest_is_acked() -> None:
    acks = Acks()
    async with running(scripted_registry()) as h:
        with pytest.raises(MessageError, match="was given a str"):
            await h.runtime.run(_aiter(Started("a"), "oops", Started("b")), ack=acks)

    assert acks.flat() == [(Started("a"), C)]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_interrupt_in_ack_surfaces_as_itself(backend: str) -> None:
    """`except KeyboardInterrupt` around the run catches it, not an ExceptionGroup."""

    async def ack(done: list[Consumed]) -> None:
        raise KeyboardInterrupt

    async def main() -> str:
        try:
            async with running(scripted_registry()) as h:
                await h.runtime.run(_aiter(Started("a")), ack=ack)
        except KeyboardInterrupt:
            return "caught"
        return "not raised"

    assert anyio.run(main, backend=backend) == "caught"


async def test_commands_of_acknowledged_events_are_in_the_outbox_already() -> None:
    """Acknowledged means committed: the command the event produced is stored (and
    dispatched later even if the process died right after the acknowledgement)."""
    outbox: list[bool] = []

    async def ack(done: list[Consumed]) -> None:
        # Stored, or dispatched (and deleted from the outbox) already.
        outbox.append(bool(await store.list_outbox() or h.dispatched.calls))

    store = MemoryStore()
    registry = scripted_registry(lambda s, e: Send(Cmd(e.key, "go")))
    async with running(registry, store=store) as h:
        await h.runtime.run(_aiter(Started("a")), ack=ack)

    assert outbox == [True]
    assert h.clock.now() == T0


async def test_a_runtime_that_stops_under_an_acknowledged_run_ends_it_unacknowledged() -> None:
    """The runtime stops while an event is still being handled: the run raises
    `RuntimeClosedError` (it does not hang), and only the events before that one were
    acknowledged. (One event per batch: a batch commits all its events or none.)"""
    gate = anyio.Event()  # never set: the handler hangs until the runtime stops

    def script(state: Log, event: Any) -> Any:
        return gate.wait() if event.tag == "hang" else None

    acks = Acks()
    errors: list[Exception] = []
    events = [Started("a"), Touched("a", "hang"), Started("b")]

    async def consume(runtime: Any) -> None:
        try:
            await runtime.run(_aiter(*events), ack=acks)
        except RuntimeClosedError as exc:
            errors.append(exc)

    async with (
        anyio.create_task_group() as tg,
        running(scripted_registry(script), shutdown_timeout=0.1, max_batch=1) as h,
    ):
        tg.start_soon(consume, h.runtime)
        await anyio.wait_all_tasks_blocked()

    assert acks.flat() == [(events[0], C)]
    assert [type(e) for e in errors] == [RuntimeClosedError]


class LateSaga:
    """Completes on `Finished`; a `Touched` that comes later goes to a late handler."""

    @correlate
    def key(self, event: Started | Touched | Finished) -> str:
        return event.key

    @on(Started, start=True)
    def started(self, state: Log, event: Started) -> None:
        state.seen.append("started")

    @on(Finished)
    def finished(self, state: Log, event: Finished) -> Complete:
        return Complete()

    @on(Touched, late=True)
    def late(self, state: Log, event: Touched) -> Send[Cmd]:
        return Send(Cmd(event.key, f"late {len(state.seen)}"))


async def test_a_late_event_taken_by_a_late_handler_is_committed_else_unmatched() -> None:
    registry = Registry()
    registry.register(LateSaga(), state=Log, name="late")
    acks = Acks()
    events = [Started("a"), Finished("a"), Touched("a", "1"), Started("a")]
    async with running(registry) as h:
        await h.runtime.run(_aiter(*events), ack=acks)
        await h.runtime.drain()

    assert acks.flat() == [(events[0], C), (events[1], C), (events[2], C), (events[3], U)]
    assert h.dispatched.labels() == ["late 1"]
