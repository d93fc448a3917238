"""Does kivigo-async hold on to memory as it works? A tracemalloc check.

A fresh client runs a mixed workload (64 tasks; 70% get, 20% set, 5% delete,
3% batch get of 10 keys on a bounded keyspace, so the *server's* data stops
growing early; and 2% set, get and delete of a key never used before, so that
memory kept per distinct key, which a bounded keyspace would fill during the
warm-up, shows as growth). Python's traced memory is sampled (after a full collection) once
the warm-up is done and then at ten checkpoints; the growth is the last sample
minus the first. Pools, caches and interned strings fill up during the warm-up,
so a client that does not leak ends within allocator noise of where it started.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import time
import tracemalloc
from typing import Any

from adapters import POOL, Target
from workload import KEY_PREFIX, KEYSPACE, SESSION

#: Below this, growth is allocator noise (one resized dict or free list), not a leak.
THRESHOLD_BYTES = 64 * 1024
TASKS = 64
CHECKPOINTS = 10


async def _ops(client: Any, count: int, rng: random.Random, fresh: itertools.count[int]) -> None:
    keys = [f"{KEY_PREFIX}mem:{i}" for i in range(KEYSPACE)]

    async def worker(n: int) -> None:
        for _ in range(n):
            roll = rng.random()
            key = keys[rng.randrange(KEYSPACE)]
            if roll < 0.70:
                await client.get(key, default=None)
            elif roll < 0.90:
                await client.set(key, SESSION)
            elif roll < 0.95:
                await client.delete(key)
            elif roll < 0.98:
                start = rng.randrange(KEYSPACE - 10)
                await client.batch_get(keys[start : start + 10])
            else:
                new = f"{KEY_PREFIX}mem:fresh:{next(fresh)}"
                await client.set(new, SESSION)
                await client.get(new)
                await client.delete(new)

    share, extra = divmod(count, TASKS)
    await asyncio.gather(*(worker(share + (1 if i < extra else 0)) for i in range(TASKS)))


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def check(target: Target, total_ops: int, warmup_ops: int, judge: bool) -> dict[str, object]:
    """Run ``total_ops`` operations and report traced memory after the warm-up and at the end."""
    from kivigo_async import Client
    from kivigo_async.backends.redis import RedisBackend, RedisOptions

    rng = random.Random(11)
    fresh = itertools.count()
    options = RedisOptions(
        addr=f"{target.host}:{target.port}",
        db=target.db,
        username=target.username,
        password=target.password,
        pool_size=POOL,
    )
    started = time.perf_counter()
    tracemalloc.start()
    try:
        async with Client(RedisBackend(options)) as client:
            await _ops(client, warmup_ops, rng, fresh)
            first = _traced()
            baseline = tracemalloc.take_snapshot()
            samples = [first]
            remaining = total_ops - warmup_ops
            step, extra = divmod(remaining, CHECKPOINTS)
            for i in range(CHECKPOINTS):
                await _ops(client, step + (extra if i == CHECKPOINTS - 1 else 0), rng, fresh)
                samples.append(_traced())
            final = tracemalloc.take_snapshot()
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    growth = samples[-1] - samples[0]
    verdict = "no growth" if growth <= THRESHOLD_BYTES else "GROWTH"
    if not judge:  # a few thousand operations cannot tell a leak from noise
        verdict = "not judged (quick)"
    top = [
        {"where": str(stat.traceback[0]), "size_diff_bytes": stat.size_diff, "count_diff": stat.count_diff}
        for stat in final.compare_to(baseline, "lineno")[:5]
        if stat.size_diff > 0
    ]
    return {
        "library": "kivigo-async",
        "operations": total_ops,
        "warmup_operations": warmup_ops,
        "traced_after_warmup_bytes": samples[0],
        "traced_at_end_bytes": samples[-1],
        "peak_bytes": peak,
        "growth_bytes": growth,
        "growth_bytes_per_op": growth / max(1, remaining),
        "samples_bytes": samples,
        "threshold_bytes": THRESHOLD_BYTES,
        "verdict": verdict,
        "top_growth_sites": top,
        "seconds": time.perf_counter() - started,
    }
