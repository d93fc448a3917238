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
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.pytest_plugin import SentinelFactory
from kivigo_async.testing.topologies import RedisSentinel


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
    backend = RedisSentinelBackend(sentinel_options(redis_sentinel, protocol=protocol, read_timeout=0.2))
    async with Client(backend) as client:
        await client.set("k", 1)
        await asyncio.sleep(1.5)  # several rounds of PING and reply
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
