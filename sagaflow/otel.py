"""OpenTelemetry traces and metrics for sagaflow: `OpenTelemetryHooks` (extra `sagaflow[otel]`).

Pass `Runtime(..., hooks=OpenTelemetryHooks())`. Only the OpenTelemetry API is used, so
spans and metrics go wherever the application's SDK sends them; without an SDK they
cost next to nothing. Importing this module needs nothing; creating the hooks needs
`opentelemetry-api` (`pip install 'sagaflow[otel]'`).

Spans:

- `handle {EventType}` (kind CONSUMER), around each handler call, with the attributes
  `sagaflow.saga`, `sagaflow.key`, `sagaflow.event_type` and `sagaflow.instance_id`.
- `dispatch {CommandType}` (kind PRODUCER), around each dispatcher call, with
  `sagaflow.command_id`, `sagaflow.saga`, `sagaflow.key`, `sagaflow.attempt`,
  `sagaflow.kind` (`"send"` or `"compensate"`), `sagaflow.command_type` and
  `sagaflow.instance_id`.

A span whose handler or dispatcher raised records the exception and has status ERROR.

Traces end to end: the trace context current where an event is published (the span
of the web request that published it, say) is captured with the global propagator
(W3C `traceparent` and `tracestate` by default; or the `propagator` given) and stored
with the event. The `handle` span continues that trace, the commands and schedules
the handler produces carry the `handle` span's context, each `dispatch` span
continues it, and the dispatcher gets the `dispatch` span's context in
`DispatchMeta.trace` to hand on to the receiver: one trace shows request, saga and
command, across restarts and processes. Such spans carry a link to their instance's
trace (below).

An event that arrives with no trace (and a `to_self` schedule or `CommandFailed` of
one) is handled in its instance's trace, whose id is derived from the instance id,
under a parent span that is never recorded (tracing tools show it as a missing
root): the handling of every such event of one business transaction, and what follows
from it, reads as one trace. With `trace_per_instance=False`, such spans start their
own traces (or join the current one) and carry a link to the instance's trace id
instead.

Metrics (attributes in brackets):

- `sagaflow.handler.retries` (saga, event type, `error.type`): handler calls that
  raised and will be tried again.
- `sagaflow.command.retries` (saga, kind, `error.type`): dispatcher calls that raised and
  will be tried again.
- `sagaflow.dead_letters` (saga, kind): commands and events that became dead letters.
- `sagaflow.events.unmatched` (saga, event type): events that reached no instance.
- `sagaflow.batch.size` (histogram): items per committed shard batch.
- `sagaflow.commit.duration` (histogram, seconds): how long those commits took.

Gauges, store-wide, read every `Runtime(gauge_interval=...)` seconds (every runtime on
a shared store reports the same numbers):

- `sagaflow.instances` (`sagaflow.status`): stored instances by status.
- `sagaflow.outbox.depth`: commands waiting to be dispatched or retried.
- `sagaflow.schedules.due`: schedules due and not fired yet.
- `sagaflow.dead_letters.kept`: dead letters waiting for an operator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ._hooks import Hooks
from ._records import DispatchMeta, Unmatched
from .stores._protocol import DeadLetter, RowCounts

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import SpanContext, SpanKind, TracerProvider

__all__ = ["OpenTelemetryHooks", "instance_trace_id"]

_SCOPE = "sagaflow"


def _version() -> str | None:
    try:
        return metadata.version("sagaflow")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return None


def _digest(text: str, size: int, person: bytes) -> int:
    value = int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=size, person=person).digest(), "big"
    )
    return value or 1  # 0 is the invalid id


def instance_trace_id(instance_id: str) -> int:
    """The trace id of every span of one saga instance (128 bits, derived from its id).

    Args:
        instance_id: `InstanceRecord.instance_id`; for a command, the part of its id
            before the first `.`.
    """
    return _digest(instance_id, 16, b"sagaflow.trace")


def _error_type(error: str) -> str:
    """`"ValueError: bad"` -> `"ValueError"` (what `error.type` should hold)."""
    return error.partition(":")[0].strip() or "unknown"


class OpenTelemetryHooks(Hooks):
    """Runtime hooks that emit OpenTelemetry spans and metrics (see the module docs).

    Args:
        tracer_provider: Where spans go; the global tracer provider by default.
        meter_provider: Where metrics go; the global meter provider by default.
        trace_per_instance: Put the spans of an instance that continue no other trace
            into one trace derived from its instance id (the default); with `False`,
            link to it instead.
        propagator: How trace contexts are captured and read back; the global
            propagator (`opentelemetry.propagate`, W3C Trace Context and Baggage by
            default) when not given.

    Raises:
        ImportError: `opentelemetry-api` is not installed (extra `sagaflow[otel]`).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        trace_per_instance: bool = True,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        try:
            from opentelemetry import metrics, propagate, trace
        except ImportError as exc:
            raise ImportError(
                "OpenTelemetryHooks needs the OpenTelemetry API, which comes with "
                f"sagaflow's `otel` extra: pip install 'sagaflow[otel]' ({exc})"
            ) from exc
        self._trace = trace
        self._observation = metrics.Observation
        self._per_instance = trace_per_instance
        self._propagator = propagator or propagate.get_global_textmap()
        self._counts: RowCounts | None = None
        version = _version()
        self._tracer = trace.get_tracer(_SCOPE, version, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, version or "", meter_provider=meter_provider)
        self._handler_retries = meter.create_counter(
            "sagaflow.handler.retries",
            unit="{retry}",
            description="Handler calls that raised and will be tried again.",
        )
        self._command_retries = meter.create_counter(
            "sagaflow.command.retries",
            unit="{retry}",
            description="Dispatcher calls that raised and will be tried again.",
        )
        self._dead_letters = meter.create_counter(
            "sagaflow.dead_letters",
            unit="{letter}",
            description="Commands and events that became dead letters.",
        )
        self._unmatched = meter.create_counter(
            "sagaflow.events.unmatched",
            unit="{event}",
            description="Events that reached a saga but no instance that could take them.",
        )
        self._batch_size = meter.create_histogram(
            "sagaflow.batch.size",
            unit="{item}",
            description="Items per committed shard batch.",
        )
        self._commit_duration = meter.create_histogram(
            "sagaflow.commit.duration",
            unit="s",
            description="How long the store commit of a shard batch took.",
        )
        meter.create_observable_gauge(
            "sagaflow.instances",
            callbacks=[self._observe_instances],
            unit="{instance}",
            description="Stored saga instances by status (store-wide).",
        )
        for name, unit, description, field in (
            (
                "sagaflow.outbox.depth",
                "{command}",
                "Commands waiting to be dispatched or retried (store-wide).",
                "outbox",
            ),
            (
                "sagaflow.schedules.due",
                "{schedule}",
                "Schedules due and not fired yet (store-wide).",
                "due_schedules",
            ),
            (
                "sagaflow.dead_letters.kept",
                "{letter}",
                "Dead letters kept for an operator (store-wide).",
                "dead_letters",
            ),
        ):
            meter.create_observable_gauge(
                name, callbacks=[self._observer(field)], unit=unit, description=description
            )

    def __repr__(self) -> str:
        return f"OpenTelemetryHooks(trace_per_instance={self._per_instance})"

    def _instance_context(self, instance_id: str) -> SpanContext:
        trace = self._trace
        context: SpanContext = trace.SpanContext(
            trace_id=instance_trace_id(instance_id),
            span_id=_digest(instance_id, 8, b"sagaflow.span"),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        return context

    def _span(
        self,
        name: str,
        instance_id: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        carrier: Mapping[str, str] | None,
    ) -> AbstractContextManager[object]:
        trace = self._trace
        instance = self._instance_context(instance_id)
        if carrier is not None:
            parent = self._propagator.extract(carrier)
            context = trace.get_current_span(parent).get_span_context()
            if context.is_valid:
                links = [] if context.trace_id == instance.trace_id else [trace.Link(instance)]
                return self._tracer.start_as_current_span(
                    name, context=parent, kind=kind, attributes=attributes, links=links
                )
        if self._per_instance:
            return self._tracer.start_as_current_span(
                name,
                context=trace.set_span_in_context(trace.NonRecordingSpan(instance)),
                kind=kind,
                attributes=attributes,
            )
        return self._tracer.start_as_current_span(
            name, kind=kind, attributes=attributes, links=[trace.Link(instance)]
        )

    def capture_trace(self) -> Mapping[str, str] | None:
        """The current trace context, written by the propagator (`None` if empty)."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier or None

    def handling(
        self,
        saga: str,
        key: str,
        event: object,
        instance_id: str,
        *,
        trace: Mapping[str, str] | None = None,
    ) -> AbstractContextManager[object] | None:
        """A span around the handler call for `event` on instance `(saga, key)`,
        continuing `trace` if it is given."""
        event_type = type(event).__name__
        attributes = {
            "sagaflow.saga": saga,
            "sagaflow.key": key,
            "sagaflow.event_type": event_type,
            "sagaflow.instance_id": instance_id,
        }
        return self._span(
            f"handle {event_type}", instance_id, self._trace.SpanKind.CONSUMER, attributes, trace
        )

    def dispatching(
        self, command: object, meta: DispatchMeta
    ) -> AbstractContextManager[object] | None:
        """A span around the dispatcher call for `command`, continuing `meta.trace`."""
        command_type = type(command).__name__
        instance_id = meta.id.partition(".")[0]
        attributes = {
            "sagaflow.command_id": meta.id,
            "sagaflow.saga": meta.saga,
            "sagaflow.key": meta.key,
            "sagaflow.attempt": meta.attempt,
            "sagaflow.kind": meta.kind,
            "sagaflow.command_type": command_type,
            "sagaflow.instance_id": instance_id,
        }
        return self._span(
            f"dispatch {command_type}",
            instance_id,
            self._trace.SpanKind.PRODUCER,
            attributes,
            meta.trace,
        )

    def handler_retry(self, saga: str, key: str, event: object, attempt: int, error: str) -> None:
        """Count a handler retry."""
        self._handler_retries.add(
            1,
            {
                "sagaflow.saga": saga,
                "sagaflow.event_type": type(event).__name__,
                "error.type": _error_type(error),
            },
        )

    def command_retry(self, meta: DispatchMeta, error: str, delay: float) -> None:
        """Count a command retry."""
        self._command_retries.add(
            1,
            {
                "sagaflow.saga": meta.saga,
                "sagaflow.kind": meta.kind,
                "error.type": _error_type(error),
            },
        )

    def dead_letter(self, letter: DeadLetter) -> None:
        """Count a dead letter."""
        self._dead_letters.add(1, {"sagaflow.saga": letter.saga, "sagaflow.kind": letter.kind})

    def unmatched(self, unmatched: Unmatched) -> None:
        """Count an unmatched event."""
        self._unmatched.add(
            1,
            {
                "sagaflow.saga": unmatched.saga or "",  # None: no saga handles the type
                "sagaflow.event_type": type(unmatched.event).__name__,
            },
        )

    def batch_committed(self, size: int, seconds: float) -> None:
        """Record a committed batch's size and commit duration."""
        self._batch_size.record(size)
        self._commit_duration.record(seconds)

    def rows_counted(self, counts: RowCounts) -> None:
        """Keep the counts for the gauges' next reading."""
        self._counts = counts

    def _observe_instances(self, options: CallbackOptions) -> Iterable[Observation]:
        counts = self._counts
        if counts is None:
            return []
        return [
            self._observation(n, {"sagaflow.status": status})
            for status, n in sorted(counts.instances.items())
        ]

    def _observer(self, field: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            counts = self._counts
            return [] if counts is None else [self._observation(getattr(counts, field))]

        return observe
