"""The `Registry`: collects sagas, validates them at registration and routes events."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, TypeVar, overload

import attrs

from ._actions import CommandFailed
from ._decorators import CORRELATE_ATTR, HANDLER_ATTR, CorrelateMark, HandlerMark
from ._evolution import UPCAST_ATTR, Upcaster, check_chain
from ._replies import ReplyCorrelate
from ._retry import RetryPolicy
from ._serialization import Serializer
from .exceptions import DecodeError, RegistrationError, RegistrationErrors, SerializationError
from .stores._protocol import (
    ACTIVE,
    COMPENSATION_FAILED,
    COMPLETING,
    InstanceRecord,
    TombstonePolicy,
)

__all__ = ["HandlerSpec", "Registry", "SagaSpec", "Target"]

C = TypeVar("C", bound=type)
S = TypeVar("S")

TOMBSTONE_RETENTION = timedelta(days=7)
"""How long a finished instance's tombstone counts unless its saga says otherwise."""


@attrs.frozen
class HandlerSpec:
    """One `@on` handler of a saga, bound to the saga object."""

    saga: str
    method: str
    types: tuple[type, ...]
    start: bool
    internal: bool
    is_async: bool
    fn: Callable[[Any, Any], Any] = attrs.field(repr=False)
    retry: RetryPolicy | None = None
    late: bool = False


@attrs.define(eq=False)
class SagaSpec:
    """A registered saga: its name, object, state class, handlers and correlate functions."""

    name: str
    obj: object = attrs.field(repr=False)
    state_type: type
    handlers: dict[type, HandlerSpec] = attrs.field(repr=False)
    correlates: dict[type, Callable[[Any], Any]] = attrs.field(repr=False)
    default_correlate: Callable[[Any], Any] | None = attrs.field(repr=False)
    version: int = 1
    """The version its state is written at; rows of older versions are upcast."""
    upcasters: Mapping[int, Upcaster] = attrs.field(factory=dict, repr=False)
    """`{n: fn}`: turns stored state JSON of version n into n + 1."""
    aliases: tuple[str, ...] = ()
    """Older names of the saga: their stored rows are taken over when a runtime starts."""
    late_handlers: dict[type, HandlerSpec] = attrs.field(factory=dict, repr=False)
    """The `late=True` handlers: for events that arrive after the instance completed."""
    tombstone_retention: float = TOMBSTONE_RETENTION.total_seconds()
    """Seconds a finished instance's tombstone counts; 0 keeps none."""
    reuse_keys: bool = False
    """A start event for a tombstoned key starts a new instance."""
    replies: bool = False
    """Some correlate function takes replies by command id: command ids name the instance."""
    _handler_cache: dict[type, HandlerSpec | None] = attrs.field(
        factory=dict, init=False, repr=False
    )
    _late_cache: dict[type, HandlerSpec | None] = attrs.field(factory=dict, init=False, repr=False)
    state_name: str = attrs.field(init=False, repr=False)
    """How errors about the state name it (the state class's qualified name)."""

    @state_name.default
    def _state_name(self) -> str:
        return getattr(self.state_type, "__qualname__", repr(self.state_type))

    def handler_for(self, event_type: type) -> HandlerSpec | None:
        """The most specific handler of `event_type` (walking its base classes), if any."""
        try:
            return self._handler_cache[event_type]
        except KeyError:
            pass
        found = None
        for base in event_type.__mro__:
            found = self.handlers.get(base)
            if found is not None:
                break
        self._handler_cache[event_type] = found
        return found

    def late_handler_for(self, event_type: type) -> HandlerSpec | None:
        """The most specific `late=True` handler of `event_type`, if any."""
        try:
            return self._late_cache[event_type]
        except KeyError:
            pass
        found = None
        if self.late_handlers:
            for base in event_type.__mro__:
                found = self.late_handlers.get(base)
                if found is not None:
                    break
        self._late_cache[event_type] = found
        return found

    @property
    def tombstone_policy(self) -> TombstonePolicy:
        """What its finished instances leave: for how long, and whether with the state."""
        return TombstonePolicy(self.tombstone_retention, bool(self.late_handlers))

    def correlate_for(self, event_type: type) -> Callable[[Any], Any] | None:
        """The correlate function that applies to `event_type`, if any."""
        for base in event_type.__mro__:
            fn = self.correlates.get(base)
            if fn is not None:
                return fn
        return self.default_correlate

    def new_state(self) -> Any:
        """A fresh default state for a new instance."""
        return self.state_type()

    def load_record(self, serializer: Serializer, record: InstanceRecord) -> Any:
        """Decode a stored instance's state, after checking its bookkeeping columns.

        Raises:
            DecodeError: The row is corrupt (a version that is not a positive int, an
                unknown status: `field` names the column), or its state cannot be
                decoded (see `load_state`).
        """
        _check_record(record)
        return self.load_state(serializer, record.key, record.state, record.state_version)

    def load_state(self, serializer: Serializer, key: str, text: str, version: int) -> Any:
        """Decode a stored state written at `version`, upcasting it to `self.version`.

        Raises:
            DecodeError: It cannot be decoded; the message names saga, key, version and
                field.
        """
        return serializer.loads(
            text,
            self.state_type,
            self.state_name,
            saga=self.name,
            key=key,
            version=version,
            current=self.version,
            upcasters=self.upcasters,
        )


RECORD_FIELDS = ("version", "status", "state_version")
"""The bookkeeping columns of an instance row that `SagaSpec.load_record` checks."""
_STATUSES = frozenset((ACTIVE, COMPLETING, COMPENSATION_FAILED))


def _check_record(record: InstanceRecord) -> None:
    """Refuse a stored instance whose bookkeeping columns are not what sagaflow writes.

    Raises:
        DecodeError: A version is not a positive int, or the status is unknown.
    """
    version, status, state_version = record.version, record.status, record.state_version
    if (
        type(version) is int
        and version > 0
        and status in _STATUSES
        and type(state_version) is int
        and state_version > 0
    ):
        return  # the common case, checked in one go
    for field in RECORD_FIELDS:
        value = getattr(record, field)
        if (field == "status" and value not in _STATUSES) or (
            field != "status" and (type(value) is not int or value < 1)
        ):
            raise DecodeError(
                f"stored instance of saga {record.saga!r} key {record.key!r} has "
                f"{field} {value!r}, which sagaflow never writes (corrupt row?); the row is "
                "kept and its events wait as dead letters: repair the row, then retry them",
                type_name=record.saga,
                field=field,
                saga=record.saga,
                key=record.key,
            )


Target = tuple[SagaSpec, HandlerSpec, Callable[[Any], Any]]
"""A saga, the handler an event type reaches there, and the correlate function."""


def _positional_arity(fn: Callable[..., Any]) -> tuple[int, bool]:
    """How many positional parameters `fn` requires, and whether it accepts more."""
    sig = inspect.signature(fn)
    required = 0
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            required += 1
        elif p.kind is p.VAR_POSITIONAL:
            return required, True
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return -1, False
    return required, False


def _takes(arity: int) -> str:
    if arity < 0:
        return "it has a required keyword-only parameter"
    return f"it takes {arity} required positional parameter(s)"


@attrs.define(eq=False)
class Registry:
    """Collects sagas, validates them when they are registered, and routes events.

    Args:
        allow: More package prefixes whose attrs and dataclass classes may be read back
            from a store by name. The top-level packages of registered sagas, their states
            and handled events are always allowed.
    """

    _sagas: dict[str, SagaSpec] = attrs.field(factory=dict, init=False)
    _serializer: Serializer = attrs.field(factory=Serializer, init=False)
    _routes: dict[type, tuple[Target, ...]] = attrs.field(factory=dict, init=False)
    _allow: tuple[str, ...] = attrs.field(default=(), alias="allow", converter=tuple)
    _aliases: dict[str, str] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._serializer.allow(self._allow)

    @property
    def sagas(self) -> dict[str, SagaSpec]:
        """The registered sagas by name (a copy)."""
        return dict(self._sagas)

    @property
    def aliases(self) -> dict[str, str]:
        """Older saga names and the registered saga that took each over (a copy)."""
        return dict(self._aliases)

    @property
    def serializer(self) -> Serializer:
        """The serializer, with the type allow-list this registry built."""
        return self._serializer

    def saga(
        self,
        *,
        state: type,
        name: str | None = None,
        version: int = 1,
        aliases: Iterable[str] = (),
        tombstone_retention: timedelta | float = TOMBSTONE_RETENTION,
        reuse_keys: bool = False,
    ) -> Callable[[C], C]:
        """Class decorator: instantiate the class with no arguments and register it.

        Args:
            state: The per-instance state class (attrs or dataclass, default-constructible,
                round-trips through cattrs).
            name: The saga's stable name; defaults to the class name.
            version: The version of its stored state; every version below it needs an
                `@upcast` function on the class.
            aliases: Names the saga was stored under before (a renamed saga); a runtime
                takes their rows over when it starts.
            tombstone_retention: How long a finished instance leaves a tombstone (a
                `timedelta` or seconds; 0 for none), see `register`.
            reuse_keys: Let a start event begin a new instance for a key whose
                tombstone still counts, see `register`.

        Returns:
            A decorator that registers the class and returns it unchanged.
        """

        def decorate(cls: C) -> C:
            try:
                obj = cls()
            except TypeError as exc:
                raise RegistrationError(
                    f"saga class {cls.__qualname__} cannot be created without arguments "
                    f"({exc}); create it yourself and call registry.register(obj, state=...)",
                    saga=name or cls.__name__,
                ) from exc
            self.register(
                obj,
                state=state,
                name=name,
                version=version,
                aliases=aliases,
                tombstone_retention=tombstone_retention,
                reuse_keys=reuse_keys,
            )
            return cls

        return decorate

    def register(
        self,
        obj: S,
        *,
        state: type,
        name: str | None = None,
        version: int = 1,
        aliases: Iterable[str] = (),
        tombstone_retention: timedelta | float = TOMBSTONE_RETENTION,
        reuse_keys: bool = False,
    ) -> S:
        """Register a saga object (so it can carry collaborators).

        Args:
            obj: An instance of a class with `@on` handlers and `@correlate` functions.
            state: The per-instance state class.
            name: The saga's stable name; defaults to the class name.
            version: The version of its stored state; every version below it needs an
                `@upcast` function on the class.
            aliases: Names the saga was stored under before (a renamed saga); a runtime
                takes their rows over when it starts.
            tombstone_retention: How long a finished instance (completed, or aborted by
                an operator) leaves a tombstone behind: a `timedelta` or seconds, 7 days
                by default, 0 for none. While it counts, an event for its key is
                reported as unmatched with how the instance ended, a start event does
                not start the key again (unless `reuse_keys`), and `late=True` handlers
                get the final state. Keep it at least as long as late events can come.
            reuse_keys: A start event for a key whose tombstone still counts starts a
                new instance (the tombstone goes). Off by default: a finished key stays
                finished for `tombstone_retention`.

        Returns:
            `obj`, unchanged.

        Raises:
            RegistrationError: One problem was found (the message says which and how to
                fix it).
            RegistrationErrors: Several problems were found.
        """
        if isinstance(obj, type):
            raise RegistrationError(
                f"register() takes a saga object, got the class {obj.__qualname__}; "
                "use @registry.saga(state=...) on the class or register an instance"
            )
        cls = type(obj)
        name = name or cls.__name__
        problems: list[RegistrationError] = []

        def problem(msg: str) -> None:
            problems.append(RegistrationError(f"saga {name!r}: {msg}", saga=name))

        if not name or not name.isprintable() or name.strip() != name:
            problem("the name must be a non-empty printable string without edge spaces")
        if name in self._sagas:
            problem("a saga of this name is already registered; pass name=... to tell them apart")
        elif name in self._aliases:
            problem(f"the name is an alias of saga {self._aliases[name]!r}")
        aliases = tuple(aliases)
        for alias in aliases:
            if not isinstance(alias, str) or not alias or not alias.isprintable():
                problem(f"alias {alias!r} must be a non-empty printable string")
            elif alias == name or alias in self._sagas:
                problem(f"alias {alias!r} is the name of a registered saga")
            elif alias in self._aliases:
                problem(f"alias {alias!r} is already an alias of saga {self._aliases[alias]!r}")
        upcasters: dict[int, Upcaster] = {}
        retention = (
            tombstone_retention.total_seconds()
            if isinstance(tombstone_retention, timedelta)
            else tombstone_retention
        )
        if (
            isinstance(retention, bool)
            or not isinstance(retention, int | float)
            or not 0 <= retention < float("inf")
        ):
            problem(
                f"tombstone_retention={tombstone_retention!r} must be a timedelta or a "
                "number of seconds, 0 (keep no tombstones) or more"
            )
            retention = 0.0

        handlers: dict[type, HandlerSpec] = {}
        late_handlers: dict[type, HandlerSpec] = {}
        replies: set[type] = set()  # the types correlated by command id
        correlates: dict[type, Callable[[Any], Any]] = {}
        default_correlate: Callable[[Any], Any] | None = None
        marked = False  # some @on handler was declared, even a broken one
        starts = False  # some @on handler was declared start=True, even a broken one
        for attr_name in dir(cls):
            raw = inspect.getattr_static(cls, attr_name, None)
            fn = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw
            # A decorator above @staticmethod marks the staticmethod object itself.
            hmarks: tuple[HandlerMark, ...] = getattr(raw, HANDLER_ATTR, ()) or getattr(
                fn, HANDLER_ATTR, ()
            )
            cmark: CorrelateMark | None = getattr(raw, CORRELATE_ATTR, None) or getattr(
                fn, CORRELATE_ATTR, None
            )
            umark: int | None = getattr(raw, UPCAST_ATTR, None) or getattr(fn, UPCAST_ATTR, None)
            if umark is not None:
                if hmarks or cmark is not None:
                    problem(f"{attr_name} is marked @upcast and @on/@correlate; split it")
                elif umark in upcasters:
                    problem(f"two upcasters for version {umark}; {attr_name} is the second")
                else:
                    upcasters[umark] = getattr(obj, attr_name)
                continue
            if not hmarks and cmark is None:
                continue
            marked = marked or bool(hmarks)
            starts = starts or any(m.start for m in hmarks)
            if raw is not fn:
                problem(f"{attr_name} must be a plain method, not a static or class method")
                continue
            if hmarks and cmark is not None:
                problem(f"{attr_name} is marked both @on and @correlate; split it in two")
                continue
            arity, varargs = _positional_arity(fn)
            bound = getattr(obj, attr_name)
            if cmark is not None:
                if arity != 2 and not (varargs and arity <= 2):
                    problem(
                        f"correlate function {attr_name} must take (self, event), {_takes(arity)}"
                    )
                    continue
                if not cmark.types:
                    if default_correlate is not None:
                        problem(f"two bare @correlate functions; {attr_name} is the second")
                    default_correlate = bound
                if cmark.reply:
                    bound = ReplyCorrelate(bound, frozenset((name, *aliases)))
                for t in cmark.types:
                    if t in correlates:
                        problem(f"two correlate functions for {t.__qualname__}")
                    correlates[t] = bound
                    if cmark.reply:
                        replies.add(t)
                continue
            if arity != 3 and not (varargs and arity <= 3):
                problem(f"handler {attr_name} must take (self, state, event), {_takes(arity)}")
                continue
            for mark in hmarks:
                if mark.start and mark.internal:
                    problem(f"handler {attr_name} cannot be both start=True and internal=True")
                if mark.late and (mark.start or mark.internal):
                    problem(
                        f"handler {attr_name} cannot be late=True and "
                        f"{'start' if mark.start else 'internal'}=True: a late handler takes "
                        "events for instances that have completed"
                    )
                    continue
                table = late_handlers if mark.late else handlers
                for t in mark.types:
                    if t in table:
                        problem(
                            f"two {'late=True ' if mark.late else ''}handlers for "
                            f"{t.__qualname__}: {table[t].method} and {attr_name}; one type "
                            "has one handler per saga (and one late=True handler besides)"
                        )
                        continue
                    if issubclass(t, CommandFailed) and mark.start:
                        problem(f"handler {attr_name}: CommandFailed cannot start an instance")
                    if issubclass(t, CommandFailed) and mark.late:
                        problem(
                            f"handler {attr_name}: CommandFailed cannot be late=True; a "
                            "command of a late handler that fails for good is a dead letter"
                        )
                        continue
                    table[t] = HandlerSpec(
                        saga=name,
                        method=attr_name,
                        types=mark.types,
                        start=mark.start,
                        internal=mark.internal,
                        is_async=inspect.iscoroutinefunction(fn),
                        fn=bound,
                        retry=mark.retry,
                        late=mark.late,
                    )

        if not marked:
            problem(f"{cls.__qualname__} has no @on handlers")
        elif not starts:
            problem("no handler has start=True, so no instance could ever be created")
        spec = SagaSpec(
            name=name,
            obj=obj,
            state_type=state,
            handlers=handlers,
            correlates=correlates,
            default_correlate=default_correlate,
            version=version,
            upcasters=upcasters,
            aliases=aliases,
            late_handlers=late_handlers,
            tombstone_retention=float(retention),
            reuse_keys=reuse_keys,
            replies=bool(replies),
        )
        for msg in check_chain(f"saga {name!r}", version, upcasters):
            problems.append(RegistrationError(msg, saga=name))
        for t, h in [*handlers.items(), *late_handlers.items()]:
            if h.internal or issubclass(t, CommandFailed):
                continue
            correlate = spec.correlate_for(t)
            if correlate is None:
                problem(
                    f"handled event type {t.__qualname__} ({h.method}) has no correlate "
                    "function: add a bare @correlate, list the type in @correlate(...), "
                    "or mark the handler internal=True if it only gets to_self schedules"
                )
            elif h.start and isinstance(correlate, ReplyCorrelate):
                problem(
                    f"handler {h.method} is start=True, but {t.__qualname__} is correlated "
                    "as a reply (reply=True): a reply answers a command of an instance "
                    "that exists already; start it with an event that carries its key"
                )
        if late_handlers and not retention:
            methods = ", ".join(sorted({h.method for h in late_handlers.values()}))
            problem(
                f"late=True handlers ({methods}) need the final state that tombstones "
                "keep, but tombstone_retention is 0"
            )
        problems.extend(self._check_state(name, state))

        if problems:
            if len(problems) == 1:
                raise problems[0]
            raise RegistrationErrors(f"saga {name!r} has {len(problems)} problems", problems)

        try:
            for t in [*handlers, *late_handlers]:
                if not issubclass(t, CommandFailed):
                    self._serializer.register_handled(t)
        except SerializationError as exc:
            raise RegistrationError(f"saga {name!r}: {exc}", saga=name) from exc
        self._serializer.allow(
            {
                c.__module__.split(".")[0]
                for c in (cls, state, *handlers, *late_handlers)
                if c.__module__ != "builtins"
            }
        )
        self._sagas[name] = spec
        for alias in aliases:
            self._aliases[alias] = name
        self._routes.clear()
        return obj

    def _check_state(self, name: str, state: object) -> list[RegistrationError]:
        if not isinstance(state, type):
            return [
                RegistrationError(f"saga {name!r}: state must be a class, got {state!r}", saga=name)
            ]
        try:
            default = state()
        except Exception as exc:  # noqa: BLE001 - any failure means "not default-constructible"
            return [
                RegistrationError(
                    f"saga {name!r}: state class {state.__qualname__} cannot be created "
                    f"without arguments ({type(exc).__name__}: {exc}); give every field "
                    "a default",
                    saga=name,
                )
            ]
        conv = self._serializer.converter
        try:
            back: object = conv.loads(conv.dumps(default), state)
        except Exception as exc:  # noqa: BLE001 - any failure means "does not round-trip"
            return [
                RegistrationError(
                    f"saga {name!r}: state class {state.__qualname__} does not round-trip "
                    f"through sagaflow's cattrs converter ({type(exc).__name__}: {exc}); "
                    "use attrs or dataclass fields of JSON-friendly types",
                    saga=name,
                )
            ]
        if back != default:
            return [
                RegistrationError(
                    f"saga {name!r}: state class {state.__qualname__} does not round-trip: "
                    f"{default!r} came back as {back!r}; make it an attrs or dataclass "
                    "class with comparable fields",
                    saga=name,
                )
            ]
        return []

    @overload
    def message(
        self,
        cls: C,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        aliases: Iterable[str] = (),
        upcasters: Mapping[int, Upcaster] | None = None,
    ) -> C: ...
    @overload
    def message(
        self,
        cls: None = None,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        aliases: Iterable[str] = (),
        upcasters: Mapping[int, Upcaster] | None = None,
    ) -> Callable[[C], C]: ...
    def message(
        self,
        cls: Any = None,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        aliases: Iterable[str] = (),
        upcasters: Mapping[int, Upcaster] | None = None,
    ) -> Any:
        """Put a message class on the type allow-list, optionally under a stable name.

        Usable as `registry.message(Cls)`, `registry.message(Cls, name="orders.v1.Cls")`
        or as a class decorator (`@registry.message(name=...)`). Needed for classes that
        are not found by package prefix, such as classes defined inside functions, to
        keep stored rows readable across a rename or a move to another module
        (`aliases=` lists the names it was stored under before), and to change a stored
        message's shape (`version=` with `upcasters=`).

        Args:
            cls: The message class (events, commands, scheduled messages).
            name: The stable name rows are written under; by default the module and
                qualified name.
            version: The current version of its stored JSON; rows written at an older
                version are upcast when read, and the row records the version.
            aliases: Older stored names that still resolve to this class.
            upcasters: `{n: fn}`: `fn` turns the JSON object of version n into version
                n + 1; one for every n below `version`.

        Raises:
            RegistrationError: A name is taken by another class, or the version and
                upcasters do not fit (a gap in the chain).
        """

        def decorate(c: type) -> type:
            try:
                self._serializer.register(
                    c, name, version=version, aliases=aliases, upcasters=upcasters
                )
            except SerializationError as exc:
                raise RegistrationError(str(exc)) from exc
            return c

        return decorate if cls is None else decorate(cls)

    def routes(self, event_type: type) -> tuple[Target, ...]:
        """The sagas, handlers and correlate functions a published `event_type` goes to."""
        try:
            return self._routes[event_type]
        except KeyError:
            pass
        found = []
        if issubclass(event_type, CommandFailed):
            # The runtime routes CommandFailed to the instance that sent the command.
            self._routes[event_type] = ()
            return ()
        for spec in self._sagas.values():
            # A type only a late=True handler takes is routed too: the batch decides.
            handler = spec.handler_for(event_type) or spec.late_handler_for(event_type)
            if handler is not None and not handler.internal:
                correlate = spec.correlate_for(event_type)
                assert correlate is not None  # checked at registration
                found.append((spec, handler, correlate))
        routes = tuple(found)
        self._routes[event_type] = routes
        return routes

    def tombstone_policies(self) -> dict[str, TombstonePolicy]:
        """What each saga's finished instances leave behind, by saga name."""
        return {name: spec.tombstone_policy for name, spec in self._sagas.items()}

    def get(self, name: str) -> SagaSpec:
        """The saga registered under `name`.

        Raises:
            LookupError: No saga has that name.
        """
        try:
            return self._sagas[name]
        except KeyError:
            raise LookupError(
                f"no saga named {name!r} is registered (known: {sorted(self._sagas)})"
            ) from None
