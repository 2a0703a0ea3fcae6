"""A griffe extension that gives attrs classes the `__init__` attrs generates.

Griffe reads sagaflow's source without running it, so it cannot see the `__init__` that
`@attrs.define` and `@attrs.frozen` write at import time: the reference would show no
constructor signature, and an `Args:` section in a class docstring would be reported as
documenting unknown parameters (an error under `mkdocs build --strict`). This extension
imports each attrs class and builds the constructor from `attrs.fields()`, keeping the
annotations griffe read from the source so that they still link. mkdocs.yml loads it.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

import attrs
import griffe


def _default(field: attrs.Attribute[Any]) -> str | None:
    if field.default is attrs.NOTHING:
        return None
    if isinstance(field.default, attrs.Factory):
        factory = field.default.factory
        return f"{getattr(factory, '__name__', 'factory')}()"
    return repr(field.default)


class AttrsInitExtension(griffe.Extension):
    """Add the generated `__init__` to every attrs class that has none in its source."""

    def on_class_members(
        self,
        *,
        node: ast.AST | griffe.ObjectNode,
        cls: griffe.Class,
        agent: griffe.Visitor | griffe.Inspector,
        **kwargs: Any,
    ) -> None:
        if isinstance(node, griffe.ObjectNode) or "__init__" in cls.members:
            return
        try:
            runtime = griffe.dynamic_import(cls.path)
        except ImportError:
            return
        if not (isinstance(runtime, type) and attrs.has(runtime)):
            return
        init_name = getattr(runtime.__init__, "__qualname__", "")
        if init_name != f"{runtime.__qualname__}.__init__":
            return  # attrs was told init=False, or the class inherits its __init__
        parameters = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
        # With a converter, the constructor takes what the converter takes.
        generated_annotations = getattr(runtime.__init__, "__annotations__", {})
        for field in attrs.fields(runtime):
            if not field.init:
                continue
            name = field.alias or field.name
            member = cls.members.get(field.name)
            annotation = getattr(member, "annotation", None)
            if field.converter is not None or annotation is None:
                generated = generated_annotations.get(name)
                if generated is not None:
                    annotation = (
                        generated
                        if isinstance(generated, str)
                        else inspect.formatannotation(generated)
                    )
            kind = (
                griffe.ParameterKind.keyword_only
                if field.kw_only
                else griffe.ParameterKind.positional_or_keyword
            )
            parameters.append(
                griffe.Parameter(
                    name,
                    annotation=annotation,
                    kind=kind,
                    default=_default(field),
                )
            )
        # attrs puts keyword-only parameters last, as Python requires.
        parameters.sort(key=lambda p: p.kind is griffe.ParameterKind.keyword_only)
        init = griffe.Function(
            "__init__",
            lineno=cls.lineno,
            endlineno=cls.lineno,
            parent=cls,
            parameters=griffe.Parameters(*parameters),
            returns="None",
        )
        cls.set_member("__init__", init)
