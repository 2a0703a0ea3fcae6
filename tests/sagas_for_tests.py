"""Messages, sagas and a harness shared by the core tests.

Everything here is defined at module level so that the serializer finds it by package
prefix (`sagas_for_tests`), as it would find a user's classes.

- Events: `Started` (starts an instance), `Touched` (handled by an async handler),
  `Finished`, `Ping` (only delivered by `to_self` schedules), and a small hierarchy under
  `OrderEvent` for routing by base class.
- Commands: `Cmd(key, label)`, so a whole dispatch log reads as a list of labels.
- `ScriptedSaga`: one saga whose handlers log the event into the state and return what a
  test's `script` returns, so each test states its saga's behaviour in a few lines.
- `Recorder`: a dispatcher that records every call and fails the labels it is told to.
- `running(...)`: a `Runtime` on a `MemoryStore` with a `VirtualClock`, inside a timeout.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs

from sagaflow import (
    CommandFailed,
    DispatchMeta,
    Registry,
    RetryPolicy,
    Runtime,
    Unmatched,
    correlate,
    on,
)
from sagaflow._clock import VirtualClock
from sagaflow.stores import InstanceRecord, MemoryStore

T0 = 1_700_000_000.0
"""The VirtualClock's start time."""

RETRY = RetryPolicy(max_attempts=3, initial_delay=1, jitter=False)
"""Three calls in all, 1 s then 2 s apart: easy to step through with a virtual clock."""

SAGA = "S"
"""The name `ScriptedSaga` is registered under by `scripted_registry`."""


# -- messages ----------------------------------------------------------------------


@attrs.frozen
class Started:
    key: str
    tag: str = ""


@attrs.frozen
class Touched:
    key: str
    tag: str = ""


@attrs.frozen
class Finished:
    key: str
    tag: str = ""


@attrs.frozen
class Ping:
    key: str
    tag: str = ""


@attrs.frozen
class Cmd:
    key: str
    label: str


@attrs.frozen
class OrderEvent:
    order_id: str


@attrs.frozen
class OrderPlaced(OrderEvent):
    pass


@attrs.frozen
class OrderPaid(OrderEvent):
    pass


@attrs.frozen
class OrderRefunded(OrderPaid):
    pass


@attrs.define
class Log:
    """The state of most test sagas: what the instance has seen, in order."""

    seen: list[str] = attrs.Factory(list)


def label(event: object) -> str:
    """How an event is written into a `Log`: `"Touched:1"`, `"CommandFailed:x:3"`."""
    if isinstance(event, CommandFailed):
        return f"CommandFailed:{event.command.label}:{event.attempts}"
    tag = getattr(event, "tag", "")
    return f"{type(event).__name__}:{tag}" if tag else type(event).__name__


Script = Callable[[Log, Any], Any]


def nothing(state: Log, event: Any) -> Any:
    return None


# -- sagas -------------------------------------------------------------------------


class ScriptedSaga:
    """Logs every event into its `Log` and returns what `script(state, event)` returns.

    `Touched` goes to an async handler, and `script` may return an awaitable for it
    (an `async def` script), so tests can block a handler on an `anyio.Event`.
    """

    def __init__(self, script: Script = nothing) -> None:
        self.script = script

    @correlate
    def key(self, event: Started | Touched | Finished) -> str | None:
        return None if event.key.startswith("skip") else event.key

    @on(Started, start=True)
    def started(self, state: Log, event: Started) -> Any:
        state.seen.append(label(event))
        return self.script(state, event)

    @on(Touched)
    async def touched(self, state: Log, event: Touched) -> Any:
        state.seen.append(label(event))
        result = self.script(state, event)
        if inspect.isawaitable(result):
            result = await result
        return result

    @on(Finished)
    def finished(self, state: Log, event: Finished) -> Any:
        state.seen.append(label(event))
        return self.script(state, event)

    @on(Ping, internal=True)
    def pinged(self, state: Log, event: Ping) -> Any:
        state.seen.append(label(event))
        return self.script(state, event)

    @on(CommandFailed)
    def failed(self, state: Log, event: CommandFailed[Cmd]) -> Any:
        state.seen.append(label(event))
        return self.script(state, event)


class NoFailureHandlerSaga:
    """Like `ScriptedSaga` without a `CommandFailed` handler."""

    def __init__(self, script: Script = nothing) -> None:
        self.script = script

    @correlate
    def key(self, event: Started | Touched) -> str:
        return event.key

    @on(Started, start=True)
    def started(self, state: Log, event: Started) -> Any:
        state.seen.append(label(event))
        return self.script(state, event)

    @on(Touched)
    def touched(self, state: Log, event: Touched) -> Any:
        state.seen.append(label(event))
        return self.script(state, event)


def scripted_registry(script: Script = nothing, *, name: str = SAGA, **options: Any) -> Registry:
    """A registry with one `ScriptedSaga` running `script`, registered as `name` (with
    more `Registry.register` options, such as `reuse_keys`)."""
    registry = Registry()
    registry.register(ScriptedSaga(script), state=Log, name=name, **options)
    return registry


# -- dispatching -------------------------------------------------------------------


@attrs.define
class Recorder:
    """A dispatcher that records every call, failed ones included.

    Args:
        failures: Label -> how many attempts of a command with that label fail (with
            `RuntimeError("boom <label>")`); use a large number for "always".
    """

    failures: dict[str, int] = attrs.Factory(dict)
    calls: list[tuple[Any, DispatchMeta]] = attrs.Factory(list)

    async def __call__(self, command: Any, meta: DispatchMeta) -> None:
        self.calls.append((command, meta))
        await anyio.lowlevel.checkpoint()
        if meta.attempt <= self.failures.get(command.label, 0):
            raise RuntimeError(f"boom {command.label}")

    def labels(self, key: str | None = None) -> list[str]:
        """The labels of the calls (of one key), in call order."""
        return [c.label for c, _ in self.calls if key is None or c.key == key]

    def aliased(self) -> list[tuple[Any, DispatchMeta]]:
        """The calls with command ids replaced by `c1`, `c2`, ... in order of first use.

        Ids are opaque, but their pattern is not: the same alias on a retry means the id
        is stable; a new alias means a new, distinct id.
        """
        aliases: dict[str, str] = {}
        out = []
        for command, meta in self.calls:
            alias = aliases.setdefault(meta.id, f"c{len(aliases) + 1}")
            out.append((command, attrs.evolve(meta, id=alias)))
        return out


def meta(alias: str, attempt: int = 1, *, key: str, kind: str = "send", saga: str = SAGA) -> Any:
    """A `DispatchMeta` with an aliased id, to compare with `Recorder.aliased()`."""
    return DispatchMeta(id=alias, saga=saga, key=key, attempt=attempt, kind=kind)


# -- the harness -------------------------------------------------------------------


@attrs.define
class Harness:
    """A running runtime with the parts a test looks at."""

    runtime: Runtime
    store: MemoryStore
    clock: VirtualClock
    dispatched: Recorder
    unmatched: list[Unmatched]

    async def advance(self, seconds: float) -> None:
        """Finish what is due now, move virtual time forward, finish what fell due."""
        await self.runtime.drain()
        self.clock.advance(seconds)
        await self.runtime.drain()

    async def summary(self) -> dict[str, tuple[str, list[str]]]:
        """Every stored instance of saga `S` as `key -> (status, state.seen)`."""
        return {
            r.key: (r.status, json.loads(r.state)["seen"])
            for r in await self.store.list_instances()
        }

    async def records(self) -> list[InstanceRecord]:
        return await self.store.list_instances()


@asynccontextmanager
async def running(
    registry: Registry,
    *,
    store: MemoryStore | None = None,
    clock: VirtualClock | None = None,
    recorder: Recorder | None = None,
    retry: RetryPolicy = RETRY,
    timeout: float = 60,
    **options: Any,
) -> AsyncIterator[Harness]:
    """Run `registry` on a `MemoryStore` and a `VirtualClock`; fail after `timeout` s."""
    store = MemoryStore() if store is None else store
    clock = VirtualClock(start=T0) if clock is None else clock
    recorder = Recorder() if recorder is None else recorder
    unmatched: list[Unmatched] = []
    with anyio.fail_after(timeout):
        async with Runtime(
            registry,
            store=store,
            dispatch=recorder,
            retry=retry,
            clock=clock,
            on_unmatched=unmatched.append,
            **options,
        ) as runtime:
            yield Harness(runtime, store, clock, recorder, unmatched)
