"""A cluster primary is killed while a read/write loop runs against the cluster.

Calls made during the failover fail fast with BackendUnavailableError or
OperationTimeoutError (never another exception, never a hang past what the
options allow); once a replica is promoted, the same client carries on, and every
write it acknowledged reads back, except those the dead primary acknowledged
and never replicated (Redis replication is asynchronous).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from kivigo_async import Client
from kivigo_async.backends.redis import RedisClusterBackend, RedisClusterOptions
from kivigo_async.backends.redis.cluster import _torn_down
from kivigo_async.errors import BackendUnavailableError, OperationTimeoutError
from kivigo_async.testing.pytest_plugin import ClusterFactory
from kivigo_async.testing.servers import RedisServer
from kivigo_async.testing.topologies import RedisCluster, wait_replicated

pytestmark = [pytest.mark.server, pytest.mark.timeout(240)]

TASKS = 8
DIAL_TIMEOUT = 1.0
READ_TIMEOUT = 2.0
MAX_RETRIES = 2
#: No call may take longer: every attempt may spend a dial and a read timeout, plus a
#: generous allowance for backoff, layout re-reads and a loaded 2-core machine.
CALL_BOUND = (MAX_RETRIES + 1) * (DIAL_TIMEOUT + READ_TIMEOUT) + 5.0
#: Past this a call counts as hung; the loop gives up on it rather than hang the test.
HANG_LIMIT = 3 * CALL_BOUND
#: How long the cluster may take to promote the replica (node timeout is 1 s).
PROMOTION_LIMIT = 30.0
#: How long after the promotion newly started calls may still fail: every node learns
#: the new layout, and the client with it, on a loaded 2-core machine.
SETTLE_GRACE = 3.0
ALLOWED_ERRORS = (BackendUnavailableError, OperationTimeoutError)


@dataclass
class Call:
    task: int
    op: str
    keys: list[str]
    started: float
    duration: float
    error: BaseException | None = None
    values: list[Any] = field(default_factory=list)


@dataclass
class Journal:
    calls: list[Call] = field(default_factory=list)

    def failures(self) -> list[Call]:
        return [c for c in self.calls if c.error is not None]

    def acknowledged_writes(self) -> dict[str, tuple[str, float]]:
        """Each key whose write succeeded -> (value written, when the call started)."""
        acked: dict[str, tuple[str, float]] = {}
        for c in self.calls:
            if c.error is None and c.op in ("set", "batch_set"):
                for key in c.keys:
                    acked[key] = (value_of(key), c.started)
        return acked


def sync_client(node: RedisServer) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port, socket_timeout=5)


def value_of(key: str) -> str:
    return f"v={key}"


def slots_of(cluster: RedisCluster, node: RedisServer) -> set[int]:
    """The hash slots ``node`` serves now."""
    slots: set[int] = set()
    for info in cluster.topology():
        if info.server is node:
            for part in info.slots:
                if not part.startswith("["):
                    low, _, high = part.partition("-")
                    slots.update(range(int(low), int(high or low) + 1))
    return slots


async def timed(
    journal: Journal, task: int, op: str, keys: list[str], call: Callable[[], Awaitable[Any]]
) -> Call:
    """Run one call, recording its outcome and duration; a hung call is cut off and recorded."""
    started = time.monotonic()
    record = Call(task, op, keys, started, 0.0)
    try:
        result = await asyncio.wait_for(call(), HANG_LIMIT)
        if op == "get":
            record.values = [result]
        elif op == "batch_get":
            record.values = [result.get(k) for k in keys]
    except Exception as exc:  # every exception is recorded and judged by the test
        record.error = exc
    record.duration = time.monotonic() - started
    journal.calls.append(record)
    return record


async def worker(client: Client, task: int, journal: Journal, stop: asyncio.Event) -> None:
    """Write fresh keys (never overwritten) and read them back, singly and in batches."""
    i = 0
    while not stop.is_set():
        i += 1
        if i % 4:
            key = f"loop:{task}:{i}"
            put = await timed(journal, task, "set", [key], functools.partial(client.set, key, value_of(key)))
            if put.error is None:
                await timed(journal, task, "get", [key], functools.partial(client.get, key, default=None))
        else:
            keys = [f"batch:{task}:{i}:{j}" for j in range(16)]  # many slots, every node
            items = {k: value_of(k) for k in keys}
            put = await timed(journal, task, "batch_set", keys, functools.partial(client.batch_set, items))
            if put.error is None:
                await timed(journal, task, "batch_get", keys, functools.partial(client.batch_get, keys))
        await asyncio.sleep(0.005)  # a busy but not saturating loop on a shared machine


@pytest.mark.parametrize("auto_pipeline", [True, False])
async def test_primary_killed_during_read_write_loop(
    redis_cluster_factory: ClusterFactory, auto_pipeline: bool
) -> None:
    cluster = redis_cluster_factory(node_timeout_ms=1000)
    victim = cluster.primaries()[0]
    survivor = next(node for node in cluster.primaries() if node is not victim)
    victim_slots = slots_of(cluster, victim)
    assert victim_slots
    backend = RedisClusterBackend(
        RedisClusterOptions(
            addrs=cluster.addrs,
            dial_timeout=DIAL_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_retries=MAX_RETRIES,
            auto_pipeline=auto_pipeline,
        )
    )
    journal = Journal()
    stop = asyncio.Event()
    async with Client(backend) as client:
        workers = [asyncio.create_task(worker(client, t, journal, stop)) for t in range(TASKS)]
        try:
            await asyncio.sleep(1.5)
            assert journal.calls
            assert not journal.failures(), journal.failures()[:3]

            await asyncio.to_thread(victim.kill)
            killed_at = time.monotonic()
            # The replica is promoted once the others agree the primary failed.
            await asyncio.to_thread(cluster.wait_ready, PROMOTION_LIMIT, expected_nodes=5)
            promoted_at = time.monotonic()
            assert victim not in cluster.primaries()
            new_owner = cluster.node_for_slot(min(victim_slots))
            assert new_owner is not victim
            assert new_owner is not survivor
            # The same client carries on: writes to the lost slots succeed again.
            deadline = promoted_at + PROMOTION_LIMIT
            while True:
                recovered = [
                    c
                    for c in journal.calls
                    if c.error is None
                    and c.op == "set"
                    and c.started > killed_at
                    and key_slot(c.keys[0].encode()) in victim_slots
                ]
                if recovered:
                    break
                assert time.monotonic() < deadline, "no write to the failed primary's slots succeeded"
                await asyncio.sleep(0.1)
            recovered_at = min(c.started + c.duration for c in recovered)
            # Keep writing after the recovery, and well past the grace the check below gives.
            await asyncio.sleep(max(recovered_at, promoted_at + SETTLE_GRACE) + 3.0 - time.monotonic())
        finally:
            stop.set()
            await asyncio.gather(*workers)

        # Every call failed fast and with one of our errors; none hung.
        failures = journal.failures()
        slowest = max(c.duration for c in journal.calls)
        kinds = Counter(
            f"{type(c.error).__name__}({type(c.error and c.error.__cause__).__name__})" for c in failures
        )
        last_failure = max((c.started + c.duration for c in failures), default=killed_at)
        summary = (
            f"{len(journal.calls)} calls, {len(failures)} failed {dict(kinds)}, slowest {slowest:.2f} s; "
            f"after the kill: replica promoted {promoted_at - killed_at:.1f} s, first write to its slots "
            f"{recovered_at - killed_at:.1f} s, last failure {last_failure - killed_at:.1f} s"
        )
        print(summary)
        strays = [c.error for c in failures if not isinstance(c.error, ALLOWED_ERRORS)]
        assert not strays, f"{summary}; unexpected error:\n" + "".join(traceback.format_exception(strays[0]))
        assert slowest <= CALL_BOUND, summary
        assert failures, f"{summary}: the kill went unnoticed, so nothing was tested"
        # Failures are confined to the failover: once every node agrees on the new
        # layout (plus a grace for the client to learn it), every call succeeds.
        late = [c for c in failures if c.started > promoted_at + SETTLE_GRACE]
        assert not late, f"{summary}; failures after the promotion: {[(c.op, c.error) for c in late[:3]]}"
        # Every task made progress after the recovery.
        assert {c.task for c in journal.calls if c.error is None and c.started > recovered_at} == set(
            range(TASKS)
        )

        # Reads made during the loop saw what was written (a key written before the
        # kill in the lost slots may have been lost: asynchronous replication).
        acked = journal.acknowledged_writes()
        for c in journal.calls:
            if c.error is None and c.op in ("get", "batch_get"):
                for key, value in zip(c.keys, c.values, strict=True):
                    lost_ok = key_slot(key.encode()) in victim_slots and acked[key][1] < killed_at
                    assert value == value_of(key) or (lost_ok and value is None), (key, value)

        # Every write acknowledged after the kill, and every one before it outside
        # the failed primary's slots, reads back with the same client.
        must_survive = [
            key
            for key, (_, started) in acked.items()
            if started > killed_at or key_slot(key.encode()) not in victim_slots
        ]
        assert len(must_survive) > 100
        stored = await client.batch_get(must_survive)
        missing = [key for key in must_survive if stored.get(key) != value_of(key)]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


async def test_connection_reset_under_a_call(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's cluster client closes every connection after a node failure, even those in use.

    A call caught sending on one of them at that moment gets BackendUnavailableError
    (redis-py itself raises AttributeError there), and the next call reconnects.
    """
    backend = RedisClusterBackend(RedisClusterOptions(addrs=redis_cluster.addrs[:1], auto_pipeline=False))
    keys = [f"{{reset}}:{i}" for i in range(50)]
    # Without auto_pipeline, single-key commands use redis-py's node connections.
    # Batches are not among the calls: they go out on the nodes' multiplexed
    # connections, which that reset does not touch, and transactions on a
    # standalone client per node.
    calls: list[tuple[str, Callable[[Client], Awaitable[Any]]]] = [
        ("set", lambda client: client.set("reset:one", 1)),
        ("expire", lambda client: client.expire("reset:warm-up", 60)),
    ]
    real_send = AbstractConnection._send_packed_command
    reset: list[AbstractConnection] = []

    async def reset_then_send(conn: AbstractConnection, command: Any) -> None:
        if not reset:
            reset.append(conn)
            # What redis-py's retry does when another call hits a failed node.
            await backend.cluster.aclose()
        await real_send(conn, command)

    async with Client(backend) as client:
        await client.set("reset:warm-up", 0)
        for name, call in calls:
            reset.clear()
            monkeypatch.setattr(AbstractConnection, "_send_packed_command", reset_then_send)
            with pytest.raises(BackendUnavailableError, match="closed while in use"):
                await call(client)
            monkeypatch.undo()
            assert reset, f"{name}: the reset never ran"
            await call(client)  # the same client reconnects by itself
        assert await client.get("reset:one") == 1
        await client.batch_set(dict.fromkeys(keys, 2))
        assert await client.batch_get(keys) == dict.fromkeys(keys, 2)
        await client.batch_delete([*keys, "reset:one", "reset:warm-up"])


def _defined_in(module: str, source: str) -> Callable[..., object]:
    """Function ``f`` of ``source``, defined "in" ``module``: its frames name that module."""
    namespace: dict[str, Any] = {"__name__": module}
    exec(source, namespace)
    function: Callable[..., object] = namespace["f"]
    return function


def _raised(through: list[str], innermost: Callable[[], object]) -> BaseException:
    """What ``innermost`` raises when called through functions of ``through``, outermost first."""
    call = innermost
    for module in reversed(through):
        call = functools.partial(_defined_in(module, "def f(inner):\n    return inner()\n"), call)
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("nothing was raised")


def test_torn_down_recognises_both_forms_of_the_race_and_nothing_else() -> None:
    reader_gone = "def f():\n    return None.reader\n"
    callback_gone = "def f():\n    write_ready = None\n    return write_ready()\n"
    redis_send = ["redis.asyncio.connection", "asyncio.streams"]
    # Python 3.11: redis-py reads an attribute of its reader or writer, now None.
    assert _torn_down(
        _raised(["redis.asyncio.cluster"], _defined_in("redis.asyncio.connection", reader_gone))
    )
    # Python 3.12+: the transport's writelines() calls the callback close() cleared.
    assert _torn_down(_raised(redis_send, _defined_in("asyncio.selector_events", callback_gone)))
    # Anything else stays a bug to report, not an outage.
    assert not _torn_down(_raised(["app"], _defined_in("asyncio.selector_events", callback_gone)))
    assert not _torn_down(
        _raised(redis_send, _defined_in("asyncio.selector_events", "def f():\n    return 1 + ''\n"))
    )
    assert not _torn_down(_raised(redis_send, _defined_in("redis.asyncio.connection", callback_gone)))
    assert not _torn_down(
        _raised(["redis.asyncio.cluster"], _defined_in("redis.x", "def f():\n    return ''.missing\n"))
    )
    assert not _torn_down(_raised(["redis.asyncio.cluster"], _defined_in("app", reader_gone)))
    assert not _torn_down(ValueError("NoneType"))


async def test_cluster_down_is_backend_unavailable(redis_cluster_factory: ClusterFactory) -> None:
    """No node serving some slot is an outage, like a refused connection, and it passes.

    The node answers ``CLUSTERDOWN``; re-reading the layout then finds a slot that
    no node serves. Both are BackendUnavailableError, and the same client carries on
    once the slot is served again.
    """
    # No failover here: a node timeout a loaded machine cannot set off by mistake.
    cluster = redis_cluster_factory(node_timeout_ms=5000)
    no_retry = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs, max_retries=0))
    retrying = RedisClusterBackend(RedisClusterOptions(addrs=cluster.addrs, max_retries=2))
    slot = key_slot(b"unserved")
    owner = cluster.node_for_slot(slot)
    async with Client(no_retry) as first, Client(retrying) as second:
        for client in (first, second):
            await client.set("down:k", 1)
        # With an unserved slot the cluster stops serving every key (full coverage required).
        for node in cluster.running_nodes():
            with sync_client(node) as direct:
                direct.execute_command("CLUSTER DELSLOTS", slot)
        with pytest.raises(BackendUnavailableError, match="cluster is down"):
            await first.get("down:k")
        for client in (first, second):
            with pytest.raises(BackendUnavailableError, match="down:k"):
                await client.get("down:k")
            with pytest.raises(BackendUnavailableError):
                await client.batch_get(["down:k", "unserved"])

        with sync_client(owner) as direct:
            direct.execute_command("CLUSTER ADDSLOTS", slot)
        await asyncio.to_thread(cluster.wait_ready, PROMOTION_LIMIT)
        for client in (first, second):  # the same clients, no restart
            assert await client.get("down:k") == 1
            assert await client.batch_get(["down:k", "unserved"]) == {"down:k": 1}


async def test_a_primary_that_stops_answering_is_left_for_its_promoted_replica(
    redis_cluster_factory: ClusterFactory,
) -> None:
    # A primary that hangs (not killed: its port still accepts connections) gives a
    # new connection no answer to its login, a dial timeout. The call reads the
    # layout again and retries, reaching the replica promoted in its place.
    cluster = redis_cluster_factory(node_timeout_ms=1000, variant="password")
    victim = cluster.primaries()[0]
    survivor = next(node for node in cluster.primaries() if node is not victim)
    slot = min(slots_of(cluster, victim))
    key = next(f"hang:{i}" for i in range(100_000) if key_slot(f"hang:{i}".encode()) == slot)
    options = RedisClusterOptions(
        addrs=[f"{survivor.host}:{survivor.port}"],
        username=cluster.username,
        password=cluster.password,
        dial_timeout=0.5,
        read_timeout=1.0,
        max_retries=2,
    )
    async with Client(RedisClusterBackend(options)) as client:
        await client.set(key, 1)  # replicated before the hang: the new primary has it
        assert victim.pid is not None
        assert await asyncio.to_thread(wait_replicated, victim) == 1
    async with Client(RedisClusterBackend(options)) as client:
        await client.health()  # the layout is learned; no connection to the victim yet
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + PROMOTION_LIMIT
            # Every node the client may ask for the layout must know of the promotion
            # (on a loaded machine the news reaches them a beat apart).
            others = [node for node in cluster.nodes if node is not victim]
            while any(owner_of(cluster, slot, via=node) in (victim, None) for node in others):
                assert time.monotonic() < deadline, "the replica was not promoted"
                await asyncio.sleep(0.2)
            # The client's layout still names the victim: its first dial times out.
            assert await asyncio.wait_for(client.get(key), 60) == 1
        finally:
            os.kill(victim.pid, signal.SIGCONT)


def owner_of(cluster: RedisCluster, slot: int, *, via: RedisServer) -> RedisServer | None:
    """The primary serving ``slot`` as ``via`` sees it (a hung node is never asked)."""
    for info in cluster.topology(via=via):
        if not info.is_primary or "fail" in info.flags:
            continue
        for part in info.slots:
            if part.startswith("["):
                continue
            low, _, high = part.partition("-")
            if int(low) <= slot <= int(high or low):
                return info.server
    return None
