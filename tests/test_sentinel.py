"""The Sentinel backend with sentinels that misbehave: silent, not sentinels, or older servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from conftest import eventually
from test_conformance_sentinel import (
    TRANSPORTS,
    read_from,
    replica_of,
    sentinel_options,
    switch_master_subscribers,
)

from kivigo_async import Client
from kivigo_async.backends.redis import RedisSentinelBackend
from kivigo_async.backends.redis import sentinel as sentinel_module
from kivigo_async.errors import BackendUnavailableError
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.pytest_plugin import SentinelFactory
from kivigo_async.testing.topologies import RedisSentinel
from kivigo_async.watch import ChangeFeed


def own_sentinel_clients(
    backend: RedisSentinelBackend, topology: RedisSentinel
) -> list[tuple[str, dict[str, Any]]]:
    """Per connection of the backend to its sentinels: the sentinel, and its ``CLIENT LIST`` entry."""
    entries: list[tuple[str, dict[str, Any]]] = []
    for sentinel in backend.sentinel.sentinels:
        pool: Any = sentinel.connection_pool
        ours = set()
        for connection in [*pool._available_connections, *pool._in_use_connections]:
            if connection._writer is not None:
                host, port = connection._writer.get_extra_info("sockname")[:2]
                ours.add(f"{host}:{port}")
        kwargs = pool.connection_kwargs
        with redis.Redis(
            host=kwargs["host"], port=kwargs["port"], password=topology.sentinel_password
        ) as direct:
            server = f"{kwargs['host']}:{kwargs['port']}"
            entries += [(server, c) for c in direct.client_list() if c.get("addr") in ours]
    return entries


async def test_a_silent_sentinel_is_replaced(
    redis_sentinel_factory: SentinelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The sentinel the backend listens to goes silent (its host lost, a partition:
    # no FIN, no RST). Unchecked, the subscription waited on it for good, and every
    # later failover went unheard while the old primary acknowledged writes it lost.
    caplog.set_level(logging.INFO, logger=sentinel_module.__name__)
    topology = redis_sentinel_factory()
    async with contextlib.AsyncExitStack() as stack:
        proxies = [await stack.enter_async_context(FaultProxy(s.host, s.port)) for s in topology.sentinels]
        options = sentinel_options(topology, read_timeout=0.5, dial_timeout=1)
        backend = RedisSentinelBackend(options.replace(sentinels=[p.addr for p in proxies]))
        client = Client(backend)
        try:
            await backend.connect()
            await client.set("k", "before")
            assert switch_master_subscribers(topology) == [1, 0, 0]
            proxies[0].blackhole()
            # Another sentinel takes over, and the silent one's subscription is closed.
            await eventually(
                lambda: (counts := switch_master_subscribers(topology))[0] == 0 and sum(counts) == 1,
                20,
                "still listening to the silent sentinel",
            )
            new = await asyncio.to_thread(topology.failover, 60.0)
            await eventually(
                lambda: "primary switched" in caplog.text, 30, "the new subscription never heard the switch"
            )
            await client.set("k", "after")
            assert await read_from(new, "k") == b'"after"'
        finally:
            started = time.monotonic()
            await client.close()
        assert time.monotonic() - started < 2
    await eventually(
        lambda: sum(switch_master_subscribers(topology)) == 0, 10, "close() left a subscription open"
    )


@pytest.mark.parametrize("protocol", [2, 3])
async def test_the_sentinel_connections_speak_the_protocol_asked_for(
    redis_sentinel: RedisSentinel, caplog: pytest.LogCaptureFixture, protocol: int
) -> None:
    # protocol=2 is for servers without HELLO; the sentinels were sent HELLO 3 all
    # the same. The subscription's PINGs are answered in either protocol's form.
    caplog.set_level(logging.DEBUG, logger=sentinel_module.__name__)
    # A read_timeout long enough that a stall on a busy machine does not look like a lost sentinel.
    backend = RedisSentinelBackend(sentinel_options(redis_sentinel, protocol=protocol, read_timeout=1.0))
    async with Client(backend) as client:
        await client.set("k", 1)
        await asyncio.sleep(2.5)  # two rounds of PING and reply at least
        clients = own_sentinel_clients(backend, redis_sentinel)
    assert clients
    assert {c.get("resp") for _, c in clients} == {str(protocol)}
    assert [c.get("sub") for _, c in clients].count("1") == 1
    assert "lost a sentinel subscription" not in caplog.text


@TRANSPORTS
async def test_a_data_node_listed_as_a_sentinel_is_passed_over(
    redis_sentinel: RedisSentinel, auto_pipeline: bool
) -> None:
    # It answers SENTINEL MASTERS with an error: the look-up asks the next sentinel
    # instead of failing, and the watcher subscribes to a real sentinel, not to a
    # server that accepts SUBSCRIBE but would never announce a failover.
    host, port = replica_of(redis_sentinel)
    options = sentinel_options(redis_sentinel, auto_pipeline=auto_pipeline)
    backend = RedisSentinelBackend(
        options.replace(sentinels=[f"{host}:{port}", *redis_sentinel.sentinel_addrs])
    )
    async with Client(backend) as client:
        await client.set("k", "v")
        assert await read_from(redis_sentinel.master_addr(), "k") == b'"v"'
        subscribed = [
            server for server, c in own_sentinel_clients(backend, redis_sentinel) if c.get("sub") == "1"
        ]
        assert len(subscribed) == 1
        assert subscribed[0] in redis_sentinel.sentinel_addrs


async def test_concurrent_lookups_keep_every_sentinel(redis_sentinel: RedisSentinel) -> None:
    # Both wait on the silent first sentinel, then get their answer from the second;
    # each moved "its" sentinel to the front by the position it had seen, and the
    # second swap listed the second sentinel twice and lost the first for good.
    first = redis_sentinel.sentinels[0]
    async with FaultProxy(first.host, first.port) as proxy:
        proxy.blackhole()
        options = sentinel_options(redis_sentinel, read_timeout=0.5, max_retries=0)
        backend = RedisSentinelBackend(
            options.replace(sentinels=[proxy.addr, *redis_sentinel.sentinel_addrs[1:]])
        )
        try:
            before = list(backend.sentinel.sentinels)
            name = redis_sentinel.service_name
            found = await asyncio.gather(*(backend.sentinel.discover_master(name) for _ in range(2)))
            host, _, port = redis_sentinel.master_addr().rpartition(":")
            assert found == [(host, int(port))] * 2
            after = backend.sentinel.sentinels
            assert sorted(map(id, after)) == sorted(map(id, before))
            assert after[0] is before[1]  # the one that answered is asked first
        finally:
            await backend.close()


async def test_a_call_in_flight_at_close_asks_no_sentinel_afterwards(
    redis_sentinel: RedisSentinel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py retries a pooled call cut by close() on the same connection, which
    # asked the sentinels for the primary before it found its pool closed: each
    # retry opened a sentinel connection that nothing closed any more.
    backend = RedisSentinelBackend(sentinel_options(redis_sentinel, auto_pipeline=False, max_retries=3))
    await backend.connect()
    asked_after_close = 0
    closing = False
    discover: Callable[[str], Awaitable[tuple[str, int]]] = backend.sentinel.discover_master

    async def counting(service_name: str) -> tuple[str, int]:
        nonlocal asked_after_close
        asked_after_close += closing
        return await discover(service_name)

    monkeypatch.setattr(backend.sentinel, "discover_master", counting)
    call = asyncio.ensure_future(backend._exec("BLPOP", "nothing-comes", "2"))
    await asyncio.sleep(0.1)  # the BLPOP is waiting on its pooled connection
    closing = True
    await backend.close()
    with pytest.raises(redis.ConnectionError, match="closed"):
        await asyncio.wait_for(call, 10)
    assert asked_after_close == 0
    pools = [sentinel.connection_pool for sentinel in backend.sentinel.sentinels]
    still_open = [
        conn
        for pool in pools
        for conn in (*pool._available_connections, *pool._in_use_connections)
        if conn.is_connected
    ]
    assert still_open == []


def open_sentinel_connections(backend: RedisSentinelBackend) -> int:
    count = 0
    for sentinel in backend.sentinel.sentinels:
        pool: Any = sentinel.connection_pool
        count += sum(c.is_connected for c in (*pool._available_connections, *pool._in_use_connections))
    return count


async def test_a_cancelled_close_is_cancelled_and_the_closing_still_ends(
    redis_sentinel: RedisSentinel,
) -> None:
    # close() waited for the failover watcher under suppress(CancelledError): its
    # caller's cancellation was swallowed there (the task went on, a timeout around
    # close() never fired), and a shutdown could not interrupt it.
    backend = RedisSentinelBackend(sentinel_options(redis_sentinel))
    await backend.connect()
    closer = asyncio.create_task(backend.close())
    await asyncio.sleep(0)  # close() is waiting for the closing to end
    closer.cancel()
    await asyncio.wait_for(asyncio.gather(closer, return_exceptions=True), 10)
    assert closer.cancelled()
    # Nobody waits for the closing any more; it ends all the same.
    await eventually(lambda: open_sentinel_connections(backend) == 0, 10, "the sentinels were left open")
    await eventually(
        lambda: sum(switch_master_subscribers(redis_sentinel)) == 0, 10, "close() left a subscription open"
    )
    with pytest.raises(BackendUnavailableError, match="closed"):
        await asyncio.wait_for(backend.get("k"), 10)


async def test_close_ends_after_the_failover_watcher_failed(
    redis_sentinel: RedisSentinel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A watcher that died of a bug re-raised it in close(), which then left the
    # pool and the sentinel connections open.
    backend = RedisSentinelBackend(sentinel_options(redis_sentinel, dial_timeout=0.5))

    async def broken(*args: object) -> None:
        raise ValueError("a bug in the watcher")

    monkeypatch.setattr(backend, "_check_monitors", broken)
    await backend.connect()
    await backend.set("k", b"v")  # a sentinel connection is open now
    assert backend._watcher is not None
    assert backend._watcher.done()
    await asyncio.wait_for(backend.close(), 10)
    assert "a bug in the watcher" in caplog.text
    assert open_sentinel_connections(backend) == 0
    with pytest.raises(BackendUnavailableError, match="closed"):
        await asyncio.wait_for(backend.get("k"), 10)


@pytest.mark.parametrize("call", ["get", "watch"])
async def test_a_lookup_in_flight_at_close_leaves_no_sentinel_connection(
    redis_sentinel: RedisSentinel, call: str
) -> None:
    # close() cut the look-up's sentinel connection, and redis-py retried it on a new
    # one that nothing closed any more; a watch() got its answer and opened a live
    # subscription on the closed backend.
    async with contextlib.AsyncExitStack() as stack:
        proxies = [
            await stack.enter_async_context(FaultProxy(s.host, s.port)) for s in redis_sentinel.sentinels
        ]
        options = sentinel_options(redis_sentinel, auto_pipeline=False, read_timeout=10)
        backend = RedisSentinelBackend(options.replace(sentinels=[p.addr for p in proxies]))
        await backend.connect()
        await backend.set("k", b"v")
        await backend._pool.disconnect()  # the next call asks the sentinels first
        for proxy in proxies:
            proxy.latency = 0.3
        pending = asyncio.ensure_future(backend.get("k") if call == "get" else backend.watch("k"))
        try:
            await asyncio.sleep(0.1)  # its SENTINEL MASTERS is on the wire
            await backend.close()
            [outcome] = await asyncio.wait_for(asyncio.gather(pending, return_exceptions=True), 30)
            if call == "get":
                assert isinstance(outcome, BackendUnavailableError), outcome
            else:
                # A stream, stopped: Client.watch() ends a loop quietly on it.
                assert isinstance(outcome, ChangeFeed), outcome
                assert outcome.stopped
                with pytest.raises(BackendUnavailableError, match="closed"):
                    await asyncio.wait_for(anext(outcome), 10)
            await eventually(
                lambda: sum(p.connections for p in proxies) == 0, 5, "a sentinel connection stayed open"
            )
            assert open_sentinel_connections(backend) == 0
        finally:
            if pending.done() and not pending.cancelled() and pending.exception() is None:
                result = pending.result()
                if isinstance(result, ChangeFeed):
                    await result.aclose()
            await backend.close()


async def test_a_watch_subscribing_at_close_is_released(
    redis_sentinel: RedisSentinel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watch's connection is its own: one still subscribing when the backend
    # closed came back live, on a backend that refuses every other call.
    backend = RedisSentinelBackend(sentinel_options(redis_sentinel))
    await backend.connect()
    host, _, port = redis_sentinel.master_addr().rpartition(":")
    async with FaultProxy(host, int(port)) as proxy:
        proxy.latency = 0.2  # each step of the subscription takes a while
        discover: Callable[[str], Awaitable[tuple[str, int]]] = backend.sentinel.discover_master

        async def through_proxy(service_name: str) -> tuple[str, int]:
            await discover(service_name)
            return proxy.host, proxy.port

        monkeypatch.setattr(backend.sentinel, "discover_master", through_proxy)
        watching = asyncio.ensure_future(backend.watch("k"))
        try:
            await eventually(lambda: proxy.connections > 0, 10, "the watch never started subscribing")
            await backend.close()
            stream = await asyncio.wait_for(watching, 30)
            assert isinstance(stream, ChangeFeed)
            assert stream.stopped
            with pytest.raises(BackendUnavailableError, match="closed"):
                await asyncio.wait_for(anext(stream), 10)
            await eventually(lambda: proxy.connections == 0, 5, "the watch's connection stayed open")
        finally:
            if watching.done() and not watching.cancelled() and watching.exception() is None:
                await watching.result().aclose()
            await backend.close()


async def test_a_failover_before_a_late_first_subscription_is_followed(
    redis_sentinel_factory: SentinelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # No sentinel confirmed the subscription before connect() looked the primary up
    # and returned. When the confirmation came, after a failover, it was taken for
    # the first one connect() waits for, and the switch it missed was never acted
    # on: in a partition, writes would go on to the old primary.
    caplog.set_level(logging.INFO, logger=sentinel_module.__name__)
    topology = redis_sentinel_factory()
    old = topology.master_addr()
    first = topology.sentinels[0]
    async with FaultProxy(first.host, first.port) as proxy:
        sentinels = [proxy.addr, *topology.sentinel_addrs[1:]]
        options = sentinel_options(topology, dial_timeout=0.5, read_timeout=60)
        backend = RedisSentinelBackend(options.replace(sentinels=sentinels))
        try:
            # An idle connection to the first sentinel, which the watcher takes first:
            # held back, it keeps the subscription unconfirmed, while the look-up's new
            # connection to that sentinel times out and the next sentinel answers.
            await backend.sentinel.discover_master(topology.service_name)
            proxy.stall()
            await asyncio.wait_for(backend.connect(), 30)
            assert "no sentinel confirmed the failover subscription" in caplog.text
            assert backend._sentinel_pool.master_address == tuple_addr(old)
            new = await asyncio.to_thread(topology.failover, 60.0)
            assert new != old
            proxy.heal()  # the subscription goes through now, after the switch was announced
            await eventually(
                lambda: "subscribed to the sentinels only after connect(), reconnecting" in caplog.text,
                30,
                "the switch missed before the first subscription was never acted on",
            )
            await backend.set("k", b"after")
            assert await read_from(new, "k") == b"after"
        finally:
            await asyncio.wait_for(backend.close(), 10)


def tuple_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def drop_data_connections(backend: RedisSentinelBackend) -> Awaitable[None]:
    """Close the connections to the primary: the next call asks the sentinels first."""
    if backend._mux is not None:
        backend._mux.drop()
    return backend._pool.disconnect()


async def fail_over(topology: RedisSentinel, backend: RedisSentinelBackend) -> str:
    """Fail the primary over; return the new one's address once the backend has heard of the switch."""
    changes = backend._server_changes
    new = await asyncio.to_thread(topology.failover, 60.0)
    await eventually(lambda: backend._server_changes != changes, 30, "the backend never heard +switch-master")
    return new


@pytest.mark.parametrize("call", ["set", "watched transaction"])
async def test_a_pooled_connection_opening_across_a_switch_reaches_the_new_primary(
    redis_sentinel_factory: SentinelFactory, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    # Its look-up named the old primary, and +switch-master was handled while its
    # socket was opening: disconnect() had nothing to close yet, and the connection
    # went on to the demoted primary, which acknowledged the write and lost it.
    # A set is pooled with auto_pipeline=False; a transaction watching keys always is.
    topology = redis_sentinel_factory()
    old = topology.master_addr()
    # Long timeouts: the open is held for the whole failover.
    options = sentinel_options(topology, auto_pipeline=call != "set", dial_timeout=30, read_timeout=30)
    backend = RedisSentinelBackend(options)
    async with Client(backend) as client:
        await client.set("k", "before")
        await backend._pool.disconnect()  # the next pooled call opens a connection
        opening, release = asyncio.Event(), asyncio.Event()
        open_socket: Callable[[Any], Awaitable[None]] = sentinel_module._SentinelConnection._connect

        async def held_open(self: Any) -> None:
            opening.set()
            await release.wait()
            await open_socket(self)

        monkeypatch.setattr(sentinel_module._SentinelConnection, "_connect", held_open)

        async def write() -> None:
            if call == "set":
                await client.set("k", "during")
            else:
                async with client.transaction(watch=["k"]) as tx:
                    assert await tx.get("k", str) == "before"
                    tx.set("k", "during")

        writing = asyncio.create_task(write())
        try:
            await asyncio.wait_for(opening.wait(), 10)
            new = await fail_over(topology, backend)
        finally:
            release.set()
        await asyncio.wait_for(writing, 30)
        # The sentinels make the old primary a replica only about 10 s after the
        # switch: until then it takes writes, and keeps them.
        assert await read_from(old, "k") == b'"before"'
        assert await read_from(new, "k") == b'"during"'


async def test_a_reconnect_whose_lookup_spans_a_switch_asks_again(
    redis_sentinel_factory: SentinelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py reconnects a dropped connection (before retrying its command) through
    # connect_check_health, which asked the sentinels there: an answer read after
    # +switch-master was handled named the old primary, and the connection went there.
    topology = redis_sentinel_factory()
    old = topology.master_addr()
    backend = RedisSentinelBackend(sentinel_options(topology, auto_pipeline=False))
    async with Client(backend) as client:
        await client.set("k", "before")
        pool = backend._pool
        acquire: Callable[[], Awaitable[Any]] = pool.get_connection
        conn = await acquire()
        try:
            await conn.disconnect()  # lost, as its command is about to be retried
            answered, release = asyncio.Event(), asyncio.Event()
            discover: Callable[[str], Awaitable[tuple[str, int]]] = backend.sentinel.discover_master

            async def answered_late(service_name: str) -> tuple[str, int]:
                address = await discover(service_name)
                if not release.is_set():
                    answered.set()
                    await release.wait()
                return address

            monkeypatch.setattr(backend.sentinel, "discover_master", answered_late)
            reconnecting = asyncio.create_task(conn.connect_check_health(check_health=False))
            try:
                await asyncio.wait_for(answered.wait(), 10)
                new = await fail_over(topology, backend)
            finally:
                release.set()
            await asyncio.wait_for(reconnecting, 30)
            assert f"{conn.host}:{conn.port}" == new != old
        finally:
            await pool.release(conn)
        await client.set("k", "after")
        assert await read_from(new, "k") == b'"after"'


async def test_a_switch_missed_in_a_gap_is_caught_up_after_a_pooled_lookup(
    redis_sentinel_factory: SentinelFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The subscribed sentinel was lost and the primary switched before the backend
    # subscribed to another. The catch-up compared the sentinels' answer with the
    # pool's master_address, which a watched transaction's look-up had already moved
    # to the new primary: it saw no change, and the multiplexed connection stayed on
    # the demoted primary.
    caplog.set_level(logging.INFO, logger=sentinel_module.__name__)
    topology = redis_sentinel_factory()
    old = topology.master_addr()
    async with contextlib.AsyncExitStack() as stack:
        proxies = [await stack.enter_async_context(FaultProxy(s.host, s.port)) for s in topology.sentinels]
        options = sentinel_options(topology, dial_timeout=2)
        backend = RedisSentinelBackend(options.replace(sentinels=[p.addr for p in proxies]))
        client = await stack.enter_async_context(Client(backend))
        await client.set("k", "before")  # the multiplexed connection, on the old primary
        assert proxies[0].connections > 0  # the one subscribed to
        # The next subscription waits here until the switch was missed.
        check_monitors = backend._check_monitors
        resubscribing, release = asyncio.Event(), asyncio.Event()

        async def held(sentinel: Any, service: str, bound: float) -> None:
            resubscribing.set()
            await release.wait()
            await check_monitors(sentinel, service, bound)

        confirm = backend._confirm_subscription
        confirmed = asyncio.Event()

        async def confirmed_once(sentinel: Any) -> None:
            await confirm(sentinel)
            confirmed.set()

        monkeypatch.setattr(backend, "_check_monitors", held)
        monkeypatch.setattr(backend, "_confirm_subscription", confirmed_once)
        try:
            proxies[0].refuse()  # lost: redis-py cannot subscribe to it again
            await proxies[0].reset_connections()
            await asyncio.wait_for(resubscribing.wait(), 10)
            new = await asyncio.to_thread(topology.failover, 60.0)
            async with client.transaction(watch=["other"]) as tx:  # a pooled look-up
                tx.set("other", "x")
            assert backend._sentinel_pool.master_address == tuple_addr(new)
        finally:
            release.set()
        await asyncio.wait_for(confirmed.wait(), 10)
        await client.set("k", "after")
        assert await read_from(new, "k") == b'"after"'
        assert await read_from(old, "k") == b'"before"'
        assert "re-subscribed to the sentinels, reconnecting" in caplog.text


async def test_after_a_switch_the_announcing_sentinel_is_asked_first(
    redis_sentinel_factory: SentinelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another sentinel was first in the list (as after a look-up the subscribed one
    # was too slow to answer); it hears of the switch up to seconds after the one
    # that announced it, and named the old primary to the reconnect in between.
    topology = redis_sentinel_factory()
    old = topology.master_addr()
    backend = RedisSentinelBackend(sentinel_options(topology))
    async with Client(backend) as client:
        await client.set("k", "before")
        announcer, other = backend.sentinel.sentinels[:2]  # the subscribed one is asked first
        before: Any = await other.sentinel_masters()

        async def not_heard_yet() -> Any:
            return before

        monkeypatch.setattr(other, "sentinel_masters", not_heard_yet)
        backend._sentinel.ask_first(other)
        new = await fail_over(topology, backend)
        await client.set("k", "after")
        assert await read_from(new, "k") == b'"after"'
        assert await read_from(old, "k") == b'"before"'
        assert backend.sentinel.sentinels[0] is announcer


@TRANSPORTS
async def test_a_silent_sentinel_holds_no_lookup_without_read_timeout(
    redis_sentinel: RedisSentinel, monkeypatch: pytest.MonkeyPatch, auto_pipeline: bool
) -> None:
    # With read_timeout=None the look-up waited on the silent first sentinel for
    # good; on the multiplexed transport every later call waited on that connect.
    monkeypatch.setattr(sentinel_module, "_WATCH_SILENCE", 2.0)  # the bound without read_timeout
    redis_sentinel.flushall()
    first = redis_sentinel.sentinels[0]
    async with FaultProxy(first.host, first.port) as proxy:
        options = sentinel_options(
            redis_sentinel, read_timeout=None, dial_timeout=2, auto_pipeline=auto_pipeline
        )
        backend = RedisSentinelBackend(
            options.replace(sentinels=[proxy.addr, *redis_sentinel.sentinel_addrs[1:]])
        )
        async with Client(backend) as client:
            await client.set("k", 1)  # asked the first sentinel, whose connection stays open
            assert backend.sentinel.sentinels[0].connection_pool.connection_kwargs["port"] == proxy.port
            proxy.blackhole()
            await drop_data_connections(backend)
            calls = [asyncio.ensure_future(client.set("k", n)) for n in (2, 3)]
            try:
                await asyncio.wait_for(asyncio.gather(*calls), 20)
            finally:
                for call in calls:
                    call.cancel()
            assert await read_from(redis_sentinel.master_addr(), "k") in (b"2", b"3")
