"""Client-side caching on a cluster: broadcast tracking, one listener per primary.

Hits are served from memory; writes from another client, on any primary, drop
the entry before a later read (we wait for the invalidation message, never
sleep); memory stays bounded; a lost listener or a failover flushes the cache,
and so does a listener coming back, after which caching resumes; a slot
migrating to another primary never leaves a stale entry, and reads redirected
during it are not cached; close() leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from conftest import Invalidations, redis_options
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from test_conformance_cluster import TestClusterConformance as _ClusterConformance

from kivigo_async import Client
from kivigo_async.backends.redis import (
    ClientCache,
    LocalCache,
    RedisBackend,
    RedisClusterBackend,
    RedisClusterOptions,
)
from kivigo_async.errors import BackendUnavailableError, ConfigurationError, OperationTimeoutError
from kivigo_async.testing.pytest_plugin import ClusterFactory
from kivigo_async.testing.servers import RedisServer
from kivigo_async.testing.topologies import RedisCluster, wait_replicated

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]


def sync_client(node: RedisServer) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port, socket_timeout=5)


def addr(node: RedisServer) -> str:
    return f"{node.host}:{node.port}"


def one_key_per_primary(cluster: RedisCluster, prefix: str) -> dict[str, str]:
    """Primary address -> a key (``prefix`` + n) that lives on it."""
    found: dict[str, str] = {}
    wanted = {addr(p) for p in cluster.primaries()}
    n = 0
    while found.keys() != wanted:
        key = f"{prefix}{n}"
        found.setdefault(addr(cluster.node_for_slot(key_slot(key.encode()))), key)
        n += 1
    return found


def server_reads(cluster: RedisCluster) -> dict[str, int]:
    """Per primary: key lookups (keyspace hits + misses) since the last CONFIG RESETSTAT."""
    reads = {}
    for node in cluster.primaries():
        with sync_client(node) as client:
            stats: dict[str, Any] = client.info("stats")
        reads[addr(node)] = int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])
    return reads


def reset_stats(cluster: RedisCluster) -> None:
    for node in cluster.primaries():
        with sync_client(node) as client:
            client.config_resetstat()


def tracking_clients(node: RedisServer, name: str) -> list[dict[str, Any]]:
    """Connections named ``name`` with tracking on (our listener on that node, if up)."""
    with sync_client(node) as client:
        clients: list[dict[str, Any]] = client.client_list()
    return [c for c in clients if c.get("name") == name and "t" in str(c.get("flags", ""))]


def node_id(node: RedisServer) -> str:
    with sync_client(node) as client:
        raw: bytes = client.execute_command("CLUSTER", "MYID")
    return raw.decode()


def begin_migration(slot: int, source: RedisServer, target: RedisServer) -> None:
    """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on ``source``: moved keys are answered with ASK."""
    with sync_client(source) as src, sync_client(target) as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))


def move_keys(source: RedisServer, target: RedisServer, keys: list[str]) -> None:
    with sync_client(source) as src:
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)


def finish_migration(cluster: RedisCluster, slot: int, target: RedisServer) -> None:
    """``SETSLOT NODE`` on the new owner first, then on the other primaries: the old one answers MOVED."""
    target_id = node_id(target)
    for node in [target, *(p for p in cluster.primaries() if p is not target)]:
        with sync_client(node) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


@contextlib.contextmanager
def new_connections_refused(node: RedisServer) -> Iterator[redis.Redis]:
    """``node`` refuses new connections (those already open keep working) until the block ends.

    Yields an admin connection to it, opened before the limit.
    """
    with sync_client(node) as admin:
        maxclients = admin.config_get("maxclients")["maxclients"]
        admin.config_set("maxclients", 1)
        try:
            yield admin
        finally:
            admin.config_set("maxclients", maxclients)


def migration_plan(cluster: RedisCluster, tag: str) -> tuple[int, RedisServer, RedisServer]:
    """The slot of hash tag ``tag``, its primary, and another primary to move it to."""
    slot = key_slot(tag.encode())
    source = cluster.node_for_slot(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    return slot, source, target


def cache_of(backend: RedisClusterBackend) -> LocalCache:
    assert backend.client_cache is not None
    return backend.client_cache


async def cached_again(client: Client, key: str, timeout: float = 15.0) -> None:
    """Read ``key`` until a repeated read is a hit: its node's listener is back.

    Nothing announces "listening again" besides the flush that comes with it,
    so this polls the behaviour itself, bounded.
    """
    cache = cache_of(client.backend)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while True:
        await client.get(key)
        hits = cache.stats.hits
        await client.get(key)
        if cache.stats.hits > hits:
            return
        assert time.monotonic() < deadline, f"{key!r} was never cached again"
        await asyncio.sleep(0.05)


@pytest.fixture
def name() -> str:
    return f"kivigo-cc-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(redis_cluster: RedisCluster, name: str) -> AsyncIterator[Client]:
    redis_cluster.flushall()
    options = RedisClusterOptions(
        addrs=redis_cluster.addrs[:1], client_name=name, client_cache=ClientCache(max_entries=100, ttl=30)
    )
    async with Client(RedisClusterBackend(options)) as client:  # connect() starts the listeners
        yield client


@pytest.fixture
async def other(redis_cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    """Another, plain redis-py cluster client: its writes reach us only as invalidations."""
    seed = redis_cluster.primaries()[0]
    other = AsyncRedisCluster(host=seed.host, port=seed.port)
    yield other
    await other.aclose()


@pytest.fixture
def keys(redis_cluster: RedisCluster) -> dict[str, str]:
    return one_key_per_primary(redis_cluster, "cc:")


def backend_of(client: Client) -> RedisClusterBackend:
    backend = client.backend
    assert isinstance(backend, RedisClusterBackend)
    return backend


async def test_hits_are_served_without_a_round_trip(
    client: Client, redis_cluster: RedisCluster, keys: dict[str, str]
) -> None:
    cache = cache_of(backend_of(client))
    for key in keys.values():
        await client.set(key, {"v": key})
        assert await client.get(key) == {"v": key}
    reset_stats(redis_cluster)
    hits = cache.stats.hits
    for _ in range(20):
        for key in keys.values():
            assert await client.get(key) == {"v": key}
    assert cache.stats.hits == hits + 20 * len(keys)
    assert server_reads(redis_cluster) == dict.fromkeys(keys, 0)  # no primary was asked


async def test_writes_elsewhere_invalidate_on_every_primary(
    client: Client, other: AsyncRedisCluster, keys: dict[str, str]
) -> None:
    assert len(keys) == 3
    cache = cache_of(backend_of(client))
    for key in keys.values():
        await client.set(key, "old")
        assert await client.get(key) == "old"
        assert await client.get(key) == "old"  # cached now
    watcher = Invalidations(cache)
    for key in keys.values():
        await other.set(key, b'"new"')
        await watcher.wait_for(key)
        assert await client.get(key) == "new"
        assert await client.get(key) == "new"  # and cached again
        await other.delete(key)
        await watcher.wait_for(key, count=2)
        assert await client.get(key, default=None) is None


@contextlib.contextmanager
def invalidations_held(backend: RedisClusterBackend) -> Iterator[None]:
    """Stop reading the listeners' sockets: only our own bookkeeping can drop entries meanwhile.

    The server reports our own writes too, usually before we read again: holding
    those messages back shows that read-your-writes does not depend on them.
    """
    assert backend._tracking is not None
    transports: list[asyncio.Transport] = []
    for listener in backend._tracking._listeners.values():
        protocol = listener.conn._protocol
        assert protocol is not None
        assert protocol._transport is not None
        transports.append(protocol._transport)
    assert len(transports) == 3
    for transport in transports:
        transport.pause_reading()
    try:
        yield
    finally:
        for transport in transports:
            transport.resume_reading()


async def test_own_writes_are_read_back_at_once(client: Client) -> None:
    k = "{mine}:k"
    cache = cache_of(backend_of(client))
    with invalidations_held(backend_of(client)):
        await client.set(k, 1)
        assert await client.get(k) == 1
        hits = cache.stats.hits
        assert await client.get(k) == 1
        assert cache.stats.hits == hits + 1  # served from memory from here on
        await client.set(k, 2)
        assert await client.get(k) == 2
        await client.batch_set({k: 3, "elsewhere": 0})
        assert await client.get(k) == 3
        await client.batch_set({k: 4}, ttl=60)
        assert await client.get(k) == 4
        async with client.transaction() as tx:
            tx.set(k, 5)
        assert await client.get(k) == 5
        async with client.transaction(watch=[k]) as tx:
            tx.set(k, await tx.get(k, int) + 1)
        assert await client.get(k) == 6
        assert await client.batch_get([k, "elsewhere"]) == {k: 6, "elsewhere": 0}
        await client.delete(k)
        assert await client.get(k, default=None) is None
        await client.set(k, 7)
        assert await client.get(k) == 7
        await client.batch_delete([k])
        assert await client.get(k, default=None) is None
        assert await client.batch_get([k]) == {}


async def test_expire_and_persist_drop_the_cached_copy(client: Client) -> None:
    await client.set("e", 1)
    assert await client.get("e") == 1
    assert await client.get("e") == 1
    cache = cache_of(backend_of(client))
    assert cache.lookup("e") == b"1"
    with invalidations_held(backend_of(client)):
        assert await client.expire("e", 60)
        assert cache.lookup("e") is None  # re-read with its new TTL
        assert await client.get("e") == 1
        assert cache.lookup("e") == b"1"
        assert await client.persist("e")
        assert cache.lookup("e") is None


async def test_cached_value_never_outlives_its_ttl(client: Client) -> None:
    await client.set("short", "v", ttl=3.0)  # room for a stall before the two reads
    assert await client.get("short") == "v"
    assert await client.get("short") == "v"
    assert len(cache_of(backend_of(client))) == 1
    await asyncio.sleep(3.2)  # waiting out a TTL, not an invalidation
    assert await client.get("short", default=None) is None


def test_server_ttl_counts_from_when_the_read_was_sent() -> None:
    cache = LocalCache(ClientCache(ttl=60))
    cache.enabled = True
    epoch = cache.begin("slow")
    sent_at = time.monotonic()
    time.sleep(0.05)  # the reply took longer than the key had left
    cache.complete("slow", epoch, b"v", ttl_ms=40, sent_at=sent_at)
    assert cache.lookup("slow") is None
    cache.complete("fast", cache.begin("fast"), b"v", ttl_ms=60_000, sent_at=time.monotonic())
    assert cache.lookup("fast") == b"v"


def test_entry_lifetime_is_capped_by_the_server_ttl() -> None:
    cache = LocalCache(ClientCache(ttl=60))
    cache.enabled = True
    cache.complete("k", cache.begin("k"), b"v", ttl_ms=1)
    cache.complete("forever", cache.begin("forever"), b"v", ttl_ms=None)
    time.sleep(0.01)
    assert cache.lookup("k") is None
    assert cache.lookup("forever") == b"v"


async def test_batch_get_uses_hits_and_fetches_only_misses(
    client: Client, redis_cluster: RedisCluster
) -> None:
    data = {f"bg:{i}": i for i in range(30)}
    await client.batch_set(data)
    warm = list(data)[:10]
    for key in warm:
        assert await client.get(key) == data[key]
    cache = cache_of(backend_of(client))
    hits = cache.stats.hits
    reset_stats(redis_cluster)
    assert await client.batch_get([*data, "bg:missing"], int) == data
    assert cache.stats.hits == hits + len(warm)
    # Each fetched key is read twice on its node (its value and its TTL); cached keys never.
    assert sum(server_reads(redis_cluster).values()) == 2 * (len(data) - len(warm) + 1)
    # Now every existing key is cached: nothing is asked of the server.
    reset_stats(redis_cluster)
    assert await client.batch_get(list(data), int) == data
    assert sum(server_reads(redis_cluster).values()) == 0
    assert cache.stats.hits == hits + len(warm) + len(data)


async def test_batch_get_values_are_invalidated_too(
    client: Client, other: AsyncRedisCluster, keys: dict[str, str]
) -> None:
    await client.batch_set(dict.fromkeys(keys.values(), 1))
    assert await client.batch_get(list(keys.values()), int) == dict.fromkeys(keys.values(), 1)
    cache = cache_of(backend_of(client))
    assert len(cache) == len(keys)
    watcher = Invalidations(cache)
    for key in keys.values():
        await other.set(key, b"2")
        await watcher.wait_for(key)
    assert await client.batch_get(list(keys.values()), int) == dict.fromkeys(keys.values(), 2)


async def test_batch_get_reads_a_key_of_another_type_as_missing(
    client: Client, other: AsyncRedisCluster
) -> None:
    # As without the cache and on one server: a key alone in its slot is read with
    # MGET too, which answers nil for a hash where GET fails with WRONGTYPE.
    await client.batch_set({"typed:str": 1})
    await other.hset("typed:hash", "field", "value")
    assert await client.batch_get(["typed:hash"]) == {}
    assert await client.batch_get(["typed:hash", "typed:str"], int) == {"typed:str": 1}


async def test_memory_stays_bounded(redis_cluster: RedisCluster) -> None:
    redis_cluster.flushall()
    options = RedisClusterOptions(addrs=redis_cluster.addrs[:1], client_cache=ClientCache(max_entries=50))
    async with Client(RedisClusterBackend(options)) as client:
        cache = cache_of(backend_of(client))
        data = {f"b:{i}": i for i in range(300)}
        await client.batch_set(data)
        for key, value in data.items():
            assert await client.get(key) == value
        assert len(cache) == 50
        # The most recently read entries are the ones kept.
        hits = cache.stats.hits
        for key in list(data)[-50:]:
            assert await client.get(key) == data[key]
        assert cache.stats.hits == hits + 50
        assert await client.batch_get(list(data), int) == data
        assert len(cache) == 50


async def test_flushall_elsewhere_drops_everything(
    client: Client, redis_cluster: RedisCluster, keys: dict[str, str]
) -> None:
    await client.batch_set(dict.fromkeys(keys.values(), 1))
    for key in keys.values():
        assert await client.get(key) == 1
    cache = cache_of(backend_of(client))
    watcher = Invalidations(cache)
    primary = redis_cluster.primaries()[0]
    with sync_client(primary) as direct:
        direct.flushall()
    await watcher.wait_for(None)
    assert len(cache) == 0


async def test_a_bogus_message_on_the_invalidation_channel_is_ignored(
    client: Client, redis_cluster: RedisCluster, other: AsyncRedisCluster, keys: dict[str, str]
) -> None:
    # Any client allowed to PUBLISH can send to the channel, a string where the
    # server sends a list of keys. It must not end the listener (a flush and a
    # reconnect per message), and the server's own messages must still count.
    cache = cache_of(backend_of(client))
    tracking = backend_of(client)._tracking
    assert tracking is not None
    node = redis_cluster.primaries()[0]
    key = keys[addr(node)]
    await client.set(key, "v1")
    assert await client.get(key) == "v1"
    assert await client.get(key) == "v1"  # cached now
    listener = tracking._listeners[addr(node)]
    before = (listener.client_id, listener._generation)
    watcher = Invalidations(cache)
    with sync_client(node) as direct:
        assert direct.publish("__redis__:invalidate", "x") >= 1
    await other.set(key, b'"v2"')  # its message follows the bogus one on the same socket
    await watcher.wait_for(key)
    assert None not in watcher.seen  # no flush
    assert listener.live
    assert (listener.client_id, listener._generation) == before  # no reconnect
    assert await client.get(key) == "v2"
    assert await client.get(key) == "v2"
    assert cache.lookup(key) == b'"v2"'


async def test_killed_listener_flushes_and_recovers(
    client: Client, redis_cluster: RedisCluster, other: AsyncRedisCluster, keys: dict[str, str], name: str
) -> None:
    cache = cache_of(backend_of(client))
    for key in keys.values():
        await client.set(key, "v1")
        assert await client.get(key) == "v1"
    assert len(cache) == len(keys)
    node = redis_cluster.primaries()[1]
    key = keys[addr(node)]
    [listener] = tracking_clients(node, name)  # data connections never turn tracking on
    watcher = Invalidations(cache)
    with sync_client(node) as direct:
        assert direct.client_kill_filter(_id=listener["id"]) == 1
    await watcher.wait_for(None)  # dropped as soon as the loss is seen
    assert len(cache) == 0

    # A change made while nobody listened on that node is read, never the old copy.
    await other.set(key, b'"v2"')
    assert await client.get(key) == "v2"
    await cached_again(client, key)
    [again] = tracking_clients(node, name)
    assert again["id"] != listener["id"]  # a new connection, tracking again
    before = watcher.counts([key])  # v2's message may have come, once the listener was back
    await other.set(key, b'"v3"')
    await watcher.wait_for_more(before)
    assert await client.get(key) == "v3"


async def test_no_caching_while_a_listener_is_down(
    client: Client, redis_cluster: RedisCluster, other: AsyncRedisCluster, keys: dict[str, str], name: str
) -> None:
    cache = cache_of(backend_of(client))
    node = redis_cluster.primaries()[2]
    key = keys[addr(node)]
    await client.set(key, "v1")
    assert await client.get(key) == "v1"
    assert await other.get(key) == b'"v1"'  # other's connection to the node is open now
    [listener] = tracking_clients(node, name)
    watcher = Invalidations(cache)
    # The listener cannot come back, while the connections already open (ours,
    # other's, the admin one) keep working.
    with new_connections_refused(node) as admin:
        assert admin.client_kill_filter(_id=listener["id"]) == 1
        await watcher.wait_for(None)
        await other.set(key, b'"v2"')
        hits = cache.stats.hits
        assert await client.get(key) == "v2"
        assert await client.get(key) == "v2"
        assert cache.stats.hits == hits  # not cached: nobody would tell us of a change
        await other.set(key, b'"v3"')
        assert await client.get(key) == "v3"
    await cached_again(client, key)
    before = watcher.counts([key])
    await other.set(key, b'"v4"')
    await watcher.wait_for_more(before)
    assert await client.get(key) == "v4"


async def test_listener_coming_back_flushes_then_caching_resumes(
    client: Client, redis_cluster: RedisCluster, other: AsyncRedisCluster, keys: dict[str, str], name: str
) -> None:
    cache = cache_of(backend_of(client))
    tracking = backend_of(client)._tracking
    assert tracking is not None
    node = redis_cluster.primaries()[0]
    node_key = keys[addr(node)]
    elsewhere = [key for at, key in keys.items() if at != addr(node)]
    watcher = Invalidations(cache)
    before = watcher.counts(list(keys.values()))
    for key in keys.values():
        await other.set(key, b"1")
    await watcher.wait_for_more(before)  # no message of these writes can come later
    assert await client.get(node_key) == 1
    [listener] = tracking_clients(node, name)
    # Reads the cache cannot serve re-read on the node's multiplexed connection:
    # opened now, before new connections are refused.
    assert await client.ttl(node_key) is None
    # The listener cannot come back until the block ends, so what we cache meanwhile is known.
    with new_connections_refused(node) as admin:
        assert admin.client_kill_filter(_id=listener["id"]) == 1
        await watcher.wait_for(None)  # the flush on loss
        assert len(cache) == 0
        for key in elsewhere:  # their nodes' listeners are up: cached as usual
            assert await client.get(key) == 1
            assert cache.lookup(key) == b"1"
        assert await client.get(node_key) == 1
        assert cache.lookup(node_key) is None  # nobody listens on its node
        assert not tracking._listeners[addr(node)].live
        flushes = watcher.seen.count(None)
    # The listener comes back by itself: that flush drops everything cached before it.
    await watcher.wait_for(None, timeout=15, count=flushes + 1)
    assert tracking._listeners[addr(node)].live
    assert len(cache) == 0
    for key in elsewhere:
        assert cache.lookup(key) is None
    [again] = tracking_clients(node, name)
    assert again["id"] != listener["id"]
    # Caching resumes on every node, the restarted one included, and its invalidations arrive.
    for key in keys.values():
        assert await client.get(key) == 1
        assert cache.lookup(key) == b"1"
    await other.set(node_key, b"2")
    await watcher.wait_for(node_key, count=before[node_key] + 2)
    assert await client.get(node_key) == 2


async def test_silent_listener_is_found_by_its_heartbeat(
    redis_cluster: RedisCluster, keys: dict[str, str], name: str
) -> None:
    redis_cluster.flushall()
    options = RedisClusterOptions(
        addrs=redis_cluster.addrs[:1], client_name=name, read_timeout=0.5, client_cache=ClientCache()
    )
    node = redis_cluster.primaries()[0]
    key = keys[addr(node)]
    async with Client(RedisClusterBackend(options)) as client:
        cache = cache_of(backend_of(client))
        await client.set(key, 1)
        assert await client.get(key) == 1
        watcher = Invalidations(cache)
        with redis.Redis(host=node.host, port=node.port, socket_timeout=15) as admin:
            # For 5 s the connection stays open but nothing is answered, as in a
            # partition: only the heartbeat can tell. Without it there is no flush at all.
            admin.execute_command("CLIENT", "PAUSE", 5000, "ALL")
            try:
                await watcher.wait_for(None, timeout=15)
                assert len(cache) == 0
            finally:
                # The server runs it once the pause is over: the next test finds it ended.
                await asyncio.to_thread(admin.execute_command, "CLIENT", "UNPAUSE")
        await cached_again(client, key)


async def test_prefixes_limit_caching_and_invalidations(
    redis_cluster: RedisCluster, other: AsyncRedisCluster
) -> None:
    redis_cluster.flushall()
    settings = ClientCache(prefixes=["hot:", "warm:"])
    options = RedisClusterOptions(addrs=redis_cluster.addrs[:1], client_cache=settings)
    async with Client(RedisClusterBackend(options)) as client:
        cache = cache_of(backend_of(client))
        hot, cold = "hot:{p}", "cold:{p}"  # one slot, so one node and one ordered stream
        await client.batch_set({hot: 1, cold: 1})
        for _ in range(2):
            assert await client.get(hot) == 1
            assert await client.get(cold) == 1
        assert cache.lookup(hot) == b"1"
        assert cache.lookup(cold) is None  # outside the prefixes: never cached
        watcher = Invalidations(cache)
        await other.set(cold, b"2")
        await other.set(hot, b"2")
        await watcher.wait_for(hot)
        # Both changes went out in this order on the same node: had the server
        # reported the cold key, it would be here already.
        assert cold not in watcher.seen
        assert await client.batch_get([hot, cold], int) == {hot: 2, cold: 2}


async def test_prefixes_filter_a_single_server_cache_too(valkey_server: RedisServer) -> None:
    options = redis_options(valkey_server, client_cache=ClientCache(prefixes=["hot:"]))
    async with Client(RedisBackend(options)) as client:
        backend = client.backend
        assert isinstance(backend, RedisBackend)
        assert backend.client_cache is not None
        cache = backend.client_cache
        await client.batch_set({"hot:1": 1, "cold:1": 1})
        for _ in range(2):
            assert await client.get("hot:1") == 1
            assert await client.get("cold:1") == 1
        assert cache.stats.hits == 1
        assert len(cache) == 1


async def test_close_leaves_no_tasks_or_connections(redis_cluster: RedisCluster, name: str) -> None:
    before = asyncio.all_tasks()
    options = RedisClusterOptions(addrs=redis_cluster.addrs[:1], client_name=name, client_cache=ClientCache())
    backend = RedisClusterBackend(options)
    async with Client(backend) as client:
        await client.set("c", 1)
        assert await client.get("c") == 1
        assert await client.get("c") == 1
        assert all(len(tracking_clients(p, name)) == 1 for p in redis_cluster.primaries())
    assert asyncio.all_tasks() - before == set()
    cache = cache_of(backend)
    assert len(cache) == 0
    assert not cache.enabled

    async def gone() -> None:
        # The server drops a closed connection when it reads the FIN: bounded poll.
        while any(tracking_clients(p, name) for p in redis_cluster.primaries()):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await asyncio.wait_for(gone(), 10)


async def test_failover_never_serves_a_stale_value(redis_cluster_factory: ClusterFactory, name: str) -> None:
    cluster = redis_cluster_factory(node_timeout_ms=1000)
    keys = one_key_per_primary(cluster, "fo:")
    options = RedisClusterOptions(
        addrs=cluster.addrs,
        client_cache=ClientCache(ttl=None),  # only invalidations may drop an entry
        client_name=name,
        dial_timeout=1,
        read_timeout=1,
        max_retries=2,
    )
    survivor = cluster.primaries()[0]
    victim = cluster.primaries()[1]
    victim_key = keys[addr(victim)]
    async with Client(RedisClusterBackend(options)) as client:
        cache = cache_of(backend_of(client))
        await client.batch_set(dict.fromkeys(keys.values(), "v1"))
        for key in keys.values():
            assert await client.get(key) == "v1"
            assert await client.get(key) == "v1"
        assert len(cache) == len(keys)
        assert wait_replicated(victim) == 1  # the replica has v1 too

        watcher = Invalidations(cache)
        victim.kill()
        await watcher.wait_for(None)  # its listener is gone: everything is dropped
        assert len(cache) == 0
        await asyncio.to_thread(cluster.wait_ready, 60.0, expected_nodes=5)
        promoted = cluster.node_for_slot(key_slot(victim_key.encode()))
        assert promoted is not victim

        other = AsyncRedisCluster(host=survivor.host, port=survivor.port)
        try:
            for key in keys.values():
                await other.set(key, b'"v2"')
            # Reads may fail while the backend learns the new layout; none may return v1.
            deadline = time.monotonic() + 60
            for key in keys.values():
                while True:
                    try:
                        assert await client.get(key) == "v2"
                        break
                    except (BackendUnavailableError, OperationTimeoutError):
                        assert time.monotonic() < deadline, "the backend never recovered"
                        await asyncio.sleep(0.2)

            # The promoted primary gets a listener: its keys are cached, and invalidated, again.
            await cached_again(client, victim_key, timeout=30)
            before = watcher.counts([victim_key])
            await other.set(victim_key, b'"v3"')
            await watcher.wait_for_more(before)
            assert await client.get(victim_key) == "v3"
            assert tracking_clients(promoted, name)
        finally:
            await other.aclose()

        # The dead primary's listener is retired (it stopped retrying), one per primary remains.
        tracking = backend_of(client)._tracking
        assert tracking is not None
        primaries = {addr(p) for p in cluster.primaries()}

        async def retired() -> None:
            while tracking._listeners.keys() != primaries:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(retired(), 15)


async def test_manual_failover_is_noticed_without_any_read(
    redis_cluster_factory: ClusterFactory, name: str
) -> None:
    # Every read after the failover could be a cache hit, so the data path would never
    # learn the new layout; the listeners' role check must, and listen to the new primary.
    # The failover is asked for: a node timeout a loaded machine cannot set one off by mistake.
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    keys = one_key_per_primary(cluster, "mfo:")
    options = RedisClusterOptions(addrs=cluster.addrs, client_cache=ClientCache(ttl=None), client_name=name)
    old = cluster.primaries()[0]
    key = keys[addr(old)]
    replica = next(
        info.server
        for info in cluster.topology()
        if info.server is not None and info.master_id == node_id(old)
    )
    async with Client(RedisClusterBackend(options)) as client:
        backend = backend_of(client)
        cache = cache_of(backend)
        tracking = backend._tracking
        assert tracking is not None
        await client.set(key, "v1")
        await cached_again(client, key)
        assert wait_replicated(old) == 1
        watcher = Invalidations(cache)
        with sync_client(replica) as promote:
            promote.execute_command("CLUSTER", "FAILOVER")  # coordinated: no write is lost

        async def listening_to_the_new_primary() -> None:
            while addr(replica) not in tracking._listeners or addr(old) in tracking._listeners:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(listening_to_the_new_primary(), 30)
        await watcher.wait_for(None)  # retiring the old primary's listener dropped everything
        assert cache.lookup(key) is None
        await cached_again(client, key)  # cached again, now under the new primary's listener
        with sync_client(replica) as direct:
            direct.set(key, b'"v2"')
        await watcher.wait_for(key)
        assert await client.get(key) == "v2"


async def test_slot_migration_never_serves_a_stale_value(
    redis_cluster_factory: ClusterFactory, name: str
) -> None:
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    slot, source, target = migration_plan(cluster, "mig")
    keys = [f"{{mig}}:{i}" for i in range(6)]
    options = RedisClusterOptions(
        addrs=cluster.addrs,
        client_name=name,
        client_cache=ClientCache(ttl=None),  # only invalidations may drop an entry
    )
    seed = cluster.primaries()[0]
    other = AsyncRedisCluster(host=seed.host, port=seed.port)
    async with Client(RedisClusterBackend(options)) as client:
        cache = cache_of(backend_of(client))
        watcher = Invalidations(cache)
        # floor[key]: a version whose invalidation has been handled; a read begun
        # after that must return it or a later one, never an older one.
        floor = dict.fromkeys(keys, 0)

        async def write(version: int) -> None:
            """Write ``version`` everywhere from the other client; return once we were told."""
            before = watcher.counts(keys)
            for key in keys:
                await other.set(key, str(version).encode())
            await watcher.wait_for_more(before)
            floor.update(dict.fromkeys(keys, version))

        try:
            await write(1)
            for key in keys:
                assert await client.get(key) == 1
                assert cache.lookup(key) == b"1"  # cached from the old owner

            before = watcher.counts(keys)
            await asyncio.to_thread(begin_migration, slot, source, target)
            await asyncio.to_thread(move_keys, source, target, keys)
            await asyncio.to_thread(finish_migration, cluster, slot, target)
            # Each key is announced twice: deleted on the old owner, created on the new one.
            await watcher.wait_for_more(before, 2)
            assert all(cache.lookup(key) is None for key in keys)
            with sync_client(target) as direct:
                assert direct.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == len(keys)

            stop = asyncio.Event()
            reads = [0]

            async def reader() -> None:
                # Reads all along, from memory or not: none may go back in time.
                while not stop.is_set():
                    for key in keys:
                        least = floor[key]
                        value = await client.get(key, int)
                        assert value >= least, f"{key}: read {value} after {least} was announced"
                        reads[0] += 1
                    await asyncio.sleep(0.001)  # hits never yield: let the rest of the test run

            reading = asyncio.create_task(reader())
            try:
                # The first read meets MOVED (not cached); after it, the new owner answers.
                for key in keys:
                    assert await client.get(key) == 1
                    assert await client.get(key) == 1
                    assert cache.lookup(key) == b"1"  # cached from the new owner
                for version in range(2, 6):
                    hits = cache.stats.hits
                    await write(version)
                    for key in keys:
                        assert await client.get(key) == version
                        assert await client.get(key) == version
                    assert cache.stats.hits > hits  # still served from memory in between
            finally:
                stop.set()
                await asyncio.wait_for(reading, 30)
            assert reads[0] > 0
        finally:
            await other.aclose()


async def test_redirected_reads_are_not_cached(redis_cluster_factory: ClusterFactory, name: str) -> None:
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    # One slot for single reads, one for batches: the first redirection of each
    # teaches the client the slot's new owner.
    plans = {tag: migration_plan(cluster, tag) for tag in ("one", "many")}
    gone = {tag: f"{{{tag}}}:gone" for tag in plans}  # moved first: answered with ASK
    here = {tag: f"{{{tag}}}:here" for tag in plans}  # moved last: answered with MOVED
    every = [*gone.values(), *here.values()]
    options = RedisClusterOptions(addrs=cluster.addrs, client_name=name, client_cache=ClientCache(ttl=None))
    seed = cluster.primaries()[0]
    other = AsyncRedisCluster(host=seed.host, port=seed.port)
    async with Client(RedisClusterBackend(options)) as client:
        cache = cache_of(backend_of(client))
        watcher = Invalidations(cache)
        try:
            before = watcher.counts(every)
            for key in every:
                await other.set(key, b"1")
            await watcher.wait_for_more(before)

            before = watcher.counts(list(gone.values()))
            for tag, (slot, source, target) in plans.items():
                await asyncio.to_thread(begin_migration, slot, source, target)
                await asyncio.to_thread(move_keys, source, target, [gone[tag]])
            await watcher.wait_for_more(before, 2)

            # ASK: the old owner still owns the slot but no longer has the key.
            for _ in range(2):
                assert await client.get(gone["one"]) == 1
            assert cache.lookup(gone["one"]) is None
            for _ in range(2):
                assert await client.batch_get([gone["many"]], int) == {gone["many"]: 1}
            assert cache.lookup(gone["many"]) is None
            # TRYAGAIN: the old owner refuses an MGET over a slot whose keys are split
            # between the two nodes; it is re-sent key by key, and nothing it read is
            # cached, not even the key the old owner still has.
            _, source, _ = plans["many"]
            with sync_client(source) as direct, pytest.raises(redis.exceptions.TryAgainError):
                direct.mget([gone["many"], here["many"]])
            pair = [gone["many"], here["many"]]
            for _ in range(2):
                assert await client.batch_get(pair, int) == dict.fromkeys(pair, 1)
            assert cache.lookup(gone["many"]) is None
            assert cache.lookup(here["many"]) is None
            # The keys it still has are answered directly, and cached.
            assert await client.get(here["one"]) == 1
            assert cache.lookup(here["one"]) == b"1"
            assert await client.batch_get([here["many"]], int) == {here["many"]: 1}
            assert cache.lookup(here["many"]) == b"1"

            before = watcher.counts(list(here.values()))
            for tag, (slot, source, target) in plans.items():
                await asyncio.to_thread(move_keys, source, target, [here[tag]])
                await asyncio.to_thread(finish_migration, cluster, slot, target)
            await watcher.wait_for_more(before, 2)
            assert all(cache.lookup(key) is None for key in every)

            # MOVED: the client still takes the old owner for the slot's owner.
            assert await client.get(here["one"]) == 1
            assert cache.lookup(here["one"]) is None
            assert await client.batch_get([here["many"]], int) == {here["many"]: 1}
            assert cache.lookup(here["many"]) is None
            # Both taught the client the new owner: from there on, reads are cached again.
            assert await client.get(here["one"]) == 1
            assert cache.lookup(here["one"]) == b"1"
            assert await client.batch_get([here["many"]], int) == {here["many"]: 1}
            assert cache.lookup(here["many"]) == b"1"
        finally:
            await other.aclose()


def test_options_are_checked() -> None:
    assert ClientCache(prefixes=["a:", "b:"]).prefixes == ("a:", "b:")
    bad_caches: list[dict[str, Any]] = [
        {"prefixes": "user:"},
        {"prefixes": [""]},
        {"prefixes": ["user:", "user:1"]},
        {"prefixes": ["x", "x"]},
        {"prefixes": [1]},
    ]
    for bad in bad_caches:
        with pytest.raises(ConfigurationError):
            ClientCache(**bad)
    with pytest.raises(ConfigurationError, match="read_from_replicas"):
        RedisClusterOptions(addrs=["n1:7000"], client_cache=ClientCache(), read_from_replicas=True)
    with pytest.raises(ConfigurationError):
        RedisClusterOptions(addrs=["n1:7000"], client_cache={"max_entries": 10})  # type: ignore[arg-type]
    opts = RedisClusterOptions.from_url("redis://n1:7000", client_cache=ClientCache(max_entries=5))
    assert opts.client_cache == ClientCache(max_entries=5)
    assert RedisClusterBackend(RedisClusterOptions(addrs=["n1:7000"])).client_cache is None


class TestCachedClusterConformance(_ClusterConformance):
    """The whole conformance suite, with every read going through the cache."""

    @pytest.fixture
    async def kv_backend(self, redis_cluster: RedisCluster) -> AsyncIterator[RedisClusterBackend]:
        redis_cluster.flushall()
        options = RedisClusterOptions(addrs=redis_cluster.addrs[:1], client_cache=ClientCache())
        backend = RedisClusterBackend(options)
        await backend.connect()  # listening before the first read, so reads are cached
        yield backend
        await backend.close()
