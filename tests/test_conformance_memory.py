"""The conformance suite on the in-memory backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.testing.conformance import BackendConformance


class TestMemoryConformance(BackendConformance):
    @pytest.fixture
    async def kv_backend(self) -> AsyncIterator[MemoryBackend]:
        backend = MemoryBackend()
        yield backend
        await backend.close()
