"""Replies correlated by command id: command ids that say which instance sent them.

A command id is `{instance_id}.{version}.{n}` (stable and unique, see `_batch.py`). The
commands of a saga that correlates replies (`@correlate(Reply, reply=True)`) get a
suffix `:{saga}:{key}`, both percent-encoded (so neither holds a `:`), and a reply that
echoes the id finds its instance from it alone: no lookup table, no store read, and
nothing at all for sagas that do not correlate replies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

import attrs

__all__ = ["ReplyCorrelate", "reply_suffix"]


def reply_suffix(saga: str, key: str) -> str:
    """What the command ids of instance `(saga, key)` end with."""
    return f":{quote(saga, safe='')}:{quote(key, safe='')}"


def _parse(command_id: str) -> tuple[str, str] | None:
    """The `(saga, key)` a command id names, or `None` if it names none."""
    head, _, rest = command_id.partition(":")
    saga, sep, key = rest.partition(":")
    if not head or not sep or ":" in key:
        return None
    return unquote(saga, errors="strict"), unquote(key, errors="strict")


@attrs.frozen
class ReplyCorrelate:
    """A `@correlate(..., reply=True)` function of one saga, as routing calls it.

    Called with an event, it returns the key of the saga's instance the reply is for,
    or `None` when the command id it answers was not made by this saga (another saga,
    under the same reply type, takes it). Anything but a `str` or `None` from the
    user's function comes back as is, for the runtime to refuse.
    """

    fn: Callable[[Any], Any]
    names: frozenset[str]
    """The saga's name and aliases: ids made under an older name still count."""

    def __call__(self, event: Any) -> Any:
        command_id = self.fn(event)
        if type(command_id) is not str:
            return command_id
        try:
            found = _parse(command_id)
        except UnicodeDecodeError:
            return None
        if found is None or found[0] not in self.names:
            return None
        return found[1]
