"""Cluster-specific behaviour of RedisClusterBackend, on real Valkey / Redis clusters.

Batches split by slot and node (one pipeline per node), scans over primaries
only, transactions confined to one slot, health naming the failed node,
recovery after a failover, and options / URL parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
import redis
from conftest import cancel_close_after, check_a_failed_close_is_reported_once, refused_port
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot

from kivigo_async import Client
from kivigo_async.backends.redis import RedisClusterBackend, RedisClusterOptions
from kivigo_async.backends.redis._mux import MuxConnection
from kivigo_async.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    ConnectTimeoutError,
    CrossSlotError,
    HealthCheckError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyNotFoundError,
    KivigoError,
    OperationTimeoutError,
    TransactionConflictError,
)
from kivigo_async.testing.proxy import FaultProxy
from kivigo_async.testing.pytest_plugin import ClusterFactory
from kivigo_async.testing.servers import RedisServer
from kivigo_async.testing.topologies import RedisCluster, wait_replicated
from kivigo_async.watch import ChangeEvent, ChangeType


def sync_client(node: RedisServer) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port, socket_timeout=5)


def command_calls(node: RedisServer) -> Counter[str]:
    """Calls per command on ``node`` since its last CONFIG RESETSTAT."""
    with sync_client(node) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def reset_stats(cluster: RedisCluster) -> None:
    """Zero the command counters, once replicas have applied earlier writes (which they count)."""
    for node in cluster.primaries():
        wait_replicated(node)
    for node in cluster.running_nodes():
        with sync_client(node) as client:
            client.config_resetstat()


@pytest.fixture
async def backend(redis_cluster: RedisCluster) -> AsyncIterator[RedisClusterBackend]:
    redis_cluster.flushall()
    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1]))
    yield backend
    await backend.close()


@pytest.mark.parametrize(("auto_pipeline", "protocol"), [(True, 2), (False, 2), (True, None), (False, None)])
async def test_a_password_for_a_cluster_without_one_connects(
    redis_cluster: RedisCluster, auto_pipeline: bool, protocol: int | None
) -> None:
    # As on a single server: the default user, whose password nothing checks yet,
    # lets the client in whatever password it was given, on every protocol.
    options = RedisClusterOptions(
        addrs=redis_cluster.addrs[:1],
        password="not-required-yet",
        auto_pipeline=auto_pipeline,
        protocol=protocol,
    )
    async with Client(RedisClusterBackend(options)) as client:
        await client.set("auth:{k}", 1)
        assert await client.get("auth:{k}") == 1
        await client.delete("auth:{k}")


async def test_node_connections_do_not_try_maintenance_notifications(
    redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # redis-py asks for them on every new RESP3 node connection by default and logs
    # each refusal; our pools all turn them off.
    options = RedisClusterOptions(addrs=redis_cluster.addrs[:1], auto_pipeline=False, protocol=3)
    with caplog.at_level(logging.DEBUG):
        async with Client(RedisClusterBackend(options)) as client:
            await client.batch_set({f"maint:{i}": i for i in range(30)})
            assert await client.get("maint:7") == 7
    assert "maintenance notifications" not in caplog.text.lower()


async def test_batch_get_is_one_pipeline_per_node(
    backend: RedisClusterBackend, redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(backend)
    data = {f"user:{i}": i for i in range(1000)}
    await client.batch_set(data)
    keys = list(data)
    random.Random(7).shuffle(keys)
    keys.insert(500, "missing")

    writes: Counter[str] = Counter()
    through_redis_py: Counter[str] = Counter()
    real_many = MuxConnection.execute_many
    real_pipeline = ClusterNode.execute_pipeline
    real_command = ClusterNode.execute_command

    async def count_many(conn: MuxConnection, commands: Any) -> list[Any]:
        writes[conn._node] += 1
        return await real_many(conn, commands)

    async def count_pipeline(node: ClusterNode, commands: list[Any]) -> bool:
        through_redis_py[node.name] += 1
        return await real_pipeline(node, commands)

    async def count_command(node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        through_redis_py[node.name] += 1
        return await real_command(node, *args, **kwargs)

    monkeypatch.setattr(MuxConnection, "execute_many", count_many)
    monkeypatch.setattr(ClusterNode, "execute_pipeline", count_pipeline)
    monkeypatch.setattr(ClusterNode, "execute_command", count_command)
    reset_stats(redis_cluster)
    values = await backend.batch_get(keys)
    monkeypatch.undo()

    primaries = redis_cluster.primaries()
    assert len(primaries) == 3
    # One write per primary on its multiplexed connection, nothing key by key
    # and nothing through redis-py's pipeline.
    assert writes == Counter({f"{p.host}:{p.port}": 1 for p in primaries})
    assert not through_redis_py
    # Results come back in input order, missing keys as None.
    assert values == [None if k == "missing" else str(data[k]).encode() for k in keys]
    # The server side agrees: one GET or MGET per slot, spread over all three primaries.
    slots = {key_slot(k.encode()) for k in keys}
    per_node = [command_calls(p)["get"] + command_calls(p)["mget"] for p in primaries]
    assert all(calls > 0 for calls in per_node)
    assert sum(per_node) == len(slots)
    assert all(command_calls(r)["get"] + command_calls(r)["mget"] == 0 for r in redis_cluster.replicas())


async def test_cancelled_single_key_calls_leave_no_reply_for_the_others(backend: RedisClusterBackend) -> None:
    # Single-key commands of all tasks share each node's multiplexed connection:
    # callers cancelled at any point leave every other caller its own reply.
    client = Client(backend)
    data = {f"single:{i}": i for i in range(60)}
    await client.batch_set(data)
    cancelled = 0
    for turn in range(12):
        calls = {key: asyncio.ensure_future(client.get(key)) for key in data}
        doomed = list(data)[turn % 3 :: 3]
        for _ in range(turn % 4):
            await asyncio.sleep(0)
        for key in doomed:
            calls[key].cancel()
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        for (key, call), result in zip(calls.items(), results, strict=True):
            if call.cancelled():
                assert key in doomed
                cancelled += 1
            else:
                assert result == data[key], (turn, key, result)
    assert cancelled > 0
    assert await client.batch_get(list(data)) == data


async def test_a_cancelled_batch_read_leaves_no_reply_for_the_next(backend: RedisClusterBackend) -> None:
    # Batch reads share one multiplexed connection per node: a caller that gives up
    # at any point must never leave a reply that a later call would take as its own.
    client = Client(backend)
    first = {f"first:{i}": i for i in range(300)}
    second = {f"second:{i}": -i for i in range(300)}
    await client.batch_set(first | second)
    for turn in range(24):
        call = asyncio.ensure_future(client.batch_get(list(first)))
        for _ in range(turn % 6):
            await asyncio.sleep(0)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        assert await client.batch_get(list(second)) == second
        assert await backend.exists(list(first)) == len(first)


async def test_a_batch_that_lost_its_connection_relearns_the_layout_and_only_reads_are_sent_again(
    backend: RedisClusterBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read that met a lost connection was applied nowhere: after learning the
    # layout anew (the node may have failed over) it is sent once more.
    client = Client(backend)
    data = {f"lost:{i}": i for i in range(200)}
    await client.batch_set(data)
    failures: list[str] = []
    relearned: list[int] = []
    real_many = MuxConnection.execute_many
    real_relearn = backend._relearn

    async def failing(conn: MuxConnection, commands: Any) -> list[Any]:
        if len(failures) < allowed:
            failures.append(conn._node)
            raise redis.exceptions.ConnectionError(f"connection to {conn._node} lost")
        return await real_many(conn, commands)

    async def relearn() -> set[str]:
        relearned.append(1)
        return await real_relearn()

    monkeypatch.setattr(MuxConnection, "execute_many", failing)
    monkeypatch.setattr(backend._node_conns, "_refresh", relearn)
    allowed = 1
    assert await client.batch_get(list(data)) == data
    assert (len(failures), len(relearned)) == (1, 1)
    # Lost again on the second try: the caller hears of it, as an outage.
    failures.clear()
    allowed = 1_000
    with pytest.raises(BackendUnavailableError, match="lost"):
        await client.batch_get(list(data))
    assert len(relearned) == 3  # after each try
    assert len(failures) >= 2  # both tries
    # A write may have been applied before the connection was lost: it is not sent
    # again, but the layout is learned anew for the next call.
    failures.clear()
    relearned.clear()
    allowed = 1
    with pytest.raises(BackendUnavailableError, match="lost"):
        await client.batch_set({key: -1 for key in data})
    assert (len(failures), len(relearned)) == (1, 1)
    monkeypatch.undo()
    # The nodes whose connections held were written; the one that failed was not.
    current = await client.batch_get(list(data))
    assert current.keys() == data.keys()
    assert all(current[key] in (-1, value) for key, value in data.items())
    assert -1 in current.values()
    assert any(current[key] == value for key, value in data.items())


async def test_a_stalled_node_fails_a_batch_read_with_a_timeout(
    redis_cluster_factory: ClusterFactory,
) -> None:
    # A long node timeout: the stall must not turn into a failover during the test.
    cluster = redis_cluster_factory(node_timeout_ms=20_000)
    options = RedisClusterOptions(addrs=cluster.addrs, read_timeout=0.5, max_retries=0)
    async with Client(RedisClusterBackend(options)) as client:
        data = {f"stall:{i}": i for i in range(300)}
        await client.batch_set(data)
        assert await client.batch_get(list(data)) == data
        stalled = cluster.primaries()[0]
        pid = stalled.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(OperationTimeoutError):
                await client.batch_get(list(data))
            assert time.monotonic() - started < 5
        finally:
            os.kill(pid, signal.SIGCONT)
        # The stalled connection was dropped; the next read gets a new one.
        assert await asyncio.wait_for(client.batch_get(list(data)), 10) == data


def poll(problem: Callable[[], str | None], deadline: float) -> None:
    """Call ``problem`` until it returns None; fail with its last answer at ``deadline`` (monotonic)."""
    while (found := problem()) is not None:
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def wait_promoted(cluster: RedisCluster, via: RedisServer, heir: RedisServer) -> None:
    """Wait until ``via`` sees ``heir`` as a primary serving slots (asked of ``via`` only:
    a stopped node would not answer)."""

    def problem() -> str | None:
        if any(i.server is heir and i.is_primary and i.slots for i in cluster.topology(via=via)):
            return None
        return f"{heir.port} was not promoted"

    poll(problem, time.monotonic() + 30)


def successor(cluster: RedisCluster, primary: RedisServer) -> tuple[RedisServer, RedisServer]:
    """Another primary, and the replica of ``primary`` that would replace it."""
    survivor = next(node for node in cluster.primaries() if node is not primary)
    layout = cluster.topology(via=survivor)
    primary_id = next(i.node_id for i in layout if i.server is primary)
    heir = next(i.server for i in layout if i.master_id == primary_id)
    assert heir is not None
    return survivor, heir


async def test_batches_follow_a_failover_away_from_a_primary_that_stopped_answering(
    redis_cluster_factory: ClusterFactory,
) -> None:
    # A primary that stops answering without closing its connections (a hung
    # process, a paused machine) is replaced by its replica. Batches that timed out
    # on it learn the layout again, so they reach the promoted replica rather than
    # wait on the old primary for good; its connection is retired.
    cluster = redis_cluster_factory(node_timeout_ms=1000)
    options = RedisClusterOptions(addrs=cluster.addrs, read_timeout=1.0, dial_timeout=1.0, max_retries=0)
    backend = RedisClusterBackend(options)
    async with Client(backend) as client:
        data = {f"hung:{i}": i for i in range(300)}
        await client.batch_set(data)
        stalled = cluster.primaries()[0]
        assert wait_replicated(stalled) == 1  # the replica promoted below has every key
        survivor, heir = successor(cluster, stalled)
        stalled_name = f"{stalled.host}:{stalled.port}"
        assert stalled_name in backend._node_conns._conns
        pid = stalled.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(OperationTimeoutError):
                await client.batch_get(list(data))
            await asyncio.to_thread(wait_promoted, cluster, survivor, heir)
            # The layout learned right after that timeout may predate the promotion:
            # one more call may still time out on the old primary, and learn again.
            timeouts = 0
            while True:
                try:
                    found = await asyncio.wait_for(client.batch_get(list(data)), 15)
                    break
                except OperationTimeoutError:
                    timeouts += 1
                    assert timeouts < 3, "batches kept going to the primary that stopped answering"
            assert found == data
            assert await client.batch_get(list(data)) == data
            assert stalled_name not in backend._node_conns._conns
            assert all(not conn.draining for conn in backend._node_conns._retired)
        finally:
            os.kill(pid, signal.SIGCONT)


async def test_listing_transactions_and_watches_reach_the_promoted_replica_on_their_own(
    redis_cluster_factory: ClusterFactory,
) -> None:
    # The layout is read once and kept. Single-key calls and batches read it again
    # after a lost node; a service that only lists, runs transactions or watches
    # must reach the promoted replica after a failover too, without any of those.
    cluster = redis_cluster_factory(node_timeout_ms=1000)
    options = RedisClusterOptions(addrs=cluster.addrs, dial_timeout=1, read_timeout=1, max_retries=1)
    key = "{victim}:n"
    lister, transactor, watcher = (RedisClusterBackend(options) for _ in range(3))
    async with Client(lister) as lists, Client(transactor) as transactions, Client(watcher) as watches:

        async def increment() -> None:
            async with transactions.transaction(watch=[key]) as tx:
                tx.set(key, (await tx.get(key, int, default=0)) + 1)

        async def recovered(what: str, call: Callable[[], Awaitable[Any]]) -> Any:
            deadline = time.monotonic() + 30
            while True:
                try:
                    return await asyncio.wait_for(call(), 30)
                except (BackendUnavailableError, OperationTimeoutError, TransactionConflictError) as exc:
                    failure = exc
                assert time.monotonic() < deadline, f"{what} kept failing after the promotion: {failure}"
                await asyncio.sleep(0.2)

        await increment()
        assert await lists.list("{victim}") == [key]
        victim = cluster.node_for_slot(key_slot(b"victim"))
        victim_name = f"{victim.host}:{victim.port}"
        assert list(transactor._node_backends) == [victim_name]
        assert wait_replicated(victim) == 1  # the replica promoted below has the key
        survivor, heir = successor(cluster, victim)

        async def first_change() -> Any:
            async with watches.watch("{victim}") as changes:
                with sync_client(heir) as direct:
                    direct.set("{victim}:w", b"1")
                return await asyncio.wait_for(anext(changes), 30)

        async with watches.watch("{victim}") as changes:
            victim.kill()
            with pytest.raises(BackendUnavailableError):  # a watch ends with its node
                await asyncio.wait_for(anext(changes), 30)
        await asyncio.to_thread(wait_promoted, cluster, survivor, heir)

        assert await recovered("list", lambda: lists.list("{victim}")) == [key]
        await recovered("a transaction", increment)
        assert await recovered("a watch", first_change) == ChangeEvent(ChangeType.SET, "{victim}:w")
        with sync_client(heir) as direct:
            assert direct.get(key) == b"2"
        # The backend of the node that left is closed, not kept until close().
        assert list(transactor._node_backends) == [f"{heir.host}:{heir.port}"]


async def test_batches_across_slots(backend: RedisClusterBackend) -> None:
    client = Client(backend)
    data = {f"{{tag}}:{i}": i for i in range(20)} | {f"free:{i}": i for i in range(200)}
    await client.batch_set(data, ttl=60)
    assert await client.batch_get(list(data), int) == data
    keys = [*data, "free:0", "nope"]
    assert await backend.exists(keys) == len(data) + 1  # duplicates count twice
    assert await client.batch_delete(["free:0", "free:0", "{tag}:1", "nope"]) == 2
    assert await client.list("{tag}:") == sorted(k for k in data if k.startswith("{tag}") and k != "{tag}:1")
    remaining = await client.ttl("free:5")
    assert remaining is not None
    assert 0 < remaining <= 60


async def test_scan_covers_every_primary_without_replica_duplicates(
    backend: RedisClusterBackend, redis_cluster: RedisCluster
) -> None:
    client = Client(backend)
    keys = [f"scan:{i}" for i in range(3000)]
    await client.batch_set(dict.fromkeys(keys, 1))
    for primary in redis_cluster.primaries():
        with sync_client(primary) as direct:
            assert direct.dbsize() > 0
    # Replicas hold copies too (scanning them would yield each key twice), all of them
    # before the replica reads below.
    for primary in redis_cluster.primaries():
        assert wait_replicated(primary) == 1
    streamed = [key async for key in client.iter_keys("scan:")]
    assert len(streamed) == len(keys)
    assert sorted(streamed) == sorted(keys)

    replica_reads = RedisClusterBackend(
        RedisClusterOptions(addrs=redis_cluster.addrs, read_from_replicas=True)
    )
    try:
        assert await Client(replica_reads).list("scan:") == sorted(keys)
        reset_stats(redis_cluster)
        for _ in range(2):  # reads take turns between a slot's primary and its replica
            assert await replica_reads.batch_get(keys[:50]) == [b"1"] * 50
        # The replicas served their share themselves (a connection that had not sent
        # READONLY would be redirected to the primary instead).
        replica_calls = [command_calls(r) for r in redis_cluster.replicas()]
        assert sum(c["get"] + c["mget"] for c in replica_calls) > 0
        assert sum(c["readonly"] for c in replica_calls) > 0
    finally:
        await replica_reads.close()


async def test_cross_slot_transaction_sends_nothing(
    backend: RedisClusterBackend, redis_cluster: RedisCluster
) -> None:
    client = Client(backend)
    await client.set("{o}:stock", 5)
    reset_stats(redis_cluster)
    with pytest.raises(CrossSlotError, match="hash tag") as info:
        async with client.transaction() as tx:
            tx.set("a", 1)
            tx.set("b", 2)
    assert isinstance(info.value, InvalidArgumentError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CrossSlotError):
        async with client.transaction(watch=["a", "b"]):
            pass
    with pytest.raises(CrossSlotError, match="'other'"):
        async with client.transaction(watch=["{o}:stock"]) as tx:
            tx.set("{o}:stock", 4)
            tx.set("other", 1)
    sent: Counter[str] = Counter()
    for node in redis_cluster.primaries():
        sent += command_calls(node)
    # The WATCH of the last transaction went out (it was valid); nothing else did.
    assert sent["watch"] == 1
    for command in ("multi", "exec", "set", "unlink"):
        assert sent[command] == 0, command
    assert await client.batch_get(["a", "b", "other", "{o}:stock"]) == {"{o}:stock": 5}


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_an_unencodable_key_in_a_watched_transaction_is_an_invalid_key(
    redis_cluster: RedisCluster, auto_pipeline: bool
) -> None:
    # The transaction finds each key's slot itself: a lone surrogate must be refused
    # there as every other call refuses it, before anything is sent.
    redis_cluster.flushall()
    bad = "bad\ud800key"
    options = RedisClusterOptions(addrs=redis_cluster.addrs[:1], auto_pipeline=auto_pipeline)
    async with Client(RedisClusterBackend(options)) as client:
        await client.set("{t}a", 1)
        reset_stats(redis_cluster)
        with pytest.raises(InvalidKeyError, match="lone surrogate"):
            async with client.transaction(watch=["{t}a"]) as tx:
                await tx.get(bad)
        with pytest.raises(InvalidKeyError, match="lone surrogate"):
            async with client.transaction(watch=["{t}a"]) as tx:
                tx.set("{t}a", 2)
                tx.set("{t}b", 2)
                tx.set(bad, 1)
        sent: Counter[str] = Counter()
        for node in redis_cluster.primaries():
            sent += command_calls(node)
        assert sent["watch"] == 2
        assert (sent["multi"], sent["exec"], sent["set"]) == (0, 0, 0)
        assert await client.batch_get(["{t}a", "{t}b"]) == {"{t}a": 1}


async def test_transaction_on_the_slot_owner(
    backend: RedisClusterBackend, redis_cluster: RedisCluster
) -> None:
    client = Client(backend)
    await client.set("{cart:7}:total", 10)
    async with client.transaction(watch=["{cart:7}:total"]) as tx:
        total = await tx.get("{cart:7}:total", int)
        assert await tx.get("elsewhere", default=None) is None  # other slots read normally
        tx.set("{cart:7}:total", total + 5)
        tx.set("{cart:7}:items", ["apple"])
        tx.delete("{cart:7}:old")
    assert await client.batch_get(["{cart:7}:total", "{cart:7}:items"]) == {
        "{cart:7}:total": 15,
        "{cart:7}:items": ["apple"],
    }
    owner = redis_cluster.node_for_slot(key_slot(b"cart:7"))
    with sync_client(owner) as direct:
        assert direct.get("{cart:7}:total") == b"15"


async def test_a_transaction_refused_a_free_connection_does_not_reread_the_layout(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No free connection is a busy client, not a node that failed over: reading the
    # layout again on every such refusal would only make the client busier.
    backend = RedisClusterBackend(
        RedisClusterOptions(addrs=redis_cluster.addrs, pool_size=1, pool_timeout=0.2)
    )
    relearned: list[bool] = []
    real = backend._relearn

    async def counted() -> set[str]:
        relearned.append(True)
        return await real()

    async with Client(backend) as client:
        await client.set("{busy}:k", 1)
        monkeypatch.setattr(backend, "_relearn", counted)
        async with client.transaction(watch=["{busy}:k"]) as held:  # holds the node's one connection
            await held.get("{busy}:k")
            with pytest.raises(OperationTimeoutError, match="pool"):
                async with client.transaction(watch=["{busy}:k"]):
                    pass
        assert relearned == []


async def test_health_names_the_failed_primary(redis_cluster_factory: ClusterFactory) -> None:
    cluster = redis_cluster_factory(node_timeout_ms=1000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs, max_retries=0, dial_timeout=2))
    async with Client(backend) as client:
        await client.health()
        await client.batch_set({f"k{i}": i for i in range(100)})
        victim = cluster.primaries()[1]
        assert wait_replicated(victim) == 1  # its replica, promoted below, has its keys
        victim.kill()
        with pytest.raises(HealthCheckError) as info:
            await client.health()
        assert f":{victim.port}" in str(info.value)
        assert isinstance(info.value.errors[0], BackendUnavailableError)
        others = [node for node in cluster.nodes if node is not victim]
        assert all(f":{p.port}" not in str(info.value) for p in others)

        # A replica takes over; the backend re-reads the layout and recovers.
        await asyncio.to_thread(cluster.wait_ready, 60.0, expected_nodes=5)
        deadline = time.monotonic() + 60
        while True:
            try:
                await client.health()
                break
            except HealthCheckError:
                assert time.monotonic() < deadline, "health never recovered after the failover"
                await asyncio.sleep(0.5)
        assert await client.batch_get([f"k{i}" for i in range(100)]) == {f"k{i}": i for i in range(100)}


async def test_redis_server_cluster(redis_cluster_factory: ClusterFactory) -> None:
    cluster = redis_cluster_factory("redis")
    backend = RedisClusterBackend.from_url(f"redis://{cluster.addrs[0]}?addr={cluster.addrs[1]}")
    async with Client(backend) as client:
        data = {f"r:{i}": i for i in range(300)}
        await client.batch_set(data)
        assert await client.batch_get(list(data)) == data
        assert await client.list("r:") == sorted(data)
        async with client.transaction(watch=["{r}n"]) as tx:
            tx.set("{r}n", 1)
        assert await client.get("{r}n") == 1


async def test_unreachable_seeds() -> None:
    with refused_port() as port:
        backend = RedisClusterBackend(
            RedisClusterOptions(addrs=[f"127.0.0.1:{port}"], max_retries=0, dial_timeout=1)
        )
        try:
            with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}"):
                await backend.get("k")
            with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}"):
                await backend.health()
        finally:
            await backend.close()


def test_cluster_options_refuse_an_unknown_replacement() -> None:
    with pytest.raises(ConfigurationError, match="bogus"):
        RedisClusterOptions(addrs=["a:7000"]).replace(bogus=1)


async def test_dial_timeout_bounds_the_login_even_without_a_read_timeout(redis_cluster: RedisCluster) -> None:
    # The seed accepts connections and never answers: the login (CLIENT SETINFO, AUTH)
    # used to wait on read_timeout, which None made forever.
    seed = redis_cluster.nodes[0]
    async with FaultProxy(seed.host, seed.port) as proxy:
        proxy.blackhole()
        options = RedisClusterOptions(addrs=[proxy.addr], max_retries=0, dial_timeout=0.5, read_timeout=None)
        backend = RedisClusterBackend(options)
        started = time.monotonic()
        try:
            # A dial timeout, reported as a single server's is.
            with pytest.raises(ConnectTimeoutError, match="Timeout connecting"):
                await asyncio.wait_for(backend.get("k"), 30)
        finally:
            await backend.close()
        assert time.monotonic() - started < 5


def test_options_validation_and_url() -> None:
    opts = RedisClusterOptions.from_url(
        "rediss://app:p%40ss@n1:7000?addr=n2:7001&addr=n3:7002&max_redirects=5&read_from_replicas=yes"
        "&pool_size=4&read_timeout=1.5"
    )
    assert opts.addrs == ("n1:7000", "n2:7001", "n3:7002")
    assert (opts.username, opts.password, opts.max_redirects) == ("app", "p@ss", 5)
    assert (opts.read_from_replicas, opts.pool_size, opts.read_timeout) == (True, 4, 1.5)
    assert opts.auto_pipeline
    assert not RedisClusterOptions.from_url("redis://n1:7000?auto_pipeline=false").auto_pipeline
    assert bool(opts.tls)
    assert "p@ss" not in repr(opts)
    assert "p@ss" not in repr(RedisClusterBackend(opts))
    assert opts.node_options("n9:7000").password == "p@ss"
    for bad_url in (
        "redis://n1:7000/2",
        "unix:///tmp/s",
        "redis://n1:7000?bogus=1",
        "redis://n1?max_redirects=x",
        "redis://n1?max_redirects=1_6",  # int() reads 16; the URL options take plain digits
        "redis://n1?max_redirects=%EF%BC%95",  # a fullwidth 5
        "redis://n1?auto_pipeline=maybe",
    ):
        with pytest.raises(ConfigurationError):
            RedisClusterOptions.from_url(bad_url)
    bad_options: list[dict[str, Any]] = [
        {"addrs": "n1:7000"},
        {"addrs": []},
        {"addrs": ["n1"]},
        {"max_redirects": 0},
        {"pool_size": 0},
        {"read_timeout": -1},
        {"read_from_replicas": "yes"},
        {"auto_pipeline": 1},
    ]
    for bad in bad_options:
        with pytest.raises(ConfigurationError):
            RedisClusterOptions(**bad)
    assert RedisClusterOptions(addrs=["n1:7000"]).replace(pool_size=3).pool_size == 3


@contextlib.asynccontextmanager
async def cluster_client(
    factory: ClusterFactory, **options: Any
) -> AsyncIterator[tuple[RedisCluster, Client]]:
    """A private cluster (no failover of its own within 5 s) and a client of it with ``options``."""
    cluster = factory(node_timeout_ms=5000)
    async with Client(RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs, **options))) as client:
        yield cluster, client


def mark_migrating(source: RedisServer, target: RedisServer, slot: int) -> bytes:
    """Mark ``slot`` importing on ``target`` and migrating on ``source``; returns the target's id."""
    with sync_client(source) as src, sync_client(target) as dst:
        source_id, target_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    return cast("bytes", target_id)


def migrate_slot(cluster: RedisCluster, slot: int, target: RedisServer, pause: float) -> int:
    """Move ``slot`` to ``target`` the way ``--cluster reshard`` does, a few keys at a time.

    The end is told to the primaries in their order, the source sometimes before
    the target (see test_moved_back_and_forth_waits_for_the_new_owner).
    """
    source = cluster.node_for_slot(slot)
    target_id = mark_migrating(source, target, slot)
    with sync_client(source) as src:
        moved = 0
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 5):
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)
        for node in cluster.primaries():
            with sync_client(node) as each:
                each.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    return moved


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_single_keys_follow_ask_then_moved(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    # While a slot migrates, its source answers ASK for a key it does not hold:
    # the command goes to the importing node with ASKING. Once the slot has
    # moved, MOVED updates its owner and later calls go straight there.
    # max_redirects=1: each call below needs exactly one redirection, which it may follow.
    options = {"auto_pipeline": auto_pipeline, "max_redirects": 1}
    async with cluster_client(redis_cluster_factory, **options) as (cluster, client):
        await client.set("{ask}:old", "before")
        slot = key_slot(b"ask")
        source = cluster.node_for_slot(slot)
        target = next(p for p in cluster.primaries() if p is not source)
        with sync_client(source) as src, sync_client(target) as dst:
            source_id, target_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        reset_stats(cluster)
        await client.set("{ask}:new", "during")  # not on the source: ASK
        assert await client.get("{ask}:new") == "during"
        assert await client.get("{ask}:old") == "before"  # still on the source
        assert command_calls(target)["asking"] >= 2
        with sync_client(target) as dst:
            assert dst.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1
        assert migrate_slot(cluster, slot, target, 0) == 1  # {ask}:old; the slot is the target's now
        reset_stats(cluster)
        assert await client.get("{ask}:old") == "before"  # MOVED, then the target
        assert await client.get("{ask}:new") == "during"
        assert await client.ttl("{ask}:new") is None
        with sync_client(source) as src:
            stats = src.info("commandstats")["cmdstat_get"]
        assert (stats["calls"], stats["rejected_calls"]) == (0, 1)  # the first read, answered MOVED
        assert command_calls(target)["get"] == 2


def rejected_calls(node: RedisServer, command: str) -> int:
    """Calls of ``command`` that ``node`` refused (MOVED, ASK...) since its last CONFIG RESETSTAT."""
    with sync_client(node) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("rejected_calls", 0))


def wait_refused(command: str, *nodes: RedisServer, at_least: int = 1) -> None:
    """Block until ``nodes`` together have refused ``command`` ``at_least`` times (or 10 s have passed)."""
    deadline = time.monotonic() + 10
    while sum(rejected_calls(node, command) for node in nodes) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)


def unserve(cluster: RedisCluster, slot: int) -> None:
    """Make no node serve ``slot``: needing full coverage, every node then refuses every key."""
    for node in cluster.running_nodes():
        with sync_client(node) as direct:
            direct.execute_command("CLUSTER DELSLOTS", slot)


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_moved_back_and_forth_waits_for_the_new_owner(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    # Tooling that ends a migration on the source before the target leaves a
    # window in which each names the other as the slot's owner: the source
    # answers MOVED to the target, the still-importing target MOVED back. Followed
    # at once, the redirections ran out in a millisecond; a bounce waits instead.
    async with cluster_client(redis_cluster_factory, auto_pipeline=auto_pipeline) as (cluster, client):
        await client.batch_set({"{pp}:a": 1, "{pp}:b": 2})
        slot = key_slot(b"pp")
        source = cluster.node_for_slot(slot)
        target = start_migration(cluster, slot, ["{pp}:a", "{pp}:b"])
        with sync_client(target) as dst, sync_client(source) as src:
            target_id = dst.execute_command("CLUSTER MYID")
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        reset_stats(cluster)

        def finish() -> None:
            wait_refused("get", target)
            for node in [target, *(p for p in cluster.primaries() if p not in (source, target))]:
                with sync_client(node) as each:
                    each.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)

        finishing = asyncio.create_task(asyncio.to_thread(finish))
        try:
            assert await client.get("{pp}:a", int) == 1
            await client.batch_set({"{pp}:c": 3, "other:pp": 4})
            assert await client.batch_get(["{pp}:a", "{pp}:b", "{pp}:c", "other:pp"], int) == {
                "{pp}:a": 1,
                "{pp}:b": 2,
                "{pp}:c": 3,
                "other:pp": 4,
            }
        finally:
            await finishing
        assert rejected_calls(target, "get") >= 1  # the target sent the read back: it did bounce
        assert cluster.node_for_slot(slot) is target


@pytest.mark.parametrize("auto_pipeline", [True, False])
@pytest.mark.parametrize("variant", ["abort reaches the target first", "migrating before importing"])
async def test_an_ask_answered_by_moved_back_waits_for_the_nodes_to_agree(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool, variant: str
) -> None:
    # The source sends the command on with ASK; the target, which is not importing
    # the slot (yet, or any more), sends it back with MOVED. Each is a bounce.
    async with cluster_client(redis_cluster_factory, auto_pipeline=auto_pipeline) as (cluster, client):
        await client.set("{am}:present", 1)
        slot = key_slot(b"am")
        source = cluster.node_for_slot(slot)
        target = next(p for p in cluster.primaries() if p is not source)
        with sync_client(source) as src, sync_client(target) as dst:
            source_id, target_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
            if variant == "abort reaches the target first":
                mark_migrating(source, target, slot)
                dst.execute_command("CLUSTER SETSLOT", slot, "STABLE")
            else:
                src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        reset_stats(cluster)

        def settle() -> None:
            wait_refused("get", target)
            with sync_client(source) as src, sync_client(target) as dst:
                if variant == "abort reaches the target first":
                    src.execute_command("CLUSTER SETSLOT", slot, "STABLE")
                else:
                    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)

        settling = asyncio.create_task(asyncio.to_thread(settle))
        try:
            with pytest.raises(KeyNotFoundError):  # answered: the key is on neither node
                await client.get("{am}:missing")
            assert await client.get("{am}:present") == 1
        finally:
            await settling
        assert rejected_calls(target, "get") >= 1  # the target sent the read back


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_a_redirection_loop_is_sent_max_redirects_plus_one_times(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    # Two nodes that never agree: the command gives up, having been sent once and
    # redirected max_redirects times, with no pause after the last refusal.
    options = {"auto_pipeline": auto_pipeline, "max_redirects": 3}
    async with cluster_client(redis_cluster_factory, **options) as (cluster, client):
        await client.set("{loop}:k", 1)
        slot = key_slot(b"loop")
        source = cluster.node_for_slot(slot)
        target = start_migration(cluster, slot, ["{loop}:k"])
        with sync_client(target) as dst, sync_client(source) as src:
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", dst.execute_command("CLUSTER MYID"))
        reset_stats(cluster)
        with pytest.raises(BackendError, match="gave up after following 3 redirections"):
            await client.get("{loop}:k")
        assert rejected_calls(source, "get") + rejected_calls(target, "get") == 4


async def test_a_transaction_on_keys_split_by_a_migration_is_a_conflict(
    redis_cluster_factory: ClusterFactory,
) -> None:
    # WATCH of keys on both sides of a migrating slot is refused with TRYAGAIN:
    # nothing was applied, so it is a conflict to retry, like ASK and MOVED.
    async with cluster_client(redis_cluster_factory) as (cluster, client):
        await client.batch_set({"{split}:a": 1, "{split}:b": 2})
        slot = key_slot(b"split")
        target = start_migration(cluster, slot, ["{split}:b"])
        for watch in (["{split}:a", "{split}:b"], ["{split}:b"], []):
            with pytest.raises(TransactionConflictError, match="migrating"):
                async with client.transaction(watch=watch) as tx:
                    tx.set("{split}:b", 3)
        with sync_client(target) as dst:
            pipe = dst.pipeline(transaction=False)
            pipe.execute_command("ASKING")  # the slot is still the source's
            pipe.get("{split}:b")
            assert pipe.execute() == [True, b"2"]


async def test_a_transaction_on_an_unserved_slot_is_unavailable(
    redis_cluster_factory: ClusterFactory,
) -> None:
    # CLUSTERDOWN: an outage that passes, as for any other command, not a server error.
    async with cluster_client(redis_cluster_factory, max_retries=0) as (cluster, client):
        await client.set("{down}:a", 1)
        slot = key_slot(b"down")
        with sync_client(cluster.node_for_slot(slot)) as owner:
            owner.execute_command("CLUSTER DELSLOTS", slot)
        for watch in (["{down}:a"], []):
            with pytest.raises(BackendUnavailableError, match="the cluster is down"):
                async with client.transaction(watch=watch) as tx:
                    tx.set("{down}:a", 2)


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_a_batch_refused_with_clusterdown_is_sent_again(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    # CLUSTERDOWN applied nothing: a batch, reads and writes alike, is sent again
    # once the layout is read anew, as a single-key command is, not failed at once.
    options = {"auto_pipeline": auto_pipeline, "max_retries": 20}
    async with cluster_client(redis_cluster_factory, **options) as (cluster, client):
        await client.batch_set({"down:k": 1, "unserved": 2})
        slot = key_slot(b"unserved")
        owner = cluster.node_for_slot(slot)
        unserve(cluster, slot)
        reset_stats(cluster)

        def serve_again() -> None:
            wait_refused("mget", *cluster.primaries())
            with sync_client(owner) as direct:
                direct.execute_command("CLUSTER ADDSLOTS", slot)

        serving = asyncio.create_task(asyncio.to_thread(serve_again))
        try:
            assert await client.batch_get(["down:k", "unserved"], int) == {"down:k": 1, "unserved": 2}
            await client.batch_set({"down:k": 3, "unserved": 4})
            assert await client.batch_get(["down:k", "unserved"], int) == {"down:k": 3, "unserved": 4}
        finally:
            await serving
        assert any(rejected_calls(p, "mget") for p in cluster.primaries())  # it was refused first


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_a_clusterdown_retry_sends_only_what_is_still_refused(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    # Nodes come back one at a time: a command a node applied on one try is not sent
    # again on the next, with the rest, or a delete would count its key twice as gone.
    options = {"auto_pipeline": auto_pipeline, "max_retries": 40}
    async with cluster_client(redis_cluster_factory, **options) as (cluster, client):
        first, second, third = cluster.primaries()
        keys: dict[int, str] = {}
        for n in range(200):
            owner = cluster.node_for_slot(key_slot(f"cd:{n}".encode()))
            if owner is not third:
                keys.setdefault(owner.port, f"cd:{n}")
        await client.batch_set(dict.fromkeys(keys.values(), 1))
        slot = key_slot(b"nowhere")
        unserve(cluster, slot)
        reset_stats(cluster)

        def serve(node: RedisServer) -> None:  # a node that needs no full coverage serves again
            with sync_client(node) as direct:
                direct.config_set("cluster-require-full-coverage", "no")

        def one_then_the_other() -> None:
            wait_refused("unlink", first)
            serve(first)
            wait_refused("unlink", second, at_least=3)  # two more tries refused while the first served
            serve(second)

        recovering = asyncio.create_task(asyncio.to_thread(one_then_the_other))
        try:
            assert await client.batch_delete(list(keys.values())) == 2
        finally:
            await recovering
        assert rejected_calls(second, "unlink") >= 3
        assert command_calls(first)["unlink"] == 1  # applied once, not sent again


async def test_a_transaction_read_after_its_slot_moved_is_a_conflict(
    redis_cluster_factory: ClusterFactory,
) -> None:
    # The watching connection stays on the node the slot left, which answers the
    # read with MOVED: as at WATCH and EXEC, that is a conflict, and the retry
    # goes to the slot's new owner.
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    async with Client(RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))) as client:
        await client.set("{mv}:n", 1)
        slot = key_slot(b"mv")
        source = cluster.node_for_slot(slot)
        target = next(p for p in cluster.primaries() if p is not source)
        with pytest.raises(TransactionConflictError, match="moved"):
            async with client.transaction(watch=["{mv}:n"]) as tx:
                assert await asyncio.to_thread(migrate_slot, cluster, slot, target, 0) == 1
                await tx.get("{mv}:n")
        async with client.transaction(watch=["{mv}:n"]) as tx:
            tx.set("{mv}:n", await tx.get("{mv}:n", int) + 1)
        with sync_client(target) as direct:
            assert direct.get("{mv}:n") == b"2"


def wait_joined(cluster: RedisCluster, newcomer: RedisServer) -> None:
    """Wait until ``newcomer`` and the primaries know each other and each sees the cluster as ok."""
    deadline = time.monotonic() + 30
    for node in (newcomer, *cluster.primaries()):
        with sync_client(node) as direct:
            ask: Callable[..., Any] = direct.execute_command  # untyped in redis-py

            def problem(ask: Callable[..., Any] = ask, port: int = node.port) -> str | None:
                known = len(ask("CLUSTER NODES"))
                state = ask("CLUSTER INFO")["cluster_state"]
                if known == len(cluster.nodes) + 1 and state == "ok":
                    return None
                return f"{port}: {known} nodes known, cluster {state}"

            poll(problem, deadline)


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_calls_follow_ask_to_a_node_that_serves_no_slot_yet(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    # Scaling out: a new, empty node joins and the first slot migrates to it. The
    # layout does not list a node without slots, so an ASK must be followed by
    # its address alone.
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    config = {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf", "cluster-node-timeout": "5000"}
    newcomer = RedisServer(cluster.binary, extra_config=config).start()
    options = RedisClusterOptions(addrs=cluster.addrs, auto_pipeline=auto_pipeline)
    try:
        seed = cluster.primaries()[0]
        with sync_client(seed) as direct:
            direct.execute_command("CLUSTER MEET", newcomer.host, newcomer.port)
        await asyncio.to_thread(wait_joined, cluster, newcomer)
        async with Client(RedisClusterBackend(options)) as client:
            await client.set("{grow}:old", "before")
        slot = key_slot(b"grow")
        source = cluster.node_for_slot(slot)
        with sync_client(source) as src, sync_client(newcomer) as new:
            source_id, new_id = src.execute_command("CLUSTER MYID"), new.execute_command("CLUSTER MYID")
            new.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", new_id)
            src.execute_command("MIGRATE", newcomer.host, newcomer.port, "{grow}:old", 0, 5000)
        calls: list[Callable[[Client], Awaitable[Any]]] = [
            lambda client: client.get("{grow}:old"),  # on the newcomer now: ASK
            lambda client: client.set("{grow}:new", "during"),
            lambda client: client.batch_set({"{grow}:a": 1, "{grow}:b": 2}),
            lambda client: client.batch_get(["{grow}:old", "{grow}:a"]),
            lambda client: client.get_or_set("{grow}:filled", lambda: 5),  # its lease too
        ]
        results = []
        for call in calls:  # each on a new client: the newcomer is unknown to it
            async with Client(RedisClusterBackend(options)) as client:
                results.append(await asyncio.wait_for(call(client), 30))
        assert results == ["before", None, None, {"{grow}:old": "before", "{grow}:a": 1}, 5]
        async with Client(RedisClusterBackend(options)) as client:
            assert await client.ttl("{grow}:new") is None
            assert await client.get("{grow}:b") == 2
        with sync_client(newcomer) as new:
            assert new.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 5  # the lease is gone
    finally:
        newcomer.stop()


async def test_closing_while_a_call_relearns_the_layout_leaves_no_connection_open(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A call that timed out learns the layout again through redis-py's connections;
    # if the backend closes meanwhile, what that lookup opens is closed too.
    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1], read_timeout=0.3))
    await backend.set("relearn", b"v")
    entered, release = asyncio.Event(), asyncio.Event()
    real_relearn = backend._relearn

    async def held_relearn() -> set[str]:
        entered.set()
        await release.wait()
        return await real_relearn()

    monkeypatch.setattr(backend._node_conns, "_refresh", held_relearn)
    owner = redis_cluster.node_for_slot(key_slot(b"relearn"))
    with sync_client(owner) as direct:
        direct.execute_command("CLIENT PAUSE", 3000, "ALL")  # far past read_timeout, on a slow machine too
        try:
            call = asyncio.ensure_future(backend.get("relearn"))
            await asyncio.wait_for(entered.wait(), 5)
            await backend.close()
            release.set()
            with pytest.raises(BackendUnavailableError, match="closed"):
                await asyncio.wait_for(call, 10)
        finally:
            direct.execute_command("CLIENT UNPAUSE")
    nodes = backend.cluster.nodes_manager
    every_node = [*nodes.nodes_cache.values(), *nodes.startup_nodes.values()]
    assert not [c for node in every_node for c in node._connections if c.is_connected]


async def test_batches_during_slot_migration(redis_cluster_factory: ClusterFactory) -> None:
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))
    async with Client(backend) as client:
        tagged = {f"{{mig}}:{i}": i for i in range(200)}  # one slot, moved mid-test
        others = {f"other:{i}": i for i in range(100)}
        await client.batch_set(tagged | others)
        slot = key_slot(b"mig")
        source = cluster.node_for_slot(slot)
        target = next(p for p in cluster.primaries() if p is not source)

        migration = asyncio.create_task(asyncio.to_thread(migrate_slot, cluster, slot, target, 0.02))
        rounds = 0
        try:
            while not migration.done() or rounds < 3:
                rounds += 1
                assert await client.batch_get(list(tagged | others), int) == tagged | others
                assert await client.has_keys(list(tagged))
                await client.batch_set({"{mig}:new": rounds, "{mig}:0": 0, "other:0": 0})
                assert await client.get("{mig}:new") == rounds
        finally:
            moved = await asyncio.wait_for(migration, 120)
        assert moved == len(tagged) + 1
        assert cluster.node_for_slot(slot) is target
        assert await client.batch_get(list(tagged), int) == tagged
        assert await client.batch_delete(list(tagged)) == len(tagged)
        with sync_client(target) as direct:
            assert direct.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1  # only {mig}:new left


# --------------------------------------------------------------------------- the in-flight bound


async def test_health_and_leases_stay_within_the_pool_bound(redis_cluster: RedisCluster) -> None:
    """Calls that bypassed the in-flight bound overflowed redis-py's node pools, which fail at once."""
    options = RedisClusterOptions(addrs=redis_cluster.addrs, pool_size=4)
    async with Client(RedisClusterBackend(options)) as client:
        errors: Counter[str] = Counter()
        stop = time.monotonic() + 2

        async def writer(i: int) -> None:  # pool_size calls in flight on one node, all the time
            while time.monotonic() < stop:
                try:
                    await client.set(f"{{bound}}:k{i}", i)
                except KivigoError as exc:
                    errors[f"set: {type(exc).__name__}"] += 1

        async def prober() -> None:
            while time.monotonic() < stop:
                try:
                    await client.health()
                    await client.get_or_set(f"{{bound}}:fill:{random.random()}", lambda: 1, ttl=5)
                except KivigoError as exc:
                    errors[f"probe: {type(exc).__name__}: {exc}"] += 1
                await asyncio.sleep(0.01)

        await asyncio.wait_for(asyncio.gather(prober(), *(writer(i) for i in range(4))), 60)
        assert not errors


async def test_closing_after_a_lost_node_closes_every_connection(
    redis_cluster_factory: ClusterFactory,
) -> None:
    # After a lost connection redis-py marks the layout to be read again, and its
    # aclose() then takes the client for one that never connected: the connections
    # to the other nodes must be closed all the same.
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs, max_retries=0, dial_timeout=1))
    nodes = backend.cluster.nodes_manager

    def still_open() -> list[Any]:
        every_node = [*nodes.nodes_cache.values(), *nodes.startup_nodes.values()]
        return [c for node in every_node for c in node._connections if c.is_connected]

    try:
        await backend.health()
        cluster.primaries()[0].kill()
        with pytest.raises(BackendUnavailableError):
            await backend.health()
        assert still_open()  # to the primaries that answered
    finally:
        await backend.close()
    assert not still_open()


async def test_cluster_lease_after_close_is_refused(redis_cluster: RedisCluster) -> None:
    from kivigo_async.backends.redis._lease import RedisLease

    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs))
    await backend.connect()
    await backend.close()
    with pytest.raises(BackendUnavailableError, match="closed"):
        await RedisLease(backend).acquire_lease("kivigo:lease:{x}", b"token", 10_000)
    # Nothing was opened again (closed connection objects may stay listed).
    assert not [c for node in backend.cluster.get_nodes() for c in node._connections if c.is_connected]


async def test_a_call_waiting_for_its_place_when_the_backend_closes_opens_nothing(
    redis_cluster: RedisCluster,
) -> None:
    # With every in-flight place taken, a call waits; if the backend closes
    # meanwhile, the call must not go on to open connections after the close.
    options = RedisClusterOptions(addrs=redis_cluster.addrs, pool_size=1, auto_pipeline=False)
    backend = RedisClusterBackend(options)
    await backend.connect()
    await backend._in_flight.acquire()  # the one place, as a call in flight would hold it
    waiting = asyncio.ensure_future(backend.get("late"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await backend.close()
    backend._in_flight.release()
    with pytest.raises(BackendUnavailableError, match="closed"):
        await waiting
    assert not [c for node in backend.cluster.get_nodes() for c in node._connections if c.is_connected]


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_calls_in_flight_when_the_backend_closes_leave_no_connection_open(
    redis_cluster: RedisCluster, auto_pipeline: bool
) -> None:
    # redis-py reconnects on use: a call under way when close() runs may connect
    # again after it. Each round closes at a different point of the calls' progress.
    options = RedisClusterOptions(addrs=redis_cluster.addrs, pool_size=50, auto_pipeline=auto_pipeline)
    for turn in range(8):
        backend = RedisClusterBackend(options)
        await backend.connect()
        calls = [asyncio.ensure_future(backend.get(f"late:{i}")) for i in range(40)]
        for _ in range(turn):
            await asyncio.sleep(0)
        await backend.close()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
        assert all(o is None or isinstance(o, BackendUnavailableError) for o in outcomes), outcomes
        still_open = [c for node in backend.cluster.get_nodes() for c in node._connections if c.is_connected]
        assert not still_open, f"turn {turn}: {len(still_open)} connections open after close"
        assert not backend._node_conns._conns


@pytest.mark.parametrize("turns", [0, 1, 3])
async def test_a_cancelled_close_still_closes_every_connection(
    redis_cluster: RedisCluster, turns: int
) -> None:
    name = f"cluster-close-{turns}-{time.monotonic_ns()}"
    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1], client_name=name))
    client = Client(backend)
    data = {f"close:{i}": i for i in range(100)}
    await client.batch_set(data)
    assert await client.batch_get(list(data)) == data
    await client.set("close:one", 1)
    async with client.transaction() as tx:  # a standalone client on the slot's owner
        tx.set("close:two", 2)
    await cancel_close_after(client, turns)

    def ours() -> int:
        count = 0
        for node in redis_cluster.running_nodes():
            with sync_client(node) as direct:
                count += sum(1 for c in direct.client_list() if c.get("name") == name)
        return count

    for _ in range(200):  # the servers notice closed sockets within a few ms
        if not ours():
            break
        await asyncio.sleep(0.05)
    assert ours() == 0


async def test_a_failed_close_is_reported_once(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1]))
    await backend.health()
    await check_a_failed_close_is_reported_once(backend, backend._cluster, monkeypatch)


async def test_batch_writes_never_go_to_replicas(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With read_from_replicas, reads take turns with the replicas; writes must go to
    # the primaries (a replica answers MOVED, and the per-slot MSET would be split).
    sent_to: Counter[str] = Counter()
    real_many = MuxConnection.execute_many

    async def count_many(conn: MuxConnection, commands: Any) -> list[Any]:
        sent_to[conn._node] += 1
        return await real_many(conn, commands)

    for primary in redis_cluster.primaries():
        assert wait_replicated(primary) == 1
    for _ in range(150):  # until CLUSTER SLOTS, which the client learns from, lists the replicas
        with sync_client(redis_cluster.primaries()[0]) as direct:
            if all(len(entry) >= 4 for entry in direct.execute_command("CLUSTER SLOTS")):
                break
        await asyncio.sleep(0.2)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs, read_from_replicas=True))
    try:
        client = Client(backend)
        monkeypatch.setattr(MuxConnection, "execute_many", count_many)
        for turn in range(3):
            await client.batch_set({f"replica-write:{i}": turn for i in range(100)})
            assert await client.batch_delete([f"replica-write:{i}" for i in range(0, 100, 2)]) == 50
        primaries = {f"{p.host}:{p.port}" for p in redis_cluster.primaries()}
        assert set(sent_to) <= primaries
        assert sent_to
        # Reads do take turns with the replicas: the layout had them.
        sent_to.clear()
        for _ in range(2):
            await client.batch_get([f"replica-write:{i}" for i in range(100)])
        assert set(sent_to) - primaries
    finally:
        await backend.close()


# --------------------------------------------------------------------------- closing, replies, redirections


async def test_a_transaction_begun_while_the_backend_closes_is_refused(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # begin() on a new backend reads the layout first. A close() meanwhile must leave
    # it nothing to work with: a backend on the slot's node made after the close
    # would write, and nothing would ever close it.
    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1]))
    learned, resume = asyncio.Event(), asyncio.Event()
    real_ready = backend._ready

    async def held_ready() -> None:
        await real_ready()
        learned.set()
        await resume.wait()

    monkeypatch.setattr(backend, "_ready", held_ready)
    begin = asyncio.ensure_future(backend.begin(["{closing-tx}:a"]))
    await asyncio.wait_for(learned.wait(), 10)
    await backend.close()
    resume.set()
    with pytest.raises(BackendUnavailableError, match="closed"):
        await asyncio.wait_for(begin, 10)
    assert not backend._node_backends


async def test_a_key_named_like_a_redirection_is_no_conflict(redis_cluster: RedisCluster) -> None:
    # A redirection is told by the reply, not by the error message, which names the key.
    key = "{tx-name}ASK MOVED"
    with sync_client(redis_cluster.node_for_slot(key_slot(key.encode()))) as direct:
        direct.delete(key)
        direct.hset(key, "field", "value")
    async with Client(RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1]))) as client:
        with pytest.raises(BackendError, match="WRONGTYPE") as raised:
            async with client.transaction(watch=[key]) as tx:
                await tx.get(key)
        assert not isinstance(raised.value, TransactionConflictError)
    with sync_client(redis_cluster.node_for_slot(key_slot(key.encode()))) as direct:
        direct.delete(key)


def start_migration(cluster: RedisCluster, slot: int, keys: list[str]) -> RedisServer:
    """Mark ``slot`` migrating to another primary and move ``keys`` there; returns that primary."""
    source = cluster.node_for_slot(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    mark_migrating(source, target, slot)
    with sync_client(source) as src:
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
    return target


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_batch_get_reads_a_key_of_another_type_as_missing(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    # As on one server (MGET): None, not WRONGTYPE, whether the key is alone in its
    # slot or not, and when the slot's keys are re-sent one by one mid-migration.
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    options = RedisClusterOptions(addrs=cluster.addrs, auto_pipeline=auto_pipeline)
    async with Client(RedisClusterBackend(options)) as client:
        keys = [f"{{typed}}:{i}" for i in range(4)]
        await client.batch_set({key: i for i, key in enumerate(keys)})
        slot = key_slot(b"typed")
        with sync_client(cluster.node_for_slot(slot)) as direct:
            direct.delete(keys[0])
            direct.hset(keys[0], "field", "value")
        assert await client.batch_get(keys[:1]) == {}
        assert await client.batch_get(keys, int) == {key: i for i, key in enumerate(keys) if i}
        start_migration(cluster, slot, keys[2:])  # the slot's MGET is refused with TRYAGAIN
        assert await client.batch_get(keys, int) == {key: i for i, key in enumerate(keys) if i}


async def test_a_batch_write_resent_key_by_key_is_not_sent_again_after_a_lost_reply(
    redis_cluster_factory: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mid-migration a batch is re-sent key by key. A write whose reply was lost may
    # have been applied: as for the batch itself, the caller hears of it, and the
    # write is not sent again (a second UNLINK would count nothing). A read is.
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    backend = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs))
    try:
        keys = [f"{{lost-reply}}:{i}" for i in range(4)]
        await backend.batch_set([(key, b"v") for key in keys])
        start_migration(cluster, key_slot(b"lost-reply"), keys[:2])  # the rest stay on the source
        sent: list[tuple[Any, ...]] = []
        real_send = MuxConnection.send_command

        async def lost_reply(conn: MuxConnection, args: Any) -> Any:
            reply = await real_send(conn, args)
            sent.append(tuple(args))
            if tuple(args[1:]) == (keys[3],) and sent.count(tuple(args)) == 1:
                raise redis.exceptions.ConnectionError(f"connection to {conn._node} lost")
            return reply

        monkeypatch.setattr(MuxConnection, "send_command", lost_reply)
        assert await backend.batch_get(keys) == [b"v"] * 4
        assert sent.count(("MGET", keys[3])) == 2
        with pytest.raises(BackendUnavailableError, match="lost"):
            await backend.batch_delete(keys)
        assert sent.count(("UNLINK", keys[3])) == 1
        monkeypatch.undo()
        assert await backend.exists(keys) == 0  # it was applied
    finally:
        await backend.close()


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_a_redirection_loop_is_followed_max_redirects_times(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    # Each of two nodes takes the other for the slot's owner: the command bounces
    # between them, sent once and once per redirection followed, on either transport.
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    options = RedisClusterOptions(addrs=cluster.addrs, auto_pipeline=auto_pipeline, max_redirects=3)
    key = "{loop}:k"
    slot = key_slot(key.encode())
    owner = cluster.node_for_slot(slot)
    other = next(p for p in cluster.primaries() if p is not owner)
    backend = RedisClusterBackend(options)
    try:
        assert await backend.get(key) is None  # the layout is known
        reset_stats(cluster)
        with sync_client(owner) as direct, sync_client(other) as elsewhere:
            direct.execute_command("CLUSTER SETSLOT", slot, "NODE", elsewhere.execute_command("CLUSTER MYID"))
        with pytest.raises(BackendError, match="redirections"):
            await backend.get(key)
    finally:
        await backend.close()

    def sent(node: RedisServer) -> int:
        with sync_client(node) as direct:
            stats = direct.info("commandstats").get("cmdstat_get", {})
        return int(stats.get("calls", 0)) + int(stats.get("rejected_calls", 0))

    assert sent(owner) + sent(other) == options.max_redirects + 1
