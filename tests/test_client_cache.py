"""Client-side caching: served from memory, invalidated by the server, flushed on reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import Invalidations, cancel_close_after, eventually, redis_options
from redis.asyncio import Redis

from kivigo_async import Client, ConfigurationError, KeyNotFoundError
from kivigo_async.backends.redis import ClientCache, LocalCache, RedisBackend, RedisOptions
from kivigo_async.backends.redis._mux import backoff, listener_backoff, tcp_opener
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.pytest_plugin import ServerFactory
from kivigo_async.testing.servers import RedisServer


@pytest.fixture
async def admin(valkey_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis(**valkey_server.redis_kwargs())  # type: ignore[arg-type]
    await redis.flushdb()
    yield redis
    await redis.aclose()


@pytest.fixture
async def client(valkey_server: RedisServer) -> AsyncIterator[Client]:
    options = redis_options(valkey_server, client_cache=ClientCache(max_entries=100, ttl=30))
    async with Client(RedisBackend(options)) as client:
        yield client


def cache_of(client: Client) -> LocalCache:
    backend = client.backend
    assert isinstance(backend, RedisBackend)
    assert backend.client_cache is not None
    return backend.client_cache


def backend_of(client: Client) -> RedisBackend:
    backend = client.backend
    assert isinstance(backend, RedisBackend)
    return backend


def transport_of(conn: Any) -> asyncio.Transport:
    """The socket under a multiplexed connection (it must be open)."""
    protocol = conn._protocol
    assert protocol is not None
    assert protocol._transport is not None
    transport: asyncio.Transport = protocol._transport
    return transport


@contextlib.contextmanager
def invalidations_held(backend: RedisBackend) -> Iterator[None]:
    """Stop reading the invalidation connection: the server's messages wait in the socket meanwhile.

    Whatever drops an entry then is our own bookkeeping, not the server's
    invalidation (which for an expired key comes only once the server gets to it).
    """
    assert backend._tracking is not None
    transport = transport_of(backend._tracking._conn)
    transport.pause_reading()
    try:
        yield
    finally:
        transport.resume_reading()


async def until_expired(admin: Redis, key: str, timeout: float = 10.0) -> None:
    """Poll the server (bounded) until ``key`` is gone: nothing announces an expiry to us."""
    deadline = time.monotonic() + timeout
    while await admin.exists(key):
        assert time.monotonic() < deadline, f"{key!r} never expired on the server"
        await asyncio.sleep(0.02)


async def get_calls(admin: Redis) -> int:
    stats: dict[str, Any] = await admin.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def test_repeated_reads_are_served_from_memory(client: Client, admin: Redis) -> None:
    await client.set("hot", {"v": 1})
    await admin.config_resetstat()
    for _ in range(50):
        assert await client.get("hot") == {"v": 1}
    assert await get_calls(admin) == 1
    assert cache_of(client).stats.hits == 49


async def test_write_from_another_connection_invalidates(client: Client, admin: Redis) -> None:
    await client.set("k", "old")
    assert await client.get("k") == "old"
    assert await client.get("k") == "old"  # cached now
    watcher = Invalidations(cache_of(client))
    await admin.set("k", b'"new"')
    await watcher.wait_for("k")
    assert await client.get("k") == "new"
    await admin.delete("k")
    await watcher.wait_for("k", count=2)  # the delete's own message, not the set's again
    assert await client.get("k", default=None) is None


async def test_own_writes_are_read_back_at_once(client: Client) -> None:
    await client.set("mine", 1)
    assert await client.get("mine") == 1
    await client.set("mine", 2)
    assert await client.get("mine") == 2
    await client.batch_set({"mine": 3})
    assert await client.get("mine") == 3
    await client.batch_set({"mine": 4}, ttl=60)
    assert await client.get("mine") == 4
    async with client.transaction() as tx:
        tx.set("mine", 5)
    assert await client.get("mine") == 5
    await client.delete("mine")
    assert await client.get("mine", default=None) is None
    await client.set("mine", 6)
    await client.batch_delete(["mine"])
    assert await client.get("mine", default=None) is None


async def test_both_spellings_of_a_key_share_one_entry(client: Client, admin: Redis) -> None:
    # "\udcc3\udca9" stands for the bytes of "é": one key on the server, so a write
    # under either spelling must reach a value cached under the other.
    escaped, text = "alias:\udcc3\udca9", "alias:é"
    await client.set(text, 1)
    assert await client.get(escaped) == 1
    assert await client.get(escaped) == 1  # cached now
    await client.set(text, 2)
    assert await client.get(escaped) == 2
    watcher = Invalidations(cache_of(client))
    await admin.set(text.encode(), b"3")
    await watcher.wait_for(text)
    assert await client.get(escaped) == 3


async def test_memory_stays_bounded(client: Client) -> None:
    await client.batch_set({f"b:{i}": i for i in range(500)})
    for i in range(500):
        assert await client.get(f"b:{i}") == i
    assert len(cache_of(client)) == 100
    # The most recently read entries are the ones kept.
    for i in range(400, 500):
        assert await client.get(f"b:{i}") == i
    assert cache_of(client).stats.hits >= 100


async def test_flushdb_elsewhere_drops_everything(client: Client, admin: Redis) -> None:
    await client.batch_set({"f1": 1, "f2": 2})
    assert await client.get("f1") == 1
    assert await client.get("f2") == 2
    watcher = Invalidations(cache_of(client))
    await admin.flushdb()
    await watcher.wait_for(None)
    assert len(cache_of(client)) == 0
    assert await client.get("f1", default=None) is None


async def test_a_bogus_message_on_the_invalidation_channel_is_ignored(client: Client, admin: Redis) -> None:
    # Any client allowed to PUBLISH can send to the channel, a string where the
    # server sends a list of keys. It must not end the listener (a flush and a
    # reconnect per message), and the server's own messages must still count.
    cache, tracking = cache_of(client), backend_of(client)._tracking
    assert tracking is not None
    await client.set("bogus", "v1")
    assert await client.get("bogus") == "v1"
    assert await client.get("bogus") == "v1"  # cached now
    listener, losses = tracking._client_id, tracking._losses
    watcher = Invalidations(cache)
    assert await admin.publish("__redis__:invalidate", "x") >= 1
    await admin.set("bogus", b'"v2"')  # its message follows the bogus one on the same socket
    await watcher.wait_for("bogus")
    assert watcher.seen == ["bogus"]  # no flush
    assert (tracking._client_id, tracking._losses) == (listener, losses)  # no reconnect
    assert cache.enabled
    assert await client.get("bogus") == "v2"
    assert await client.get("bogus") == "v2"
    assert cache.lookup("bogus") == b'"v2"'


async def test_lost_invalidation_connection_flushes_and_recovers(client: Client, admin: Redis) -> None:
    cache = cache_of(client)
    await client.set("r", "v1")
    assert await client.get("r") == "v1"
    assert len(cache) == 1
    watcher = Invalidations(cache)
    clients: list[dict[str, Any]] = await admin.client_list()
    subscribers = [c for c in clients if "SUBSCRIBE" in str(c.get("cmd", "")).upper() or c.get("sub") == "1"]
    assert len(subscribers) == 1
    await admin.client_kill_filter(_id=subscribers[0]["id"])
    await watcher.wait_for(None)  # the flush on loss
    assert len(cache) == 0

    async def restored() -> None:
        # The repair task flips a flag and announces nothing else: poll it, bounded below.
        while not cache.enabled:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await asyncio.wait_for(restored(), 10)
    # Tracking points at the new listener: caching and invalidation work again.
    assert await client.get("r") == "v1"
    assert await client.get("r") == "v1"
    assert len(cache) == 1
    await admin.set("r", b'"v2"')
    await watcher.wait_for("r")
    assert await client.get("r") == "v2"


async def subscriber_ids(admin: Redis) -> list[int]:
    clients: list[dict[str, Any]] = await admin.client_list()
    return [int(c["id"]) for c in clients if c.get("sub") == "1"]


async def until_tracking_works(client: Client, admin: Redis, key: str) -> None:
    """Bounded: the cache comes back on, pointed at the live listener, and sees a write from elsewhere."""
    cache, tracking = cache_of(client), backend_of(client)._tracking
    assert tracking is not None
    deadline = time.monotonic() + 10
    while not (cache.enabled and tracking._client_id is not None):
        assert time.monotonic() < deadline, "the client cache never came back on"
        await asyncio.sleep(0.02)
    assert await subscriber_ids(admin) == [tracking._client_id]
    assert await client.get(key) == "v1"  # cached again
    watcher = Invalidations(cache)
    await admin.set(key, b'"v2"')
    await watcher.wait_for(key)
    assert await client.get(key) == "v2"


async def test_a_listener_lost_during_the_repair_is_repaired_too(
    client: Client, admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listener dies; while the repair re-points tracking at the new one, that one
    # dies too. The repair must not turn the cache back on with tracking pointing at
    # nothing (stale reads until the data connection happened to reconnect).
    await client.set("rr", "v1")
    assert await client.get("rr") == "v1"
    backend = backend_of(client)
    assert backend._mux is not None
    assert backend._tracking is not None
    tracking = backend._tracking
    real = backend._mux.execute
    killed: list[int] = []

    async def repoint(*args: Any) -> Any:
        reply = await real(*args)
        if args[:2] == ("CLIENT", "TRACKING") and not killed:
            killed.append(int(args[-1]))
            await admin.client_kill_filter(_id=str(args[-1]))  # the new listener, before the repair ends
            while tracking._conn.connected:  # noqa: ASYNC110  # bounded by the wait below
                await asyncio.sleep(0.005)
        return reply

    monkeypatch.setattr(backend._mux, "execute", repoint)
    [first] = await subscriber_ids(admin)
    await admin.client_kill_filter(_id=str(first))
    deadline = time.monotonic() + 10
    while not killed:
        assert time.monotonic() < deadline, "the repair never re-pointed tracking"
        await asyncio.sleep(0.02)
    await asyncio.wait_for(until_tracking_works(client, admin, "rr"), 15)


async def test_a_listener_lost_as_it_subscribes_is_not_used(
    client: Client, admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The id saved must be that of the socket that subscribed: the listener closes
    # right after it answered CLIENT ID, before the tracking is pointed at it.
    await client.set("ls", "v1")
    tracking = backend_of(client)._tracking
    assert tracking is not None
    conn = tracking._conn
    killed: list[int] = []

    async def kill_after_client_id(reply: Any) -> None:
        if not killed:
            killed.append(int(reply))
            await admin.client_kill_filter(_id=str(reply))
            while conn.connected:  # noqa: ASYNC110  # bounded by the test's own wait below
                await asyncio.sleep(0.005)

    real_one, real_many = conn.execute, conn.execute_many

    async def one(*args: Any) -> Any:
        reply = await real_one(*args)
        if args == ("CLIENT", "ID"):
            await kill_after_client_id(reply)
        return reply

    async def many(commands: Any) -> list[Any]:
        replies = await real_many(commands)
        for command, reply in zip(commands, replies, strict=True):
            if tuple(command) == ("CLIENT", "ID"):
                await kill_after_client_id(reply)
        return replies

    monkeypatch.setattr(conn, "execute", one)
    monkeypatch.setattr(conn, "execute_many", many)
    [first] = await subscriber_ids(admin)
    await admin.client_kill_filter(_id=str(first))  # the next subscribe is the one that loses its socket
    await asyncio.wait_for(until_tracking_works(client, admin, "ls"), 15)
    assert killed


@pytest.mark.parametrize("read_timeout", [0.5, None])
async def test_a_silent_invalidation_connection_is_noticed(
    valkey_server: RedisServer, admin: Redis, read_timeout: float | None
) -> None:
    # A listener whose peer vanished without a word (a partition) delivers nothing,
    # and cache hits send nothing that could notice: the heartbeat does, and the
    # cache is dropped long before its ttl (without read_timeout, within seconds).
    options = redis_options(valkey_server, read_timeout=read_timeout, client_cache=ClientCache(ttl=600))
    async with Client(RedisBackend(options)) as client:
        cache = cache_of(client)
        await client.set("silent", "old")
        assert await client.get("silent") == "old"
        assert len(cache) == 1
        watcher = Invalidations(cache)
        tracking = backend_of(client)._tracking
        assert tracking is not None
        transport_of(tracking._conn).pause_reading()  # nothing arrives: no invalidation, no reply
        await admin.set("silent", b'"new"')
        # The flush when the heartbeat stalled: without read_timeout, up to 6 s (tick and stall).
        await watcher.wait_for(None, timeout=30)
        assert await client.get("silent") == "new"


async def test_lost_data_connection_flushes(client: Client, admin: Redis) -> None:
    cache = cache_of(client)
    await client.set("d", 1)
    assert await client.get("d") == 1
    assert len(cache) == 1
    clients: list[dict[str, Any]] = await admin.client_list()
    trackers = [c for c in clients if "t" in str(c.get("flags", ""))]
    assert len(trackers) == 1
    watcher = Invalidations(cache)
    await admin.client_kill_filter(_id=trackers[0]["id"])
    await watcher.wait_for(None)  # dropped as soon as the loss is seen, not at the next call
    assert len(cache) == 0
    flushes = cache.stats.flushes
    await admin.set("d", b"2")  # changed while we had no tracking connection
    assert await client.get("d") == 2  # reconnects, flushes, reads the new value
    assert cache.stats.flushes > flushes


async def test_cache_ttl_bounds_staleness(valkey_server: RedisServer) -> None:
    options = redis_options(valkey_server, client_cache=ClientCache(ttl=0.05))
    async with Client(RedisBackend(options)) as client:
        await client.set("t", 1)
        assert await client.get("t") == 1
        assert await client.get("t") == 1
        hits = cache_of(client).stats.hits
        await asyncio.sleep(0.1)
        assert await client.get("t") == 1
        assert cache_of(client).stats.hits == hits  # expired locally: read from the server


async def test_cached_value_never_outlives_its_ttl(client: Client, admin: Redis) -> None:
    cache = cache_of(client)
    with invalidations_held(backend_of(client)):
        await client.set("short", "v", ttl=1.0)
        assert await client.get("short") == "v"
        hits = cache.stats.hits
        assert await client.get("short") == "v"
        assert cache.stats.hits == hits + 1  # served from memory
        watcher = Invalidations(cache)
        await until_expired(admin, "short")
        # The cache's own ttl (30 s) is far away and the server's message is held:
        # only the key's TTL, read with the value, can have dropped the entry.
        assert cache.lookup("short") is None
        with pytest.raises(KeyNotFoundError):
            await client.get("short")
        assert await client.get("short", default=None) is None
        assert "short" not in watcher.seen


async def test_own_expiry_changes_drop_the_cached_copy(client: Client, admin: Redis) -> None:
    # A copy carries the TTL the key had when it was read: after our own
    # expire() or persist() it must not be served on the server's message's word.
    with invalidations_held(backend_of(client)):
        await client.set("exp", "v")
        assert await client.get("exp") == "v"  # cached without a TTL
        assert await client.expire("exp", 0.05)
        await until_expired(admin, "exp")
        assert await client.get("exp", default=None) is None
        await client.set("exp", "w", ttl=2)  # room for a slow machine before persist()
        assert await client.get("exp") == "w"  # cached with a 2 s TTL
        assert await client.persist("exp")
        assert cache_of(client).lookup("exp") is None
        await asyncio.sleep(2.1)
        assert await client.get("exp") == "w"  # persisted: read back past the old TTL


async def test_ttl_counts_from_when_the_read_was_sent(valkey_server: RedisServer, admin: Redis) -> None:
    # A reply that waits in the socket (a busy event loop, a slow network) must
    # not stretch the entry's life past the key's: the server measured the TTL
    # before the wait.
    options = redis_options(valkey_server, read_timeout=30, client_cache=ClientCache(ttl=30))
    async with Client(RedisBackend(options)) as client:
        backend = backend_of(client)
        assert backend._mux is not None
        await admin.set("slow", b'"v"', px=1000)
        await admin.config_resetstat()
        with invalidations_held(backend):
            data = transport_of(backend._mux)
            data.pause_reading()
            try:
                read = asyncio.create_task(client.get("slow"))

                async def answered() -> None:
                    # The server has run GET and PTTL; their replies wait in our socket.
                    stats: dict[str, Any] = {}
                    while not stats.get("cmdstat_pttl"):
                        await asyncio.sleep(0.01)
                        stats = await admin.info("commandstats")

                await asyncio.wait_for(answered(), 10)
                await until_expired(admin, "slow")
            finally:
                data.resume_reading()
            assert await asyncio.wait_for(read, 10) == "v"  # current when the server read it
            assert cache_of(client).lookup("slow") is None
            assert await client.get("slow", default=None) is None


async def commandstats(admin: Redis) -> dict[str, int]:
    stats: dict[str, Any] = await admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


async def test_batch_get_serves_hits_from_memory_and_fetches_misses(client: Client, admin: Redis) -> None:
    await client.batch_set({"g1": 1, "g2": 2, "g3": 3})
    assert await client.get("g1") == 1  # cached by a single get
    cache = cache_of(client)
    hits = cache.stats.hits
    await admin.config_resetstat()
    assert await client.batch_get(["g1", "g2", "g3", "nope"], int) == {"g1": 1, "g2": 2, "g3": 3}
    calls = await commandstats(admin)
    # One MGET for the three misses, a PTTL for each (the missing key's too: it
    # may be cached once it exists, and -2 tells it is gone).
    assert calls.get("mget") == 1
    assert calls.get("pttl") == 3
    assert cache.stats.hits == hits + 1
    await admin.config_resetstat()
    # Every key that exists is cached now: the next batch reads no value from the server.
    assert await client.batch_get(["g3", "g1", "g2"], int) == {"g3": 3, "g1": 1, "g2": 2}
    assert await client.get("g2") == 2
    assert "mget" not in await commandstats(admin)
    assert "get" not in await commandstats(admin)
    assert cache.lookup("nope") is None


async def test_batch_get_sees_writes_from_elsewhere(client: Client, admin: Redis) -> None:
    await client.batch_set({"w1": "a", "w2": "b"})
    assert await client.batch_get(["w1", "w2"]) == {"w1": "a", "w2": "b"}
    assert await client.batch_get(["w1", "w2"]) == {"w1": "a", "w2": "b"}  # from memory
    watcher = Invalidations(cache_of(client))
    await admin.set("w2", b'"B"')
    await admin.delete("w1")
    await watcher.wait_for("w2")
    await watcher.wait_for("w1")
    assert await client.batch_get(["w1", "w2"]) == {"w2": "B"}
    await client.batch_set({"w1": "own"})
    assert await client.batch_get(["w1", "w2"]) == {"w1": "own", "w2": "B"}


async def test_batch_get_entries_never_outlive_their_keys(client: Client, admin: Redis) -> None:
    cache = cache_of(client)
    with invalidations_held(backend_of(client)):
        await client.batch_set({"short": "s", "long": "l"})
        await admin.pexpire("short", 500)
        assert await client.batch_get(["short", "long"]) == {"short": "s", "long": "l"}
        assert cache.lookup("short") == b'"s"'
        await until_expired(admin, "short")
        # The server's message is held and the cache's own ttl is 30 s away: only
        # the PTTL read with the value can have dropped the entry.
        assert cache.lookup("short") is None
        assert cache.lookup("long") == b'"l"'
        assert await client.batch_get(["short", "long"]) == {"long": "l"}


async def test_batch_get_does_not_keep_a_value_changed_while_it_was_read(
    valkey_server: RedisServer, admin: Redis
) -> None:
    options = redis_options(valkey_server, read_timeout=30, client_cache=ClientCache(ttl=30))
    async with Client(RedisBackend(options)) as client:
        backend = backend_of(client)
        assert backend._mux is not None
        await client.batch_set({"r1": "old", "r2": "old"})
        await admin.config_resetstat()
        watcher = Invalidations(cache_of(client))
        data = transport_of(backend._mux)
        data.pause_reading()
        try:
            read = asyncio.create_task(client.batch_get(["r1", "r2"]))

            async def answered() -> None:
                # The server has run the MGET; its reply waits in our socket.
                calls: dict[str, int] = {}
                while "mget" not in calls:
                    await asyncio.sleep(0.01)
                    calls = await commandstats(admin)

            await asyncio.wait_for(answered(), 10)
            await admin.set("r2", b'"new"')
            await watcher.wait_for("r2")  # delivered on the other connection, while the read is in flight
        finally:
            data.resume_reading()
        assert await asyncio.wait_for(read, 10) == {"r1": "old", "r2": "old"}  # current when read
        cache = cache_of(client)
        assert cache.lookup("r1") == b'"old"'
        assert cache.lookup("r2") is None  # changed after the server read it: not kept
        assert await client.batch_get(["r1", "r2"]) == {"r1": "old", "r2": "new"}


async def test_a_cancelled_batch_get_leaves_the_cache_working(client: Client, admin: Redis) -> None:
    backend = backend_of(client)
    assert backend._mux is not None
    await client.batch_set({"c1": 1, "c2": 2})
    data = transport_of(backend._mux)
    data.pause_reading()
    try:
        read = asyncio.create_task(client.batch_get(["c1", "c2"]))
        await asyncio.sleep(0.05)
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
    finally:
        data.resume_reading()
    cache = cache_of(client)
    assert cache.lookup("c1") is None
    watcher = Invalidations(cache)
    await admin.set("c1", b"10")
    # The server ran the cancelled MGET, so it tracks c1 and reports the change.
    # A read still counted as in flight would mark c1 changed-while-read for good,
    # and it would never be cached again.
    await watcher.wait_for("c1")
    assert await client.batch_get(["c1", "c2"], int) == {"c1": 10, "c2": 2}
    hits = cache.stats.hits
    assert await client.batch_get(["c1", "c2"], int) == {"c1": 10, "c2": 2}
    assert cache.stats.hits == hits + 2


async def test_batch_get_caches_only_under_the_prefixes(valkey_server: RedisServer, admin: Redis) -> None:
    options = redis_options(valkey_server, client_cache=ClientCache(prefixes=["user:"]))
    async with Client(RedisBackend(options)) as client:
        await client.batch_set({"user:1": 1, "other:1": 2})
        await admin.config_resetstat()
        assert await client.batch_get(["user:1", "other:1"], int) == {"user:1": 1, "other:1": 2}
        assert (await commandstats(admin)).get("pttl") == 1  # none for a key that is never kept
        cache = cache_of(client)
        assert cache.lookup("user:1") == b"1"
        assert cache.lookup("other:1") is None


def test_client_cache_options_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        ClientCache(max_entries=0)
    with pytest.raises(ConfigurationError):
        ClientCache(ttl=-1)
    with pytest.raises(ConfigurationError):
        ClientCache(max_value_size=-5)
    with pytest.raises(ConfigurationError):
        RedisOptions(client_cache=ClientCache(), auto_pipeline=False)
    with pytest.raises(ConfigurationError):
        RedisOptions(client_cache={"max_entries": 10})  # type: ignore[arg-type]


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 5])
async def test_a_cancelled_close_still_closes_every_connection(
    valkey_server: RedisServer, admin: Redis, turns: int
) -> None:
    # close() waits for the cache's tasks to end; a timeout around it must not keep
    # the sockets open, since a second close() returns at once.
    name = f"close-{turns}-{time.monotonic_ns()}"
    options = redis_options(valkey_server, client_name=name, client_cache=ClientCache(ttl=60))
    client = Client(RedisBackend(options))
    await client.set("k", 1)
    assert await client.get("k") == 1
    assert await client.get("k") == 1  # served from the cache: the listener is up
    await cancel_close_after(client, turns)

    async def ours() -> list[dict[str, Any]]:
        return [c for c in await admin.client_list() if c.get("name") == name]

    for _ in range(200):  # the server notices a closed socket within a few ms
        if not await ours():
            break
        await asyncio.sleep(0.05)
    assert await ours() == []


@pytest.mark.parametrize(
    ("refused", "granted", "warning"),
    [
        # Redis 7 and Valkey give new ACL users no channel: the cache cannot listen.
        ({"reset_channels": True}, {"channels": ["*"]}, "no invalidation connection"),
        # The listener subscribes, but CLIENT TRACKING in the data connection's login is refused.
        (
            {"channels": ["*"], "commands": ["+@all", "-client|tracking"]},
            {"commands": ["+client|tracking"]},
            "refused to track",
        ),
        # CLIENT ID is refused and SUBSCRIBE, sent with it, succeeds: a socket left
        # subscribed refuses CLIENT ID for good ("only SUBSCRIBE ... in this context").
        (
            {"channels": ["*"], "commands": ["+@all", "-client|id"]},
            {"commands": ["+client|id"]},
            "no invalidation connection",
        ),
    ],
    ids=["no-channel", "no-tracking", "no-client-id"],
)
async def test_a_user_refused_what_the_cache_needs_works_uncached_until_allowed(
    redis_server_factory: ServerFactory,
    caplog: pytest.LogCaptureFixture,
    refused: dict[str, Any],
    granted: dict[str, Any],
    warning: str,
) -> None:
    # That must cost the cache, never the connection and every call on it.
    server = redis_server_factory("valkey")
    admin = Redis(**server.redis_kwargs())  # type: ignore[arg-type]
    try:
        await admin.acl_setuser(
            "app", enabled=True, passwords=["+pw"], keys=["*"], **{"commands": ["+@all"], **refused}
        )
        options = redis_options(server, client_cache=ClientCache(ttl=30))
        options = options.replace(username="app", password="pw")
        async with Client(RedisBackend(options)) as client:
            cache = cache_of(client)
            await client.set("k", 1)
            assert [await client.get("k") for _ in range(3)] == [1, 1, 1]
            assert cache.stats.hits == 0
            assert not cache.enabled
            assert warning in caplog.text
            await admin.acl_setuser("app", enabled=True, **granted)
            # The repair loop retries with backoff (at most 5 s).
            await eventually(lambda: cache.enabled, 20, "the cache never came back once allowed")
            assert await client.get("k") == 1
            assert await client.get("k") == 1
            assert cache.stats.hits == 1
            watcher = Invalidations(cache)
            await admin.set("k", b"2")  # and invalidations reach it
            await watcher.wait_for("k")
            assert await client.get("k") == 2
    finally:
        await admin.aclose()


@contextlib.asynccontextmanager
async def listener_through_proxy(
    server: RedisServer, **overrides: Any
) -> AsyncIterator[tuple[Client, FaultProxy]]:
    """A cached client whose invalidation connection alone goes through a :class:`FaultProxy`."""
    assert not server.tls
    async with FaultProxy(server.host, server.port) as proxy:
        backend = RedisBackend(redis_options(server, client_cache=ClientCache(ttl=30), **overrides))
        assert backend._tracking is not None
        backend._tracking._conn._opener = tcp_opener(proxy.host, proxy.port, None)
        async with Client(backend) as client:
            yield client, proxy


async def kill_data_connection(client: Client, admin: Redis) -> None:
    """Close the tracking data connection from the server's side; return once the client saw it go."""
    watcher = Invalidations(cache_of(client))
    trackers = [c for c in await admin.client_list() if "t" in str(c.get("flags", ""))]
    assert len(trackers) == 1
    await admin.client_kill_filter(_id=trackers[0]["id"])
    await watcher.wait_for(None)  # data_lost's flush
    watcher.remove()


async def test_a_listener_gone_unnoticed_does_not_fail_calls(
    valkey_server: RedisServer, admin: Redis
) -> None:
    # The server dropped the listener but its FIN is held up on the way; the data
    # connection reconnects meanwhile and asks to track into the dead id, which the
    # server refuses. Calls must go on uncached, and the listener be reopened.
    async with listener_through_proxy(valkey_server) as (client, proxy):
        tracking = backend_of(client)._tracking
        assert tracking is not None
        await client.set("gone", "v1")
        assert await client.get("gone") == "v1"
        [listener] = await subscriber_ids(admin)
        proxy.stall()
        await admin.client_kill_filter(_id=str(listener))
        await kill_data_connection(client, admin)
        assert tracking._conn.connected  # the listener's loss is not known here yet
        assert await asyncio.wait_for(client.get("gone"), 10) == "v1"
        assert await client.get("gone") == "v1"
        assert not cache_of(client).enabled
        proxy.heal()
        await asyncio.wait_for(until_tracking_works(client, admin, "gone"), 20)


async def listener_reopening_into_a_black_hole(client: Client, proxy: FaultProxy, admin: Redis) -> None:
    """Return once the repair is subscribing through ``proxy``, which answers nothing."""
    tracking = backend_of(client)._tracking
    assert tracking is not None
    proxy.blackhole()
    [listener] = await subscriber_ids(admin)
    await admin.client_kill_filter(_id=str(listener))  # its FIN still gets through
    await eventually(
        lambda: tracking._repair is not None and tracking._lock.locked(),
        10,
        "the listener was never reopened",
    )
    assert not cache_of(client).enabled


async def test_a_listener_that_never_answers_is_reopened_without_read_timeout(
    valkey_server: RedisServer, admin: Redis
) -> None:
    # read_timeout=None bounds no reply: the SUBSCRIBE lost in the black hole must
    # still be given up, or the cache stays off for good once the network heals.
    async with listener_through_proxy(valkey_server, read_timeout=None) as (client, proxy):
        await client.set("hole", "v1")
        assert await client.get("hole") == "v1"
        await listener_reopening_into_a_black_hole(client, proxy, admin)
        proxy.heal()
        await asyncio.wait_for(until_tracking_works(client, admin, "hole"), 30)


async def test_a_data_reconnect_does_not_wait_for_the_listener(
    valkey_server: RedisServer, admin: Redis
) -> None:
    # The data path is healthy: while the listener is being reopened (here through
    # a black hole, with no read_timeout to end that soon), calls must not wait for it.
    async with listener_through_proxy(valkey_server, read_timeout=None) as (client, proxy):
        await client.set("wait", "v1")
        assert await client.get("wait") == "v1"
        await listener_reopening_into_a_black_hole(client, proxy, admin)
        await kill_data_connection(client, admin)
        # Well under the 5 s the listener's subscribe may take to be given up.
        assert await asyncio.wait_for(client.get("wait"), 2) == "v1"
        await client.set("wait", "v2")
        assert await asyncio.wait_for(client.get("wait"), 2) == "v2"
        proxy.heal()
        await client.set("wait", "v1")
        await asyncio.wait_for(until_tracking_works(client, admin, "wait"), 30)


async def test_a_listener_black_holed_from_the_start_holds_the_first_call_briefly(
    valkey_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The data connection's login waits for the listener's SUBSCRIBE, which got no
    # answer for read_timeout (10 s here; 5 s without one). At most half of
    # dial_timeout (1 s) now: the first call then goes on uncached.
    async with FaultProxy(valkey_server.host, valkey_server.port) as proxy:
        options = redis_options(valkey_server, client_cache=ClientCache(ttl=30), read_timeout=10.0)
        backend = RedisBackend(options.replace(dial_timeout=2.0))
        assert backend._tracking is not None
        backend._tracking._conn._opener = tcp_opener(proxy.host, proxy.port, None)
        proxy.blackhole()
        async with contextlib.AsyncExitStack() as stack:
            # Connecting opens the data connection: a generous bound (10 s before).
            client = await asyncio.wait_for(stack.enter_async_context(Client(backend)), 6)
            await client.set("early", "v1")
            assert await client.get("early") == "v1"
            assert not cache_of(client).enabled
            assert "no invalidation connection" in caplog.text
            proxy.heal()
            await eventually(lambda: cache_of(client).enabled, 30, "the cache never came on")


class ResetOnce(FaultProxy):
    """A :class:`FaultProxy` that, once :attr:`armed`, resets the next connection it accepts."""

    armed = False
    resets = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.armed:
            await super()._accept(reader, writer)
            return
        self.armed = False
        self.resets += 1
        self.refuse()
        try:
            await super()._accept(reader, writer)  # reset at once
        finally:
            self.heal()


async def test_a_listener_whose_first_connect_is_reset_during_its_login_comes_back(
    redis_server_factory: ServerFactory,
) -> None:
    # With a password, the listener's reconnect is reset during AUTH and retried
    # within the same connect, which then subscribes. The reset socket's loss voids
    # that subscription; the subscribed socket must then be closed, or every later
    # attempt sends CLIENT ID on it, refused for good: the cache would stay off.
    server = redis_server_factory("valkey", "password")
    admin = Redis(**server.redis_kwargs())  # type: ignore[arg-type]
    try:
        proxy = ResetOnce(server.host, server.port)
        async with proxy:
            backend = RedisBackend(redis_options(server, client_cache=ClientCache(ttl=30)))
            tracking = backend._tracking
            assert tracking is not None
            tracking._conn._opener = tcp_opener(proxy.host, proxy.port, None)
            async with Client(backend) as client:
                await client.set("reset", "v1")
                assert await client.get("reset") == "v1"
                watcher = Invalidations(cache_of(client))
                proxy.armed = True
                [listener] = await subscriber_ids(admin)
                await admin.client_kill_filter(_id=str(listener))
                await watcher.wait_for(None)  # the loss is seen: the reconnect is under way
                await eventually(lambda: proxy.resets == 1, 10, "no listener connect was reset")
                await asyncio.wait_for(until_tracking_works(client, admin, "reset"), 20)
    finally:
        await admin.aclose()


async def test_a_listener_lost_as_a_data_connection_logs_in_is_not_tracked_into(
    valkey_server: RedisServer, admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data connection's login asks for the listener's id; the listener is lost
    # after the answer and before the login uses it (on Python before 3.12, wait_for
    # runs the question in a task of its own, loop turns apart). The server has not
    # seen the loss (a stalled network holds its side open) and accepts tracking into
    # that id: turned on, the cache would miss every write from elsewhere until the
    # repair, which cannot reach the server either, re-pointed tracking.
    async with listener_through_proxy(valkey_server, read_timeout=10.0) as (client, proxy):
        cache, tracking = cache_of(client), backend_of(client)._tracking
        assert tracking is not None
        await client.set("gap", "v1")
        assert await client.get("gap") == "v1"
        real = tracking._listen
        answered: list[int] = []

        async def listen_then_lose() -> int:
            client_id = await real()
            if not answered:  # the data connection's login: nothing else asks before it
                answered.append(client_id)
                losses = tracking._losses
                proxy.stall()
                tracking._conn.drop()
                await eventually(lambda: tracking._losses > losses, 10, "the loss was never seen")
            return client_id

        monkeypatch.setattr(tracking, "_listen", listen_then_lose)
        await kill_data_connection(client, admin)
        assert await asyncio.wait_for(client.get("gap"), 10) == "v1"  # the login ran
        assert answered
        assert not cache.enabled
        assert cache.lookup("gap") is None
        proxy.heal()
        await asyncio.wait_for(until_tracking_works(client, admin, "gap"), 30)


def test_retry_delays_stay_bounded_however_long_the_retries_go_on() -> None:
    # A listener an ACL keeps from subscribing retries for the life of the process:
    # at attempt 1,024 an uncapped 2**attempt no longer fits a float.
    for attempt in (1, 7, 64, 1024, 10**6):
        assert 0 <= listener_backoff(attempt) <= 5.0
        assert 0 <= backoff(attempt) <= 0.512
    assert listener_backoff(1) <= 0.1
