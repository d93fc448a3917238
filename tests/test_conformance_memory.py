"""The conformance suite on the in-memory backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.errors import ConfigurationError
from kivigo_async.testing.conformance import BackendConformance


class TestMemoryConformance(BackendConformance):
    @pytest.fixture
    async def kv_backend(self) -> AsyncIterator[MemoryBackend]:
        backend = MemoryBackend()
        yield backend
        await backend.close()


@pytest.mark.parametrize("sweep_every", [0, -5, None, 1.5, True, "100"])
def test_bad_sweep_every_is_refused_at_construction(sweep_every: object) -> None:
    # Checked up front: a bad value used to fail every write after storing its value.
    with pytest.raises(ConfigurationError, match="sweep_every"):
        MemoryBackend(sweep_every=sweep_every)  # type: ignore[arg-type]
