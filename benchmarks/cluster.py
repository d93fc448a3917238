"""Cluster: a 1,000-key ``batch_get``, and the single-key workloads, on a local cluster.

A local cluster (3 primaries, no replicas) is started from the same server binary
as the other scenarios.

**Batch get.** 1,000 keys spread over about 970 of its 16,384 hash slots are read,
in one call, three ways:

* kivigo-async: ``Client(RedisClusterBackend).batch_get``: one ``MGET`` per slot,
  sent as one write per node on its multiplexed connection, the nodes in parallel.
* redis-py ``mget_nonatomic``: the same split, through redis-py's cluster pipeline.
* serial ``MGET`` per slot: keys grouped by slot, then one ``MGET`` per slot, one
  after the other, on ``redis.asyncio.cluster.RedisCluster``: what cashews does
  with ``cluster=True``. Every ratio of this table divides by this one.

**Single keys.** The sequential and the 64-task workloads of the single-server
scenarios (``scenarios.run_seq`` and ``run_mix``), with keys on every node:

* kivigo-async: ``Client(RedisClusterBackend(...))`` with its defaults: single
  commands on one multiplexed connection per node.
* kivigo-async (pool): the same with ``auto_pipeline=False``: through redis-py's
  cluster client and its node pools.
* redis-py: ``redis.asyncio.cluster.RedisCluster`` with its defaults; bytes in,
  bytes out. The ratios of these tables divide by this one.

Each repetition runs the approaches in a rotating order on each loop; figures are
medians over repetitions, ratios are paired within a repetition (as in the other
scenarios).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import gc
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import scenarios
import topology
from adapters import POOL, KivigoAdapter, NoAutoPipeline, RedisPyAdapter, Target
from scenarios import Measure
from workload import KEY_PREFIX, SESSION, SESSION_JSON, Plan, mix_plan

from kivigo_async.testing.topologies import RedisCluster

TITLE = "Cluster (3 primaries)"
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

SINGLE_BASELINE = "redis-py"
SINGLE_CASES = {
    "seq": scenarios.SCENARIOS["seq"][0],
    "mix": scenarios.SCENARIOS["mix"][0],
}


class _Seeds:
    """The cluster's seed nodes: set by the scenario, read by the adapters' setup."""

    def __init__(self, target: Target, addrs: Sequence[str]) -> None:
        self.target = target
        self.addrs = list(addrs)


class KivigoClusterSingle(_Seeds, KivigoAdapter):
    name = "kivigo-async"
    slug = "kivigo-cluster"
    config = (
        f"Client(RedisClusterBackend(RedisClusterOptions(addrs=..., pool_size={POOL}))), default "
        "JsonCodec (orjson): single commands on one multiplexed connection per node"
    )

    @classmethod
    def options_type(cls) -> type[Any]:
        from kivigo_async.backends.redis import RedisClusterOptions

        return RedisClusterOptions

    async def setup(self) -> None:
        from kivigo_async import Client
        from kivigo_async.backends.redis import RedisClusterBackend

        options = self.options_type()(addrs=self.addrs, pool_size=POOL, **self.extra_options())
        self.client = Client(RedisClusterBackend(options))
        await self.client.__aenter__()


class KivigoClusterPool(NoAutoPipeline, KivigoClusterSingle):
    name = "kivigo-async (pool)"
    slug = "kivigo-cluster-pool"
    config = (
        "as kivigo-async, with RedisClusterOptions(auto_pipeline=False): single commands through "
        "redis-py's cluster client and its node pools"
    )


class RedisPyClusterSingle(_Seeds, RedisPyAdapter):
    name = SINGLE_BASELINE
    slug = "redispy-cluster"
    config = (
        "redis.asyncio.cluster.RedisCluster(startup_nodes=...) with its defaults (socket_timeout 5 s, "
        "hiredis when installed); bytes in, bytes out"
    )
    # MSET / MGET of keys on several nodes are refused: prepare() writes key by key.
    has_batch_get = False
    has_batch_set = False

    async def setup(self) -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(host, int(port)) for host, port in (a.rsplit(":", 1) for a in self.addrs)]
        self.redis = RedisCluster(startup_nodes=nodes)
        await self.redis.initialize()


SINGLE_CONTENDERS = (KivigoClusterSingle, KivigoClusterPool, RedisPyClusterSingle)


def _single_cases(
    plan: Plan,
) -> dict[str, Callable[[KivigoAdapter | RedisPyAdapter], Coroutine[Any, Any, Measure]]]:
    return {
        "seq": lambda adapter: scenarios.run_seq(adapter, plan.seq_pairs),
        "mix": lambda adapter: scenarios.run_mix(adapter, mix_plan(plan.mix_tasks, plan.mix_ops_per_task)),
    }


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
    plan: Plan,
    quick: bool,
    repeat: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Start a cluster, measure every approach on every loop, stop it; the result block.

    The block has the shape of a scenario block of the main report (``title``,
    ``unit``, ``rows``: the batch read), plus ``baseline``, ``topology``,
    ``approaches`` (name -> configuration), ``calls`` and ``single`` (the
    single-key workloads: ``baseline``, ``approaches`` and ``cases``, id ->
    ``title``, ``unit`` and ``rows``); or only ``skipped`` when no cluster could start.
    """
    timeout = plan.timeout
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
        measure = functools.partial(
            topology.measure_all,
            loops=loops,
            make_runner=make_runner,
            repeat=repeat,
            timeout=timeout,
            log=log,
        )
        reps = measure(
            [functools.partial(cls, addrs) for cls in APPROACHES],
            {CASE: _measure(calls)},
            check=_check,
            label="cluster",
        )
        target = Target(*_host_port(addrs[0]))
        single = measure(
            [functools.partial(cls, target, addrs) for cls in SINGLE_CONTENDERS],
            _single_cases(plan),
            check=scenarios.prepare,
            label="cluster single keys",
        )
    finally:
        cluster.stop()
    names = [cls.name for cls in SINGLE_CONTENDERS]
    return {
        "title": TITLE,
        "unit": UNIT,
        "baseline": BASELINE,
        "topology": where,
        "keys": KEYS,
        "calls": calls,
        "approaches": {cls.name: cls.config for cls in APPROACHES},
        "rows": topology.rows(reps, CASE, [cls.name for cls in APPROACHES], BASELINE, loops),
        "single": {
            "baseline": SINGLE_BASELINE,
            "approaches": {cls.name: cls.describe() for cls in SINGLE_CONTENDERS},
            "cases": {
                case: {
                    "title": title,
                    "unit": "ops/s",
                    "rows": topology.rows(single, case, names, SINGLE_BASELINE, loops),
                }
                for case, title in SINGLE_CASES.items()
            },
        },
    }


def _host_port(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)
