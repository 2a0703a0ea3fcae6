"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import pytest

# The suite lives outside test modules: let pytest explain its failed asserts too.
pytest.register_assert_rewrite("store_conformance")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each `@pytest.mark.anyio` test once per event loop."""
    return str(request.param)
