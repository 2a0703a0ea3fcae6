"""`JsonText`: expected JSON text that equals any text of the same meaning.

sagaflow stores JSON written by the standard library or, with the `fast` extra, by
msgspec: spacing and the spelling of numbers may differ, the values may not. Tests that
compare stored rows as whole values put `JsonText(...)` where a row holds JSON text.
"""

from __future__ import annotations

import json


class JsonText(str):
    """A `str` equal to every `str` that parses to the same JSON value as it does.

    Being a subclass of `str`, it is asked first when compared with one, on either side.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        try:
            return bool(json.loads(other) == json.loads(str(self)))
        except ValueError:
            return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = str.__hash__
