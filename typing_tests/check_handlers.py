"""`@on` and `@correlate` hold user code to what the runtime accepts.

Each `# type: ignore[code]` below marks a mistake mypy must report: `mypy --strict` warns
about an ignore that silences nothing, so the file fails to check if the error goes away.
The `assert_type` calls prove that correct handlers keep their types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, assert_type

import attrs

from sagaflow import (
    CommandFailed,
    Compensate,
    Complete,
    RetryPolicy,
    Schedule,
    Send,
    Unschedule,
    correlate,
    on,
)
from sagaflow.typing import Action, HandlerResult


@attrs.frozen
class Placed:
    order_id: str


@attrs.frozen
class Paid:
    order_id: str


@attrs.frozen
class Cancelled:
    order_id: str


@attrs.frozen
class Ship:
    order_id: str


@attrs.define
class Order:
    status: str = "new"


class Keys:
    @correlate
    def order_id(self, event: Placed | Paid) -> str:
        return event.order_id

    @correlate(Placed, Paid)
    def maybe(self, event: Placed | Paid) -> str | None:
        return event.order_id or None

    @correlate  # type: ignore[type-var]
    def number(self, event: Placed) -> int:
        return len(event.order_id)

    @correlate(Placed)  # type: ignore[type-var]
    def number_called(self, event: Placed) -> int:
        return len(event.order_id)

    @correlate(Placed)  # type: ignore[type-var]
    async def awaited(self, event: Placed) -> str:
        return event.order_id

    @correlate(Paid, Cancelled, reply=True)
    def answers(self, event: Paid | Cancelled) -> str:
        """A reply's correlate function returns the command id it answers."""
        return event.order_id

    @correlate(Paid, reply=True)  # type: ignore[type-var]
    def reply_number(self, event: Paid) -> int:
        return len(event.order_id)


# Correlate functions keep their exact signature.
order_id: Callable[[Keys, Placed | Paid], str] = Keys.order_id
assert_type(Keys().maybe(Paid("o")), str | None)
assert_type(Keys().answers(Cancelled("o")), str)


class Results:
    """Every shape of result the runtime accepts, and the ones it rejects."""

    @on(Placed, start=True)
    def one(self, order: Order, event: Placed) -> Send[Ship]:
        return Send(Ship(event.order_id))

    @on(Placed)
    def each(self, order: Order, event: Placed) -> Schedule[Paid] | Unschedule | None:
        return None

    @on(Placed)
    def several(self, order: Order, event: Placed) -> tuple[Send[Ship], Compensate, Complete]:
        return Send(Ship("o")), Compensate([Ship("o")]), Complete()

    @on(Placed)
    def listed(self, order: Order, event: Placed) -> list[Action]:
        return [Unschedule("payment"), Complete()]

    @on(Placed)
    def generated(self, order: Order, event: Placed) -> Iterator[Send[Ship]]:
        yield Send(Ship(event.order_id))

    @on(Placed)
    def alias(self, order: Order, event: Placed) -> HandlerResult:
        return None

    @on(Placed)
    async def awaited(self, order: Order, event: Placed) -> list[Send[Ship] | Complete]:
        return [Send(Ship(event.order_id)), Complete()]

    @on(Placed)
    def untyped(self, order: Order, event: Placed) -> Any:
        return Complete()

    @on(Placed)  # type: ignore[type-var]
    def bare_command(self, order: Order, event: Placed) -> Ship:
        return Ship(event.order_id)

    @on(Placed)  # type: ignore[type-var]
    def commands(self, order: Order, event: Placed) -> list[Ship]:
        return [Ship(event.order_id)]

    @on(Placed)  # type: ignore[type-var]
    def text(self, order: Order, event: Placed) -> str:
        return "done"

    @on(Placed)  # type: ignore[type-var]
    def action_class(self, order: Order, event: Placed) -> type[Complete]:
        return Complete

    @on(Placed)  # type: ignore[type-var]
    async def awaited_command(self, order: Order, event: Placed) -> Ship:
        return Ship(event.order_id)

    @on(Placed)  # type: ignore[type-var]
    def anything(self, order: Order, event: Placed) -> list[object]:
        return []


class Events:
    """The event parameter must accept every type the handler is declared for."""

    @on(Placed, start=True, retry=RetryPolicy(max_attempts=3))
    def placed(self, order: Order, event: Placed) -> None:
        order.status = "placed"

    @on(Paid, Cancelled, internal=True)
    async def settled(self, order: Order, event: Paid | Cancelled) -> Complete:
        return Complete()

    @on(Placed, Paid, Cancelled)
    def any_of_three(self, order: Order, event: object) -> None:
        pass

    @on(Placed, Paid, Cancelled, Ship, Order, int)
    def six(self, order: Order, event: object) -> None:
        pass

    @on(Placed, Paid, Cancelled, Ship, Order, int, str)
    def seven(self, order: Order, event: str) -> None:
        """Past six types only the shape and result are checked."""

    @on(Paid, Cancelled, late=True)
    def too_late(self, order: Order, event: Paid | Cancelled) -> Send[Ship]:
        return Send(Ship(event.order_id))

    @on(Paid, late=True)  # type: ignore[arg-type]
    def late_wrong_event(self, order: Order, event: Placed) -> None:
        pass

    @on(CommandFailed)
    def failed(self, order: Order, event: CommandFailed[Ship]) -> Compensate:
        assert_type(event.command, Ship)
        return Compensate([Ship(event.command.order_id)])

    @on(Paid)  # type: ignore[arg-type]
    def wrong_event(self, order: Order, event: Placed) -> None:
        pass

    @on(Placed, Paid)  # type: ignore[arg-type]
    def one_of_two(self, order: Order, event: Placed) -> None:
        pass

    @on(Placed, Paid, Cancelled)  # type: ignore[arg-type]
    async def two_of_three(self, order: Order, event: Placed | Paid) -> None:
        pass

    @on(Placed)  # type: ignore[arg-type]
    def missing_state(self, event: Placed) -> None:
        pass

    @on(Placed, Paid, Cancelled, Ship, Order, int, str)  # type: ignore[type-var]
    def seven_wrong_result(self, order: Order, event: object) -> Ship:
        return Ship("o")


# Handlers stay callable as plain methods, so a unit test can call them directly; the
# event parameter is typed as the `@on` types.
assert_type(Events.placed, Callable[[Events, Order, Placed], None])
assert_type(Events().placed(Order(), Placed("o")), None)
assert_type(Events().too_late(Order(), Paid("o")), Send[Ship])
assert_type(Results().one(Order(), Placed("o")), Send[Ship])
assert_type(Results().listed(Order(), Placed("o")), list[Action])
seven: Callable[[Order, str], None] = Events().seven
assert_type(Events().failed(Order(), CommandFailed(Ship("o"), "E: x", 3)), Compensate)


async def call_async_handler() -> None:
    assert_type(await Events().settled(Order(), Cancelled("o")), Complete)
