"""Immutable records the runtime hands out: dispatch metadata, unmatched events."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

__all__ = ["DispatchMeta", "Unmatched"]


@attrs.frozen
class DispatchMeta:
    """What the dispatcher is told along with each command.

    Attributes:
        id: The command id, stable and unique: the same on every attempt and after a restart,
            so receivers can deduplicate. A reply names the command it answers by this id:
            for a saga that correlates replies (`@correlate(..., reply=True)`) the id also
            encodes the saga and the key, so the reply needs nothing else.
        saga: The name of the saga that produced the command.
        key: The instance key.
        attempt: 1 for the first call, 2 for the first retry, and so on.
        kind: `"send"` (a `Send` or a due `Schedule`) or `"compensate"`.
        trace: The trace context to hand on with the command, so that its receiver
            continues the trace of the request that led to it: a carrier of text
            fields, e.g. `{"traceparent": "00-...-01"}` (W3C Trace Context), as the
            `hooks` capture it (see `Hooks.capture_trace`), or `None` when no trace was
            captured (always so without hooks).
    """

    id: str
    saga: str
    key: str
    attempt: int
    kind: str
    trace: Mapping[str, str] | None = attrs.field(default=None, hash=False)


@attrs.frozen
class Unmatched:
    """An event that reached no instance that could take it, or no saga at all.

    Attributes:
        event: The event.
        saga: The saga's name, or `None` when no saga handles the event's type.
        key: The key the saga's correlate function returned, or `None` when no saga
            handles the event's type, or when the saga routes it via an association
            (the reason names it).
        reason: Why: no live instance and the handler is not `start=True`, the instance
            has completed (or was aborted), no instance is associated with the
            value looked up, or no saga handles this type.
        ended: How the instance ended, when the event came after its end: `"completed"`
            or `"aborted"` (its tombstone says so; see the how-to "Finished instances and
            late events"). `None` for any other reason, a key that never had an
            instance included.
    """

    event: object
    saga: str | None
    key: str | None
    reason: str
    ended: str | None = None
