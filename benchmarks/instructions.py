"""Client CPU per call, counted in machine instructions: a figure the machine's noise cannot move.

    python benchmarks/instructions.py                       # every case (several minutes)
    python benchmarks/instructions.py --cases batch_get_1000 --libs kivigo-async
    nox -s instructions

Timings on a shared virtual machine drift by 20% or more within a run, which is
enough to hide or invent a 5% difference. Here each library runs its calls inside
``valgrind --tool=callgrind``, which counts the instructions the client process
executes (the server runs outside it). Each case runs twice, with ``--calls`` calls
and with none, after the same setup and warm-up; the difference divided by the
number of calls is the cost of one call, repeatable to a fraction of a percent
(compare counts taken with the same ``--calls``).

What it does not see: time in the kernel (sockets, epoll), time waiting for the
server, and cache misses. It is a measure of client-side Python and C work only;
``run.py`` measures wall time. Needs ``valgrind`` on PATH (exit status 2 without).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import scenarios
from adapters import (
    Adapter,
    KivigoAdapter,
    KivigoBytesAdapter,
    KivigoPoolAdapter,
    KivigoTypedAdapter,
    RedisPyAdapter,
    RedisPyJsonAdapter,
    Target,
)
from run import delete_bench_keys, log, open_server, server_info

HERE = Path(__file__).resolve().parent
LIBS: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (
        KivigoAdapter,
        KivigoTypedAdapter,
        KivigoBytesAdapter,
        KivigoPoolAdapter,
        RedisPyAdapter,
        RedisPyJsonAdapter,
    )
}
BASELINE = RedisPyAdapter.name
#: case -> (operation, keys per call); "seq" is one set then one get of the same key.
CASES: dict[str, tuple[str, int]] = {
    "seq": ("seq", 1),
    "batch_get_100": ("get", 100),
    "batch_get_1000": ("get", 1000),
    "batch_set_100": ("set", 100),
    "batch_set_1000": ("set", 1000),
}
#: The typed adapter writes exactly what the untyped one does: only its reads differ.
WRITES_SAME_AS = {KivigoTypedAdapter.name: KivigoAdapter.name}
#: Whose versions the report names: the client, its parser and the codecs.
VERSIONS_OF = ("redis", "hiredis", "msgspec", "orjson")
_COLLECTED = re.compile(rb"Collected\s*:\s*(\d+)")


# -- the measured process ----------------------------------------------------------


async def _child(lib: str, case: str, calls: int, target: Target) -> None:
    adapter = LIBS[lib](target)
    await adapter.setup()
    try:
        await scenarios.prepare(adapter)
        op, size = CASES[case]
        keys = scenarios.keys_for(adapter.slug)[:size]

        async def once() -> None:
            if op == "seq":
                await adapter.set(keys[0])
                await adapter.get(keys[0])
            elif op == "get":
                await adapter.batch_get(keys)
            else:
                await adapter.batch_set(keys)

        for _ in range(5):  # warm-up: decoders built, buffers grown, connections open
            await once()
        gc.collect()
        gc.freeze()
        for _ in range(calls):
            await once()
    finally:
        await adapter.teardown()


# -- the parent: runs children under valgrind -------------------------------------------


@dataclass(frozen=True)
class Job:
    lib: str
    case: str


def _count(job: Job, calls: int, target: Target) -> int:
    """Instructions executed by one child run of ``job`` with ``calls`` measured calls."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={os.path.join(tmp, 'out')}",
            sys.executable,
            __file__,
            "--child",
            job.lib,
            job.case,
            str(calls),
            "--target",
            json.dumps({"host": target.host, "port": target.port, "db": target.db}),
        ]
        # A fixed hash seed: set and dict layouts, hence instruction counts, repeat exactly.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        if target.password is not None:  # passed on, never printed
            env["KIVIGO_BENCH_PASSWORD"] = target.password
            env["KIVIGO_BENCH_USERNAME"] = target.username or ""
        proc = subprocess.run(cmd, capture_output=True, env=env, timeout=1800, check=False)
        found = _COLLECTED.findall(proc.stderr)
        if proc.returncode != 0 or not found:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"{job.lib} / {job.case} failed (exit {proc.returncode}): {' | '.join(tail)}")
        return int(found[-1])


def per_call(job: Job, calls: int, target: Target) -> float:
    """Instructions for one call of ``job``: the run with ``calls`` calls minus the run with none."""
    return (_count(job, calls, target) - _count(job, 0, target)) / calls


def jobs_for(cases: Sequence[str], libs: Sequence[str]) -> list[Job]:
    out = []
    for case in cases:
        for lib in libs:
            if CASES[case][0] == "set" and WRITES_SAME_AS.get(lib) in libs:
                continue  # its writes are the other adapter's, counted once
            out.append(Job(lib, case))
    return out


def table(results: dict[Job, float]) -> str:
    lines = [
        "| case | library | instructions per call | per key (seq: per command) | ratio to redis-py |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for case in CASES:
        base = results.get(Job(BASELINE, case))
        for lib in LIBS:
            count = results.get(Job(lib, case))
            if count is None:
                continue
            keys = CASES[case][1] * (2 if case == "seq" else 1)
            # Fewer instructions is better: the ratio is redis-py's count over this one's,
            # so above 1 means cheaper than raw redis-py, like the rate ratios of run.py.
            ratio = f"{base / count:.2f}x" if base else "-"
            lines.append(f"| {case} | {lib} | {count / 1e6:,.3f} M | {count / keys:,.0f} | {ratio} |")
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {','.join(CASES)}")
    parser.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated: {','.join(LIBS)}")
    parser.add_argument("--calls", type=int, default=20, help="measured calls per run (20)")
    parser.add_argument("--jobs", type=int, default=2, help="children run at once (2)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the md and json")
    parser.add_argument("--child", nargs=3, metavar=("LIB", "CASE", "CALLS"), help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, allowed in (("cases", CASES), ("libs", LIBS)):
        chosen = [item for item in getattr(args, name).split(",") if item]
        unknown = [item for item in chosen if item not in allowed]
        if unknown or not chosen:
            parser.error(f"--{name}: unknown or empty {unknown}; choose from {', '.join(allowed)}")
        setattr(args, name, chosen)
    if args.calls < 1 or args.jobs < 1:
        parser.error("--calls and --jobs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        lib, case, calls = args.child
        spec = json.loads(args.target)
        target = Target(
            spec["host"],
            spec["port"],
            spec["db"],
            username=os.environ.get("KIVIGO_BENCH_USERNAME") or None,
            password=os.environ.get("KIVIGO_BENCH_PASSWORD"),
        )
        asyncio.run(_child(lib, case, int(calls), target))
        return 0
    if shutil.which("valgrind") is None:
        log("valgrind is not on PATH: it counts the instructions (apt-get install valgrind)")
        return 2
    opened = open_server()
    if opened is None:
        return 2
    server, where, target = opened
    results: dict[Job, float] = {}
    try:
        info = server_info(target)
        versions = {name: importlib.metadata.version(name) for name in VERSIONS_OF}
        about = (
            f"{info['name']} {info['version']}, CPython {platform.python_version()}, asyncio loop, "
            + ", ".join(f"{name} {version}" for name, version in versions.items())
            + f"; {args.calls} calls per run"
        )
        log(f"server: {where}; {about}")
        jobs = jobs_for(args.cases, args.libs)
        with ThreadPoolExecutor(args.jobs) as pool:
            counts = pool.map(lambda job: per_call(job, args.calls, target), jobs)
            for job, count in zip(jobs, counts, strict=True):
                results[job] = count
                log(f"{job.case:15s} {job.lib:22s} {count / 1e6:9.3f} M instructions per call")
        delete_bench_keys(target)
    finally:
        server.stop()
    text = f"Instructions per call ({about}).\n\n{table(results)}"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instructions.md").write_text(text + "\n")
    rows = [{"case": j.case, "library": j.lib, "instructions_per_call": c} for j, c in results.items()]
    meta = {"about": about, "server": info, "python": platform.python_version(), "versions": versions}
    (args.out / "instructions.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
