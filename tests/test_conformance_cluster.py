"""The conformance suite on RedisClusterBackend, on a 3 primary + 3 replica Valkey cluster.

Two suite tests write keys in different hash slots inside one transaction,
which a cluster cannot do atomically: here they run with hash-tagged keys,
and also check that the cross-slot form raises CrossSlotError and writes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kivigo_async import Client
from kivigo_async.backends.redis import RedisClusterBackend, RedisClusterOptions
from kivigo_async.errors import CrossSlotError, TransactionConflictError
from kivigo_async.testing.conformance import BackendConformance
from kivigo_async.testing.topologies import RedisCluster


class TestClusterConformance(BackendConformance):
    @pytest.fixture
    async def kv_backend(self, redis_cluster: RedisCluster) -> AsyncIterator[RedisClusterBackend]:
        redis_cluster.flushall()
        # One seed is enough: the backend discovers the other nodes.
        backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1]))
        yield backend
        await backend.close()

    async def test_transaction_applies_all_writes(self, client: Client) -> None:
        await client.set("gone", 1)
        with pytest.raises(CrossSlotError, match="hash tag"):
            async with client.transaction() as tx:
                tx.set("a", 1)
                tx.delete("gone")
        assert await client.batch_get(["a", "gone"]) == {"gone": 1}

        await client.set("{t}gone", 1)
        async with client.transaction() as tx:
            tx.set("{t}a", 1)
            tx.set("{t}b", {"x": 2}, ttl=60)
            tx.delete("{t}gone")
            assert await tx.get("{t}a", default=None) is None  # queued, not applied yet
        assert await client.batch_get(["{t}a", "{t}b", "{t}gone"]) == {"{t}a": 1, "{t}b": {"x": 2}}
        assert (await client.ttl("{t}b") or 0) > 59

    async def test_transaction_conflict_detected(self, client: Client) -> None:
        await client.set("{s}stock", 10)
        with pytest.raises(TransactionConflictError):
            async with client.transaction(watch=["{s}stock"]) as tx:
                stock = await tx.get("{s}stock", int)
                await client.set("{s}stock", 3)  # a concurrent writer
                tx.set("{s}stock", stock - 1)
                tx.set("{s}order", 1)
        assert await client.get("{s}stock") == 3
        assert not await client.has_key("{s}order")

        # A write outside the watched slot is refused before anything is sent.
        with pytest.raises(CrossSlotError, match="'order'"):
            async with client.transaction(watch=["{s}stock"]) as tx:
                tx.set("{s}stock", 1)
                tx.set("order", 1)
        assert await client.get("{s}stock") == 3
        assert not await client.has_key("order")
