"""Leases on Redis / Valkey: ``SET NX PX`` to take, a Lua compare-and-delete to give back.

These functions implement :class:`~kivigo_async.backend.LeaseBackend` for the
Redis backends. They go through the backend's redis-py client (the
connection pool, or the cluster client) rather than the multiplexed
connection: a lease is taken once per cache fill, so it is not a hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

from redis.exceptions import RedisError

if TYPE_CHECKING:
    # Not at run time: the backends may import this module to expose these functions as methods.
    from .cluster import RedisClusterBackend
    from .standalone import RedisBackend

__all__ = ["RedisLease", "acquire_lease", "release_lease"]

_Backend = Union["RedisBackend", "RedisClusterBackend"]

# Deletes the lease only while it still holds the caller's token, so a holder
# whose lease expired (and was taken over) cannot free the new holder's lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _client(backend: _Backend) -> Any:
    # Typed Any: redis-py's Redis and RedisCluster share these commands but no base class.
    from .cluster import RedisClusterBackend

    if isinstance(backend, RedisClusterBackend):
        return backend.cluster
    return backend.redis


async def acquire_lease(backend: _Backend, key: str, token: bytes, ttl_ms: int) -> bool:
    """``SET key token NX PX ttl_ms``; return whether the lease was taken."""
    try:
        return bool(await _client(backend).set(key, token, nx=True, px=ttl_ms))
    except RedisError as exc:
        raise backend._error(exc, "SET NX PX", key) from exc


async def release_lease(backend: _Backend, key: str, token: bytes) -> bool:
    """Delete ``key`` if it still holds ``token``; return whether it was deleted."""
    try:
        return bool(await _client(backend).execute_command("EVAL", _RELEASE, 1, key, token))
    except RedisError as exc:
        raise backend._error(exc, "EVAL (lease release)", key) from exc


class RedisLease:
    """A :class:`~kivigo_async.backend.LeaseBackend` view of a Redis backend.

    The client builds one when the backend does not implement the protocol
    itself.

    Example:
        ```python
        lease = RedisLease(RedisBackend.from_url("redis://localhost:6379/0"))
        taken = await lease.acquire_lease("kivigo:lease:{report}", b"token", 10_000)
        ```
    """

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend

    def __repr__(self) -> str:
        return f"RedisLease({self._backend!r})"

    async def acquire_lease(self, key: str, token: bytes, ttl_ms: int) -> bool:
        return await acquire_lease(self._backend, key, token, ttl_ms)

    async def release_lease(self, key: str, token: bytes) -> bool:
        return await release_lease(self._backend, key, token)
