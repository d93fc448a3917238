"""Faults: servers killed, stalled or out of memory, networks that misbehave, calls cancelled.

Each test runs on both transports of :class:`RedisBackend` where they differ:
the multiplexed connection (``auto_pipeline=True``, the default) and the
connection pool. Network faults go through :class:`FaultProxy`; process
faults use private servers from ``redis_server_factory``. docs/reliability.md
records what these tests showed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import random
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import chain_text, eventually, redis_options

from kivigo_async import Client
from kivigo_async._tasks import detached
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.errors import (
    BackendError,
    BackendUnavailableError,
    ConnectTimeoutError,
    KivigoError,
    OperationTimeoutError,
    TransactionConflictError,
)
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.pytest_plugin import ServerFactory, require_server
from kivigo_async.testing.servers import RedisServer, ServerPool

pytestmark = pytest.mark.server

TRANSPORTS = pytest.mark.parametrize("auto_pipeline", [True, False], ids=["multiplexed", "pool"])


# --------------------------------------------------------------------------- helpers


def control_client(server: RedisServer) -> aioredis.Redis:
    """A plain redis-py client, to steer and inspect the server behind the backend's back."""
    return aioredis.Redis(**server.redis_kwargs())  # type: ignore[arg-type]


@pytest.fixture
def server(redis_server_factory: ServerFactory) -> RedisServer:
    """A private Valkey server: these tests pause, fill, kill and restart it."""
    return redis_server_factory("valkey")


@pytest.fixture
async def control(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = control_client(server)
    yield client
    await client.aclose()


def unique_name() -> str:
    return f"kivigo-fault-{uuid.uuid4().hex[:10]}"


async def named_connections(control: aioredis.Redis, name: str) -> int:
    clients: list[dict[str, Any]] = await control.client_list()
    return sum(1 for c in clients if c.get("name") == name)


async def settle_connections(control: aioredis.Redis, name: str, at_most: int) -> int:
    """Poll ``CLIENT LIST`` (5 s at most) until no more than ``at_most`` connections are named ``name``."""
    deadline = time.monotonic() + 5.0
    while True:
        count = await named_connections(control, name)
        if count <= at_most or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.02)


def assert_ours(exc: BaseException, *allowed: type[KivigoError]) -> None:
    """``exc`` is one of ``allowed``, and never a redis-py (or other foreign) type."""
    assert type(exc).__module__.startswith("kivigo_async"), repr(exc)
    assert isinstance(exc, allowed), repr(exc)


async def timed(call: Awaitable[Any], bound: float) -> tuple[Any, float]:
    """Await ``call`` (a hang past ``bound + 30`` s fails the test) and return (result or error, seconds)."""
    start = time.monotonic()
    try:
        result: Any = await asyncio.wait_for(call, bound + 30)
    except (KivigoError, asyncio.TimeoutError) as exc:
        result = exc
    return result, time.monotonic() - start


def pool_in_use(backend: RedisBackend) -> int:
    return len(backend.redis.connection_pool._in_use_connections)


def mux_waiting(backend: RedisBackend) -> int:
    """Replies the multiplexed connection still waits for (0 when idle or not connected)."""
    mux = backend._mux
    protocol = None if mux is None else mux._protocol
    return 0 if protocol is None or protocol.closed else len(protocol._waiters)


# --------------------------------------------------------------------------- the proxy itself


def test_proxy_refuses_addresses_off_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("192.0.2.1", 6379)
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("127.0.0.1", 6379, host="0.0.0.0")
    FaultProxy("127.0.0.1", 6379, host="127.0.0.2")  # all of 127/8 is loopback


@pytest.mark.parametrize("cut", ["drop", "reset"])
async def test_proxy_ends_a_server_side_that_connects_after_the_cut(
    cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_sides: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_sides.append((reader, writer))

    target = await asyncio.start_server(accept, "127.0.0.1", 0)
    connect = asyncio.open_connection
    gate = asyncio.Event()

    async def slow_connect(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()  # the proxy's dial to its target, held until after the cut
        return await connect(*args, **kwargs)

    try:
        async with FaultProxy("127.0.0.1", target.sockets[0].getsockname()[1]) as proxy:
            monkeypatch.setattr(asyncio, "open_connection", slow_connect)
            _, client_out = await connect(proxy.host, proxy.port)
            deadline = time.monotonic() + 30
            while proxy.connections == 0:
                assert time.monotonic() < deadline, "the proxy never accepted"
                await asyncio.sleep(0.01)
            assert await (proxy.reset_connections() if cut == "reset" else proxy.drop_connections()) == 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                gate.set()
                deadline = time.monotonic() + 30
                while not server_sides:
                    assert time.monotonic() < deadline, "the proxy never dialled its target"
                    await asyncio.sleep(0.01)
                server_in, server_out = server_sides[0]
                try:
                    assert await asyncio.wait_for(server_in.read(10), 30) == b""
                except ConnectionResetError:
                    assert cut == "reset"
                while proxy.connections:
                    assert time.monotonic() < deadline, "the link never ended"
                    await asyncio.sleep(0.01)
                gc.collect()
            # Ended by the proxy (closed or reset), not left for the garbage collector.
            assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught
            client_out.close()
            server_out.close()
    finally:
        target.close()
        await target.wait_closed()


@TRANSPORTS
async def test_proxy_latency_delays_both_directions(server: RedisServer, auto_pipeline: bool) -> None:
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, auto_pipeline=auto_pipeline).replace(addr=proxy.addr)
        async with Client(RedisBackend(options)) as client:
            await client.set("latency:k", {"v": 1})
            proxy.latency = 0.15
            start = time.monotonic()
            assert await client.get("latency:k") == {"v": 1}
            # One round trip crosses the proxy twice; replies still reach their callers.
            assert time.monotonic() - start >= 0.29
            values = await asyncio.gather(*(client.get("latency:k") for _ in range(20)))
            assert values == [{"v": 1}] * 20
            assert proxy.connections >= 1


@TRANSPORTS
async def test_proxy_stall_holds_traffic_until_healed(server: RedisServer, auto_pipeline: bool) -> None:
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, auto_pipeline=auto_pipeline, read_timeout=10.0).replace(
            addr=proxy.addr
        )
        async with Client(RedisBackend(options)) as client:
            await client.batch_set({f"stall:{i}": i for i in range(20)})
            proxy.stall()
            calls = [asyncio.ensure_future(client.get(f"stall:{i}")) for i in range(20)]
            await asyncio.sleep(0.3)
            assert not any(c.done() for c in calls)
            proxy.heal()  # nothing was lost: every call gets its own reply
            assert await asyncio.wait_for(asyncio.gather(*calls), 30) == list(range(20))


# --------------------------------------------------------------------------- server killed


@TRANSPORTS
async def test_server_killed_and_restarted_under_load(
    server: RedisServer, control: aioredis.Redis, auto_pipeline: bool
) -> None:
    name = unique_name()
    read_timeout, dial_timeout, max_retries, pool_size = 1.0, 1.0, 2, 8
    options = redis_options(
        server,
        auto_pipeline=auto_pipeline,
        read_timeout=read_timeout,
        dial_timeout=dial_timeout,
        max_retries=max_retries,
        pool_size=pool_size,
        client_name=name,
    )
    # Worst case for one call: a wait for a pooled connection (read_timeout + 1),
    # every dial attempt timing out, the backoff between them, and the read itself.
    bound = (read_timeout + 1) + (max_retries + 1) * dial_timeout + max_retries * 0.512 + read_timeout + 3
    phase = "up"
    restarted_at = 0.0
    stats: dict[str, collections.Counter[str]] = {p: collections.Counter() for p in ("up", "down", "back")}
    recovered_after: dict[int, float] = {}
    slowest = 0.0
    stop = asyncio.Event()
    all_recovered = asyncio.Event()

    async with Client(RedisBackend(options)) as client:

        async def worker(i: int) -> None:
            nonlocal slowest
            key = f"load:{i}"
            written: set[int | None] = {None}
            n = 0
            while not stop.is_set():
                n += 1
                seen = phase
                call = client.set(key, n) if n % 2 else client.get(key, default=None)
                result, took = await timed(call, bound)
                slowest = max(slowest, took)
                assert took < bound, f"a call took {took:.1f} s (bound {bound:.1f} s)"
                if isinstance(result, BaseException):
                    assert_ours(result, BackendUnavailableError, OperationTimeoutError)
                    stats[seen][type(result).__name__] += 1
                    await asyncio.sleep(0.01)
                    continue
                if n % 2:
                    written.add(n)
                else:  # its own last writes, or nothing: the restarted server has no data
                    assert result in written, (key, result)
                stats[seen]["ok"] += 1
                if seen == "back" and i not in recovered_after:
                    recovered_after[i] = time.monotonic() - restarted_at
                    if len(recovered_after) == 50:
                        all_recovered.set()

        workers = [asyncio.create_task(worker(i)) for i in range(50)]
        await asyncio.sleep(0.5)
        phase = "down"
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(server.restart)
        restarted_at = time.monotonic()
        phase = "back"
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(all_recovered.wait(), 30)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), bound + 30)

        assert len(recovered_after) == 50, "the same client recovers for every task"
        assert stats["up"]["ok"] > 0
        assert sum(stats["down"].values()) - stats["down"]["ok"] > 0, "the outage was seen"
        assert await settle_connections(control, name, pool_size + 1) <= pool_size + 1
    print(
        f"\n[kill/restart {'multiplexed' if auto_pipeline else 'pool'}] {dict(stats)} "
        f"slowest={slowest:.2f}s bound={bound:.1f}s recovered_within={max(recovered_after.values()):.2f}s"
    )


@TRANSPORTS
async def test_a_listing_across_a_server_restart_fails_rather_than_miss_keys(
    redis_server_factory: ServerFactory, auto_pipeline: bool
) -> None:
    # The restarted process reloads the same keys but hashes them with a new seed:
    # the old cursor, sent to it, would skip some keys and repeat others, silently.
    server = redis_server_factory("valkey", extra_config={"appendonly": "yes", "appendfsync": "always"})
    options = redis_options(server, max_retries=3, auto_pipeline=auto_pipeline)
    async with Client(RedisBackend(options)) as client:
        await client.batch_set({f"scan:{i}": i for i in range(3000)})
        keys = client.iter_keys("scan:")
        seen = {await anext(keys)}  # the first page is read
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.restart)
        with pytest.raises(BackendUnavailableError, match="during the listing"):
            async for key in keys:
                seen.add(key)
        assert len(seen) < 3000
        assert len(await client.list("scan:")) == 3000  # a new listing is whole


async def test_a_listing_on_the_pool_works_for_a_user_refused_info(
    server: RedisServer, control: aioredis.Redis
) -> None:
    # The pool asks INFO for the server's run_id beside each SCAN page; a user the
    # ACL refuses it to still lists (without the restart check).
    execute: Any = control.execute_command
    await execute("ACL", "SETUSER", "lister", "on", ">lister-pw", "~*", "+@all", "-info")
    options = redis_options(server, auto_pipeline=False).replace(username="lister", password="lister-pw")
    async with Client(RedisBackend(options)) as client:
        await client.batch_set({f"acl:{i}": i for i in range(2500)})
        assert len(await client.list("acl:")) == 2500


@TRANSPORTS
async def test_acknowledged_writes_survive_sigkill(
    redis_server_factory: ServerFactory, auto_pipeline: bool
) -> None:
    server = redis_server_factory("valkey", extra_config={"appendonly": "yes", "appendfsync": "always"})
    acked: dict[str, int] = {}
    attempts = 0
    enough = asyncio.Event()
    # A writer that times out stops; one slow fsync on a busy disk must not stop them all.
    options = redis_options(server, auto_pipeline=auto_pipeline, read_timeout=10.0, max_retries=0)

    async with Client(RedisBackend(options)) as client:

        async def writer(w: int) -> None:
            nonlocal attempts
            n = 0
            while True:
                n += 1
                attempts += 1
                key = f"aof:{w}:{n}"
                try:
                    if n % 10 == 0:
                        batch = {f"{key}:{j}": n for j in range(5)}
                        await client.batch_set(batch, ttl=3600 if n % 20 == 0 else None)
                        acked.update(batch)
                    else:
                        await client.set(key, n)
                        acked[key] = n
                    if len(acked) >= 2000:
                        enough.set()
                except (BackendUnavailableError, OperationTimeoutError):
                    return  # the server is gone

        writers = [asyncio.create_task(writer(w)) for w in range(20)]
        await asyncio.wait_for(enough.wait(), 60)
        await asyncio.to_thread(server.kill)  # SIGKILL while writes are in flight
        await asyncio.wait_for(asyncio.gather(*writers), 30)

    await asyncio.to_thread(server.restart)
    async with Client(RedisBackend(options)) as client:
        keys = list(acked)
        found: dict[str, Any] = {}
        for start in range(0, len(keys), 1000):
            found.update(await client.batch_get(keys[start : start + 1000]))
    missing = [k for k in keys if found.get(k) != acked[k]]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    print(
        f"\n[AOF {'multiplexed' if auto_pipeline else 'pool'}] {len(acked)} acknowledged writes "
        f"of {attempts} attempted, all read back after SIGKILL"
    )


# --------------------------------------------------------------------------- cancellation


@TRANSPORTS
async def test_cancellation_storm_with_batches_and_transactions(
    server: RedisServer, control: aioredis.Redis, auto_pipeline: bool
) -> None:
    rng = random.Random()
    name = unique_name()
    options = redis_options(
        server,
        pool_size=2,
        client_name=name,
        read_timeout=5.0,
        pool_timeout=30.0,
        auto_pipeline=auto_pipeline,
    )
    values = {f"storm:{i}": f"value-{i}" for i in range(300)}
    keys = list(values)
    batch_ids: list[str] = []
    tx_ids: list[str] = []
    kinds: collections.Counter[str] = collections.Counter()
    applied: dict[str, int] = {}
    backend = RedisBackend(options)

    async with Client(backend) as client:
        await client.batch_set(values)

        async def get_one() -> None:
            key = rng.choice(keys)
            got = await client.get(key)
            assert got == values[key], f"get({key!r}) returned another call's reply: {got!r}"

        async def get_many() -> None:
            wanted = rng.sample(keys, 5)
            got = await client.batch_get(wanted)
            assert got == {k: values[k] for k in wanted}, f"batch_get returned other replies: {got!r}"

        async def set_many() -> None:
            batch = uuid.uuid4().hex
            batch_ids.append(batch)
            ttl = rng.choice([None, 600])
            await client.batch_set({f"batch:{batch}:{j}": batch for j in range(4)}, ttl=ttl)

        async def transaction() -> None:
            tx_id = uuid.uuid4().hex
            tx_ids.append(tx_id)
            key = rng.choice(keys)
            watch = [key] if rng.random() < 0.5 else []
            try:
                async with client.transaction(watch=watch) as tx:
                    if watch:
                        assert await tx.get(key) == values[key]
                    tx.set(f"tx:{tx_id}:a", tx_id)
                    tx.set(f"tx:{tx_id}:b", tx_id)
            except TransactionConflictError:
                pass  # cannot happen (nobody writes the watched keys), but is not a leak

        operations: list[Callable[[], Awaitable[None]]] = [get_one, get_one, get_many, set_many, transaction]

        async def cancel_after_iterations(task: asyncio.Future[None], n: int) -> None:
            for _ in range(n):
                await asyncio.sleep(0)
            task.cancel()

        async def storm(count: int, max_delay: float) -> int:
            """Start ``count`` calls, cancel most at random points; return how many completed."""
            loop = asyncio.get_running_loop()
            tasks: list[asyncio.Future[None]] = []
            timers: list[asyncio.TimerHandle] = []
            helpers: list[asyncio.Task[None]] = []
            for _ in range(count):
                operation = rng.choice(operations)
                kinds[operation.__name__] += 1
                mode = rng.randrange(4)
                if mode == 0:
                    tasks.append(
                        asyncio.ensure_future(asyncio.wait_for(operation(), rng.uniform(0, max_delay)))
                    )
                    continue
                task = asyncio.ensure_future(operation())
                tasks.append(task)
                if mode == 1:
                    timers.append(loop.call_later(rng.uniform(0, max_delay), task.cancel))
                elif mode == 2:
                    helpers.append(asyncio.create_task(cancel_after_iterations(task, rng.randrange(16))))
                # mode 3: left to complete, competing with the cancelled ones
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
            await asyncio.gather(*helpers)
            for timer in timers:
                timer.cancel()
            completed = 0
            for result in results:
                if result is None:
                    completed += 1
                # wait_for's own TimeoutError, exactly: OperationTimeoutError is one too.
                # (Before Python 3.11, wait_for raises asyncio.TimeoutError, another class.)
                elif not isinstance(result, asyncio.CancelledError) and type(result) not in (
                    TimeoutError,
                    asyncio.TimeoutError,
                ):
                    raise result
            return completed

        completed = 0
        # Calls cancelled while the server holds every reply back.
        await control.client_pause(600)
        completed += await storm(300, max_delay=0.9)
        # Cancelled at random points of live calls: sending, reading, acquiring, releasing.
        for _ in range(5):
            completed += await storm(500, max_delay=0.004)
        assert completed > 0

        # Nothing poisoned: every key still reads as its own value, singly and in batches.
        for key in keys:
            assert await client.get(key) == values[key]
        assert await client.batch_get(keys) == values
        # Batches and transactions are all or nothing, even when cancelled.
        for prefix, ids, suffixes in (("batch", batch_ids, "0123"), ("tx", tx_ids, "ab")):
            pipe = control.pipeline(transaction=False)
            for i in ids:
                pipe.exists(*(f"{prefix}:{i}:{s}" for s in suffixes))
            counts = collections.Counter(await pipe.execute())
            assert set(counts) <= {0, len(suffixes)}, f"a {prefix} was half-applied: {counts}"
            applied[prefix] = counts[len(suffixes)]

        # Nothing leaked: both pooled connections can be held at once, and nothing waits for a reply.
        async def hold_both_connections() -> None:
            async with client.transaction(watch=[keys[0]]) as t1, client.transaction(watch=[keys[1]]) as t2:
                assert await t1.get(keys[0]) == values[keys[0]]
                assert await t2.get(keys[1]) == values[keys[1]]

        await asyncio.wait_for(hold_both_connections(), 30)
        assert pool_in_use(backend) == 0
        assert mux_waiting(backend) == 0
        assert await settle_connections(control, name, 2 + auto_pipeline) <= 2 + auto_pipeline
    print(
        f"\n[storm {'multiplexed' if auto_pipeline else 'pool'}] {sum(kinds.values())} calls {dict(kinds)}, "
        f"{completed} completed; batches applied {applied['batch']}/{len(batch_ids)}, "
        f"transactions applied {applied['tx']}/{len(tx_ids)}, none half-applied"
    )


# --------------------------------------------------------------------------- stalls


@TRANSPORTS
async def test_black_holed_server_times_out_within_read_timeout(
    server: RedisServer, auto_pipeline: bool
) -> None:
    read_timeout = 0.5
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(
            server, auto_pipeline=auto_pipeline, read_timeout=read_timeout, max_retries=3
        ).replace(addr=proxy.addr)
        async with Client(RedisBackend(options)) as client:
            await client.set("hole:k", 1)  # connected before the fault
            proxy.blackhole()
            results = await asyncio.gather(*(timed(client.get("hole:k"), 10) for _ in range(10)))
            for error, took in results:
                assert_ours(error, OperationTimeoutError)
                assert "hole:k" in str(error)
                assert took < read_timeout + 1.5, f"took {took:.2f} s"
            proxy.heal()
            assert await asyncio.wait_for(client.get("hole:k"), 10) == 1  # reconnected by itself
    print(
        f"\n[black hole {'multiplexed' if auto_pipeline else 'pool'}] "
        f"timeouts after {min(t for _, t in results):.2f}-{max(t for _, t in results):.2f} s "
        f"(read_timeout {read_timeout} s)"
    )


@TRANSPORTS
async def test_black_hole_before_connecting_is_bounded(server: RedisServer, auto_pipeline: bool) -> None:
    read_timeout, dial_timeout, max_retries = 0.5, 0.5, 2
    async with FaultProxy(server.host, server.port) as proxy:
        proxy.blackhole()  # TCP connects, but nothing ever answers: not even the handshake
        options = redis_options(
            server,
            auto_pipeline=auto_pipeline,
            read_timeout=read_timeout,
            dial_timeout=dial_timeout,
            max_retries=max_retries,
        ).replace(addr=proxy.addr)
        client = Client(RedisBackend(options))
        try:
            bound = (max_retries + 1) * (dial_timeout + read_timeout) + 2
            error, took = await timed(client.get("hole:k"), bound)
            assert_ours(error, OperationTimeoutError, BackendUnavailableError)
            assert took < bound, f"took {took:.2f} s"
            proxy.heal()
            assert await asyncio.wait_for(client.get("hole:k", default=0), 10) == 0
        finally:
            await client.close()
    transport = "multiplexed" if auto_pipeline else "pool"
    print(f"\n[black hole at connect {transport}] {type(error).__name__} after {took:.2f} s")


@TRANSPORTS
@pytest.mark.parametrize(
    ("read_timeout", "dial_timeout", "max_retries"),
    [
        (None, 0.5, 0),  # dial_timeout bounds the login, which read_timeout=None would not
        # read_timeout runs out first: still a connection that could not open, not an
        # operation timeout, since the call's command was never sent. Not retried.
        (0.3, 2.0, 2),
    ],
    ids=["no-read-timeout", "read-timeout-first"],
)
async def test_a_login_that_gets_no_answer_is_a_connect_timeout(
    redis_server_factory: ServerFactory,
    auto_pipeline: bool,
    read_timeout: float | None,
    dial_timeout: float,
    max_retries: int,
) -> None:
    server = redis_server_factory("valkey", "password")
    async with FaultProxy(server.host, server.port) as proxy:
        proxy.blackhole()  # TCP connects; AUTH never gets an answer
        options = redis_options(
            server,
            auto_pipeline=auto_pipeline,
            read_timeout=read_timeout,
            dial_timeout=dial_timeout,
            max_retries=max_retries,
        ).replace(addr=proxy.addr)
        client = Client(RedisBackend(options))
        bound = (max_retries + 1) * dial_timeout + 2
        try:
            error, took = await timed(client.get("login:k"), bound)
            # Timeouts are never retried, on either transport: one attempt, dial_timeout at most.
            assert proxy.accepted == 1
            # One error for both transports, caught by either of its parents' except clauses.
            assert_ours(error, ConnectTimeoutError)
            assert isinstance(error, OperationTimeoutError)
            assert isinstance(error, BackendUnavailableError)
            assert "dial_timeout" in str(error)
            assert "login:k" in str(error)
            assert took < bound, f"took {took:.2f} s"  # not forever, as read_timeout=None would allow
            proxy.heal()
            assert await asyncio.wait_for(client.get("login:k", default=0), 10) == 0
        finally:
            await client.close()


@TRANSPORTS
@pytest.mark.parametrize("cut", ["reset", "drop"])
async def test_cut_connections_fail_fast_and_recover(
    server: RedisServer, auto_pipeline: bool, cut: str
) -> None:
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, auto_pipeline=auto_pipeline, read_timeout=10.0).replace(
            addr=proxy.addr
        )
        async with Client(RedisBackend(options)) as client:
            await client.batch_set({f"cut:{i}": i for i in range(20)})
            proxy.stall()
            calls = [asyncio.ensure_future(timed(client.get(f"cut:{i}"), 10)) for i in range(20)]
            await asyncio.sleep(0.2)
            assert await (proxy.reset_connections() if cut == "reset" else proxy.drop_connections()) >= 1
            proxy.heal()
            for i, (result, took) in enumerate(await asyncio.gather(*calls)):
                # Well before read_timeout: a lost connection is noticed at once. The pool
                # may retry a read on a new connection; the multiplexed one never re-sends.
                assert took < 5.0, f"took {took:.2f} s"
                if isinstance(result, BaseException):
                    assert_ours(result, BackendUnavailableError)
                else:
                    assert result == i
            assert await client.batch_get([f"cut:{i}" for i in range(20)]) == {
                f"cut:{i}": i for i in range(20)
            }


async def test_multi_command_writes_cut_mid_flight_log_nothing(
    server: RedisServer, kivigo_server_pool: ServerPool, leaks: LeakWatch
) -> None:
    # Multiplexed only: a TTL batch and the connection handshake are several commands
    # in one write, each with its own reply; losing the connection fails them all at once.
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, read_timeout=10.0, max_retries=0).replace(addr=proxy.addr)
        async with Client(RedisBackend(options)) as client:
            await client.set("cut:k", 1)
            for give_up in (False, True):
                proxy.stall()
                call = asyncio.ensure_future(client.batch_set({f"cut:{i}": i for i in range(10)}, ttl=60))
                await asyncio.sleep(0.1)
                if give_up:
                    call.cancel()
                await proxy.reset_connections()
                proxy.heal()
                with pytest.raises((BackendUnavailableError, asyncio.CancelledError)):
                    await call
    secured = require_server(kivigo_server_pool, "valkey", "password")
    async with FaultProxy(secured.host, secured.port) as proxy:
        proxy.blackhole()  # AUTH, SELECT and CLIENT SETNAME all go unanswered
        options = redis_options(secured, read_timeout=0.3, max_retries=0, client_name=unique_name())
        client = Client(RedisBackend(options.replace(addr=proxy.addr, db=2)))
        with pytest.raises(OperationTimeoutError):
            await client.get("cut:k")
        await client.close()
    leaks.check()  # no "Future exception was never retrieved"


@TRANSPORTS
async def test_refused_connections_fail_fast_and_recover(server: RedisServer, auto_pipeline: bool) -> None:
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, auto_pipeline=auto_pipeline, max_retries=2).replace(addr=proxy.addr)
        async with Client(RedisBackend(options)) as client:
            await client.set("refused:k", 1)
            proxy.refuse()
            await proxy.reset_connections()
            error, took = await timed(client.get("refused:k"), 10)
            assert_ours(error, BackendUnavailableError)
            assert took < 5.0
            proxy.heal()
            assert await client.get("refused:k") == 1


# --------------------------------------------------------------------------- lost transaction replies


@pytest.mark.parametrize("cut", ["timeout", "drop"])
async def test_exec_whose_reply_is_lost_is_not_reported_as_a_conflict(server: RedisServer, cut: str) -> None:
    """The server applied EXEC but the reply never came: the outcome is unknown, not a conflict.

    A conflict means "nothing was written, run it again"; said here, a retry loop
    would apply the transaction twice.
    """
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, read_timeout=1.0, max_retries=0).replace(addr=proxy.addr)
        async with Client(RedisBackend(options)) as client:
            await client.set("stock", 5)

            async def drop_soon() -> None:
                if cut == "drop":  # else the reply is waited for until read_timeout
                    await asyncio.sleep(0.3)
                    await proxy.drop_connections()

            with pytest.raises((BackendUnavailableError, OperationTimeoutError)) as info:
                async with client.transaction(watch=["stock"]) as tx:
                    stock = await tx.get("stock", int)
                    tx.set("stock", stock - 1)
                    proxy.mute()  # EXEC still reaches the server; its reply does not come back
                    dropper = asyncio.ensure_future(drop_soon())
            await dropper
            assert_ours(info.value, BackendUnavailableError, OperationTimeoutError)
            assert not isinstance(info.value, TransactionConflictError)
            assert "may or may not have been applied" in str(info.value)
            proxy.heal()
            assert await client.get("stock") == 4  # it was applied: a retry would have made it 3


async def exec_calls(control: aioredis.Redis) -> int:
    stats = await control.info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


@TRANSPORTS
async def test_a_transaction_whose_reply_is_lost_is_never_sent_again(
    server: RedisServer, control: aioredis.Redis, auto_pipeline: bool
) -> None:
    """Default retries, either transport: a block that ran must not run a second time.

    Run again after the lost reply, it would delete the lock another client took
    meanwhile; the caller must hear "may or may not", not a success.
    """
    async with (
        FaultProxy(server.host, server.port) as proxy,
        Client(
            RedisBackend(redis_options(server, auto_pipeline=auto_pipeline).replace(addr=proxy.addr))
        ) as client,
    ):
        await client.set("lock", "mine")
        async with client.transaction() as warm:  # whatever connection transactions use is open
            warm.set("warm", 1)
        before = await exec_calls(control)

        async def release() -> None:
            async with client.transaction() as tx:
                tx.delete("lock")
                tx.set("released", 1)

        async def ran_once() -> bool:
            return await exec_calls(control) == before + 1

        proxy.mute()  # the block reaches the server; its reply does not come back
        task = asyncio.ensure_future(release())
        await eventually(ran_once, what="the block never reached the server")
        await control.set("lock", "someone-else")
        proxy.heal()
        await proxy.drop_connections()
        with pytest.raises(BackendUnavailableError, match="may or may not have been applied"):
            await asyncio.wait_for(task, 30)
        assert await exec_calls(control) == before + 1
        assert await control.get("lock") == b"someone-else"  # not deleted by a second run


async def test_connection_lost_while_watching_says_nothing_was_written(server: RedisServer) -> None:
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, read_timeout=1.0, max_retries=0).replace(addr=proxy.addr)
        async with Client(RedisBackend(options)) as client:
            await client.set("stock", 5)
            with pytest.raises(BackendUnavailableError, match="nothing was written") as info:
                async with client.transaction(watch=["stock"]) as tx:
                    await proxy.drop_connections()
                    await tx.get("stock", int)
            assert not isinstance(info.value, TransactionConflictError)
            proxy.heal()
            assert await client.get("stock") == 5


@TRANSPORTS
async def test_a_block_that_goes_on_after_its_watch_was_lost_writes_nothing(
    server: RedisServer, control: aioredis.Redis, auto_pipeline: bool
) -> None:
    """A read failed while watching: the WATCH ended with its connection.

    A block that catches the error and goes on must not commit unguarded over a
    concurrent write: its EXEC fails as a conflict, and nothing is written.
    """
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, max_retries=0, auto_pipeline=auto_pipeline).replace(addr=proxy.addr)
        async with Client(RedisBackend(options)) as client:
            await client.set("balance", 100)
            with pytest.raises(TransactionConflictError, match="nothing was written"):
                async with client.transaction(watch=["balance"]) as tx:
                    balance = await tx.get("balance", int)
                    await proxy.drop_connections()
                    with pytest.raises(BackendUnavailableError):
                        await tx.get("other", default=None)
                    await control.set("balance", b"500")  # a concurrent change WATCH would catch
                    tx.set("balance", balance - 10)
            assert await client.get("balance") == 500


@TRANSPORTS
async def test_one_transaction_read_from_many_tasks(server: RedisServer, auto_pipeline: bool) -> None:
    # Reads on the watching connection take turns: no reply goes to the wrong read,
    # and no error from the client library underneath escapes.
    async with Client(RedisBackend(redis_options(server, auto_pipeline=auto_pipeline))) as client:
        # Values large enough that a reply arrives in several reads.
        await client.batch_set({f"many:{i}": str(i) * 100_000 for i in range(50)})
        async with client.transaction(watch=["many:0"]) as tx:
            values = await asyncio.gather(*(tx.get(f"many:{i}", str) for i in range(50)))
            assert values == [str(i) * 100_000 for i in range(50)]
            tx.set("many:0", -1)
        assert await client.get("many:0", int) == -1


@TRANSPORTS
async def test_close_fails_the_calls_waiting_for_a_pooled_connection_at_once(
    server: RedisServer, auto_pipeline: bool
) -> None:
    # They would otherwise wait out pool_timeout (read_timeout + 1 s) and fail as a
    # timeout, not as a closed backend.
    options = redis_options(server, auto_pipeline=auto_pipeline, pool_size=2)
    client = Client(RedisBackend(options))
    await client.set("warm", 1)

    async def one(i: int) -> None:
        if auto_pipeline:  # optimistic transactions take pooled connections
            async with client.transaction(watch=[f"w:{i}"]) as tx:
                tx.set(f"w:{i}", i)
        else:
            await client.set(f"w:{i}", i)

    calls = [asyncio.ensure_future(one(i)) for i in range(300)]
    await asyncio.sleep(0.005)
    await client.close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors  # most were still queued for one of the 2 connections
    assert all(isinstance(e, BackendUnavailableError) and "closed" in str(e) for e in errors), errors[:3]


class OutOfStockError(Exception):
    pass


@pytest.mark.parametrize("ending", ["raises", "reads only"])
async def test_a_stalled_unwatch_neither_escapes_nor_hides_the_blocks_own_exception(
    server: RedisServer, ending: str
) -> None:
    # A watched transaction that ends without EXEC sends UNWATCH when it gives its
    # connection back. If that stalls, abandoning needs nothing more from the
    # server (the timed-out connection is closed, and its WATCH with it): the
    # block's own exception comes out, or nothing at all, never redis-py's.
    async with FaultProxy(server.host, server.port) as proxy:
        options = redis_options(server, read_timeout=0.5, max_retries=0).replace(addr=proxy.addr)
        async with Client(RedisBackend(options)) as client:
            await client.set("stock", 5)
            with contextlib.ExitStack() as expect:
                if ending == "raises":
                    expect.enter_context(pytest.raises(OutOfStockError))
                async with client.transaction(watch=["stock"]) as tx:
                    assert await tx.get("stock", int) == 5
                    proxy.blackhole()
                    if ending == "raises":
                        raise OutOfStockError
            proxy.heal()
            assert await client.get("stock") == 5
            async with client.transaction(watch=["stock"]) as tx:  # the pool still serves transactions
                tx.set("stock", await tx.get("stock", int) - 1)
            assert await client.get("stock") == 4


def test_only_a_connect_timeout_is_a_connect_timeout() -> None:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from kivigo_async.backends.redis._errors import translate

    # redis-py's wording (the cluster's node connections use it) and ours.
    dial = translate(RedisTimeoutError("Timeout connecting to server"), "GET", "k", "node:1")
    assert type(dial) is ConnectTimeoutError
    read = translate(RedisTimeoutError("Timeout reading from node:1"), "GET", "k", "node:1")
    assert type(read) is OperationTimeoutError


def test_a_real_conflict_is_still_a_conflict() -> None:
    from redis.exceptions import WatchError

    from kivigo_async.backends.redis._errors import translate

    error = translate(WatchError("Watched variable changed."), "EXEC", None, "node:1")
    assert isinstance(error, TransactionConflictError)


# --------------------------------------------------------------------------- pool exhaustion


@TRANSPORTS
async def test_transactions_exhausting_the_pool_complete(
    server: RedisServer, control: aioredis.Redis, auto_pipeline: bool
) -> None:
    name = unique_name()
    options = redis_options(server, auto_pipeline=auto_pipeline, pool_size=2, client_name=name)
    async with Client(RedisBackend(options)) as client:
        await client.batch_set({f"counter:{i}": 0 for i in range(10)} | {f"plain:{i}": i for i in range(400)})

        async def increment(i: int) -> int:
            key = f"counter:{(i // 2) % 10}"
            while True:
                try:
                    async with client.transaction(watch=[key]) as tx:
                        tx.set(key, await tx.get(key, int) + 1)
                    return 1
                except TransactionConflictError:
                    await asyncio.sleep(0)

        async def read(i: int) -> int:
            value: int = await client.get(f"plain:{i}", int)
            assert value == i
            return 0

        calls = [increment(i) if i % 2 else read(i) for i in range(400)]
        assert sum(await asyncio.wait_for(asyncio.gather(*calls), 120)) == 200
        assert await client.batch_get([f"counter:{i}" for i in range(10)]) == {
            f"counter:{i}": 20 for i in range(10)
        }
        assert await settle_connections(control, name, 2 + auto_pipeline) <= 2 + auto_pipeline


@TRANSPORTS
async def test_held_pool_gives_a_clear_timeout(server: RedisServer, auto_pipeline: bool) -> None:
    options = redis_options(server, auto_pipeline=auto_pipeline, pool_size=2, pool_timeout=0.3)
    async with Client(RedisBackend(options)) as client:
        await client.set("held:k", 1)

        async def slow_transaction(i: int) -> None:
            async with client.transaction(watch=[f"held:{i}"]) as tx:
                await tx.get(f"held:{i}", default=None)
                await asyncio.sleep(1.0)  # holds a pooled connection all along
                tx.set(f"held:{i}", i)

        results = await asyncio.wait_for(
            asyncio.gather(*(slow_transaction(i) for i in range(200)), return_exceptions=True), 60
        )
        timeouts = [r for r in results if r is not None]
        for error in timeouts:
            assert_ours(error, OperationTimeoutError)
            assert "no free connection in the pool" in str(error)
        assert results.count(None) >= 2
        written = await client.batch_get([f"held:{i}" for i in range(200)])
        assert written == {f"held:{i}": i for i, r in enumerate(results) if r is None}
        assert await client.get("held:k") == 1  # the pool is whole again


# --------------------------------------------------------------------------- out of memory


async def fill_until_oom(control: aioredis.Redis) -> int:
    """Write values until even a tiny one is refused (used memory is then past maxmemory).

    Return how many 10 KB values fitted.
    """
    filled = 0
    for size in (10_000, 1000, 100, 10):
        n = 0
        while True:
            try:
                await control.set(f"fill:{size}:{n}", b"x" * size)
            except aioredis.ResponseError:
                break
            n += 1
        if size == 10_000:
            filled = n
    return filled


@TRANSPORTS
async def test_out_of_memory_is_a_clear_error_and_batches_stay_whole(
    redis_server_factory: ServerFactory, auto_pipeline: bool
) -> None:
    server = redis_server_factory(
        "valkey", extra_config={"maxmemory": "4mb", "maxmemory-policy": "noeviction"}
    )
    control = control_client(server)
    secret_value = "value-" + uuid.uuid4().hex
    try:
        async with Client(RedisBackend(redis_options(server, auto_pipeline=auto_pipeline))) as client:
            filled = await fill_until_oom(control)

            async def tx_write() -> None:
                async with client.transaction() as tx:
                    tx.set("oom:tx:a", secret_value)
                    tx.set("oom:tx:b", secret_value)

            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: client.set("oom:k", secret_value),
                lambda: client.batch_set({"oom:a": secret_value, "oom:b": secret_value}),
                lambda: client.batch_set({"oom:a": secret_value, "oom:b": secret_value}, ttl=60),
                tx_write,
            ]
            for call in calls:
                with pytest.raises(BackendError) as info:
                    await call()
                assert_ours(info.value, BackendError)
                assert not isinstance(info.value, BackendUnavailableError)
                assert "out of memory" in str(info.value)
                assert "maxmemory" in str(info.value)
                # redis-py's pipeline errors echo the command, value included: not in
                # our message, nor in the exception it was raised from (a logged
                # traceback prints that too).
                assert secret_value not in chain_text(info.value)
            assert await control.exists("oom:k", "oom:a", "oom:b", "oom:tx:a", "oom:tx:b") == 0

            # Just under the limit, batches that cross it: each is written whole or not at all.
            await control.delete(*(f"fill:10000:{n}" for n in range(filled - 30, filled)))
            outcomes: collections.Counter[str] = collections.Counter()
            for b in range(40):
                batch = {f"edge:{b}:{j}": "y" * 1000 for j in range(50)}
                try:
                    if b % 3 == 2:
                        async with client.transaction() as tx:
                            for key, value in batch.items():
                                tx.set(key, value)
                    else:
                        await client.batch_set(batch, ttl=600 if b % 3 else None)
                    outcomes["written"] += 1
                except BackendError as exc:
                    outcomes["refused" if "out of memory" in str(exc) else repr(exc)] += 1
                assert await control.exists(*batch) in (0, 50), f"batch {b} was half-written"
            assert set(outcomes) == {"written", "refused"}, outcomes
    finally:
        await control.aclose()
    transport = "multiplexed" if auto_pipeline else "pool"
    print(f"\n[OOM {transport}] {filled} x 10 KB filled 4 MB; edge batches {dict(outcomes)}")


# --------------------------------------------------------------------------- closing and event loops


class LeakWatch:
    """Collects what signals a leak: ResourceWarnings, unraisable errors, asyncio's error logs."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog
        self.unraisable: list[str] = []
        self.warnings: list[warnings.WarningMessage] = []

    def check(self) -> None:
        """Collect garbage (unclosed transports and unseen errors surface then) and assert none."""
        gc.collect()
        problems = list(self.unraisable)
        problems += [
            f"{w.category.__name__}: {w.message}" for w in self.warnings if w.category is ResourceWarning
        ]
        problems += [f"log: {r.getMessage()}" for r in self._caplog.records if r.name == "asyncio"]
        text = "\n".join(problems)
        assert "Event loop is closed" not in text
        assert not problems, text


@pytest.fixture
def leaks(caplog: pytest.LogCaptureFixture) -> Iterator[LeakWatch]:
    caplog.set_level(logging.WARNING, logger="asyncio")
    watch = LeakWatch(caplog)
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        watch.unraisable.append(f"unraisable: {unraisable.exc_value!r} in {unraisable.object!r}")

    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            watch.warnings = caught
            yield watch
    finally:
        sys.unraisablehook = previous_hook


@TRANSPORTS
async def test_closing_with_calls_in_flight_leaks_nothing(
    server: RedisServer, control: aioredis.Redis, auto_pipeline: bool, leaks: LeakWatch
) -> None:
    name = unique_name()
    options = redis_options(server, auto_pipeline=auto_pipeline, pool_size=8, client_name=name)
    client = Client(RedisBackend(options))
    await client.set("close:k", 1)
    before = asyncio.all_tasks()
    outcomes: collections.Counter[str] = collections.Counter()

    async def worker(i: int) -> None:
        n = 0
        while True:
            n += 1
            operation = n % 4
            try:
                if operation == 0:
                    await client.set(f"close:{i}", n)
                elif operation == 1:
                    await client.get("close:k")
                elif operation == 2:
                    await client.batch_get(["close:k", f"close:{i}"])
                else:
                    async with client.transaction() as tx:
                        tx.set(f"close:{i}", n)
            except KivigoError as exc:
                assert_ours(exc, BackendUnavailableError)
                outcomes[type(exc).__name__] += 1
                return
            outcomes["ok"] += 1

    workers = [asyncio.create_task(worker(i)) for i in range(50)]
    await asyncio.sleep(0.3)
    await client.close()
    await asyncio.wait_for(asyncio.gather(*workers), 30)  # every worker saw the close
    assert outcomes["BackendUnavailableError"] == 50
    with pytest.raises(BackendUnavailableError):
        await client.get("close:k")
    assert await settle_connections(control, name, 0) == 0
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before - {asyncio.current_task()} == set()
    leaks.check()


@pytest.mark.parametrize("round_", range(3))
@TRANSPORTS
async def test_clients_on_successive_pytest_loops(
    server: RedisServer, auto_pipeline: bool, round_: int, leaks: LeakWatch
) -> None:
    # pytest-asyncio gives each test a new loop: each round's client lives and dies on its own.
    async with Client(RedisBackend(redis_options(server, auto_pipeline=auto_pipeline))) as client:
        await client.set("loop:k", round_)
        assert await asyncio.gather(*(client.get("loop:k") for _ in range(20))) == [round_] * 20
        async with client.transaction() as tx:
            tx.set("loop:tx", round_)
    leaks.check()


@TRANSPORTS
def test_clients_on_successive_asyncio_run_loops(
    server: RedisServer, auto_pipeline: bool, leaks: LeakWatch
) -> None:
    options = redis_options(server, auto_pipeline=auto_pipeline)

    async def use(client: Client, n: int) -> None:
        async with client:
            await client.set("run:k", n)
            assert await asyncio.gather(*(client.get("run:k") for _ in range(20))) == [n] * 20
            async with client.transaction() as tx:
                tx.set("run:tx", n)

    for n in range(3):
        # Built outside any loop, as module-level code would.
        asyncio.run(use(Client(RedisBackend(options)), n))
        gc.collect()
    # A bare loop, closed right after: no asyncio.run clean-up to lean on.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(use(Client(RedisBackend(options)), 3))
    finally:
        loop.close()
    leaks.check()


async def test_closing_work_outlives_a_caller_that_gave_up(caplog: pytest.LogCaptureFixture) -> None:
    # Closing runs in a task of its own, awaited through a shield: the caller's
    # cancellation leaves it running, and a failure nobody awaits is not logged
    # as "never retrieved".
    finished = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.05)
        finished.set()
        raise RuntimeError("failed after the caller left")

    task = detached(work(), "closing")
    caller = asyncio.ensure_future(asyncio.shield(task))
    await asyncio.sleep(0)
    caller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(finished.wait(), 10)
    await asyncio.sleep(0)
    assert task.done()
    del task, caller  # nobody ever asked for the error
    gc.collect()
    assert "never retrieved" not in caplog.text
