"""`OpenTelemetryHooks`: spans and metrics from a real `Runtime`, read back from the SDK.

The SDK's in-memory span exporter and metric reader stand in for a collector; the
runtime runs on a `MemoryStore` with a virtual clock (`sagas_for_tests.running`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sagas_for_tests import (
    SAGA,
    Cmd,
    Finished,
    Log,
    Recorder,
    Started,
    Touched,
    running,
    scripted_registry,
)

from sagaflow import CommandFailed, Compensate, Complete, Send
from sagaflow.otel import OpenTelemetryHooks, instance_trace_id

ALWAYS = 1_000
GAUGES = {
    "sagaflow.instances",
    "sagaflow.outbox.depth",
    "sagaflow.schedules.due",
    "sagaflow.dead_letters.kept",
}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


def make_hooks(
    exporter: InMemorySpanExporter, reader: InMemoryMetricReader, **options: Any
) -> OpenTelemetryHooks:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryHooks(
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
        **options,
    )


def script() -> Any:
    """Started sends c1; the first Touched of a key raises; Finished compensates (u1)."""
    touched: set[str] = set()

    def run(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return Send(Cmd(event.key, "c1"))
        if isinstance(event, Touched) and event.key not in touched:
            touched.add(event.key)
            raise ValueError("not yet")
        if isinstance(event, Finished):
            return [Compensate([Cmd(event.key, "u1")]), Complete()]
        return None

    return run


async def run_scenario(hooks: OpenTelemetryHooks) -> tuple[str, int]:
    """Drive one instance through a command retry, a handler retry, an unmatched event and
    a compensation that fails for good; returns its instance id and the batch count."""
    recorder = Recorder({"c1": 1, "u1": ALWAYS})
    async with running(scripted_registry(script()), recorder=recorder, hooks=hooks) as h:
        await h.runtime.publish(Started("k"))
        (record,) = await h.store.list_instances()
        await h.advance(1)  # c1 is retried and goes out
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.runtime.publish, Touched("k"))
            while h.runtime.statistics().handler_retries < 1:  # the first call raised
                await anyio.sleep(0)
            await h.advance(1)  # the handler is retried and succeeds
        await h.runtime.publish(Touched("nobody"))
        await h.runtime.publish(Finished("k"))
        await h.advance(1)
        await h.advance(2)  # u1 fails for good: a dead letter
        return record.instance_id, h.runtime.statistics().batches_committed


def summary(span: ReadableSpan) -> tuple[Any, ...]:
    attributes = dict(span.attributes or {})
    attributes.pop("sagaflow.instance_id")
    attributes.pop("sagaflow.command_id", None)
    return (span.name, span.kind, span.status.status_code, attributes)


def handled(event_type: str, status: StatusCode = StatusCode.UNSET) -> tuple[Any, ...]:
    attributes = {"sagaflow.saga": SAGA, "sagaflow.key": "k", "sagaflow.event_type": event_type}
    return (f"handle {event_type}", SpanKind.CONSUMER, status, attributes)


def dispatched(attempt: int, kind: str, status: StatusCode = StatusCode.UNSET) -> tuple[Any, ...]:
    attributes = {
        "sagaflow.saga": SAGA,
        "sagaflow.key": "k",
        "sagaflow.attempt": attempt,
        "sagaflow.kind": kind,
        "sagaflow.command_type": "Cmd",
    }
    return ("dispatch Cmd", SpanKind.PRODUCER, status, attributes)


@pytest.mark.anyio
async def test_every_handler_and_dispatcher_call_is_a_span_in_the_instances_trace(
    exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    """Failed calls record their exception; every span of the instance has one trace id,
    derived from the instance id, under the same (unrecorded) parent."""
    instance_id, _ = await run_scenario(make_hooks(exporter, reader))

    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert [summary(s) for s in spans] == [
        handled("Started"),
        dispatched(1, "send", StatusCode.ERROR),
        dispatched(2, "send"),
        handled("Touched", StatusCode.ERROR),
        handled("Touched"),
        handled("Finished"),
        dispatched(1, "compensate", StatusCode.ERROR),
        dispatched(2, "compensate", StatusCode.ERROR),
        dispatched(3, "compensate", StatusCode.ERROR),
        handled("CommandFailed"),
    ]
    assert {s.attributes["sagaflow.instance_id"] for s in spans} == {instance_id}  # type: ignore[index]
    assert {s.context.trace_id for s in spans if s.context} == {instance_trace_id(instance_id)}
    # Handlings of published events hang under the instance's (unrecorded) root; each
    # dispatch, and the CommandFailed of a command, under the handling that produced it.
    parents = [(p.trace_id, p.span_id, p.is_remote) for s in spans if (p := s.parent)]
    root, started, finished = parents[0], spans[0].context, spans[5].context
    assert started is not None and finished is not None
    under_started = (started.trace_id, started.span_id, True)
    under_finished = (finished.trace_id, finished.span_id, True)
    assert parents == [
        root,
        under_started,
        under_started,
        root,
        root,
        root,
        under_finished,
        under_finished,
        under_finished,
        under_finished,
    ]
    assert root[0] == instance_trace_id(instance_id)
    assert root[2] is True
    assert [e.name for e in spans[1].events] == ["exception"]
    assert spans[3].status.description == "ValueError: not yet"
    commands = [s.attributes["sagaflow.command_id"] for s in spans if s.name == "dispatch Cmd"]  # type: ignore[index]
    assert len(set(commands[:2])) == 1
    assert all(str(c).startswith(f"{instance_id}.") for c in commands)


@pytest.mark.anyio
async def test_without_a_trace_per_instance_spans_link_to_it(
    exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    """Each handling of a published event starts a trace; what it produced (dispatches,
    the CommandFailed of its command) continues it; every span links to the instance."""
    instance_id, _ = await run_scenario(make_hooks(exporter, reader, trace_per_instance=False))

    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert len(spans) == 10
    roots = [i for i, s in enumerate(spans) if s.parent is None]
    assert roots == [0, 3, 4, 5]
    traces = [s.context.trace_id for s in spans if s.context]
    started, touched_1, touched_2, finished = (traces[i] for i in roots)
    assert traces == [
        started,
        started,
        started,
        touched_1,
        touched_2,
        finished,
        finished,
        finished,
        finished,
        finished,
    ]
    assert len(set(traces)) == 4
    assert {tuple(link.context.trace_id for link in s.links) for s in spans} == {
        (instance_trace_id(instance_id),)
    }


def metric_points(reader: InMemoryMetricReader) -> Iterator[tuple[str, dict[str, Any], Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "sagaflow"
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    yield metric.name, dict(point.attributes or {}), point


@pytest.mark.anyio
async def test_retries_dead_letters_unmatched_events_and_batches_are_measured(
    exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    _, batches = await run_scenario(make_hooks(exporter, reader))

    points = list(metric_points(reader))
    counters = sorted(
        (name, sorted(attributes.items()), point.value)
        for name, attributes, point in points
        if not isinstance(point, HistogramDataPoint) and name not in GAUGES
    )
    assert counters == [
        (
            "sagaflow.command.retries",
            [
                ("error.type", "RuntimeError"),
                ("sagaflow.kind", "compensate"),
                ("sagaflow.saga", SAGA),
            ],
            2,
        ),
        (
            "sagaflow.command.retries",
            [("error.type", "RuntimeError"), ("sagaflow.kind", "send"), ("sagaflow.saga", SAGA)],
            1,
        ),
        ("sagaflow.dead_letters", [("sagaflow.kind", "compensate"), ("sagaflow.saga", SAGA)], 1),
        (
            "sagaflow.events.unmatched",
            [("sagaflow.event_type", "Touched"), ("sagaflow.saga", SAGA)],
            1,
        ),
        (
            "sagaflow.handler.retries",
            [
                ("error.type", "ValueError"),
                ("sagaflow.event_type", "Touched"),
                ("sagaflow.saga", SAGA),
            ],
            1,
        ),
    ]
    histograms = {name: point for name, _, point in points if isinstance(point, HistogramDataPoint)}
    assert sorted(histograms) == ["sagaflow.batch.size", "sagaflow.commit.duration"]
    size, duration = histograms["sagaflow.batch.size"], histograms["sagaflow.commit.duration"]
    assert (size.count, duration.count) == (batches, batches)
    assert size.sum >= batches
    assert duration.min >= 0


def test_the_module_imports_without_opentelemetry_and_the_hooks_name_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import sagaflow.otel\n"
        "try:\n"
        "    sagaflow.otel.OpenTelemetryHooks()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(
        "OpenTelemetryHooks needs the OpenTelemetry API, which comes with sagaflow's `otel` "
        "extra: pip install 'sagaflow[otel]'"
    )


def test_commandfailed_spans_are_named_after_the_event() -> None:
    """A CommandFailed event is `handle CommandFailed`, whatever command it carries."""
    exporter = InMemorySpanExporter()
    hooks = make_hooks(exporter, InMemoryMetricReader())
    span = hooks.handling(SAGA, "k", CommandFailed(Cmd("k", "x"), "E: boom", 3), "iid")
    assert span is not None
    with span:
        pass

    (finished,) = exporter.get_finished_spans()
    assert (finished.name, finished.context.trace_id if finished.context else None) == (
        "handle CommandFailed",
        instance_trace_id("iid"),
    )
