"""The conformance suite on the in-memory backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.errors import ConfigurationError, InvalidArgumentError
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


@pytest.mark.parametrize("ttl_ms", [0, -1, 1.5, True])
async def test_a_ttl_redis_would_refuse_is_refused_and_nothing_is_written(ttl_ms: object) -> None:
    # The client never sends one; a direct caller got an entry already expired (and a
    # lease "acquired" for no time) where Redis answers "invalid expire time".
    backend = MemoryBackend()
    bad: Any = ttl_ms
    await backend.set("kept", b"v")
    calls = [
        backend.set("k", b"v", bad),
        backend.batch_set([("k", b"v")], bad),
        backend.expire("kept", bad),
        backend.acquire_lease("lease", b"token", bad),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="ttl_ms"):
            await call
    tx = await backend.begin([])
    with pytest.raises(InvalidArgumentError, match="ttl_ms"):
        await tx.commit([("set", "k", b"v", bad), ("delete", "kept")])
    assert await backend.get("k") is None
    assert await backend.get("lease") is None
    assert await backend.ttl("kept") is None  # neither expired nor deleted
    await backend.close()


async def test_a_watch_prefix_ending_inside_a_utf8_sequence_matches_by_bytes() -> None:
    backend = MemoryBackend()
    stream = await backend.watch("cut:\udcc3")
    try:
        await backend.set("cut:e", b"1")
        await backend.set("cut:é", b"2")
        event = await asyncio.wait_for(stream.__anext__(), 1)
        assert event.key == "cut:é"
    finally:
        await stream.aclose()
        await backend.close()
