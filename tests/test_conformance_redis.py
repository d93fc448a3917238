"""The conformance suite on RedisBackend, on every server variant (valkey, redis, TLS, ACL...)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from conftest import redis_options

from kivigo_async.backends.redis import ClientCache, RedisBackend
from kivigo_async.testing.conformance import BackendConformance
from kivigo_async.testing.servers import RedisServer


class TestRedisConformance(BackendConformance):
    @pytest.fixture
    def kv_backend(self, redis_backend: RedisBackend) -> RedisBackend:
        return redis_backend


class TestRedisClientCacheConformance(BackendConformance):
    """With the client-side cache on, reads served from memory must behave like reads from the server."""

    @pytest.fixture
    async def kv_backend(self, valkey_server: RedisServer) -> AsyncIterator[RedisBackend]:
        backend = RedisBackend(redis_options(valkey_server, client_cache=ClientCache(ttl=30)))
        await backend.redis.flushdb()
        await backend.connect()  # starts the invalidation listener: the cache serves nothing before
        yield backend
        await backend.close()
