"""Cluster ``batch_get`` of 1,000 keys: kivigo-async against redis-py's per-slot reads.

A local cluster (3 primaries, no replicas) is started from the same server binary
as the other scenarios. 1,000 keys spread over about 970 of its 16,384 hash
slots are read, in one call, three ways:

* kivigo-async: ``Client(RedisClusterBackend).batch_get``: one ``MGET`` per slot,
  sent as one write per node on its multiplexed connection, the nodes in parallel.
* redis-py ``mget_nonatomic``: the same split, through redis-py's cluster pipeline.
* serial ``MGET`` per slot: keys grouped by slot, then one ``MGET`` per slot, one
  after the other, on ``redis.asyncio.cluster.RedisCluster``: what cashews does
  with ``cluster=True``. Every ratio divides by this one.

Each repetition runs the three in a rotating order on each loop; figures are medians
over repetitions, ratios are paired within a repetition (as in the other scenarios).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import gc
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import topology
from scenarios import Measure
from workload import KEY_PREFIX, SESSION, SESSION_JSON

from kivigo_async.testing.topologies import RedisCluster

TITLE = "Cluster batch get of 1,000 keys (3 primaries)"
UNIT = "keys/s"
KEYS = 1000
PRIMARIES = 3
#: Batch calls per measurement: a few seconds per repetition for the slowest approach.
CALLS_FULL = 10
CALLS_QUICK = 2
BASELINE = "serial MGET per slot (cashews' approach)"
#: A load spike must not fail a primary over mid-run (there are no replicas anyway).
NODE_TIMEOUT_MS = 15_000

CASE = "batch_get_1000"


def keys() -> list[str]:
    return [f"{KEY_PREFIX}cluster:{i}" for i in range(KEYS)]


class Approach(abc.ABC):
    name: str
    config: str

    def __init__(self, addrs: Sequence[str]) -> None:
        self.addrs = list(addrs)

    @abc.abstractmethod
    async def setup(self) -> None: ...

    @abc.abstractmethod
    async def teardown(self) -> None: ...

    @abc.abstractmethod
    async def batch_get(self, keys: Sequence[str]) -> list[object]:
        """The values of ``keys``, in order."""

    def expected(self) -> object:
        return SESSION_JSON


class KivigoCluster(Approach):
    name = "kivigo-async"
    config = (
        "Client(RedisClusterBackend(RedisClusterOptions(addrs=...))), default JsonCodec (orjson): "
        "batch_get = one MGET per slot, one write per node on a multiplexed connection, nodes in parallel"
    )

    async def setup(self) -> None:
        from kivigo_async import Client
        from kivigo_async.backends.redis import RedisClusterBackend, RedisClusterOptions

        self.client = Client(RedisClusterBackend(RedisClusterOptions(addrs=self.addrs)))
        await self.client.__aenter__()

    async def teardown(self) -> None:
        await self.client.close()

    async def batch_get(self, keys: Sequence[str]) -> list[object]:
        found = await self.client.batch_get(keys)
        return [found.get(k) for k in keys]

    def expected(self) -> object:
        return SESSION


class _RedisPyCluster(Approach):
    async def setup(self) -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(host, int(port)) for host, port in (a.rsplit(":", 1) for a in self.addrs)]
        self.cluster = RedisCluster(startup_nodes=nodes)
        await self.cluster.initialize()

    async def teardown(self) -> None:
        await self.cluster.aclose()


class NonAtomicMget(_RedisPyCluster):
    name = "redis-py mget_nonatomic"
    config = (
        "redis.asyncio.cluster.RedisCluster(startup_nodes=...) with its defaults; mget_nonatomic: "
        "one MGET per slot through its cluster pipeline; bytes out (no codec)"
    )

    async def batch_get(self, keys: Sequence[str]) -> list[object]:
        values: list[object] = await self.cluster.mget_nonatomic(list(keys))
        return values


class SerialPerSlot(_RedisPyCluster):
    name = BASELINE
    config = (
        "redis.asyncio.cluster.RedisCluster(startup_nodes=...) with its defaults; keys grouped by "
        "keyslot(), then await mget(*keys) per slot, one slot after the other (cashews' get_many "
        "with cluster=True); bytes out (no codec)"
    )

    async def batch_get(self, keys: Sequence[str]) -> list[object]:
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self.cluster.keyslot(key), []).append(key)
        found: dict[str, object] = {}
        for group in groups.values():
            found.update(zip(group, await self.cluster.mget(*group), strict=True))
        return [found[k] for k in keys]


APPROACHES: tuple[type[Approach], ...] = (KivigoCluster, NonAtomicMget, SerialPerSlot)


def start() -> tuple[RedisCluster | None, str]:
    """A running cluster and its description, or None and why there is none."""
    cluster, found = topology.start(
        "cluster",
        lambda binary: RedisCluster(binary, primaries=PRIMARIES, replicas=0, node_timeout_ms=NODE_TIMEOUT_MS),
    )
    if cluster is None:
        return None, found
    return cluster, (
        f"{found.kind} {found.version} cluster, {PRIMARIES} primaries, no replicas, on loopback "
        "(started by the benchmark, no persistence)"
    )


async def _fill(addrs: Sequence[str]) -> None:
    from kivigo_async import Client
    from kivigo_async.backends.redis import RedisClusterBackend, RedisClusterOptions

    # JsonCodec writes plain orjson bytes: the raw redis-py readers get SESSION_JSON.
    async with Client(RedisClusterBackend(RedisClusterOptions(addrs=list(addrs)))) as client:
        await client.batch_set(dict.fromkeys(keys(), SESSION))
        stored = await client.get_raw(keys()[0])
    if stored != SESSION_JSON:
        raise RuntimeError("the stored value is not the session JSON the raw readers expect")


async def _check(approach: Approach) -> None:
    values = await approach.batch_get(keys())
    if values != [approach.expected()] * KEYS:
        raise RuntimeError(f"{approach.name}: batch read did not return the {KEYS} stored values")


def _measure(calls: int) -> Callable[[Approach], Coroutine[Any, Any, Measure]]:
    async def work(approach: Approach) -> Measure:
        batch = keys()
        clock = time.perf_counter_ns
        lat: list[int] = []
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            a = clock()
            await approach.batch_get(batch)
            lat.append(clock() - a)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return Measure(KEYS * calls, wall, cpu, lat)

    return work


def run(
    loops: Sequence[str],
    make_runner: Callable[[str], topology.Runner],
    *,
    quick: bool,
    repeat: int,
    timeout: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Start a cluster, measure every approach on every loop, stop it; the result block.

    The block has the shape of a scenario block of the main report (``title``,
    ``unit``, ``rows``), plus ``baseline``, ``topology``, ``approaches`` (name ->
    configuration) and ``calls``; or only ``skipped`` when no cluster could start.
    """
    cluster, where = start()
    if cluster is None:
        log(f"skipping the cluster scenario: {where}")
        return {"title": TITLE, "skipped": where}
    calls = CALLS_QUICK if quick else CALLS_FULL
    try:
        log(f"cluster: {where} at {','.join(cluster.addrs)}")
        runner = make_runner(loops[0])
        try:
            runner.run(asyncio.wait_for(_fill(cluster.addrs), timeout))
        finally:
            runner.close()
        addrs = cluster.addrs
        reps = topology.measure_all(
            [functools.partial(cls, addrs) for cls in APPROACHES],
            {CASE: _measure(calls)},
            check=_check,
            loops=loops,
            make_runner=make_runner,
            repeat=repeat,
            timeout=timeout,
            log=log,
            label="cluster",
        )
    finally:
        cluster.stop()
    return {
        "title": TITLE,
        "unit": UNIT,
        "baseline": BASELINE,
        "topology": where,
        "keys": KEYS,
        "calls": calls,
        "approaches": {cls.name: cls.config for cls in APPROACHES},
        "rows": topology.rows(reps, CASE, [cls.name for cls in APPROACHES], BASELINE, loops),
    }
