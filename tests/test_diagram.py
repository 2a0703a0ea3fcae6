"""Diagrams: what handlers may produce, read from their return annotations, drawn.

The command line's `diagram` is tested in test_cli.py; here, the annotation reader on
the shapes users write, and the rendering of edge cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import attrs
import pytest

from sagaflow import (
    Associate,
    CommandFailed,
    Compensate,
    Complete,
    Dissociate,
    Registry,
    Schedule,
    Send,
    Unschedule,
    correlate,
    on,
)
from sagaflow._diagram import Outputs, dot, mermaid, outputs


@attrs.frozen
class Go:
    key: str


@attrs.frozen
class Tick:
    key: str


@attrs.frozen
class A:
    key: str


@attrs.frozen
class B:
    key: str


@attrs.frozen
class Later:
    key: str


@attrs.define
class State:
    n: int = 0


def no_annotation(self: object, state: State, event: Go):  # type: ignore[no-untyped-def]
    return None


def returns_none(self: object, state: State, event: Go) -> None:
    return None


def one_send(self: object, state: State, event: Go) -> Send[A]:
    return Send(A(event.key))


def send_of_a_union(self: object, state: State, event: Go) -> Send[A | B] | None:
    return None


def a_list_of_actions(
    self: object, state: State, event: Go
) -> list[Send[A] | Schedule[Later] | Unschedule | Compensate | Complete]:
    return []


def a_tuple(self: object, state: State, event: Go) -> tuple[Send[B], Complete]:
    return Send(B(event.key)), Complete()


def an_open_tuple_and_iterables(
    self: object, state: State, event: Go
) -> tuple[Send[A], ...] | Iterable[Schedule[B]] | Iterator[Compensate]:
    return ()


def annotated(self: object, state: State, event: Go) -> Annotated[list[Send[B]], "docs"]:
    return []


def untyped_parameters(self, state, event: Undefined) -> Send[A]:  # type: ignore[no-untyped-def, name-defined]  # noqa: F821
    return Send(A(event.key))


def unresolvable_return(self: object, state: State, event: Go) -> list[Send[Missing]]:  # type: ignore[name-defined]  # noqa: F821
    return []


def any_and_object(self: object, state: State, event: Go) -> list[Send[Any] | Send[object]]:
    return []


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (no_annotation, Outputs()),
        (returns_none, Outputs(known=True)),
        (one_send, Outputs(True, sends=(A,))),
        (send_of_a_union, Outputs(True, sends=(A, B))),
        (
            a_list_of_actions,
            Outputs(True, sends=(A,), schedules=(Later,), compensates=True, completes=True),
        ),
        (a_tuple, Outputs(True, sends=(B,), completes=True)),
        (an_open_tuple_and_iterables, Outputs(True, (A,), (B,), compensates=True)),
        (annotated, Outputs(True, sends=(B,))),
        (untyped_parameters, Outputs(True, sends=(A,))),
        (unresolvable_return, Outputs()),
        (any_and_object, Outputs(known=True)),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_outputs_are_read_from_the_return_annotation(fn: Any, expected: Outputs) -> None:
    """Unions, lists, tuples, iterables and Annotated are looked into; annotations that
    cannot be resolved count as none (never an error); `Any` names no command."""
    assert outputs(fn) == expected


class Ticker:
    """`Tick` comes back to the saga (to_self); `Later` is a scheduled command."""

    @correlate
    def key(self, event: Go) -> str:
        return event.key

    @on(Go, start=True)
    def go(self, state: State, event: Go) -> list[Schedule[Tick] | Schedule[Later]]:
        return []

    @on(Tick, internal=True)
    def tick(self, state: State, event: Tick) -> Send[A] | Complete:
        return Complete()

    @on(CommandFailed)
    def failed(self, state: State, event: CommandFailed[Any]) -> Compensate:
        return Compensate([])


@pytest.fixture
def registry() -> Registry:
    made = Registry()
    made.register(Ticker(), state=State, name='say "tick"')
    return made


def test_mermaid_draws_schedules_to_the_saga_itself_back_to_its_event(registry: Registry) -> None:
    assert mermaid(registry) == (
        "flowchart LR\n"
        '    subgraph s0 ["say #quot;tick#quot;"]\n'
        "        direction LR\n"
        '        s0_start(("start"))\n'
        '        s0_e0(["Go"])\n'
        '        s0_h0["go"]\n'
        '        s0_e1(["Tick"])\n'
        '        s0_h1["tick"]\n'
        '        s0_e2(["CommandFailed"])\n'
        '        s0_h2["failed"]\n'
        '        s0_c0[/"Later"/]\n'
        '        s0_c1[/"A"/]\n'
        '        s0_done((("complete")))\n'
        '        s0_comp[\\"compensate"\\]\n'
        "        s0_start --> s0_e0\n"
        "        s0_e0 --> s0_h0\n"
        "        s0_e1 --> s0_h1\n"
        "        s0_e2 --> s0_h2\n"
        "        s0_h0 -.->|schedule| s0_e1\n"
        "        s0_h0 -.->|schedule| s0_c0\n"
        "        s0_h1 -->|send| s0_c1\n"
        "        s0_h1 --> s0_done\n"
        "        s0_h2 -->|compensate| s0_comp\n"
        "    end\n"
    )


def test_dot_escapes_names_and_dashes_schedules(registry: Registry) -> None:
    text = dot(registry)

    assert text.startswith("digraph sagaflow {\n    rankdir=LR;\n    subgraph cluster_s0 {\n")
    assert '        label="say \\"tick\\"";\n' in text
    assert '        s0_h0 -> s0_e1 [label="schedule", style=dashed];\n' in text
    assert '        s0_h0 -> s0_c0 [label="schedule", style=dashed];\n' in text
    assert '        s0_done [label="complete", shape=doublecircle];\n' in text
    assert text.endswith("    }\n}\n")


def test_an_unknown_saga_is_a_lookup_error(registry: Registry) -> None:
    with pytest.raises(LookupError, match=r"^no saga named 'nope' is registered"):
        mermaid(registry, saga="nope")


def associates_and_completes(
    self: object, state: State, event: Go
) -> list[Associate | Dissociate | Complete]:
    return []


def test_associate_and_dissociate_are_read_from_the_return_annotation() -> None:
    assert outputs(associates_and_completes) == Outputs(
        True, completes=True, associates=True, dissociates=True
    )


class Routed:
    """`B` reaches the saga via the association "group"; `go` associates, `b` dissociates."""

    @correlate(Go, A)
    def key(self, event: Go | A) -> str:
        return event.key

    @correlate(B, via="group")
    def group(self, event: B) -> str:
        return event.key

    @on(Go, start=True)
    def go(self, state: State, event: Go) -> Associate:
        return Associate("group", event.key)

    @on(A)
    def a(self, state: State, event: A) -> None:
        return None

    @on(B)
    def b(self, state: State, event: B) -> Dissociate:
        return Dissociate("group", event.key)


def test_diagrams_show_which_events_route_via_which_association() -> None:
    """The saga's associations are one node: edges from it name the association each
    event is routed via; handlers that may associate or dissociate point at it."""
    registry = Registry()
    registry.register(Routed(), state=State)

    assert mermaid(registry) == (
        "flowchart LR\n"
        '    subgraph s0 ["Routed"]\n'
        "        direction LR\n"
        '        s0_start(("start"))\n'
        '        s0_e0(["Go"])\n'
        '        s0_h0["go"]\n'
        '        s0_e1(["A"])\n'
        '        s0_h1["a"]\n'
        '        s0_e2(["B"])\n'
        '        s0_assoc{{"associations"}}\n'
        '        s0_h2["b"]\n'
        "        s0_start --> s0_e0\n"
        "        s0_e0 --> s0_h0\n"
        "        s0_e1 --> s0_h1\n"
        "        s0_assoc -.->|via group| s0_e2\n"
        "        s0_e2 --> s0_h2\n"
        "        s0_h0 -->|associate| s0_assoc\n"
        "        s0_h2 -->|dissociate| s0_assoc\n"
        "    end\n"
    )
    text = dot(registry)
    assert '        s0_assoc [label="associations", shape=hexagon];\n' in text
    assert '        s0_assoc -> s0_e2 [label="via group", style=dashed];\n' in text
    assert '        s0_h0 -> s0_assoc [label="associate"];\n' in text
