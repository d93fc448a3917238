"""client.watch(): change events from keyspace notifications (Redis, Valkey, cluster) and MemoryBackend.

Every change is made from a connection other than the watching one; waits are
bounded by generous timeouts, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from conftest import eventually, redis_options, refused_port
from redis.asyncio import Redis
from redis.crc import key_slot

from kivigo_async import (
    BackendUnavailableError,
    ChangeEvent,
    ChangeType,
    Client,
    InvalidArgumentError,
    NotificationsDisabledError,
    PermissionDeniedError,
    UnsupportedOperationError,
    Watch,
    WatchBackend,
    WatchOverflowError,
)
from kivigo_async.backends.memory import MemoryBackend
from kivigo_async.backends.redis import (
    RedisBackend,
    RedisClusterBackend,
    RedisClusterOptions,
    RedisOptions,
    RedisSentinelBackend,
    RedisSentinelOptions,
    _cache,
    _watch,
)
from kivigo_async.testing.pytest_plugin import ClusterFactory, SentinelFactory, ServerFactory, skip_or_fail
from kivigo_async.testing.servers import BinaryKind, RedisServer, ServerPool, ServerUnavailable
from kivigo_async.testing.topologies import RedisCluster, RedisSentinel
from kivigo_async.watch import ChangeFeed

SET, DELETE, EXPIRE = ChangeType.SET, ChangeType.DELETE, ChangeType.EXPIRE
TIMEOUT = 15.0


# --------------------------------------------------------------------------- helpers


async def take(watch: AsyncIterator[ChangeEvent], count: int, timeout: float = TIMEOUT) -> list[ChangeEvent]:
    """The next ``count`` events."""

    async def run() -> list[ChangeEvent]:
        return [await anext(watch) for _ in range(count)]

    return await asyncio.wait_for(run(), timeout)


async def until_key(
    watch: AsyncIterator[ChangeEvent], key: str, timeout: float = TIMEOUT
) -> list[ChangeEvent]:
    """Events up to and including the first one for ``key`` (a marker written last)."""

    async def run() -> list[ChangeEvent]:
        seen: list[ChangeEvent] = []
        async for event in watch:
            seen.append(event)
            if event.key == key:
                return seen
        raise AssertionError(f"the watch ended before {key!r}: {seen}")

    return await asyncio.wait_for(run(), timeout)


def pairs(events: list[ChangeEvent]) -> list[tuple[str, str]]:
    return [(str(e.type), e.key) for e in events]


async def subscribers(admin: Redis) -> list[dict[str, Any]]:
    """The pattern-subscribed connections of the server."""
    clients: list[dict[str, Any]] = await admin.client_list()
    return [c for c in clients if str(c.get("psub", "0")) != "0"]


async def no_subscribers(admin: Redis) -> None:
    async def gone() -> bool:
        return not await subscribers(admin)

    await eventually(gone)


def other_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


def feed_of(watch: Watch) -> ChangeFeed:
    stream = watch._stream
    assert isinstance(stream, ChangeFeed)
    return stream


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module", params=["valkey", "redis"])
def server(request: pytest.FixtureRequest, kivigo_server_pool: ServerPool) -> Iterator[RedisServer]:
    """A private server per module and kind: watching changes its configuration."""
    kind: BinaryKind = request.param
    try:
        binary = kivigo_server_pool.binary(kind, "plain")
    except ServerUnavailable as exc:
        skip_or_fail(exc, kind)
    with RedisServer(binary) as started:
        yield started


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[Redis]:
    connection = Redis(host=server.host, port=server.port)
    await connection.flushall()
    yield connection
    await connection.aclose()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[Client]:
    async with Client(RedisBackend(redis_options(server))) as opened:
        yield opened


def admin_of(server: RedisServer, **kwargs: Any) -> Redis:
    return Redis(host=server.host, port=server.port, **kwargs)


# --------------------------------------------------------------------------- events


async def test_set_delete_expire_from_another_connection(client: Client, admin: Redis) -> None:
    async with client.watch("user:") as changes:
        await admin.set("user:1", b"a")
        await admin.set("user:2", b"b", px=1000)  # SET + its TTL: one SET event
        await admin.unlink("user:1")
        events = await take(changes, 4)  # the fourth: user:2 expiring, found by the server
    assert pairs(events) == [("set", "user:1"), ("set", "user:2"), ("delete", "user:1"), ("expire", "user:2")]
    assert events[0] == ChangeEvent(SET, "user:1")


async def test_commands_map_to_change_types(client: Client, admin: Redis) -> None:
    async with client.watch("k:") as changes:
        await admin.mset({"k:a": b"1", "k:b": b"2"})
        await admin.incr("k:a")
        await admin.append("k:b", b"x")
        await admin.pexpire("k:a", 60_000)  # a TTL change alone: not reported
        await admin.persist("k:a")
        await admin.rename("k:a", "k:c")
        await admin.getdel("k:b")
        await admin.delete("k:missing")  # nothing existed: no event
        await admin.set("k:end", b"")
        events = await until_key(changes, "k:end")
    assert pairs(events) == [
        ("set", "k:a"),
        ("set", "k:b"),
        ("set", "k:a"),
        ("set", "k:b"),
        ("delete", "k:a"),
        ("set", "k:c"),
        ("delete", "k:b"),
        ("set", "k:end"),
    ]


async def test_keys_of_other_types_are_reported_as_a_whole_not_their_contents(
    client: Client, admin: Redis
) -> None:
    async with client.watch("t:") as changes:
        await admin.hset("t:hash", "f", b"1")  # the contents of a hash, list, set...: not reported
        await admin.hset("t:hash", "f", b"2")
        await admin.rpush("t:list", b"a")
        await admin.sadd("t:set", b"a")
        await admin.rename("t:hash", "t:hash2")  # the key as a whole, whatever its type: reported
        await admin.copy("t:list", "t:list2")
        await admin.delete("t:list")
        await admin.hdel("t:hash2", "f")  # its last field: the hash is deleted
        await admin.pexpire("t:set", 1)
        await eventually(lambda: _gone(admin, "t:set"))  # found expired by this read, at the latest
        await admin.hset("t:over", "f", b"1")
        await admin.set("t:over", b"string")  # a string written over a hash
        await admin.set("t:end", b"")
        events = await until_key(changes, "t:end")
    assert pairs(events) == [
        ("delete", "t:hash"),
        ("set", "t:hash2"),
        ("set", "t:list2"),
        ("delete", "t:list"),
        ("delete", "t:hash2"),
        ("expire", "t:set"),
        ("set", "t:over"),
        ("set", "t:end"),
    ]


async def _gone(admin: Redis, key: str) -> bool:
    return not await admin.exists(key)


async def test_writes_through_a_client_are_seen_by_another(client: Client, server: RedisServer) -> None:
    async with Client(RedisBackend(redis_options(server))) as writer, client.watch("doc:") as changes:
        await writer.set("doc:1", {"v": 1}, ttl=60)
        await writer.batch_set({"doc:2": 2, "doc:3": 3})
        await writer.batch_delete(["doc:2", "doc:3"])
        async with writer.transaction() as tx:
            tx.set("doc:4", 4)
        events = await until_key(changes, "doc:4")
    assert pairs(events) == [
        ("set", "doc:1"),
        ("set", "doc:2"),
        ("set", "doc:3"),
        ("delete", "doc:2"),
        ("delete", "doc:3"),
        ("set", "doc:4"),
    ]


async def test_prefix_is_literal(client: Client, admin: Redis) -> None:
    async with client.watch("user:") as colon, client.watch("user") as bare, client.watch("a*[b]?") as glob:
        for key in ("use", "user", "user1", "user:1", "xuser:1", "aXbY", "a*[b]?", "a*[b]?z", "a*b?"):
            await admin.set(key, b"1")
        await admin.set("user:end", b"")
        await admin.set("a*[b]?end", b"")
        assert [e.key for e in await until_key(colon, "user:end")] == ["user:1", "user:end"]
        assert [e.key for e in await until_key(bare, "user:end")] == ["user", "user1", "user:1", "user:end"]
        assert [e.key for e in await until_key(glob, "a*[b]?end")] == ["a*[b]?", "a*[b]?z", "a*[b]?end"]


async def test_empty_prefix_watches_every_key_and_odd_bytes(client: Client, admin: Redis) -> None:
    async with client.watch() as changes:
        await admin.set(b"caf\xc3\xa9", b"1")
        await admin.set(b"raw\xff", b"1")
        events = await take(changes, 2)
    assert [e.key for e in events] == ["café", "raw\udcff"]  # like keys listed by scan
    assert await client.get_raw(events[1].key) == b"1"


async def test_database_other_than_zero(server: RedisServer) -> None:
    async with (
        Client(RedisBackend(redis_options(server).replace(db=3))) as client,
        admin_of(server, db=3) as db3,
        admin_of(server) as db0,
        client.watch("k") as changes,
    ):
        await db0.set("k0", b"1")
        await db3.set("k3", b"1")
        assert pairs(await take(changes, 1)) == [("set", "k3")]


async def test_backend_stream_on_every_server_variant(redis_backend: RedisBackend) -> None:
    """TLS, passwords, ACL users, both transports; the backend-level API, closed by hand."""
    raw = redis_backend.redis
    saved = await config(raw)
    stream = await redis_backend.watch("v:")
    try:
        await redis_backend.set("v:1", b"1", 60_000)
        await redis_backend.delete("v:1")
        assert pairs(await take(stream, 2)) == [("set", "v:1"), ("delete", "v:1")]
    finally:
        await stream.aclose()
        await raw.config_set("notify-keyspace-events", saved)


# --------------------------------------------------------------------------- configuration


async def config(admin: Redis) -> str:
    reply: dict[Any, Any] = await admin.config_get("notify-keyspace-events")
    value = reply["notify-keyspace-events"]
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_turns_notifications_on_when_off(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey")
    async with admin_of(server) as admin, Client(RedisBackend(redis_options(server))) as client:
        assert await config(admin) == ""
        async with client.watch("k") as changes:
            assert set(await config(admin)) == set("Kg$xe")
            await admin.set("k", b"1")
            assert pairs(await take(changes, 1)) == [("set", "k")]


async def test_keeps_flags_set_by_others(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey", extra_config={"notify-keyspace-events": "El"})
    async with (
        admin_of(server) as admin,
        Client(RedisBackend(redis_options(server))) as client,
        client.watch("k"),
    ):
        assert set(await config(admin)) == set("El") | set("Kg$xe")


async def test_leaves_a_sufficient_setting_alone(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey", extra_config={"notify-keyspace-events": "KEA"})
    async with admin_of(server) as admin, Client(RedisBackend(redis_options(server))) as client:
        before = await config(admin)
        await admin.config_resetstat()
        async with client.watch("k"):
            pass
        stats: dict[str, Any] = await admin.info("commandstats")
        assert "cmdstat_config|set" not in stats
        assert await config(admin) == before


async def test_config_renamed_away_raises_a_clear_error(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey", extra_config={"rename-command": 'CONFIG ""'})
    async with admin_of(server) as admin, Client(RedisBackend(redis_options(server))) as client:
        with pytest.raises(NotificationsDisabledError, match="notify-keyspace-events") as info:
            async with client.watch("k"):
                pytest.fail("the watch must not start")
        assert isinstance(info.value, UnsupportedOperationError)
        assert "configure_server=False" in str(info.value)
        await no_subscribers(admin)


async def test_config_forbidden_by_acl_raises_and_configure_server_false_works(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory("valkey", "acl")
    async with admin_of(server, username=server.username, password=server.password) as admin:
        await admin.acl_setuser(
            "watcher",
            enabled=True,
            passwords=["+w-secret"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-config"],
        )
        options = redis_options(server).replace(username="watcher", password="w-secret")
        async with Client(RedisBackend(options)) as client:
            with pytest.raises(NotificationsDisabledError, match="NOPERM") as info:
                await client.watch("k").__aenter__()
            assert "w-secret" not in str(info.value)
            # The operator turns notifications on; the application skips the check.
            await admin.config_set("notify-keyspace-events", "KEA")
            async with client.watch("k", configure_server=False) as changes:
                await admin.set("k", b"1")
                assert pairs(await take(changes, 1)) == [("set", "k")]
        # The server drops a closed client's connection when it next polls: wait for it.
        await no_subscribers(admin)


async def test_user_without_channels_gets_permission_denied(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey", "acl")
    options = redis_options(server).replace(
        username=server.limited_username, password=server.limited_password
    )
    async with Client(RedisBackend(options)) as client:
        with pytest.raises(PermissionDeniedError, match="__keyspace@"):
            async with client.watch("allowed:"):
                pytest.fail("the watch must not start")


async def test_password_server(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey", "password")
    async with Client(RedisBackend(redis_options(server))) as client, client.watch("k") as changes:
        await client.set("k", 1)
        assert pairs(await take(changes, 1)) == [("set", "k")]


# --------------------------------------------------------------------------- cleanup


async def test_break_releases_the_subscription(client: Client, admin: Redis) -> None:
    before = other_tasks()
    async with client.watch("k") as changes:
        assert len(await subscribers(admin)) == 1
        await admin.set("k", b"1")
        async for _ in changes:
            break
    assert changes.closed
    await no_subscribers(admin)
    assert other_tasks() <= before
    with pytest.raises(StopAsyncIteration):
        await anext(changes)


async def test_cancelled_consumer_releases_the_subscription(client: Client, admin: Redis) -> None:
    before = other_tasks()
    entered = asyncio.Event()

    async def consume() -> None:
        async with client.watch("k") as changes:
            entered.set()
            async for _ in changes:
                pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(entered.wait(), TIMEOUT)
    assert len(await subscribers(admin)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await no_subscribers(admin)
    assert other_tasks() <= before


async def test_bare_async_for_releases_after_break(client: Client, admin: Redis) -> None:
    before = other_tasks()

    async def first() -> ChangeEvent:
        async for change in client.watch("k"):
            return change
        raise AssertionError("the watch ended")

    consumer = asyncio.create_task(first())
    await eventually(lambda: _has_subscriber(admin))
    await admin.set("k", b"1")
    assert await asyncio.wait_for(consumer, TIMEOUT) == ChangeEvent(SET, "k")
    gc.collect()  # CPython already finalised the abandoned loop; other interpreters need a nudge
    await no_subscribers(admin)

    await eventually(lambda: other_tasks() <= before)


async def _has_subscriber(admin: Redis) -> bool:
    return bool(await subscribers(admin))


async def test_closing_the_client_ends_its_watches(server: RedisServer, admin: Redis) -> None:
    client = Client(RedisBackend(redis_options(server)))
    changes = await client.watch("k").__aenter__()
    seen: list[ChangeEvent] = []

    async def consume() -> None:
        async for change in changes:
            seen.append(change)

    task = asyncio.create_task(consume())
    await admin.set("k", b"1")
    await eventually(lambda: bool(seen))
    await client.close()
    await asyncio.wait_for(task, TIMEOUT)  # the loop ended, without an error
    assert pairs(seen) == [("set", "k")]
    await no_subscribers(admin)
    with pytest.raises(BackendUnavailableError, match="closed"):
        async with client.watch("k"):
            pass


async def test_closing_the_client_ends_a_watch_entered_and_dropped(server: RedisServer, admin: Redis) -> None:
    client = Client(RedisBackend(redis_options(server)))
    before = other_tasks()
    watch = client.watch("dropped:")
    await watch.__aenter__()  # entered, never exited: the code holding it went away
    del watch
    gc.collect()
    assert await _has_subscriber(admin)
    await client.close()
    await no_subscribers(admin)
    await eventually(lambda: not (other_tasks() - before))  # the heartbeat ended too


async def test_client_closed_while_a_bare_loop_subscribes_ends_the_loop(server: RedisServer) -> None:
    client = Client(RedisBackend(redis_options(server)))
    outcome: list[str] = []

    async def loop() -> None:
        async for _ in client.watch("closing:"):
            outcome.append("event")
        outcome.append("ended")

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the loop is now subscribing
    await client.close()
    await asyncio.wait_for(task, TIMEOUT)  # no error: the documented end of a watch
    assert outcome == ["ended"]


# --------------------------------------------------------------------------- failures


async def test_killed_subscription_raises_instead_of_missing_events(client: Client, admin: Redis) -> None:
    before = other_tasks()
    async with client.watch("k") as changes:
        await admin.set("k1", b"1")
        assert pairs(await take(changes, 1)) == [("set", "k1")]
        [subscriber] = await subscribers(admin)
        await admin.client_kill_filter(_id=subscriber["id"])
        await admin.set("k2", b"1")  # published to nobody: the watch must not pretend otherwise
        with pytest.raises(BackendUnavailableError, match="lost"):
            await asyncio.wait_for(anext(changes), TIMEOUT)
        assert changes.closed
        with pytest.raises(StopAsyncIteration):
            await anext(changes)
    assert await subscribers(admin) == []  # and it did not quietly reconnect
    assert other_tasks() <= before


async def test_overflow_raises_after_the_buffered_events(client: Client, admin: Redis) -> None:
    async with client.watch("k", max_pending=5) as changes:
        async with admin.pipeline(transaction=False) as pipe:
            for i in range(20):
                pipe.set(f"k{i}", b"1")
            await pipe.execute()
        await eventually(lambda: feed_of(changes).stopped)  # overflowed while nobody read
        events = await take(changes, 5)
        assert [e.key for e in events] == [f"k{i}" for i in range(5)]
        with pytest.raises(WatchOverflowError, match="5 events"):
            await anext(changes)
    await no_subscribers(admin)


@pytest.mark.parametrize("read_timeout", [1.0, None])
async def test_unresponsive_server_is_noticed_by_the_heartbeat(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch, read_timeout: float | None
) -> None:
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    monkeypatch.setattr(_cache, "_STALL", 1.0)  # the heartbeat's bound without a read_timeout
    server = redis_server_factory("valkey", extra_config={"enable-debug-command": "yes"})
    options = redis_options(server, read_timeout=read_timeout)
    async with Client(RedisBackend(options)) as client, client.watch("k") as changes:
        with redis.Redis(host=server.host, port=server.port) as admin:
            stall = asyncio.create_task(asyncio.to_thread(admin.execute_command, "DEBUG", "SLEEP", "4"))
            try:
                with pytest.raises(BackendUnavailableError):
                    await asyncio.wait_for(anext(changes), TIMEOUT)
            finally:
                await stall


@pytest.mark.parametrize("kind", ["valkey", "redis"])
async def test_primary_turned_replica_ends_the_watch(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch, kind: BinaryKind
) -> None:
    # REPLICAOF keeps the demoted server's clients: only the heartbeat can tell. The
    # watching user may not run ROLE (nor CONFIG): HELLO, which every user may, tells.
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    server = redis_server_factory(kind, "acl", extra_config={"notify-keyspace-events": "KEA"})
    async with admin_of(server, username=server.username, password=server.password) as admin:
        await admin.acl_setuser(
            "watcher",
            enabled=True,
            passwords=["+w-secret"],
            channels=["*"],
            commands=["+psubscribe", "+ping"],
        )
        options = redis_options(server).replace(username="watcher", password="w-secret")
        async with (
            Client(RedisBackend(options)) as client,
            client.watch("k", configure_server=False) as changes,
        ):
            await admin.set("k1", b"1")
            assert pairs(await take(changes, 1)) == [("set", "k1")]
            with refused_port() as port:
                await admin.replicaof("127.0.0.1", port)
                with pytest.raises(BackendUnavailableError, match="replica now, no longer a primary"):
                    await asyncio.wait_for(anext(changes), TIMEOUT)
            assert changes.closed
        await no_subscribers(admin)


async def test_a_demotion_undone_between_two_beats_still_ends_the_watch(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Replica for a moment, long enough for a full resync to replace its data with
    # no event, then primary again: the role at each beat is the same, the
    # replication id is not.
    monkeypatch.setattr(_watch, "_HEARTBEAT", 3.0)
    watched = redis_server_factory("valkey", extra_config={"notify-keyspace-events": "KEA"})
    source = redis_server_factory("valkey", extra_config={"repl-diskless-sync-delay": "0"})  # syncs at once
    async with (
        admin_of(watched) as admin,
        admin_of(source) as other,
        Client(RedisBackend(redis_options(watched))) as client,
        client.watch("k", configure_server=False) as changes,
    ):
        await admin.set("k:only-here", b"1")
        assert pairs(await take(changes, 1)) == [("set", "k:only-here")]
        await other.set("k:only-there", b"2")
        await admin.replicaof(source.host, source.port)

        async def synced() -> bool:
            return (await admin.info("replication")).get("master_link_status") == "up"

        await eventually(synced)
        await admin.replicaof("NO", "ONE")
        assert await admin.keys("k:*") == [b"k:only-there"]  # replaced, and no event said so
        with pytest.raises(BackendUnavailableError, match=r"replication id changed|no longer a primary"):
            await asyncio.wait_for(anext(changes), TIMEOUT)


async def test_a_passing_refusal_of_the_state_check_does_not_turn_it_off(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check's connection, opened again when the server has no room for one more
    # client, is refused for a while: the next beats must still compare the role.
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    server = redis_server_factory("valkey", extra_config={"notify-keyspace-events": "KEA"})
    async with (
        admin_of(server) as admin,
        Client(RedisBackend(redis_options(server))) as client,
        client.watch("k", configure_server=False) as changes,
    ):
        checks: list[dict[str, Any]] = []

        async def state_asked() -> bool:  # the heartbeat's second connection is open
            checks[:] = [c for c in await admin.client_list() if c.get("cmd") == "info"]
            return bool(checks)

        await eventually(state_asked)
        await admin.config_set("maxclients", len(await admin.client_list()) - 1)
        await admin.client_kill_filter(_id=checks[0]["id"])
        await asyncio.sleep(1.0)  # several beats refused: "max number of clients reached"
        await admin.config_set("maxclients", 10000)
        with refused_port() as port:
            await admin.replicaof("127.0.0.1", port)
            with pytest.raises(BackendUnavailableError, match="replica now, no longer a primary"):
                await asyncio.wait_for(anext(changes), TIMEOUT)
        await admin.replicaof("NO", "ONE")


async def test_without_info_nor_hello_the_watch_checks_liveness_only(
    redis_server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory("valkey", extra_config={"rename-command": 'HELLO ""'})
    async with admin_of(server, protocol=2) as admin:  # redis-py would open with HELLO 3
        await admin.acl_setuser(
            "noinfo", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-info"]
        )
    options = redis_options(server).replace(username="noinfo", password="pw")
    async with (
        admin_of(server, protocol=2) as admin,
        Client(RedisBackend(options)) as client,
    ):
        with caplog.at_level("WARNING", logger="kivigo_async.watch"):
            async with client.watch("k") as changes:
                await admin.set("k", b"1")
                assert pairs(await take(changes, 1)) == [("set", "k")]
        assert "cannot learn the server's role" in caplog.text


async def heartbeat_checks(admin: Redis) -> int:
    """Commands the heartbeat's second connection has run (Valkey only: ``tot-cmds``); 0 before it opens."""
    clients: list[dict[str, Any]] = await admin.client_list()
    checks = [c for c in clients if c.get("cmd") in ("info", "config|get")]
    return sum(int(c["tot-cmds"]) for c in checks)


@pytest.mark.parametrize(
    ("kind", "turned_to", "lacking"),
    [("valkey", "", "Kg$xe"), ("redis", "", "Kg$xe"), ("valkey", "K$x", "ge")],
)
async def test_notifications_turned_off_meanwhile_end_the_watch(
    redis_server_factory: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    kind: BinaryKind,
    turned_to: str,
    lacking: str,
) -> None:
    # An operator or another tool changes the setting the watch turned on: later
    # writes publish nothing, which only the heartbeat can tell.
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    server = redis_server_factory(kind)
    async with (
        admin_of(server) as admin,
        Client(RedisBackend(redis_options(server))) as client,
        client.watch("k") as changes,
    ):
        await admin.set("k1", b"1")  # published: delivered before the error
        await admin.config_set("notify-keyspace-events", turned_to)
        await admin.delete("k1")  # published to nobody (a generic event: "g")
        assert pairs(await take(changes, 1)) == [("set", "k1")]
        with pytest.raises(NotificationsDisabledError, match="turned off") as info:
            await asyncio.wait_for(anext(changes), TIMEOUT)
        assert f"lacking {lacking!r}" in str(info.value)
        assert changes.closed
        assert set(await config(admin)) == set(turned_to)  # not turned back on behind the operator's back
    await no_subscribers(admin)


async def test_a_change_that_keeps_the_flags_needed_does_not_end_the_watch(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    server = redis_server_factory("valkey")
    async with (
        admin_of(server) as admin,
        Client(RedisBackend(redis_options(server))) as client,
        client.watch("k") as changes,
    ):
        await admin.config_set("notify-keyspace-events", "KEA")  # broader: still enough
        await admin.config_resetstat()

        async def read_thrice() -> bool:  # by the heartbeat: nothing else here runs CONFIG GET
            stats: dict[str, Any] = await admin.info("commandstats")
            return int(stats.get("cmdstat_config|get", {}).get("calls", 0)) >= 3

        await eventually(read_thrice, what="the heartbeat did not read the setting")
        await admin.set("k1", b"1")
        assert pairs(await take(changes, 1)) == [("set", "k1")]


async def test_config_refused_after_subscribing_leaves_the_watch_running(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The ACL takes CONFIG away from the watching user mid-watch: the heartbeat
    # says once that it can no longer tell, stops asking, and the watch goes on.
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    server = redis_server_factory("valkey", "acl")
    async with admin_of(server, username=server.username, password=server.password) as admin:
        await admin.acl_setuser(
            "watcher", enabled=True, passwords=["+w-secret"], keys=["*"], channels=["*"], commands=["+@all"]
        )
        options = redis_options(server).replace(username="watcher", password="w-secret")
        with caplog.at_level("WARNING", logger="kivigo_async.watch"):
            async with Client(RedisBackend(options)) as client, client.watch("k") as changes:
                await admin.acl_setuser("watcher", enabled=True, commands=["-config"])
                await eventually(lambda: "CONFIG GET refused" in caplog.text)
                then = await heartbeat_checks(admin)

                async def three_more_beats() -> bool:
                    return await heartbeat_checks(admin) >= then + 3

                await eventually(three_more_beats)
                await admin.set("k1", b"1")
                assert pairs(await take(changes, 1)) == [("set", "k1")]
        assert caplog.text.count("CONFIG GET refused") == 1
        log: list[dict[str, Any]] = await admin.acl_log()
        assert [int(e["count"]) for e in log if e["object"] == "config|get"] == [1]  # asked once
        await no_subscribers(admin)


async def test_configure_server_false_sends_no_config_command(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Told not to touch CONFIG (often because the ACL refuses it, and each refusal
    # would land in ACL LOG), the heartbeat does not ask for the setting either.
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    server = redis_server_factory("valkey", extra_config={"notify-keyspace-events": "KEA"})
    async with (
        admin_of(server) as admin,
        Client(RedisBackend(redis_options(server))) as client,
        client.watch("k", configure_server=False) as changes,
    ):

        async def three_beats() -> bool:
            return await heartbeat_checks(admin) >= 3

        await eventually(three_beats, what="the heartbeat did not ask the server's state")
        stats: dict[str, Any] = await admin.info("commandstats")
        assert "cmdstat_config|get" not in stats
        await admin.set("k1", b"1")
        assert pairs(await take(changes, 1)) == [("set", "k1")]


# --------------------------------------------------------------------------- API


async def test_invalid_arguments(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="prefix"):
        client.watch(b"k")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="max_pending"):
        client.watch("k", max_pending=0)
    with pytest.raises(InvalidArgumentError, match="max_pending"):
        client.watch("k", max_pending=True)


async def test_backend_without_watch_is_unsupported() -> None:
    class Minimal:
        async def get(self, key: str) -> bytes | None:
            return None

        async def set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
            pass

        async def delete(self, key: str) -> bool:
            return False

        async def scan(self, prefix: str) -> AsyncIterator[str]:
            for key in prefix[:0]:
                yield key

        async def close(self) -> None:
            pass

    assert not isinstance(Minimal(), WatchBackend)
    with pytest.raises(UnsupportedOperationError, match="Minimal"):
        Client(Minimal()).watch("k")


def test_backends_declare_the_capability() -> None:
    assert isinstance(MemoryBackend(), WatchBackend)
    assert isinstance(RedisBackend(RedisOptions()), WatchBackend)
    assert isinstance(RedisClusterBackend(RedisClusterOptions()), WatchBackend)
    assert isinstance(RedisSentinelBackend(RedisSentinelOptions()), WatchBackend)


def test_missing_flags() -> None:
    assert _watch.missing_flags("") == "Kg$xe"
    assert _watch.missing_flags("AKE") == ""
    assert _watch.missing_flags("KA") == ""
    assert _watch.missing_flags("Egx") == "K$e"


async def test_feed_delivers_buffered_events_before_its_error() -> None:
    halted: list[bool] = []
    feed = ChangeFeed(max_pending=10, halt=lambda: halted.append(True))
    feed.put(ChangeEvent(SET, "a"))
    feed.put(ChangeEvent(DELETE, "a"))
    feed.fail(BackendUnavailableError("gone"))
    feed.put(ChangeEvent(SET, "late"))  # after the failure: dropped
    assert halted == [True]
    assert pairs([await anext(feed), await anext(feed)]) == [("set", "a"), ("delete", "a")]
    with pytest.raises(BackendUnavailableError):
        await anext(feed)
    with pytest.raises(StopAsyncIteration):
        await anext(feed)
    await feed.aclose()
    assert halted == [True]


# --------------------------------------------------------------------------- memory


@pytest.fixture
async def memory() -> AsyncIterator[Client]:
    async with Client(MemoryBackend()) as opened:
        yield opened


async def test_memory_set_delete_expire(memory: Client) -> None:
    async with memory.watch("user:") as changes:
        await memory.set("user:1", "a")
        await memory.set("user:2", "b", ttl=1.0)
        await memory.set("other", "c")
        await memory.delete("user:1")
        await memory.delete("user:missing")
        events = await take(changes, 4)  # the fourth: user:2 expiring on time, unread
    assert pairs(events) == [("set", "user:1"), ("set", "user:2"), ("delete", "user:1"), ("expire", "user:2")]


async def test_memory_reports_the_expiry_of_a_key_written_over(memory: Client) -> None:
    async with memory.watch("x:") as changes:
        await memory.set("x:k", 1, ttl=0.05)
        time.sleep(0.1)  # noqa: ASYNC251 (the loop is busy past the deadline: its timer cannot run)
        await memory.set("x:k", 2)
        events = await take(changes, 3)
    # What Redis reports for the same calls: the expiry, then the new value.
    assert pairs(events) == [("set", "x:k"), ("expire", "x:k"), ("set", "x:k")]


async def test_memory_matches_redis_for_ttl_changes_and_batches(memory: Client) -> None:
    async with memory.watch("k:") as changes:
        await memory.batch_set({"k:a": 1, "k:b": 2})
        await memory.expire("k:a", 60)  # a TTL change alone: not reported
        await memory.persist("k:a")
        await memory.batch_delete(["k:a", "k:b", "k:missing"])
        async with memory.transaction() as tx:
            tx.set("k:c", 3)
            tx.delete("k:c")
        await memory.set("k:end", 0)
        events = await until_key(changes, "k:end")
    assert pairs(events) == [
        ("set", "k:a"),
        ("set", "k:b"),
        ("delete", "k:a"),
        ("delete", "k:b"),
        ("set", "k:c"),
        ("delete", "k:c"),
        ("set", "k:end"),
    ]


async def test_memory_expiry_of_a_key_written_before_the_watch(memory: Client) -> None:
    await memory.set("k", 1, ttl=0.1)
    async with memory.watch("k") as changes:
        assert pairs(await take(changes, 1)) == [("expire", "k")]
        assert await memory.get("k", default=None) is None
        await memory.set("k:end", 0)
        assert pairs(await take(changes, 1)) == [("set", "k:end")]  # reported once


async def test_memory_expiry_found_by_a_read_is_reported(memory: Client) -> None:
    backend = memory.backend
    assert isinstance(backend, MemoryBackend)
    async with memory.watch("k") as changes:
        await memory.set("k", 1, ttl=0.1)
        # The read may come first (the timer has not fired yet) or not: one EXPIRE either way.
        await eventually(lambda: backend._data.get("k") is None or _expired(backend))
        assert await memory.get("k", default=None) is None
        await memory.set("k:end", 0)
        assert pairs(await until_key(changes, "k:end")) == [("set", "k"), ("expire", "k"), ("set", "k:end")]


def _expired(backend: MemoryBackend) -> bool:
    entry = backend._data.get("k")
    return entry is not None and entry[1] is not None and entry[1] <= time.monotonic()


async def test_memory_prefix_is_literal(memory: Client) -> None:
    async with memory.watch("a*[b]?") as glob, memory.watch("user") as bare:
        for key in ("use", "user1", "aXbY", "a*[b]?z"):
            await memory.set(key, 1)
        assert [e.key for e in await take(glob, 1)] == ["a*[b]?z"]
        assert [e.key for e in await take(bare, 1)] == ["user1"]


async def test_memory_overflow_and_cleanup() -> None:
    backend = MemoryBackend()
    async with Client(backend) as client:
        async with client.watch("k", max_pending=3) as changes:
            for i in range(5):
                await client.set(f"k{i}", i, ttl=60)
            assert [e.key for e in await take(changes, 3)] == ["k0", "k1", "k2"]
            with pytest.raises(WatchOverflowError):
                await anext(changes)
            assert backend._feeds == {}
        async with client.watch("k"):
            assert backend._expiry_timer is not None  # keys with a TTL are timed while watched
        assert backend._feeds == {}
        assert backend._expiry_timer is None


async def test_memory_close_ends_watches() -> None:
    backend = MemoryBackend()
    stream = await backend.watch("k")
    await backend.set("k", b"1")
    await backend.close()
    assert pairs([item async for item in stream]) == [("set", "k")]
    with pytest.raises(BackendUnavailableError):
        await backend.watch("k")


# --------------------------------------------------------------------------- cluster


@pytest.fixture
def cluster_config(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    """The shared cluster, its notification settings restored afterwards."""
    saved: dict[RedisServer, str] = {}
    for node in redis_cluster.running_nodes():
        with redis.Redis(host=node.host, port=node.port) as direct:
            saved[node] = direct.config_get("notify-keyspace-events")["notify-keyspace-events"]
    redis_cluster.flushall()
    yield redis_cluster
    for node, value in saved.items():
        with redis.Redis(host=node.host, port=node.port) as direct:
            direct.config_set("notify-keyspace-events", value)


async def test_cluster_events_from_every_primary(cluster_config: RedisCluster) -> None:
    cluster = cluster_config
    keys = [f"w:{i}" for i in range(60)]
    owners = {cluster.node_for_slot(key_slot(k.encode())).port for k in keys}
    assert len(owners) == 3
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs[:1]))
    async with Client(backend) as client, client.watch("w:") as changes:
        await client.batch_set(dict.fromkeys(keys, 1))
        await client.set("other", 1)
        await client.delete("w:0")
        events = await take(changes, 61)
    assert sorted(e.key for e in events if e.type is SET) == sorted(keys)
    assert [e for e in events if e.type is not SET] == [ChangeEvent(DELETE, "w:0")]
    # Per key, the order is the server's: w:0 was set before it was deleted.
    assert [e.type for e in events if e.key == "w:0"] == [SET, DELETE]


async def test_cluster_lost_node_subscription_raises(cluster_config: RedisCluster) -> None:
    cluster = cluster_config
    victim = cluster.primaries()[0]
    before = other_tasks()
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs[:1]))
    async with Client(backend) as client, client.watch("w:") as changes, admin_of(victim) as direct:
        [subscriber] = await subscribers(direct)
        await direct.client_kill_filter(_id=subscriber["id"])
        with pytest.raises(BackendUnavailableError, match=str(victim.port)):
            await asyncio.wait_for(anext(changes), TIMEOUT)
    for node in cluster.primaries():
        async with admin_of(node) as direct:
            await no_subscribers(direct)
    assert other_tasks() <= before


async def test_cluster_notifications_turned_off_on_one_primary_end_the_watch(
    cluster_config: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    cluster = cluster_config
    victim = cluster.primaries()[0]
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs[:1]))
    async with Client(backend) as client, client.watch("w:") as changes, admin_of(victim) as direct:
        await direct.config_set("notify-keyspace-events", "")
        with pytest.raises(NotificationsDisabledError, match=str(victim.port)):
            await asyncio.wait_for(anext(changes), TIMEOUT)


def node_id(node: RedisServer) -> str:
    with redis.Redis(host=node.host, port=node.port) as direct:
        raw: bytes = direct.execute_command("CLUSTER", "MYID")
    return raw.decode()


async def test_cluster_manual_failover_ends_the_watch(
    redis_cluster_factory: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A coordinated failover leaves the demoted primary's subscribers connected, now
    # to a replica; the heartbeat must notice, for a user allowed CLUSTER NODES and
    # for one allowed neither it nor ROLE (HELLO tells the role).
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    cluster = redis_cluster_factory(node_timeout_ms=2000)
    for node in cluster.nodes:
        with redis.Redis(host=node.host, port=node.port) as direct:
            direct.acl_setuser(
                "watcher",
                enabled=True,
                passwords=["+w-secret"],
                keys=["*"],
                channels=["*"],
                commands=["+@all", "-cluster|nodes", "-role"],
            )
    old = cluster.node_for_slot(key_slot(b"f:1"))
    replica = next(
        i.server for i in cluster.topology() if i.server is not None and i.master_id == node_id(old)
    )
    options = RedisClusterOptions(addrs=cluster.addrs[:1])
    limited = options.replace(username="watcher", password="w-secret")
    async with Client(RedisClusterBackend(options)) as client, Client(RedisClusterBackend(limited)) as other:
        async with client.watch("f:") as changes, other.watch("f:") as limited_changes:
            await client.set("f:1", 1)
            assert pairs(await take(changes, 1)) == [("set", "f:1")]
            assert pairs(await take(limited_changes, 1)) == [("set", "f:1")]
            with redis.Redis(host=replica.host, port=replica.port) as promote:
                promote.execute_command("CLUSTER", "FAILOVER")
            for stream in (changes, limited_changes):
                with pytest.raises(BackendUnavailableError, match=f"{old.port}: the server is a replica now"):
                    await asyncio.wait_for(anext(stream), 30)
        await asyncio.to_thread(cluster.wait_ready, 60.0)
        assert cluster.node_for_slot(key_slot(b"f:1")) is replica
        async with client.watch("f:") as changes:  # watching again follows the new layout
            await client.set("f:1", 2)
            assert pairs(await take(changes, 1)) == [("set", "f:1")]


async def test_cluster_resharding_ends_the_watch_after_the_moved_keys(
    redis_cluster_factory: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_watch, "_HEARTBEAT", 0.2)
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    slot = key_slot(b"m:1")
    source = cluster.node_for_slot(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs[:1]))
    async with Client(backend) as client:
        await client.set("m:1", "v")
        async with client.watch("m:") as changes:
            # Blocking calls on purpose: the heartbeat runs only once the slot has moved.
            source_id, target_id = node_id(source), node_id(target)
            with (
                redis.Redis(host=source.host, port=source.port) as src,
                redis.Redis(host=target.host, port=target.port) as dst,
            ):
                dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
                src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", "m:1")
                dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            # The new owner's SET and the old one's DELETE come on different connections,
            # in either order: the watch reports them, then ends.
            moved = await take(changes, 2)
            assert sorted(pairs(moved)) == [("delete", "m:1"), ("set", "m:1")]
            with pytest.raises(BackendUnavailableError, match="slots this primary serves changed"):
                await asyncio.wait_for(anext(changes), TIMEOUT)
        assert await client.get("m:1") == "v"  # the value never changed


# --------------------------------------------------------------------------- sentinel


async def test_sentinel_watches_the_primary(redis_sentinel: RedisSentinel) -> None:
    redis_sentinel.flushall()
    host, _, port = redis_sentinel.master_addr().rpartition(":")
    options = RedisSentinelOptions(
        sentinels=redis_sentinel.sentinel_addrs, service_name=redis_sentinel.service_name
    )
    async with Redis(host=host, port=int(port)) as primary:
        saved = await config(primary)
        try:
            async with Client(RedisSentinelBackend(options)) as client, client.watch("s:") as changes:
                await primary.set("s:1", b"1")
                assert pairs(await take(changes, 1)) == [("set", "s:1")]
        finally:
            await primary.config_set("notify-keyspace-events", saved)


async def test_sentinel_failover_ends_the_watch(redis_sentinel_factory: SentinelFactory) -> None:
    topology = redis_sentinel_factory()
    old = topology.master_addr()
    options = RedisSentinelOptions(sentinels=topology.sentinel_addrs, service_name=topology.service_name)
    async with Client(RedisSentinelBackend(options)) as client:
        async with client.watch("k") as changes:
            await client.set("k1", 1)
            assert pairs(await take(changes, 1)) == [("set", "k1")]
            await asyncio.to_thread(topology.failover, 60.0)
            # The demoted primary drops its clients: the gap is reported, not hidden.
            with pytest.raises(BackendUnavailableError, match=old):
                await asyncio.wait_for(anext(changes), TIMEOUT)
        async with client.watch("k") as changes:  # watching again follows the new primary
            await client.set("k2", 1)
            assert pairs(await take(changes, 1)) == [("set", "k2")]
