"""Shared fixtures: Redis backends on every server variant this machine can start."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kivigo_async.backends.redis import RedisBackend, RedisOptions
from kivigo_async.testing.pytest_plugin import require_server
from kivigo_async.testing.servers import Server, ServerPool

#: Every (kind, variant, transport) the conformance suite runs on: the default
#: multiplexed connection everywhere, and the connection pool (auto_pipeline=False)
#: on one server of each kind and on TLS. Unavailable ones skip locally and fail
#: in CI; "external" is there only when KIVIGO_REDIS_URL names a server.
REDIS_TARGETS = [
    ("valkey", "plain", "mux"),
    ("valkey", "password", "mux"),
    ("valkey", "acl", "mux"),
    ("redis", "plain", "mux"),
    ("redis", "password", "mux"),
    ("redis", "acl", "mux"),
    ("redis", "tls", "mux"),
    ("valkey", "plain", "pool"),
    ("redis", "acl", "pool"),
    ("redis", "tls", "pool"),
]
if os.environ.get("KIVIGO_REDIS_URL"):
    REDIS_TARGETS.append(("external", "plain", "mux"))


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


@pytest.fixture(params=REDIS_TARGETS, ids=lambda t: "-".join(t))
def redis_target(request: pytest.FixtureRequest, kivigo_server_pool: ServerPool) -> tuple[Server, bool]:
    """A target server, and whether to use the multiplexed connection on it."""
    kind, variant, transport = request.param
    server: Server = require_server(kivigo_server_pool, kind, variant)
    return server, transport == "mux"


@pytest.fixture
async def redis_backend(redis_target: tuple[Server, bool]) -> AsyncIterator[RedisBackend]:
    """A RedisBackend on an empty database of each target server."""
    server, auto_pipeline = redis_target
    backend = RedisBackend(redis_options(server, auto_pipeline=auto_pipeline))
    await backend.redis.flushdb()
    yield backend
    await backend.close()
