"""JSON encoding of states, events and commands, and the allow-list of type names.

A name read back from a store is resolved only through the allow-list: types registered
explicitly (optionally under a stable name that survives renames), plus attrs and dataclass
classes of modules that are already imported and sit under an allowed package prefix.
Nothing is imported because a store named it, and nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import IterableValidationError, IterableValidationNote
from cattrs.preconf.json import JsonConverter, make_converter

from ._evolution import Upcaster, UpcastFailure, check_chain, run_chain
from ._json import Codec, default_codec
from .exceptions import DecodeError, SerializationError, UnknownTypeError

__all__ = ["Serializer", "default_type_name", "split_type_name"]

T = TypeVar("T")


def default_type_name(cls: type) -> str:
    """The name a class is stored under unless it was registered with a stable one."""
    return f"{cls.__module__}.{cls.__qualname__}"


def split_type_name(stored: str) -> tuple[str, int]:
    """A stored type name as `(name, version)`: `"shop.OrderPlaced@2"` is version 2 of
    `"shop.OrderPlaced"`; a name without `@` is version 1 (as every row written before
    versions existed)."""
    name, at, version = stored.rpartition("@")
    if at and version.isdigit() and not version.startswith("0"):
        return name, int(version)
    return stored, 1


def _exact(cls: type) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        kind = type(value)
        if kind is cls:
            return value
        if cls is float and kind is int:
            return float(value)
        raise TypeError(f"expected {cls.__name__}, got {kind.__name__} {value!r}")

    return structure


_SEQUENCES = {list: list, set: set, frozenset: frozenset, tuple: tuple}


def _is_homogeneous_sequence(t: Any) -> bool:
    origin = typing.get_origin(t)
    if origin not in _SEQUENCES:
        return False
    args = typing.get_args(t)
    return origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)


def _strict_converter() -> JsonConverter:
    """cattrs' JSON converter, minus its lenient coercions.

    A stored value of the wrong JSON type is an error, not silently converted
    (`null` is no `"None"`, `1.9` no `1`, `"abc"` no `["a", "b", "c"]`), and so is a key
    the class has no field for (a renamed or removed field), so a changed schema shows up
    as a `DecodeError` naming the field instead of as silently lost data.
    """
    converter = make_converter(forbid_extra_keys=True)
    for cls in (str, int, float, bool):
        converter.register_structure_hook(cls, _exact(cls))

    def sequence(t: Any) -> Callable[[Any, Any], Any]:
        build = _SEQUENCES[typing.get_origin(t)]
        args = typing.get_args(t)
        inner = args[0] if args else Any
        hook = converter.get_structure_hook(inner)

        def structure(value: Any, _: Any) -> Any:
            if not isinstance(value, list):
                raise TypeError(f"expected a JSON array, got {type(value).__name__} {value!r}")
            items, errors = [], []
            for index, item in enumerate(value):
                try:
                    items.append(hook(item, inner))
                except Exception as exc:  # noqa: BLE001 - reported together, by index
                    note = IterableValidationNote(f"Structuring {t} @ index {index}", index, inner)
                    exc.__notes__ = [*getattr(exc, "__notes__", []), note]
                    errors.append(exc)
            if errors:
                raise IterableValidationError(f"While structuring {t!r}", errors, t)
            return build(items)

        return structure

    converter.register_structure_hook_factory(_is_homogeneous_sequence, sequence)
    return converter


_PLAIN = (str, int, bool, float)


def _plain_field(hint: Any) -> tuple[type, bool] | None:
    """`(type, may be None)` for a field typed `str`, `int`, `bool`, `float` or one of
    them `| None`; `None` for any other type."""
    if hint in _PLAIN:
        return hint, False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2:
        if args[1] is type(None) and args[0] in _PLAIN:
            return args[0], True
        if args[0] is type(None) and args[1] in _PLAIN:
            return args[1], True
    return None


def _plain_structure(
    cls: type, converter: JsonConverter, structure: Callable[[Any, Any], Any]
) -> Callable[[Any, Any], Any]:
    """`structure` (cattrs' hook for `cls`), with a shortcut for a flat attrs class
    whose fields are all `str`, `int`, `bool`, `float` (or one of them `| None`).

    The shortcut takes a dict with exactly the class's keys and values of exactly the
    fields' types, which cattrs' strict hook would take unchanged, and builds the
    instance directly; anything else (a missing or unknown key, an `int` for a `float`,
    a wrong type) goes to `structure`, for its result or its error. A class with a hook
    of its own, or fields with hooks of their own, keeps cattrs' hook alone.
    """
    generated = getattr(getattr(structure, "__code__", None), "co_filename", "")
    if not attrs.has(cls) or not generated.startswith("<cattrs generated structure"):
        return structure
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: cattrs decides
        return structure
    fields = []
    for field in attrs.fields(cls):
        plain = _plain_field(hints.get(field.name))
        if plain is None or not field.init or field.alias != field.name:
            return structure
        hook = converter.get_structure_hook(plain[0])
        if getattr(hook, "__qualname__", "") != "_exact.<locals>.structure":
            return structure
        fields.append((field.name, *plain))
    checks = " and ".join(
        f"(type(v{i}) is {kind.__name__}{f' or v{i} is None' if optional else ''})"
        for i, (_, kind, optional) in enumerate(fields)
    )
    arguments = ", ".join(f"{name}=v{i}" for i, (name, _, _) in enumerate(fields))
    source = "\n".join(
        [
            "def structure_plain(o, t):",
            f"    if type(o) is dict and len(o) == {len(fields)}:",
            "        try:",
            *(f"            v{i} = o[{name!r}]" for i, (name, _, _) in enumerate(fields)),
            "        except KeyError:",
            "            return structure(o, t)",
            f"        if {checks or 'True'}:",
            f"            return cls({arguments})",
            "    return structure(o, t)",
        ]
    )
    namespace: dict[str, Any] = {"cls": cls, "structure": structure}
    exec(compile(source, f"<sagaflow plain structure {cls.__qualname__}>", "exec"), namespace)
    return namespace["structure_plain"]  # type: ignore[no-any-return]


def _is_message_class(obj: object) -> bool:
    return isinstance(obj, type) and (attrs.has(obj) or dataclasses.is_dataclass(obj))


def _first_field(exc: BaseException) -> tuple[str | None, str]:
    """The dotted path and reason of the first leaf error cattrs reported."""
    try:
        messages = cattrs.transform_error(exc, path="")
    except Exception:  # noqa: BLE001 - fall back to the plain message
        messages = []
    if messages:
        reason, _, where = messages[0].rpartition(" @ ")
        field = where.lstrip("$.").strip() or None
        extra = re.fullmatch(r"extra fields found \((.*)\)", reason)
        if extra:
            names = sorted(extra.group(1).split(", "))
            field = ".".join(p for p in (field, names[0]) if p)
            reason = (
                f"unknown field(s) {', '.join(map(repr, names))}: the class has no such "
                "field (renamed or removed?); bump the version and add an upcaster that "
                "renames or drops it"
            )
        return field, reason or messages[0]
    return None, f"{type(exc).__name__}: {exc}"


def _field_count(cls: type) -> int:
    if attrs.has(cls):
        return len(attrs.fields(cls))
    if dataclasses.is_dataclass(cls):
        return len(dataclasses.fields(cls))
    return 0


@attrs.define(eq=False)
class Serializer:
    """Turns messages and states into `(type name, JSON text)` and back.

    A message type registered at a version above 1 is stored as `"name@version"`; rows of
    older versions are brought up to date by its upcasters when they are read.

    Args:
        prefixes: Top-level package prefixes whose attrs and dataclass classes may be
            resolved by name (`"myapp"` allows `"myapp.orders.OrderPlaced"`).
    """

    _prefixes: set[str] = attrs.field(factory=set, alias="prefixes", converter=set)
    _converter: JsonConverter = attrs.field(factory=lambda: _strict_converter(), init=False)
    _codec: Codec = attrs.field(factory=default_codec, init=False)
    _encode: Callable[[Any], str] = attrs.field(
        default=attrs.Factory(lambda self: self._codec.encode, takes_self=True), init=False
    )
    _decode: Callable[[str], Any] = attrs.field(
        default=attrs.Factory(lambda self: self._codec.decode, takes_self=True), init=False
    )
    _by_name: dict[str, type] = attrs.field(factory=dict, init=False)
    _encoders: dict[type, tuple[str, Callable[[Any], Any]]] = attrs.field(factory=dict, init=False)
    _hooks: dict[type, Callable[[Any], Any]] = attrs.field(factory=dict, init=False)
    _names: dict[type, str] = attrs.field(factory=dict, init=False)
    _structurers: dict[type, Callable[[Any, Any], Any]] = attrs.field(factory=dict, init=False)
    _versions: dict[type, tuple[int, Mapping[int, Upcaster]]] = attrs.field(
        factory=dict, init=False
    )
    _implicit: set[type] = attrs.field(factory=set, init=False)
    """Classes on the list under their default name only because a saga handles them."""

    @property
    def converter(self) -> JsonConverter:
        """The cattrs converter sagaflow owns (never cattrs' global one)."""
        return self._converter

    @property
    def codec(self) -> str:
        """The JSON codec in use: `"msgspec"` (the `fast` extra) or `"stdlib"`."""
        return self._codec.name

    @property
    def prefixes(self) -> frozenset[str]:
        """The package prefixes whose classes are on the allow-list."""
        return frozenset(self._prefixes)

    def allow(self, prefixes: Iterable[str]) -> None:
        """Put the classes of more package prefixes on the allow-list."""
        self._prefixes.update(prefixes)

    def register_handled(self, cls: type) -> str:
        """Put a handled event type on the allow-list under its default name, unless it
        is registered already; a later `register` may still give it a stable name."""
        name = self._names.get(cls)
        if name is not None:
            return name
        name = self.register(cls)
        self._implicit.add(cls)
        return name

    def register(
        self,
        cls: type,
        name: str | None = None,
        *,
        version: int = 1,
        aliases: Iterable[str] = (),
        upcasters: Mapping[int, Upcaster] | None = None,
    ) -> str:
        """Put `cls` on the allow-list under `name` (default: module and qualified name).

        Args:
            cls: The message class.
            name: Its stable stored name.
            version: Its current version; rows stored at a lower one are upcast.
            aliases: Older names it was stored under (a renamed or moved class).
            upcasters: `{n: fn}` turns the JSON of version n into n + 1, for every n
                below `version`.

        Raises:
            SerializationError: A name is taken by another class, `cls` already has
                another name, or the version and upcasters do not fit.
        """
        name = name or default_type_name(cls)
        upcasters = dict(upcasters or {})
        aliases = tuple(aliases)
        problems = check_chain(f"message type {name!r}", version, upcasters)
        for n in (name, *aliases):
            if not isinstance(n, str) or not n or "@" in n or not n.isprintable():
                problems.append(f"type name {n!r} must be a non-empty printable string without '@'")
                continue
            known = self._by_name.get(n)
            if known is not None and known is not cls:
                problems.append(
                    f"type name {n!r} is already used by {known!r}; give {cls!r} another "
                    "stable name"
                )
        other = self._names.get(cls)
        if cls in self._implicit and other is not None:
            # A saga put it on the list under its default name: that name stays readable.
            if other != name and other not in aliases:
                aliases = (*aliases, other)
            other = None
        if other is not None and other != name:
            problems.append(
                f"{cls!r} is already registered as {other!r}, cannot rename it to {name!r}"
            )
        known_version = self._versions.get(cls)
        if known_version is not None and known_version[0] != version:
            problems.append(
                f"{cls!r} is already registered at version {known_version[0]}, not {version}"
            )
        if problems:
            raise SerializationError("; ".join(problems))
        for n in (name, *aliases):
            self._by_name[n] = cls
        self._names[cls] = name
        self._implicit.discard(cls)
        if version != 1 or upcasters:
            self._versions[cls] = (version, upcasters)
        self._encoders.pop(cls, None)
        return name

    def version_of(self, cls: type) -> int:
        """The version `cls` is written at (1 unless registered with another)."""
        return self._versions.get(cls, (1, {}))[0]

    def name_of(self, cls: type) -> str:
        """The stable name of `cls`, checking that it resolves back to `cls`.

        Raises:
            UnknownTypeError: The class would not be found again when read back.
        """
        name = self._names.get(cls)
        if name is not None:
            return name
        name = default_type_name(cls)
        if self._resolve_by_prefix(name) is not cls:
            raise UnknownTypeError(
                f"{cls!r} is not on sagaflow's type allow-list, so it could not be read "
                f"back after a restart: register it with registry.message({cls.__name__}) "
                f"or allow its package with Registry(allow=[{cls.__module__.split('.')[0]!r}])",
                type_name=name,
            )
        self._names[cls] = name
        return name

    def resolve(self, name: str) -> type:
        """The class stored under `name` (a version suffix `@n` is ignored).

        Raises:
            UnknownTypeError: `name` is not on the allow-list.
        """
        cls = self._by_name.get(name)
        if cls is None:
            base = split_type_name(name)[0]
            cls = self._by_name.get(base) or self._resolve_by_prefix(base)
            if cls is None:
                raise UnknownTypeError(
                    f"type name {name!r} is not on sagaflow's allow-list: register the "
                    "class with registry.message(...) (aliases=... for a class that was "
                    "renamed or moved) or allow its package with Registry(allow=[...]), "
                    "and make sure its module is imported",
                    type_name=name,
                )
            if base == name:
                self._by_name[name] = cls
        return cls

    def _resolve_by_prefix(self, name: str) -> type | None:
        if "<locals>" in name:
            return None
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:cut])
            module = sys.modules.get(module_name)
            if module is None:
                continue
            if not self._allowed(module_name):
                return None
            obj: Any = module
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            # Only a class that lives under an allowed prefix: an allowed module's
            # attribute may be a class imported from anywhere else.
            if _is_message_class(obj) and self._allowed(obj.__module__):
                return obj  # type: ignore[no-any-return]
            return None
        return None

    def _allowed(self, module_name: str) -> bool:
        return any(module_name == p or module_name.startswith(p + ".") for p in self._prefixes)

    def encode(self, value: object) -> tuple[str, str]:
        """Encode a message as `(stored type name, JSON text)`.

        Raises:
            UnknownTypeError: Its class is not on the allow-list.
            SerializationError: The value cannot be turned into JSON.
        """
        cls = type(value)
        try:
            name, unstructure = self._encoders[cls]
        except KeyError:
            name = self.name_of(cls)
            version = self.version_of(cls)
            if version != 1:
                name = f"{name}@{version}"
            unstructure = self._converter.get_unstructure_hook(cls)
            self._encoders[cls] = name, unstructure
        try:
            return name, self._encode(unstructure(value))
        except Exception as exc:
            raise SerializationError(
                f"cannot encode a {name!r} value as JSON: {type(exc).__name__}: {exc}"
            ) from exc

    def dumps(self, value: object, name: str) -> str:
        """Encode `value` as JSON text; `name` names it in errors."""
        cls = type(value)
        unstructure = self._hooks.get(cls)
        if unstructure is None:
            unstructure = self._hooks[cls] = self._converter.get_unstructure_hook(cls)
        try:
            return self._encode(unstructure(value))
        except Exception as exc:
            raise SerializationError(
                f"cannot encode a {name!r} value as JSON: {type(exc).__name__}: {exc}"
            ) from exc

    def decode(
        self, name: str, data: str, *, saga: str | None = None, key: str | None = None
    ) -> object:
        """Decode a message stored as `(type name, JSON text)`, upcasting older versions.

        Raises:
            UnknownTypeError: `name` is not on the allow-list.
            DecodeError: The payload does not fit the class, or its version is newer
                than the class's.
        """
        cls = self.resolve(name)
        base, stored = split_type_name(name)
        current, upcasters = self._versions.get(cls, (1, {}))
        return self.loads(
            data,
            cls,
            base,
            saga=saga,
            key=key,
            version=stored,
            current=current,
            upcasters=upcasters,
        )

    def loads(
        self,
        data: str,
        cls: type[T],
        name: str,
        *,
        saga: str | None = None,
        key: str | None = None,
        version: int = 1,
        current: int = 1,
        upcasters: Mapping[int, Upcaster] | None = None,
    ) -> T:
        """Decode JSON text stored at `version` as `cls` at version `current`.

        The upcasters bring older JSON up to `current` first. At the current version
        decoding is strict: the JSON must be an object, not empty when the class has
        fields, with no key the class does not know, and values of the right JSON types.
        Errors name `name`, `saga`, `key`, the version and the field.

        Raises:
            DecodeError: The text is not JSON, does not fit `cls`, was written by a newer
                version, or an upcaster failed.
        """
        field: str | None = None
        try:
            value = self._decode(data)
            if version != current:
                if version > current:
                    raise _Unfit(
                        f"it was written at version {version}, newer than this code's "
                        f"version {current}; run the code that wrote it, or a newer one"
                    )
                value = run_chain(value, version, upcasters or {}, current)
            if type(value) is not dict:
                if _is_message_class(cls):
                    raise _Unfit(f"the stored JSON is {_json_kind(value)}, not an object")
            elif not value and _field_count(cls):
                raise _Unfit(
                    "the stored JSON is an empty object, but the class has fields (sagaflow "
                    "always writes every field, so the row is not what it wrote)"
                )
            structure = self._structurers.get(cls)
            if structure is None:
                structure = self._structurers[cls] = _plain_structure(
                    cls, self._converter, self._converter.get_structure_hook(cls)
                )
            return structure(value, cls)  # type: ignore[no-any-return]
        except Exception as exc:
            if isinstance(exc, json.JSONDecodeError):
                reason = f"corrupt JSON ({exc})"
            elif isinstance(exc, _Unfit | UpcastFailure):
                reason = str(exc)
            else:
                field, reason = _first_field(exc)
            where = f" of saga {saga!r} key {key!r}" if saga is not None else ""
            at = f" at field {field!r}" if field else ""
            raise DecodeError(
                f"stored {name!r}{where} cannot be decoded{at}: {reason} (stored at "
                f"version {version}); the row is kept: fix the class, add an upcaster or "
                "roll back, then retry",
                type_name=name,
                field=field,
                saga=saga,
                key=key,
                version=version,
            ) from exc


class _Unfit(Exception):
    """A stored value is not what the class at this version can read."""


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return f"a {type(value).__name__} ({value!r:.40})"
