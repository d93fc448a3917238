"""pytest fixtures that hand tests real Redis and Valkey servers.

Registered through the ``pytest11`` entry point, so installing kivigo-async
makes these fixtures available:

* ``kivigo_server_pool`` (session): a :class:`~kivigo_async.testing.servers.ServerPool`.
* ``valkey_server`` / ``redis_server`` (session): shared plain servers.
* ``redis_server_factory`` (function): private servers a test may kill and restart.
* ``redis_cluster`` / ``redis_sentinel`` (session): a shared 3+3 node Valkey cluster and
  a shared primary + replica + 3 sentinels (see :mod:`kivigo_async.testing.topologies`).
* ``redis_cluster_factory`` / ``redis_sentinel_factory`` (function): private ones to kill
  nodes in or fail over.

Example:
    ```python
    from kivigo_async.testing.pytest_plugin import require_server

    def test_tls(kivigo_server_pool):
        server = require_server(kivigo_server_pool, "redis", "tls")
        ...

    def test_crash(redis_server_factory):
        server = redis_server_factory("valkey", extra_config={"appendonly": "yes"})
        server.kill()
        server.restart()
    ```

A server this machine can't provide skips the test, except under CI (``CI`` set
to anything but ``0``/``false``), where a server-backed test must not silently
skip: it fails instead, unless what is missing is optional by nature (no
``KIVIGO_REDIS_URL``, no Docker engine, a binary built without TLS).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NoReturn, Protocol, overload

import pytest

from .servers import (
    BinaryKind,
    RedisServer,
    Server,
    ServerBinary,
    ServerKind,
    ServerPool,
    ServerUnavailable,
    Variant,
)
from .topologies import RedisCluster, RedisSentinel, find_cli

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "ClusterFactory",
    "SentinelFactory",
    "ServerFactory",
    "in_ci",
    "kivigo_server_pool",
    "redis_cluster",
    "redis_cluster_factory",
    "redis_sentinel",
    "redis_sentinel_factory",
    "redis_server",
    "redis_server_factory",
    "require_server",
    "skip_or_fail",
    "valkey_server",
]

# Kinds that exist only when someone provides them; CI need not.
_CI_OPTIONAL_KINDS: frozenset[str] = frozenset({"external", "container"})


def in_ci() -> bool:
    """Whether the ``CI`` environment variable says we run under CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def skip_or_fail(exc: ServerUnavailable, kind: ServerKind) -> NoReturn:
    """Skip the test for ``exc``, or fail it when CI must have had that server."""
    if in_ci() and kind not in _CI_OPTIONAL_KINDS and not exc.optional:
        pytest.fail(f"CI must provide this server, but: {exc.reason}", pytrace=False)
    pytest.skip(exc.reason)


@overload
def require_server(pool: ServerPool, kind: BinaryKind, variant: Variant = "plain") -> RedisServer: ...
@overload
def require_server(pool: ServerPool, kind: ServerKind, variant: Variant = "plain") -> Server: ...
def require_server(pool: ServerPool, kind: ServerKind, variant: Variant = "plain") -> Server:
    """The pool's server for ``(kind, variant)``; skips (or, under CI, fails) when unavailable."""
    try:
        return pool.get(kind, variant)
    except ServerUnavailable as exc:
        skip_or_fail(exc, kind)


class ServerFactory(Protocol):
    """Signature of the ``redis_server_factory`` fixture."""

    def __call__(
        self,
        kind: BinaryKind = "valkey",
        variant: Variant = "plain",
        *,
        extra_config: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> RedisServer: ...


@pytest.fixture(scope="session")
def kivigo_server_pool() -> Iterator[ServerPool]:
    """Shared servers for the whole session, stopped at its end."""
    pool = ServerPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def valkey_server(kivigo_server_pool: ServerPool) -> RedisServer:
    """A shared plain Valkey server (tests must not stop or kill it)."""
    return require_server(kivigo_server_pool, "valkey", "plain")


@pytest.fixture(scope="session")
def redis_server(kivigo_server_pool: ServerPool) -> RedisServer:
    """A shared plain Redis server (tests must not stop or kill it)."""
    return require_server(kivigo_server_pool, "redis", "plain")


@pytest.fixture
def redis_server_factory(kivigo_server_pool: ServerPool) -> Iterator[ServerFactory]:
    """Start private servers for this test; all are stopped at teardown."""
    started: list[RedisServer] = []

    def factory(
        kind: BinaryKind = "valkey",
        variant: Variant = "plain",
        *,
        extra_config: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> RedisServer:
        try:
            binary = kivigo_server_pool.binary(kind, variant)
        except ServerUnavailable as exc:
            skip_or_fail(exc, kind)
        server = RedisServer(binary, variant, extra_config=extra_config, port=port)
        started.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in reversed(started):
            server.stop()


# --------------------------------------------------------------------------- topologies
# Cluster and sentinel fixtures. The shared ones run the embedded Valkey; tests
# that kill, fail over or reshard nodes take private ones from the factories.

#: ``cluster-node-timeout`` of the shared cluster: long enough that a node
#: stalled by a busy machine is not failed over under other tests' feet.
SHARED_CLUSTER_NODE_TIMEOUT_MS = 5000


class ClusterFactory(Protocol):
    """Signature of the ``redis_cluster_factory`` fixture."""

    def __call__(self, kind: BinaryKind = "valkey", *, node_timeout_ms: int = 1000) -> RedisCluster: ...


class SentinelFactory(Protocol):
    """Signature of the ``redis_sentinel_factory`` fixture."""

    def __call__(self, kind: BinaryKind = "valkey", *, down_after_ms: int = 1000) -> RedisSentinel: ...


def _topology_binary(pool: ServerPool, kind: BinaryKind) -> ServerBinary:
    try:
        binary = pool.binary(kind, "plain")
        find_cli(binary)
    except ServerUnavailable as exc:
        skip_or_fail(exc, kind)
    return binary


@pytest.fixture(scope="session")
def redis_cluster(kivigo_server_pool: ServerPool) -> Iterator[RedisCluster]:
    """A shared Valkey cluster, 3 primaries + 3 replicas (tests must not kill its nodes)."""
    binary = _topology_binary(kivigo_server_pool, "valkey")
    with RedisCluster(binary, node_timeout_ms=SHARED_CLUSTER_NODE_TIMEOUT_MS) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel(kivigo_server_pool: ServerPool) -> Iterator[RedisSentinel]:
    """A shared Valkey primary + replica watched by 3 sentinels as ``mymaster``.

    Tests may fail it over (``SENTINEL FAILOVER``) but must not kill its processes.
    """
    binary = _topology_binary(kivigo_server_pool, "valkey")
    with RedisSentinel(binary) as topology:
        yield topology


@pytest.fixture
def redis_cluster_factory(kivigo_server_pool: ServerPool) -> Iterator[ClusterFactory]:
    """Start private clusters for this test; all are stopped at teardown."""
    started: list[RedisCluster] = []

    def factory(kind: BinaryKind = "valkey", *, node_timeout_ms: int = 1000) -> RedisCluster:
        cluster = RedisCluster(_topology_binary(kivigo_server_pool, kind), node_timeout_ms=node_timeout_ms)
        started.append(cluster)
        return cluster.start()

    try:
        yield factory
    finally:
        for cluster in reversed(started):
            cluster.stop()


@pytest.fixture
def redis_sentinel_factory(kivigo_server_pool: ServerPool) -> Iterator[SentinelFactory]:
    """Start private sentinel topologies for this test; all are stopped at teardown."""
    started: list[RedisSentinel] = []

    def factory(kind: BinaryKind = "valkey", *, down_after_ms: int = 1000) -> RedisSentinel:
        topology = RedisSentinel(_topology_binary(kivigo_server_pool, kind), down_after_ms=down_after_ms)
        started.append(topology)
        return topology.start()

    try:
        yield factory
    finally:
        for topology in reversed(started):
            topology.stop()
