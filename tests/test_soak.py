"""A bounded soak: about a minute of mixed load at concurrency 64, on both transports at once.

Run with ``nox -s soak`` (``pytest tests/test_soak.py -m soak``); the normal test
run deselects it. It asserts that open connections (``CLIENT LIST``), asyncio
tasks and the process's resident memory do not grow while a few hundred
thousand operations run, some of them cancelled, and that every read returns
its own key's value. ``KIVIGO_SOAK_SECONDS`` and ``KIVIGO_SOAK_OPS`` change the
bounds (defaults: 60 s, 500,000 operations, whichever comes first).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import redis_options

from kivigo_async import Client
from kivigo_async.backends.redis import RedisBackend
from kivigo_async.errors import KeyNotFoundError, TransactionConflictError
from kivigo_async.testing.pytest_plugin import ServerFactory

pytestmark = [pytest.mark.soak, pytest.mark.server]

DURATION = float(os.environ.get("KIVIGO_SOAK_SECONDS", "60"))
MAX_OPS = int(os.environ.get("KIVIGO_SOAK_OPS", "500000"))
CONCURRENCY = 64
POOL_SIZE = 8
KEYS = 10_000
#: Resident memory may grow this much after the warm-up (allocator noise, caches filling).
RSS_GROWTH_BOUND = 32 * 1024 * 1024


def rss_bytes() -> int:
    """The process's resident set size (Linux ``/proc``; 0 elsewhere)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def connections_by_name(control: aioredis.Redis) -> collections.Counter[str]:
    clients: list[dict[str, Any]] = await control.client_list()
    return collections.Counter(str(c.get("name", "")) for c in clients)


async def test_soak_mixed_load_grows_nothing(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory("valkey")
    control = aioredis.Redis(**server.redis_kwargs())  # type: ignore[arg-type]
    run = uuid.uuid4().hex[:8]
    names = {True: f"soak-mux-{run}", False: f"soak-pool-{run}"}
    clients = {
        auto_pipeline: Client(
            RedisBackend(
                redis_options(
                    server, auto_pipeline=auto_pipeline, pool_size=POOL_SIZE, client_name=names[auto_pipeline]
                )
            )
        )
        for auto_pipeline in (True, False)
    }
    ops: collections.Counter[str] = collections.Counter()
    done = 0
    stop = asyncio.Event()
    samples: list[tuple[float, int, int, collections.Counter[str]]] = []

    async def worker(seed: int, client: Client, space: str) -> None:
        nonlocal done
        rng = random.Random(seed)

        def key() -> str:
            return f"{space}:{rng.randrange(KEYS)}"

        def check(k: str, value: Any) -> None:
            assert value is None or value["k"] == k, f"{k!r} read another key's value: {value!r}"

        while not stop.is_set():
            roll = rng.random()
            k = key()
            if roll < 0.40:
                check(k, await client.get(k, default=None))
                ops["get"] += 1
            elif roll < 0.65:
                await client.set(k, {"k": k, "n": done}, ttl=rng.choice([None, 30]))
                ops["set"] += 1
            elif roll < 0.70:
                await client.delete(k)
                ops["delete"] += 1
            elif roll < 0.78:
                wanted = [key() for _ in range(8)]
                for found_key, value in (await client.batch_get(wanted)).items():
                    check(found_key, value)
                ops["batch_get"] += 1
            elif roll < 0.83:
                batch = [key() for _ in range(8)]
                await client.batch_set({b: {"k": b, "n": done} for b in batch}, ttl=rng.choice([None, 30]))
                ops["batch_set"] += 1
            elif roll < 0.88:
                await client.has_keys([k, key()])
                ops["has_keys"] += 1
            elif roll < 0.92:
                if await client.expire(k, 30):
                    with contextlib.suppress(KeyNotFoundError):  # another worker may delete it meanwhile
                        await client.ttl(k) if rng.random() < 0.5 else await client.persist(k)
                ops["ttl"] += 1
            elif roll < 0.94:
                try:
                    async with client.transaction(watch=[k]) as tx:
                        check(k, await tx.get(k, default=None))
                        tx.set(k, {"k": k, "n": done})
                except TransactionConflictError:
                    pass
                ops["transaction"] += 1
            elif roll < 0.99:
                try:  # cancelled at a random point, mostly before its reply
                    await asyncio.wait_for(client.get(k, default=None), rng.uniform(0, 0.002))
                except asyncio.TimeoutError:  # not TimeoutError before Python 3.11
                    ops["cancelled"] += 1
                else:
                    ops["get"] += 1
            else:
                await client.list(f"{space}:999")  # a SCAN through the whole keyspace
                ops["list"] += 1
            done += 1
            if done >= MAX_OPS:
                stop.set()

    async def sample() -> None:
        samples.append(
            (time.monotonic(), rss_bytes(), len(asyncio.all_tasks()), await connections_by_name(control))
        )

    try:
        for client in clients.values():
            await client.__aenter__()
        tasks_before = asyncio.all_tasks()
        start = time.monotonic()
        workers = [
            asyncio.create_task(worker(i, clients[i % 2 == 0], "mux" if i % 2 == 0 else "pool"))
            for i in range(CONCURRENCY)
        ]
        warm_up = min(10.0, DURATION / 6)
        await asyncio.sleep(warm_up)
        gc.collect()
        await sample()  # the baseline, once pools and caches are warm
        while not stop.is_set() and time.monotonic() - start < DURATION:
            await asyncio.sleep(min(5.0, max(0.0, DURATION - (time.monotonic() - start))))
            await sample()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 60)
        elapsed = time.monotonic() - start
        gc.collect()
        await sample()

        _, base_rss, base_tasks, base_conns = samples[0]
        _, end_rss, end_tasks, _ = samples[-1]
        for _, _, task_count, conns in samples:
            # One multiplexed connection + the pool, never more, at every sample.
            assert conns[names[True]] <= 1 + POOL_SIZE, conns
            assert conns[names[False]] <= POOL_SIZE, conns
            # Each worker, and the task of a call it bounds with wait_for: bounded, not growing.
            assert task_count <= 2 * CONCURRENCY + 8, (task_count, base_tasks)
        assert asyncio.all_tasks() - tasks_before - {asyncio.current_task()} == set(), "tasks leaked"
        assert end_tasks <= base_tasks - CONCURRENCY + 1
        growth = end_rss - base_rss
        assert growth <= RSS_GROWTH_BOUND, f"resident memory grew by {growth / 2**20:.1f} MiB"
        assert ops["get"] > 0
        assert ops["cancelled"] > 0
        peak_conns = {n: max(s[3][n] for s in samples) for n in names.values()}
        print(
            f"\n[soak] {done} operations in {elapsed:.1f} s at concurrency {CONCURRENCY}: {dict(ops)}; "
            f"connections peak {peak_conns} (baseline {base_conns[names[True]]}/{base_conns[names[False]]}); "
            f"tasks {base_tasks}->{end_tasks} (workers included at baseline); "
            f"RSS {base_rss / 2**20:.1f}->{end_rss / 2**20:.1f} MiB (peak "
            f"{max(s[1] for s in samples) / 2**20:.1f} MiB)"
        )
    finally:
        stop.set()
        for client in clients.values():
            await client.close()
        await control.aclose()
