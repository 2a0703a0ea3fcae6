"""Failure messages: expected and actual side by side."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from itertools import zip_longest
from typing import Any

import attrs

__all__ = ["fields_of", "side_by_side", "table"]

_NONE = "-"
_Row = tuple[str, str, bool]


def table(rows: Sequence[_Row], *, left: str = "expected", right: str = "actual") -> str:
    """Two aligned columns; rows that differ are marked with `!`."""
    width = max([len(left), *(len(r[0]) for r in rows)])
    lines = [f"    {left:<{width}}  {right}"]
    lines += [f"  {' ' if same else '!'} {a:<{width}}  {b}" for a, b, same in rows]
    return "\n".join(lines)


def side_by_side(expected: Sequence[Any], actual: Sequence[Any], *, ordered: bool = True) -> str:
    """A table of two lists, aligned on their common items.

    In order, items are aligned like `diff` aligns lines; as multisets, the items found
    on both sides come first, then what is missing next to what is unexpected.
    """
    rows: list[_Row] = []
    if ordered:
        left, right = [repr(x) for x in expected], [repr(x) for x in actual]
        matcher = difflib.SequenceMatcher(None, left, right, autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op == "equal":
                rows += [
                    (left[i], right[j], expected[i] == actual[j])
                    for i, j in zip(range(i1, i2), range(j1, j2), strict=True)
                ]
            else:
                rows += [
                    (_NONE if a is None else a, _NONE if b is None else b, False)
                    for a, b in zip_longest(left[i1:i2], right[j1:j2])
                ]
        return table(rows)
    unexpected = list(actual)
    missing = []
    for item in expected:
        for i, other in enumerate(unexpected):
            if other == item:
                rows.append((repr(item), repr(other), True))
                del unexpected[i]
                break
        else:
            missing.append(item)
    rows += [
        (_NONE if a is None else repr(a[0]), _NONE if b is None else repr(b[0]), False)
        for a, b in zip_longest([(m,) for m in missing], [(u,) for u in unexpected])
    ]
    return table(rows)


def fields_of(value: object) -> dict[str, Any] | None:
    """The fields of an attrs or dataclass instance, or `None` for other values."""
    cls = type(value)
    if attrs.has(cls):
        return {a.name: getattr(value, a.name) for a in attrs.fields(cls)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return None
