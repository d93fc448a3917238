"""The conformance suite on the in-memory backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
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


# 2**63 and past: Redis answers "out of range", and a float deadline overflowed.
@pytest.mark.parametrize(
    "ttl_ms",
    [0, -1, 1.5, True, 2**63 - 1, 2**63, 10**400],
    ids=["zero", "negative", "fraction", "bool", "int64-max", "2**63", "10**400"],
)
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


async def test_the_longest_ttl_redis_takes_is_accepted() -> None:
    backend = MemoryBackend()
    await backend.set("k", b"v", 2**62)
    assert await backend.expire("k", 2**62)
    remaining = await backend.ttl("k")
    assert remaining is not None
    assert remaining > 2**62 - 60_000
    await backend.close()


def _buffers() -> list[tuple[str, bytearray, bytes | bytearray | memoryview]]:
    """(name, the buffer a caller keeps, what it passes): a bytearray, and a view of one."""
    array, viewed = bytearray(b"before"), bytearray(b"before")
    return [("array", array, array), ("view", viewed, memoryview(viewed))]


async def test_a_buffer_changed_after_a_write_does_not_change_the_stored_value() -> None:
    # The value was kept by reference: a caller reusing its buffer rewrote the stored
    # value, and a read returned the caller's bytearray or memoryview, not bytes.
    backend = MemoryBackend()
    kept: list[bytearray] = []
    for name, buffer, passed in _buffers():
        value: Any = passed
        await backend.set(f"set:{name}", value)
        await backend.batch_set([(f"batch:{name}", value)], 60_000)
        assert await backend.acquire_lease(f"lease:{name}", value, 60_000)
        tx = await backend.begin([])
        await tx.commit([("set", f"tx:{name}", value, None)])
        kept.append(buffer)
    for buffer in kept:
        buffer[:] = b"AFTER!"
    keys = [f"{op}:{name}" for op in ("set", "batch", "lease", "tx") for name in ("array", "view")]
    values = await backend.batch_get(keys)
    assert values == [b"before"] * len(keys)
    assert all(type(value) is bytes for value in values)
    assert await backend.release_lease("lease:array", b"before")
    await backend.close()


@pytest.mark.parametrize("value", ["text", 1, None, [b"v"]], ids=repr)
async def test_a_value_that_is_not_bytes_is_refused_and_nothing_is_written(value: object) -> None:
    # It was stored as given and read back as that object, where Redis stores bytes.
    backend = MemoryBackend()
    bad: Any = value
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: backend.set("k", bad),
        lambda: backend.batch_set([("k", b"fine"), ("k2", bad)]),
        lambda: backend.acquire_lease("k", bad, 1000),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="bytes"):
            await call()
    tx = await backend.begin([])
    with pytest.raises(InvalidArgumentError, match="bytes"):
        await tx.commit([("set", "k", b"fine", None), ("set", "k2", bad, None)])
    assert await backend.batch_get(["k", "k2"]) == [None, None]
    await backend.close()
