"""The serializer: JSON round trips and the allow-list that resolves stored type names.

Every test here runs once per JSON codec ($SAGAFLOW_JSON): the standard library's and,
when the `fast` extra is installed, msgspec's.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sagas_for_tests import Cmd, Log, OrderRefunded, Started, scripted_registry

from sagaflow import Registry
from sagaflow._json import Codec, default_codec, fast_codec, stdlib_codec
from sagaflow.exceptions import (
    DecodeError,
    RegistrationError,
    SerializationError,
    UnknownTypeError,
)

CODECS = ["stdlib", "msgspec"]


@pytest.fixture(scope="module", params=CODECS, autouse=True)
def codec(request: pytest.FixtureRequest) -> Iterator[str]:
    """The JSON codec every registry built in the test uses (module scope, so that
    Hypothesis' tests may use it)."""
    name = str(request.param)
    if name == "msgspec" and fast_codec() is None:
        pytest.skip("msgspec (the `fast` extra) is not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAGAFLOW_JSON", name)
        yield name


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

    name, data = serializer.encode(Cmd("k", "x"))
    assert (name, json.loads(data)) == ("sagas_for_tests.Cmd", {"key": "k", "label": "x"})
    name, data = serializer.encode(OrderRefunded("o"))
    assert (name, json.loads(data)) == ("sagas_for_tests.OrderRefunded", {"order_id": "o"})


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
    name, data = serializer.encode(DataMessage("n", 2))
    assert (name, json.loads(data)) == ("billing.v1.Data", {"name": "n", "amount": 2})
    assert serializer.decode("billing.v1.Data", '{"name": "n", "amount": 2}') == DataMessage("n", 2)


def test_message_works_as_a_class_decorator() -> None:
    registry = scripted_registry()

    @registry.message(name="local.Decorated")
    @attrs.frozen
    class Decorated:
        value: int

    name, data = registry.serializer.encode(Decorated(1))
    assert (name, json.loads(data)) == ("local.Decorated", {"value": 1})


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
    good = json.loads(serializer.encode(Rich("t", 1, 0.5, [], {}, Cmd("k", "x")))[1])
    del good["nested"]["label"]
    bad = json.dumps(good)

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
import json
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
    print(sent, json.loads(row.state), row.last_event, back)

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
        "[Ship(order_id='o-1')] {'placed': True} __main__.Placed Ship(order_id='x')\n"
    )


# -- the JSON codecs -----------------------------------------------------------------


def test_the_registry_uses_the_codec_sagaflow_json_names(codec: str) -> None:
    assert scripted_registry().serializer.codec == codec


def test_sagaflow_json_naming_no_codec_is_an_error_at_registry_creation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGAFLOW_JSON", "orjson")

    with pytest.raises(SerializationError) as info:
        Registry()

    assert str(info.value) == (
        "$SAGAFLOW_JSON is 'orjson', which names no JSON codec: set it to 'stdlib' or "
        "'msgspec', or unset it to use msgspec when it is installed"
    )


def test_without_the_extra_the_default_is_the_standard_library_and_msgspec_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sagaflow._json.fast_codec", lambda: None)
    monkeypatch.delenv("SAGAFLOW_JSON")
    assert default_codec().name == "stdlib"

    monkeypatch.setenv("SAGAFLOW_JSON", "msgspec")
    with pytest.raises(SerializationError, match=r"pip install 'sagaflow\[fast\]'"):
        default_codec()


def every_codec() -> list[Codec]:
    fast = fast_codec()
    return [stdlib_codec()] if fast is None else [stdlib_codec(), fast]


def canonical(value: Any) -> str:
    """A text that tells apart every two JSON values that differ (NaN equals NaN, `-0.0`
    is not `0.0`, a tuple is the list it is written as), for comparing decoded values."""
    return json.dumps(value, ensure_ascii=False)


def json_values(*, floats: bool = True) -> st.SearchStrategy[Any]:
    """JSON values with the leaves codecs tend to differ on."""
    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(st.characters(codec="utf-8"))
        | st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**40])
    )
    if floats:
        leaves |= st.floats() | st.sampled_from([1e308, 5e-324, -0.0, 1e16, 6.103515625e-05])
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(inner, max_size=3).map(tuple)
            | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        ),
        max_leaves=12,
    )


@given(json_values())
def test_what_one_codec_writes_every_codec_reads_as_the_same_value(value: Any) -> None:
    """Unicode, integers past 64 bits, NaN and infinities, nested containers: each codec's
    text reads back, through each codec, as the value written."""
    texts = [codec.encode(value) for codec in every_codec()]

    read = {canonical(codec.decode(text)) for codec in every_codec() for text in texts}

    assert read == {canonical(value)}


@given(json_values(floats=False))
def test_the_codecs_write_the_same_text_but_for_the_spelling_of_floats(value: Any) -> None:
    """Compact, keys in order; a float may be spelled differently (`1e+16` or `1e16`),
    which the test above covers."""
    assert {codec.encode(value) for codec in every_codec()} == {
        json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    }


class Level(enum.IntEnum):
    HIGH = 2


class Tag(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        {"ratio": math.nan, "limit": math.inf, "floor": -math.inf},
        {1: "int key", 2.5: "float key", None: "null key"},
        {True: "bool key"},
        {"level": Level.HIGH, "tag": Tag("t")},
        ["\ud800 lone surrogate"],
        [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
    ],
    ids=["non-finite floats", "non-str keys", "bool key", "subclasses", "lone surrogate", "nested"],
)
def test_the_fast_codec_writes_what_json_has_no_plain_form_for_as_the_standard_library(
    value: Any,
) -> None:
    """msgspec would write NaN as null, refuse a bool key or a lone surrogate: those
    values go to the standard library, so the text is the same with or without the extra."""
    assert {codec.encode(value) for codec in every_codec()} == {stdlib_codec().encode(value)}


@pytest.mark.parametrize(
    "text",
    ["[NaN, Infinity, -Infinity]", '"\\ud800"', "1e400", "123456789012345678901234567890"],
)
def test_the_fast_codec_reads_what_it_does_not_accept_as_the_standard_library(
    text: str,
) -> None:
    assert {canonical(codec.decode(text)) for codec in every_codec()} == {
        canonical(json.loads(text))
    }


@pytest.mark.parametrize("text", ["{not json", '{"a": 1} trailing', ""])
def test_corrupt_text_is_the_standard_librarys_error_on_every_codec(text: str) -> None:
    errors = set()
    for codec in every_codec():
        with pytest.raises(json.JSONDecodeError) as info:
            codec.decode(text)
        errors.add(str(info.value))

    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    assert errors == {str(expected.value)}


def test_a_value_json_has_no_form_for_is_the_same_error_on_every_codec() -> None:
    errors = set()
    for codec in every_codec():
        with pytest.raises(TypeError) as info:
            codec.encode({"when": object})
        errors.add(str(info.value))

    assert errors == {"Object of type type is not JSON serializable"}


WORKER = Path(__file__).with_name("codec_worker.py")


def run_worker(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent)}
    env.pop("SAGAFLOW_JSON", None)
    done = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert (done.returncode, done.stderr) == (0, "")
    return done.stdout


@pytest.mark.parametrize(
    ("writer", "reader"),
    [("msgspec", "stdlib"), ("stdlib", "msgspec")],
    ids=["written-with-the-extra-read-without", "written-without-read-with"],
)
def test_a_sqlite_store_written_with_one_codec_is_read_by_the_other(
    codec: str, writer: str, reader: str, tmp_path: Path
) -> None:
    """States and scheduled messages holding unicode, big integers, NaN, infinities and
    nested containers, written in one process and read in another where `import msgspec`
    fails (as without the extra), and the reverse."""
    if codec != "stdlib":
        pytest.skip("runs once: the codecs are chosen in the worker processes")
    if fast_codec() is None:
        pytest.skip("msgspec (the `fast` extra) is not installed")
    db = str(tmp_path / "sagas.db")
    without = ["--without-msgspec"]

    wrote = run_worker("write", db, *(without if writer == "stdlib" else []))
    read = run_worker("read", db, *(without if reader == "stdlib" else []))

    assert (wrote, read) == (f"wrote {writer}\n", f"ok {reader}\n")


# -- the shortcut for flat classes -------------------------------------------------


@attrs.frozen
class Flat:
    """A class the serializer decodes without cattrs when the JSON fits it exactly."""

    name: str
    count: int
    ok: bool
    ratio: float
    note: str | None = None


flat_payloads = st.dictionaries(
    st.sampled_from(["name", "count", "ok", "ratio", "note", "other"]),
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    max_size=6,
)


@given(flat_payloads)
def test_a_flat_class_decodes_exactly_as_cattrs_strict_hook_does(
    data: dict[str, Any],
) -> None:
    """Right or wrong types, missing or unknown keys: the value, or a `DecodeError` where
    cattrs' hook raises."""
    serializer = rich_registry().serializer
    hook = serializer.converter.get_structure_hook(Flat)
    try:
        expected: object = hook(data, Flat)
    except Exception:  # noqa: BLE001 - any error of cattrs' is a decode error
        expected = DecodeError

    try:
        got: object = serializer.loads(json.dumps(data), Flat, "Flat")
    except DecodeError:
        got = DecodeError

    assert got == expected


def test_a_flat_class_takes_the_shortcut_and_a_class_with_its_own_hook_does_not() -> None:
    serializer = rich_registry().serializer
    serializer.converter.register_structure_hook(
        DataMessage, lambda data, cls: cls(data["name"].upper(), data["amount"])
    )

    flat = serializer.loads('{"name":"n","count":1,"ok":true,"ratio":0.5,"note":null}', Flat, "F")
    data = serializer.loads('{"name":"n","amount":2}', DataMessage, "D")

    assert (flat, data) == (Flat("n", 1, True, 0.5), DataMessage("N", 2))
    hooks = [serializer._structurers[c].__name__ for c in (Flat, DataMessage)]
    assert hooks == ["structure_plain", "<lambda>"]
