"""The client workloads: one measurement of one library on one event loop.

Each function returns a :class:`Measure`; wall time comes from ``perf_counter``,
client CPU from ``process_time`` (the whole process: the event loop, the client
library, the parser), per-operation latencies from ``perf_counter_ns`` around
each awaited call.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from adapters import Adapter
from workload import KEYSPACE, Plan, keys_for, mix_plan


@dataclass
class Measure:
    """One measurement: ``ops`` operations (or keys, for batches) in ``wall`` seconds."""

    ops: int
    wall: float
    cpu: float
    latencies_ns: list[int] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return self.ops / self.wall if self.wall > 0 else 0.0

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu / self.ops * 1e6 if self.ops else 0.0

    def percentile_us(self, q: float) -> float | None:
        if not self.latencies_ns:
            return None
        ordered = sorted(self.latencies_ns)
        # Nearest rank: p99 of 1,000 samples is the 990th smallest.
        rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
        return ordered[rank - 1] / 1000

    @classmethod
    def merge(cls, parts: Sequence[Measure]) -> Measure:
        """One measurement from the slices of one (their operations, times and latencies summed)."""
        return cls(
            sum(m.ops for m in parts),
            sum(m.wall for m in parts),
            sum(m.cpu for m in parts),
            [ns for m in parts for ns in m.latencies_ns],
        )

    def summary(self) -> dict[str, float | None]:
        return {
            "rate": self.rate,
            "p50_us": self.percentile_us(50),
            "p99_us": self.percentile_us(99),
            "cpu_us_per_op": self.cpu_us_per_op,
        }


#: Scenario ids in report order, with their titles and units.
BATCH_SIZES = (10, 100, 1000)
SCENARIOS: dict[str, tuple[str, str]] = {
    "seq": ("Sequential set then get, one task", "ops/s"),
    "mix": ("64 concurrent tasks, 80% get / 20% set", "ops/s"),
    "hot": ("Hot key: one task gets the same key over and over", "ops/s"),
    **{f"batch_get_{n}": (f"batch get of {n:,} keys", "keys/s") for n in BATCH_SIZES},
    **{f"batch_set_{n}": (f"batch set of {n:,} keys", "keys/s") for n in BATCH_SIZES},
}


#: Batch scenarios run in this many slices per repetition, the libraries taking turns.
BATCH_SLICES = 4


def slices(scenario: str) -> int:
    """How many slices one repetition of ``scenario`` is measured in.

    Every scenario of one task at a time is sliced; the 64-task mix is not, since
    a slice of it would change how many operations each task has in flight.
    """
    return 1 if scenario == "mix" else BATCH_SLICES


def supports(adapter: type[Adapter], scenario: str) -> bool:
    if scenario.startswith("batch_get"):
        return adapter.has_batch_get
    if scenario.startswith("batch_set"):
        return adapter.has_batch_set
    return True


async def prepare(adapter: Adapter) -> None:
    """Fill the adapter's keyspace, check it reads back what it wrote, and warm its pool."""
    keys = keys_for(adapter.slug)
    if adapter.has_batch_set:
        await adapter.batch_set(keys)
    else:
        for key in keys:
            await adapter.set(key)
    got = await adapter.get(keys[0])
    if got != adapter.expected():
        raise RuntimeError(f"{adapter.name}: read back {got!r:.80}, not the value it stored")
    if adapter.has_batch_get:
        values = await adapter.batch_get(keys[:10])
        found = list(values.values()) if isinstance(values, dict) else list(values)
        if found != [adapter.expected()] * 10:
            raise RuntimeError(f"{adapter.name}: batch read did not return the 10 stored values")
    # Open the pool's connections now, not during the first measurement.
    await run_mix(adapter, mix_plan(64, 4, seed=1))


async def run_seq(adapter: Adapter, pairs: int) -> Measure:
    keys = keys_for(adapter.slug)
    clock = time.perf_counter_ns
    set_, get = adapter.set, adapter.get
    lat: list[int] = []
    missing = 0
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(pairs):
        key = keys[i % KEYSPACE]
        a = clock()
        await set_(key)
        b = clock()
        if await get(key) is None:
            missing += 1
        lat.append(b - a)
        lat.append(clock() - b)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    _check_found(adapter, missing, pairs)
    return Measure(2 * pairs, wall, cpu, lat)


def _check_found(adapter: Adapter, missing: int, reads: int) -> None:
    """Fail the measurement if reads of stored keys came back empty.

    Every key was written before: a library that turns errors into ``None``
    (cashews does by default) would otherwise look fast while failing. The
    check is one ``is None`` per read, the same for every library.
    """
    if missing:
        raise RuntimeError(f"{adapter.name}: {missing} of {reads} reads found no value (errors suppressed?)")


async def run_mix(adapter: Adapter, plan: Sequence[Sequence[tuple[bool, int]]]) -> Measure:
    keys = keys_for(adapter.slug)
    clock = time.perf_counter_ns
    set_, get = adapter.set, adapter.get
    lat: list[int] = []
    missing = 0

    async def worker(ops: Sequence[tuple[bool, int]]) -> None:
        nonlocal missing
        for is_get, index in ops:
            key = keys[index]
            a = clock()
            if is_get:
                if await get(key) is None:
                    missing += 1
            else:
                await set_(key)
            lat.append(clock() - a)

    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(ops) for ops in plan))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    _check_found(adapter, missing, sum(is_get for ops in plan for is_get, _ in ops))
    return Measure(sum(len(ops) for ops in plan), wall, cpu, lat)


async def run_hot(adapter: Adapter, ops: int) -> Measure:
    """``ops`` reads of one key that nobody writes meanwhile: what a client-side cache is for."""
    key = keys_for(adapter.slug)[0]
    clock = time.perf_counter_ns
    get = adapter.get
    lat: list[int] = []
    missing = 0
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(ops):
        a = clock()
        if await get(key) is None:
            missing += 1
        lat.append(clock() - a)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    _check_found(adapter, missing, ops)
    return Measure(ops, wall, cpu, lat)


async def run_batch(adapter: Adapter, kind: str, size: int, calls: int) -> Measure:
    """``calls`` batch calls of ``size`` keys; ops are keys, latencies are per call."""
    keys = keys_for(adapter.slug)
    chunks = [keys[(i * size) % KEYSPACE :][:size] for i in range(calls)]
    chunks = [c if len(c) == size else keys[:size] for c in chunks]
    call = adapter.batch_get if kind == "get" else adapter.batch_set
    clock = time.perf_counter_ns
    lat: list[int] = []
    last: Iterable[object] | Mapping[str, object] = ()
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for chunk in chunks:
        a = clock()
        last = await call(chunk)
        lat.append(clock() - a)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if kind == "get":
        # The last call's result, checked outside the timed loop: a list scan here
        # would cost some libraries more than others.
        found = list(last.values()) if isinstance(last, Mapping) else list(last)
        _check_found(adapter, size - sum(value is not None for value in found), size)
    return Measure(size * calls, wall, cpu, lat)


async def measure(adapter: Adapter, scenario: str, plan: Plan, parts: int = 1) -> Measure:
    """Run ``scenario`` on ``adapter`` (bounded by ``plan.timeout``).

    ``parts`` > 1 runs one slice of the scenario: that share of its calls.
    """
    if scenario == "seq":
        work = run_seq(adapter, max(1, plan.seq_pairs // parts))
    elif scenario == "mix":
        work = run_mix(adapter, mix_plan(plan.mix_tasks, plan.mix_ops_per_task))
    elif scenario == "hot":
        work = run_hot(adapter, max(1, plan.hot_ops // parts))
    else:
        _, kind, size = scenario.split("_")
        work = run_batch(adapter, kind, int(size), max(1, plan.batch_calls[int(size)] // parts))
    return await asyncio.wait_for(work, plan.timeout)
