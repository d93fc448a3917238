"""Batch cache operations: one round trip each (KiviGo's Redis "batch" example).

Run against any server: ``python examples/batch_cache.py redis://localhost:6379/0``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from kivigo_async import Client
from kivigo_async.backends.redis import RedisBackend


async def main(url: str) -> None:
    async with Client(RedisBackend.from_url(url)) as client:
        cache_data = {
            "cache:user:1": {"name": "Alice", "role": "admin"},
            "cache:user:2": {"name": "Bob", "role": "user"},
            "cache:user:3": {"name": "Charlie", "role": "user"},
            "cache:config:db": {"host": "localhost", "port": "5432"},
            "cache:config:api": {"timeout": "30s", "retries": "3"},
        }
        # Every value is encoded before anything is sent; one round trip, atomic.
        await client.batch_set(cache_data, ttl=300)
        print(f"batch_set {len(cache_data)} entries")

        keys = ["cache:user:1", "cache:user:2", "cache:config:db", "cache:user:404"]
        results = await client.batch_get(keys, dict[str, str])
        for key, value in results.items():
            print(f"{key}: {value}")
        print(f"missing keys are left out: {sorted(set(keys) - set(results))}")

        deleted = await client.batch_delete(["cache:user:1", "cache:user:2"])
        print(f"batch_delete removed {deleted} entries")

        print(f"remaining cache keys: {await client.list('cache:')}")
        await client.batch_delete(await client.list("cache:"))


if __name__ == "__main__":
    default_url = os.environ.get("KIVIGO_REDIS_URL", "redis://localhost:6379/0")
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else default_url))
