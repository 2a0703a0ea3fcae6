"""`Recorder`: a dispatcher for tests that records every call and fails on request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import attrs

from .. import DispatchMeta
from .._outbox import error_text

__all__ = ["Dispatched", "Match", "Recorder", "matches"]

Match: TypeAlias = "type | Callable[[Any], bool]"
"""Which commands a failure applies to: a class (its instances and subclasses' instances)
or a predicate called with the command."""


@attrs.frozen
class Dispatched:
    """One call of the dispatcher, as a `Recorder` saw it.

    Attributes:
        command: The command.
        meta: What the runtime passed along: command id, saga, key, attempt and kind
            (`"send"` or `"compensate"`).
        error: `None` if the call succeeded, else the error it raised as
            `"ExceptionType: message"` (the form `CommandFailed.error` takes).
    """

    command: object
    meta: DispatchMeta
    error: str | None = None


@attrs.define(eq=False)
class _Rule:
    match: Match
    error: Exception | None
    remaining: int | None

    def applies(self, command: object) -> bool:
        return self.remaining != 0 and matches(self.match, command)


def matches(match: Match, command: object) -> bool:
    """Whether `command` is an instance of the class `match`, or `match(command)` holds."""
    if isinstance(match, type):
        return isinstance(command, match)
    return bool(match(command))


@attrs.define(eq=False)
class Recorder:
    """A dispatcher for tests: it records every call and fails the commands it is told to.

    Pass it as `Runtime(..., dispatch=recorder)`; `Scenario` uses one of its own.
    """

    _calls: list[Dispatched] = attrs.field(factory=list, init=False)
    _rules: list[_Rule] = attrs.field(factory=list, init=False)

    @property
    def calls(self) -> list[Dispatched]:
        """Every call so far, failed ones included, in order (a copy)."""
        return list(self._calls)

    @property
    def delivered(self) -> list[object]:
        """The commands whose dispatch succeeded, in order."""
        return [c.command for c in self._calls if c.error is None]

    def command_id(self, match: Match) -> str:
        """The id of the last dispatched command that `match` matches: what a reply to
        it names (`@correlate(Reply, reply=True)` returns it from the reply).

        Args:
            match: A command class, or a predicate called with each command.

        Raises:
            LookupError: No dispatched command matches.
        """
        for call in reversed(self._calls):
            if matches(match, call.command):
                return call.meta.id
        shown = ", ".join(sorted({type(c.command).__name__ for c in self._calls})) or "none"
        what = match.__qualname__ if isinstance(match, type) else repr(match)
        raise LookupError(f"no dispatched command matches {what} (dispatched: {shown})")

    def fail(
        self, match: Match, *, error: Exception | None = None, times: int | None = None
    ) -> None:
        """Make the dispatch of matching commands raise.

        Args:
            match: A command class, or a predicate called with each command.
            error: The exception to raise; by default a `RuntimeError` naming the command.
            times: How many calls fail before matching commands go through again;
                `None` fails every call.
        """
        if times is not None and times < 1:
            raise ValueError(f"fail(times={times!r}) must be at least 1 or None")
        if not isinstance(match, type) and not callable(match):
            raise TypeError(f"fail() takes a command class or a predicate, got {match!r}")
        self._rules.append(_Rule(match, error, times))

    async def __call__(self, command: object, meta: DispatchMeta, /) -> None:
        """Record the call; raise if a `fail` rule matches the command."""
        for rule in self._rules:
            if rule.applies(command):
                if rule.remaining is not None:
                    rule.remaining -= 1
                exc = rule.error
                if exc is None:
                    exc = RuntimeError(f"{type(command).__name__} failed (Recorder.fail)")
                self._calls.append(Dispatched(command, meta, error_text(exc)))
                raise exc.with_traceback(None)
        self._calls.append(Dispatched(command, meta))
