"""benchmarks/instructions.py: the measured child runs against a real server, and the report adds up.

valgrind itself is not needed here: the child is the part that talks to the server,
and it runs the same way with or without valgrind around it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import redis
from conftest import run_child

from kivigo_async.testing.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "instructions.py"
BENCH_DB = 13
# A child fills 1,000 keys and runs a few calls: seconds. This only bounds a hang.
CHILD_TIMEOUT = 120


@pytest.fixture
def instructions(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("instructions")


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_child([sys.executable, str(SCRIPT), *args], timeout=CHILD_TIMEOUT, env=env)


def test_jobs_count_the_typed_writes_once(instructions: ModuleType) -> None:
    libs = ["kivigo-async", "kivigo-async (typed)", "redis-py"]
    jobs = instructions.jobs_for(["batch_get_100", "batch_set_100"], libs)
    assert [(job.case, job.lib) for job in jobs] == [
        ("batch_get_100", "kivigo-async"),
        ("batch_get_100", "kivigo-async (typed)"),
        ("batch_get_100", "redis-py"),
        ("batch_set_100", "kivigo-async"),
        ("batch_set_100", "redis-py"),
    ]
    # Alone, the typed adapter's writes are counted: nothing else stands for them.
    assert [job.lib for job in instructions.jobs_for(["batch_set_100"], ["kivigo-async (typed)"])] == [
        "kivigo-async (typed)"
    ]


def test_table_divides_redis_py_by_each_library(instructions: ModuleType) -> None:
    job = instructions.Job
    text = instructions.table(
        {
            job("redis-py", "batch_get_1000"): 10_000_000.0,
            job("kivigo-async", "batch_get_1000"): 12_500_000.0,
            job("redis-py", "seq"): 300_000.0,
            job("kivigo-async", "seq"): 150_000.0,
        }
    )
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    by_key = {(row[0].lstrip("| "), row[1]): row for row in rows}
    # Fewer instructions is better, so 12.5 M against 10 M is 0.80x, 150 k against 300 k 2.00x.
    assert by_key[("batch_get_1000", "kivigo-async")][2:] == ["12.500 M", "12,500", "0.80x |"]
    assert by_key[("seq", "kivigo-async")][2:] == ["0.150 M", "75,000", "2.00x |"]
    assert by_key[("seq", "redis-py")][4] == "1.00x |"
    assert len(rows) == 4


def test_unknown_case_or_library_is_refused() -> None:
    for args in (["--cases", "batch_get_7"], ["--libs", "redis-py,memcached"], ["--calls", "0"]):
        proc = run_script(*args)
        assert proc.returncode == 2, args
        assert "error:" in proc.stderr


def test_without_valgrind_it_says_so_and_exits_2() -> None:
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    proc = run_script("--cases", "seq", env=env)
    assert proc.returncode == 2
    assert "valgrind is not on PATH" in proc.stderr


@pytest.mark.server
@pytest.mark.parametrize(
    ("lib", "case"),
    [
        ("kivigo-async", "batch_get_100"),
        ("kivigo-async (typed)", "seq"),
        ("redis-py", "batch_set_100"),
        ("redis-py + orjson", "batch_get_1000"),
    ],
)
def test_child_runs_its_calls_on_a_real_server(valkey_server: RedisServer, lib: str, case: str) -> None:
    target = json.dumps({"host": valkey_server.host, "port": valkey_server.port, "db": BENCH_DB})
    conn = redis.Redis(host=valkey_server.host, port=valkey_server.port, db=BENCH_DB)
    commands = {"seq": ["get", "set"], "batch_set_100": ["mset"]}.get(case, ["mget"])

    def calls_after(measured: int) -> list[int]:
        conn.config_resetstat()
        proc = run_script("--child", lib, case, str(measured), "--target", target)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stats = conn.info("commandstats")
        return [stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in commands]

    try:
        # Setup and warm-up are the same in both runs (the warm-up mix has a fixed seed),
        # so the difference is exactly the measured calls: what valgrind's difference counts.
        without, with_three = calls_after(0), calls_after(3)
        assert [b - a for a, b in zip(without, with_three, strict=True)] == [3] * len(commands)
    finally:
        keys = list(conn.scan_iter(match="kivigo-bench:*", count=1000))
        if keys:
            conn.delete(*keys)
        conn.close()
