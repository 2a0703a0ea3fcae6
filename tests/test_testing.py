"""`sagaflow.testing`: scenarios run the real runtime on a virtual clock, and say clearly
what they expected and what happened."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

import sagaflow.testing
from sagaflow import (
    Associate,
    CommandFailed,
    Compensate,
    Complete,
    Dissociate,
    Registry,
    RetryPolicy,
    Runtime,
    Schedule,
    Send,
    Unmatched,
    Unschedule,
    correlate,
    on,
)
from sagaflow.exceptions import RuntimeClosedError
from sagaflow.stores import COMPENSATION_FAILED, MemoryStore, SQLiteStore, Store
from sagaflow.testing import (
    Recorder,
    Scenario,
    Scheduled,
    SyncScenario,
    VirtualClock,
    advance,
)

# -- messages, states and sagas ----------------------------------------------------


@attrs.frozen
class OrderPlaced:
    order_id: str
    amount: int


@attrs.frozen
class PaymentCaptured:
    order_id: str


@attrs.frozen
class PaymentTimedOut:
    order_id: str


@attrs.frozen
class Remind:
    order_id: str


@attrs.frozen
class ReserveStock:
    order_id: str
    amount: int


@attrs.frozen
class ShipOrder:
    order_id: str


@attrs.frozen
class RemindCustomer:
    order_id: str
    count: int


@attrs.frozen
class ReleaseStock:
    order_id: str


@attrs.frozen
class CancelOrder:
    order_id: str


@attrs.define
class Order:
    status: str = "new"
    amount: int = 0
    reminders: int = 0


class OrderSaga:
    """Reserves stock, reminds the customer twice, ships on payment, compensates on a
    timeout or a failed command."""

    @correlate
    def order_id(self, event: OrderPlaced | PaymentCaptured) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, order: Order, event: OrderPlaced) -> list[Any]:
        order.status, order.amount = "placed", event.amount
        return [
            Send(ReserveStock(event.order_id, event.amount)),
            Schedule(
                Remind(event.order_id), after=timedelta(minutes=10), name="remind", to_self=True
            ),
            Schedule(
                PaymentTimedOut(event.order_id),
                after=timedelta(minutes=30),
                name="payment",
                to_self=True,
            ),
        ]

    @on(Remind, internal=True)
    def remind(self, order: Order, event: Remind) -> list[Any]:
        order.reminders += 1
        actions: list[Any] = [Send(RemindCustomer(event.order_id, order.reminders))]
        if order.reminders < 2:
            actions.append(
                Schedule(event, after=timedelta(minutes=10), name="remind", to_self=True)
            )
        return actions

    @on(PaymentCaptured)
    async def captured(self, order: Order, event: PaymentCaptured) -> list[Any]:
        order.status = "paid"
        return [
            Unschedule("payment"),
            Unschedule("remind"),
            Send(ShipOrder(event.order_id)),
            Complete(),
        ]

    @on(PaymentTimedOut, internal=True)
    def timed_out(self, order: Order, event: PaymentTimedOut) -> list[Any]:
        return [Compensate([ReleaseStock(event.order_id), CancelOrder(event.order_id)]), Complete()]

    @on(CommandFailed)
    def failed(self, order: Order, event: CommandFailed[Any]) -> list[Any]:
        order.status = f"failed: {event.error}"
        return [Compensate([CancelOrder(event.command.order_id)]), Complete()]


registry = Registry()
registry.register(OrderSaga(), state=Order)

PLACED = OrderPlaced("o-1", 120)
RESERVE = ReserveStock("o-1", 120)

# -- scenarios run the runtime -------------------------------------------------------


@pytest.mark.anyio
async def test_when_records_the_commands_state_and_schedules_of_the_instance() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.when(PLACED)
        assert (scenario.saga, scenario.key) == ("OrderSaga", "o-1")
        assert scenario.sent == [RESERVE]
        assert scenario.compensations == []
        assert scenario.state == Order(status="placed", amount=120)
        assert scenario.status == "active"
        assert not scenario.completed
        assert scenario.scheduled == [
            Scheduled("remind", timedelta(minutes=10), Remind("o-1"), to_self=True),
            Scheduled("payment", timedelta(minutes=30), PaymentTimedOut("o-1"), to_self=True),
        ]
        assert scenario.unmatched == []
        scenario.expect_sent(RESERVE)
        scenario.expect_state(Order(status="placed", amount=120))
        scenario.expect_state(status="placed")
        scenario.expect_scheduled(
            "payment", due=timedelta(minutes=30), message=PaymentTimedOut("o-1")
        )
        scenario.expect_scheduled("remind", due=600)
        scenario.expect_active()


@pytest.mark.anyio
async def test_given_events_are_applied_but_only_the_when_step_is_checked() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.given(PLACED)
        assert scenario.sent == []
        assert scenario.dispatched == []
        assert scenario.state == Order(status="placed", amount=120)
        await scenario.when(PaymentCaptured("o-1"))
        assert scenario.sent == [ShipOrder("o-1")]


@pytest.mark.anyio
async def test_complete_ends_the_instance_and_drops_its_schedules() -> None:
    """The async handler runs; once its command is dispatched the state is deleted."""
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.given(PLACED)
        await scenario.when(PaymentCaptured("o-1"))
        scenario.expect_sent(ShipOrder("o-1"))
        scenario.expect_completed()
        assert (scenario.state, scenario.status, scenario.scheduled) == (None, None, [])
        await scenario.advance(timedelta(hours=1))
        assert scenario.sent == scenario.compensations == []


@pytest.mark.anyio
async def test_advance_fires_a_timer_that_a_timer_scheduled_within_the_window() -> None:
    """The clock stops at each due time, so the second reminder is due 10 minutes after
    the first fired, not after the end of the window."""
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.given(PLACED)
        await scenario.advance(timedelta(minutes=25))
        assert scenario.sent == [RemindCustomer("o-1", 1), RemindCustomer("o-1", 2)]
        assert scenario.state == Order(status="placed", amount=120, reminders=2)
        assert scenario.scheduled == [
            Scheduled("payment", timedelta(minutes=30), PaymentTimedOut("o-1"), to_self=True)
        ]
        assert scenario.elapsed == timedelta(minutes=25)


@pytest.mark.anyio
async def test_a_timer_rescheduled_mid_window_is_due_from_when_it_fired() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.given(PLACED)
        await scenario.advance(timedelta(minutes=15))
        assert scenario.sent == [RemindCustomer("o-1", 1)]
        scenario.expect_scheduled("remind", due=timedelta(minutes=20))


@pytest.mark.anyio
async def test_advance_stops_short_of_later_timers_and_fires_them_when_due() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.given(PLACED)
        await scenario.advance(timedelta(minutes=29, seconds=59))
        scenario.expect_active()
        scenario.expect_scheduled("payment")
        await scenario.advance(1)
        scenario.expect_sent()
        scenario.expect_compensations(ReleaseStock("o-1"), CancelOrder("o-1"))
        scenario.expect_completed()
        scenario.expect_unscheduled("payment")


@attrs.frozen
class Start:
    key: str


@attrs.frozen
class Ping:
    label: str


@attrs.frozen
class Notify:
    label: str


@attrs.define
class Log:
    seen: list[str] = attrs.Factory(list)


class TimerSaga:
    """Two to_self timers scheduled out of order, and one scheduled command."""

    @correlate
    def key(self, event: Start) -> str:
        return event.key

    @on(Start, start=True)
    def start(self, log: Log, event: Start) -> list[Any]:
        return [
            Schedule(Ping("late"), after=20, name="late", to_self=True),
            Schedule(Ping("early"), after=10, name="early", to_self=True),
            Schedule(Notify("due"), after=15, name="notify"),
            Schedule(Notify("unnamed"), after=40),
        ]

    @on(Ping, internal=True)
    def ping(self, log: Log, event: Ping) -> None:
        log.seen.append(event.label)


@pytest.mark.anyio
async def test_advance_fires_timers_in_due_order_and_sends_scheduled_commands() -> None:
    async with Scenario(TimerSaga, state=Log) as scenario:
        await scenario.when(Start("t"))
        assert scenario.scheduled == [
            Scheduled("early", timedelta(seconds=10), Ping("early"), to_self=True),
            Scheduled("notify", timedelta(seconds=15), Notify("due")),
            Scheduled("late", timedelta(seconds=20), Ping("late"), to_self=True),
            Scheduled(None, timedelta(seconds=40), Notify("unnamed")),
        ]
        await scenario.advance(30)
        assert scenario.state == Log(["early", "late"])
        assert scenario.sent == [Notify("due")]
        assert [d.meta.kind for d in scenario.dispatched] == ["send"]


@attrs.frozen
class Post:
    entry: str


@attrs.frozen
class Entry:
    entry: str


@attrs.define
class Ledger:
    failures: list[str] = attrs.Factory(list)


class LedgerSaga:
    """Posts each entry; remembers the failures it is told of, and carries on."""

    @correlate
    def entry(self, event: Entry) -> str:
        return "ledger"

    @on(Entry, start=True)
    def add(self, ledger: Ledger, event: Entry) -> Send[Post]:
        return Send(Post(event.entry))

    @on(CommandFailed)
    def failed(self, ledger: Ledger, event: CommandFailed[Post]) -> None:
        ledger.failures.append(f"{event.command.entry}: {event.error} ({event.attempts})")


@pytest.mark.anyio
async def test_a_failed_command_reaches_the_saga_which_compensates() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        scenario.fail(ReserveStock, error=ValueError("out of stock"))
        await scenario.when(PLACED)
        assert scenario.sent == [RESERVE]
        assert scenario.compensations == [CancelOrder("o-1")]
        assert [(d.command, d.error) for d in scenario.dispatched] == [
            (RESERVE, "ValueError: out of stock"),
            (CancelOrder("o-1"), None),
        ]
        assert scenario.completed
        assert scenario.dead_letters == []


@pytest.mark.anyio
async def test_command_failed_carries_the_error_and_attempts() -> None:
    async with Scenario(LedgerSaga, state=Ledger) as scenario:
        scenario.fail(lambda c: isinstance(c, Post) and c.entry == "bad")
        await scenario.given(Entry("good"))
        await scenario.when(Entry("bad"))
        assert scenario.state == Ledger(["bad: RuntimeError: Post failed (Recorder.fail) (1)"])


@pytest.mark.anyio
async def test_a_command_that_fails_fewer_times_than_the_policy_allows_succeeds_on_retry() -> None:
    retry = RetryPolicy(max_attempts=3, initial_delay=2, jitter=False)
    async with Scenario(LedgerSaga, state=Ledger, retry=retry) as scenario:
        scenario.fail(Post, times=2)
        await scenario.when(Entry("a"))
        assert [(d.meta.attempt, d.error is None) for d in scenario.dispatched] == [(1, False)]
        await scenario.advance(1.9)
        assert scenario.dispatched == []
        await scenario.advance(10)
        assert [(d.meta.attempt, d.error is None) for d in scenario.dispatched] == [
            (2, False),
            (3, True),
        ]
        assert scenario.sent == [Post("a")]
        assert scenario.state == Ledger()


@pytest.mark.anyio
async def test_a_command_that_keeps_failing_gives_up_after_the_policy_s_attempts() -> None:
    retry = RetryPolicy(max_attempts=3, initial_delay=1, jitter=False)
    async with Scenario(LedgerSaga, state=Ledger, retry=retry) as scenario:
        scenario.fail(Post, error=OSError("down"))
        await scenario.when(Entry("a"))
        await scenario.advance(timedelta(minutes=1))
        assert scenario.state == Ledger(["a: OSError: down (3)"])


@pytest.mark.anyio
async def test_a_failed_compensation_stops_its_chain_and_the_instance() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        scenario.fail(ReleaseStock)
        await scenario.given(PLACED)
        await scenario.advance(timedelta(minutes=30))
        assert scenario.compensations == [ReleaseStock("o-1")]
        assert scenario.status == COMPENSATION_FAILED
        assert [(d.kind, d.type_name.rpartition(".")[2]) for d in scenario.dead_letters] == [
            ("compensate", "ReleaseStock")
        ]


@pytest.mark.anyio
async def test_a_command_failure_without_a_handler_is_a_dead_letter() -> None:
    async with Scenario(TimerSaga, state=Log) as scenario:
        scenario.fail(Notify)
        await scenario.given(Start("t"))
        await scenario.advance(15)
        assert scenario.sent == [Notify("due")]
        assert [d.kind for d in scenario.dead_letters] == ["send"]


@pytest.mark.anyio
async def test_an_event_for_no_live_instance_is_unmatched() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.when(PaymentCaptured("o-9"))
        assert scenario.unmatched == [
            Unmatched(
                PaymentCaptured("o-9"),
                "OrderSaga",
                "o-9",
                "no live instance and the handler is not start=True",
            )
        ]
        scenario.expect_unmatched()
        scenario.expect_unmatched(PaymentCaptured("o-9"))
        assert (scenario.key, scenario.state, scenario.completed) == ("o-9", None, False)


@pytest.mark.anyio
async def test_an_event_after_completion_is_unmatched() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.given(PLACED, PaymentCaptured("o-1"))
        await scenario.when(PaymentCaptured("o-1"))
        scenario.expect_unmatched(PaymentCaptured("o-1"))
        scenario.expect_sent()


@pytest.mark.anyio
async def test_a_given_event_that_matches_no_instance_fails_the_step() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        with pytest.raises(AssertionError) as raised:
            await scenario.given(PaymentCaptured("o-1"))
        assert str(raised.value) == (
            "saga 'OrderSaga' key 'o-1', after given(PaymentCaptured(order_id='o-1')): "
            "the given event PaymentCaptured(order_id='o-1') matched no instance of saga "
            "'OrderSaga' key 'o-1': no live instance and the handler is not start=True"
        )


@pytest.mark.anyio
async def test_a_redelivered_event_with_the_same_id_is_applied_once() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        await scenario.when(PLACED, id="e-1")
        await scenario.when(PLACED, id="e-1")
        assert scenario.sent == []
        assert scenario.runtime.statistics().events_duplicate == 1


class InstantSaga:
    @correlate
    def key(self, event: Start) -> str:
        return event.key

    @on(Start, start=True)
    def start(self, log: Log, event: Start) -> Complete:
        log.seen.append("started")
        return Complete()


@pytest.mark.anyio
async def test_an_instance_that_completes_at_once_counts_as_completed() -> None:
    async with Scenario(InstantSaga, state=Log) as scenario:
        await scenario.when(Start("k"))
        assert (scenario.completed, scenario.state, scenario.sent) == (True, None, [])
        scenario.expect_completed()
        await scenario.when(Start("k"))  # a new instance starts, and completes again
        assert scenario.completed


class BrokenSaga:
    @correlate
    def key(self, event: Start) -> str:
        return event.key

    @on(Start, start=True)
    def start(self, log: Log, event: Start) -> None:
        raise ValueError(f"cannot start {event.key}")


@pytest.mark.anyio
async def test_a_handler_that_fails_fails_the_step_with_its_exception() -> None:
    async with Scenario(BrokenSaga, state=Log) as scenario:
        with pytest.raises(AssertionError) as raised:
            await scenario.when(Start("k"))
        assert str(raised.value) == (
            "saga 'BrokenSaga' key 'k', after when(Start(key='k')): a handler failed for good:\n"
            "  saga 'BrokenSaga' key 'k': handler start raised on Start(key='k'): "
            "ValueError: cannot start k\n"
            "(pass raise_errors=False to Scenario to check scenario.dead_letters instead)"
        )
        assert isinstance(raised.value.__cause__, ValueError)


@pytest.mark.anyio
async def test_with_raise_errors_off_a_failing_handler_dead_letters_its_event() -> None:
    async with Scenario(BrokenSaga, state=Log, raise_errors=False) as scenario:
        await scenario.when(Start("k"))
        assert [(d.kind, d.key, d.error) for d in scenario.dead_letters] == [
            ("event", "k", "ValueError: cannot start k")
        ]


@attrs.frozen
class Audit:
    order_id: str


class AuditSaga:
    @correlate
    def order_id(self, event: OrderPlaced) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, log: Log, event: OrderPlaced) -> list[Any]:
        return [Send(Audit(event.order_id)), Complete()]


two_sagas = Registry()
two_sagas.register(OrderSaga(), state=Order)
two_sagas.register(AuditSaga(), state=Log)


@pytest.mark.anyio
async def test_a_registry_scenario_runs_every_saga_and_checks_the_one_named() -> None:
    async with Scenario(two_sagas, saga="OrderSaga") as scenario:
        await scenario.when(PLACED)
        assert scenario.sent == [RESERVE]
        assert sorted((d.meta.saga, repr(d.command)) for d in scenario.dispatched) == [
            ("AuditSaga", repr(Audit("o-1"))),
            ("OrderSaga", repr(RESERVE)),
        ]
    async with Scenario(two_sagas, saga="AuditSaga") as scenario:
        await scenario.when(PLACED)
        assert (scenario.sent, scenario.completed) == ([Audit("o-1")], True)


@pytest.mark.anyio
async def test_a_registry_with_one_saga_needs_no_name() -> None:
    async with Scenario(registry) as scenario:
        await scenario.when(PLACED)
        assert scenario.sent == [RESERVE]


class PricingSaga:
    """A saga object with a collaborator."""

    def __init__(self, rate: int) -> None:
        self.rate = rate

    @correlate
    def order_id(self, event: OrderPlaced) -> str:
        return event.order_id

    @on(OrderPlaced, start=True)
    def placed(self, order: Order, event: OrderPlaced) -> None:
        order.amount = event.amount * self.rate


@pytest.mark.anyio
async def test_a_saga_object_keeps_its_collaborators() -> None:
    async with Scenario(PricingSaga(rate=3), state=Order, saga="pricing") as scenario:
        await scenario.when(OrderPlaced("o-1", 5))
        assert (scenario.saga, scenario.state) == ("pricing", Order(amount=15))


@pytest.mark.anyio
async def test_messages_puts_local_command_classes_on_the_allow_list() -> None:
    @attrs.frozen
    class Local:
        key: str

    class LocalSaga:
        @correlate
        def key(self, event: Start) -> str:
            return event.key

        @on(Start, start=True)
        def start(self, log: Log, event: Start) -> Send[Local]:
            return Send(Local(event.key))

    async with Scenario(LocalSaga(), state=Log) as scenario:
        with pytest.raises(AssertionError, match="not on sagaflow's type allow-list"):
            await scenario.when(Start("k"))
    async with Scenario(LocalSaga(), state=Log, messages=[Local]) as scenario:
        await scenario.when(Start("k"))
        assert scenario.sent == [Local("k")]


@pytest.mark.anyio
async def test_command_failed_is_not_published_but_simulated() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        with pytest.raises(TypeError, match=r"scenario\.fail\(CommandType\)"):
            await scenario.when(CommandFailed(RESERVE, "RuntimeError: no", 1))


@pytest.mark.anyio
async def test_steps_need_a_running_scenario_which_runs_once() -> None:
    scenario = Scenario(OrderSaga, state=Order)
    with pytest.raises(RuntimeClosedError, match="async with Scenario"):
        await scenario.when(PLACED)
    async with scenario:
        pass
    with pytest.raises(RuntimeError, match="runs once"):
        async with scenario:
            pass


@pytest.mark.anyio
async def test_time_cannot_go_back() -> None:
    async with Scenario(OrderSaga, state=Order) as scenario:
        with pytest.raises(ValueError, match="time only moves forward"):
            await scenario.advance(-1)


def test_construction_errors_say_what_to_pass() -> None:
    with pytest.raises(TypeError, match=r"Scenario\(OrderSaga, state=\.\.\.\)"):
        Scenario(OrderSaga)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="the registry knows each saga's state"):
        Scenario(registry, state=Order)
    with pytest.raises(ValueError, match=r"2 sagas \(AuditSaga, OrderSaga\); pass saga="):
        Scenario(two_sagas)
    with pytest.raises(LookupError, match="no saga named 'Nope'"):
        Scenario(two_sagas, saga="Nope")
    with pytest.raises(TypeError, match=r"pass an instance instead: Scenario\(PricingSaga"):
        Scenario(PricingSaga, state=Order)


# -- the sync facade -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sync_scenario_runs_the_same_steps_without_await(backend: str) -> None:
    with SyncScenario(OrderSaga, state=Order, backend=backend) as scenario:
        scenario.given(PLACED)
        scenario.fail(ReleaseStock, times=1)
        scenario.advance(timedelta(minutes=10))
        assert scenario.sent == [RemindCustomer("o-1", 1)]
        scenario.when(PaymentCaptured("o-1"))
        scenario.expect_sent(ShipOrder("o-1"))
        scenario.expect_completed()
        assert repr(scenario) == (
            "<SyncScenario saga 'OrderSaga' key 'o-1', after when(PaymentCaptured(order_id='o-1'))>"
        )


def test_sync_scenario_from_a_registry_and_its_errors() -> None:
    with SyncScenario(two_sagas, saga="AuditSaga") as scenario:
        scenario.when(PLACED)
        with pytest.raises(AssertionError, match="the commands sent differ"):
            scenario.expect_sent()
    with pytest.raises(RuntimeError, match="with SyncScenario"):
        scenario.when(PLACED)


# -- failure messages ---------------------------------------------------------------


@pytest.fixture
def placed() -> Any:
    with SyncScenario(OrderSaga, state=Order) as scenario:
        scenario.when(PLACED)
        yield scenario


HEAD = "saga 'OrderSaga' key 'o-1', after when(OrderPlaced(order_id='o-1', amount=120))"


def message(excinfo: pytest.ExceptionInfo[AssertionError]) -> str:
    return str(excinfo.value)


def test_expect_sent_shows_expected_and_actual_side_by_side(placed: Any) -> None:
    with pytest.raises(AssertionError) as raised:
        placed.expect_sent(ReserveStock("o-1", 100), ShipOrder("o-1"))
    assert message(raised) == (
        f"{HEAD}: the commands sent differ\n"
        "    expected                                  actual\n"
        "  ! ReserveStock(order_id='o-1', amount=100)  ReserveStock(order_id='o-1', amount=120)\n"
        "  ! ShipOrder(order_id='o-1')                 -"
    )


def test_expect_sent_in_any_order_lines_up_what_matches(placed: Any) -> None:
    placed.expect_sent(RESERVE, ordered=False)
    with pytest.raises(AssertionError) as raised:
        placed.expect_sent(ShipOrder("o-1"), RESERVE, ordered=False)
    assert message(raised) == (
        f"{HEAD}: the commands sent differ (in any order)\n"
        "    expected                                  actual\n"
        "    ReserveStock(order_id='o-1', amount=120)  ReserveStock(order_id='o-1', amount=120)\n"
        "  ! ShipOrder(order_id='o-1')                 -"
    )


def test_expect_state_compares_field_by_field(placed: Any) -> None:
    with pytest.raises(AssertionError) as raised:
        placed.expect_state(Order(status="paid", amount=120))
    assert message(raised) == (
        f"{HEAD}: the state differs\n"
        "    expected       actual\n"
        "  ! status='paid'  status='placed'\n"
        "    amount=120     amount=120\n"
        "    reminders=0    reminders=0"
    )
    with pytest.raises(AssertionError) as raised:
        placed.expect_state(amount=1, colour="red")
    assert message(raised) == (
        f"{HEAD}: the state differs\n"
        "    expected      actual\n"
        "  ! amount=1      amount=120\n"
        "  ! colour='red'  colour=(no such field)"
    )


def test_expect_scheduled_shows_what_is_pending(placed: Any) -> None:
    with pytest.raises(AssertionError) as raised:
        placed.expect_scheduled("ship")
    assert message(raised) == (
        f"{HEAD}: no schedule named 'ship' is pending\n"
        "    expected  actual\n"
        "  ! 'ship'    'remind', 'payment'"
    )
    with pytest.raises(AssertionError) as raised:
        placed.expect_scheduled(
            "payment", due=timedelta(minutes=20), message=PaymentTimedOut("o-1")
        )
    assert message(raised) == (
        f"{HEAD}: schedule 'payment' differs\n"
        "    expected                                 actual\n"
        "  ! due=0:20:00                              due=0:30:00\n"
        "    message=PaymentTimedOut(order_id='o-1')  message=PaymentTimedOut(order_id='o-1')"
    )
    with pytest.raises(AssertionError, match=r"schedule 'remind' is pending"):
        placed.expect_unscheduled("remind")


def test_expect_completed_and_active_say_where_the_instance_stands(placed: Any) -> None:
    with pytest.raises(AssertionError) as raised:
        placed.expect_completed()
    assert message(raised) == f"{HEAD}: expected the instance to have completed, but it is active"
    placed.when(PaymentCaptured("o-1"))
    with pytest.raises(AssertionError) as raised:
        placed.expect_active()
    assert message(raised) == (
        "saga 'OrderSaga' key 'o-1', after when(PaymentCaptured(order_id='o-1')): expected the "
        "instance to be active, but it is completed and ended (its state is deleted)"
    )
    with pytest.raises(AssertionError, match="no state is stored: the instance is completed"):
        placed.expect_state(status="paid")


def test_expect_compensations_and_unmatched(placed: Any) -> None:
    with pytest.raises(AssertionError) as raised:
        placed.expect_compensations(CancelOrder("o-1"))
    assert message(raised) == (
        f"{HEAD}: the compensations differ\n"
        "    expected                     actual\n"
        "  ! CancelOrder(order_id='o-1')  -"
    )
    with pytest.raises(AssertionError) as raised:
        placed.expect_unmatched()
    assert message(raised) == (
        f"{HEAD}: expected an unmatched event, but every event found its instance"
    )


def test_before_any_step_the_message_says_so() -> None:
    with SyncScenario(OrderSaga, state=Order) as scenario, pytest.raises(AssertionError) as raised:
        scenario.expect_completed()
    assert message(raised) == (
        "saga 'OrderSaga', before any step: expected the instance to have completed, "
        "but it is not started"
    )


# -- a full runtime on a virtual clock --------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A fresh store of each kind that needs no server."""
    if request.param == "sqlite":
        return SQLiteStore(tmp_path / "sagas.db")
    return MemoryStore()


@pytest.mark.anyio
async def test_advance_drives_a_full_runtime_through_its_timeouts(any_store: Store) -> None:
    clock = VirtualClock()
    recorder = Recorder()
    store = any_store
    async with Runtime(registry, store=store, dispatch=recorder, clock=clock) as runtime:
        await runtime.publish(PLACED)
        await runtime.drain()
        assert recorder.delivered == [RESERVE]
        await advance(runtime, clock, timedelta(minutes=30))
        assert recorder.delivered == [
            RESERVE,
            RemindCustomer("o-1", 1),
            RemindCustomer("o-1", 2),
            ReleaseStock("o-1"),
            CancelOrder("o-1"),
        ]
        assert [c.meta.kind for c in recorder.calls][-2:] == ["compensate", "compensate"]
        assert clock.now() == VirtualClock().now() + 1800
        assert await store.list_instances() == []


@pytest.mark.anyio
async def test_recorder_fails_what_it_is_told_to_then_lets_it_through() -> None:
    recorder = Recorder()
    recorder.fail(ShipOrder, times=1)
    meta = sagaflow.DispatchMeta("c-1", "OrderSaga", "o-1", 1, "send")
    with pytest.raises(RuntimeError, match=r"^ShipOrder failed \(Recorder\.fail\)$"):
        await recorder(ShipOrder("o-1"), meta)
    await recorder(ShipOrder("o-1"), meta)
    assert recorder.calls == [
        sagaflow.testing.Dispatched(
            ShipOrder("o-1"), meta, "RuntimeError: ShipOrder failed (Recorder.fail)"
        ),
        sagaflow.testing.Dispatched(ShipOrder("o-1"), meta),
    ]
    assert recorder.delivered == [ShipOrder("o-1")]
    with pytest.raises(ValueError, match="at least 1"):
        recorder.fail(ShipOrder, times=0)
    with pytest.raises(TypeError, match="command class or a predicate"):
        recorder.fail("ShipOrder")  # type: ignore[arg-type]


def test_every_public_name_exists_and_has_a_docstring() -> None:
    for name in sagaflow.testing.__all__:
        obj = getattr(sagaflow.testing, name)
        assert obj.__doc__, name
    assert sorted(sagaflow.testing.__all__) == sagaflow.testing.__all__
    assert sagaflow.testing.VirtualClock is sagaflow._clock.VirtualClock


def test_no_real_time_passes() -> None:
    """A scenario of a day of virtual time takes no real sleep (the clock is virtual)."""
    with SyncScenario(OrderSaga, state=Order) as scenario:
        scenario.given(PLACED)
        scenario.advance(timedelta(days=1))
        assert scenario.elapsed == timedelta(days=1)


@pytest.mark.anyio
async def test_advance_stops_at_each_retry_of_a_command_at_its_own_due_time() -> None:
    clock = VirtualClock()
    start = clock.now()
    attempts: list[tuple[int, float]] = []

    async def dispatch(command: object, meta: sagaflow.DispatchMeta) -> None:
        if isinstance(command, ReserveStock):
            attempts.append((meta.attempt, clock.now() - start))
            raise RuntimeError("down")

    retry = RetryPolicy(max_attempts=4, initial_delay=1, jitter=False)
    store = MemoryStore()
    async with Runtime(registry, store=store, dispatch=dispatch, clock=clock, retry=retry) as rt:
        await rt.publish(PLACED)
        await advance(rt, clock, 9)
        assert attempts == [(1, 0), (2, 1), (3, 3), (4, 7)]
        assert clock.now() - start == 9


class FlakySaga:
    """Its start handler raises the first `fails` times, and is retried after 5 seconds."""

    def __init__(self, fails: int) -> None:
        self.fails = fails

    @correlate
    def key(self, event: Start) -> str:
        return event.key

    @on(Start, start=True, retry=RetryPolicy(max_attempts=3, initial_delay=5, jitter=False))
    def start(self, log: Log, event: Start) -> Send[Notify]:
        if self.fails:
            self.fails -= 1
            raise ConnectionError("flaky")
        log.seen.append("started")
        return Send(Notify(event.key))


@pytest.mark.anyio
async def test_a_handler_retry_waits_for_virtual_time_without_blocking_the_step() -> None:
    async with Scenario(FlakySaga(fails=2), state=Log) as scenario:
        await scenario.when(Start("k"))
        assert (scenario.state, scenario.sent) == (None, [])
        await scenario.advance(5)
        assert (scenario.state, scenario.sent) == (None, [])
        await scenario.advance(10)
        assert (scenario.state, scenario.sent) == (Log(["started"]), [Notify("k")])
        assert scenario.runtime.statistics().handler_retries == 2


@pytest.mark.anyio
async def test_leaving_a_scenario_abandons_an_event_waiting_for_a_handler_retry() -> None:
    async with Scenario(FlakySaga(fails=1), state=Log) as scenario:
        await scenario.when(Start("k"))
    assert scenario.state is None


@pytest.mark.anyio
async def test_a_failing_check_inside_a_scenario_propagates_unchanged() -> None:
    with pytest.raises(AssertionError, match="the commands sent differ"):
        async with Scenario(OrderSaga, state=Order) as scenario:
            await scenario.when(PLACED)
            scenario.expect_sent()


def test_a_failing_check_inside_a_sync_scenario_propagates_unchanged() -> None:
    with (
        pytest.raises(AssertionError, match="the commands sent differ"),
        SyncScenario(OrderSaga, state=Order) as scenario,
    ):
        scenario.when(PLACED)
        scenario.expect_sent()


class BadKeySaga:
    @correlate
    def key(self, event: Start) -> Any:
        return 42

    @on(Start, start=True)
    def start(self, log: Log, event: Start) -> None:
        return None


@pytest.mark.anyio
async def test_a_correlate_function_that_returns_a_non_str_fails_the_step() -> None:
    async with Scenario(BadKeySaga, state=Log) as scenario:
        with pytest.raises(TypeError, match="it must return a str key or None"):
            await scenario.when(Start("k"))


# -- associations and fan-out ----------------------------------------------------------


@attrs.frozen
class ShipmentCreated:
    order_id: str
    shipment_id: str


@attrs.frozen
class ShipmentDelivered:
    shipment_id: str


@attrs.frozen
class CustomerBlocked:
    customer_id: str


@attrs.define
class Shipment:
    order_id: str = ""
    status: str = "new"


class ShippingSaga:
    @correlate(OrderPlaced, ShipmentCreated)
    def order_id(self, event: OrderPlaced | ShipmentCreated) -> str:
        return event.order_id

    @correlate(ShipmentDelivered, via="shipment")
    def shipment(self, event: ShipmentDelivered) -> str:
        return event.shipment_id

    @correlate(CustomerBlocked, via="customer")
    def customer(self, event: CustomerBlocked) -> str:
        return event.customer_id

    @on(OrderPlaced, start=True)
    def placed(self, state: Shipment, event: OrderPlaced) -> None:
        state.order_id = event.order_id

    @on(ShipmentCreated)
    def created(self, state: Shipment, event: ShipmentCreated) -> Any:
        state.status = "shipped"
        return Associate("shipment", event.shipment_id)

    @on(ShipmentDelivered)
    def delivered(self, state: Shipment, event: ShipmentDelivered) -> Any:
        state.status = "delivered"
        return [Dissociate("shipment", event.shipment_id), Complete()]

    @on(CustomerBlocked)
    def blocked(self, state: Shipment, event: CustomerBlocked) -> Any:
        state.status = "blocked"
        return Send(CancelOrder(state.order_id))


@pytest.mark.anyio
async def test_an_event_via_an_association_checks_the_instance_it_reached() -> None:
    """`Associate` and `Dissociate` show in `associations`; the key checked after an
    event routed via an association is the instance it reached."""
    async with Scenario(ShippingSaga, state=Shipment) as scenario:
        await scenario.given(OrderPlaced("o-1", 10), OrderPlaced("o-2", 20))
        await scenario.when(ShipmentCreated("o-1", "s-9"))
        assert scenario.associations == {("shipment", "s-9")}
        scenario.expect_associated("shipment", "s-9")

        await scenario.when(OrderPlaced("o-3", 30))  # the key moves on
        await scenario.when(ShipmentDelivered("s-9"))

        assert (scenario.key, scenario.reached) == ("o-1", ["o-1"])
        scenario.expect_completed()
        scenario.expect_dissociated("shipment", "s-9")


@pytest.mark.anyio
async def test_given_associations_and_an_event_that_fans_out_to_them() -> None:
    async with Scenario(ShippingSaga, state=Shipment) as scenario:
        await scenario.given(OrderPlaced("o-1", 10), OrderPlaced("o-2", 20), OrderPlaced("o-3", 5))
        await scenario.given_association("o-1", "customer", "c-7")
        await scenario.given_association("o-3", "customer", "c-7")

        await scenario.when(CustomerBlocked("c-7"))

        scenario.expect_reached("o-1", "o-3")
        scenario.expect_sent(CancelOrder("o-1"), CancelOrder("o-3"), ordered=False)
        assert {k: s.status for k, s in scenario.states.items()} == {
            "o-1": "blocked",
            "o-2": "new",
            "o-3": "blocked",
        }


def test_a_sync_scenario_takes_given_associations_too() -> None:
    with SyncScenario(ShippingSaga, state=Shipment) as scenario:
        scenario.given(OrderPlaced("o-1", 10))
        scenario.given_association("o-1", "customer", "c-7")
        scenario.when(CustomerBlocked("c-7"))

        scenario.expect_reached("o-1")
        scenario.expect_sent(CancelOrder("o-1"))


@pytest.mark.anyio
async def test_an_event_no_instance_is_associated_with_is_unmatched() -> None:
    async with Scenario(ShippingSaga, state=Shipment) as scenario:
        await scenario.given(OrderPlaced("o-1", 10))

        await scenario.when(CustomerBlocked("c-7"))

        assert scenario.unmatched == [
            Unmatched(
                CustomerBlocked("c-7"),
                "ShippingSaga",
                None,
                "no instance is associated with customer='c-7'",
            )
        ]
        assert scenario.reached == []


@pytest.mark.anyio
async def test_fan_out_and_association_checks_say_what_differs() -> None:
    async with Scenario(ShippingSaga, state=Shipment) as scenario:
        await scenario.given(OrderPlaced("o-1", 10), OrderPlaced("o-2", 20))
        await scenario.given_association("o-1", "customer", "c-7")
        await scenario.when(CustomerBlocked("c-7"))

        with pytest.raises(AssertionError) as reached:
            scenario.expect_reached("o-1", "o-2")
        with pytest.raises(AssertionError) as associated:
            scenario.expect_associated("shipment", "s-1")
        with pytest.raises(AssertionError) as dissociated:
            scenario.expect_dissociated("customer", "c-7")

    where = "saga 'ShippingSaga' key 'o-1', after when(CustomerBlocked(customer_id='c-7'))"
    assert str(reached.value) == (
        f"{where}: the event reached other instances\n"
        "    expected  actual\n"
        "    'o-1'     'o-1'\n"
        "  ! 'o-2'     -"
    )
    assert str(associated.value) == (
        f"{where}: the instance is not associated with shipment='s-1'\n"
        "    expected        actual\n"
        "  ! shipment='s-1'  customer='c-7'"
    )
    assert str(dissociated.value) == (
        f"{where}: the instance is still associated with customer='c-7'\n"
        "    expected            actual\n"
        "  ! not customer='c-7'  customer='c-7'"
    )


@pytest.mark.anyio
async def test_a_given_association_needs_an_instance() -> None:
    async with Scenario(ShippingSaga, state=Shipment) as scenario:
        with pytest.raises(AssertionError, match="no instance of saga 'ShippingSaga' has key"):
            await scenario.given_association("o-1", "customer", "c-7")
        with pytest.raises(TypeError, match="value must be a str, got 7"):
            await scenario.given_association("o-1", "customer", 7)  # type: ignore[arg-type]
