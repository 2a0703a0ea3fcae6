"""`Hooks`: what the runtime tells metrics and tracing code, with no dependency.

Also the runtime's side of trace propagation: a captured trace context travels with an
event, and with the commands and schedules its handling produced, as a short JSON text
(`trace_text`), and is handed back to the hooks as a carrier (`trace_carrier`).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import attrs

from ._records import DispatchMeta, Unmatched
from .stores._protocol import DeadLetter, RowCounts

__all__ = [
    "Hooks",
    "capture",
    "handling_span",
    "trace_carrier",
    "trace_text",
    "traced",
    "wants_counts",
]

log = logging.getLogger("sagaflow.runtime")


def _takes_trace(method: Callable[..., Any]) -> bool:
    """Whether `method` accepts the `trace` keyword (hooks written before it did not)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin with no signature
        return False
    return any(p.name == "trace" or p.kind is p.VAR_KEYWORD for p in parameters)


class Hooks:
    """Subclass and override what you need; every method does nothing by default.

    The runtime calls these on its hot path, so keep them cheap. `handling` and
    `dispatching` may return a context manager (for a tracing span) that is entered
    around the handler call or the dispatcher call and sees its exception, if any.
    `sagaflow.otel.OpenTelemetryHooks` (extra `sagaflow[otel]`) is one implementation.

    Traces end to end: `capture_trace` is called where a trace starts to travel (in
    `publish`, inside the `handling` span, inside the `dispatching` span), and what it
    returns is stored with the event, then with the commands and schedules its
    handling produced, so that it survives restarts and crosses processes. It comes back
    as `handling(..., trace=...)` and as `DispatchMeta.trace`. By default nothing is
    captured, and nothing is stored.
    """

    _takes_trace: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass written before `trace` existed is called without it.
        cls._takes_trace = _takes_trace(cls.handling)

    def capture_trace(self) -> Mapping[str, str] | None:
        """The trace context current in the calling task, as a carrier of text fields
        (for W3C Trace Context: `traceparent`, maybe `tracestate`), or `None`.

        Called in `publish` (and for each event `run` consumes), and inside the spans
        that `handling` and `dispatching` return. Keep it small: it is stored with every
        command and schedule.
        """
        return None

    def handling(
        self,
        saga: str,
        key: str,
        event: object,
        instance_id: str,
        *,
        trace: Mapping[str, str] | None = None,
    ) -> AbstractContextManager[object] | None:
        """A handler is about to run for `event` on instance `(saga, key)`.

        `trace` is the trace context the event carries: captured when it was
        published, or when the handling that scheduled it (a due `to_self` schedule) or
        sent its command (a `CommandFailed`) ran; `None` if none was captured.
        """
        return None

    def dispatching(
        self, command: object, meta: DispatchMeta
    ) -> AbstractContextManager[object] | None:
        """The dispatcher is about to be called; `meta.attempt` counts from 1, and
        `meta.trace` is the trace context of the handling that produced the command."""
        return None

    def handler_retry(self, saga: str, key: str, event: object, attempt: int, error: str) -> None:
        """A handler raised and its event will be tried again."""

    def command_retry(self, meta: DispatchMeta, error: str, delay: float) -> None:
        """A dispatch failed and will be tried again after `delay` seconds."""

    def dead_letter(self, letter: DeadLetter) -> None:
        """A command or event became a dead letter (committed; also logged at WARNING)."""

    def unmatched(self, unmatched: Unmatched) -> None:
        """An event reached no instance that could take it, or no saga handles its type
        (then `unmatched.saga` and `unmatched.key` are `None`); also logged at WARNING."""

    def batch_committed(self, size: int, seconds: float) -> None:
        """A shard committed a batch of `size` items; the commit took `seconds`."""

    def rows_counted(self, counts: RowCounts) -> None:
        """The store's rows were counted (every `Runtime(gauge_interval=...)` seconds):
        instances by status, commands in the outbox, due schedules, dead letters.

        The runtime counts only for hooks that override this method.
        """


def wants_counts(hooks: Hooks | None) -> bool:
    """Whether `hooks` overrides `Hooks.rows_counted` (only then are rows counted)."""
    method = getattr(type(hooks), "rows_counted", None)
    return hooks is not None and method is not None and method is not Hooks.rows_counted


def trace_text(carrier: Mapping[str, str] | None) -> str | None:
    """A captured carrier as the text stored with events, commands and schedules."""
    if not carrier:
        return None
    return json.dumps(dict(carrier), separators=(",", ":"), sort_keys=True)


def trace_carrier(text: str | None) -> dict[str, str] | None:
    """Stored trace text as a carrier again; `None` for none, or for text that is not
    a JSON object of strings (a trace is never worth failing a handler or a dispatch)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return None
    return value


def _captured(hooks: Hooks) -> Mapping[str, str] | None:
    try:
        return hooks.capture_trace()
    except Exception:
        log.exception("hook %r raised; no trace is kept", hooks.capture_trace)
        return None


def capture(hooks: Hooks | None) -> str | None:
    """`hooks.capture_trace()` as stored text; `None` without hooks, or if it raised."""
    return None if hooks is None else trace_text(_captured(hooks))


def traced(hooks: Hooks, meta: DispatchMeta) -> DispatchMeta:
    """`meta` with the trace current inside the `dispatching` span, if one is captured
    (the receiver of the command continues that span)."""
    carrier = _captured(hooks)
    return meta if not carrier else attrs.evolve(meta, trace=dict(carrier))


def handling_span(
    hooks: Hooks, saga: str, key: str, event: object, instance_id: str, trace: str | None
) -> AbstractContextManager[object] | None:
    """`hooks.handling(...)`, with the event's trace when there is one and the hooks
    take it."""
    carrier = trace_carrier(trace)
    if carrier is not None and getattr(hooks, "_takes_trace", False):
        return hooks.handling(saga, key, event, instance_id, trace=carrier)
    return hooks.handling(saga, key, event, instance_id)
