"""Schema evolution: versions, upcasters, and the chain that brings stored JSON up to date.

A saga's state and a registered message type each have a version (1 unless declared).
Every stored row records the version it was written with. An upcaster turns the JSON of
version n into version n + 1; on load the chain runs on the JSON before cattrs sees it,
so a renamed, split or retyped field is migrated explicitly instead of dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["UPCAST_ATTR", "Upcaster", "UpcastFailure", "check_chain", "run_chain", "upcast"]

UPCAST_ATTR = "__sagaflow_upcast__"

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the stored JSON object of one version into the next version's."""

F = TypeVar("F")


def upcast(version: int, /) -> Callable[[F], F]:
    """Mark a saga method that turns stored state JSON of `version` into `version + 1`.

    Put it on a `@staticmethod` (above or below it) or a plain method of the saga class;
    it receives the decoded JSON object (a `dict`) and returns the next version's. The
    saga's `version=` must have an upcaster for every version below it: a gap is an
    error when the saga is registered.

    ```python
    @registry.saga(state=Order, version=2)
    class OrderSaga:
        @upcast(1)
        @staticmethod
        def add_currency(data: dict[str, Any]) -> dict[str, Any]:
            return {**data, "currency": "EUR"}
    ```

    Args:
        version: The stored version this function reads (1 or more).

    Returns:
        A decorator that marks the function and returns it unchanged.
    """
    if type(version) is not int or version < 1:
        raise TypeError(f"@upcast takes the version it reads, an int >= 1, not {version!r}")

    def mark(fn: F) -> F:
        setattr(fn, UPCAST_ATTR, version)
        return fn

    return mark


def check_chain(what: str, version: object, upcasters: Mapping[int, Any]) -> list[str]:
    """What is wrong with a version and its upcasters (empty if nothing).

    `what` names the owner in the messages ("saga 'order'", "message type 'x.Y'").
    """
    if type(version) is not int or version < 1:
        return [f"{what}: version must be an int >= 1, got {version!r}"]
    problems = []
    extra = sorted(v for v in upcasters if not (type(v) is int and 1 <= v < version))
    if extra:
        problems.append(
            f"{what}: upcasters for version(s) {extra} do not fit version {version} "
            f"(an upcaster for n turns n into n + 1, so n runs from 1 to {version - 1})"
        )
    missing = [v for v in range(1, version) if v not in upcasters]
    if missing:
        problems.append(
            f"{what} is at version {version} but has no upcaster for version(s) {missing}: "
            "stored rows of those versions could not be read; add @upcast(n) functions "
            "(for a message type: upcasters={n: fn})"
        )
    problems.extend(
        f"{what}: the upcaster for version {v} ({fn!r}) is not callable"
        for v, fn in upcasters.items()
        if not callable(fn)
    )
    return problems


class UpcastFailure(Exception):
    """An upcaster raised or returned something other than a JSON object."""

    def __init__(self, version: int, reason: str) -> None:
        super().__init__(f"the upcaster from version {version} to {version + 1} {reason}")
        self.version = version


def run_chain(value: Any, stored: int, upcasters: Mapping[int, Upcaster], current: int) -> Any:
    """Bring `value`, stored at version `stored`, up to `current`.

    Raises:
        UpcastFailure: An upcaster failed, or returned something other than a `dict`.
    """
    for version in range(stored, current):
        if not isinstance(value, dict):
            raise UpcastFailure(
                version, f"cannot run: the stored JSON is {_kind(value)}, not an object"
            )
        try:
            value = upcasters[version](value)
        except Exception as exc:
            raise UpcastFailure(version, f"raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(value, dict):
            raise UpcastFailure(version, f"returned {_kind(value)}, not a dict")
    return value


def _kind(value: Any) -> str:
    return "an array" if isinstance(value, list) else f"a {type(value).__name__} ({value!r:.40})"
