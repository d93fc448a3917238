"""The server's ceiling: ``redis-benchmark`` (C, no Python) running the same commands.

Custom commands on the benchmark's own keys are used rather than the built-in
tests, which would write ``key:__rand_int__`` into a server that may be shared.
The sequential and 64-task figures combine separate SET and GET runs by their
share of the workload (a weighted harmonic mean of the rates); their latencies
are shown per run. A server that needs a password is skipped: the password would
have to go on the command line, where any user of the machine can read it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import resource
import shutil
import subprocess
from dataclasses import dataclass

from adapters import Target
from workload import GET_SHARE, KEY_PREFIX, SESSION_JSON

CEILING_KEY = f"{KEY_PREFIX}ceiling"
VALUE = SESSION_JSON.decode()


def find_binary() -> str | None:
    return shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")


def binary_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip() or "unknown"


def unavailable(target: Target) -> str | None:
    """Why the ceiling can't be measured here, or None."""
    if find_binary() is None:
        return "redis-benchmark is not on PATH"
    if target.password is not None:
        return "the server needs a password, which redis-benchmark only takes on its command line"
    return None


def batch_keys(n: int) -> list[str]:
    return [f"{CEILING_KEY}:{i}" for i in range(n)]


@dataclass(frozen=True)
class Run:
    label: str
    clients: int
    requests: int
    args: tuple[str, ...]
    share: float  # of the scenario's operations
    keys: int  # per request


def runs_for(scenario: str, requests: dict[str, int]) -> list[Run]:
    if scenario == "seq":
        n = requests["seq"]
        return [
            Run("SET, 1 client", 1, n, ("SET", CEILING_KEY, VALUE), 0.5, 1),
            Run("GET, 1 client", 1, n, ("GET", CEILING_KEY), 0.5, 1),
        ]
    if scenario == "hot":
        return [Run("GET, 1 client", 1, requests["seq"], ("GET", CEILING_KEY), 1.0, 1)]
    if scenario == "mix":
        n = requests["mix"]
        return [
            Run("SET, 64 clients", 64, n, ("SET", CEILING_KEY, VALUE), 1 - GET_SHARE, 1),
            Run("GET, 64 clients", 64, n, ("GET", CEILING_KEY), GET_SHARE, 1),
        ]
    _, kind, size_text = scenario.split("_")
    size = int(size_text)
    # Runs of a few hundred milliseconds at least: redis-benchmark counts whole
    # milliseconds, so a run of 30 requests (12 ms) gave a rate that was mostly rounding.
    n = requests["batch"] // 2 if size >= 1000 else requests["batch"]
    keys = batch_keys(size)
    if kind == "get":
        return [Run(f"MGET {size}, 1 client", 1, n, ("MGET", *keys), 1.0, size)]
    pairs = [part for key in keys for part in (key, VALUE)]
    return [Run(f"MSET {size}, 1 client", 1, n, ("MSET", *pairs), 1.0, size)]


def _parse_csv(text: str) -> dict[str, str] | None:
    """The numeric columns of ``--csv`` output (the test name column is not escaped: skip it)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    header = next(csv.reader(io.StringIO(lines[0])))
    numeric = header[1:]
    values = [v.strip().strip('"') for v in lines[-1].rsplit(",", len(numeric))[1:]]
    if len(values) != len(numeric):
        return None
    return dict(zip(numeric, values, strict=True))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class RunResult:
    label: str
    clients: int
    requests: int
    rps: float
    p50_us: float
    p99_us: float
    cpu_us_per_request: float


def _one(binary: str, target: Target, run: Run, timeout: float) -> RunResult:
    # redis-benchmark times a run in whole milliseconds: one that ends within the
    # same millisecond (a quick run of few requests) reports an infinite rate.
    for _ in range(3):
        result = _timed(binary, target, run, timeout)
        if math.isfinite(result.rps) and result.rps > 0:
            return result
        run = dataclasses.replace(run, requests=run.requests * 10)
    raise RuntimeError(
        f"redis-benchmark ran too briefly to time ({run.label}), even with {run.requests} requests"
    )


def _timed(binary: str, target: Target, run: Run, timeout: float) -> RunResult:
    cmd = [
        binary, "-h", target.host, "-p", str(target.port), "--dbnum", str(target.db),
        "-c", str(run.clients), "-n", str(run.requests), "--csv", *run.args,
    ]  # fmt: skip
    cpu0 = _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    cpu = _children_cpu() - cpu0
    row = _parse_csv(proc.stdout)
    if proc.returncode != 0 or row is None:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"redis-benchmark failed ({run.label}): {detail[0][:200]}")
    return RunResult(
        label=run.label,
        clients=run.clients,
        requests=run.requests,
        rps=float(row["rps"]),
        p50_us=float(row["p50_latency_ms"]) * 1000,
        p99_us=float(row["p99_latency_ms"]) * 1000,
        cpu_us_per_request=cpu / run.requests * 1e6,
    )


def measure(target: Target, scenario: str, requests: dict[str, int], timeout: float) -> dict[str, object]:
    """One repetition of ``scenario``: the combined rate (ops or keys per second) and each run."""
    binary = find_binary()
    assert binary is not None
    runs = runs_for(scenario, requests)
    results = [_one(binary, target, run, timeout) for run in runs]
    # Weighted harmonic mean: time per operation is the share-weighted time of each run.
    seconds_per_op = sum(run.share / res.rps for run, res in zip(runs, results, strict=True))
    keys = runs[0].keys
    cpu = sum(res.cpu_us_per_request * run.share for run, res in zip(runs, results, strict=True)) / keys
    single = len(runs) == 1
    return {
        "rate": keys / seconds_per_op,
        "p50_us": results[0].p50_us if single else None,
        "p99_us": results[0].p99_us if single else None,
        "cpu_us_per_op": cpu,
        "runs": [dataclasses.asdict(res) for res in results],
    }
