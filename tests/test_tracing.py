"""Traces end to end: the trace current at `publish` travels with the event's effects.

A small `Hooks` subclass stands in for a tracer: its "span" makes its own name the
current trace (a context variable), and `capture_trace` reads that variable. So each
test states exactly which trace each handling and dispatch continues, on a virtual
clock, without OpenTelemetry; `test_otel.py` and the OpenTelemetry tests at the end
check the same with real spans.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sagas_for_tests import (
    RETRY,
    SAGA,
    T0,
    Cmd,
    Log,
    Ping,
    Recorder,
    Started,
    Touched,
    label,
    running,
    scripted_registry,
)

from sagaflow import Hooks, Runtime, Schedule, Send
from sagaflow._clock import VirtualClock
from sagaflow._hooks import trace_carrier, trace_text
from sagaflow.otel import OpenTelemetryHooks, instance_trace_id
from sagaflow.stores import Changes, MemoryStore, OutboxRecord, SQLiteStore

ALWAYS = 1_000
CURRENT: ContextVar[str | None] = ContextVar("CURRENT", default=None)
"""The trace the fake tracer calls current."""


@contextmanager
def current(name: str) -> Iterator[None]:
    """Make `name` the current trace (a "span") for the code inside."""
    token = CURRENT.set(name)
    try:
        yield
    finally:
        CURRENT.reset(token)


def carrier(name: str) -> dict[str, str]:
    return {"traceparent": name}


class FakeTracer(Hooks):
    """Records the trace each handling and dispatch was given; its spans are names."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, Mapping[str, str] | None]] = []
        self.dispatched: list[tuple[str, Mapping[str, str] | None]] = []

    def capture_trace(self) -> Mapping[str, str] | None:
        name = CURRENT.get()
        return None if name is None else carrier(name)

    def handling(
        self,
        saga: str,
        key: str,
        event: object,
        instance_id: str,
        *,
        trace: Mapping[str, str] | None = None,
    ) -> Any:
        self.handled.append((label(event), trace))
        return current(f"handle {label(event)}")

    def dispatching(self, command: Any, meta: Any) -> Any:
        self.dispatched.append((f"{command.label}#{meta.attempt}", meta.trace))
        return current(f"dispatch {command.label}")


def script(state: Log, event: Any) -> Any:
    """Started sends c1 and schedules a Ping in 5 s; the Ping sends c2."""
    if isinstance(event, Started):
        return [Send(Cmd(event.key, "c1")), Schedule(Ping(event.key), after=5, to_self=True)]
    if isinstance(event, Ping):
        return Send(Cmd(event.key, "c2"))
    return None


def traces(recorder: Recorder) -> list[tuple[str, Mapping[str, str] | None]]:
    """What each dispatcher call was given in `meta.trace`."""
    return [(f"{c.label}#{m.attempt}", m.trace) for c, m in recorder.calls]


@pytest.mark.anyio
async def test_the_publishers_trace_reaches_handler_schedules_timer_and_dispatcher() -> None:
    """request -> handle Started -> (dispatch c1, the Ping timer -> handle Ping ->
    dispatch c2): each step continues the one before, and the dispatcher gets the
    dispatch span's trace to hand on."""
    tracer = FakeTracer()
    async with running(scripted_registry(script), hooks=tracer) as h:
        with current("request"):
            await h.runtime.publish(Started("k"))
        await h.runtime.drain()
        (timer,) = await h.store.list_schedules()
        await h.advance(5)

    assert trace_carrier(timer.trace) == carrier("handle Started")
    assert tracer.handled == [
        ("Started", carrier("request")),
        ("Ping", carrier("handle Started")),
    ]
    assert tracer.dispatched == [
        ("c1#1", carrier("handle Started")),
        ("c2#1", carrier("handle Ping")),
    ]
    assert traces(h.dispatched) == [
        ("c1#1", carrier("dispatch c1")),
        ("c2#1", carrier("dispatch c2")),
    ]


@pytest.mark.anyio
async def test_a_commandfailed_handling_continues_the_trace_of_its_command() -> None:
    tracer = FakeTracer()
    recorder = Recorder({"c1": ALWAYS})
    async with running(scripted_registry(script), hooks=tracer, recorder=recorder) as h:
        with current("request"):
            await h.runtime.publish(Started("k"))
        await h.advance(1)
        await h.advance(2)  # c1 failed for good

    assert tracer.handled[-1] == ("CommandFailed:c1:3", carrier("handle Started"))
    assert tracer.dispatched[:3] == [(f"c1#{n}", carrier("handle Started")) for n in (1, 2, 3)]


@pytest.mark.anyio
async def test_without_hooks_nothing_is_captured_or_stored() -> None:
    async with running(scripted_registry(script)) as h:
        with current("request"):
            await h.runtime.publish(Started("k"))
        await h.runtime.drain()
        timers = await h.store.list_schedules()
        await h.advance(5)

    assert [t.trace for t in timers] == [None]
    assert traces(h.dispatched) == [("c1#1", None), ("c2#1", None)]


@pytest.mark.anyio
async def test_hooks_that_capture_nothing_store_nothing() -> None:
    """The default `capture_trace` returns None: no trace text is kept anywhere."""

    class Counting(Hooks):
        pass

    async with running(scripted_registry(script), hooks=Counting()) as h:
        with current("request"):
            await h.runtime.publish(Started("k"))
        await h.runtime.drain()
        timers = await h.store.list_schedules()

    assert ([t.trace for t in timers], traces(h.dispatched)) == ([None], [("c1#1", None)])


@pytest.mark.anyio
async def test_commands_keep_their_trace_across_a_restart(tmp_path: Path) -> None:
    """A command committed by one runtime is dispatched by the next with the trace of
    the handling that produced it, even by a runtime without hooks."""
    path = tmp_path / "sagas.db"
    clock = VirtualClock(start=T0)
    failing = Recorder({"c1": ALWAYS})
    with anyio.fail_after(30):
        async with Runtime(
            scripted_registry(script),
            store=SQLiteStore(path),
            dispatch=failing,
            retry=RETRY,
            clock=clock,
            hooks=FakeTracer(),
        ) as runtime:
            with current("request"):
                await runtime.publish(Started("k"))
            await runtime.drain()  # c1 failed once; its retry waits a second
        clock.advance(1)
        working = Recorder()
        async with Runtime(
            scripted_registry(script),
            store=SQLiteStore(path),
            dispatch=working,
            retry=RETRY,
            clock=clock,
        ) as runtime:
            await runtime.drain()

    assert traces(failing) == [("c1#1", carrier("dispatch c1"))]
    assert traces(working) == [("c1#2", carrier("handle Started"))]


@pytest.mark.anyio
async def test_run_keeps_each_events_own_trace_or_the_current_one() -> None:
    """`run(trace=...)` reads an event's trace (from a broker message, say); without
    it, the trace current when the event is consumed travels with it."""
    tracer = FakeTracer()

    async def events() -> AsyncIterator[Any]:
        yield Started("a")
        yield Started("b")

    async with running(scripted_registry(), hooks=tracer) as h:
        await h.runtime.run(events(), trace=lambda e: carrier(f"message {e.key}"))
        with current("consumer"):
            await h.runtime.run(events(), id=lambda e: "again")
        await h.runtime.run(events(), trace=lambda e: None, id=lambda e: "third")

    assert sorted(tracer.handled, key=str) == sorted(
        [
            ("Started", carrier("message a")),
            ("Started", carrier("message b")),
            ("Started", carrier("consumer")),
            ("Started", carrier("consumer")),
            ("Started", None),
            ("Started", None),
        ],
        key=str,
    )


@pytest.mark.anyio
async def test_hooks_written_before_traces_are_called_without_them() -> None:
    """A `handling` override without the `trace` keyword still works, traces or not."""

    class OldHooks(FakeTracer):
        def handling(self, saga: str, key: str, event: object, instance_id: str) -> Any:  # type: ignore[override]
            self.handled.append((label(event), None))
            return current(f"handle {label(event)}")

    hooks = OldHooks()
    async with running(scripted_registry(script), hooks=hooks) as h:
        with current("request"):
            await h.runtime.publish(Started("k"))
        await h.advance(5)

    assert (OldHooks._takes_trace, FakeTracer._takes_trace) == (False, True)
    assert hooks.handled == [("Started", None), ("Ping", None)]
    assert traces(h.dispatched) == [
        ("c1#1", carrier("dispatch c1")),
        ("c2#1", carrier("dispatch c2")),
    ]


@pytest.mark.anyio
async def test_a_capture_that_raises_is_logged_and_the_event_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(FakeTracer):
        def capture_trace(self) -> Mapping[str, str] | None:
            raise RuntimeError("no tracer today")

    hooks = Broken()
    async with running(scripted_registry(script), hooks=hooks) as h:
        with caplog.at_level(logging.ERROR, "sagaflow.runtime"):
            await h.runtime.publish(Started("k"))
        await h.runtime.drain()

    assert hooks.handled == [("Started", None)]
    assert traces(h.dispatched) == [("c1#1", None)]
    assert "no tracer today" in caplog.text


@pytest.mark.anyio
async def test_a_stored_trace_that_is_not_a_carrier_is_ignored() -> None:
    """A corrupt trace never fails a dispatch: the command goes out without one."""
    store = MemoryStore()
    await store.commit(
        Changes(
            outbox_adds=[
                OutboxRecord(
                    "i.1.0",
                    SAGA,
                    "k",
                    1,
                    "send",
                    "sagas_for_tests.Cmd",
                    '{"key": "k", "label": "c1"}',
                    trace="not json",
                ),
                OutboxRecord(
                    "i.1.1",
                    SAGA,
                    "k",
                    2,
                    "send",
                    "sagas_for_tests.Cmd",
                    '{"key": "k", "label": "c2"}',
                    trace='{"traceparent": 7}',
                ),
            ]
        )
    )
    async with running(scripted_registry(), store=store, hooks=FakeTracer()) as h:
        await h.runtime.drain()

    assert traces(h.dispatched) == [
        ("c1#1", carrier("dispatch c1")),
        ("c2#1", carrier("dispatch c2")),
    ]


def test_trace_text_round_trips_a_carrier_and_refuses_what_is_not_one() -> None:
    text = trace_text({"traceparent": "00-ab-cd-01", "tracestate": "x=1"})

    assert text == '{"traceparent":"00-ab-cd-01","tracestate":"x=1"}'
    assert trace_carrier(text) == {"traceparent": "00-ab-cd-01", "tracestate": "x=1"}
    assert (trace_text(None), trace_text({})) == (None, None)
    assert [trace_carrier(t) for t in (None, "", "[1]", '{"a": 1}', "{")] == [None] * 5


# -- with OpenTelemetry ------------------------------------------------------------------


def otel_hooks(exporter: InMemorySpanExporter) -> tuple[OpenTelemetryHooks, Any]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hooks = OpenTelemetryHooks(tracer_provider=provider, propagator=TraceContextTextMapPropagator())
    return hooks, provider.get_tracer("the web app")


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def parent_of(span: ReadableSpan) -> tuple[int, int] | None:
    return None if span.parent is None else (span.parent.trace_id, span.parent.span_id)


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return (span.context.trace_id, span.context.span_id)


def traceparent(span: ReadableSpan) -> dict[str, str]:
    context = span.context
    assert context is not None
    flags = int(context.trace_flags)
    return {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"}


@pytest.mark.anyio
async def test_one_opentelemetry_trace_shows_request_saga_and_command_across_a_restart(
    tmp_path: Path,
) -> None:
    """request -> handle Started -> dispatch Cmd (in a second runtime, after a restart)
    -> the receiver's parent in `meta.trace`; every span is in the request's trace and
    links to the instance's own trace."""
    exporter = InMemorySpanExporter()
    hooks, app = otel_hooks(exporter)
    path = tmp_path / "sagas.db"
    clock = VirtualClock(start=T0)
    registry = scripted_registry(lambda state, e: Send(Cmd(e.key, "c1")))
    failing = Recorder({"c1": ALWAYS})
    with anyio.fail_after(30):
        async with Runtime(
            registry,
            store=SQLiteStore(path),
            dispatch=failing,
            retry=RETRY,
            clock=clock,
            hooks=hooks,
        ) as runtime:
            with app.start_as_current_span("POST /orders", kind=SpanKind.SERVER):
                await runtime.publish(Started("k"))
            await runtime.drain()
            (record,) = await runtime.store.list_instances()
        clock.advance(1)
        working = Recorder()
        async with Runtime(
            registry,
            store=SQLiteStore(path),
            dispatch=working,
            retry=RETRY,
            clock=clock,
            hooks=hooks,
        ) as runtime:
            await runtime.drain()

    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert [s.name for s in spans] == [
        "POST /orders",
        "handle Started",
        "dispatch Cmd",
        "dispatch Cmd",
    ]
    request, handle, first, second = spans
    assert {ids(s)[0] for s in spans} == {ids(request)[0]}
    assert [parent_of(s) for s in (request, handle, first, second)] == [
        None,
        ids(request),
        ids(handle),
        ids(handle),
    ]
    assert [s.attributes["sagaflow.attempt"] for s in (first, second)] == [1, 2]  # type: ignore[index]
    instance = instance_trace_id(record.instance_id)
    assert [[link.context.trace_id for link in s.links] for s in (handle, first, second)] == [
        [instance],
        [instance],
        [instance],
    ]
    assert [m.trace for _, m in working.calls] == [traceparent(second)]


@pytest.mark.anyio
async def test_a_timer_continues_the_trace_of_the_handling_that_scheduled_it() -> None:
    exporter = InMemorySpanExporter()
    hooks, app = otel_hooks(exporter)
    async with running(scripted_registry(script), hooks=hooks) as h:
        with app.start_as_current_span("request"):
            await h.runtime.publish(Started("k"))
        await h.advance(5)

    spans = by_name(exporter.get_finished_spans())
    assert parent_of(spans["handle Started"]) == ids(spans["request"])
    assert parent_of(spans["handle Ping"]) == ids(spans["handle Started"])
    assert {ids(s)[0] for s in spans.values()} == {ids(spans["request"])[0]}


@pytest.mark.anyio
async def test_an_event_published_outside_any_span_is_traced_per_instance() -> None:
    exporter = InMemorySpanExporter()
    hooks, _ = otel_hooks(exporter)
    async with running(scripted_registry(script), hooks=hooks) as h:
        await h.runtime.publish(Touched("nobody"))  # no instance: no span at all
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()
        (record,) = await h.store.list_instances()

    spans = by_name(exporter.get_finished_spans())
    assert sorted(spans) == ["dispatch Cmd", "handle Started"]
    assert {ids(s)[0] for s in spans.values()} == {instance_trace_id(record.instance_id)}
    assert parent_of(spans["dispatch Cmd"]) == ids(spans["handle Started"])
    assert hooks.capture_trace() is None


def test_the_command_line_shows_a_rows_trace_as_its_carrier() -> None:
    from sagaflow._cli import _row_json

    row = OutboxRecord("c1", SAGA, "k", 1, "send", "T", "{}", trace='{"traceparent":"00-ab"}')

    assert _row_json(row, full=False)["trace"] == {"traceparent": "00-ab"}
