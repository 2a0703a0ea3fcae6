"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import pytest
from hypothesis import settings

# The conformance suites live in the package: let pytest explain their failed asserts too.
pytest.register_assert_rewrite("sagaflow.testing.conformance")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each `@pytest.mark.anyio` test once per event loop."""
    return str(request.param)


# The machine running the suite may be slow and shared: no test depends on how fast an
# example runs, so Hypothesis' per-example deadline is off everywhere.
settings.register_profile("sagaflow", deadline=None)
settings.load_profile("sagaflow")
