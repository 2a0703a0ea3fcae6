"""The Redis server for the tests: the one `SAGAFLOW_REDIS_URL` names (CI exports it, see
`.ci/redis.sh`).

Without it (or without the `redis` package) the tests that need one are skipped with the
reason, except on CI (`CI` set), where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest

__all__ = ["redis_client", "redis_url", "stream_name"]


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> NoReturn:
    message = f"Redis tests need a server: set SAGAFLOW_REDIS_URL ({reason})"
    if _on_ci():
        pytest.fail(f"CI is set and no Redis server is usable. {message}", False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """`SAGAFLOW_REDIS_URL`, checked to be reachable; skip (fail on CI) without it."""
    url = os.environ.get("SAGAFLOW_REDIS_URL")
    if not url:
        _unavailable("it is not set; `source .ci/redis.sh; redis_start` starts one")
    try:
        import redis
    except ImportError:
        _unavailable("the redis package is missing: pip install 'sagaflow[redis]'")
    try:
        with redis.Redis.from_url(url) as client:
            client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"SAGAFLOW_REDIS_URL={url} is set but unreachable: {exc}", False)
    return url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A client of the test server; the keys a test made (under its prefix) are deleted
    after it."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def stream_name(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; every key under it is deleted after the test."""
    import redis

    prefix = f"sagaflow-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
