"""Shared fixtures: Redis backends on every server variant this machine can start."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kivigo_async.backends.redis import RedisBackend, RedisOptions
from kivigo_async.testing.pytest_plugin import require_server
from kivigo_async.testing.servers import Server, ServerPool

#: Every (kind, variant) the conformance suite runs on. Unavailable ones skip
#: locally and fail in CI; "external" is there only when KIVIGO_REDIS_URL names a server.
REDIS_TARGETS = [
    ("valkey", "plain"),
    ("valkey", "password"),
    ("valkey", "acl"),
    ("redis", "plain"),
    ("redis", "password"),
    ("redis", "acl"),
    ("redis", "tls"),
]
if os.environ.get("KIVIGO_REDIS_URL"):
    REDIS_TARGETS.append(("external", "plain"))


def redis_options(server: Server, **overrides: Any) -> RedisOptions:
    """RedisOptions that reach ``server`` with its credentials and CA."""
    return RedisOptions(
        addr=f"{server.host}:{server.port}",
        username=server.username,
        password=server.password,
        db=server.db,
        tls=server.ssl_context() if server.tls else False,
        **overrides,
    )


@pytest.fixture(params=REDIS_TARGETS, ids=lambda t: f"{t[0]}-{t[1]}")
def redis_target(request: pytest.FixtureRequest, kivigo_server_pool: ServerPool) -> Server:
    kind, variant = request.param
    server: Server = require_server(kivigo_server_pool, kind, variant)
    return server


@pytest.fixture
async def redis_backend(redis_target: Server) -> AsyncIterator[RedisBackend]:
    """A RedisBackend on an empty database of each target server."""
    backend = RedisBackend(redis_options(redis_target))
    await backend.redis.flushdb()
    yield backend
    await backend.close()
