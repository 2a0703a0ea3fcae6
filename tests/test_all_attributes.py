"""The public surface: every name in a public module's `__all__` exists and is documented."""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import pathlib

import pytest

import sagaflow

PUBLIC_MODULES = [
    "sagaflow",
    "sagaflow.exceptions",
    "sagaflow.otel",
    "sagaflow.redis",
    "sagaflow.stores",
    "sagaflow.testing",
    "sagaflow.testing.conformance",
    "sagaflow.typing",
]
PACKAGE_DIR = pathlib.Path(sagaflow.__file__).parent


def _attribute_docstrings() -> dict[str, str]:
    """Names assigned at module level anywhere in sagaflow with a string right below.

    Constants and type aliases cannot carry `__doc__`; the string after their assignment
    is their docstring (what mkdocstrings renders).
    """
    found: dict[str, str] = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for stmt, after in itertools.pairwise(body):
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target = stmt.targets[0]
            elif isinstance(stmt, ast.AnnAssign):
                target = stmt.target
            else:
                continue
            if (
                isinstance(target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                found[target.id] = after.value.value
    return found


ATTRIBUTE_DOCS = _attribute_docstrings()


def _public_names() -> list[object]:
    return [
        pytest.param(module, name, id=f"{module}.{name}")
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
    ]


def _own_docstring(obj: object) -> str | None:
    """The docstring written for `obj` itself, not one inherited from its type."""
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__")
    if inspect.isfunction(obj) or inspect.ismodule(obj):
        return obj.__doc__
    return None


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_all_is_sorted_and_without_duplicates(module: str) -> None:
    names = list(importlib.import_module(module).__all__)

    assert names == sorted(set(names))


@pytest.mark.parametrize(("module", "name"), _public_names())
def test_public_name_exists_and_has_a_docstring(module: str, name: str) -> None:
    """Classes and functions carry `__doc__`; constants a docstring below their assignment."""
    obj = getattr(importlib.import_module(module), name)

    if inspect.isclass(obj) or inspect.isfunction(obj):
        doc = _own_docstring(obj)
    else:
        doc = ATTRIBUTE_DOCS.get(name)

    assert doc is not None
    assert doc.strip() != ""


def test_package_docstring() -> None:
    assert (sagaflow.__doc__ or "").strip() != ""
