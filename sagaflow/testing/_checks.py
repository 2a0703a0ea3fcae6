"""What a scenario shows after a step, and the `expect_*` checks over it."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Generic, NoReturn, TypeVar

import attrs

from .. import Unmatched
from ..stores import ACTIVE, COMPENSATION_FAILED, DeadLetter, InstanceRecord
from ._recorder import Dispatched
from ._report import fields_of, side_by_side, table

__all__ = ["Checks", "Scheduled", "View"]

S = TypeVar("S")


class _Missing(enum.Enum):
    MISSING = enum.auto()


MISSING = _Missing.MISSING


@attrs.frozen
class Scheduled:
    """A pending schedule of an instance, as a scenario shows it.

    Attributes:
        name: The schedule's name; `None` for an unnamed one.
        due: When it falls due, counted from the start of the scenario (compare
            `Scenario.elapsed`).
        message: The command it dispatches or, with `to_self`, the event it delivers.
        to_self: Delivered to the instance itself instead of dispatched.
    """

    name: str | None
    due: timedelta
    message: object
    to_self: bool = False


@attrs.frozen
class View(Generic[S]):
    """A snapshot of the outcome of a scenario's last step."""

    saga: str
    key: str | None = None
    step: str | None = None
    elapsed: timedelta = timedelta(0)
    dispatched: tuple[Dispatched, ...] = ()
    unmatched: tuple[Unmatched, ...] = ()
    records: Mapping[str, InstanceRecord] = attrs.field(factory=dict)
    states: Mapping[str, S] = attrs.field(factory=dict)
    schedules: Mapping[str, tuple[Scheduled, ...]] = attrs.field(factory=dict)
    dead_letters: tuple[DeadLetter, ...] = ()
    ended: frozenset[str] = frozenset()
    reached: tuple[str, ...] = ()
    associations: Mapping[str, frozenset[tuple[str, str]]] = attrs.field(factory=dict)

    def where(self) -> str:
        """Names the saga, the key and the last step, for the head of a failure message."""
        key = "" if self.key is None else f" key {self.key!r}"
        step = "before any step" if self.step is None else f"after {self.step}"
        return f"saga {self.saga!r}{key}, {step}"

    def commands(self, kind: str) -> list[object]:
        """The commands of this saga dispatched in the step, each once, in order."""
        seen: set[str] = set()
        out = []
        for d in self.dispatched:
            meta = d.meta
            if meta.saga == self.saga and meta.kind == kind and meta.id not in seen:
                seen.add(meta.id)
                out.append(d.command)
        return out

    def describe(self) -> str:
        """Where the instance of `key` stands, in words."""
        record = None if self.key is None else self.records.get(self.key)
        if record is not None:
            if record.status == ACTIVE:
                return "active"
            if record.status == COMPENSATION_FAILED:
                return "stopped: a compensation failed for good"
            return "completed, with commands still to dispatch"
        if self.key in self.ended:
            return "completed and ended (its state is deleted)"
        return "not started"


class Checks(Generic[S]):
    """The outcome of the last step as plain values, and `expect_*` checks over it.

    Step results (`dispatched`, `sent`, `compensations`, `unmatched`) cover the last
    `when` or `advance` only; `given` leaves them empty. The rest shows the present.
    """

    def _view(self) -> View[S]:
        raise NotImplementedError

    @property
    def saga(self) -> str:
        """The name of the saga under test."""
        return self._view().saga

    @property
    def key(self) -> str | None:
        """The key of the instance checked: the last one an event was given or sent to."""
        return self._view().key

    @property
    def elapsed(self) -> timedelta:
        """Virtual time since the scenario started."""
        return self._view().elapsed

    @property
    def dispatched(self) -> list[Dispatched]:
        """Every dispatcher call of the last step, of any saga, failed ones included."""
        return list(self._view().dispatched)

    @property
    def sent(self) -> list[object]:
        """Commands the saga sent in the last step (`Send` and due `Schedule`), in order.

        A command is listed once, even if it was retried, and also if it failed.
        """
        return self._view().commands("send")

    @property
    def compensations(self) -> list[object]:
        """Compensating commands the saga dispatched in the last step, in order."""
        return self._view().commands("compensate")

    @property
    def unmatched(self) -> list[Unmatched]:
        """Events of the last step that reached a saga but no instance that took them."""
        return list(self._view().unmatched)

    @property
    def state(self) -> S | None:
        """The stored state of the instance; `None` if none is stored (not started, or
        completed and ended)."""
        view = self._view()
        return None if view.key is None else view.states.get(view.key)

    @property
    def states(self) -> dict[str, S]:
        """The stored states of all instances of the saga, by key."""
        return dict(self._view().states)

    @property
    def status(self) -> str | None:
        """The stored status of the instance (`"active"`, `"completing"` or
        `"compensation_failed"`), or `None` if none is stored."""
        view = self._view()
        record = None if view.key is None else view.records.get(view.key)
        return None if record is None else record.status

    @property
    def completed(self) -> bool:
        """Whether the instance returned `Complete()` (whether or not it has ended yet)."""
        view = self._view()
        if view.key is None:
            return False
        record = view.records.get(view.key)
        return record.completed if record is not None else view.key in view.ended

    @property
    def reached(self) -> list[str]:
        """Keys of the saga's instances that handled the event of the last `when`, in
        the order they handled it: one for an event correlated by key, every instance
        associated with the value for one correlated `via=` an association (fan-out)."""
        return list(self._view().reached)

    @property
    def associations(self) -> set[tuple[str, str]]:
        """The stored associations of the instance, as `(name, value)` pairs (what its
        handlers returned `Associate` for, and not `Dissociate` since)."""
        view = self._view()
        return set() if view.key is None else set(view.associations.get(view.key, ()))

    @property
    def scheduled(self) -> list[Scheduled]:
        """The pending schedules of the instance, by due time."""
        view = self._view()
        return [] if view.key is None else list(view.schedules.get(view.key, ()))

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """The saga's dead letters: commands that failed for good without a
        `CommandFailed` handler, failed compensations, events that could not be handled."""
        return list(self._view().dead_letters)

    def _fail(self, what: str, detail: str = "") -> NoReturn:
        __tracebackhide__ = True
        message = f"{self._view().where()}: {what}"
        raise AssertionError(f"{message}\n{detail}" if detail else message)

    def expect_sent(self, *commands: object, ordered: bool = True) -> None:
        """Check the commands the saga sent in the last step: exactly these.

        Args:
            *commands: The commands expected; none means "nothing was sent".
            ordered: Compare in order (the default) or as a multiset.

        Raises:
            AssertionError: They differ; the message shows both side by side.
        """
        __tracebackhide__ = True
        expected, actual = list(commands), self.sent
        if ordered and expected != actual:
            self._fail("the commands sent differ", side_by_side(expected, actual))
        if not ordered and not _same_items(expected, actual):
            detail = side_by_side(expected, actual, ordered=False)
            self._fail("the commands sent differ (in any order)", detail)

    def expect_compensations(self, *commands: object) -> None:
        """Check the compensating commands dispatched in the last step, in order.

        Raises:
            AssertionError: They differ; the message shows both side by side.
        """
        __tracebackhide__ = True
        expected, actual = list(commands), self.compensations
        if expected != actual:
            self._fail("the compensations differ", side_by_side(expected, actual))

    def expect_scheduled(
        self,
        name: str,
        *,
        due: timedelta | float | None = None,
        message: object = MISSING,
    ) -> None:
        """Check that a schedule of this name is pending, optionally its due time and message.

        Args:
            name: The schedule's name.
            due: When it falls due, counted from the start of the scenario (a
                `timedelta` or seconds).
            message: The message it will deliver.

        Raises:
            AssertionError: None is pending, or it differs.
        """
        __tracebackhide__ = True
        pending = self.scheduled
        found = next((s for s in pending if s.name == name), None)
        if found is None:
            rows = [(repr(name), ", ".join(repr(s.name) for s in pending) or "-", False)]
            self._fail(f"no schedule named {name!r} is pending", table(rows))
        rows = []
        if due is not None:
            want = due if isinstance(due, timedelta) else timedelta(seconds=due)
            rows.append((f"due={want}", f"due={found.due}", want == found.due))
        if message is not MISSING:
            rows.append(
                (f"message={message!r}", f"message={found.message!r}", message == found.message)
            )
        if not all(same for _, _, same in rows):
            self._fail(f"schedule {name!r} differs", table(rows))

    def expect_unscheduled(self, name: str) -> None:
        """Check that no schedule of this name is pending.

        Raises:
            AssertionError: One is.
        """
        __tracebackhide__ = True
        found = next((s for s in self.scheduled if s.name == name), None)
        if found is not None:
            self._fail(f"schedule {name!r} is pending", table([("-", repr(found), False)]))

    def expect_state(self, expected: object = MISSING, /, **fields: object) -> None:
        """Check the stored state of the instance: equal to `expected`, and/or fields.

        `expect_state(Order(status="paid", amount=120))` compares the whole state;
        `expect_state(status="paid")` only the fields named.

        Raises:
            AssertionError: No state is stored, or it differs (field by field).
        """
        __tracebackhide__ = True
        state = self.state
        if state is None:
            self._fail(f"no state is stored: the instance is {self._view().describe()}")
        rows: list[tuple[str, str, bool]] = []
        if expected is not MISSING and expected != state:
            want, have = fields_of(expected), fields_of(state)
            if want is None or have is None or type(expected) is not type(state):
                rows.append((repr(expected), repr(state), False))
            else:
                rows += [(f"{k}={v!r}", f"{k}={have[k]!r}", v == have[k]) for k, v in want.items()]
        for k, v in fields.items():
            actual = getattr(state, k, MISSING)
            shown = "(no such field)" if actual is MISSING else repr(actual)
            rows.append((f"{k}={v!r}", f"{k}={shown}", v == actual))
        if not all(same for _, _, same in rows):
            self._fail("the state differs", table(rows))

    def expect_completed(self) -> None:
        """Check that the instance returned `Complete()`.

        Raises:
            AssertionError: It did not.
        """
        __tracebackhide__ = True
        if not self.completed:
            self._fail(
                f"expected the instance to have completed, but it is {self._view().describe()}"
            )

    def expect_active(self) -> None:
        """Check that the instance exists and takes events.

        Raises:
            AssertionError: It does not.
        """
        __tracebackhide__ = True
        if self.status != ACTIVE:
            self._fail(f"expected the instance to be active, but it is {self._view().describe()}")

    def expect_reached(self, *keys: str) -> None:
        """Check which instances the event of the last `when` reached: exactly these
        keys, in any order (for an event routed via an association, every instance
        associated with its value: fan-out).

        Raises:
            AssertionError: It reached others; the message shows both side by side.
        """
        __tracebackhide__ = True
        expected, actual = sorted(keys), sorted(self.reached)
        if expected != actual:
            detail = side_by_side(expected, actual, ordered=False)
            self._fail("the event reached other instances", detail)

    def expect_associated(self, name: str, value: str) -> None:
        """Check that the instance is associated with `name` = `value`.

        Raises:
            AssertionError: It is not; the message lists its associations.
        """
        __tracebackhide__ = True
        if (name, value) not in self.associations:
            self._fail(
                f"the instance is not associated with {name}={value!r}",
                self._associations_table(name, value, present=True),
            )

    def expect_dissociated(self, name: str, value: str) -> None:
        """Check that the instance is not (or no longer) associated with `name` = `value`.

        Raises:
            AssertionError: It is; the message lists its associations.
        """
        __tracebackhide__ = True
        if (name, value) in self.associations:
            self._fail(
                f"the instance is still associated with {name}={value!r}",
                self._associations_table(name, value, present=False),
            )

    def _associations_table(self, name: str, value: str, *, present: bool) -> str:
        have = sorted(self.associations)
        shown = ", ".join(f"{n}={v!r}" for n, v in have) or "none"
        want = f"{name}={value!r}" if present else f"not {name}={value!r}"
        return table([(want, shown, False)])

    def expect_unmatched(self, event: object = MISSING) -> None:
        """Check that an event of the last step (or this one) matched no instance.

        Raises:
            AssertionError: None (or not this one) was unmatched.
        """
        __tracebackhide__ = True
        events = [u.event for u in self.unmatched]
        if event is MISSING:
            if not events:
                self._fail("expected an unmatched event, but every event found its instance")
        elif event not in events:
            self._fail("the event was not unmatched", side_by_side([event], events))


def _same_items(expected: list[Any], actual: list[Any]) -> bool:
    rest = list(actual)
    for item in expected:
        for i, other in enumerate(rest):
            if other == item:
                del rest[i]
                break
        else:
            return False
    return not rest
