"""The conformance suite through Redis Sentinel, and the backend following a failover."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis
import redis.asyncio as aioredis
from conftest import refused_port
from redis.asyncio.connection import AbstractConnection

from kivigo_async import Client
from kivigo_async.backends.redis import RedisSentinelBackend, RedisSentinelOptions
from kivigo_async.backends.redis import sentinel as sentinel_module
from kivigo_async.errors import (
    BackendUnavailableError,
    ConfigurationError,
    ConnectTimeoutError,
    KivigoError,
    TransactionConflictError,
)
from kivigo_async.testing.conformance import BackendConformance
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.pytest_plugin import SentinelFactory
from kivigo_async.testing.servers import free_port
from kivigo_async.testing.topologies import RedisSentinel, wait_replicated


def sentinel_options(topology: RedisSentinel, **overrides: object) -> RedisSentinelOptions:
    return RedisSentinelOptions(
        sentinels=topology.sentinel_addrs,
        service_name=topology.service_name,
        **overrides,  # type: ignore[arg-type]
    )


class TestSentinelConformance(BackendConformance):
    @pytest.fixture
    async def kv_backend(self, redis_sentinel: RedisSentinel) -> AsyncIterator[RedisSentinelBackend]:
        redis_sentinel.flushall()
        backend = RedisSentinelBackend(sentinel_options(redis_sentinel))
        yield backend
        await backend.close()


class TestSentinelPoolConformance(BackendConformance):
    """The same, with single commands on the pool instead of the multiplexed connection."""

    @pytest.fixture
    async def kv_backend(self, redis_sentinel: RedisSentinel) -> AsyncIterator[RedisSentinelBackend]:
        redis_sentinel.flushall()
        backend = RedisSentinelBackend(sentinel_options(redis_sentinel, auto_pipeline=False))
        yield backend
        await backend.close()


TRANSPORTS = pytest.mark.parametrize("auto_pipeline", [True, False], ids=["multiplexed", "pool"])


async def read_from(addr: str, key: str) -> bytes | None:
    host, _, port = addr.rpartition(":")
    async with aioredis.Redis(host=host, port=int(port)) as direct:
        value = await direct.get(key)
        assert value is None or isinstance(value, bytes)
        return value


async def write_until(client: Client, key: str, stop: asyncio.Event) -> int:
    """Write increasing numbers to ``key`` until ``stop`` is set; return the last one acknowledged.

    A write in flight when the primary switches may fail (the multiplexed connection
    never sends a command twice); the loop goes on, as an application would.
    """
    n = acked = 0
    while not stop.is_set():
        n += 1
        try:
            await client.set(key, n)
            acked = n
        except BackendUnavailableError:
            pass
        await asyncio.sleep(0.02)
    return acked


async def test_follows_sentinel_failover(redis_sentinel_factory: SentinelFactory) -> None:
    topology = redis_sentinel_factory()
    old = topology.master_addr()
    async with Client(RedisSentinelBackend(sentinel_options(topology))) as client:  # connect(): watches
        await client.set("before", 1)
        # SENTINEL FAILOVER promotes the replica as it is: a write it lacks is lost.
        assert wait_replicated(topology.primary()) == 1
        new = await asyncio.to_thread(topology.failover, 60.0)
        assert new != old
        # Right after the switch, writes land on the new primary, not the demoted one.
        for i in range(20):
            await client.set("after", i)
        assert await client.get("after") == 19
        assert await read_from(new, "after") == b"19"
        assert await client.get("before") == 1  # replicated before the failover


async def fail_over_and_follow(topology: RedisSentinel, client: Client) -> str:
    """Fail the primary over; return the new one's address once the client writes to it."""
    new: str = await asyncio.to_thread(topology.failover, 60.0)
    deadline = time.monotonic() + 30
    n = 0
    while await read_from(new, "probe") != str(n).encode():
        assert time.monotonic() < deadline, "the backend never followed the failover"
        n += 1
        with contextlib.suppress(BackendUnavailableError):
            await client.set("probe", n)
        await asyncio.sleep(0.05)
    return new


@TRANSPORTS
async def test_a_listing_across_a_failover_fails_rather_than_miss_keys(
    redis_sentinel_factory: SentinelFactory, auto_pipeline: bool
) -> None:
    # A SCAN cursor belongs to one server (its hash table, its seed): sent on to the
    # new primary, the listing would skip some keys and repeat others, silently.
    topology = redis_sentinel_factory()
    backend = RedisSentinelBackend(sentinel_options(topology, auto_pipeline=auto_pipeline))
    async with Client(backend) as client:
        await client.batch_set({f"scan:{i}": i for i in range(3000)})
        assert wait_replicated(topology.primary()) == 1
        keys = client.iter_keys("scan:")
        seen = {await anext(keys)}  # the first page is read
        await fail_over_and_follow(topology, client)
        with pytest.raises(BackendUnavailableError, match="during the listing"):
            async for key in keys:
                seen.add(key)
        assert len(seen) < 3000
        assert len(await client.list("scan:")) == 3000  # a new listing is whole


@TRANSPORTS
async def test_a_transaction_watching_across_a_failover_does_not_commit_unwatched(
    redis_sentinel_factory: SentinelFactory, auto_pipeline: bool
) -> None:
    # The watching connection is dropped when the switch is announced. Reconnected
    # quietly to the new primary, it would run MULTI/EXEC without its WATCH and
    # overwrite a concurrent change while reporting success.
    topology = redis_sentinel_factory()
    old = topology.master_addr()
    backend = RedisSentinelBackend(sentinel_options(topology, auto_pipeline=auto_pipeline))
    async with Client(backend) as client:
        await client.set("stock", 10)
        assert wait_replicated(topology.primary()) == 1
        with pytest.raises((BackendUnavailableError, TransactionConflictError)):
            async with client.transaction(watch=["stock"]) as tx:
                stock = await tx.get("stock", int)
                new = await fail_over_and_follow(topology, client)
                assert new != old
                host, _, port = new.rpartition(":")
                async with aioredis.Redis(host=host, port=int(port)) as direct:
                    await direct.set("stock", b"0")  # a concurrent change to the watched key
                tx.set("stock", stock - 1)
        assert await client.get("stock") == 0  # not overwritten


@TRANSPORTS
async def test_follows_failover_without_connect(
    redis_sentinel_factory: SentinelFactory, auto_pipeline: bool
) -> None:
    # Without connect() there is no +switch-master listener: the connections
    # follow when the sentinels demote the old primary (which drops its clients).
    topology = redis_sentinel_factory()
    backend = RedisSentinelBackend(sentinel_options(topology, auto_pipeline=auto_pipeline))
    client = Client(backend)
    try:
        await client.set("k", 0)
        new = await asyncio.to_thread(topology.failover, 60.0, replication=True)
        deadline = time.monotonic() + 60
        while True:
            await client.set("k", "after")
            if await read_from(new, "k") == b'"after"':
                break
            assert time.monotonic() < deadline, "writes never reached the new primary"
            await asyncio.sleep(0.2)
        assert await client.get("k") == "after"
    finally:
        await backend.close()


@TRANSPORTS
async def test_writes_continue_through_failover(
    redis_sentinel_factory: SentinelFactory, auto_pipeline: bool
) -> None:
    topology = redis_sentinel_factory()
    backend = RedisSentinelBackend(sentinel_options(topology, max_retries=10, auto_pipeline=auto_pipeline))
    async with Client(backend) as client:
        stop = asyncio.Event()
        writer = asyncio.create_task(write_until(client, "loop", stop))
        try:
            new = await asyncio.to_thread(topology.failover, 60.0)
            # Writes sent between the promotion and +switch-master reach the old primary
            # and are lost with it (Sentinel's own window); the ones after the switch stay.
            await asyncio.sleep(1.0)
            stop.set()
            last = await asyncio.wait_for(writer, 60)
        finally:
            writer.cancel()
        assert last > 0
        # Once the writer is done, the final value is on the new primary.
        assert await read_from(new, "loop") == str(last).encode()


@TRANSPORTS
async def test_no_write_acknowledged_after_the_switch_is_lost(
    redis_sentinel_factory: SentinelFactory, caplog: pytest.LogCaptureFixture, auto_pipeline: bool
) -> None:
    """Busy connections dropped on +switch-master must reconnect to the new primary.

    redis-py retries a dropped command on the same connection object, which used to
    reconnect to its old address: the demoted primary acknowledged writes for about
    10 s, until the sentinels made it a replica and they were all lost.
    """
    caplog.set_level(logging.INFO, logger="kivigo_async")
    topology = redis_sentinel_factory()
    options = sentinel_options(topology, read_timeout=1, dial_timeout=1, auto_pipeline=auto_pipeline)
    async with Client(RedisSentinelBackend(options)) as client:
        acked: list[tuple[str, float]] = []
        stop = asyncio.Event()

        async def writer(n: int) -> None:
            i = 0
            while not stop.is_set():
                key = f"busy:{n}:{i}"
                i += 1
                with contextlib.suppress(KivigoError):  # failures around the switch are fine
                    await client.set(key, 1)
                    acked.append((key, time.time()))
                await asyncio.sleep(0)

        writers = [asyncio.create_task(writer(n)) for n in range(8)]  # several connections in use
        try:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(topology.failover, 60.0)
            await asyncio.sleep(1.5)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*writers), 30)
        switches = [r.created for r in caplog.records if "primary switched" in r.getMessage()]
        assert switches, "the backend never heard +switch-master"
        # Writes acknowledged up to the switch may be on the old primary (Sentinel's own
        # window); half a second after it, every acknowledged write must be kept.
        late = [key for key, at in acked if at > switches[0] + 0.5]
        assert late
        kept = await client.batch_get(late)
        assert len(kept) == len(late), f"{len(late) - len(kept)} of {len(late)} acknowledged writes lost"


def switch_master_subscribers(topology: RedisSentinel) -> list[int]:
    """Per running sentinel, how many clients are subscribed to ``+switch-master``.

    A blocking client on purpose: while it asks, no task of the event loop runs, so
    what it sees is the state connect() returned with.
    """
    counts = []
    for sentinel in topology.sentinels:
        if not sentinel.running:
            continue
        with redis.Redis(host=sentinel.host, port=sentinel.port) as direct:
            clients = direct.client_list()
        counts.append(sum(1 for c in clients if c.get("sub") == "1"))
    return counts


async def test_connect_returns_once_a_sentinel_confirms_the_subscription(
    redis_sentinel_factory: SentinelFactory,
) -> None:
    # A failover right after connect() must be announced to the backend: before the
    # fix, the subscription was still on its way and such a failover went unseen.
    topology = redis_sentinel_factory()  # its own: no other test's subscriber to count
    backend = RedisSentinelBackend(sentinel_options(topology))
    try:
        assert sum(switch_master_subscribers(topology)) == 0
        await backend.connect()
        assert sum(switch_master_subscribers(topology)) == 1
    finally:
        await backend.close()
    deadline = time.monotonic() + 10
    while sum(switch_master_subscribers(topology)) != 0:
        assert time.monotonic() < deadline, "close() left the subscription open"
        await asyncio.sleep(0.05)


async def test_connect_with_no_sentinel_answering_fails_promptly() -> None:
    with refused_port() as port:
        backend = RedisSentinelBackend(RedisSentinelOptions(sentinels=[f"127.0.0.1:{port}"], max_retries=0))
        started = time.monotonic()
        try:
            with pytest.raises(BackendUnavailableError):
                await backend.connect()
        finally:
            await backend.close()
    # Every sentinel refused at once: connect() does not sit out dial_timeout (5 s).
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("auto_pipeline", [True, False], ids=["multiplexed", "pool"])
async def test_sentinels_that_never_answer_are_a_connect_timeout(auto_pipeline: bool) -> None:
    # They accept the connection and say nothing: each lookup gives up at
    # dial_timeout, and the error is the one a single silent server gives.
    accepted: list[asyncio.StreamWriter] = []

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = [await asyncio.start_server(accept, "127.0.0.1", 0) for _ in range(2)]
    addrs = [f"127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in silent]
    backend = RedisSentinelBackend(
        RedisSentinelOptions(sentinels=addrs, max_retries=0, dial_timeout=0.3, auto_pipeline=auto_pipeline)
    )
    started = time.monotonic()
    try:
        with pytest.raises(ConnectTimeoutError, match="no sentinel answered"):
            await asyncio.wait_for(backend.set("k", b"v"), 30)
        assert time.monotonic() - started < 5
    finally:
        await backend.close()
        for writer in accepted:
            writer.close()
        for server in silent:
            server.close()
            await server.wait_closed()


async def test_a_switch_missed_between_subscriptions_is_caught_up(
    redis_sentinel_factory: SentinelFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The sentinel the backend listens to dies; the failover completes before the
    # backend subscribes to another one, so no +switch-master reaches it. Once
    # re-subscribed, it must see that the primary moved and reconnect.
    monkeypatch.setattr(sentinel_module, "_WATCH_RETRY_DELAY", 10.0)
    caplog.set_level(logging.INFO, logger=sentinel_module.__name__)
    topology = redis_sentinel_factory()
    async with Client(RedisSentinelBackend(sentinel_options(topology))) as client:
        await client.set("k", "before")
        counts = switch_master_subscribers(topology)
        listened = next(s for s, n in zip(topology.sentinels, counts, strict=True) if n)
        listened.kill()
        new = await asyncio.to_thread(topology.failover, 60.0)
        deadline = time.monotonic() + 30
        while "re-subscribed to the sentinels, reconnecting" not in caplog.text:
            assert time.monotonic() < deadline, "the backend never re-subscribed"
            await asyncio.sleep(0.1)
        await client.set("k", "after")
        assert await read_from(new, "k") == b'"after"'


async def test_unknown_service_is_unavailable(redis_sentinel: RedisSentinel) -> None:
    backend = RedisSentinelBackend(
        RedisSentinelOptions(sentinels=redis_sentinel.sentinel_addrs, service_name="nope", max_retries=0)
    )
    try:
        with pytest.raises(BackendUnavailableError, match="nope"):
            await backend.set("k", b"v")
    finally:
        await backend.close()


def test_options_validation_and_url() -> None:
    opts = RedisSentinelOptions.from_url(
        "redis+sentinel://app:p%40ss@s1:26379,s2/cache/3?sentinel_password=tok&read_timeout=2"
    )
    assert opts.sentinels == ("s1:26379", "s2:26379")
    assert (opts.service_name, opts.db, opts.username, opts.password) == ("cache", 3, "app", "p@ss")
    assert (opts.sentinel_password, opts.read_timeout) == ("tok", 2.0)
    assert "p@ss" not in repr(opts)
    assert "tok" not in repr(opts)
    assert bool(RedisSentinelOptions.from_url("rediss+sentinel://s1:26379/cache").tls)
    assert RedisSentinelOptions().auto_pipeline is True
    assert not RedisSentinelOptions.from_url("redis+sentinel://s1/cache?auto_pipeline=false").auto_pipeline
    with pytest.raises(ConfigurationError, match="auto_pipeline"):
        RedisSentinelOptions(auto_pipeline="yes")  # type: ignore[arg-type]
    for bad in ("redis://s1:26379/cache", "redis+sentinel://s1:26379", "redis+sentinel://s1/c?bogus=1"):
        with pytest.raises(ConfigurationError):
            RedisSentinelOptions.from_url(bad)
    with pytest.raises(ConfigurationError):
        RedisSentinelOptions(sentinels="s1:26379")
    with pytest.raises(ConfigurationError):
        RedisSentinelOptions(sentinels=[])
    with pytest.raises(ConfigurationError):
        RedisSentinelOptions(sentinels=["s1:26379"], service_name="")
    with pytest.raises(ConfigurationError):
        RedisSentinelOptions(sentinels=["nocolon"])


def test_repr_hides_passwords() -> None:
    backend = RedisSentinelBackend(
        RedisSentinelOptions(sentinels=["127.0.0.1:1"], password="hunter2", sentinel_password="tok3n")
    )
    assert "hunter2" not in repr(backend)
    assert "tok3n" not in repr(backend)
    assert "mymaster" in repr(backend)


async def test_single_commands_share_one_connection_to_the_primary(redis_sentinel: RedisSentinel) -> None:
    name = f"mux-{free_port()}"
    backend = RedisSentinelBackend(sentinel_options(redis_sentinel, client_name=name, pool_size=8))
    async with Client(backend) as client:
        assert backend.options.auto_pipeline
        await asyncio.gather(*(client.set(f"mux:{i}", i) for i in range(64)))
        assert await client.batch_get([f"mux:{i}" for i in range(64)]) == {f"mux:{i}": i for i in range(64)}
        host, _, port = redis_sentinel.master_addr().rpartition(":")
        async with aioredis.Redis(host=host, port=int(port), password=redis_sentinel.password) as direct:
            ours = [c for c in await direct.client_list() if c.get("name") == name]
        assert len(ours) == 1, ours


async def test_a_connection_done_with_before_a_switch_fails_no_later_call(
    redis_sentinel: RedisSentinel,
) -> None:
    # A connection in use when +switch-master arrives is marked, so that its holder
    # hears of the switch; one whose holder had read its reply and was giving it
    # back must not pass the mark on to the next, unrelated caller.
    options = sentinel_options(redis_sentinel, auto_pipeline=False, pool_size=1, max_retries=0)
    backend = RedisSentinelBackend(options)
    async with Client(backend) as client:
        await client.set("k", 1)
        pool = backend._pool
        acquire: Callable[[], Awaitable[AbstractConnection]] = pool.get_connection
        conn = await acquire()
        await backend._leave_primary()  # what the switch announcement does
        await pool.release(conn)
        await client.set("k", 2)  # the same (only) connection, for a new caller
        assert await client.get("k") == 2


def replica_of(topology: RedisSentinel) -> tuple[str, int]:
    primary = topology.master_addr()
    replica = next(n for n in topology.data_nodes if f"{n.host}:{n.port}" != primary)
    return replica.host, replica.port


def naming_a_replica_first(
    topology: RedisSentinel, monkeypatch: pytest.MonkeyPatch, **overrides: object
) -> RedisSentinelBackend:
    """A backend whose sentinels name a replica once, then the primary.

    As they named the old primary just before a failover reached this client: it
    refuses writes with READONLY, which applies nothing.
    """
    topology.flushall()
    backend = RedisSentinelBackend(sentinel_options(topology, **overrides))
    real = backend.sentinel.discover_master
    answers = [replica_of(topology)]

    async def discover_master(service_name: str) -> tuple[str, int]:
        return answers.pop() if answers else await real(service_name)

    monkeypatch.setattr(backend.sentinel, "discover_master", discover_master)
    return backend


@TRANSPORTS
async def test_a_demoted_primary_is_left_and_the_command_sent_again(
    redis_sentinel: RedisSentinel,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    auto_pipeline: bool,
) -> None:
    # The backend asks the sentinels again and sends the refused write once more,
    # even with retries off: the replica applied nothing. On the pool, redis-py's
    # parser words the refusal differently, and the connection to the replica was
    # kept for good: every later write failed.
    caplog.set_level(logging.INFO, logger=sentinel_module.__name__)
    name = f"demoted-{free_port()}"
    backend = naming_a_replica_first(
        redis_sentinel, monkeypatch, auto_pipeline=auto_pipeline, client_name=name, max_retries=0
    )
    async with Client(backend) as client:
        await client.set("k", "written")
        primary = redis_sentinel.master_addr()
        assert await read_from(primary, "k") == b'"written"'
        for i in range(3):
            await client.set("k", i)
        assert await read_from(primary, "k") == b"2"
        host, port = replica_of(redis_sentinel)
        deadline = time.monotonic() + 10
        async with aioredis.Redis(host=host, port=port, password=redis_sentinel.password) as replica:
            while [c for c in await replica.client_list() if c.get("name") == name]:
                assert time.monotonic() < deadline, "a connection to the replica was kept"
                await asyncio.sleep(0.05)
    assert any("primary was demoted" in r.getMessage() for r in caplog.records)


@TRANSPORTS
async def test_a_batch_refused_by_a_demoted_primary_fails_once_then_recovers(
    redis_sentinel: RedisSentinel, monkeypatch: pytest.MonkeyPatch, auto_pipeline: bool
) -> None:
    # Retries off: on the pool, redis-py would otherwise send the batch again itself.
    backend = naming_a_replica_first(redis_sentinel, monkeypatch, auto_pipeline=auto_pipeline, max_retries=0)
    async with Client(backend) as client:
        # MULTI..EXEC on the replica: refused whole, so nothing was written anywhere,
        # and the error must not say it may have been.
        with pytest.raises(BackendUnavailableError, match="no longer the primary") as info:
            await client.batch_set({"a": 1, "b": 2}, ttl=60)
        assert "may or may not" not in str(info.value)
        assert await read_from(redis_sentinel.master_addr(), "a") is None
        await client.batch_set({"a": 1, "b": 2}, ttl=60)
        assert await client.batch_get(["a", "b"]) == {"a": 1, "b": 2}


@TRANSPORTS
async def test_a_silent_first_sentinel_costs_its_timeout_once(
    redis_sentinel: RedisSentinel, auto_pipeline: bool
) -> None:
    # The first sentinel accepts connections and never answers. Asking it is bounded
    # by read_timeout, and the next sentinel answers; finding the primary is not
    # bounded by dial_timeout (that bounds the connection to the primary itself).
    redis_sentinel.flushall()
    first = redis_sentinel.sentinels[0]
    async with FaultProxy(first.host, first.port) as proxy:
        proxy.blackhole()
        options = sentinel_options(
            redis_sentinel, dial_timeout=0.5, read_timeout=1.0, max_retries=1, auto_pipeline=auto_pipeline
        )
        backend = RedisSentinelBackend(
            options.replace(sentinels=[proxy.addr, *redis_sentinel.sentinel_addrs])
        )
        client = Client(backend)
        try:
            started = time.monotonic()
            await asyncio.wait_for(client.set("k", 1), 30)
            assert time.monotonic() - started < 10
            assert await client.get("k") == 1
        finally:
            await backend.close()
