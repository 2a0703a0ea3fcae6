"""Immutable records the runtime hands out: dispatch metadata, unmatched events, what
became of a consumed event."""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

__all__ = ["Consumed", "DispatchMeta", "Outcome", "Unmatched"]


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


class Outcome(enum.StrEnum):
    """What became of an event `Runtime.run` consumed, once nothing of it can be lost.

    When an event reached several instances, the outcome says the most important thing
    that happened to it: `DEAD_LETTERED` before `COMMITTED` before `DUPLICATE` before
    `UNMATCHED`.
    """

    COMMITTED = "committed"
    """Its effects (state, commands, schedules, dedup mark) are committed."""
    DUPLICATE = "duplicate"
    """Its id was already applied: nothing was done again."""
    UNMATCHED = "unmatched"
    """It reached no instance: no saga handles its type, every correlate function
    returned `None`, or no live instance took it (see `on_unmatched`)."""
    DEAD_LETTERED = "dead_lettered"
    """Its handler kept failing, or its effects could not be stored: it is kept as a
    dead letter in the store, where an operator can retry it (see `Admin`)."""


@attrs.frozen
class Consumed:
    """An event `Runtime.run(source, ack=...)` consumed and is done with.

    Attributes:
        event: The event, as the source gave it.
        id: Its dedup id (from `run(id=...)`), or `None`.
        outcome: What became of it.
    """

    event: object
    id: str | None
    outcome: Outcome
