"""pytest fixtures that hand tests real Redis and Valkey servers.

Registered through the ``pytest11`` entry point, so installing kivigo-async
makes these fixtures available:

* ``kivigo_server_pool`` (session): a :class:`~kivigo_async.testing.servers.ServerPool`.
* ``valkey_server`` / ``redis_server`` (session): shared plain servers.
* ``redis_server_factory`` (function): private servers a test may kill and restart.
* ``redis_cluster`` / ``redis_sentinel`` (session): a shared 3+3 node Valkey cluster and
  a shared primary + replica + 3 sentinels (see :mod:`kivigo_async.testing.topologies`).
* ``redis_cluster_factory`` / ``redis_sentinel_factory`` (function): private ones to kill
  nodes in or fail over, in any variant (``variant="password" | "acl" | "tls"``: nodes
  and sentinels log in to each other or talk TLS; the topology object gives the
  ``username``, ``password``, ``sentinel_password`` and ``ssl_context()`` clients need).
* :func:`require_topology_binary`: the binary for a topology you start yourself (e.g. a
  module-scoped one), with the same skip / fail rules.

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

    def test_acl_cluster(redis_cluster_factory):
        cluster = redis_cluster_factory("valkey", variant="acl")
        options = RedisClusterOptions(
            addrs=cluster.addrs, username=cluster.username, password=cluster.password
        )
    ```

A server this machine can't provide skips the test, except under CI (``CI`` set
to anything but ``0``, ``false``, ``no`` or ``off``), where a server-backed test must not silently
skip: it fails instead, unless what is missing is optional by nature (no
``KIVIGO_TEST_REDIS_URL``, no Docker engine, a server or cli binary built without TLS).
"""

from __future__ import annotations

import os
import signal
import threading
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
    stop_servers_on_sigterm,
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
    "require_topology_binary",
    "skip_or_fail",
    "valkey_server",
]


def in_ci() -> bool:
    """Whether the ``CI`` environment variable says we run under CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def skip_or_fail(exc: ServerUnavailable, kind: ServerKind) -> NoReturn:
    """Skip the test for ``exc``, or fail it when CI must have had that server.

    Whether CI must have it is ``exc.optional``'s to say, whatever the kind: no
    Docker engine or no external URL is optional, a Docker engine without
    testcontainers installed is a broken set-up.
    """
    if in_ci() and not exc.optional:
        pytest.fail(f"CI must provide this {kind} server, but: {exc.reason}", pytrace=False)
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
    """Shared servers for the whole session, stopped at its end (also on SIGTERM)."""
    stop_servers_on_sigterm()
    if (
        os.environ.get("PYTEST_XDIST_WORKER")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        # pytest-xdist's controller stops its workers with SIGINT; a run started in
        # the background of a shell (`cmd &`) has it ignored, and the workers would
        # be cut off later without stopping their servers.
        signal.signal(signal.SIGINT, signal.default_int_handler)
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
#: ``down-after-milliseconds`` of the shared Sentinel topology, for the same reason
#: (its tests fail it over on purpose, with SENTINEL FAILOVER, never by a stall).
SHARED_SENTINEL_DOWN_AFTER_MS = 5000


class ClusterFactory(Protocol):
    """Signature of the ``redis_cluster_factory`` fixture."""

    def __call__(
        self, kind: BinaryKind = "valkey", *, node_timeout_ms: int = 1000, variant: Variant = "plain"
    ) -> RedisCluster: ...


class SentinelFactory(Protocol):
    """Signature of the ``redis_sentinel_factory`` fixture."""

    def __call__(
        self,
        kind: BinaryKind = "valkey",
        *,
        down_after_ms: int = 1000,
        variant: Variant = "plain",
        sentinel_auth: bool = True,
    ) -> RedisSentinel: ...


def require_topology_binary(
    pool: ServerPool, kind: BinaryKind, variant: Variant = "plain", *, cluster: bool = True
) -> ServerBinary:
    """The binary to start a ``variant`` topology of ``kind`` with; skips (or, under CI, fails) without one.

    ``cluster`` also asks for the cli that joins a cluster (built with TLS for
    the ``tls`` variant). A server or cli built without TLS skips even under CI.

    Example:
        ```python
        @pytest.fixture(scope="module")
        def acl_cluster(kivigo_server_pool):
            binary = require_topology_binary(kivigo_server_pool, "valkey", "acl")
            with RedisCluster(binary, variant="acl") as cluster:
                yield cluster
        ```
    """
    try:
        binary = pool.binary(kind, variant)
        if cluster:
            find_cli(binary, tls=variant == "tls")
    except ServerUnavailable as exc:
        skip_or_fail(exc, kind)
    return binary


@pytest.fixture(scope="session")
def redis_cluster(kivigo_server_pool: ServerPool) -> Iterator[RedisCluster]:
    """A shared Valkey cluster, 3 primaries + 3 replicas (tests must not kill its nodes)."""
    binary = require_topology_binary(kivigo_server_pool, "valkey")
    with RedisCluster(binary, node_timeout_ms=SHARED_CLUSTER_NODE_TIMEOUT_MS) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel(kivigo_server_pool: ServerPool) -> Iterator[RedisSentinel]:
    """A shared Valkey primary + replica watched by 3 sentinels as ``mymaster``.

    Tests may fail it over (``SENTINEL FAILOVER``) but must not kill its processes.
    """
    binary = require_topology_binary(kivigo_server_pool, "valkey", cluster=False)
    with RedisSentinel(binary, down_after_ms=SHARED_SENTINEL_DOWN_AFTER_MS) as topology:
        yield topology


@pytest.fixture
def redis_cluster_factory(kivigo_server_pool: ServerPool) -> Iterator[ClusterFactory]:
    """Start private clusters for this test, in any variant; all are stopped at teardown."""
    started: list[RedisCluster] = []

    def factory(
        kind: BinaryKind = "valkey", *, node_timeout_ms: int = 1000, variant: Variant = "plain"
    ) -> RedisCluster:
        binary = require_topology_binary(kivigo_server_pool, kind, variant)
        cluster = RedisCluster(binary, variant=variant, node_timeout_ms=node_timeout_ms)
        started.append(cluster)
        return cluster.start()

    try:
        yield factory
    finally:
        for cluster in reversed(started):
            cluster.stop()


@pytest.fixture
def redis_sentinel_factory(kivigo_server_pool: ServerPool) -> Iterator[SentinelFactory]:
    """Start private sentinel topologies for this test, in any variant; all are stopped at teardown."""
    started: list[RedisSentinel] = []

    def factory(
        kind: BinaryKind = "valkey",
        *,
        down_after_ms: int = 1000,
        variant: Variant = "plain",
        sentinel_auth: bool = True,
    ) -> RedisSentinel:
        binary = require_topology_binary(kivigo_server_pool, kind, variant, cluster=False)
        topology = RedisSentinel(
            binary, variant=variant, sentinel_auth=sentinel_auth, down_after_ms=down_after_ms
        )
        started.append(topology)
        return topology.start()

    try:
        yield factory
    finally:
        for topology in reversed(started):
            topology.stop()
