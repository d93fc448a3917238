"""Cluster and Sentinel topologies with passwords, ACL users and TLS, through the backends.

Each secure topology (cluster or sentinel, in the ``password``, ``acl`` and
``tls`` variants) is started once for this module, on first use, and shared by
the tests that only read and write; the conformance suite runs on the ``acl``
cluster and the ``tls`` sentinel. Tests that kill nodes or fail over take
private topologies from the factories. TLS runs on the embedded Valkey when it
has TLS, otherwise on ``redis-server``.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import trustme
from conftest import chain_text
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry
from test_conformance_cluster import TestClusterConformance as _ClusterConformance

from kivigo_async import Client
from kivigo_async.backends.redis import (
    RedisClusterBackend,
    RedisClusterOptions,
    RedisSentinelBackend,
    RedisSentinelOptions,
)
from kivigo_async.errors import (
    BackendUnavailableError,
    HealthCheckError,
)
from kivigo_async.testing.conformance import BackendConformance
from kivigo_async.testing.pytest_plugin import (
    SHARED_CLUSTER_NODE_TIMEOUT_MS,
    ClusterFactory,
    SentinelFactory,
    require_topology_binary,
)
from kivigo_async.testing.servers import (
    BinaryKind,
    RedisServer,
    ServerBinary,
    ServerPool,
    ServerUnavailable,
    Variant,
)
from kivigo_async.testing.topologies import RedisCluster, RedisSentinel, find_cli, wait_replicated

pytestmark = [pytest.mark.server, pytest.mark.timeout(240)]

SECURE: list[Variant] = ["password", "acl", "tls"]
AUTH: list[Variant] = ["password", "acl"]
#: Shared topologies must not fail over under a busy machine's stalls.
SHARED_DOWN_AFTER_MS = 5000


def topology_kind(pool: ServerPool, variant: Variant, *, cluster: bool) -> BinaryKind:
    """The embedded Valkey, unless ``variant`` is tls and it lacks TLS: then ``redis-server``."""
    if variant != "tls":
        return "valkey"
    try:
        binary = pool.binary("valkey", "tls")
        if cluster:
            find_cli(binary, tls=True)
    except ServerUnavailable:
        return "redis"
    return "valkey"


class Topologies:
    """One topology per (shape, variant), started on first use; all stopped by :meth:`close`."""

    def __init__(self, pool: ServerPool) -> None:
        self._pool = pool
        self._clusters: dict[Variant, RedisCluster] = {}
        self._sentinels: dict[Variant, RedisSentinel] = {}
        self._failures: dict[tuple[str, Variant], Exception] = {}

    def cluster(self, variant: Variant) -> RedisCluster:
        if variant not in self._clusters:
            failure = self._failures.get(("cluster", variant))
            if failure is not None:
                raise failure  # don't spend another start-up on what failed already
            kind = topology_kind(self._pool, variant, cluster=True)
            binary = require_topology_binary(self._pool, kind, variant)
            topology = RedisCluster(binary, variant=variant, node_timeout_ms=SHARED_CLUSTER_NODE_TIMEOUT_MS)
            try:
                self._clusters[variant] = topology.start()
            except Exception as exc:
                self._failures["cluster", variant] = exc
                raise
        return self._clusters[variant]

    def sentinel(self, variant: Variant) -> RedisSentinel:
        if variant not in self._sentinels:
            failure = self._failures.get(("sentinel", variant))
            if failure is not None:
                raise failure
            kind = topology_kind(self._pool, variant, cluster=False)
            binary = require_topology_binary(self._pool, kind, variant, cluster=False)
            topology = RedisSentinel(binary, variant=variant, down_after_ms=SHARED_DOWN_AFTER_MS)
            try:
                self._sentinels[variant] = topology.start()
            except Exception as exc:
                self._failures["sentinel", variant] = exc
                raise
        return self._sentinels[variant]

    def close(self) -> None:
        clusters, self._clusters = list(self._clusters.values()), {}
        sentinels, self._sentinels = list(self._sentinels.values()), {}
        for cluster in clusters:
            cluster.stop()
        for topology in sentinels:
            topology.stop()


@pytest.fixture(scope="module")
def topologies(kivigo_server_pool: ServerPool) -> Iterator[Topologies]:
    shared = Topologies(kivigo_server_pool)
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture(params=SECURE)
def cluster(request: pytest.FixtureRequest, topologies: Topologies) -> RedisCluster:
    topology = topologies.cluster(request.param)
    topology.flushall()
    return topology


@pytest.fixture(params=AUTH)
def auth_cluster(request: pytest.FixtureRequest, topologies: Topologies) -> RedisCluster:
    return topologies.cluster(request.param)


@pytest.fixture
def tls_cluster(topologies: Topologies) -> RedisCluster:
    return topologies.cluster("tls")


@pytest.fixture(params=SECURE)
def sentinel(request: pytest.FixtureRequest, topologies: Topologies) -> RedisSentinel:
    topology = topologies.sentinel(request.param)
    topology.flushall()
    return topology


@pytest.fixture(params=AUTH)
def auth_sentinel(request: pytest.FixtureRequest, topologies: Topologies) -> RedisSentinel:
    return topologies.sentinel(request.param)


@pytest.fixture
def tls_sentinel(topologies: Topologies) -> RedisSentinel:
    return topologies.sentinel("tls")


def cluster_options(cluster: RedisCluster, **overrides: object) -> RedisClusterOptions:
    """Options that reach ``cluster`` with its credentials and CA, through one seed."""
    options = RedisClusterOptions(
        addrs=cluster.addrs[:1],
        username=cluster.username,
        password=cluster.password,
        tls=cluster.ssl_context() if cluster.tls else False,
    )
    return options.replace(**overrides)


def sentinel_options(topology: RedisSentinel, **overrides: object) -> RedisSentinelOptions:
    """Options that reach ``topology``'s primary and sentinels with their credentials and CA."""
    options = RedisSentinelOptions(
        sentinels=topology.sentinel_addrs,
        service_name=topology.service_name,
        username=topology.username,
        password=topology.password,
        sentinel_username=topology.sentinel_username,
        sentinel_password=topology.sentinel_password,
        tls=topology.ssl_context() if topology.tls else False,
    )
    return options.replace(**overrides)


def direct(server: RedisServer) -> redis.Redis:
    """A plain redis-py client on one process, with that process's credentials and CA."""
    kwargs: dict[str, Any] = server.redis_kwargs()
    return redis.Redis(**kwargs, socket_timeout=10)


def other_ca_context() -> ssl.SSLContext:
    """A verifying context that trusts a CA other than the topology's."""
    context = ssl.create_default_context()
    trustme.CA().configure_trust(context)
    return context


async def connect_error(backend: RedisClusterBackend | RedisSentinelBackend) -> BackendUnavailableError:
    """The error of ``async with Client(backend)``, whose connect() checks the backend answers.

    A failed connect closes the backend.
    """
    with pytest.raises(BackendUnavailableError) as connecting:
        async with Client(backend):
            pass
    return connecting.value


async def exercise(client: Client) -> None:
    """Single keys, batches, prefix listing, health and a one-slot transaction."""
    await client.set("user:1", {"name": "ada"}, ttl=60)
    assert await client.get("user:1") == {"name": "ada"}
    assert await client.delete("user:1") is True
    assert await client.get("user:1", default=None) is None

    data = {f"item:{i}": i for i in range(200)}
    await client.batch_set(data)
    assert await client.batch_get([*data, "item:missing"], int) == data
    assert await client.list("item:") == sorted(data)
    await client.health()

    await client.set("{cart:7}:items", 2)
    async with client.transaction(watch=["{cart:7}:items"]) as tx:
        items = await tx.get("{cart:7}:items", int)
        tx.set("{cart:7}:items", items + 1)
        tx.set("{cart:7}:total", 42)
        tx.delete("{cart:7}:coupon")
    assert await client.batch_get(["{cart:7}:items", "{cart:7}:total"]) == {
        "{cart:7}:items": 3,
        "{cart:7}:total": 42,
    }


# --------------------------------------------------------------------------- launchers


def test_topology_binary_skips_without_tls_and_fails_without_a_server_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "true")
    no_tls = ServerBinary(kind="valkey", path="/nonexistent", version="0", supports_tls=False)
    # A build without TLS is optional by nature: skipped even under CI ...
    for cluster in (True, False):
        with pytest.raises(pytest.skip.Exception):
            require_topology_binary(ServerPool(binaries=[no_tls]), "valkey", "tls", cluster=cluster)
    with pytest.raises(ServerUnavailable) as info:
        RedisCluster(no_tls, variant="tls")
    assert info.value.optional
    # ... a missing server binary is not.
    with pytest.raises(pytest.fail.Exception):
        require_topology_binary(ServerPool(binaries=[]), "redis", "acl", cluster=False)


def test_launchers_refuse_unknown_variants() -> None:
    binary = ServerBinary(kind="valkey", path="/nonexistent", version="0", supports_tls=False)
    with pytest.raises(ValueError, match="variant"):
        RedisCluster(binary, variant="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variant"):
        RedisSentinel(binary, variant="bogus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cluster


async def test_cluster_serves_clients_with_credentials(cluster: RedisCluster) -> None:
    async with Client(RedisClusterBackend(cluster_options(cluster))) as client:
        await exercise(client)
    for primary in cluster.primaries():
        with direct(primary) as conn:
            # The batches reached every primary, each of which checked our login ...
            assert conn.dbsize() > 0
        # ... and the replicas logged in to their primary (masterauth / masteruser, or TLS)
        # and copied every write.
        assert wait_replicated(primary) == 1


def test_cluster_launcher_reports_its_secure_layout(cluster: RedisCluster) -> None:
    assert len(cluster.primaries()) == 3
    assert len(cluster.replicas()) == 3
    assert cluster.variant in SECURE
    for node in cluster.nodes:
        assert node.variant == cluster.variant
        assert (node.username, node.password) == (cluster.username, cluster.password)
        assert node.ca_path == cluster.ca_path
    if cluster.password is not None:
        assert cluster.password not in repr(cluster)
        assert all(cluster.password not in repr(node) for node in cluster.nodes)
    else:
        assert cluster.ca_path is not None
        assert cluster.ssl_context().verify_mode == ssl.CERT_REQUIRED


def anonymous(server: RedisServer) -> redis.Redis:
    """A client without credentials or TLS, and without retries."""
    return redis.Redis(host=server.host, port=server.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))


def test_cluster_nodes_refuse_anonymous_clients(cluster: RedisCluster) -> None:
    node = cluster.nodes[0]
    expected: type[Exception] = redis.AuthenticationError if cluster.password else redis.ConnectionError
    with anonymous(node) as conn, pytest.raises(expected):
        conn.ping()


async def test_cluster_wrong_password_is_an_auth_error_without_secrets(auth_cluster: RedisCluster) -> None:
    assert auth_cluster.password is not None
    wrong = f"wrong-{secrets.token_hex(8)}"
    error = await connect_error(
        RedisClusterBackend(cluster_options(auth_cluster, password=wrong, max_retries=0))
    )
    text = chain_text(error)
    assert auth_cluster.addrs[0] in str(error)
    assert wrong not in text
    assert auth_cluster.password not in text
    if auth_cluster.username:
        # A user the server doesn't know fails the same way, with the right password.
        unknown = cluster_options(auth_cluster, username="nobody", max_retries=0)
        error = await connect_error(RedisClusterBackend(unknown))
        assert auth_cluster.password not in chain_text(error)


async def test_cluster_wrong_password_says_authentication_failed(auth_cluster: RedisCluster) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    error = await connect_error(
        RedisClusterBackend(cluster_options(auth_cluster, password=wrong, max_retries=0))
    )
    assert "authentication failed" in str(error)


async def test_cluster_tls_verifies_the_certificate(tls_cluster: RedisCluster) -> None:
    # tls=True checks against the system's trust store, which does not hold the test CA.
    for tls in (True, other_ca_context()):
        backend = RedisClusterBackend(cluster_options(tls_cluster, tls=tls, max_retries=0))
        # Verification is on, never silently off.
        context = backend.options.node_options(tls_cluster.addrs[0]).ssl_context()
        assert context is not None
        assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
        error = await connect_error(backend)
        assert "certificate verify failed" in str(error)
        assert tls_cluster.addrs[0] in str(error)
    plain = RedisClusterBackend(cluster_options(tls_cluster, tls=False, max_retries=0, dial_timeout=2))
    await connect_error(plain)


async def test_secure_cluster_failover(
    redis_cluster_factory: ClusterFactory, kivigo_server_pool: ServerPool
) -> None:
    # Failure detection and the election run over the TLS cluster bus.
    kind = topology_kind(kivigo_server_pool, "tls", cluster=True)
    cluster = redis_cluster_factory(kind, variant="tls", node_timeout_ms=1000)
    async with Client(RedisClusterBackend(cluster_options(cluster, max_retries=5))) as client:
        data = {f"k{i}": i for i in range(100)}
        await client.batch_set(data)
        for primary in cluster.primaries():
            assert wait_replicated(primary) == 1
        victim = cluster.node_for_slot(key_slot(b"k0"))
        victim.kill()
        await asyncio.to_thread(cluster.wait_ready, 60.0, expected_nodes=5)
        assert victim not in cluster.primaries()
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.health()
                break
            except (BackendUnavailableError, HealthCheckError):
                assert time.monotonic() < deadline, "health never recovered after the failover"
                await asyncio.sleep(0.5)
        assert await client.batch_get(list(data), int) == data


class TestAclClusterConformance(_ClusterConformance):
    """The cluster conformance suite (hash-tagged transactions included) on the acl cluster."""

    @pytest.fixture
    async def kv_backend(self, topologies: Topologies) -> AsyncIterator[RedisClusterBackend]:
        cluster = topologies.cluster("acl")
        cluster.flushall()
        backend = RedisClusterBackend(cluster_options(cluster))
        yield backend
        await backend.close()


# --------------------------------------------------------------------------- sentinel


async def test_sentinel_serves_clients_with_credentials(sentinel: RedisSentinel) -> None:
    async with Client(RedisSentinelBackend(sentinel_options(sentinel))) as client:
        await exercise(client)
    # The replica logged in to the primary and copied its writes.
    assert wait_replicated(sentinel.primary()) == 1


def test_sentinel_launcher_reports_its_secure_layout(sentinel: RedisSentinel) -> None:
    assert sentinel.master_addr() == f"{sentinel.data_nodes[0].host}:{sentinel.data_nodes[0].port}"
    for node in sentinel.data_nodes:
        assert (node.variant, node.username, node.password) == (
            sentinel.variant,
            sentinel.username,
            sentinel.password,
        )
    for process in sentinel.sentinels:
        assert (process.username, process.password) == (
            sentinel.sentinel_username,
            sentinel.sentinel_password,
        )
        assert process.tls == sentinel.tls
    if sentinel.password is not None:
        assert sentinel.sentinel_password not in (None, sentinel.password)
        assert sentinel.password not in repr(sentinel)
        assert str(sentinel.sentinel_password) not in repr(sentinel)
        assert (sentinel.sentinel_username is None) == (sentinel.variant == "password")
    else:
        assert sentinel.sentinel_password is None
        assert sentinel.ca_path is not None


def test_sentinels_refuse_anonymous_clients(sentinel: RedisSentinel) -> None:
    expected: type[Exception] = redis.AuthenticationError if sentinel.password else redis.ConnectionError
    with anonymous(sentinel.sentinels[0]) as conn, pytest.raises(expected):
        conn.sentinel_masters()


async def test_sentinel_wrong_passwords_are_auth_errors_without_secrets(auth_sentinel: RedisSentinel) -> None:
    real = [auth_sentinel.password, auth_sentinel.sentinel_password]
    assert all(real)
    wrong = f"wrong-{secrets.token_hex(8)}"
    for overrides in ({"password": wrong}, {"sentinel_password": wrong}):
        backend = RedisSentinelBackend(sentinel_options(auth_sentinel, max_retries=0, **overrides))
        error = await connect_error(backend)
        assert "authentication failed" in str(error)
        text = chain_text(error) + repr(backend)
        for secret in [wrong, *real]:
            assert str(secret) not in text
    # Without the sentinels' password, every sentinel refuses: named, and said so.
    anonymous = sentinel_options(auth_sentinel, sentinel_password=None, sentinel_username=None, max_retries=0)
    error = await connect_error(RedisSentinelBackend(anonymous))
    assert "authentication failed" in str(error)
    assert all(addr in str(error) for addr in auth_sentinel.sentinel_addrs)


async def test_sentinel_tls_verifies_every_certificate(tls_sentinel: RedisSentinel) -> None:
    trusted = tls_sentinel.ssl_context()
    # Nobody trusted: the sentinels are refused first, each one named.
    for tls in (True, other_ca_context()):
        error = await connect_error(
            RedisSentinelBackend(sentinel_options(tls_sentinel, tls=tls, max_retries=0))
        )
        assert "certificate verify failed" in str(error)
        assert all(addr in str(error) for addr in tls_sentinel.sentinel_addrs)
    # Trusted sentinels, untrusted primary: the primary is refused, named.
    options = sentinel_options(tls_sentinel, tls=other_ca_context(), sentinel_tls=trusted, max_retries=0)
    error = await connect_error(RedisSentinelBackend(options))
    assert "certificate verify failed" in str(error)
    assert tls_sentinel.master_addr() in str(error)
    # And the other way round: the sentinels' own context is honoured.
    options = sentinel_options(tls_sentinel, tls=trusted, sentinel_tls=other_ca_context(), max_retries=0)
    error = await connect_error(RedisSentinelBackend(options))
    assert "certificate verify failed" in str(error)


@pytest.mark.parametrize("variant", ["password", "tls"])
async def test_secure_sentinel_failover_command(
    redis_sentinel_factory: SentinelFactory, kivigo_server_pool: ServerPool, variant: Variant
) -> None:
    kind = topology_kind(kivigo_server_pool, variant, cluster=False)
    topology = redis_sentinel_factory(kind, variant=variant)
    async with Client(RedisSentinelBackend(sentinel_options(topology, max_retries=5))) as client:
        await client.set("before", 1)
        assert wait_replicated(topology.primary()) == 1
        old = topology.master_addr()
        new = await asyncio.to_thread(topology.failover, 60.0)  # asks the sentinels, with their password
        assert new != old
        await client.set("after", 2)
        with direct(topology.primary()) as conn:
            assert conn.get("after") == b"2"
        assert await client.get("before") == 1


async def test_acl_sentinels_agree_on_a_crashed_primary(redis_sentinel_factory: SentinelFactory) -> None:
    # An unplanned failover needs the sentinels' votes: they must log in to each other
    # (sentinel-user / sentinel-pass), and the replica to be in sync (masteruser / masterauth).
    topology = redis_sentinel_factory(variant="acl")
    async with Client(RedisSentinelBackend(sentinel_options(topology, max_retries=5))) as client:
        await client.set("before", 1)
        assert wait_replicated(topology.primary()) == 1
        old = topology.primary()
        old.kill()
        deadline = time.monotonic() + 60
        while True:
            try:
                if topology.master_addr() != f"{old.host}:{old.port}":
                    break
            except (redis.RedisError, OSError, LookupError):
                pass
            assert time.monotonic() < deadline, "the sentinels never promoted the replica"
            await asyncio.sleep(0.2)
        await asyncio.to_thread(topology.wait_ready, 60.0, replication=False)
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.set("after", 2)
                break
            except BackendUnavailableError:
                assert time.monotonic() < deadline, "writes never reached the new primary"
                await asyncio.sleep(0.2)
        assert await client.get("before") == 1
        assert await client.get("after") == 2


class TestTlsSentinelConformance(BackendConformance):
    """The conformance suite through TLS sentinels to a TLS primary."""

    @pytest.fixture
    async def kv_backend(self, topologies: Topologies) -> AsyncIterator[RedisSentinelBackend]:
        topology = topologies.sentinel("tls")
        topology.flushall()
        backend = RedisSentinelBackend(sentinel_options(topology))
        yield backend
        await backend.close()
