"""What the runtime tells about work it could not do: dead letters and unmatched events.

Each is told three ways, so that none goes unnoticed: a log record at WARNING on the
`sagaflow.runtime` logger (with `saga`, `key` and the type as extra fields), a counter of
`Runtime.statistics()`, and a hook (`Hooks.dead_letter`; `Hooks.unmatched` and
`Runtime(on_unmatched=...)`). A command that failed for good and that its saga's
`CommandFailed` handler took is an expected failure: one record at INFO. Only ever called
off the success path, after the commit that made the outcome final.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._records import Unmatched

if TYPE_CHECKING:
    from ._hooks import Hooks
    from ._outbox import Counters
    from .stores._protocol import DeadLetter, OutboxRecord

__all__ = ["call_hook", "dead_letters", "taken_failures", "unmatched"]

log = logging.getLogger("sagaflow.runtime")

_WHAT = {"event": "event", "send": "command", "compensate": "compensation"}


def call_hook(hook: Callable[..., None], *args: Any) -> None:
    """Call a user's hook after a commit; its failure must not stop the runtime."""
    try:
        hook(*args)
    except Exception:
        log.exception("hook %r raised; the runtime goes on", hook)


def dead_letters(letters: Iterable[DeadLetter], counters: Counters, hooks: Hooks | None) -> None:
    """Log, count and hand to `Hooks.dead_letter` each of these committed dead letters."""
    for letter in letters:
        counters.dead_letters += 1
        counters.events_dead_lettered += letter.kind == "event"
        log.warning(
            "%s %s of saga %r key %r is a dead letter after %d attempt(s): %s "
            "(id %s; `sagaflow dead-letters` lists it, `sagaflow retry` retries it)",
            _WHAT.get(letter.kind, letter.kind),
            letter.type_name,
            letter.saga,
            letter.key,
            letter.attempts,
            letter.error,
            letter.id,
            extra={
                "saga": letter.saga,
                "key": letter.key,
                "type_name": letter.type_name,
                "dead_letter_id": letter.id,
            },
        )
        if hooks is not None:
            call_hook(hooks.dead_letter, letter)


def unmatched(
    records: Iterable[Unmatched],
    counters: Counters,
    on_unmatched: Callable[[Unmatched], None] | None,
    hooks: Hooks | None,
) -> None:
    """Log, count and hand to the hooks each of these events that reached no instance."""
    for u in records:
        counters.events_unmatched += 1
        event_type = type(u.event).__name__
        if u.saga is None:
            log.warning(
                "%s matched no saga, it was not applied: %s",
                event_type,
                u.reason,
                extra={"saga": None, "key": None, "event_type": event_type},
            )
        elif u.key is None:  # routed via an association: the reason names it
            log.warning(
                "%s for saga %r matched no instance, it was not applied: %s",
                event_type,
                u.saga,
                u.reason,
                extra={"saga": u.saga, "key": None, "event_type": event_type},
            )
        else:
            log.warning(
                "%s for saga %r key %r matched no instance, it was not applied: %s",
                event_type,
                u.saga,
                u.key,
                u.reason,
                extra={"saga": u.saga, "key": u.key, "event_type": event_type},
            )
        if on_unmatched is not None:
            call_hook(on_unmatched, u)
        if hooks is not None:
            call_hook(hooks.unmatched, u)


def taken_failures(rows: Iterable[OutboxRecord]) -> None:
    """Log at INFO each command that failed for good and that a `CommandFailed` handler took."""
    for row in rows:
        log.info(
            "command %s of saga %r key %r failed for good after %d attempt(s), and its "
            "CommandFailed handler took it: %s",
            row.type_name,
            row.saga,
            row.key,
            row.attempts,
            row.error,
            extra={
                "saga": row.saga,
                "key": row.key,
                "type_name": row.type_name,
                "command_id": row.id,
            },
        )
