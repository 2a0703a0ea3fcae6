"""Errors raised by sagaflow.

Every error derives from `SagaflowError`; concrete errors also inherit the nearest builtin
so that existing `except` clauses keep working:

```
SagaflowError
├── RegistrationError (TypeError)          a saga, handler or type is declared wrongly
├── RegistrationErrors (ExceptionGroup)    several registration problems at once
├── ActionError (TypeError)                a handler returned something that is not an action
├── MessageError (TypeError)               publish or run was given something that is not a message
├── DispatchError                          a dispatcher returned False (a failed attempt)
│   └── DispatcherError (TypeError)        the dispatcher is not an async callable
├── SerializationError (ValueError)        a value cannot be encoded or decoded
│   ├── UnknownTypeError (LookupError)     a stored type name is not on the allow-list
│   └── DecodeError                        a stored payload no longer fits its class
├── ConflictError                          a commit lost an optimistic-concurrency race
├── StoreError (RuntimeError)              a store cannot be opened or used
│   ├── SchemaVersionError                 the store was written by an unknown schema
│   └── UnstorableError (ValueError)       one event's effects cannot be stored (poison)
├── DeadLetterError (LookupError)          no dead letter or instance with that id
└── RuntimeClosedError (RuntimeError)      the runtime is not running
```
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ActionError",
    "ConflictError",
    "DeadLetterError",
    "DecodeError",
    "DispatchError",
    "DispatcherError",
    "MessageError",
    "RegistrationError",
    "RegistrationErrors",
    "RuntimeClosedError",
    "SagaflowError",
    "SchemaVersionError",
    "SerializationError",
    "StoreError",
    "UnknownTypeError",
    "UnstorableError",
]


class SagaflowError(Exception):
    """Base class of every error sagaflow raises."""


class RegistrationError(SagaflowError, TypeError):
    """A saga, handler, correlate function or message type is declared wrongly.

    Attributes:
        saga: The saga's name, or `None` when the problem is not tied to one saga.
    """

    def __init__(self, message: str, *, saga: str | None = None) -> None:
        super().__init__(message)
        self.saga = saga


class RegistrationErrors(SagaflowError, ExceptionGroup[RegistrationError]):
    """Several registration problems found at once; each is a `RegistrationError`."""

    def __new__(cls, message: str, exceptions: Sequence[RegistrationError]) -> RegistrationErrors:
        return super().__new__(cls, message, exceptions)

    def derive(  # type: ignore[override]
        self, excs: Sequence[RegistrationError]
    ) -> RegistrationErrors:
        return RegistrationErrors(self.message, excs)


class ActionError(SagaflowError, TypeError):
    """A handler returned a value that is not an action, or an action it may not return.

    Attributes:
        saga: The saga's name.
        key: The instance key.
    """

    def __init__(self, message: str, *, saga: str, key: str) -> None:
        super().__init__(message)
        self.saga = saga
        self.key = key


class MessageError(SagaflowError, TypeError):
    """`publish` or `run` was given something that is not a message.

    A message is an instance of an attrs class or a dataclass (or of a class registered
    with `registry.message`); a string, a dict of its fields or the class itself is not.

    Attributes:
        value: What was given.
    """

    def __init__(self, message: str, *, value: object) -> None:
        super().__init__(message)
        self.value = value


class DispatchError(SagaflowError):
    """A dispatch failed without an exception of the dispatcher's own.

    The runtime records it as the error of that attempt (retried, then `CommandFailed`
    or a dead letter): the dispatcher returned `False`, or (as `DispatcherError`) its call
    gave something that cannot be awaited.
    """


class DispatcherError(DispatchError, TypeError):
    """The dispatcher is not an async callable.

    Raised by `Runtime(...)` for a plain `def` function or an object with a plain
    `def __call__`, and used as the error of an attempt whose call returned something
    that cannot be awaited.
    """


class SerializationError(SagaflowError, ValueError):
    """A value cannot be encoded to, or decoded from, its stored JSON form."""


class UnknownTypeError(SerializationError, LookupError):
    """A type name is not on the allow-list, so it is not resolved.

    Attributes:
        type_name: The stored or computed type name.
    """

    def __init__(self, message: str, *, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


class DecodeError(SerializationError):
    """A stored payload does not fit its class any more.

    Attributes:
        type_name: The stable name of the class.
        field: The dotted path of the first field that failed, if known.
        saga: The saga whose row it is, if known.
        key: The instance key, if known.
        version: The version the row was written at.
    """

    def __init__(
        self,
        message: str,
        *,
        type_name: str,
        field: str | None = None,
        saga: str | None = None,
        key: str | None = None,
        version: int = 1,
    ) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.field = field
        self.saga = saga
        self.key = key
        self.version = version


class ConflictError(SagaflowError):
    """A commit lost an optimistic-concurrency race; nothing of it was applied.

    Attributes:
        instances: The `(saga, key)` pairs whose version had moved on.
    """

    def __init__(self, instances: Sequence[tuple[str, str]]) -> None:
        shown = ", ".join(f"{s!r}/{k!r}" for s, k in instances[:5])
        super().__init__(
            f"commit lost a concurrency race on {len(instances)} instance(s) ({shown}); "
            "reload and handle the events again"
        )
        self.instances = tuple(instances)


class StoreError(SagaflowError, RuntimeError):
    """A store cannot be opened or used."""


class SchemaVersionError(StoreError):
    """The store's schema was written by a newer or unknown version of sagaflow.

    Attributes:
        found: The schema version found in the store.
        supported: The newest schema version this sagaflow knows.
    """

    def __init__(self, message: str, *, found: int, supported: int) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class UnstorableError(StoreError, ValueError):
    """The store refused what one event produced (a poison event); the rest of its batch
    was committed, and the event was kept as a dead letter when the store could take it.

    Attributes:
        saga: The saga's name.
        key: The instance key.
        type_name: The event's type (the class name, if it has no stored name).
        dead_lettered: Whether the event was kept as a dead letter.
    """

    def __init__(
        self, message: str, *, saga: str, key: str, type_name: str, dead_lettered: bool
    ) -> None:
        super().__init__(message)
        self.saga = saga
        self.key = key
        self.type_name = type_name
        self.dead_lettered = dead_lettered


class DeadLetterError(SagaflowError, LookupError):
    """No dead letter or instance matches what an operator asked for."""


class RuntimeClosedError(SagaflowError, RuntimeError):
    """The runtime is not running: use it inside `async with Runtime(...)`."""
