"""Auto-pipelining: concurrent single-key commands share one connection and one write."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import redis_options
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from kivigo_async import (
    BackendError,
    BackendUnavailableError,
    Client,
    OperationTimeoutError,
    TransactionConflictError,
)
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.testing.pytest_plugin import ServerFactory, in_ci
from kivigo_async.testing.servers import RedisServer


@pytest.fixture
async def admin(valkey_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain redis-py connection for the test's own commands (pause, inspect)."""
    redis = Redis(**valkey_server.redis_kwargs())  # type: ignore[arg-type]
    await redis.flushdb()
    yield redis
    await redis.client_unpause()
    await redis.aclose()


@pytest.fixture
async def client(valkey_server: RedisServer) -> AsyncIterator[Client]:
    backend = RedisBackend(redis_options(valkey_server, client_name="kivigo-mux", read_timeout=5.0))
    async with Client(backend) as client:
        yield client


async def _mux_connections(admin: Redis, name: str) -> int:
    clients: list[dict[str, Any]] = await admin.client_list()
    return sum(1 for c in clients if c.get("name") == name)


def test_auto_pipeline_is_the_default() -> None:
    assert RedisBackend().options.auto_pipeline is True


async def test_replies_reach_their_own_callers(client: Client, admin: Redis) -> None:
    async def one(i: int) -> None:
        await client.set(f"k:{i}", {"i": i})
        assert await client.get(f"k:{i}") == {"i": i}

    await asyncio.gather(*(one(i) for i in range(1000)))
    # 2,000 concurrent calls went over the one multiplexed connection.
    assert await _mux_connections(admin, "kivigo-mux") == 1


async def test_concurrent_commands_leave_in_few_writes(client: Client) -> None:
    backend = client.backend
    assert isinstance(backend, RedisBackend)
    await client.set("warm", 1)  # connect first
    protocol = backend._mux._protocol  # type: ignore[union-attr]
    assert protocol is not None
    transport = protocol._transport
    assert transport is not None
    writes = 0
    real_write = transport.write

    def counting_write(data: bytes | bytearray | memoryview) -> None:
        nonlocal writes
        writes += 1
        real_write(data)

    transport.write = counting_write  # type: ignore[method-assign]
    try:
        values = await asyncio.gather(*(client.get("warm") for _ in range(64)))
    finally:
        transport.write = real_write  # type: ignore[method-assign]
    assert values == [1] * 64
    assert writes == 1


async def test_one_callers_error_does_not_touch_the_others(client: Client, admin: Redis) -> None:
    await admin.rpush("a-list", "x")  # GET on a list is a WRONGTYPE error

    async def good(i: int) -> int:
        await client.set(f"g:{i}", i)
        value: int = await client.get(f"g:{i}", int)
        return value

    async def bad() -> None:
        with pytest.raises(BackendError, match="WRONGTYPE"):
            await client.get_raw("a-list")

    results = await asyncio.gather(*(good(i) if i % 3 else bad() for i in range(300)))
    assert [r for r in results if r is not None] == [i for i in range(300) if i % 3]


async def test_cancelled_callers_never_disturb_the_others(client: Client, admin: Redis) -> None:
    await client.batch_set({f"c:{i}": i for i in range(200)})
    # Long enough that a slow machine still cancels before the replies come.
    await admin.client_pause(1500)
    tasks = [asyncio.ensure_future(client.get(f"c:{i}")) for i in range(200)]
    await asyncio.sleep(0.1)
    for task in tasks[::2]:
        task.cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for i, result in enumerate(results):
        if i % 2:
            assert result == i  # its own key's value, never a cancelled neighbour's
        else:
            assert isinstance(result, asyncio.CancelledError)
    # The connection stayed usable: no reconnect was needed.
    assert await asyncio.gather(*(client.get(f"c:{i}") for i in range(200))) == list(range(200))
    assert await _mux_connections(admin, "kivigo-mux") == 1


async def test_stalled_server_times_out_then_recovers(valkey_server: RedisServer, admin: Redis) -> None:
    backend = RedisBackend(redis_options(valkey_server, read_timeout=0.3))
    async with Client(backend) as client:
        await client.set("s", 1)
        await admin.client_pause(3000)
        start = time.monotonic()
        results = await asyncio.gather(*(client.get("s") for _ in range(10)), return_exceptions=True)
        elapsed = time.monotonic() - start
        assert all(isinstance(r, OperationTimeoutError) for r in results), results
        assert elapsed < 2.0  # read_timeout (0.3 s) plus a generous margin, not the 3 s pause
        await admin.client_unpause()
        assert await client.get("s") == 1


async def test_dropped_connection_fails_exactly_the_calls_in_flight(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory("valkey")
    admin = Redis(**server.redis_kwargs())  # type: ignore[arg-type]
    backend = RedisBackend(redis_options(server, read_timeout=10.0, max_retries=0))
    async with Client(backend) as client:
        await client.set("d", 1)
        await admin.client_pause(5000)
        in_flight = [asyncio.ensure_future(client.get("d")) for _ in range(20)]
        await asyncio.sleep(0.1)
        server.kill()
        results = await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), 10)
        assert all(isinstance(r, BackendUnavailableError) for r in results), results
        server.restart()
        await client.set("d", 2)  # a new call reconnects by itself
        assert await client.get("d") == 2
    await admin.aclose()


async def test_transactions_are_never_coalesced(client: Client) -> None:
    await client.set("counter", 0)

    async def noise() -> None:
        for i in range(200):
            await client.set(f"noise:{i % 10}", i)

    async def increment() -> None:
        while True:
            try:
                async with client.transaction(watch=["counter"]) as tx:
                    tx.set("counter", await tx.get("counter", int) + 1)
                return
            except TransactionConflictError:  # anything else fails the test
                await asyncio.sleep(0)

    await asyncio.gather(noise(), noise(), *(increment() for _ in range(30)))
    assert await client.get("counter") == 30


async def test_batch_with_ttl_is_not_mixed_with_other_callers(client: Client) -> None:
    async def reader(i: int) -> Any:
        await client.set(f"r:{i}", i)
        return await client.get(f"r:{i}")

    async def writer(i: int) -> None:
        await client.batch_set({f"w:{i}:{j}": j for j in range(20)}, ttl=60)

    results = await asyncio.gather(*(reader(i) if i % 2 else writer(i) for i in range(100)))
    # Commands of other tasks were never queued inside a batch's MULTI block.
    assert [r for r in results if r is not None] == [i for i in range(100) if i % 2]
    assert len(await client.list("w:")) == 50 * 20


async def test_transactions_without_watch_are_not_mixed_with_other_callers(client: Client) -> None:
    # They share the multiplexed connection as one MULTI..EXEC write each.
    async def reader(i: int) -> Any:
        await client.set(f"tr:{i}", i)
        return await client.get(f"tr:{i}")

    async def writer(i: int) -> None:
        async with client.transaction() as tx:
            for j in range(10):
                tx.set(f"tw:{i}:{j}", j, ttl=60)
            tx.delete(f"tw:{i}:0")

    results = await asyncio.gather(*(reader(i) if i % 2 else writer(i) for i in range(100)))
    # A reply of another caller's command never came back as QUEUED, nor theirs as ours.
    assert [r for r in results if r is not None] == [i for i in range(100) if i % 2]
    assert len(await client.list("tw:")) == 50 * 9


def test_runs_on_uvloop(valkey_server: RedisServer) -> None:
    try:
        import uvloop
    except ImportError:
        # The test extra installs it wherever it runs (not on Windows): CI must have it.
        message = "uvloop is not installed (pip install -e '.[test]')"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

    async def main() -> list[Any]:
        async with Client(RedisBackend(redis_options(valkey_server))) as client:
            await client.set("uv", {"loop": "uvloop"})
            return await asyncio.gather(*(client.get("uv") for _ in range(10)))

    assert uvloop.run(main()) == [{"loop": "uvloop"}] * 10


@pytest.mark.parametrize("wait_for_replies", [True, False])
async def test_reconnect_moves_the_next_calls_to_a_new_socket(
    valkey_server: RedisServer, admin: Redis, wait_for_replies: bool
) -> None:
    # What Sentinel does on a failover: the next call opens a new socket; the calls in
    # flight on the old one get their replies, or fail at once.
    from kivigo_async.backends.redis.standalone import _mux_for

    mux = _mux_for(redis_options(valkey_server, read_timeout=10.0))
    try:
        first = await mux.execute("CLIENT", "ID")
        # Long enough that a stalled test still reconnects before the replies come; the
        # calls after it wait for the pause's end (an ALL pause holds UNPAUSE too).
        await admin.client_pause(2000)
        in_flight = [asyncio.ensure_future(mux.execute("CLIENT", "ID")) for _ in range(5)]
        await asyncio.sleep(0.05)  # written, not answered
        mux.reconnect(wait_for_replies=wait_for_replies)
        results = await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), 10)
        if wait_for_replies:
            assert results == [first] * 5
        else:
            assert all(isinstance(r, RedisConnectionError) for r in results), results
        assert await mux.execute("CLIENT", "ID") != first
        deadline = time.monotonic() + 10
        while any(c["id"] == str(first) for c in await admin.client_list()):
            assert time.monotonic() < deadline, "the old connection stayed open"
            await asyncio.sleep(0.02)
    finally:
        await mux.close()


async def test_close_ends_a_connection_left_to_drain(valkey_server: RedisServer, admin: Redis) -> None:
    from kivigo_async.backends.redis.standalone import _mux_for

    mux = _mux_for(redis_options(valkey_server, read_timeout=None))
    await mux.execute("PING")
    await admin.client_pause(2000)
    in_flight = asyncio.ensure_future(mux.execute("PING"))
    await asyncio.sleep(0.05)  # written, not answered
    mux.reconnect(wait_for_replies=True)
    await mux.close()
    # Failed by close(), not answered once the pause ends: nothing completes after close().
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(in_flight, 1.0)


async def test_a_connect_finished_just_before_reconnect_is_not_used(
    redis_server_factory: ServerFactory,
) -> None:
    from kivigo_async.backends.redis._mux import MuxConnection, tcp_opener

    old, new = redis_server_factory("valkey"), redis_server_factory("valkey")
    target = [old]

    async def resolve() -> Any:
        return tcp_opener(target[0].host, target[0].port, None), f"port {target[0].port}"

    mux = MuxConnection(tcp_opener(old.host, old.port, None), node="svc", resolve=resolve)
    moved: list[bool] = []

    def between_the_open_and_its_callback() -> None:
        # As a +switch-master handler running after the connect task's last step
        # and before its done-callback installs the socket it opened.
        connecting = mux._connecting
        if connecting is not None and connecting.done():
            target[0] = new
            mux.reconnect(wait_for_replies=False)
            moved.append(True)
        elif not moved:
            asyncio.get_running_loop().call_soon(between_the_open_and_its_callback)

    asyncio.get_running_loop().call_soon(between_the_open_and_its_callback)
    try:
        await mux.execute("SET", "where", "first call")
        assert moved
        assert await mux.execute("CONFIG", "GET", "port") == [b"port", str(new.port).encode()]
        async with Redis(**old.redis_kwargs()) as direct:  # type: ignore[arg-type]
            assert await direct.get("where") is None
    finally:
        await mux.close()


@pytest.mark.parametrize("ending", ["retire", "close"])
async def test_callers_of_a_connect_under_way_when_the_connection_ends_get_a_connection_error(
    valkey_server: RedisServer, ending: str
) -> None:
    # A cluster node leaves the layout (retire) or the backend closes while calls
    # wait for the connection to open. They must hear of a closed connection, never
    # a bare cancellation: before Python 3.11 a cancelled connect could not be told
    # from a cancelled caller, and the callers' tasks ended as cancelled.
    from kivigo_async.backends.redis import _mux

    opened = asyncio.Event()
    go_on = asyncio.Event()
    direct = _mux.tcp_opener(valkey_server.host, valkey_server.port, None)

    async def gated(factory: Any) -> Any:
        opened.set()
        await go_on.wait()
        return await direct(factory)

    mux = _mux.MuxConnection(gated, node="leaving")
    try:
        calls = [asyncio.ensure_future(mux.execute("PING")) for _ in range(3)]
        await asyncio.wait_for(opened.wait(), 5)
        if ending == "retire":
            mux.retire()
        else:
            await mux.close()
        go_on.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert not any(call.cancelled() for call in calls)
        assert all(isinstance(o, RedisConnectionError) and "closed" in str(o) for o in outcomes), outcomes
        # A socket opened after the retirement was closed.
        assert not mux.connected
        assert not mux.draining
        with pytest.raises(RedisConnectionError, match="closed"):
            await mux.execute("PING")
    finally:
        await mux.close()


async def test_a_retired_connection_answers_the_calls_in_flight_then_closes(
    valkey_server: RedisServer, admin: Redis
) -> None:
    from kivigo_async.backends.redis.standalone import _mux_for

    mux = _mux_for(redis_options(valkey_server, read_timeout=None))
    try:
        own_id = await mux.execute("CLIENT", "ID")
        await admin.client_pause(2000)  # long enough that a stalled test still retires it first
        in_flight = [asyncio.ensure_future(mux.execute("ECHO", str(i))) for i in range(5)]
        await asyncio.sleep(0.05)  # written, not answered yet
        mux.retire()
        assert mux.draining
        with pytest.raises(RedisConnectionError, match="closed"):
            await mux.execute("PING")  # no new call on it
        assert await asyncio.wait_for(asyncio.gather(*in_flight), 10) == [str(i).encode() for i in range(5)]
        deadline = time.monotonic() + 10
        while any(c["id"] == str(own_id) for c in await admin.client_list()):
            assert time.monotonic() < deadline, "the retired connection stayed open"
            await asyncio.sleep(0.02)
        assert not mux.draining
    finally:
        await mux.close()
