"""The JSON codec under the serializer: the standard library's, or msgspec's when the
`fast` extra is installed.

Both write compact JSON text (no spaces) and read each other's text to equal values, so a
store written with the extra is read without it and the reverse. The fast codec writes
only values made of JSON's own types (`str`, `int`, finite `float`, `bool`, `None`, dicts
with `str` keys, lists and tuples) and hands anything else to the standard library, which
writes it or raises exactly as it does without the extra: `NaN` and infinities as the
literals `NaN` and `Infinity`, other dict keys as strings, a value JSON has no form for as
a `TypeError`. Reading, it hands the standard library whatever it does not accept itself
(those literals, numbers out of a double's range, lone surrogates, corrupt text), so the
result or the error is the standard library's.

msgspec, not orjson: orjson reads an integer past 64 bits as a `float` (a silent change of
value) and writes none at all, where msgspec reads and writes Python's integers as they are.
Dates, enums and custom types are still turned into JSON's types by cattrs first, so the
codec never uses msgspec's own encoding of them.

The environment variable `SAGAFLOW_JSON` chooses: `stdlib` forces the standard library,
`msgspec` requires the extra, unset (or empty) takes msgspec when it is installed.
"""

from __future__ import annotations

import functools
import json
import json.encoder
import json.scanner
import os
from collections.abc import Callable
from typing import Any

import attrs

from .exceptions import SerializationError

__all__ = ["Codec", "default_codec", "fast_codec", "stdlib_codec"]

ENVIRONMENT = "SAGAFLOW_JSON"


@attrs.frozen
class Codec:
    """A pair of functions between Python's JSON values and JSON text.

    Attributes:
        name: `"stdlib"` or `"msgspec"`.
        encode: JSON value to compact JSON text.
        decode: JSON text to JSON value; raises `json.JSONDecodeError` for corrupt text.
    """

    name: str
    encode: Callable[[Any], str] = attrs.field(repr=False)
    decode: Callable[[str], Any] = attrs.field(repr=False)


def _stdlib_encoder() -> Callable[[Any], str]:
    """`json.dumps(value, ensure_ascii=False, separators=(",", ":"))` without its
    per-call set-up (the hot path encodes every state)."""
    plain = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - only without CPython's C accelerator
        return plain.encode
    chunks = make(
        None, plain.default, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )

    def encode(value: Any) -> str:
        return "".join(chunks(value, 0))

    return encode


def _stdlib_decoder() -> Callable[[str], Any]:
    """`json.loads` without its per-call checks (a state not in the cache is decoded on
    every event); anything unusual goes to `json.loads` itself, for its result or error."""
    scan: Callable[[str, int], tuple[Any, int]]
    scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]

    def decode(text: str) -> Any:
        if type(text) is str:
            try:
                value, end = scan(text, 0)
            except StopIteration:  # no value at the start (whitespace, or not JSON)
                pass
            else:
                if end == len(text):
                    return value
        return json.loads(text)

    return decode


@functools.cache
def stdlib_codec() -> Codec:
    """The standard library's `json`, compact."""
    return Codec("stdlib", _stdlib_encoder(), _stdlib_decoder())


def _json_native(value: Any) -> bool:
    """Whether `value` is made of JSON's own types only, every float finite and every
    key a `str`: what msgspec writes exactly as the standard library does (a subclass,
    even of `str`, is not, so the standard library handles it as it always did)."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            kind = type(item)
            plain = kind is str or kind is int or kind is bool or item is None
            if not plain and not _json_native(item):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:
            kind = type(item)
            plain = kind is str or kind is int or kind is bool or item is None
            if not plain and not _json_native(item):
                return False
        return True
    if kind is float:
        return bool(value - value == 0.0)  # false for NaN and both infinities
    return kind is str or kind is int or kind is bool or value is None


@functools.cache
def fast_codec() -> Codec | None:
    """msgspec's JSON, falling back to the standard library's for what it would write or
    read differently; `None` when msgspec is not installed."""
    try:
        import msgspec
    except ImportError:
        return None
    stdlib = stdlib_codec()
    write = msgspec.json.Encoder().encode
    read = msgspec.json.Decoder().decode
    write_stdlib, read_stdlib = stdlib.encode, stdlib.decode

    def encode(value: Any) -> str:
        try:
            if _json_native(value):
                return write(value).decode()
        except (msgspec.MsgspecError, ValueError, TypeError, RecursionError):
            pass  # a lone surrogate, an integer too long for a string, deep nesting
        return write_stdlib(value)

    def decode(text: str) -> Any:
        try:
            return read(text)
        except (msgspec.MsgspecError, ValueError, TypeError):
            return read_stdlib(text)

    return Codec("msgspec", encode, decode)


def default_codec() -> Codec:
    """The codec `$SAGAFLOW_JSON` asks for: msgspec's when installed, unless it says
    `stdlib`.

    Raises:
        SerializationError: It names an unknown codec, or `msgspec` without the extra.
    """
    choice = os.environ.get(ENVIRONMENT, "")
    if choice == "stdlib":
        return stdlib_codec()
    if choice not in ("", "msgspec"):
        raise SerializationError(
            f"${ENVIRONMENT} is {choice!r}, which names no JSON codec: set it to 'stdlib' "
            "or 'msgspec', or unset it to use msgspec when it is installed"
        )
    fast = fast_codec()
    if fast is not None:
        return fast
    if choice:
        raise SerializationError(
            f"${ENVIRONMENT} asks for msgspec, which is not installed: "
            "pip install 'sagaflow[fast]', or unset it"
        )
    return stdlib_codec()
