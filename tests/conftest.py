"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import pytest
from hypothesis import settings

# The suite lives outside test modules: let pytest explain its failed asserts too.
pytest.register_assert_rewrite("store_conformance")

# Hypothesis fails an example that takes over 200 ms by default: on a slow or shared
# machine that measures the machine, not sagaflow.
settings.register_profile("sagaflow", deadline=None)
settings.load_profile("sagaflow")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each `@pytest.mark.anyio` test once per event loop."""
    return str(request.param)
