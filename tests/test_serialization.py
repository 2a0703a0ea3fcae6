"""The serializer: JSON round trips and the allow-list that resolves stored type names."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sagas_for_tests import Cmd, Log, OrderRefunded, Started, scripted_registry

from sagaflow import Registry
from sagaflow.exceptions import (
    DecodeError,
    RegistrationError,
    SerializationError,
    UnknownTypeError,
)


@attrs.frozen
class Rich:
    """A message with most field shapes users put in messages (defined here, in a module
    that no registered saga lives in)."""

    text: str
    count: int
    ratio: float
    tags: list[str]
    scores: dict[str, int]
    nested: Cmd | None = None
    flags: tuple[bool, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataMessage:
    name: str
    amount: int = 0


def rich_registry() -> Registry:
    """A registry whose allow-list also covers this test module."""
    registry = scripted_registry()
    registry.serializer.allow(["test_serialization"])
    return registry


rich_messages = st.builds(
    Rich,
    text=st.text(),
    count=st.integers(),
    ratio=st.floats(allow_nan=False),
    tags=st.lists(st.text(max_size=5), max_size=4),
    scores=st.dictionaries(st.text(max_size=5), st.integers(), max_size=4),
    nested=st.none() | st.builds(Cmd, st.text(max_size=5), st.text(max_size=5)),
    flags=st.lists(st.booleans(), max_size=3).map(tuple),
)


@given(rich_messages)
def test_attrs_message_round_trips(message: Rich) -> None:
    serializer = rich_registry().serializer

    name, data = serializer.encode(message)

    assert (name, serializer.decode(name, data)) == ("test_serialization.Rich", message)


@given(st.builds(DataMessage, st.text(), st.integers()))
def test_dataclass_message_round_trips(message: DataMessage) -> None:
    serializer = rich_registry().serializer

    name, data = serializer.encode(message)

    assert (name, serializer.decode(name, data)) == ("test_serialization.DataMessage", message)


@given(st.lists(st.text(), max_size=5))
def test_state_round_trips_through_loads(seen: list[str]) -> None:
    serializer = scripted_registry().serializer

    data = serializer.dumps(Log(seen), "Log")

    assert serializer.loads(data, Log, "Log") == Log(seen)


def test_encoding_is_plain_json_with_a_module_qualified_name() -> None:
    serializer = scripted_registry().serializer

    assert serializer.encode(Cmd("k", "x")) == ("sagas_for_tests.Cmd", '{"key": "k", "label": "x"}')
    assert serializer.encode(OrderRefunded("o")) == (
        "sagas_for_tests.OrderRefunded",
        '{"order_id": "o"}',
    )


def test_prefixes_default_to_the_packages_of_sagas_states_and_events() -> None:
    registry = Registry()
    assert registry.serializer.prefixes == frozenset()

    registry = scripted_registry()

    # `sagaflow` comes in with the `CommandFailed` handler.
    assert registry.serializer.prefixes == frozenset({"sagas_for_tests", "sagaflow"})


def test_unknown_type_name_is_refused_naming_the_name() -> None:
    serializer = scripted_registry().serializer

    with pytest.raises(UnknownTypeError) as info:
        serializer.decode("sagas_for_tests.Vanished", "{}")

    assert info.value.type_name == "sagas_for_tests.Vanished"
    assert "'sagas_for_tests.Vanished' is not on sagaflow's allow-list" in str(info.value)
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, SerializationError)


def test_type_under_a_prefix_that_is_not_allowed_is_refused_both_ways() -> None:
    serializer = scripted_registry().serializer
    assert "test_serialization" in sys.modules

    with pytest.raises(UnknownTypeError) as decoding:
        serializer.decode("test_serialization.Rich", "{}")
    with pytest.raises(UnknownTypeError) as encoding:
        serializer.encode(DataMessage("x"))

    assert (decoding.value.type_name, encoding.value.type_name) == (
        "test_serialization.Rich",
        "test_serialization.DataMessage",
    )
    assert "Registry(allow=['test_serialization'])" in str(encoding.value)


def test_registry_allow_adds_prefixes() -> None:
    registry = Registry(allow=["test_serialization"])
    registry.register(scripted_registry().get("S").obj, state=Log, name="S")

    assert registry.serializer.decode("test_serialization.DataMessage", '{"name": "n"}') == (
        DataMessage("n")
    )


def test_allowed_prefix_resolves_only_attrs_and_dataclass_classes() -> None:
    """Functions, plain classes and modules are never produced from a stored name."""
    serializer = scripted_registry().serializer

    refused = []
    for name in (
        "sagas_for_tests.ScriptedSaga",
        "sagas_for_tests.label",
        "sagas_for_tests.attrs",
        "sagas_for_tests.Cmd.__init__",
    ):
        with pytest.raises(UnknownTypeError) as info:
            serializer.resolve(name)
        refused.append(info.value.type_name)

    assert refused == [
        "sagas_for_tests.ScriptedSaga",
        "sagas_for_tests.label",
        "sagas_for_tests.attrs",
        "sagas_for_tests.Cmd.__init__",
    ]


def test_a_stored_name_never_imports_a_module() -> None:
    registry = Registry(allow=["sagaflow_never_imported"])
    registry.register(scripted_registry().get("S").obj, state=Log, name="S")

    with pytest.raises(UnknownTypeError):
        registry.serializer.decode("sagaflow_never_imported.events.Evil", "{}")

    assert "sagaflow_never_imported" not in sys.modules
    assert "sagaflow_never_imported.events" not in sys.modules


def test_message_registers_a_stable_name_that_survives_a_rename() -> None:
    registry = scripted_registry()

    assert registry.message(DataMessage, name="billing.v1.Data") is DataMessage

    serializer = registry.serializer
    assert serializer.encode(DataMessage("n", 2)) == (
        "billing.v1.Data",
        '{"name": "n", "amount": 2}',
    )
    assert serializer.decode("billing.v1.Data", '{"name": "n", "amount": 2}') == DataMessage("n", 2)


def test_message_works_as_a_class_decorator() -> None:
    registry = scripted_registry()

    @registry.message(name="local.Decorated")
    @attrs.frozen
    class Decorated:
        value: int

    assert registry.serializer.encode(Decorated(1)) == ("local.Decorated", '{"value": 1}')


def test_class_defined_inside_a_function_needs_explicit_registration() -> None:
    @attrs.frozen
    class Local:
        value: int

    registry = rich_registry()  # even with this module's prefix allowed
    with pytest.raises(UnknownTypeError) as info:
        registry.serializer.encode(Local(1))
    assert info.value.type_name == (
        "test_serialization.test_class_defined_inside_a_function_needs_explicit_registration"
        ".<locals>.Local"
    )
    assert "registry.message(Local)" in str(info.value)

    registry.message(Local)
    name, data = registry.serializer.encode(Local(1))

    assert registry.serializer.decode(name, data) == Local(1)


def test_one_stable_name_cannot_serve_two_classes() -> None:
    registry = scripted_registry()
    registry.message(DataMessage, name="shared")

    with pytest.raises(RegistrationError, match="'shared' is already used"):
        registry.message(Rich, name="shared")

    assert registry.serializer.resolve("shared") is DataMessage


def test_a_class_cannot_be_renamed_once_registered() -> None:
    registry = scripted_registry()
    registry.message(DataMessage, name="first")

    with pytest.raises(RegistrationError, match="already registered as 'first'"):
        registry.message(DataMessage, name="second")


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (
            '{"text": "t", "ratio": 0.5, "tags": [], "scores": {}}',
            "count",
            "required field missing",
        ),
        (
            '{"text": "t", "count": 1, "ratio": 0.5, "tags": 5, "scores": {}}',
            "tags",
            "invalid value for type, expected list",
        ),
        (
            '{"text": "t", "count": "many", "ratio": 0.5, "tags": [], "scores": {}}',
            "count",
            "invalid value for type, expected int",
        ),
    ],
)
def test_payload_that_no_longer_fits_is_a_decode_error_naming_the_field(
    data: str, field: str, reason: str
) -> None:
    serializer = rich_registry().serializer

    with pytest.raises(DecodeError) as info:
        serializer.decode("test_serialization.Rich", data)

    error = info.value
    assert (error.type_name, error.field, error.saga, error.key) == (
        "test_serialization.Rich",
        field,
        None,
        None,
    )
    assert f"'test_serialization.Rich' cannot be decoded at field '{field}': {reason}" in str(error)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ('{"text": null, "count": 1, "ratio": 0.5, "tags": [], "scores": {}}', "text"),
        ('{"text": "t", "count": 1.9, "ratio": 0.5, "tags": [], "scores": {}}', "count"),
        ('{"text": "t", "count": 1, "ratio": 0.5, "tags": "abc", "scores": {}}', "tags"),
        (
            '{"text": "t", "count": 1, "ratio": 0.5, "tags": [], "scores": {}, "flags": ["false"]}',
            "flags[0]",
        ),
    ],
)
def test_value_of_the_wrong_json_type_is_a_decode_error_not_a_coercion(
    data: str, field: str
) -> None:
    serializer = rich_registry().serializer

    with pytest.raises(DecodeError) as info:
        serializer.decode("test_serialization.Rich", data)

    assert info.value.field == field


def test_nested_field_is_named_with_its_path() -> None:
    serializer = rich_registry().serializer
    good = serializer.encode(Rich("t", 1, 0.5, [], {}, Cmd("k", "x")))[1]
    bad = good.replace(', "label": "x"', "")

    with pytest.raises(DecodeError) as info:
        serializer.decode("test_serialization.Rich", bad)

    assert info.value.field == "nested.label"


def test_corrupt_json_is_a_decode_error() -> None:
    serializer = scripted_registry().serializer

    with pytest.raises(DecodeError, match="cannot be decoded: corrupt JSON") as info:
        serializer.decode("sagas_for_tests.Cmd", "{not json")

    assert (info.value.type_name, info.value.field) == ("sagas_for_tests.Cmd", None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"key": "k", "label": "x"} trailing', "Extra data"),
        ("", "Expecting value"),
        ('{"key": "k", "label": }', "Expecting value"),
    ],
)
def test_json_with_trailing_text_or_none_at_all_is_a_decode_error(text: str, reason: str) -> None:
    """The fast decoding path hands anything unusual to `json.loads`, errors included."""
    serializer = scripted_registry().serializer

    with pytest.raises(DecodeError, match=f"corrupt JSON \\({reason}") as info:
        serializer.decode("sagas_for_tests.Cmd", text)

    assert (info.value.type_name, info.value.field) == ("sagas_for_tests.Cmd", None)


def test_json_surrounded_by_whitespace_still_decodes() -> None:
    serializer = scripted_registry().serializer

    assert serializer.decode("sagas_for_tests.Cmd", ' {"key": "k", "label": "x"}\n') == Cmd(
        "k", "x"
    )


def test_state_decode_error_names_saga_key_and_field() -> None:
    serializer = scripted_registry().serializer

    with pytest.raises(DecodeError) as info:
        serializer.loads('{"seen": 5}', Log, "Log", saga="S", key="k-1")

    error = info.value
    assert (error.saga, error.key, error.field) == ("S", "k-1", "seen")
    assert "of saga 'S' key 'k-1' cannot be decoded at field 'seen'" in str(error)


def test_value_that_cannot_become_json_is_a_serialization_error() -> None:
    serializer = rich_registry().serializer

    with pytest.raises(SerializationError, match=r"cannot encode a 'test_serialization\.Rich'"):
        serializer.encode(Rich("t", 1, 0.5, [object()], {}))  # type: ignore[list-item]


def test_converter_is_sagaflows_own() -> None:
    import cattrs

    assert scripted_registry().serializer.converter is not cattrs.global_converter
    assert scripted_registry().serializer.converter is not scripted_registry().serializer.converter


def test_started_event_round_trips_through_the_registry_serializer() -> None:
    serializer = scripted_registry().serializer
    name, data = serializer.encode(Started("k", "t"))

    decoded: Any = serializer.decode(name, data)

    assert decoded == Started("k", "t")


MAIN_SCRIPT = """
import anyio, attrs
from sagaflow import Registry, Runtime, Send, correlate, on
from sagaflow._clock import VirtualClock
from sagaflow.stores import MemoryStore

@attrs.frozen
class Placed:
    order_id: str

@attrs.frozen
class Ship:
    order_id: str

@attrs.define
class State:
    placed: bool = False

registry = Registry()

@registry.saga(state=State)
class Orders:
    @correlate
    def key(self, event):
        return event.order_id

    @on(Placed, start=True)
    def placed(self, state, event):
        state.placed = True
        return Send(Ship(event.order_id))

sent = []

async def dispatch(command, meta):
    sent.append(command)

async def main():
    store = MemoryStore()
    async with Runtime(registry, store=store, dispatch=dispatch, clock=VirtualClock()) as rt:
        await rt.publish(Placed("o-1"))
        await rt.drain()
        (row,) = await store.list_instances()
    back = registry.serializer.decode("__main__.Ship", '{"order_id": "x"}')
    print(sent, row.state, row.last_event, back)

anyio.run(main)
"""


def test_sagas_living_in_main_resolve_their_messages() -> None:
    """`__main__` is an allowed prefix when the sagas live there (a script, the REPL)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", MAIN_SCRIPT], capture_output=True, text=True, timeout=60
    )

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "[Ship(order_id='o-1')] {\"placed\": true} __main__.Placed Ship(order_id='x')\n"
    )
