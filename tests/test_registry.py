"""`Registry`, `@on` and `@correlate`: what registration accepts, and how it fails loudly."""

from __future__ import annotations

import dataclasses
from typing import Any

import attrs
import pytest
from sagas_for_tests import (
    Cmd,
    Log,
    OrderEvent,
    OrderPaid,
    OrderPlaced,
    OrderRefunded,
    Ping,
    ScriptedSaga,
    Started,
    Touched,
)

from sagaflow import CommandFailed, Registry, RetryPolicy, correlate, on
from sagaflow.exceptions import RegistrationError, RegistrationErrors, SagaflowError


class Minimal:
    """The smallest valid saga: one start handler and a bare correlate."""

    @correlate
    def key(self, event: Started) -> str:
        return event.key

    @on(Started, start=True)
    def started(self, state: Log, event: Started) -> None:
        return None


def register_error(obj: object, *, state: Any = Log, name: str | None = None) -> RegistrationError:
    """Register `obj` in a fresh registry, expecting exactly one `RegistrationError`."""
    registry = Registry()
    with pytest.raises(RegistrationError) as info:
        registry.register(obj, state=state, name=name)
    assert registry.sagas == {}
    return info.value


# -- what is accepted ----------------------------------------------------------------


def test_saga_decorator_registers_an_instance_under_the_class_name() -> None:
    registry = Registry()

    returned = registry.saga(state=Log)(Minimal)

    assert returned is Minimal
    assert list(registry.sagas) == ["Minimal"]
    spec = registry.get("Minimal")
    assert (type(spec.obj), spec.state_type, sorted(t.__name__ for t in spec.handlers)) == (
        Minimal,
        Log,
        ["Started"],
    )


def test_saga_decorator_takes_a_stable_name() -> None:
    registry = Registry()

    registry.saga(state=Log, name="orders.v1")(Minimal)

    assert list(registry.sagas) == ["orders.v1"]


def test_register_takes_an_object_carrying_collaborators() -> None:
    """One saga object serves every instance; its handlers are bound to it."""

    class WithDeps:
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix

        @correlate
        def key(self, event: Started) -> str:
            return self.prefix + event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

    registry = Registry()
    saga = WithDeps("p-")

    assert registry.register(saga, state=Log) is saga
    ((spec, handler, key_of),) = registry.routes(Started)
    assert (spec.obj, handler.method, key_of(Started("k"))) == (saga, "started", "p-k")


def test_internal_handler_needs_no_correlate_and_is_not_routed_published_events() -> None:
    class Pinging:
        @correlate(Started)
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Ping, internal=True)
        def pinged(self, state: Log, event: Ping) -> None:
            return None

    registry = Registry()
    registry.register(Pinging(), state=Log)

    assert registry.routes(Ping) == ()
    assert registry.get("Pinging").handler_for(Ping) is not None


def test_command_failed_handler_needs_no_correlate_and_is_never_routed_by_type() -> None:
    class Failing:
        @correlate(Started)
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(CommandFailed)
        def failed(self, state: Log, event: CommandFailed[Cmd]) -> None:
            return None

    registry = Registry()
    registry.register(Failing(), state=Log)

    assert registry.routes(CommandFailed) == ()


def test_handler_annotations_are_never_evaluated() -> None:
    """Handlers may be annotated with forward references that do not resolve (yet)."""

    class Forward:
        @correlate
        def key(self, event: DoesNotExist) -> str:  # type: ignore[name-defined]  # noqa: F821
            return "k"

        @on(Started, start=True)
        def started(self, state: AlsoMissing, event: DoesNotExist) -> None:  # type: ignore[name-defined]  # noqa: F821
            return None

    registry = Registry()
    registry.register(Forward(), state=Log)

    assert list(registry.sagas) == ["Forward"]


def test_handler_signature_may_use_varargs() -> None:
    class Loose:
        @correlate
        def key(self, *args: Any) -> str:
            return "k"

        @on(Started, start=True)
        def started(self, *args: Any) -> None:
            return None

    registry = Registry()
    registry.register(Loose(), state=Log)

    assert list(registry.sagas) == ["Loose"]


def test_dataclass_state_is_accepted() -> None:
    @dataclasses.dataclass
    class DataState:
        count: int = 0
        tags: list[str] = dataclasses.field(default_factory=list)

    registry = Registry()
    registry.register(Minimal(), state=DataState)

    assert registry.get("Minimal").new_state() == DataState()


def test_handler_retry_policy_is_kept_on_the_handler() -> None:
    policy = RetryPolicy(max_attempts=7, initial_delay=0.5, jitter=False)

    class Patient:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True, retry=policy)
        def started(self, state: Log, event: Started) -> None:
            return None

    registry = Registry()
    registry.register(Patient(), state=Log)

    assert registry.get("Patient").handlers[Started].retry == policy


def test_the_same_class_registers_twice_under_different_names() -> None:
    registry = Registry()

    registry.register(ScriptedSaga(), state=Log, name="a")
    registry.register(ScriptedSaga(), state=Log, name="b")

    assert sorted(registry.sagas) == ["a", "b"]
    assert [spec.name for spec, _, _ in registry.routes(Started)] == ["a", "b"]


# -- routing tables ------------------------------------------------------------------


def test_routes_walk_base_classes_and_pick_the_most_specific_handler() -> None:
    class Orders:
        @correlate
        def key(self, event: OrderEvent) -> str:
            return event.order_id

        @on(OrderEvent, start=True)
        def any_order_event(self, state: Log, event: OrderEvent) -> None:
            return None

        @on(OrderPaid)
        def paid(self, state: Log, event: OrderPaid) -> None:
            return None

    registry = Registry()
    registry.register(Orders(), state=Log)

    def methods(event_type: type) -> list[str]:
        return [handler.method for _, handler, _ in registry.routes(event_type)]

    assert [methods(t) for t in (OrderEvent, OrderPlaced, OrderPaid, OrderRefunded, Started)] == [
        ["any_order_event"],
        ["any_order_event"],
        ["paid"],
        ["paid"],
        [],
    ]


def test_correlate_with_types_applies_to_those_types_and_their_subclasses() -> None:
    class PerType:
        @correlate(OrderEvent)
        def by_order(self, event: OrderEvent) -> str:
            return "order:" + event.order_id

        @correlate(Started, Touched)
        def by_key(self, event: Started | Touched) -> str:
            return "key:" + event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Touched, OrderPaid)
        def other(self, state: Log, event: Any) -> None:
            return None

    registry = Registry()
    registry.register(PerType(), state=Log)

    def keys(event: Any) -> list[str]:
        return [key_of(event) for _, _, key_of in registry.routes(type(event))]

    assert [keys(Started("a")), keys(Touched("b")), keys(OrderRefunded("c"))] == [
        ["key:a"],
        ["key:b"],
        ["order:c"],
    ]


# -- registration errors -------------------------------------------------------------


def test_handled_type_without_correlate_is_an_error_naming_saga_and_type() -> None:
    class Uncorrelated:
        @correlate(Started)
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Touched)
        def touched(self, state: Log, event: Touched) -> None:
            return None

    error = register_error(Uncorrelated())

    assert error.saga == "Uncorrelated"
    assert "saga 'Uncorrelated'" in str(error)
    assert "Touched (touched) has no correlate function" in str(error)


def test_two_handlers_for_one_type_is_an_error_naming_both() -> None:
    class Twice:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def first(self, state: Log, event: Started) -> None:
            return None

        @on(Started)
        def second(self, state: Log, event: Started) -> None:
            return None

    error = register_error(Twice())

    assert error.saga == "Twice"
    assert "saga 'Twice'" in str(error)
    assert "two handlers for Started: first and second" in str(error)


def test_saga_without_a_start_handler_is_an_error() -> None:
    class Startless:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started)
        def started(self, state: Log, event: Started) -> None:
            return None

    error = register_error(Startless())

    assert error.saga == "Startless"
    assert "saga 'Startless'" in str(error)
    assert "no handler has start=True" in str(error)


def test_saga_without_handlers_is_an_error() -> None:
    class Empty:
        pass

    error = register_error(Empty())

    assert (error.saga, "no @on handlers" in str(error)) == ("Empty", True)


def test_state_that_cannot_be_default_constructed_is_an_error() -> None:
    @attrs.define
    class NeedsArgs:
        amount: int

    error = register_error(Minimal(), state=NeedsArgs)

    assert error.saga == "Minimal"
    assert "saga 'Minimal'" in str(error)
    assert "state class" in str(error)
    assert "NeedsArgs cannot be created without arguments" in str(error)


def test_state_that_cannot_be_encoded_is_an_error() -> None:
    class NotAttrs:
        pass

    error = register_error(Minimal(), state=NotAttrs)

    assert error.saga == "Minimal"
    assert "NotAttrs does not round-trip" in str(error)


def test_state_with_a_field_that_is_not_json_is_an_error() -> None:
    @attrs.define
    class Opaque:
        thing: object = attrs.Factory(object)

    error = register_error(Minimal(), state=Opaque)

    assert error.saga == "Minimal"
    assert "Opaque does not round-trip" in str(error)


def test_state_that_comes_back_different_is_an_error() -> None:
    @attrs.define(eq=False)
    class Incomparable:
        count: int = 0

    error = register_error(Minimal(), state=Incomparable)

    assert error.saga == "Minimal"
    assert "Incomparable does not round-trip" in str(error)


def test_state_that_is_not_a_class_is_an_error() -> None:
    error = register_error(Minimal(), state=Log())

    assert "saga 'Minimal': state must be a class" in str(error)


def test_state_that_is_not_a_class_error_carries_the_saga() -> None:
    error = register_error(Minimal(), state=Log())

    assert error.saga == "Minimal"


def test_duplicate_saga_name_is_an_error_and_keeps_the_first() -> None:
    registry = Registry()
    first = registry.register(Minimal(), state=Log)

    with pytest.raises(RegistrationError, match=r"saga 'Minimal': .*already registered") as info:
        registry.register(Minimal(), state=Log)

    assert info.value.saga == "Minimal"
    assert registry.get("Minimal").obj is first


def test_handler_with_wrong_signature_is_an_error_naming_it() -> None:
    class TwoArgs:
        @correlate
        def key(self, event: Touched) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Touched)
        def touched(self, event: Touched) -> None:
            return None

    error = register_error(TwoArgs())

    assert error.saga == "TwoArgs"
    assert "saga 'TwoArgs': handler touched must take (self, state, event), it takes 2" in str(
        error
    )


def test_wrongly_signed_start_handler_is_reported_once() -> None:
    class TwoArgs:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, event: Started) -> None:
            return None

        @on(Touched)
        def touched(self, state: Log, event: Touched) -> None:
            return None

    error = register_error(TwoArgs())

    assert not isinstance(error, RegistrationErrors)
    assert "handler started must take (self, state, event)" in str(error)


def test_handler_with_required_keyword_only_parameter_is_an_error() -> None:
    class KeywordOnly:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Touched)
        def touched(self, state: Log, event: Touched, *, extra: int) -> None:
            return None

    error = register_error(KeywordOnly())

    assert error.saga == "KeywordOnly"
    assert "handler touched must take (self, state, event)" in str(error)


def test_keyword_only_parameter_error_does_not_report_a_negative_count() -> None:
    class KeywordOnly:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Touched)
        def touched(self, state: Log, event: Touched, *, extra: int) -> None:
            return None

    error = register_error(KeywordOnly())

    assert "-1" not in str(error)


def test_correlate_with_wrong_signature_is_an_error_naming_it() -> None:
    class BadKey:
        @correlate
        def key(self, state: Log, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

    registry = Registry()
    with pytest.raises(RegistrationErrors) as info:
        registry.register(BadKey(), state=Log)

    # Without a usable correlate, the handled type is uncorrelated too: both are reported.
    assert [(e.saga, type(e)) for e in info.value.exceptions] == [
        ("BadKey", RegistrationError),
        ("BadKey", RegistrationError),
    ]
    assert "correlate function key must take (self, event), it takes 3" in str(
        info.value.exceptions[0]
    )
    assert "Started (started) has no correlate function" in str(info.value.exceptions[1])


def test_static_method_handler_is_an_error() -> None:
    class Static:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @staticmethod
        @on(Touched)
        def touched(state: Log, event: Touched) -> None:
            return None

    error = register_error(Static())

    assert (error.saga, "touched must be a plain method" in str(error)) == ("Static", True)


def test_on_above_staticmethod_is_an_error_not_a_silently_ignored_handler() -> None:
    class Static:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Touched)
        @staticmethod
        def touched(state: Log, event: Touched) -> None:
            return None

    error = register_error(Static())

    assert "touched must be a plain method" in str(error)


def test_start_and_internal_together_is_an_error() -> None:
    class Both:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True, internal=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Touched, start=True)
        def touched(self, state: Log, event: Touched) -> None:
            return None

    error = register_error(Both())

    assert "cannot be both start=True and internal=True" in str(error)


def test_command_failed_cannot_start_an_instance() -> None:
    class StartsOnFailure:
        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(CommandFailed, start=True)
        def failed(self, state: Log, event: CommandFailed[Cmd]) -> None:
            return None

    error = register_error(StartsOnFailure())

    assert "CommandFailed cannot start an instance" in str(error)


def test_several_problems_at_once_are_a_registration_errors_group() -> None:
    @attrs.define
    class NeedsArgs:
        amount: int

    class Messy:
        @correlate(Started)
        def key(self, event: Started) -> str:
            return event.key

        @on(Started)
        def started(self, state: Log, event: Started) -> None:
            return None

        @on(Touched)
        def touched(self, state: Log, event: Touched) -> None:
            return None

        @on(OrderPaid)  # and the wrong arity
        def paid(self, state: Log) -> None:
            return None

    registry = Registry()
    with pytest.raises(RegistrationErrors) as info:
        registry.register(Messy(), state=NeedsArgs)

    group = info.value
    assert isinstance(group, ExceptionGroup)
    assert isinstance(group, SagaflowError)
    assert str(group).startswith("saga 'Messy' has 4 problems")
    assert [type(e) for e in group.exceptions] == [RegistrationError] * 4
    assert all(e.saga == "Messy" for e in group.exceptions)
    messages = [str(e) for e in group.exceptions]
    expected = [
        "handler paid must take (self, state, event)",
        "no handler has start=True",
        "Touched (touched) has no correlate function",
        "NeedsArgs cannot be created without arguments",
    ]
    assert [[part in m for m in messages].count(True) for part in expected] == [1, 1, 1, 1]
    assert registry.sagas == {}


def test_saga_decorator_on_a_class_needing_init_args_explains_the_fix() -> None:
    class NeedsDeps:
        def __init__(self, repository: object) -> None:
            self.repository = repository

        @correlate
        def key(self, event: Started) -> str:
            return event.key

        @on(Started, start=True)
        def started(self, state: Log, event: Started) -> None:
            return None

    registry = Registry()
    with pytest.raises(RegistrationError) as info:
        registry.saga(state=Log)(NeedsDeps)

    assert info.value.saga == "NeedsDeps"
    assert "NeedsDeps cannot be created without arguments" in str(info.value)
    assert "registry.register(" in str(info.value)
    assert registry.sagas == {}


def test_register_given_a_class_instead_of_an_object_explains_the_fix() -> None:
    registry = Registry()

    with pytest.raises(RegistrationError, match=r"register\(\) takes a saga object"):
        registry.register(Minimal, state=Log)


def test_registration_errors_are_type_errors() -> None:
    """Existing `except TypeError` clauses keep catching declaration mistakes."""
    error = register_error(Minimal(), state=Log())

    assert isinstance(error, TypeError)
    assert isinstance(error, SagaflowError)


# -- decorators ----------------------------------------------------------------------


def test_decorators_only_mark_and_return_the_function_unchanged() -> None:
    def handler(self: object, state: Log, event: Started) -> None:
        return None

    def key(self: object, event: Started) -> str:
        return event.key

    assert on(Started, start=True)(handler) is handler
    assert correlate(key) is key
    assert correlate(Started)(key) is key
    assert Minimal().started(Log(), Started("k")) is None


def test_on_without_types_or_with_a_non_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"@on\(\) needs at least one event type"):
        on()
    with pytest.raises(TypeError, match=r"@on\(\) takes event classes"):
        on("Started")  # type: ignore[arg-type]


def test_correlate_with_a_non_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"@correlate\(\) takes event classes"):
        correlate(Started, "Touched")  # type: ignore[call-overload]


def test_get_unknown_saga_is_a_lookup_error_listing_the_known() -> None:
    registry = Registry()
    registry.register(Minimal(), state=Log)

    with pytest.raises(LookupError, match=r"no saga named 'Nope' .*\['Minimal'\]"):
        registry.get("Nope")
