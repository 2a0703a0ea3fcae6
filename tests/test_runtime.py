"""The runtime on the happy path: routing, ordering, dispatch, schedules, completion,
dedup, feeding with `run`, `drain`, the context's end and statistics.

Failures (retries, `CommandFailed`, compensations, raising handlers, corrupt state) are
in `test_failures.py`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import attrs
import pytest
from json_meaning import JsonText
from sagas_for_tests import (
    SAGA,
    T0,
    Cmd,
    Finished,
    Log,
    OrderEvent,
    OrderPaid,
    OrderPlaced,
    OrderRefunded,
    Ping,
    Recorder,
    ScriptedSaga,
    Started,
    Touched,
    label,
    meta,
    running,
    scripted_registry,
)

from sagaflow import (
    Complete,
    Registry,
    Runtime,
    Schedule,
    Send,
    Statistics,
    SystemClock,
    Unmatched,
    Unschedule,
    correlate,
    on,
)
from sagaflow._clock import VirtualClock
from sagaflow.exceptions import RuntimeClosedError
from sagaflow.stores import InstanceRecord, MemoryStore, ScheduleRecord

NO_INSTANCE = "no live instance and the handler is not start=True"
COMPLETED = "the instance has completed"


def _clock() -> VirtualClock:
    return VirtualClock(start=T0)


def keys_on_different_shards(runtime: Runtime, n: int, saga: str = SAGA) -> list[str]:
    """`n` keys whose instances the runtime puts on `n` different shards."""
    keys: list[str] = []
    shards: list[object] = []
    for i in range(10_000):
        shard = runtime._shard(saga, f"k{i}")
        if all(shard is not other for other in shards):
            keys.append(f"k{i}")
            shards.append(shard)
            if len(keys) == n:
                return keys
    raise AssertionError("not enough shards")


# -- routing -------------------------------------------------------------------------


@attrs.frozen
class PaymentReceived:
    payment_id: str
    order_ref: str


class Orders:
    """A handler for the base class and a more specific one for `OrderPaid`."""

    @correlate
    def order_id(self, event: OrderEvent) -> str:
        return event.order_id

    @on(OrderEvent, start=True)
    def any_order_event(self, state: Log, event: OrderEvent) -> None:
        state.seen.append(f"any:{type(event).__name__}")

    @on(OrderPaid)
    def paid(self, state: Log, event: OrderPaid) -> None:
        state.seen.append(f"paid:{type(event).__name__}")


class Payments:
    """Per-type correlate functions: one key, read from different fields."""

    @correlate(OrderPlaced)
    def by_order(self, event: OrderPlaced) -> str:
        return event.order_id

    @correlate(PaymentReceived)
    def by_payment(self, event: PaymentReceived) -> str:
        return event.order_ref

    @on(OrderPlaced, start=True)
    def placed(self, state: Log, event: OrderPlaced) -> None:
        state.seen.append("placed")

    @on(PaymentReceived)
    def received(self, state: Log, event: PaymentReceived) -> None:
        state.seen.append(f"received:{event.payment_id}")


class BadKey:
    """Its correlate function returns an int for keys starting with "int"."""

    @correlate
    def key(self, event: Started) -> Any:
        return 42 if event.key.startswith("int") else event.key

    @on(Started, start=True)
    def started(self, state: Log, event: Started) -> None:
        state.seen.append("Started")


@pytest.mark.anyio
async def test_handler_for_a_base_class_sees_subclasses_and_the_most_specific_wins() -> None:
    registry = Registry()
    registry.register(Orders(), state=Log)

    async with running(registry) as h:
        for event in (OrderPlaced("o1"), OrderEvent("o1"), OrderPaid("o1"), OrderRefunded("o1")):
            await h.runtime.publish(event)

        assert await h.summary() == {
            "o1": (
                "active",
                ["any:OrderPlaced", "any:OrderEvent", "paid:OrderPaid", "paid:OrderRefunded"],
            )
        }


@pytest.mark.anyio
async def test_one_event_reaches_several_sagas_each_with_its_own_instance() -> None:
    registry = Registry()
    script = lambda state, event: Send(Cmd(event.key, "from-" + state.seen[0]))  # noqa: E731
    registry.register(ScriptedSaga(script), state=Log, name="A")
    registry.register(ScriptedSaga(script), state=Log, name="B")

    async with running(registry) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        a, b = await h.records()
        assert [(r.saga, r.key, r.state) for r in (a, b)] == [
            ("A", "k", JsonText('{"seen": ["Started"]}')),
            ("B", "k", JsonText('{"seen": ["Started"]}')),
        ]
        assert a.instance_id != b.instance_id
        by_saga = sorted(h.dispatched.calls, key=lambda call: call[1].saga)
        assert [(c, m.saga, m.key, m.attempt, m.kind) for c, m in by_saga] == [
            (Cmd("k", "from-Started"), "A", "k", 1, "send"),
            (Cmd("k", "from-Started"), "B", "k", 1, "send"),
        ]
        assert [m.id for _, m in by_saga] == [
            f"{a.instance_id}.1.0",
            f"{b.instance_id}.1.0",
        ]


@pytest.mark.anyio
async def test_correlate_returning_none_skips_the_saga_silently() -> None:
    async with running(scripted_registry()) as h:
        await h.runtime.publish(Started("skip-me"))
        await h.runtime.publish(Touched("skip-me"))
        await h.runtime.drain()

        assert (await h.records(), h.unmatched) == ([], [])
        assert h.runtime.statistics().events_unmatched == 0


@pytest.mark.anyio
async def test_correlate_returning_a_non_str_makes_publish_raise_naming_the_saga() -> None:
    """The error comes before the event is routed anywhere, to any saga."""
    registry = scripted_registry()
    registry.register(BadKey(), state=Log)

    async with running(registry) as h:
        with pytest.raises(TypeError, match=r"correlate function of saga 'BadKey' returned 42"):
            await h.runtime.publish(Started("int-1"))
        await h.runtime.drain()

        assert await h.records() == []
        await h.runtime.publish(Started("k"))
        assert [(r.saga, r.key) for r in await h.records()] == [("BadKey", "k"), (SAGA, "k")]


@pytest.mark.anyio
async def test_non_start_event_without_instance_is_reported_unmatched() -> None:
    async with running(scripted_registry()) as h:
        await h.runtime.publish(Touched("k", "early"))
        await h.runtime.publish(Finished("k"))
        await h.runtime.drain()

        assert h.unmatched == [
            Unmatched(Touched("k", "early"), SAGA, "k", NO_INSTANCE),
            Unmatched(Finished("k"), SAGA, "k", NO_INSTANCE),
        ]
        assert h.runtime.statistics().events_unmatched == 2
        assert await h.records() == []


@pytest.mark.anyio
async def test_unmatched_events_are_logged_with_saga_and_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="sagaflow"):
        async with running(scripted_registry()) as h:
            await h.runtime.publish(Touched("k"))

    (record,) = [r for r in caplog.records if "matched no instance" in r.getMessage()]
    assert (record.saga, record.key, record.event_type) == (SAGA, "k", "Touched")  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_correlate_for_listed_types_reads_each_type_its_own_way() -> None:
    registry = Registry()
    registry.register(Payments(), state=Log)

    async with running(registry) as h:
        await h.runtime.publish(OrderPlaced("o1"))
        await h.runtime.publish(PaymentReceived("p9", order_ref="o1"))

        assert await h.summary() == {"o1": ("active", ["placed", "received:p9"])}


# -- per-instance order, concurrency between instances ---------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("max_batch", [1, 3, 256])
async def test_events_of_one_instance_are_handled_in_publish_order(max_batch: int) -> None:
    async def events() -> AsyncIterator[Any]:
        yield Started("a")
        yield Started("b")
        for i in range(20):
            yield Touched("a", str(i))
            yield Touched("b", str(i))

    async with running(scripted_registry(), max_batch=max_batch, shards=2) as h:
        assert await h.runtime.run(events()) == 42

        expected = ["Started"] + [f"Touched:{i}" for i in range(20)]
        assert await h.summary() == {"a": ("active", expected), "b": ("active", expected)}


@pytest.mark.anyio
async def test_an_instance_handles_one_event_at_a_time() -> None:
    """The second event's handler does not start while the first one's is suspended."""
    gate = anyio.Event()
    entered: list[str] = []

    async def touched(event: Touched) -> None:
        entered.append(event.tag)
        if event.tag == "1":
            await gate.wait()

    def script(state: Log, event: Any) -> Any:
        return touched(event) if isinstance(event, Touched) else None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.runtime.publish, Touched("k", "1"))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(h.runtime.publish, Touched("k", "2"))
            await anyio.wait_all_tasks_blocked()

            assert entered == ["1"]
            gate.set()

        assert entered == ["1", "2"]
        assert await h.summary() == {"k": ("active", ["Started", "Touched:1", "Touched:2"])}


@pytest.mark.anyio
async def test_a_blocked_handler_does_not_hold_up_an_instance_on_another_shard() -> None:
    gate = anyio.Event()

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Touched) and event.tag == "block":
            return gate.wait()
        return None

    async with running(scripted_registry(script), shards=4) as h:
        a, b = keys_on_different_shards(h.runtime, 2)
        await h.runtime.publish(Started(a))
        await h.runtime.publish(Started(b))
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.runtime.publish, Touched(a, "block"))
            await anyio.wait_all_tasks_blocked()

            await h.runtime.publish(Touched(b, "free"))

            assert await h.summary() == {
                a: ("active", ["Started"]),
                b: ("active", ["Started", "Touched:free"]),
            }
            gate.set()

        assert (await h.summary())[a] == ("active", ["Started", "Touched:block"])


# -- dispatch ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_commands_are_dispatched_after_the_state_change_is_committed() -> None:
    store = MemoryStore()
    seen_at_dispatch: list[tuple[str, list[InstanceRecord]]] = []

    async def dispatch(command: Cmd, meta: Any) -> None:
        seen_at_dispatch.append((command.label, await store.list_instances()))

    script = lambda state, event: Send(Cmd(event.key, label(event)))  # noqa: E731
    async with Runtime(
        scripted_registry(script), store=store, dispatch=dispatch, clock=_clock()
    ) as runtime:
        await runtime.publish(Started("k"))
        await runtime.drain()
        await runtime.publish(Touched("k"))
        await runtime.drain()

    assert [(name, [r.state for r in records]) for name, records in seen_at_dispatch] == [
        ("Started", [JsonText('{"seen": ["Started"]}')]),
        ("Touched", [JsonText('{"seen": ["Started", "Touched"]}')]),
    ]


@pytest.mark.anyio
async def test_dispatch_meta_carries_unique_ids_saga_key_attempt_and_kind() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return [Send(Cmd(event.key, "a")), Send(Cmd(event.key, "b"))]
        return Send(Cmd(event.key, "c"))

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Touched("k"))
        await h.runtime.drain()

        assert h.dispatched.aliased() == [
            (Cmd("k", "a"), meta("c1", key="k")),
            (Cmd("k", "b"), meta("c2", key="k")),
            (Cmd("k", "c"), meta("c3", key="k")),
        ]
        (record,) = await h.records()
        assert [m.id for _, m in h.dispatched.calls] == [
            f"{record.instance_id}.1.0",
            f"{record.instance_id}.1.1",
            f"{record.instance_id}.2.0",
        ]


@pytest.mark.anyio
async def test_dispatcher_may_be_an_object_with_an_async_call() -> None:
    recorder = Recorder()  # an object with `async def __call__`, not a function

    async with running(
        scripted_registry(lambda s, e: Send(Cmd(e.key, "x"))), recorder=recorder
    ) as h:
        await h.runtime.publish(Started("k"))

    assert recorder.labels() == ["x"]


@pytest.mark.anyio
async def test_commands_of_different_instances_are_dispatched_independently() -> None:
    async with running(scripted_registry(lambda s, e: Send(Cmd(e.key, "x")))) as h:
        await h.runtime.run(_aiter(*(Started(f"k{i}") for i in range(10))))
        await h.runtime.drain()

        assert sorted(c.key for c, _ in h.dispatched.calls) == [f"k{i}" for i in range(10)]
        assert len({m.id for _, m in h.dispatched.calls}) == 10


@pytest.mark.anyio
async def test_a_slow_dispatch_holds_up_its_own_instance_but_not_others() -> None:
    """Commands of one instance go one at a time; other instances' go meanwhile."""
    gate = anyio.Event()
    started: list[str] = []

    async def dispatch(command: Cmd, meta: Any) -> None:
        started.append(f"{command.key}:{command.label}")
        if command.key == "a" and command.label == "1":
            await gate.wait()

    def script(state: Log, event: Any) -> Any:
        return [Send(Cmd(event.key, "1")), Send(Cmd(event.key, "2"))]

    async with Runtime(
        scripted_registry(script), store=MemoryStore(), dispatch=dispatch, clock=_clock()
    ) as runtime:
        await runtime.publish(Started("a"))
        await runtime.publish(Started("b"))
        await anyio.wait_all_tasks_blocked()

        assert sorted(started) == ["a:1", "b:1", "b:2"]
        gate.set()
        await runtime.drain()

        assert sorted(started) == ["a:1", "a:2", "b:1", "b:2"]


async def _aiter(*items: Any) -> AsyncIterator[Any]:
    for item in items:
        yield item


# -- schedules -----------------------------------------------------------------------


def _schedule_on_start(**options: Any) -> Any:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return Schedule(Ping(event.key, "p"), **options)
        return None

    return script


@pytest.mark.anyio
async def test_to_self_schedule_is_delivered_to_the_same_instance_when_due_not_before() -> None:
    async with running(
        scripted_registry(_schedule_on_start(after=timedelta(seconds=10), to_self=True))
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Started("other"))
        await h.runtime.drain()
        assert sorted((s.key, s.due, s.to_self) for s in await h.store.list_schedules()) == [
            ("k", T0 + 10, True),
            ("other", T0 + 10, True),
        ]

        await h.advance(9.5)
        assert await h.summary() == {
            "k": ("active", ["Started"]),
            "other": ("active", ["Started"]),
        }

        await h.advance(0.5)
        assert await h.summary() == {
            "k": ("active", ["Started", "Ping:p"]),
            "other": ("active", ["Started", "Ping:p"]),
        }
        assert (await h.store.list_schedules(), h.dispatched.calls) == ([], [])


@pytest.mark.anyio
async def test_schedule_of_a_command_is_dispatched_when_due_with_the_schedule_id() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return Schedule(Cmd(event.key, "timeout"), after=30, name="t")
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        (schedule,) = await h.store.list_schedules()
        (record,) = await h.records()
        assert schedule == ScheduleRecord(
            id=f"{record.instance_id}.1.0",
            saga=SAGA,
            key="k",
            name="t",
            due=T0 + 30,
            to_self=False,
            type_name="sagas_for_tests.Cmd",
            payload=JsonText('{"key": "k", "label": "timeout"}'),
            seq=1 << 16,
        )

        await h.advance(29.5)
        assert h.dispatched.calls == []

        await h.advance(0.5)
        assert h.dispatched.calls == [
            (Cmd("k", "timeout"), meta(schedule.id, key="k")),
        ]
        assert await h.store.list_schedules() == []


@pytest.mark.anyio
async def test_scheduling_a_pending_name_again_replaces_it() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return Schedule(Ping(event.key, "first"), after=10, name="t", to_self=True)
        if isinstance(event, Touched):
            return Schedule(Ping(event.key, "second"), after=20, name="t", to_self=True)
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Touched("k"))
        assert [(s.name, s.due) for s in await h.store.list_schedules()] == [("t", T0 + 20)]

        await h.advance(10)
        assert (await h.summary())["k"] == ("active", ["Started", "Touched"])

        await h.advance(10)
        assert (await h.summary())["k"] == ("active", ["Started", "Touched", "Ping:second"])


@pytest.mark.anyio
async def test_unschedule_cancels_a_pending_schedule_and_ignores_unknown_names() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return [
                Schedule(Ping(event.key, "t"), after=10, name="t", to_self=True),
                Schedule(Ping(event.key, "u"), after=10, name="u", to_self=True),
            ]
        if isinstance(event, Touched):
            return [Unschedule("t"), Unschedule("never-scheduled")]
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Touched("k"))
        assert [s.name for s in await h.store.list_schedules()] == ["u"]

        await h.advance(60)

        assert await h.summary() == {"k": ("active", ["Started", "Touched", "Ping:u"])}


@pytest.mark.anyio
async def test_unnamed_schedules_do_not_replace_each_other() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started | Touched):
            return Schedule(Ping(event.key, label(event)), after=5, to_self=True)
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Touched("k"))
        await h.advance(5)

        assert sorted((await h.summary())["k"][1]) == sorted(
            ["Started", "Touched", "Ping:Started", "Ping:Touched"]
        )


@pytest.mark.anyio
async def test_schedules_due_at_the_same_time_go_in_the_order_they_were_returned() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            pings = [Schedule(Ping(event.key, str(i)), after=5, to_self=True) for i in range(4)]
            commands = [Schedule(Cmd(event.key, f"c{i}"), after=5) for i in range(4)]
            return [*pings, *commands]
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.advance(5)

        assert await h.summary() == {
            "k": ("active", ["Started", "Ping:0", "Ping:1", "Ping:2", "Ping:3"])
        }
        assert h.dispatched.labels() == ["c0", "c1", "c2", "c3"]


@pytest.mark.anyio
async def test_an_earlier_schedule_wakes_the_timer_that_sleeps_for_a_later_one() -> None:
    def script(state: Log, event: Any) -> Any:
        after = {"Started": 100, "Touched": 1}[type(event).__name__] if event.tag == "" else None
        if after is None:
            return None
        return Schedule(Ping(event.key, type(event).__name__), after=after, to_self=True)

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()
        await h.runtime.publish(Touched("k"))

        await h.advance(1)

        assert (await h.summary())["k"] == ("active", ["Started", "Touched", "Ping:Touched"])


@pytest.mark.anyio
async def test_a_to_self_handler_may_schedule_the_same_name_again() -> None:
    """A periodic timer: each tick schedules the next one under the same name."""

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started | Ping) and len(state.seen) < 4:
            return Schedule(Ping(event.key, "tick"), after=5, name="tick", to_self=True)
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        for _ in range(5):
            await h.advance(5)

        assert await h.summary() == {
            "k": ("active", ["Started", "Ping:tick", "Ping:tick", "Ping:tick"])
        }
        assert await h.store.list_schedules() == []


@pytest.mark.anyio
async def test_a_schedule_due_at_once_is_done_before_drain_returns() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return [
                Schedule(Ping(event.key, "now"), after=0, to_self=True),
                Schedule(Cmd(event.key, "now"), after=timedelta(0)),
            ]
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        assert await h.summary() == {"k": ("active", ["Started", "Ping:now"])}
        assert h.dispatched.labels() == ["now"]


@pytest.mark.anyio
async def test_unschedule_after_schedule_in_one_result_cancels_it() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return [Schedule(Ping(event.key), after=10, name="t", to_self=True), Unschedule("t")]
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))

        assert await h.store.list_schedules() == []


@pytest.mark.anyio
async def test_schedule_after_unschedule_in_one_result_is_pending() -> None:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return [Unschedule("t"), Schedule(Ping(event.key), after=10, name="t", to_self=True)]
        return None

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("k"))

        assert [s.name for s in await h.store.list_schedules()] == ["t"]


# -- completion ----------------------------------------------------------------------


def _complete_on_finish(*finish_actions: Any) -> Any:
    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return [
                Send(Cmd(event.key, "start")),
                Schedule(Ping(event.key, "p"), after=10, name="t", to_self=True),
            ]
        if isinstance(event, Finished):
            return [*finish_actions, Complete()]
        return None

    return script


@pytest.mark.anyio
async def test_complete_without_outstanding_commands_deletes_the_instance_at_once() -> None:
    async with running(scripted_registry(_complete_on_finish())) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()
        await h.runtime.publish(Finished("k"))

        assert (await h.records(), await h.store.list_schedules()) == ([], [])

        await h.runtime.publish(Touched("k"))
        await h.advance(60)

        assert h.unmatched == [Unmatched(Touched("k"), SAGA, "k", COMPLETED, "completed")]
        assert h.dispatched.labels() == ["start"]


@pytest.mark.anyio
async def test_a_start_event_after_completion_starts_a_new_incarnation_with_reuse_keys() -> None:
    """The new incarnation's versions go on from the last one of the finished instance,
    so its commands sort after any late commands of the old one."""
    async with running(scripted_registry(_complete_on_finish(), reuse_keys=True)) as h:
        await h.runtime.publish(Started("k", "1"))
        await h.runtime.drain()
        (first,) = await h.records()
        await h.runtime.publish(Finished("k"))
        (tombstone,) = await h.store.list_tombstones()
        await h.runtime.publish(Started("k", "2"))
        await h.runtime.drain()

        (second,) = await h.records()
        assert (tombstone.version, await h.store.list_tombstones()) == (2, [])
        assert (second.state, second.version) == (JsonText('{"seen": ["Started:2"]}'), 3)
        assert second.instance_id != first.instance_id
        ids = [m.id for _, m in h.dispatched.calls]
        assert len(set(ids)) == 2


@pytest.mark.anyio
async def test_a_start_handler_may_complete_at_once() -> None:
    def script(state: Log, event: Any) -> Any:
        if event.tag == "with-send":
            return [Send(Cmd(event.key, "only")), Complete()]
        return Complete()

    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("a", "with-send"), id="s")
        await h.runtime.publish(Started("b"), id="s")
        await h.runtime.drain()

        assert (await h.records(), h.dispatched.labels()) == ([], ["only"])
        await h.runtime.publish(Started("b"), id="s")
        assert (await h.records(), h.runtime.statistics().events_duplicate) == ([], 1)


@pytest.mark.anyio
async def test_complete_drops_schedules_at_once_and_takes_no_more_events() -> None:
    """While its last command is still being retried the instance is "completing": its
    schedules are gone, a later event is unmatched, and its state stays."""
    recorder = Recorder(failures={"last": 1})

    async with running(
        scripted_registry(_complete_on_finish(Send(Cmd("k", "last")))), recorder=recorder
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Finished("k"))
        await h.runtime.drain()

        assert await h.store.list_schedules() == []
        assert await h.summary() == {"k": ("completing", ["Started", "Finished"])}

        await h.runtime.publish(Touched("k"))
        await h.runtime.publish(Started("k", "again"))
        await h.runtime.drain()
        assert h.unmatched == [
            Unmatched(Touched("k"), SAGA, "k", COMPLETED, "completed"),
            Unmatched(Started("k", "again"), SAGA, "k", COMPLETED, "completed"),
        ]
        assert await h.summary() == {"k": ("completing", ["Started", "Finished"])}

        await h.advance(10)  # the retry succeeds; the schedule would have been due too

        assert await h.records() == []
        assert h.dispatched.labels() == ["start", "last", "last"]


@pytest.mark.anyio
async def test_an_on_unmatched_hook_that_raises_does_not_stop_the_runtime(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reporting hook is not the runtime's business: its error is logged, work goes on."""

    def hook(unmatched: Unmatched) -> None:
        raise ValueError("hook broke")

    async with Runtime(
        scripted_registry(),
        store=MemoryStore(),
        dispatch=Recorder(),
        clock=_clock(),
        on_unmatched=hook,
    ) as runtime:
        with anyio.fail_after(60):
            await runtime.publish(Touched("k"))
            await runtime.publish(Started("k"))
            await runtime.drain()

        assert runtime.statistics().events_handled == 1
    assert any("hook broke" in r.getMessage() or r.exc_info for r in caplog.records)


@pytest.mark.anyio
async def test_two_runtimes_on_one_store_lose_no_update_of_a_shared_instance() -> None:
    """Optimistic concurrency: the writer that lost a race reloads and handles again."""
    store = MemoryStore()
    clock = _clock()
    registry = scripted_registry(lambda state, event: Send(Cmd(event.key, label(event))))
    first, second = Recorder(), Recorder()

    async with (
        Runtime(registry, store=store, dispatch=first, clock=clock) as a,
        Runtime(registry, store=store, dispatch=second, clock=clock) as b,
    ):
        await a.publish(Started("k"))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon((a, b)[i % 2].publish, Touched("k", str(i)))
            await a.drain()
            await b.drain()

        (record,) = await store.list_instances()
        touched = [f"Touched:{i}" for i in range(20)]
        seen = json.loads(record.state)["seen"]
        assert (seen[0], sorted(seen[1:]), record.version) == ("Started", sorted(touched), 21)
        labels = first.labels() + second.labels()
        assert sorted(labels) == sorted(["Started", *touched])


# -- dedup ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_redelivered_event_with_an_id_is_applied_once_per_instance() -> None:
    script = lambda state, event: Send(Cmd(event.key, label(event)))  # noqa: E731
    async with running(scripted_registry(script)) as h:
        await h.runtime.publish(Started("a"), id="s-a")
        await h.runtime.publish(Started("b"), id="s-b")
        await h.runtime.publish(Touched("a", "x"), id="same")
        await h.runtime.publish(Touched("a", "x"), id="same")
        await h.runtime.publish(Touched("b", "x"), id="same")  # another instance: applied
        await h.runtime.publish(Started("a"), id="s-a")
        await h.runtime.drain()

        assert await h.summary() == {
            "a": ("active", ["Started", "Touched:x"]),
            "b": ("active", ["Started", "Touched:x"]),
        }
        assert (h.dispatched.labels("a"), h.dispatched.labels("b")) == (
            ["Started", "Touched:x"],
            ["Started", "Touched:x"],
        )
        assert h.runtime.statistics().events_duplicate == 2


@pytest.mark.anyio
async def test_events_without_id_are_never_deduplicated() -> None:
    async with running(scripted_registry()) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Touched("k"))
        await h.runtime.publish(Touched("k"))

        assert await h.summary() == {"k": ("active", ["Started", "Touched", "Touched"])}


@pytest.mark.anyio
async def test_dedup_outlives_a_completed_instance_until_the_retention_passes() -> None:
    """Without tombstones (retention 0), the dedup mark alone keeps a redelivered start
    event from starting a completed key again, for `dedup_retention`."""
    script = lambda state, event: Complete() if isinstance(event, Finished) else None  # noqa: E731
    registry = scripted_registry(script, tombstone_retention=0)
    async with running(registry, dedup_retention=timedelta(hours=1)) as h:
        await h.runtime.publish(Started("k"), id="start-1")
        await h.runtime.publish(Finished("k"), id="finish-1")
        assert await h.records() == []

        await h.runtime.publish(Started("k"), id="start-1")
        assert await h.records() == []

        await h.advance(3600)
        await h.runtime.publish(Started("k"), id="start-1")
        assert await h.records() == []

        await h.advance(1)
        await h.runtime.publish(Started("k"), id="start-1")
        assert await h.summary() == {"k": ("active", ["Started"])}
        assert h.runtime.statistics().events_duplicate == 2


# -- run(source) ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_from_a_memory_stream_returns_the_count_once_all_is_committed() -> None:
    send, receive = anyio.create_memory_object_stream[Any](10)
    async with running(scripted_registry()) as h, receive:
        async with send:
            for event in (Started("a"), Touched("a", "1"), Started("b"), Touched("a", "2")):
                await send.send(event)

        assert await h.runtime.run(receive) == 4
        # No drain: run returned only once every consumed event was committed.
        assert await h.summary() == {
            "a": ("active", ["Started", "Touched:1", "Touched:2"]),
            "b": ("active", ["Started"]),
        }


@pytest.mark.anyio
async def test_run_from_an_async_generator_uses_the_id_function_for_dedup() -> None:
    async def events() -> AsyncIterator[Any]:
        yield Started("a", "s")
        yield Touched("a", "1")
        yield Touched("a", "1")  # redelivered
        yield Touched("a", "2")
        yield Started("a", "s")  # redelivered
        yield Touched("a", "no-id")
        yield Touched("a", "no-id")

    def event_id(event: Any) -> str | None:
        return None if event.tag == "no-id" else f"{type(event).__name__}:{event.tag}"

    async with running(scripted_registry()) as h:
        assert await h.runtime.run(events(), id=event_id) == 7

        assert await h.summary() == {
            "a": (
                "active",
                ["Started:s", "Touched:1", "Touched:2", "Touched:no-id", "Touched:no-id"],
            )
        }
        assert h.runtime.statistics().events_duplicate == 2


@pytest.mark.anyio
async def test_run_counts_events_that_reach_no_saga() -> None:
    async with running(scripted_registry()) as h:
        assert await h.runtime.run(_aiter(Started("skip-1"), Cmd("k", "x"), Started("k"))) == 3

        assert await h.summary() == {"k": ("active", ["Started"])}


@pytest.mark.anyio
async def test_run_raises_what_the_source_raises_after_committing_what_it_consumed() -> None:
    async def events() -> AsyncIterator[Any]:
        yield Started("a")
        yield Touched("a", "1")
        raise ValueError("source broke")

    async with running(scripted_registry()) as h:
        with pytest.raises(ValueError, match="source broke"):
            await h.runtime.run(events())

        assert await h.summary() == {"a": ("active", ["Started", "Touched:1"])}


@pytest.mark.anyio
async def test_run_applies_backpressure_to_the_source() -> None:
    """With a small queue, the runtime takes events from the source no faster than its
    handlers get through them: a blocked handler stops the producer."""
    gate = anyio.Event()
    produced: list[int] = []

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Touched) and event.tag == "0":
            return gate.wait()
        return None

    async def produce(send: anyio.abc.ObjectSendStream[Any]) -> None:
        async with send:
            await send.send(Started("k"))
            for i in range(50):
                await send.send(Touched("k", str(i)))
                produced.append(i)

    send, receive = anyio.create_memory_object_stream[Any](0)
    async with running(scripted_registry(script), shards=1, max_batch=1, queue_size=1) as h:
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, send)
            counted: list[int] = []

            async def consume() -> None:
                async with receive:
                    counted.append(await h.runtime.run(receive))

            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()

            # Touched 0 is in the handler, 1 in the shard's queue (queue_size=1), 2 in
            # run()'s hand waiting for room; sending 3 waits for run() to take it.
            assert produced == [0, 1, 2]
            gate.set()

        assert (len(produced), counted) == (50, [51])
        assert (await h.summary())["k"][1] == ["Started"] + [f"Touched:{i}" for i in range(50)]


# -- drain, leaving the context, statistics -----------------------------------------


@pytest.mark.anyio
async def test_drain_does_not_wait_for_a_retry_that_is_due_later() -> None:
    async with running(
        scripted_registry(lambda s, e: Send(Cmd(e.key, "x"))), recorder=Recorder({"x": 1})
    ) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        (row,) = await h.store.list_outbox()
        assert (row.attempts, row.due, row.error) == (1, T0 + 1, "RuntimeError: boom x")
        assert h.runtime.statistics().outbox_depth == 1


@pytest.mark.anyio
async def test_drain_does_not_wait_for_a_schedule_that_is_due_later() -> None:
    async with running(scripted_registry(_schedule_on_start(after=3600, to_self=True))) as h:
        await h.runtime.publish(Started("k"))
        await h.runtime.drain()

        assert h.runtime.statistics().next_due == T0 + 3600


@pytest.mark.anyio
async def test_leaving_the_context_finishes_due_work_and_leaves_future_work_pending() -> None:
    store = MemoryStore()
    recorder = Recorder({"retried": 1})

    def script(state: Log, event: Any) -> Any:
        return [
            Send(Cmd(event.key, "now")),
            Schedule(Ping(event.key, "later"), after=3600, name="later", to_self=True),
        ]

    registry = scripted_registry(script)
    registry.register(ScriptedSaga(lambda s, e: Send(Cmd(e.key, "retried"))), state=Log, name="R")
    async with running(registry, store=store, recorder=recorder) as h:
        await h.runtime.publish(Started("k"))
        # No drain: leaving the context dispatches what is due now.

    assert sorted(recorder.labels()) == ["now", "retried"]
    assert [(s.saga, s.name, s.due) for s in await store.list_schedules()] == [
        (SAGA, "later", T0 + 3600)
    ]
    assert [(o.saga, o.attempts, o.due) for o in await store.list_outbox()] == [("R", 1, T0 + 1)]


@pytest.mark.anyio
async def test_publish_outside_the_context_raises_runtime_closed_error() -> None:
    runtime = Runtime(scripted_registry(), store=MemoryStore(), dispatch=Recorder())

    with pytest.raises(RuntimeClosedError, match="not running"):
        await runtime.publish(Started("k"))

    async with runtime:
        await runtime.publish(Started("k"))

    with pytest.raises(RuntimeClosedError):
        await runtime.publish(Started("k"))
    with pytest.raises(RuntimeClosedError):
        await runtime.run(_aiter(Started("k")))
    with pytest.raises(RuntimeClosedError):
        await runtime.drain()
    assert isinstance(RuntimeClosedError("x"), RuntimeError)


@pytest.mark.anyio
async def test_a_stopped_runtime_can_run_again_on_the_same_store() -> None:
    store = MemoryStore()
    runtime = Runtime(scripted_registry(), store=store, dispatch=Recorder(), clock=_clock())
    async with runtime:
        await runtime.publish(Started("k"))
    async with runtime:
        await runtime.publish(Touched("k"))

    assert [r.state for r in await store.list_instances()] == [
        JsonText('{"seen": ["Started", "Touched"]}')
    ]


@pytest.mark.anyio
async def test_a_running_runtime_cannot_be_entered_again() -> None:
    async with running(scripted_registry()) as h:
        with pytest.raises(RuntimeError, match="already running"):
            await h.runtime.__aenter__()


@pytest.mark.anyio
async def test_the_runtime_reads_and_waits_for_time_only_through_its_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a virtual clock, schedules, command retries and handler retries never touch
    the wall clock."""

    def wall_clock(*args: Any) -> Any:
        raise AssertionError("the runtime used the wall clock")

    monkeypatch.setattr(SystemClock, "now", wall_clock)
    monkeypatch.setattr(SystemClock, "sleep_until", wall_clock)
    failed_once: list[str] = []

    def script(state: Log, event: Any) -> Any:
        if isinstance(event, Started):
            return [
                Send(Cmd(event.key, "flaky")),
                Schedule(Ping(event.key, "p"), after=5, to_self=True),
            ]
        if isinstance(event, Ping) and not failed_once:
            failed_once.append("p")
            raise ValueError("once")
        return None

    async with running(scripted_registry(script), recorder=Recorder({"flaky": 1})) as h:
        await h.runtime.publish(Started("k"))
        for _ in range(8):
            await h.advance(1)

        assert h.dispatched.labels() == ["flaky", "flaky"]
        assert await h.summary() == {"k": ("active", ["Started", "Ping:p"])}


def test_runtime_needs_a_registry_with_sagas() -> None:
    with pytest.raises(ValueError, match="the registry has no sagas"):
        Runtime(Registry(), store=MemoryStore(), dispatch=Recorder())


@pytest.mark.anyio
async def test_statistics_is_a_frozen_snapshot() -> None:
    async with running(scripted_registry(lambda s, e: Send(Cmd(e.key, "x"))), shards=2) as h:
        await h.runtime.drain()
        before = h.runtime.statistics()
        await h.runtime.publish(Started("k"))
        await h.runtime.publish(Touched("missing"))
        await h.runtime.publish(Started("k"), id="i")
        await h.runtime.publish(Started("k"), id="i")
        await h.runtime.drain()
        after = h.runtime.statistics()

        assert before == Statistics(
            queued_events=0,
            in_flight=0,
            outbox_depth=0,
            next_due=None,
            cached_states=0,
            events_handled=0,
            events_duplicate=0,
            events_unmatched=0,
            events_dead_lettered=0,
            dead_letters=0,
            handler_retries=0,
            commands_dispatched=0,
            command_retries=0,
            commands_failed=0,
            batches_committed=0,
            conflicts=0,
            orphan_sagas=0,
        )
        assert attrs.evolve(after, batches_committed=0) == Statistics(
            queued_events=0,
            in_flight=0,
            outbox_depth=0,
            next_due=None,
            cached_states=1,
            events_handled=2,
            events_duplicate=1,
            events_unmatched=1,
            events_dead_lettered=0,
            dead_letters=0,
            handler_retries=0,
            commands_dispatched=2,
            command_retries=0,
            commands_failed=0,
            batches_committed=0,
            conflicts=0,
            orphan_sagas=0,
        )
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            after.events_handled = 0  # type: ignore[misc]


@pytest.mark.anyio
async def test_statistics_next_due_is_a_due_time_or_none() -> None:
    async with running(scripted_registry()) as h:
        assert h.runtime.statistics().next_due is None


@pytest.mark.anyio
async def test_an_exception_in_the_runtime_context_propagates_unchanged() -> None:
    with pytest.raises(KeyError):
        async with Runtime(scripted_registry(), store=MemoryStore(), dispatch=Recorder()):
            raise KeyError("from the user's code")
