"""Leases on Redis / Valkey: a Lua ``SET NX PX`` to take, a Lua compare-and-delete to give back.

These functions implement :class:`~kivigo_async.backend.LeaseBackend` for the
Redis backends. On one server they go through the backend's connection pool
rather than the multiplexed connection: a lease is taken once per cache fill,
so it is not a hot path, and the pool re-sends a script whose connection broke
(both are safe to repeat). On a cluster they go the way single-key calls do,
so that redirections are followed as for any key of that slot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Union

from redis.exceptions import RedisError

if TYPE_CHECKING:
    # Not at run time: the backends may import this module to expose these functions as methods.
    from .cluster import RedisClusterBackend
    from .standalone import RedisBackend

__all__ = ["RedisLease", "acquire_lease", "release_lease"]

_Backend = Union["RedisBackend", "RedisClusterBackend"]

# SET NX PX that also answers "taken" when the lease already holds the caller's
# token: a retry of an acquire whose reply was lost (the connection dropped after
# the server had set it) must not take the caller's own lease for someone else's,
# which would leave every caller polling for lock_ttl while nobody fills the value.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if not holder then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
if holder == ARGV[1] then
    return 1
end
return 0
"""

# Deletes the lease only while it still holds the caller's token, so a holder
# whose lease expired (and was taken over) cannot free the new holder's lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


async def _run(backend: _Backend, command: str, key: str, args: tuple[Any, ...]) -> Any:
    from .cluster import RedisClusterBackend

    if isinstance(backend, RedisClusterBackend):
        # Its own path: redirections, the in-flight bound, the closed check and
        # the translation of every driver error.
        return await backend._keyed(command, key, args)
    execute: Callable[..., Awaitable[Any]] = backend.redis.execute_command  # untyped in redis-py
    try:
        return await execute(*args)
    except RedisError as exc:
        raise backend._error(exc, command, key) from exc


async def acquire_lease(backend: _Backend, key: str, token: bytes, ttl_ms: int) -> bool:
    """``SET key token NX PX ttl_ms``, retried safely; return whether the lease is the caller's."""

    return bool(await _run(backend, "EVAL (lease acquire)", key, ("EVAL", _ACQUIRE, 1, key, token, ttl_ms)))


async def release_lease(backend: _Backend, key: str, token: bytes) -> bool:
    """Delete ``key`` if it still holds ``token``; return whether it was deleted."""

    return bool(await _run(backend, "EVAL (lease release)", key, ("EVAL", _RELEASE, 1, key, token)))


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
