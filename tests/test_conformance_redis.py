"""The conformance suite on RedisBackend, on every server variant (valkey, redis, TLS, ACL...)."""

from __future__ import annotations

import pytest

from kivigo_async.backends.redis import RedisBackend
from kivigo_async.testing.conformance import BackendConformance


class TestRedisConformance(BackendConformance):
    @pytest.fixture
    def kv_backend(self, redis_backend: RedisBackend) -> RedisBackend:
        return redis_backend
