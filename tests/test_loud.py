"""No silent mistakes: every dead letter and every unrouted event is logged, counted and
told to the hooks; what is not a message is refused; a dispatcher returning `False`
failed; a plain `def` dispatcher is refused when the runtime is built.

Runtime tests run on the memory store and on SQLite (and on asyncio and trio); the
cluster tests at the end run where PostgreSQL is available.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _postgres_server import pg_schema, postgres_dsn  # noqa: F401
from sagas_for_tests import (
    SAGA,
    Cmd,
    Log,
    NoFailureHandlerSaga,
    Ping,
    Recorder,
    Started,
    Touched,
    label,
    running,
    scripted_registry,
)

from sagaflow import (
    CommandFailed,
    Compensate,
    Complete,
    DispatchMeta,
    Hooks,
    Registry,
    RetryPolicy,
    Runtime,
    Schedule,
    Send,
    Unmatched,
)
from sagaflow.exceptions import DispatcherError, MessageError, SagaflowError
from sagaflow.stores import DeadLetter, MemoryStore, PostgresStore, SQLiteStore, Store
from sagaflow.testing import SyncScenario

ALWAYS = 1_000
HINT = "`sagaflow dead-letters` lists it, `sagaflow retry` retries it"


@attrs.frozen
class Outsider:
    """A command class the registry's allow-list does not cover (module `test_loud`)."""

    key: str


@attrs.frozen
class Refunded:
    """An event no saga handles."""

    key: str


class Heard(Hooks):
    """The hooks' side of the story: dead letters and unmatched events, in order."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self.lost: list[Unmatched] = []

    def dead_letter(self, letter: DeadLetter) -> None:
        self.letters.append(letter)

    def unmatched(self, unmatched: Unmatched) -> None:
        self.lost.append(unmatched)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "loud.db")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="sagaflow"):
        yield caplog


def said(
    caplog: pytest.LogCaptureFixture, logger: str = "sagaflow.runtime"
) -> list[tuple[str, str]]:
    """`(level, message)` of the records of one logger, in order."""
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == logger]


def facts(record: logging.LogRecord, *names: str) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in names)


# -- dead letters ------------------------------------------------------------------------


def _bare_command(state: Log, event: Touched) -> Any:
    return Cmd(event.key, "bare")


def _text(state: Log, event: Touched) -> Any:
    return "done"


def _complete_class(state: Log, event: Touched) -> Any:
    return Complete


def _unserializable_state(state: Log, event: Touched) -> Any:
    state.seen.append(object())  # type: ignore[arg-type]
    return None


def _schedule_to_self_without_handler(state: Log, event: Touched) -> Any:
    return Schedule(Cmd(event.key, "x"), after=1, to_self=True)


def _command_outside_the_allow_list(state: Log, event: Touched) -> Any:
    return Send(Outsider(event.key))


MISTAKES = [
    pytest.param(_bare_command, "return Send(Cmd(...))", id="bare-command"),
    pytest.param(_text, "returned 'done', which is not an action", id="string"),
    pytest.param(_complete_class, "return Complete(...) instead", id="complete-class"),
    pytest.param(
        _unserializable_state,
        "cannot encode a 'Log' value as JSON: TypeError",
        id="unserializable-state",
    ),
    pytest.param(
        _schedule_to_self_without_handler,
        "Schedule(to_self=True) of Cmd, which this saga has no handler for",
        id="schedule-to-self-without-handler",
    ),
    pytest.param(
        _command_outside_the_allow_list,
        "is not on sagaflow's type allow-list",
        id="command-outside-the-allow-list",
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("mistake", "reason"), MISTAKES)
async def test_a_handler_mistake_is_a_dead_letter_logged_counted_and_hooked(
    mistake: Any, reason: str, store: Store, logs: pytest.LogCaptureFixture
) -> None:
    """Each of these used to dead-letter the event without a single log record."""

    def script(state: Log, event: Any) -> Any:
        return mistake(state, event) if isinstance(event, Touched) else None

    heard = Heard()
    async with running(scripted_registry(script), store=store, hooks=heard) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Touched("k", "bad"), id="e1")
        await h.runtime.drain()

        (letter,) = await store.list_dead_letters()
        stats = h.runtime.statistics()

    assert (letter.id, letter.kind, letter.type_name, letter.attempts) == (
        "S:k:e1",
        "event",
        "sagas_for_tests.Touched",
        1,
    )
    assert letter.error.startswith("ActionError: saga 'S' key 'k' handling Touched: ")
    assert reason in letter.error
    assert said(logs) == [
        (
            "WARNING",
            f"event sagas_for_tests.Touched of saga 'S' key 'k' is a dead letter after 1 "
            f"attempt(s): {letter.error} (id S:k:e1; {HINT})",
        )
    ]
    (record,) = [r for r in logs.records if r.name == "sagaflow.runtime"]
    assert facts(record, "saga", "key", "type_name", "dead_letter_id") == (
        SAGA,
        "k",
        "sagas_for_tests.Touched",
        "S:k:e1",
    )
    assert (stats.dead_letters, stats.events_dead_lettered) == (1, 1)
    assert heard.letters == [letter]


@pytest.mark.anyio
async def test_a_command_failing_for_good_without_a_handler_is_a_warning_dead_letter(
    store: Store, logs: pytest.LogCaptureFixture
) -> None:
    registry = Registry()
    registry.register(
        NoFailureHandlerSaga(lambda state, event: Send(Cmd(event.key, "x"))), state=Log, name=SAGA
    )
    heard = Heard()
    async with running(
        registry,
        store=store,  # type: ignore[arg-type]
        recorder=Recorder({"x": ALWAYS}),
        hooks=heard,
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.advance(1)
        await h.advance(2)

        (letter,) = await store.list_dead_letters()
        stats = h.runtime.statistics()

    assert (letter.kind, letter.type_name, letter.attempts, letter.error) == (
        "send",
        "sagas_for_tests.Cmd",
        3,
        "RuntimeError: boom x",
    )
    assert said(logs) == [
        (
            "WARNING",
            "command sagas_for_tests.Cmd of saga 'S' key 'k' is a dead letter after 3 "
            f"attempt(s): RuntimeError: boom x (id {letter.id}; {HINT})",
        )
    ]
    assert [level for level, _ in said(logs, "sagaflow.outbox")] == ["WARNING", "WARNING"]
    assert (stats.dead_letters, stats.events_dead_lettered, stats.commands_failed) == (1, 0, 1)
    assert heard.letters == [letter]


@pytest.mark.anyio
async def test_a_command_failure_its_handler_takes_is_logged_at_info_not_warning(
    store: Store, logs: pytest.LogCaptureFixture
) -> None:
    """An expected failure: the saga's CommandFailed handler deals with it."""

    def script(state: Log, event: Any) -> Any:
        return Send(Cmd(event.key, "x")) if isinstance(event, Started) else None

    async with running(
        scripted_registry(script),
        store=store,  # type: ignore[arg-type]
        recorder=Recorder({"x": ALWAYS}),
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.advance(1)
        await h.advance(2)

        assert await h.summary() == {"k": ("active", ["Started", "CommandFailed:x:3"])}
        assert await store.list_dead_letters() == []
        stats = h.runtime.statistics()

    (command_id,) = {m.id for _, m in h.dispatched.calls}
    assert said(logs) == [
        (
            "INFO",
            "command sagas_for_tests.Cmd of saga 'S' key 'k' failed for good after 3 "
            "attempt(s), and its CommandFailed handler took it: RuntimeError: boom x",
        )
    ]
    (record,) = [r for r in logs.records if r.name == "sagaflow.runtime"]
    assert facts(record, "saga", "key", "type_name", "command_id") == (
        SAGA,
        "k",
        "sagas_for_tests.Cmd",
        command_id,
    )
    assert (stats.dead_letters, stats.commands_failed) == (0, 1)


@pytest.mark.anyio
async def test_a_compensation_failing_for_good_is_a_warning_dead_letter_even_if_handled(
    store: Store, logs: pytest.LogCaptureFixture
) -> None:
    def script(state: Log, event: Any) -> Any:
        return Compensate([Cmd(event.key, "undo")]) if isinstance(event, Started) else None

    async with running(
        scripted_registry(script),
        store=store,  # type: ignore[arg-type]
        recorder=Recorder({"undo": ALWAYS}),
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.advance(1)
        await h.advance(2)

        (letter,) = await store.list_dead_letters()
        stats = h.runtime.statistics()

    assert said(logs) == [
        (
            "WARNING",
            "compensation sagas_for_tests.Cmd of saga 'S' key 'k' is a dead letter after 3 "
            f"attempt(s): RuntimeError: boom undo (id {letter.id}; {HINT})",
        )
    ]
    assert stats.dead_letters == 1


# -- unrouted and unmatched events ---------------------------------------------------------


@pytest.mark.anyio
async def test_an_event_no_saga_handles_is_reported_unmatched(
    store: Store, logs: pytest.LogCaptureFixture
) -> None:
    heard = Heard()
    async with running(scripted_registry(), store=store, hooks=heard) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Refunded("k"))
        await h.runtime.publish(Ping("k"))
        await h.runtime.publish(CommandFailed(Cmd("k", "x"), "RuntimeError: boom", 1))
        stats = h.runtime.statistics()
        assert await h.records() == []

    internal = "saga(s) 'S' take Ping only from their own to_self schedules (internal=True)"
    published = (
        "CommandFailed is delivered by the runtime to the instance whose command failed; "
        "it cannot be published"
    )
    expected = [
        Unmatched(Refunded("k"), None, None, "no saga handles this type"),
        Unmatched(Ping("k"), None, None, internal),
        Unmatched(CommandFailed(Cmd("k", "x"), "RuntimeError: boom", 1), None, None, published),
    ]
    assert h.unmatched == expected
    assert heard.lost == expected
    assert stats.events_unmatched == 3
    assert said(logs) == [
        ("WARNING", "Refunded matched no saga, it was not applied: no saga handles this type"),
        ("WARNING", f"Ping matched no saga, it was not applied: {internal}"),
        ("WARNING", f"CommandFailed matched no saga, it was not applied: {published}"),
    ]
    record = next(r for r in logs.records if r.name == "sagaflow.runtime")
    assert facts(record, "saga", "key", "event_type") == (None, None, "Refunded")


@pytest.mark.anyio
async def test_an_event_with_no_live_instance_is_reported_at_warning(
    store: Store, logs: pytest.LogCaptureFixture
) -> None:
    async with running(scripted_registry(), store=store) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Touched("k"))
        assert h.runtime.statistics().events_unmatched == 1

    reason = "no live instance and the handler is not start=True"
    assert h.unmatched == [Unmatched(Touched("k"), SAGA, "k", reason)]
    assert said(logs) == [
        (
            "WARNING",
            f"Touched for saga 'S' key 'k' matched no instance, it was not applied: {reason}",
        )
    ]
    (record,) = [r for r in logs.records if r.name == "sagaflow.runtime"]
    assert facts(record, "saga", "key", "event_type") == (SAGA, "k", "Touched")


@pytest.mark.anyio
async def test_an_event_every_correlate_function_declined_is_not_reported(
    store: Store, logs: pytest.LogCaptureFixture
) -> None:
    """Returning None from a correlate function is the saga saying "not mine"."""
    async with running(scripted_registry(), store=store) as h:  # type: ignore[arg-type]
        await h.runtime.publish(Started("skip-1"))
        assert h.runtime.statistics().events_unmatched == 0

    assert h.unmatched == []
    assert said(logs) == []


NOT_MESSAGES = [
    pytest.param(
        "text",
        "a str ('text'): build the event from its class instead of its text",
        id="str",
    ),
    pytest.param(
        {"key": "k"},
        "a dict ({'key': 'k'}): build the event from its class instead of a dict of its fields",
        id="dict",
    ),
    pytest.param(
        Started,
        "the class Started itself, not an instance of it: pass Started(...)",
        id="class",
    ),
    pytest.param(42, "a int (42)", id="int"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("value", "problem"), NOT_MESSAGES)
async def test_publishing_what_is_not_a_message_raises_naming_it(
    value: object, problem: str, store: Store
) -> None:
    async with running(scripted_registry(), store=store) as h:  # type: ignore[arg-type]
        with pytest.raises(MessageError) as caught:
            await h.runtime.publish(value)
        assert await h.records() == []

    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, SagaflowError)
    assert caught.value.value is value
    assert str(caught.value) == (
        "publish() takes a message, an instance of an attrs class or dataclass that a saga "
        f"handles, but was given {problem}"
    )
    assert h.unmatched == []


@pytest.mark.anyio
async def test_run_stops_at_an_item_that_is_not_a_message_after_committing_the_rest(
    store: Store,
) -> None:
    async def source() -> AsyncIterator[object]:
        yield Started("a")
        yield Refunded("a")  # reported, and the run goes on
        yield Touched("a", "1")
        yield {"key": "a"}
        yield Started("never")

    async with running(scripted_registry(), store=store) as h:  # type: ignore[arg-type]
        with pytest.raises(MessageError, match=r"^run\(\) takes a message, .* a dict"):
            async with aclosing(source()) as events:
                await h.runtime.run(events)
        assert await h.summary() == {"a": ("active", ["Started", "Touched:1"])}
        assert h.runtime.statistics().events_unmatched == 1

    assert h.unmatched == [Unmatched(Refunded("a"), None, None, "no saga handles this type")]


# -- what a dispatcher returns ---------------------------------------------------------------


@attrs.define
class Answering:
    """A dispatcher that returns, per label, what it is told (else None)."""

    answers: dict[str, object]
    calls: list[tuple[str, int]] = attrs.Factory(list)

    async def __call__(self, command: Cmd, meta: DispatchMeta) -> object:
        self.calls.append((command.label, meta.attempt))
        await anyio.lowlevel.checkpoint()
        return self.answers.get(command.label)


def _send_labels(*labels: str) -> Any:
    errors: list[str] = []

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, CommandFailed):
            errors.append(event.error)
            return None
        return [Send(Cmd(event.key, x)) for x in labels] if isinstance(event, Started) else None

    script.errors = errors  # type: ignore[attr-defined]
    return script


@pytest.mark.anyio
async def test_a_dispatcher_returning_false_failed_that_attempt(store: Store) -> None:
    script = _send_labels("no")
    dispatcher = Answering({"no": False})
    async with running(
        scripted_registry(script),
        store=store,  # type: ignore[arg-type]
        recorder=dispatcher,  # type: ignore[arg-type]
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.advance(1)
        await h.advance(2)

        assert await h.summary() == {"k": ("active", ["Started", "CommandFailed:no:3"])}
        stats = h.runtime.statistics()

    assert dispatcher.calls == [("no", 1), ("no", 2), ("no", 3)]
    assert script.errors == [
        "DispatchError: the dispatcher returned False, which reports a failed dispatch "
        "(return None or True for success, or raise to say why it failed)"
    ]
    assert (stats.command_retries, stats.commands_failed, stats.commands_dispatched) == (2, 1, 0)


@pytest.mark.anyio
async def test_any_other_result_of_a_dispatcher_is_a_success(store: Store) -> None:
    script = _send_labels("none", "true", "zero", "empty", "text")
    answers: dict[str, object] = {"true": True, "zero": 0, "empty": [], "text": "sent"}
    dispatcher = Answering(answers)
    async with running(
        scripted_registry(script),
        store=store,  # type: ignore[arg-type]
        recorder=dispatcher,  # type: ignore[arg-type]
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()
        stats = h.runtime.statistics()

    assert dispatcher.calls == [("none", 1), ("true", 1), ("zero", 1), ("empty", 1), ("text", 1)]
    assert script.errors == []
    assert (stats.commands_dispatched, stats.command_retries) == (5, 0)


@pytest.mark.anyio
async def test_a_dispatcher_returning_false_is_seen_by_the_dispatching_span(
    store: Store,
) -> None:
    """The span around the call sees the failure, like an exception the dispatcher raised."""
    seen: list[BaseException | None] = []

    class Span:
        def __enter__(self) -> None:
            return None

        def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
            seen.append(exc)

    class Spans(Hooks):
        def dispatching(self, command: object, meta: DispatchMeta) -> Any:
            return Span()

    async with running(
        scripted_registry(_send_labels("no")),
        store=store,  # type: ignore[arg-type]
        recorder=Answering({"no": False}),  # type: ignore[arg-type]
        hooks=Spans(),
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

    assert [str(exc) for exc in seen] == [
        "the dispatcher returned False, which reports a failed dispatch "
        "(return None or True for success, or raise to say why it failed)"
    ]


# -- what a dispatcher is ------------------------------------------------------------------


def plain(command: Any, meta: DispatchMeta) -> None:
    pass


async def coroutine_function(command: Any, meta: DispatchMeta, sink: list[str]) -> None:
    sink.append(command.label)


class PlainCall:
    def __call__(self, command: Any, meta: DispatchMeta) -> None:
        pass


class AsyncCall:
    def __init__(self, sink: list[str]) -> None:
        self.sink = sink

    async def __call__(self, command: Any, meta: DispatchMeta, *, suffix: str = "") -> None:
        self.sink.append(command.label + suffix)


def _build(dispatch: Any) -> Runtime:
    return Runtime(scripted_registry(), store=MemoryStore(), dispatch=dispatch)


REFUSED = [
    pytest.param(
        plain,
        "the dispatcher 'plain' is a plain `def` function, but the runtime awaits what the "
        "dispatcher returns: define it with `async def plain(command, meta)` function, or an "
        "object with an `async def __call__`",
        id="plain-def",
    ),
    pytest.param(
        functools.partial(plain),
        "the dispatcher 'plain' is a plain `def` function",
        id="partial-of-plain-def",
    ),
    pytest.param(
        lambda command, meta: None,
        "the dispatcher '<lambda>' is a plain `def` function",
        id="lambda",
    ),
    pytest.param(
        PlainCall(),
        "the dispatcher (a PlainCall object) has a plain `def __call__`, but the runtime "
        "awaits what the dispatcher returns: define it as `async def __call__(self, command, "
        "meta)`",
        id="plain-call",
    ),
    pytest.param(
        AsyncCall,
        "the dispatcher AsyncCall is a class, not an instance of it: pass dispatch=AsyncCall(...)",
        id="class",
    ),
    pytest.param(
        "dispatch",
        "the dispatcher 'dispatch' is not callable: pass an `async def (command, meta)` "
        "function, or an object with an `async def __call__`",
        id="not-callable",
    ),
]


@pytest.mark.parametrize(("dispatch", "complaint"), REFUSED)
def test_a_dispatcher_that_is_not_async_is_refused_when_the_runtime_is_built(
    dispatch: Any, complaint: str
) -> None:
    with pytest.raises(DispatcherError) as caught:
        _build(dispatch)
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, SagaflowError)
    assert str(caught.value).startswith(complaint)


@pytest.mark.anyio
async def test_async_dispatchers_of_every_accepted_shape_dispatch(store: Store) -> None:
    sink: list[str] = []
    shapes = {
        "function": functools.partial(coroutine_function, sink=sink),
        "call": AsyncCall(sink),
        "partial-call": functools.partial(AsyncCall(sink), suffix="!"),
    }
    for name, dispatch in shapes.items():
        registry = scripted_registry(lambda state, event, name=name: Send(Cmd(event.key, name)))
        async with Runtime(registry, store=store, dispatch=dispatch) as runtime:
            await runtime.publish(Started(name))

    assert sink == ["function", "call", "partial-call!"]


@pytest.mark.anyio
async def test_a_sync_wrapper_returning_no_awaitable_fails_that_attempt_clearly(
    store: Store,
) -> None:
    """A wrapper of a coroutine function may return an awaitable: it is checked per call."""

    async def dispatch(command: Any, meta: DispatchMeta) -> None:
        await anyio.lowlevel.checkpoint()

    @functools.wraps(dispatch)
    def wrapper(command: Any, meta: DispatchMeta) -> Any:
        return None if command.label == "broken" else dispatch(command, meta)

    script = _send_labels("fine", "broken")
    async with running(
        scripted_registry(script),
        store=store,  # type: ignore[arg-type]
        recorder=wrapper,  # type: ignore[arg-type]
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.advance(1)
        await h.advance(2)
        stats = h.runtime.statistics()

    name = dispatch.__qualname__
    assert script.errors == [
        f"DispatcherError: the dispatcher {name} returned None for a Cmd, which cannot be "
        "awaited: define it with `async def`"
    ]
    assert (stats.commands_dispatched, stats.commands_failed) == (1, 1)


# -- cluster mode ----------------------------------------------------------------------------


def _cluster_store(dsn: str, schema: str) -> PostgresStore:
    return PostgresStore(dsn, schema=schema, lease=1.0, poll_interval=0.1, max_size=4)


async def _until(predicate: Any) -> None:
    while not await predicate():
        await anyio.sleep(0.02)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_cluster_dead_letters_and_false_dispatches_are_loud(
    postgres_dsn: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    logs: pytest.LogCaptureFixture,
) -> None:
    """The same reporting in cluster mode: a handler mistake, a False dispatch, a failed
    compensation, and an inbox event that no saga can take."""
    from sagaflow.stores._claims import InboxRecord

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Touched):
            return Cmd(event.key, "bare")
        if isinstance(event, Started):
            return [Send(Cmd(event.key, "no")), Compensate([Cmd(event.key, "undo")])]
        state.seen.append(label(event))
        return None

    store = _cluster_store(postgres_dsn, pg_schema)
    await store.open()
    await store.put_inbox([InboxRecord(0, SAGA, "g", "e0", False, "gone.Type", "{}", time.time())])
    await store.close()

    heard = Heard()
    dispatcher = Answering({"no": False, "undo": False})
    async with Runtime(
        scripted_registry(script),
        store=_cluster_store(postgres_dsn, pg_schema),
        dispatch=dispatcher,
        retry=RetryPolicy(max_attempts=2, initial_delay=0.01, jitter=False),
        hooks=heard,
        cluster=True,
    ) as runtime:
        with anyio.fail_after(60):
            await runtime.publish(Started("k"))
            await runtime.publish(Touched("k"), id="e1")

            async def three_letters() -> bool:
                return len(await runtime.store.list_dead_letters()) == 3

            await _until(three_letters)
            letters = {d.id: d for d in await runtime.store.list_dead_letters()}
            stats = runtime.statistics()

    (undo,) = [d for d in letters.values() if d.kind == "compensate"]
    assert sorted(letters) == sorted(["S:g:e0", "S:k:e1", undo.id])
    assert undo.error.startswith("DispatchError: the dispatcher returned False")
    assert stats.dead_letters == 3
    assert sorted(d.id for d in heard.letters) == sorted(letters)
    warnings = [
        r.getMessage()
        for r in logs.records
        if r.name == "sagaflow.runtime" and r.levelname == "WARNING"
    ]
    assert sorted(warnings) == sorted(
        f"{what} {d.type_name} of saga 'S' key {d.key!r} is a dead letter after "
        f"{d.attempts} attempt(s): {d.error} (id {d.id}; {HINT})"
        for what, d in (
            ("event", letters["S:g:e0"]),
            ("event", letters["S:k:e1"]),
            ("compensation", undo),
        )
    )
    infos = [
        r.getMessage()
        for r in logs.records
        if r.name == "sagaflow.runtime" and r.levelname == "INFO"
    ]
    assert infos == [
        "command sagas_for_tests.Cmd of saga 'S' key 'k' failed for good after 2 attempt(s), "
        "and its CommandFailed handler took it: DispatchError: the dispatcher returned False, "
        "which reports a failed dispatch (return None or True for success, or raise to say "
        "why it failed)"
    ]


def test_a_scenario_given_an_event_no_saga_handles_fails_saying_so() -> None:
    with (
        SyncScenario(scripted_registry(), saga=SAGA) as scenario,
        pytest.raises(AssertionError, match=r"matched no saga: no saga handles this type"),
    ):
        scenario.given(Refunded("k"))
