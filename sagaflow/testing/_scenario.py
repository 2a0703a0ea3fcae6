"""`Scenario`: given/when/then for a saga, on the real runtime with a virtual clock."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar, overload

import anyio
import attrs
from anyio.abc import TaskGroup, TaskStatus

from .. import CommandFailed, Hooks, Registry, RetryPolicy, Runtime, Unmatched
from .._clock import VirtualClock
from .._outbox import error_text
from .._registry import SagaSpec
from ..exceptions import RuntimeClosedError
from ..stores import Changes, DeadLetter, MemoryStore, ScheduleRecord
from ._checks import Checks, Scheduled, View
from ._recorder import Match, Recorder
from ._time import advance, settle, to_seconds

__all__ = ["Scenario"]

S = TypeVar("S")


@attrs.define(eq=False)
class _ObservedStore(MemoryStore):
    """A `MemoryStore` that reports every successful commit."""

    _on_commit: Callable[[Changes], None] = attrs.field(alias="on_commit", kw_only=True)

    async def commit(self, changes: Changes) -> None:
        """Commit, then report the changes."""
        await super().commit(changes)
        self._on_commit(changes)


class _Watch(Hooks):
    """What a scenario learns from the runtime's hooks during a step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget what the last step showed."""
        self.matched_none: list[Unmatched] = []
        self.dead_letters: list[DeadLetter] = []
        # The last exception of a handler per instance, dropped when it is retried:
        # what is left failed for good.
        self.failures: dict[tuple[str, str], tuple[object, Exception]] = {}

    def handling(
        self,
        saga: str,
        key: str,
        event: object,
        instance_id: str,
        *,
        trace: Mapping[str, str] | None = None,
    ) -> _Catch:
        return _Catch(self, (saga, key), event)

    def handler_retry(self, saga: str, key: str, event: object, attempt: int, error: str) -> None:
        self.failures.pop((saga, key), None)

    def dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters.append(letter)

    def unmatched(self, unmatched: Unmatched) -> None:
        self.matched_none.append(unmatched)


@attrs.define(eq=False)
class _Catch:
    """Notes the exception of a handler call and lets it go on to the runtime."""

    watch: _Watch
    ref: tuple[str, str]
    event: object

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception):
            self.watch.failures[self.ref] = (self.event, exc)


def _select(target: object, state: type | None, saga: str | None) -> tuple[Registry, SagaSpec]:
    if isinstance(target, Registry):
        if state is not None:
            raise TypeError(
                "Scenario(registry, state=...): the registry knows each saga's state "
                "already; pass saga='Name' to pick the saga"
            )
        names = sorted(target.sagas)
        if saga is None:
            if len(names) != 1:
                raise ValueError(
                    f"the registry has {len(names)} sagas ({', '.join(names)}); pass "
                    "saga='Name' to pick the one the scenario checks"
                )
            saga = names[0]
        return target, target.get(saga)
    shown = target.__qualname__ if isinstance(target, type) else type(target).__qualname__
    if state is None:
        raise TypeError(
            f"Scenario({shown}) needs the saga's state class: Scenario({shown}, "
            "state=...), or a registry it is registered in: Scenario(registry, saga=...)"
        )
    obj = target
    if isinstance(target, type):
        try:
            obj = target()
        except TypeError as exc:
            raise TypeError(
                f"saga class {shown} cannot be created without arguments ({exc}); "
                f"pass an instance instead: Scenario({shown}(...), state=...)"
            ) from exc
    registry = Registry()
    registry.register(obj, state=state, name=saga)
    return registry, registry.get(saga or type(obj).__name__)


class Scenario(Checks[S]):
    """Given/when/then for one saga, on the real runtime, a memory store and a virtual clock.

    Events go through the runtime's own routing, correlation, start rules and action
    semantics; commands go to a recording dispatcher; time moves only when told to.
    After each step the outcome is there to read as plain values (`sent`, `state`,
    `scheduled`, ...) or to check with `expect_*` methods, whose failure messages show
    expected and actual side by side.

    ```python
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.given(OrderPlaced("o-1", 120))
        await scenario.when(PaymentCaptured("o-1"))
        assert scenario.sent == [ShipOrder("o-1")]
    ```

    Args:
        target: A saga class (created with no arguments), a saga object, or a
            `Registry` the saga is registered in.
        state: The saga's state class; required for a class or object, not allowed
            with a registry.
        saga: The saga's name: which saga of the registry to check (needed if it has
            several; all of them run), or the name to register a class or object under.
        retry: The runtime's retry policy. The default, `RetryPolicy(max_attempts=1)`,
            gives up at once: a failing command makes `CommandFailed` right away, and a
            failing handler is not tried again.
        messages: More message classes to put on the type allow-list, such as commands
            defined inside a test function.
        raise_errors: A handler that fails for good makes the step raise an
            `AssertionError` (from the handler's exception). With `False`, the event is
            dead-lettered as in production and shows in `dead_letters`.
    """

    @overload
    def __init__(
        self: Scenario[S],
        target: object,
        /,
        *,
        state: type[S],
        saga: str | None = None,
        retry: RetryPolicy | None = None,
        messages: Iterable[type] = (),
        raise_errors: bool = True,
    ) -> None: ...
    @overload
    def __init__(
        self: Scenario[Any],
        target: Registry,
        /,
        *,
        saga: str | None = None,
        retry: RetryPolicy | None = None,
        messages: Iterable[type] = (),
        raise_errors: bool = True,
    ) -> None: ...
    def __init__(
        self,
        target: object,
        /,
        *,
        state: type[S] | None = None,
        saga: str | None = None,
        retry: RetryPolicy | None = None,
        messages: Iterable[type] = (),
        raise_errors: bool = True,
    ) -> None:
        self._registry, self._spec = _select(target, state, saga)
        for cls in messages:
            self._registry.message(cls)
        self._retry = retry or RetryPolicy(max_attempts=1)
        self._raise_errors = raise_errors
        self._clock = VirtualClock()
        self._start = self._clock.now()
        self._recorder = Recorder()
        self._runtime: Runtime | None = None
        self._store: _ObservedStore | None = None
        self._watch = _Watch()
        self._ids = itertools.count(1)
        self._ended: set[tuple[str, str]] = set()
        self._key: str | None = None
        self._calls_mark = 0
        self._current: View[S] = View(saga=self._spec.name)
        self._used = False
        self._tg: TaskGroup | None = None
        self._publish_errors: list[Exception] = []

    def __repr__(self) -> str:
        return f"<Scenario {self._current.where()}>"

    def _view(self) -> View[S]:
        return self._current

    @property
    def clock(self) -> VirtualClock:
        """The virtual clock the runtime runs on."""
        return self._clock

    @property
    def runtime(self) -> Runtime:
        """The runtime under the scenario (for `statistics()`, its `store`, ...).

        Raises:
            RuntimeClosedError: The scenario is not running.
        """
        if self._runtime is None:
            raise RuntimeClosedError(
                "the scenario is not running; use it as `async with Scenario(...) as scenario:`"
            )
        return self._runtime

    async def __aenter__(self) -> Self:
        if self._used:
            raise RuntimeError("a Scenario runs once; create a new one")
        self._used = True
        self._store = _ObservedStore(on_commit=self._observe)
        runtime = Runtime(
            self._registry,
            store=self._store,
            dispatch=self._recorder,
            retry=self._retry,
            clock=self._clock,
            shards=1,  # one shard and one dispatcher: a deterministic order
            dispatch_concurrency=1,
            # No operator changes the store behind a scenario's back, and a periodic
            # sweep would make advance() stop every few virtual seconds.
            sweep_interval=math.inf,
            hooks=self._watch,
        )
        await runtime.__aenter__()
        tg = anyio.create_task_group()
        try:
            await tg.__aenter__()
        except BaseException as exc:
            await runtime.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._runtime, self._tg = runtime, tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runtime, tg = self.runtime, self._tg
        assert tg is not None
        self._runtime = self._tg = None
        try:
            # Publishes still waiting for a handler retry would wait for ever: the
            # virtual clock does not move any more. The body's exception is not passed
            # in, so that it comes out of the scenario as it is, not in a group.
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        finally:
            await runtime.__aexit__(exc_type, exc, tb)

    def fail(
        self, match: Match, *, error: Exception | None = None, times: int | None = None
    ) -> None:
        """Make the dispatch of matching commands fail, so the saga gets `CommandFailed`.

        Args:
            match: A command class, or a predicate called with each command.
            error: The exception the dispatcher raises; by default a `RuntimeError`.
                `CommandFailed.error` reads `"ExceptionType: message"`.
            times: How many calls fail (then matching commands go through); `None`
                fails every call. With more than one attempt in `retry`, a command
                that fails fewer times than that succeeds on a retry.
        """
        self._recorder.fail(match, error=error, times=times)

    def command_id(self, match: Match) -> str:
        """The id of the last command the scenario dispatched that `match` matches, in
        any step (those of `given` included): build a reply to it with this id.

        ```python
        await scenario.given(OrderPlaced("o-1", 120))
        await scenario.when(ChargeResult(scenario.command_id(ChargeCard), "ch-1"))
        ```

        Args:
            match: A command class, or a predicate called with each command.

        Raises:
            AssertionError: No dispatched command matches.
        """
        __tracebackhide__ = True
        try:
            return self._recorder.command_id(match)
        except LookupError as exc:
            self._fail(str(exc))

    async def given(self, *events: object) -> None:
        """Deliver events that happened before the test, one after another.

        Their commands are dispatched, but the step results (`sent`, ...) are cleared
        afterwards: only the `when` or `advance` that follows is checked.

        Raises:
            AssertionError: An event matched no instance (for example a non-start event
                for a key with no instance), or a handler failed.
        """
        __tracebackhide__ = True
        step = f"given({', '.join(map(repr, events))})"
        self._begin()
        for event in events:
            await self._publish(event, None)
            await settle(self.runtime)
        await self._end(step)
        if self._current.unmatched:
            u = self._current.unmatched[0]
            where = "saga" if u.saga is None else f"instance of saga {u.saga!r} key {u.key!r}"
            self._fail(f"the given event {u.event!r} matched no {where}: {u.reason}")
        self._current = attrs.evolve(self._current, dispatched=(), unmatched=())

    async def when(self, event: object, *, id: str | None = None) -> None:
        """Publish an event and wait until it and everything it caused now is handled.

        Args:
            event: The event.
            id: Its dedup id, to test redelivery; by default each call gets a new one.

        Raises:
            AssertionError: A handler failed (see `raise_errors`).
        """
        __tracebackhide__ = True
        self._begin()
        await self._publish(event, id)
        await settle(self.runtime)
        await self._end(f"when({event!r})")

    async def advance(self, by: timedelta | float) -> None:
        """Move the virtual clock forward, firing what falls due in due order.

        The clock stops at every due time on the way (schedules, retries), so a timer
        that schedules another one within `by` fires too.

        Args:
            by: A `timedelta` or a number of seconds, not negative.

        Raises:
            AssertionError: A handler failed (see `raise_errors`).
            ValueError: `by` is negative.
        """
        __tracebackhide__ = True
        seconds = to_seconds(by)
        self._begin()
        await advance(self.runtime, self._clock, seconds)
        await self._end(f"advance({timedelta(seconds=seconds)})")

    # -- inside a step -------------------------------------------------------------

    def _begin(self) -> None:
        self.runtime  # noqa: B018 - raises if the scenario is not running
        self._calls_mark = len(self._recorder.calls)
        self._watch.reset()

    async def _publish(self, event: object, id: str | None) -> None:
        if isinstance(event, CommandFailed):
            raise TypeError(
                "CommandFailed is delivered by the runtime, not published: make the "
                "command fail with scenario.fail(CommandType) instead"
            )
        runtime = self.runtime
        event_id = id or f"sagaflow.testing.{next(self._ids)}"

        async def publish(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            try:
                await runtime.publish(event, id=event_id)
            except Exception as exc:  # noqa: BLE001 - raised by the step instead
                self._publish_errors.append(exc)

        # publish() returns once the event is committed, which a handler retry puts off
        # until a later virtual time: run it aside, so the step ends once all is quiet
        # now. It queues the event before it first waits, so drain() sees it.
        assert self._tg is not None
        await self._tg.start(publish)
        self._raise_publish_errors()
        for spec, _, correlate in self._registry.routes(type(event)):
            if spec is self._spec:
                key = correlate(event)
                if isinstance(key, str):
                    self._key = key

    def _raise_publish_errors(self) -> None:
        if self._publish_errors:
            errors, self._publish_errors = self._publish_errors, []
            raise errors[0]

    def _observe(self, changes: Changes) -> None:
        """Note which instances ended: deleted, or handled but neither written nor
        deleted (a new instance that completed with nothing to dispatch)."""
        written = {(w.record.saga, w.record.key) for w in changes.writes}
        self._ended.update((d.saga, d.key) for d in changes.deletes)
        self._ended.difference_update(written)
        self._ended.update((m.saga, m.key) for m in changes.marks if (m.saga, m.key) not in written)

    async def _end(self, step: str) -> None:
        __tracebackhide__ = True
        self._raise_publish_errors()
        self._current = await self._snapshot(step)
        if self._raise_errors:
            self._raise_handler_failures()

    def _raise_handler_failures(self) -> None:
        """Fail the step if a handler failed for good (raised, or returned what cannot
        be applied), with the handler's exception as the cause."""
        __tracebackhide__ = True
        watch = self._watch
        problems = []
        for (saga, key), (event, exc) in watch.failures.items():
            handler = self._registry.get(saga).handler_for(type(event))
            method = "?" if handler is None else handler.method
            problems.append(
                f"saga {saga!r} key {key!r}: handler {method} raised on {event!r}: "
                f"{error_text(exc)}"
            )
        problems += [
            f"saga {d.saga!r} key {d.key!r}: {d.type_name.rpartition('.')[2]} was "
            f"dead-lettered: {d.error}"
            for d in watch.dead_letters
            if d.kind == "event" and (d.saga, d.key) not in watch.failures
        ]
        if problems:
            lines = "\n".join(f"  {p}" for p in problems)
            cause = next((exc for _, exc in watch.failures.values()), None)
            raise AssertionError(
                f"{self._current.where()}: a handler failed for good:\n{lines}\n"
                "(pass raise_errors=False to Scenario to check scenario.dead_letters instead)"
            ) from cause

    async def _snapshot(self, step: str) -> View[S]:
        store = self.runtime.store
        spec = self._spec
        name = spec.name
        ser = self._registry.serializer
        records = {r.key: r for r in await store.list_instances(saga=name)}
        states: dict[str, S] = {key: spec.load_record(ser, r) for key, r in records.items()}
        schedules: dict[str, list[Scheduled]] = {}
        for s in await store.list_schedules(saga=name):
            schedules.setdefault(s.key, []).append(self._scheduled(s))
        return View(
            saga=name,
            key=self._key,
            step=step,
            elapsed=self._offset(self._clock.now()),
            dispatched=tuple(self._recorder.calls[self._calls_mark :]),
            unmatched=tuple(self._watch.matched_none),
            records=records,
            states=states,
            schedules={k: tuple(v) for k, v in schedules.items()},
            dead_letters=tuple(await store.list_dead_letters(saga=name)),
            ended=frozenset(k for s, k in self._ended if s == name),
        )

    def _offset(self, when: float) -> timedelta:
        # Rounded to microseconds, the resolution of timedelta, to drop float noise.
        return timedelta(seconds=round(when - self._start, 6))

    def _scheduled(self, s: ScheduleRecord) -> Scheduled:
        message = self._registry.serializer.decode(s.type_name, s.payload)
        name = None if s.name == s.id else s.name
        return Scheduled(name, self._offset(s.due), message, s.to_self)
