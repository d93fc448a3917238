"""Client.get_or_set: in-process single-flight and the distributed lease, on memory and real servers."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Optional, cast

import msgspec
import pytest
from conftest import eventually, refused_port
from redis.asyncio import Redis
from redis.crc import key_slot
from typing_extensions import Self

from kivigo_async import Client, LeaseBackend
from kivigo_async._singleflight import SingleFlight, find_lease, lease_key, result_type
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.backends.redis import RedisBackend, RedisClusterBackend, RedisClusterOptions, RedisOptions
from kivigo_async.backends.redis._lease import RedisLease
from kivigo_async.errors import (
    BackendUnavailableError,
    DecodeError,
    EncodeError,
    InvalidArgumentError,
    InvalidKeyError,
    KivigoError,
    OperationTimeoutError,
)
from kivigo_async.hooks import EventType, HookEvent
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.servers import RedisServer
from kivigo_async.testing.topologies import RedisCluster

if TYPE_CHECKING:
    from sqlite3 import Connection  # imported for type checkers only, as an app's DB session often is


@dataclass
class User:
    id: int
    name: str


class Point(msgspec.Struct):
    x: int
    y: int


# Generous: two shared cores, and other test runs beside this one.
WAIT = 30.0


class Counter:
    """Counts factory runs in this process."""

    def __init__(self) -> None:
        self.runs = 0


class MinimalBackend:
    """Only AsyncBackend: no lease capability."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(0)
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        await asyncio.sleep(0)
        self.data[key] = value

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def scan(self, prefix: str) -> AsyncIterator[str]:
        for key in list(self.data):
            if key.startswith(prefix):
                yield key

    async def close(self) -> None:
        pass


@pytest.fixture
async def admin(valkey_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain redis-py connection for the test's own commands."""
    redis = Redis(**valkey_server.redis_kwargs())  # type: ignore[arg-type]
    yield redis
    await redis.aclose()


@pytest.fixture(params=["memory", "valkey"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    """A client on MemoryBackend and on a real Valkey server."""
    if request.param == "memory":
        backend: Any = MemoryBackend()
    else:
        server: RedisServer = request.getfixturevalue("valkey_server")
        backend = RedisBackend.from_url(server.url)
    async with Client(backend) as c:
        yield c


def fresh_key() -> str:
    return f"gos:{uuid.uuid4().hex}"


async def exists(client: Client, key: str) -> bool:
    return await client.backend.get(key) is not None


# -- across processes --------------------------------------------------------------

WORKER = r"""
import asyncio, json, sys
from redis.asyncio import Redis
from kivigo_async import Client
from kivigo_async.backends.redis import RedisBackend

async def main(url, key, tasks):
    admin = Redis.from_url(url)
    async with Client(RedisBackend.from_url(url)) as client:
        async def factory():
            await admin.incr(key + ":runs")
            await asyncio.sleep(0.5)  # long enough for the other process to arrive
            return {"answer": 42}

        await admin.incr(key + ":ready")
        while not await admin.exists(key + ":go"):
            await asyncio.sleep(0.01)
        results = await asyncio.gather(
            *(client.get_or_set(key, factory, lock_ttl=60, wait_timeout=120) for _ in range(tasks))
        )
    await admin.aclose()
    print(json.dumps(results))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_two_processes_run_the_factory_once(valkey_server: RedisServer, admin: Redis) -> None:
    key = fresh_key()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            valkey_server.url,
            key,
            "50",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]

    async def start_then_collect() -> list[tuple[bytes, bytes]]:
        while int(await admin.get(key + ":ready") or 0) < 2:
            await asyncio.sleep(0.02)
            for proc in procs:
                assert proc.returncode is None, "a worker died before it was ready"
        await admin.set(key + ":go", 1)
        return await asyncio.gather(*(p.communicate() for p in procs))

    try:
        outputs = await asyncio.wait_for(start_then_collect(), 120)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        assert json.loads(out) == [{"answer": 42}] * 50
    assert await admin.get(key + ":runs") == b"1"
    assert await admin.exists(lease_key(key)) == 0
    await admin.delete(key, key + ":runs", key + ":ready", key + ":go")


# -- the lease -------------------------------------------------------------------


async def test_crashed_holder_lease_expires_and_a_waiter_takes_over(client: Client) -> None:
    key = fresh_key()
    lkey = lease_key(key)
    lease = find_lease(client.backend)
    assert lease is not None
    # A "crashed" holder: it took the lease and will never give it back.
    assert await lease.acquire_lease(lkey, b"crashed", 1500)
    seen: list[bytes | None] = []

    async def factory() -> dict[str, int]:
        seen.append(await client.backend.get(lkey))
        return {"v": 1}

    results = await asyncio.wait_for(
        asyncio.gather(*(client.get_or_set(key, factory, lock_ttl=30) for _ in range(20))), 60
    )
    assert results == [{"v": 1}] * 20
    # Ran once, and only after the crashed holder's lease was gone.
    assert len(seen) == 1
    assert seen[0] not in (None, b"crashed")
    assert not await exists(client, lkey)
    await client.delete(key)


async def test_factory_error_reaches_every_waiter_and_releases_the_lease(client: Client) -> None:
    key = fresh_key()
    calls = Counter()
    started = asyncio.Event()
    fail = asyncio.Event()  # set once the test has seen the lease and every caller waiting

    async def factory() -> int:
        calls.runs += 1
        started.set()
        await fail.wait()
        raise ValueError("backend of record is down")

    async def every_caller_waits() -> None:
        assert client._filler is not None
        while client._filler._flights._calls[key].waiters < 20:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(client.get_or_set(key, factory)) for _ in range(20)]
    await started.wait()
    assert await exists(client, lease_key(key))  # held while the factory runs
    await asyncio.wait_for(every_caller_waits(), 10)  # the error must reach them all
    fail.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert calls.runs == 1
    assert all(isinstance(r, ValueError) and str(r) == "backend of record is down" for r in results)
    assert not await exists(client, lease_key(key))
    assert not await exists(client, key)

    # Nothing sticky: the next call runs the factory again.
    async def good() -> int:
        return 7

    assert await client.get_or_set(key, good) == 7
    await client.delete(key)


async def test_unencodable_result_raises_encode_error_and_stores_nothing(client: Client) -> None:
    key = fresh_key()

    async def factory() -> object:
        return object()

    with pytest.raises(EncodeError, match=key):
        await client.get_or_set(key, factory)
    assert not await exists(client, key)
    assert not await exists(client, lease_key(key))


async def test_wait_timeout_bounds_waiting_for_another_holder(client: Client) -> None:
    key = fresh_key()
    lkey = lease_key(key)
    lease = find_lease(client.backend)
    assert lease is not None
    assert await lease.acquire_lease(lkey, b"busy-elsewhere", 60_000)
    calls = Counter()

    def factory() -> int:
        calls.runs += 1
        return 1

    with pytest.raises(OperationTimeoutError, match="wait_timeout") as info:
        await asyncio.wait_for(client.get_or_set(key, factory, wait_timeout=0.3), 30)
    assert isinstance(info.value, TimeoutError)
    assert calls.runs == 0
    assert await client.backend.get(lkey) == b"busy-elsewhere"  # someone else's lease is untouched
    assert await lease.release_lease(lkey, b"busy-elsewhere")


async def test_each_caller_waits_by_its_own_wait_timeout() -> None:
    async with Client(MemoryBackend()) as client:
        lease = find_lease(client.backend)
        assert lease is not None
        assert await lease.acquire_lease(lease_key("k"), b"elsewhere", 60_000)
        patient = asyncio.create_task(client.get_or_set("k", lambda: 1))  # no wait_timeout
        await asyncio.sleep(0.05)
        # A later caller joins the same run and still leaves after its own 0.2 s...
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(OperationTimeoutError, match="wait_timeout"):
            await asyncio.wait_for(client.get_or_set("k", lambda: 2, wait_timeout=0.2), 30)
        assert loop.time() - started < 10
        # ... without ending the wait of the first, who gets the value when it comes.
        await asyncio.sleep(0.3)
        assert not patient.done()
        await client.set("k", 7)
        assert await asyncio.wait_for(patient, 10) == 7

        # The other way round: the first caller's short timeout is not the second's.
        assert await lease.acquire_lease(lease_key("j"), b"elsewhere", 60_000)
        hasty = asyncio.create_task(client.get_or_set("j", lambda: 1, wait_timeout=0.2))
        await asyncio.sleep(0.05)
        calm = asyncio.create_task(client.get_or_set("j", lambda: 2))
        with pytest.raises(OperationTimeoutError):
            await asyncio.wait_for(hasty, 10)
        await asyncio.sleep(0.3)
        assert not calm.done()
        await client.set("j", 8)
        assert await asyncio.wait_for(calm, 10) == 8


class SlowLeases(MemoryBackend):
    """Leases whose round trips take ``delay`` seconds (a distant server); acquire sets first."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def acquire_lease(self, key: str, token: bytes, ttl_ms: int) -> bool:
        taken = await super().acquire_lease(key, token, ttl_ms)
        await asyncio.sleep(self.delay)  # the reply is on its way back
        return taken

    async def release_lease(self, key: str, token: bytes) -> bool:
        await asyncio.sleep(self.delay)
        return await super().release_lease(key, token)


async def test_wait_timeout_does_not_count_taking_and_giving_back_the_lease() -> None:
    # Nobody else holds the lease: this process fills the value, and a wait_timeout
    # shorter than the lease's round trips is not a wait for another process.
    backend = SlowLeases(0.1)
    async with Client(backend) as client:
        assert await asyncio.wait_for(client.get_or_set("k", lambda: 42, wait_timeout=0.02), 10) == 42
        assert not await client.has_key(lease_key("k"))  # given back, not left to expire
        assert await client.get("k") == 42


async def test_a_fill_cancelled_while_taking_the_lease_gives_it_back() -> None:
    backend = SlowLeases(1.0)
    async with Client(backend) as client:
        caller = asyncio.create_task(client.get_or_set("k", lambda: 1, lock_ttl=60))
        for _ in range(100):  # until the lease is set, its reply still on the way
            await asyncio.sleep(0.01)
            if await client.has_key(lease_key("k")):
                break
        assert await client.has_key(lease_key("k"))
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        deadline = asyncio.get_running_loop().time() + 10
        while await client.has_key(lease_key("k")):  # released (after its own round trip)
            assert asyncio.get_running_loop().time() < deadline, "the lease was left to expire"
            await asyncio.sleep(0.05)


class CutAfterRead(RedisBackend):
    """Once a read has come back (while ``proxy`` is set), the next command runs on the
    server but its reply is lost: the connection is reset 0.2 s later."""

    proxy: FaultProxy | None = None

    async def get(self, key: str) -> bytes | None:
        data = await super().get(key)
        proxy = self.proxy
        if proxy is not None:
            self.proxy = None
            proxy.mute()

            async def cut() -> None:
                await asyncio.sleep(0.2)
                proxy.heal()
                await proxy.reset_connections()

            self.cutting = asyncio.ensure_future(cut())
        return data


async def test_a_fill_whose_lease_acquire_fails_gives_it_back(
    valkey_server: RedisServer, admin: Redis
) -> None:
    # The server sets the lease, then the connection breaks before the reply: the
    # lease is given back, not left for every process to wait out lock_ttl.
    async with FaultProxy(valkey_server.host, valkey_server.port) as proxy:
        backend = CutAfterRead(RedisOptions(addr=proxy.addr, max_retries=0, auto_pipeline=False))
        async with Client(backend) as client:
            key = fresh_key()
            backend.proxy = proxy
            with pytest.raises(BackendUnavailableError, match="lease acquire"):
                await asyncio.wait_for(client.get_or_set(key, lambda: 1, lock_ttl=60), 30)
            await backend.cutting
            assert await admin.get(lease_key(key)) is None
            assert await client.get_or_set(key, lambda: 2, lock_ttl=60) == 2


class LostAcquireReply(MemoryBackend):
    """Sets the lease, then times out as if its reply had not come back in time."""

    async def acquire_lease(self, key: str, token: bytes, ttl_ms: int) -> bool:
        await super().acquire_lease(key, token, ttl_ms)
        raise OperationTimeoutError(f"EVAL (lease acquire) for key {key!r}: timed out")


async def test_a_fill_whose_lease_acquire_times_out_gives_it_back() -> None:
    async with Client(LostAcquireReply()) as client:
        with pytest.raises(OperationTimeoutError, match="lease acquire"):
            await client.get_or_set("k", lambda: 1, lock_ttl=60)
        assert not await client.has_key(lease_key("k"))


class SlowFactory:
    """A factory that says when it has started, then takes ``seconds`` to return ``value``."""

    def __init__(self, value: int, seconds: float) -> None:
        self.value = value
        self.seconds = seconds
        self.started = asyncio.Event()

    async def __call__(self) -> int:
        self.started.set()
        await asyncio.sleep(self.seconds)
        return self.value


async def test_wait_timeout_never_interrupts_a_factory_running_in_this_process() -> None:
    async with Client(MemoryBackend()) as client:
        slow = SlowFactory(5, 0.5)
        first = asyncio.create_task(client.get_or_set("k", slow))
        await slow.started.wait()
        # This caller's 0.1 s runs out while the factory runs here: it waits on.
        assert await asyncio.wait_for(client.get_or_set("k", slow, wait_timeout=0.1), 10) == 5
        assert await first == 5


async def test_a_factory_cancelled_from_inside_fails_its_callers_without_cancelling_them() -> None:
    async with Client(MemoryBackend()) as client:
        upstream: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def factory() -> int:
            return await upstream  # e.g. a request another component gives up on

        callers = [asyncio.create_task(client.get_or_set("k", factory)) for _ in range(3)]
        await asyncio.sleep(0.05)
        upstream.cancel()
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 10)
        for result in results:
            assert type(result) is KivigoError
            assert "cancelled from inside" in str(result)
        assert not any(task.cancelled() for task in callers)
        assert not await client.has_key("k")
        assert not await client.has_key(lease_key("k"))


async def test_keys_with_and_without_their_own_braces_have_their_own_leases() -> None:
    assert len({lease_key(k) for k in ("a", "{a}", "report:daily", "{report:daily}", "={a}")}) == 5
    async with Client(MemoryBackend()) as client:
        slow = SlowFactory(1, 30)
        holder = asyncio.create_task(client.get_or_set("a", slow))
        await slow.started.wait()
        # A fill of "{a}" is not made to wait for the fill of "a".
        assert await asyncio.wait_for(client.get_or_set("{a}", lambda: 2, wait_timeout=5), 10) == 2
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder


async def test_value_stored_by_another_holder_is_read_not_recomputed(client: Client) -> None:
    key = fresh_key()
    lkey = lease_key(key)
    lease = find_lease(client.backend)
    assert lease is not None
    assert await lease.acquire_lease(lkey, b"other", 60_000)

    async def other_process() -> None:
        await asyncio.sleep(0.3)
        await client.set(key, {"from": "other"})
        await lease.release_lease(lkey, b"other")

    def factory() -> dict[str, str]:
        raise AssertionError("the factory must not run while another holder fills the key")

    other = asyncio.create_task(other_process())
    value = await asyncio.wait_for(client.get_or_set(key, factory), 30)
    await other
    assert value == {"from": "other"}
    await client.delete(key)


async def test_an_acquire_whose_reply_was_lost_still_holds_the_lease(valkey_server: RedisServer) -> None:
    # The server set the lease, the reply never came, the connection was reset and
    # the command retried: that retry must say "taken", not "someone else's".
    async with FaultProxy(valkey_server.host, valkey_server.port) as proxy:
        # Leases always take a pooled connection; without the multiplexed one,
        # connect() opens it, so the SET itself is what the mute holds back.
        backend = RedisBackend(
            RedisOptions(addr=proxy.addr, read_timeout=5, max_retries=3, auto_pipeline=False)
        )
        lease = RedisLease(backend)
        lkey = lease_key(fresh_key())
        try:
            await backend.connect()
            proxy.mute()  # the SET reaches the server; its reply is held back

            async def cut() -> None:
                await asyncio.sleep(0.2)
                proxy.heal()
                await proxy.reset_connections()

            cutting = asyncio.ensure_future(cut())
            assert await asyncio.wait_for(lease.acquire_lease(lkey, b"tok-A", 10_000), 10)
            await cutting
            assert not await lease.acquire_lease(lkey, b"tok-B", 10_000)  # still the first caller's
            assert await lease.release_lease(lkey, b"tok-A")
        finally:
            await backend.close()


async def test_release_is_compare_and_delete(client: Client) -> None:
    lease = find_lease(client.backend)
    assert lease is not None
    lkey = lease_key(fresh_key())
    assert await lease.acquire_lease(lkey, b"mine", 60_000)
    assert not await lease.acquire_lease(lkey, b"yours", 60_000)
    # My lease expired and someone else took it: releasing mine must leave theirs.
    await client.backend.set(lkey, b"theirs", 60_000)
    assert not await lease.release_lease(lkey, b"mine")
    assert await client.backend.get(lkey) == b"theirs"
    assert await lease.release_lease(lkey, b"theirs")
    assert not await exists(client, lkey)
    assert not await lease.release_lease(lkey, b"theirs")


async def test_redis_lease_errors_are_translated_without_the_password() -> None:
    with refused_port() as port:
        backend = RedisBackend(RedisOptions(addr=f"127.0.0.1:{port}", password="s3cret-pw", max_retries=0))
        lease = RedisLease(backend)
        try:
            with pytest.raises(BackendUnavailableError) as info:
                await asyncio.wait_for(lease.acquire_lease("kivigo:lease:{k}", b"t", 1000), 30)
            assert "kivigo:lease:{k}" in str(info.value)
            with pytest.raises(BackendUnavailableError) as release_info:
                await asyncio.wait_for(lease.release_lease("kivigo:lease:{k}", b"t"), 30)
            for exc in (info.value, release_info.value):
                assert "s3cret-pw" not in str(exc)
                assert "s3cret-pw" not in repr(exc)
        finally:
            await backend.close()


def test_lease_capability_detection() -> None:
    assert isinstance(MemoryBackend(), LeaseBackend)
    assert find_lease(MinimalBackend()) is None
    assert isinstance(find_lease(RedisBackend()), RedisLease)
    assert isinstance(find_lease(RedisClusterBackend(RedisClusterOptions(addrs=["127.0.0.1:1"]))), RedisLease)


@pytest.mark.parametrize("key", ["plain", "user:1:profile", "{user:1}:profile", "a{b", "x}y{z}", "é:ü", "{"])
def test_lease_key_shares_the_hash_slot(key: str) -> None:
    lkey = lease_key(key)
    assert lkey.startswith("kivigo:lease:")
    assert key in lkey
    assert key_slot(lkey.encode()) == key_slot(key.encode())


@pytest.mark.parametrize("key", ["a}b", "{}", "a{}b{c}"])
def test_lease_key_with_a_brace_but_no_hash_tag(key: str) -> None:
    # No hash tag can reproduce a hash of a whole key containing "}": the lease
    # lands elsewhere in a cluster (locality only), and is still its own key.
    assert lease_key(key) == "kivigo:lease:=" + key


# -- in-process single-flight -------------------------------------------------------


async def test_memory_single_flight_runs_the_factory_once_for_100_callers() -> None:
    async with Client(MemoryBackend()) as client:
        calls = Counter()

        async def factory() -> list[int]:
            calls.runs += 1
            await asyncio.sleep(0.05)
            return [1, 2, 3]

        results = await asyncio.gather(*(client.get_or_set("k", factory, ttl=60) for _ in range(100)))
        assert calls.runs == 1
        assert all(r == [1, 2, 3] for r in results)
        assert await client.get("k") == [1, 2, 3]
        ttl = await client.ttl("k")
        assert ttl is not None
        assert 0 < ttl <= 60
        assert not await client.has_key(lease_key("k"))


async def test_single_flight_without_a_lease_backend() -> None:
    async with Client(MinimalBackend()) as client:
        calls = Counter()

        async def factory() -> str:
            calls.runs += 1
            await asyncio.sleep(0.05)
            return "v"

        results = await asyncio.gather(*(client.get_or_set("k", factory) for _ in range(50)))
        assert results == ["v"] * 50
        assert calls.runs == 1
        assert list(client.backend.data) == ["k"]  # type: ignore[attr-defined]  # no lease key


class HeldReads(MinimalBackend):
    """Reads the store when asked, and answers only once ``answer`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.answer.set()
        self.read = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        data = self.data.get(key)
        self.read.set()
        await self.answer.wait()
        return data


async def test_without_a_lease_a_miss_answered_after_a_fill_does_not_run_the_factory_again() -> None:
    backend = HeldReads()
    async with Client(backend) as client:
        calls = Counter()
        release = asyncio.Event()

        async def factory() -> int:
            calls.runs += 1
            await release.wait()
            return 7

        first = asyncio.create_task(client.get_or_set("k", factory))
        for _ in range(100):
            if calls.runs:
                break
            await asyncio.sleep(0.01)
        backend.answer.clear()
        backend.read.clear()
        # This caller reads the key while the factory runs, and its miss comes back
        # only after that fill has stored the value and ended.
        second = asyncio.create_task(client.get_or_set("k", factory))
        await asyncio.wait_for(backend.read.wait(), 10)
        release.set()
        assert await asyncio.wait_for(first, 10) == 7
        backend.answer.set()
        assert await asyncio.wait_for(second, 10) == 7
        assert calls.runs == 1


async def test_two_clients_on_one_backend_share_the_lease() -> None:
    backend = MemoryBackend()
    first, second = Client(backend), Client(backend)
    calls = Counter()

    async def factory() -> int:
        calls.runs += 1
        await asyncio.sleep(0.1)
        return 5

    results = await asyncio.gather(*(c.get_or_set("k", factory) for c in (first, second) for _ in range(10)))
    assert results == [5] * 20
    assert calls.runs == 1
    await first.close()


async def test_sync_factory_and_hooks() -> None:
    async with Client(MemoryBackend()) as client:
        events: list[HookEvent] = []
        client.hooks.register(events.append)
        assert await client.get_or_set("k", lambda: {"a": 1}) == {"a": 1}
        assert await client.get_or_set("k", lambda: {"a": 2}) == {"a": 1}  # cached
        assert [(e.type, e.key) for e in events] == [(EventType.SET, "k")]


async def test_value_already_present_never_calls_the_factory(client: Client) -> None:
    key = fresh_key()
    await client.set(key, {"cached": True})

    def factory() -> dict[str, bool]:
        raise AssertionError("must not be called")

    assert await client.get_or_set(key, factory) == {"cached": True}
    await client.delete(key)


async def test_typed_decode_of_the_cached_value(client: Client) -> None:
    key = fresh_key()
    await client.set(key, User(1, "ada"))

    def untyped() -> Any:
        raise AssertionError("must not be called")

    user: User = await client.get_or_set(key, untyped, type=User)
    assert user == User(1, "ada")

    # Without type=, the factory's return annotation decides.
    async def load_user() -> User:
        raise AssertionError("must not be called")

    assert await client.get_or_set(key, load_user) == User(1, "ada")
    assert await client.get_or_set(key, untyped) == {"id": 1, "name": "ada"}
    with pytest.raises(DecodeError, match=key):
        await client.get_or_set(key, untyped, type=Point)
    await client.delete(key)


async def test_typed_miss_returns_what_hits_will_return(client: Client) -> None:
    key = fresh_key()

    def as_dict() -> dict[str, Any]:
        return {"id": 1, "name": "ada"}

    first: User = await client.get_or_set(key, as_dict, type=User)
    assert first == User(1, "ada")  # the same type as every later hit, not the dict
    assert await client.get_or_set(key, as_dict, type=User) == User(1, "ada")
    await client.delete(key)


async def test_untyped_miss_returns_what_hits_will_return(client: Client) -> None:
    key = fresh_key()
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    def load():  # type: ignore[no-untyped-def]  # no annotation: untyped
        return {"at": when, "price": Decimal("1.10"), "tags": {"a"}}

    first = await client.get_or_set(key, load)
    assert first == {"at": "2026-01-02T03:04:05+00:00", "price": "1.10", "tags": ["a"]}
    assert await client.get_or_set(key, load) == first  # a hit
    await client.delete(key)


async def test_callers_sharing_a_run_get_their_own_objects() -> None:
    async with Client(MemoryBackend()) as client:
        runs = Counter()

        async def load() -> dict[str, list[int]]:
            runs.runs += 1
            await asyncio.sleep(0.05)
            return {"ids": [1, 2]}

        values = await asyncio.gather(*(client.get_or_set("shared", load) for _ in range(3)))
        assert runs.runs == 1
        assert values == [{"ids": [1, 2]}] * 3
        values[0]["ids"].append(3)  # one caller changing its value ...
        assert values[1] == values[2] == {"ids": [1, 2]}  # ... changes nobody else's
        assert await client.get("shared") == {"ids": [1, 2]}


async def test_result_that_does_not_match_the_type_is_not_stored(client: Client) -> None:
    key = fresh_key()

    async def wrong() -> int:
        return "not-an-int"  # type: ignore[return-value]

    with pytest.raises(EncodeError, match=rf"{key}.*does not read back as int"):
        await client.get_or_set(key, wrong)  # the annotation gives the type
    with pytest.raises(EncodeError, match="does not read back as"):
        await client.get_or_set(key, lambda: {"x": 1}, type=User)
    assert not await client.has_key(key)
    assert not await client.has_key(lease_key(key))  # released, so the next caller can fill


async def test_close_stops_a_running_fill() -> None:
    backend = MemoryBackend()
    client = Client(backend)
    started = asyncio.Event()
    finished: list[str] = []

    async def slow() -> int:
        started.set()
        await asyncio.sleep(30)
        finished.append("factory")
        return 1

    caller = asyncio.create_task(client.get_or_set("report", slow))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(client.close(), 10)
    with pytest.raises(BackendUnavailableError, match="closed while the value was computed"):
        await asyncio.wait_for(caller, 10)
    assert finished == []
    fills = [t for t in asyncio.all_tasks() if "CacheFiller._fill" in repr(t.get_coro())]
    assert fills == []
    # The lease was given back before the backend closed.
    assert lease_key("report") not in backend._data
    with pytest.raises(BackendUnavailableError):
        await client.get_or_set("report", slow)


@pytest.mark.parametrize("case", ["abandoned", "abandoned-and-replaced", "releasing"])
async def test_close_waits_for_a_fill_to_give_its_lease_back(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """close() returns only once every lease taken by a fill has been given back.

    A fill whose callers all left is cancelled and gives its lease back; one whose
    factory has returned is giving it back when close() cancels it. Returning
    earlier, close() would close the backend under the release (the lease then
    held until lock_ttl), and the release's error would go unseen.
    """
    releasing, may_release = asyncio.Event(), asyncio.Event()

    class SlowRelease(MemoryBackend):
        async def release_lease(self, key: str, token: bytes) -> bool:
            releasing.set()
            await may_release.wait()
            return await super().release_lease(key, token)

    backend = SlowRelease()
    client = Client(backend)
    started = asyncio.Event()

    async def slow() -> int:
        started.set()
        if case != "releasing":
            await asyncio.sleep(30)
        return 1

    caller = asyncio.create_task(client.get_or_set("report", slow, lock_ttl=30))
    await asyncio.wait_for(started.wait(), 10)
    if case != "releasing":
        caller.cancel()  # the only caller gives up: the fill is cancelled and releases its lease
    await asyncio.wait_for(releasing.wait(), 10)
    replaced = case == "abandoned-and-replaced"
    if replaced:  # a new caller for the key starts a fill of its own meanwhile
        waiting = asyncio.create_task(client.get_or_set("report", slow, lock_ttl=30))
        await asyncio.sleep(0.05)
    closing = asyncio.create_task(client.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # still waiting for the release
    may_release.set()
    await asyncio.wait_for(closing, 10)
    assert lease_key("report") not in backend._data
    with pytest.raises(asyncio.CancelledError if case != "releasing" else BackendUnavailableError):
        await caller
    if replaced:
        with pytest.raises(KivigoError):
            await asyncio.wait_for(waiting, 10)
    assert [t for t in asyncio.all_tasks() if "release" in repr(t.get_coro())] == []
    assert "never retrieved" not in caplog.text


async def test_a_release_cut_loose_still_reports_its_failure(caplog: pytest.LogCaptureFixture) -> None:
    from kivigo_async._singleflight import CacheFiller

    may_fail = asyncio.Event()

    class FailingRelease(MemoryBackend):
        async def release_lease(self, key: str, token: bytes) -> bool:
            await may_fail.wait()
            raise BackendUnavailableError("connection lost")

    backend = FailingRelease()
    holder = asyncio.create_task(CacheFiller(backend)._release(backend, lease_key("k"), b"token", "k"))
    await asyncio.sleep(0.01)
    holder.cancel()  # the holder stops waiting; the release goes on without it
    with pytest.raises(asyncio.CancelledError):
        await holder
    with caplog.at_level(logging.WARNING, logger="kivigo_async"):
        may_fail.set()
        for _ in range(5):
            await asyncio.sleep(0)
    assert "could not release the lease for key 'k'" in caplog.text
    assert "never retrieved" not in caplog.text


async def test_a_factory_that_closes_its_client() -> None:
    backend = MemoryBackend()
    client = Client(backend)

    async def closes() -> int:
        await client.close()  # must not wait for its own fill to end
        return 1

    with pytest.raises(BackendUnavailableError):
        await asyncio.wait_for(client.get_or_set("k", closes), 10)
    with pytest.raises(BackendUnavailableError):
        await backend.get("k")  # close() finished: the backend is closed


async def test_concurrent_callers_asking_different_types() -> None:
    async with Client(MemoryBackend()) as client:

        async def factory() -> Point:
            await asyncio.sleep(0.05)
            return Point(1, 2)

        async def as_dict() -> dict[str, int]:
            raise AssertionError("joins the running flight instead")

        typed = asyncio.create_task(client.get_or_set("p", factory))
        await asyncio.sleep(0.01)
        raw = asyncio.create_task(client.get_or_set("p", as_dict))
        assert await typed == Point(1, 2)
        assert await raw == {"x": 1, "y": 2}


async def test_callers_sharing_a_fill_each_decode_the_stored_value_as_their_own_type() -> None:
    # During a schema change old and new code ask for one key with different types;
    # the value another process stores must fail only the caller whose type rejects it.
    backend = MemoryBackend()
    started, stored = asyncio.Event(), asyncio.Event()
    async with Client(backend) as other, Client(backend) as client:  # other: another process

        async def slow_text() -> str:
            started.set()
            await stored.wait()
            return "abc"

        def never() -> object:
            raise AssertionError("the value comes from the other process")

        holder = asyncio.create_task(other.get_or_set("k", slow_text))
        await asyncio.wait_for(started.wait(), WAIT)  # the other process holds the lease
        as_int = asyncio.create_task(client.get_or_set("k", never, type=int))  # polls, decoding as int

        def polling() -> bool:
            return client._filler is not None and "k" in client._filler._polling

        await eventually(polling, WAIT, "the first caller never polled")
        as_text = asyncio.create_task(client.get_or_set("k", never, type=str))  # joins that fill
        stored.set()
        assert await asyncio.wait_for(holder, WAIT) == "abc"
        assert await asyncio.wait_for(as_text, WAIT) == "abc"
        with pytest.raises(DecodeError, match="'k'"):
            await asyncio.wait_for(as_int, WAIT)


@pytest.mark.parametrize("way", ["directly", "through another key", "in a task it awaits"])
async def test_a_factory_asking_for_its_own_key_fails_instead_of_waiting_for_itself(way: str) -> None:
    async with Client(MemoryBackend()) as client:

        async def inner() -> int:
            raise AssertionError("never run: its key is being filled")

        async def report() -> int:
            if way == "directly":
                return await client.get_or_set("report", inner)
            if way == "in a task it awaits":
                (value,) = await asyncio.gather(client.get_or_set("report", inner))
                return value
            return await client.get_or_set("summary", summary)

        async def summary() -> int:
            return await client.get_or_set("report", report) + 1

        # Before, the inner call joined the fill running it: a hang that also held
        # the key for every later caller, whatever their wait_timeout.
        with pytest.raises(KivigoError, match="'report': called from the factory computing that key"):
            await asyncio.wait_for(client.get_or_set("report", report, wait_timeout=60), WAIT)
        assert await asyncio.wait_for(client.get_or_set("report", lambda: 7), WAIT) == 7
        assert not await client.has_key("summary")


async def test_work_a_factory_left_behind_may_ask_for_the_key_once_filled() -> None:
    async with Client(MemoryBackend()) as client:
        filled = asyncio.Event()
        later: list[asyncio.Task[int]] = []

        async def refresh_afterwards() -> int:
            await filled.wait()  # the fill has ended: asking now waits for nothing
            return await client.get_or_set("k", lambda: 2)

        async def factory() -> int:
            later.append(asyncio.create_task(refresh_afterwards()))  # inherits the fill's context
            return 1

        assert await client.get_or_set("k", factory) == 1
        filled.set()
        assert await asyncio.wait_for(later[0], WAIT) == 1


async def test_a_get_or_set_whose_read_races_close_starts_no_fill() -> None:
    read_started, release_read, closing, release_close = (asyncio.Event() for _ in range(4))

    class Gated(MemoryBackend):
        async def get(self, key: str) -> bytes | None:
            read_started.set()
            await release_read.wait()
            return await super().get(key)

        async def close(self) -> None:
            closing.set()
            await release_close.wait()
            await super().close()

    client = Client(Gated())
    await client.__aenter__()
    ran: list[str] = []

    async def factory() -> int:
        ran.append("factory")
        return 1

    caller = asyncio.create_task(client.get_or_set("k", factory))
    await asyncio.wait_for(read_started.wait(), WAIT)
    closer = asyncio.create_task(client.close())
    await asyncio.wait_for(closing.wait(), WAIT)  # close() found no fill to stop
    release_read.set()
    try:
        # Before, the miss made a fill of its own, which ran the factory after close().
        with pytest.raises(BackendUnavailableError, match="'k': the client is closed"):
            await asyncio.wait_for(caller, WAIT)
    finally:
        release_close.set()
        await asyncio.wait_for(closer, WAIT)
    assert ran == []


def test_result_type_inference() -> None:
    async def a() -> User:
        raise NotImplementedError

    def b() -> list[int]:
        raise NotImplementedError

    def c():  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def d() -> Awaitable[Point]:
        raise NotImplementedError

    def e() -> Unresolvable:  # type: ignore[name-defined]  # noqa: F821
        raise NotImplementedError

    assert result_type(a) is User
    assert result_type(b) == list[int]
    assert result_type(c) is object
    assert result_type(d) is Point
    assert result_type(e) is object
    assert result_type(functools.partial(a)) is User
    assert result_type(dict) is dict
    assert result_type(lambda: 1) is object


async def load_with(db: Connection, uid: int) -> User:
    """A loader whose session type is imported for type checkers only (not at runtime)."""
    return User(uid, f"user{uid}")


@dataclass
class Account:
    name: str

    @classmethod
    async def load(cls, name: str) -> Self:
        return cls(name)

    async def copy(self) -> Self:
        return type(self)(self.name)


def test_result_type_resolves_the_return_annotation_alone() -> None:
    # A parameter annotation that does not resolve at runtime cost the return type:
    # get_or_set then stored and returned dicts.
    assert result_type(functools.partial(load_with, cast("Connection", None), 1)) is User


def test_result_type_of_self_is_the_class_of_the_bound_method() -> None:
    # Self was passed to the codec as a type: every get_or_set failed, nothing stored.
    assert result_type(functools.partial(Account.load, "ada")) is Account
    assert result_type(Account("ada").copy) is Account


async def test_get_or_set_reads_back_a_classmethods_self() -> None:
    async with Client(MemoryBackend()) as client:
        factory = functools.partial(Account.load, "ada")
        assert await client.get_or_set("acct", factory) == Account("ada")
        assert await client.get_or_set("acct", factory) == Account("ada")  # a hit, decoded as Account
        assert await client.get_raw("acct") == b'{"name":"ada"}'


# -- cancellation ------------------------------------------------------------------


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    async with Client(MemoryBackend()) as client:
        factory = SlowFactory(3, 0.2)
        first = asyncio.create_task(client.get_or_set("k", factory))
        second = asyncio.create_task(client.get_or_set("k", factory))
        await factory.started.wait()
        first.cancel()
        assert await second == 3
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_cancelling_every_caller_cancels_the_factory_and_releases_the_lease() -> None:
    async with Client(MemoryBackend()) as client:
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def factory() -> int:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 1

        tasks = [asyncio.create_task(client.get_or_set("k", factory)) for _ in range(3)]
        await started.wait()
        assert await client.has_key(lease_key("k"))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(cancelled.wait(), 5)
        for _ in range(10):
            await asyncio.sleep(0)
        assert not await client.has_key(lease_key("k"))
        assert client._filler is not None
        assert len(client._filler._flights) == 0

        # A new caller starts afresh.
        async def quick() -> int:
            return 2

        assert await client.get_or_set("k", quick) == 2


async def test_single_flight_joins_only_while_running() -> None:
    flights: SingleFlight[int] = SingleFlight()
    runs = Counter()

    async def work() -> int:
        runs.runs += 1
        await asyncio.sleep(0.01)
        return runs.runs

    assert list(await asyncio.gather(flights.do("a", work), flights.do("a", work))) == [1, 1]
    assert await flights.do("a", work) == 2
    assert len(flights) == 0


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"key": ""}, InvalidKeyError, "empty"),
        ({"key": 3}, InvalidKeyError, "str"),
        ({"factory": 42}, InvalidArgumentError, "callable"),
        ({"ttl": 0}, InvalidArgumentError, "^ttl must be a positive"),
        ({"ttl": "10"}, InvalidArgumentError, "^ttl must be seconds"),
        ({"lock_ttl": None}, InvalidArgumentError, "lock_ttl"),
        ({"lock_ttl": -1}, InvalidArgumentError, "^lock_ttl must be a positive"),
        ({"lock_ttl": 0}, InvalidArgumentError, "^lock_ttl must be a positive"),
        ({"wait_timeout": 0}, InvalidArgumentError, "^wait_timeout must be a positive"),
        ({"wait_timeout": float("nan")}, InvalidArgumentError, "^wait_timeout must be a positive"),
    ],
)
async def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], fragment: str) -> None:
    async with Client(MemoryBackend()) as client:
        args: dict[str, Any] = {"key": "k", "factory": lambda: 1, **kwargs}
        key, factory = args.pop("key"), args.pop("factory")
        with pytest.raises(error, match=fragment):
            await client.get_or_set(key, factory, **args)
        assert not await client.has_key("k")


async def test_release_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class FlakyRelease(MemoryBackend):
        async def release_lease(self, key: str, token: bytes) -> bool:
            raise OSError("network blip")

    async with Client(FlakyRelease()) as client:
        with caplog.at_level(logging.WARNING, logger="kivigo_async"):
            assert await client.get_or_set("k", lambda: 1) == 1
        assert "could not release the lease for key 'k'" in caplog.text


# -- typing ----------------------------------------------------------------------------


async def test_result_type_follows_the_factory() -> None:
    async with Client(MemoryBackend()) as client:

        async def load() -> Point:
            return Point(0, 0)

        point: Point = await client.get_or_set("pt", load)
        count: int = await client.get_or_set("n", lambda: 3)
        factory: Callable[[], Awaitable[User]] = _user_factory
        user: User = await client.get_or_set("u", factory, type=User)
        # A factory whose result reads back as type= is typed as type= too.
        built: Point = await client.get_or_set("built", lambda: {"x": 1, "y": 2}, type=Point)
        assert (point, count, user, built) == (Point(0, 0), 3, User(9, "z"), Point(1, 2))


async def _user_factory() -> User:
    return User(9, "z")


# -- cluster -------------------------------------------------------------------------


async def test_cluster_runs_the_factory_once(redis_cluster: RedisCluster) -> None:
    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1]))
    async with Client(backend) as client:
        calls = Counter()
        keys = [f"{{gos}}:{uuid.uuid4().hex}", f"gos:{uuid.uuid4().hex}"]

        async def factory() -> str:
            calls.runs += 1
            await asyncio.sleep(0.05)
            return "v"

        for key in keys:
            results = await asyncio.gather(*(client.get_or_set(key, factory, ttl=60) for _ in range(20)))
            assert results == ["v"] * 20
            assert not await client.has_key(lease_key(key))
            await client.delete(key)
        assert calls.runs == 2


def test_result_type_resolves_forward_references_inside_an_evaluated_annotation() -> None:
    # Without postponed annotations, `-> Optional["User"]` is an object holding a
    # ForwardRef: it must be resolved like a string annotation.
    async def load() -> None:
        raise NotImplementedError

    load.__annotations__ = {"return": Optional["User"]}
    assert result_type(load) == Optional[User]  # noqa: UP045
