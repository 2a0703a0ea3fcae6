"""Test upcasters: decode stored JSON of an older version with the current code."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._registry import Registry

__all__ = ["load_message", "load_state"]


def _text(stored: Mapping[str, Any] | str) -> str:
    return stored if isinstance(stored, str) else json.dumps(stored)


def load_state(
    registry: Registry, saga: str, stored: Mapping[str, Any] | str, *, version: int
) -> Any:
    """Decode a saga state as a store holds it, written at `version`, with today's code.

    The saga's upcasters run first, then the strict decoding a runtime does, so a test
    can pin what an old row becomes before the deploy that meets it.

    Args:
        registry: The registry with the saga as it is now.
        saga: The saga's name.
        stored: The stored JSON (text, or the object it encodes).
        version: The state version the row was written at.

    Returns:
        The state object.

    Raises:
        DecodeError: The row would not decode (the message names the field).
    """
    spec = registry.get(saga)
    return spec.load_state(registry.serializer, "<test>", _text(stored), version)


def load_message(registry: Registry, type_name: str, stored: Mapping[str, Any] | str) -> Any:
    """Decode a stored event or command, as a store holds it, with today's code.

    Args:
        registry: The registry with the message types as they are now.
        type_name: The stored type name (`"name@version"` for versions above 1).
        stored: The stored JSON (text, or the object it encodes).

    Returns:
        The message object, upcast to its current version.

    Raises:
        UnknownTypeError: The name does not resolve (not registered, no alias).
        DecodeError: The row would not decode.
    """
    return registry.serializer.decode(type_name, _text(stored))
