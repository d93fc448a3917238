"""Sentinel: the sequential and the 64-task workloads through the primary the sentinels name.

A local Sentinel setup (one primary, one replica, three sentinels) is started from
the same server binary as the other scenarios. The workloads are those of the
single-server scenarios (``scenarios.run_seq`` and ``run_mix``), three ways:

* kivigo-async: ``Client(RedisSentinelBackend(...))`` with its defaults: single
  commands share one multiplexed connection to the primary.
* kivigo-async (pool): the same with ``auto_pipeline=False``: a pooled connection per call.
* redis-py: ``redis.asyncio.sentinel.Sentinel(...).master_for(service)`` with its
  defaults; bytes in, bytes out. Every ratio divides by this one.

No failover happens during the run (the primary is not touched and
``down-after-milliseconds`` is generous); what a failover does to calls in flight is
a matter for the tests, not for a benchmark.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import scenarios
import topology
from adapters import POOL, KivigoAdapter, NoAutoPipeline, RedisPyAdapter, Target
from scenarios import Measure
from workload import Plan, mix_plan

from kivigo_async.testing.topologies import RedisSentinel

TITLE = "Sentinel (1 primary, 1 replica, 3 sentinels)"
BASELINE = "redis-py"
#: A load spike on a 2-CPU machine must not look like a dead primary.
DOWN_AFTER_MS = 30_000
CASES = {
    "seq": scenarios.SCENARIOS["seq"][0],
    "mix": scenarios.SCENARIOS["mix"][0],
}


class _Sentinels:
    """Where the sentinels are: set by the scenario, read by the adapters' setup."""

    def __init__(self, target: Target, sentinels: Sequence[str], service: str) -> None:
        self.target = target
        self.sentinels = list(sentinels)
        self.service = service


class KivigoSentinel(_Sentinels, KivigoAdapter):
    name = "kivigo-async"
    slug = "kivigo-sentinel"
    config = (
        f"Client(RedisSentinelBackend(RedisSentinelOptions(sentinels=..., service_name=..., "
        f"pool_size={POOL}))), default JsonCodec (orjson): single commands on one multiplexed connection"
    )

    @classmethod
    def options_type(cls) -> type[Any]:
        from kivigo_async.backends.redis import RedisSentinelOptions

        return RedisSentinelOptions

    async def setup(self) -> None:
        from kivigo_async import Client
        from kivigo_async.backends.redis import RedisSentinelBackend

        options = self.options_type()(
            sentinels=self.sentinels, service_name=self.service, pool_size=POOL, **self.extra_options()
        )
        self.client = Client(RedisSentinelBackend(options))
        await self.client.__aenter__()


class KivigoSentinelPool(NoAutoPipeline, KivigoSentinel):
    name = "kivigo-async (pool)"
    slug = "kivigo-sentinel-pool"
    config = "as kivigo-async, with RedisSentinelOptions(auto_pipeline=False): a pooled connection per call"


class RedisPySentinel(_Sentinels, RedisPyAdapter):
    name = BASELINE
    slug = "redispy-sentinel"
    config = (
        "redis.asyncio.sentinel.Sentinel([(host, port), ...]).master_for(service) with its defaults "
        "(socket_timeout 5 s on the primary's connections, hiredis when installed); bytes in, bytes out"
    )

    async def setup(self) -> None:
        from redis.asyncio.sentinel import Sentinel

        pairs = [(host, int(port)) for host, port in (a.rsplit(":", 1) for a in self.sentinels)]
        self.sentinel = Sentinel(pairs)
        self.redis = self.sentinel.master_for(self.service)
        await self.redis.ping()

    async def teardown(self) -> None:
        await self.redis.aclose()
        for node in self.sentinel.sentinels:
            await node.aclose()


CONTENDERS = (KivigoSentinel, KivigoSentinelPool, RedisPySentinel)


def start() -> tuple[RedisSentinel | None, str]:
    """A running Sentinel setup and its description, or None and why there is none."""
    setup, found = topology.start(
        "Sentinel setup",
        lambda binary: RedisSentinel(binary, replicas=1, sentinels=3, down_after_ms=DOWN_AFTER_MS),
    )
    if setup is None:
        return None, found
    return setup, (
        f"{found.kind} {found.version}: 1 primary, 1 replica, 3 sentinels, on loopback "
        "(started by the benchmark, no persistence)"
    )


def _cases(plan: Plan) -> dict[str, Callable[[KivigoAdapter | RedisPyAdapter], Coroutine[Any, Any, Measure]]]:
    return {
        "seq": lambda adapter: scenarios.run_seq(adapter, plan.seq_pairs),
        "mix": lambda adapter: scenarios.run_mix(adapter, mix_plan(plan.mix_tasks, plan.mix_ops_per_task)),
    }


def run(
    loops: Sequence[str],
    make_runner: Callable[[str], topology.Runner],
    *,
    plan: Plan,
    repeat: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Start a Sentinel setup, measure every contender on every loop, stop it; the result block.

    The block holds ``title``, ``baseline``, ``topology``, ``approaches`` (name ->
    configuration) and ``cases`` (id -> ``title``, ``unit`` and ``rows``, as a
    scenario block of the main report); or only ``skipped`` when nothing could start.
    """
    setup, where = start()
    if setup is None:
        log(f"skipping the Sentinel scenario: {where}")
        return {"title": TITLE, "skipped": where}
    try:
        log(f"sentinel: {where} at {','.join(setup.sentinel_addrs)}")
        primary = setup.primary()
        target = Target(primary.host, primary.port)
        reps = topology.measure_all(
            [functools.partial(cls, target, setup.sentinel_addrs, setup.service_name) for cls in CONTENDERS],
            _cases(plan),
            check=scenarios.prepare,
            loops=loops,
            make_runner=make_runner,
            repeat=repeat,
            timeout=plan.timeout,
            log=log,
            label="sentinel",
        )
    finally:
        setup.stop()
    names = [cls.name for cls in CONTENDERS]
    return {
        "title": TITLE,
        "baseline": BASELINE,
        "topology": where,
        "approaches": {cls.name: cls.describe() for cls in CONTENDERS},
        "cases": {
            case: {"title": title, "unit": "ops/s", "rows": topology.rows(reps, case, names, BASELINE, loops)}
            for case, title in CASES.items()
        },
    }
