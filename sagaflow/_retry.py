"""`RetryPolicy`: how often and how far apart failed work is tried again."""

from __future__ import annotations

import random

import attrs

__all__ = ["RetryPolicy"]


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"RetryPolicy.{attribute.name} must be >= 0, got {value!r}")


def _at_least_one(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"RetryPolicy.{attribute.name} must be >= 1, got {value!r}")


@attrs.frozen
class RetryPolicy:
    """Exponential backoff with a cap and "equal jitter".

    `max_attempts` counts every call, the first included. The delay before attempt
    n + 1 is `min(initial_delay * 2 ** (n - 1), max_delay)`; with `jitter` on, a uniform
    random part of up to half of it is taken off ("equal jitter": the delay stays between
    half and all of the exponential value, so retries spread out but never bunch up at 0).

    Args:
        max_attempts: Calls in all, the first included (1 means no retry).
        initial_delay: Seconds before the second attempt.
        max_delay: The cap on one delay, in seconds.
        jitter: Spread delays randomly (see above).
    """

    max_attempts: int = attrs.field(default=5, validator=_at_least_one)
    initial_delay: float = attrs.field(default=0.1, validator=_positive)
    max_delay: float = attrs.field(default=60.0, validator=_positive)
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based).

        Returns:
            The delay before attempt `attempt + 1`.
        """
        try:
            base: float = min(self.initial_delay * 2.0 ** (attempt - 1), self.max_delay)
        except OverflowError:  # past attempt 1,024 or so: long since capped
            base = self.max_delay
        if not self.jitter or base == 0:
            return base
        jitter: float = (rng or random).uniform(0, base / 2)
        return base - jitter

    def gives_up_after(self, attempt: int) -> bool:
        """Whether failed attempt number `attempt` was the last allowed."""
        return attempt >= self.max_attempts
