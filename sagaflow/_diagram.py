"""Diagrams of a registry's sagas, as Mermaid flowcharts or Graphviz dot.

What a handler may produce is read from its declared return annotation, through
`typing.get_type_hints`: `Send[X]`, `Schedule[X]`, `Compensate`, `Complete`, `Associate`
and `Dissociate`, inside unions, `list[...]`, `tuple[...]` and other iterables. A handler
without a return annotation, or with one that cannot be resolved, is drawn without
outputs; nothing here fails on an annotation. Events a saga routes via an association
come from its "associations" node, the edge naming the association; handlers that may
associate or dissociate draw an edge to it.
"""

from __future__ import annotations

import collections.abc
import contextlib
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from ._actions import Associate, CommandFailed, Compensate, Complete, Dissociate, Schedule, Send
from ._registry import Registry, SagaSpec, Via

__all__ = ["Outputs", "dot", "mermaid", "outputs"]

_CONTAINERS = {
    list,
    tuple,
    set,
    frozenset,
    collections.abc.Iterable,
    collections.abc.Iterator,
    collections.abc.Collection,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Set,
    collections.abc.Generator,
}


@attrs.frozen
class Outputs:
    """What a handler's return annotation says it may produce.

    Attributes:
        known: Whether the handler declares a return annotation that could be resolved.
        sends: Command types it may `Send`, in the order found.
        schedules: Message types it may `Schedule`.
        compensates: It may return `Compensate`.
        completes: It may return `Complete`.
        associates: It may return `Associate`.
        dissociates: It may return `Dissociate`.
    """

    known: bool = False
    sends: tuple[type, ...] = ()
    schedules: tuple[type, ...] = ()
    compensates: bool = False
    completes: bool = False
    associates: bool = False
    dissociates: bool = False


_MISSING: Any = object()


def _return_hint(fn: Callable[..., Any]) -> Any:
    """The resolved return annotation of `fn`, or `_MISSING`."""
    fn = getattr(fn, "__func__", fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - another parameter may be unresolvable: try the return only
        pass
    else:
        return hints.get("return", _MISSING)
    try:
        raw = inspect.get_annotations(fn).get("return", _MISSING)
    except Exception:  # noqa: BLE001 - never fail on annotations
        return _MISSING
    if isinstance(raw, str):
        try:
            # What get_type_hints does, for the return annotation alone.
            return eval(raw, getattr(fn, "__globals__", {}))
        except Exception:  # noqa: BLE001 - unresolvable: drawn without outputs
            return _MISSING
    return raw


def _classes(hint: Any) -> Iterator[type]:
    """The classes a type argument names (a class, or a union of classes)."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        yield from _classes(typing.get_args(hint)[0])
    elif origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(hint):
            yield from _classes(arg)
    elif isinstance(hint, type) and hint not in (object, type(None), Any):
        yield hint


def outputs(fn: Callable[..., Any]) -> Outputs:
    """What the handler `fn` may produce, read from its return annotation."""
    hint = _return_hint(fn)
    if hint is _MISSING:
        return Outputs()
    sends: dict[type, None] = {}
    schedules: dict[type, None] = {}
    flags = {"compensates": False, "completes": False, "associates": False, "dissociates": False}

    def walk(t: Any, depth: int) -> None:
        if depth > 20:
            return
        value = getattr(t, "__value__", None)  # a `type X = ...` alias (Python 3.12+)
        if value is not None and type(t).__name__ == "TypeAliasType":
            walk(value, depth + 1)
            return
        origin = typing.get_origin(t)
        args = typing.get_args(t)
        if t is Compensate or origin is Compensate:
            flags["compensates"] = True
        elif t is Complete:
            flags["completes"] = True
        elif t is Associate:
            flags["associates"] = True
        elif t is Dissociate:
            flags["dissociates"] = True
        elif origin is Send:
            sends.update(dict.fromkeys(c for a in args for c in _classes(a)))
        elif origin is Schedule:
            schedules.update(dict.fromkeys(c for a in args for c in _classes(a)))
        elif origin is typing.Annotated:
            walk(args[0], depth + 1)
        elif origin is typing.Union or origin is types.UnionType or origin in _CONTAINERS:
            for arg in args:
                if arg is not Ellipsis:
                    walk(arg, depth + 1)

    with contextlib.suppress(Exception):  # an exotic annotation: keep what was found
        walk(hint, 0)
    return Outputs(True, tuple(sends), tuple(schedules), **flags)


# -- the graph -------------------------------------------------------------------------


@attrs.frozen
class _Node:
    id: str
    label: str
    shape: str  # "start", "event", "handler", "command", "compensate", "end", "associations"


@attrs.frozen
class _Edge:
    source: str
    target: str
    label: str = ""
    dashed: bool = False


@attrs.define
class _Graph:
    name: str
    nodes: dict[str, _Node] = attrs.field(factory=dict)
    edges: list[_Edge] = attrs.field(factory=list)

    def node(self, id: str, label: str, shape: str) -> str:
        self.nodes.setdefault(id, _Node(id, label, shape))
        return id

    def edge(self, source: str, target: str, label: str = "", *, dashed: bool = False) -> None:
        e = _Edge(source, target, label, dashed)
        if e not in self.edges:
            self.edges.append(e)


def _label(cls: type) -> str:
    return "CommandFailed" if issubclass(cls, CommandFailed) else cls.__qualname__


def _line(fn: Callable[..., Any]) -> int:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code.co_firstlineno if code is not None else 0


def _graph(spec: SagaSpec, index: int) -> _Graph:
    g = _Graph(spec.name)
    p = f"s{index}"
    events: dict[type, str] = {}
    commands: dict[type, str] = {}
    # In the order the handlers are written in their class, not alphabetically.
    ordered = sorted(spec.handlers.items(), key=lambda item: _line(item[1].fn))
    for t, _ in ordered:
        events[t] = f"{p}_e{len(events)}"
    handlers: dict[str, str] = {}
    associations = f"{p}_assoc"
    for t, h in ordered:
        if h.start:
            g.edge(g.node(f"{p}_start", "start", "start"), events[t])
        g.node(events[t], _label(t), "event")
        via = spec.correlate_for(t)
        if isinstance(via, Via):
            g.node(associations, "associations", "associations")
            g.edge(associations, events[t], f"via {via.name}", dashed=True)
        hid = handlers.setdefault(h.method, f"{p}_h{len(handlers)}")
        g.node(hid, h.method, "handler")
        g.edge(events[t], hid)
    seen: set[str] = set()
    for _, h in ordered:
        if h.method in seen:
            continue
        seen.add(h.method)
        hid = handlers[h.method]
        out = outputs(h.fn)
        for c in out.sends:
            cid = commands.setdefault(c, f"{p}_c{len(commands)}")
            g.edge(hid, g.node(cid, c.__qualname__, "command"), "send")
        for m in out.schedules:
            # A message the saga handles itself comes back to it (`to_self`).
            handled = next((events[t] for t in m.__mro__ if t in events), None)
            if handled is not None:
                g.edge(hid, handled, "schedule", dashed=True)
                continue
            cid = commands.setdefault(m, f"{p}_c{len(commands)}")
            g.edge(hid, g.node(cid, m.__qualname__, "command"), "schedule", dashed=True)
        if out.compensates:
            g.edge(hid, g.node(f"{p}_comp", "compensate", "compensate"), "compensate")
        if out.completes:
            g.edge(hid, g.node(f"{p}_done", "complete", "end"))
        for flag, label in ((out.associates, "associate"), (out.dissociates, "dissociate")):
            if flag:
                g.edge(hid, g.node(associations, "associations", "associations"), label)
    return g


def _graphs(registry: Registry, saga: str | None) -> list[_Graph]:
    specs = list(registry.sagas.values())
    if saga is not None:
        specs = [registry.get(saga)]
    return [_graph(spec, i) for i, spec in enumerate(specs)]


# -- Mermaid ---------------------------------------------------------------------------

_MERMAID_SHAPES = {
    "start": ('(("', '"))'),
    "event": ('(["', '"])'),
    "handler": ('["', '"]'),
    "command": ('[/"', '"/]'),
    "compensate": ('[\\"', '"\\]'),
    "end": ('((("', '")))'),
    "associations": ('{{"', '"}}'),
}


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;")


def mermaid(registry: Registry, *, saga: str | None = None) -> str:
    """A Mermaid `flowchart` of the registry's sagas, one subgraph per saga.

    Events are stadiums, handlers rectangles, commands parallelograms; dashed edges are
    schedules (to the event a `to_self` schedule delivers, when the saga handles it). A
    saga's associations are a hexagon: dashed edges from it, labelled `via name`, go to
    the events routed via an association, and edges to it come from the handlers that
    may `Associate` or `Dissociate` (read from their return annotations).

    Args:
        registry: The sagas to draw.
        saga: Draw only this saga.

    Raises:
        LookupError: `saga` is not registered.
    """
    lines = ["flowchart LR"]
    for i, g in enumerate(_graphs(registry, saga)):
        lines.append(f'    subgraph s{i} ["{_mermaid_text(g.name)}"]')
        lines.append("        direction LR")
        for n in g.nodes.values():
            left, right = _MERMAID_SHAPES[n.shape]
            lines.append(f"        {n.id}{left}{_mermaid_text(n.label)}{right}")
        for e in g.edges:
            arrow = "-.->" if e.dashed else "-->"
            label = f"|{_mermaid_text(e.label)}|" if e.label else ""
            lines.append(f"        {e.source} {arrow}{label} {e.target}")
        lines.append("    end")
    return "\n".join(lines) + "\n"


# -- Graphviz --------------------------------------------------------------------------

_DOT_SHAPES = {
    "start": "shape=circle",
    "event": "shape=box, style=rounded",
    "handler": "shape=box",
    "command": "shape=parallelogram",
    "compensate": "shape=invtrapezium",
    "end": "shape=doublecircle",
    "associations": "shape=hexagon",
}


def _dot_text(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot(registry: Registry, *, saga: str | None = None) -> str:
    """A Graphviz `digraph` of the registry's sagas, one cluster per saga.

    The same graph as `mermaid`, for `dot -Tsvg`.

    Args:
        registry: The sagas to draw.
        saga: Draw only this saga.

    Raises:
        LookupError: `saga` is not registered.
    """
    lines = ["digraph sagaflow {", "    rankdir=LR;"]
    for i, g in enumerate(_graphs(registry, saga)):
        lines.append(f"    subgraph cluster_s{i} {{")
        lines.append(f"        label={_dot_text(g.name)};")
        for n in g.nodes.values():
            lines.append(f"        {n.id} [label={_dot_text(n.label)}, {_DOT_SHAPES[n.shape]}];")
        for e in g.edges:
            attrs_ = [f"label={_dot_text(e.label)}"] if e.label else []
            attrs_ += ["style=dashed"] if e.dashed else []
            extra = f" [{', '.join(attrs_)}]" if attrs_ else ""
            lines.append(f"        {e.source} -> {e.target}{extra};")
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"
