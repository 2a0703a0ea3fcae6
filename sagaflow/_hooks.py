"""`Hooks`: what the runtime tells metrics and tracing code, with no dependency."""

from __future__ import annotations

from contextlib import AbstractContextManager

from ._records import DispatchMeta, Unmatched
from .stores._protocol import DeadLetter

__all__ = ["Hooks"]


class Hooks:
    """Subclass and override what you need; every method does nothing by default.

    The runtime calls these on its hot path, so keep them cheap. `handling` and
    `dispatching` may return a context manager (for a tracing span) that is entered
    around the handler call or the dispatcher call and sees its exception, if any.
    `sagaflow.otel.OpenTelemetryHooks` (extra `sagaflow[otel]`) is one implementation.
    """

    def handling(
        self, saga: str, key: str, event: object, instance_id: str
    ) -> AbstractContextManager[object] | None:
        """A handler is about to run for `event` on instance `(saga, key)`."""
        return None

    def dispatching(
        self, command: object, meta: DispatchMeta
    ) -> AbstractContextManager[object] | None:
        """The dispatcher is about to be called; `meta.attempt` counts from 1."""
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
