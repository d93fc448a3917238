"""Redis and Valkey backends on ``redis.asyncio`` with the hiredis parser.

Example:
    ```python
    from kivigo_async import Client
    from kivigo_async.backends.redis import RedisBackend, RedisOptions

    async with Client(RedisBackend(RedisOptions(addr="localhost:6379"))) as client:
        await client.set("k", {"v": 1}, ttl=60)
    ```
"""

from ._cache import CacheStats, ClientCache, LocalCache
from .cluster import RedisClusterBackend, RedisClusterOptions
from .options import RedisOptions
from .sentinel import RedisSentinelBackend, RedisSentinelOptions
from .standalone import RedisBackend

__all__ = [
    "CacheStats",
    "ClientCache",
    "LocalCache",
    "RedisBackend",
    "RedisClusterBackend",
    "RedisClusterOptions",
    "RedisOptions",
    "RedisSentinelBackend",
    "RedisSentinelOptions",
]
