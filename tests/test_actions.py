"""Actions: their values, and what the runtime does with each shape of handler result."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import attrs
import pytest
from json_meaning import JsonText
from sagas_for_tests import (
    SAGA,
    T0,
    Cmd,
    Log,
    Ping,
    Started,
    Touched,
    meta,
    running,
    scripted_registry,
)

from sagaflow import CommandFailed, Compensate, Complete, Schedule, Send, Unschedule
from sagaflow.stores import DeadLetter, ScheduleRecord

# -- the values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("after", "seconds"),
    [
        (timedelta(minutes=30), 1800.0),
        (timedelta(milliseconds=1500), 1.5),
        (5, 5.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_schedule_after_takes_a_timedelta_or_seconds(after: Any, seconds: float) -> None:
    assert Schedule(Ping("k"), after=after) == Schedule(
        Ping("k"), after=seconds, name=None, to_self=False
    )


@pytest.mark.parametrize("after", [-1, -0.001, timedelta(seconds=-1), float("nan")])
def test_schedule_rejects_a_negative_or_nan_delay(after: Any) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        Schedule(Ping("k"), after=after)


def test_schedule_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Schedule(Ping("k"), 5)  # type: ignore[misc]


def test_compensate_keeps_its_commands_as_a_tuple_in_order() -> None:
    def generated() -> Iterator[Cmd]:
        yield Cmd("k", "a")
        yield Cmd("k", "b")

    assert Compensate([Cmd("k", "a"), Cmd("k", "b")]).commands == (Cmd("k", "a"), Cmd("k", "b"))
    assert Compensate(generated()) == Compensate((Cmd("k", "a"), Cmd("k", "b")))
    assert Compensate([]).commands == ()


def test_actions_are_frozen_values() -> None:
    send = Send(Cmd("k", "a"))

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        send.command = Cmd("k", "b")  # type: ignore[misc]
    assert (send, Unschedule("t"), Complete()) == (Send(Cmd("k", "a")), Unschedule("t"), Complete())
    assert CommandFailed(Cmd("k", "a"), "RuntimeError: boom", 3) == CommandFailed(
        command=Cmd("k", "a"), error="RuntimeError: boom", attempts=3
    )


# -- handler results through the runtime -----------------------------------------------


def _sends(*labels: str) -> Any:
    """A script whose start handler returns `Send`s of these labels, as a list."""

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return [Send(Cmd(event.key, label)) for label in labels]
        return None

    return script


@pytest.mark.anyio
async def test_handler_returning_none_changes_state_and_dispatches_nothing() -> None:
    async with running(scripted_registry()) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        assert (await h.summary(), h.dispatched.calls) == ({"k": ("active", ["Started"])}, [])


@pytest.mark.anyio
async def test_handler_returning_one_action_dispatches_it() -> None:
    async with running(scripted_registry(lambda state, event: Send(Cmd(event.key, "one")))) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        assert h.dispatched.aliased() == [(Cmd("k", "one"), meta("c1", key="k"))]


@pytest.mark.anyio
async def test_handler_returning_a_list_dispatches_in_the_returned_order() -> None:
    async with running(scripted_registry(_sends("a", "b", "c"))) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        assert h.dispatched.aliased() == [
            (Cmd("k", "a"), meta("c1", key="k")),
            (Cmd("k", "b"), meta("c2", key="k")),
            (Cmd("k", "c"), meta("c3", key="k")),
        ]


@pytest.mark.anyio
async def test_handler_returning_a_generator_dispatches_what_it_yields() -> None:
    def script(state: Log, event: Any) -> Iterator[Any]:
        yield Send(Cmd(event.key, "a"))
        state.seen.append("between")
        yield Send(Cmd(event.key, "b"))

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        assert h.dispatched.labels() == ["a", "b"]
        assert await h.summary() == {"k": ("active", ["Started", "between"])}


@pytest.mark.anyio
async def test_handler_returning_a_tuple_of_mixed_actions_applies_each() -> None:
    def script(state: Log, event: Any) -> Any:
        return (
            Send(Cmd(event.key, "send")),
            Schedule(Cmd(event.key, "later"), after=10, name="t"),
            Compensate([Cmd(event.key, "undo")]),
        )

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        assert h.dispatched.aliased() == [
            (Cmd("k", "send"), meta("c1", key="k")),
            (Cmd("k", "undo"), meta("c2", key="k", kind="compensate")),
        ]
        (record,) = await h.records()
        assert await h.store.list_schedules() == [
            ScheduleRecord(
                id=f"{record.instance_id}.1.1",
                saga=SAGA,
                key="k",
                name="t",
                due=T0 + 10,
                to_self=False,
                type_name="sagas_for_tests.Cmd",
                payload=JsonText('{"key": "k", "label": "later"}'),
                seq=(1 << 16) | 1,
            )
        ]


GENERIC = (
    ", which is not an action: return None, an action (Send, Schedule, Unschedule, "
    "Compensate, Complete, Associate, Dissociate) or a list of actions"
)

NOT_ACTIONS = [
    pytest.param(lambda key: 42, "returned 42" + GENERIC, id="int"),
    pytest.param(lambda key: "Send", "returned 'Send'" + GENERIC, id="str"),
    pytest.param(
        lambda key: Cmd(key, "bare"),
        "returned Cmd(key='k', label='bare'), which is not an action: to send it as a "
        "command, return Send(Cmd(...))",
        id="command-without-send",
    ),
    pytest.param(
        lambda key: Complete,
        "returned the class Complete, not an action: return Complete(...) instead",
        id="action-class",
    ),
    pytest.param(lambda key: {"key": key}, "returned {'key': 'k'}" + GENERIC, id="dict"),
    pytest.param(
        lambda key: [Send(Cmd(key, "ok")), 42],
        "returned 42" + GENERIC,
        id="list-with-a-stray-value",
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("result", "complaint"), NOT_ACTIONS)
async def test_handler_returning_a_non_action_dead_letters_the_event(
    result: Any, complaint: str
) -> None:
    """No state change, nothing dispatched (not even the valid actions before the bad one),
    and a dead letter whose error names the saga and key; other events carry on."""

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Touched) and event.tag == "bad":
            state.seen.append("mutated")
            return result(event.key)
        return Send(Cmd(event.key, "start"))

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        before = await h.records()
        await h.runtime.publish(Touched("k", "bad"), id="e1")
        await h.runtime.drain()

        assert await h.store.list_dead_letters() == [
            DeadLetter(
                id="S:k:e1",
                saga=SAGA,
                key="k",
                kind="event",
                type_name="sagas_for_tests.Touched",
                payload=JsonText('{"key": "k", "tag": "bad"}'),
                error=f"ActionError: saga 'S' key 'k' handling Touched: {complaint}",
                attempts=1,
                failed_at=T0,
            )
        ]
        assert await h.records() == before
        assert h.dispatched.labels() == ["start"]

        await h.runtime.publish(Touched("k", "2"))
        await h.runtime.drain()
        assert await h.summary() == {"k": ("active", ["Started", "Touched:2"])}
        assert h.runtime.statistics().events_dead_lettered == 1


@pytest.mark.anyio
async def test_start_handler_returning_a_non_action_creates_no_instance() -> None:
    async with running(scripted_registry(lambda state, event: object())) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        assert (await h.records(), [d.kind for d in await h.store.list_dead_letters()]) == (
            [],
            ["event"],
        )


@pytest.mark.anyio
async def test_sending_a_command_off_the_allow_list_dead_letters_the_event() -> None:
    @attrs.frozen
    class LocalCommand:
        label: str

    async with running(scripted_registry(lambda state, event: Send(LocalCommand("x")))) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        (dead,) = await h.store.list_dead_letters()
        assert (dead.saga, dead.key, dead.kind) == (SAGA, "k", "event")
        assert "is not on sagaflow's type allow-list" in dead.error
        assert "registry.message(LocalCommand)" in dead.error
        assert (await h.records(), h.dispatched.calls) == ([], [])


@pytest.mark.anyio
async def test_schedule_together_with_complete_is_rejected() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Touched):
            return [Complete(), Schedule(Cmd(event.key, "late"), after=1)]
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Touched("k"))
        await h.runtime.drain()

        (dead,) = await h.store.list_dead_letters()
        assert "Schedule cannot be returned" in dead.error
        assert await h.summary() == {"k": ("active", ["Started"])}
        assert await h.store.list_schedules() == []


@pytest.mark.anyio
async def test_schedule_to_self_of_an_unhandled_message_is_rejected() -> None:
    script = lambda state, event: Schedule(Cmd(event.key, "x"), after=1, to_self=True)  # noqa: E731

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        (dead,) = await h.store.list_dead_letters()
        assert "Schedule(to_self=True) of Cmd, which this saga has no handler for" in dead.error
        assert await h.records() == []
