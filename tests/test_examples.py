"""The seed examples and examples/run_all.py, run against a real server."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis
from conftest import refused_port, run_child

from kivigo_async.testing.pytest_plugin import require_server, skip_or_fail
from kivigo_async.testing.servers import RedisServer, ServerPool, ServerUnavailable, find_binaries

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
RUN_ALL = EXAMPLES_DIR / "run_all.py"
# The examples share a server with other tests; their own database keeps the keys apart.
EXAMPLE_DB = 13
SUBPROCESS_TIMEOUT = 120


def load_example(filename: str) -> ModuleType:
    """Import an example by path: examples/ is not a package."""
    name = f"kivigo_test_example_{Path(filename).stem}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES_DIR / filename)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def connect(server: RedisServer, *, password: str | None = None) -> redis.Redis:
    """A plain client on the examples' database, to inspect what they left behind."""
    return redis.Redis(host=server.host, port=server.port, db=EXAMPLE_DB, password=password)


def flush(server: RedisServer, *, password: str | None = None) -> list[bytes | str]:
    """Empty the examples' database; return the keys left in it that would never expire."""
    conn = connect(server, password=password)
    try:
        left = [key for key in conn.keys("*") if conn.pttl(key) == -1]
        conn.flushdb()
        return left
    finally:
        conn.close()


@pytest.fixture
def example_url(valkey_server: RedisServer) -> Iterator[str]:
    """The URL of an empty database; the test fails if an example leaves lasting keys behind."""
    flush(valkey_server)
    yield f"{valkey_server.url}/{EXAMPLE_DB}"
    assert flush(valkey_server) == [], "the example did not clean up after itself"


def run_all(url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KIVIGO_REDIS_URL"}
    if url is not None:
        env["KIVIGO_REDIS_URL"] = url
    return run_child([sys.executable, str(RUN_ALL)], env=env, timeout=SUBPROCESS_TIMEOUT)


async def test_session_store(example_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await load_example("session_store.py").main(example_url)
    lines = capsys.readouterr().out.splitlines()

    assert lines[0] == "stored session:abc123 for user123"
    # The typed read gives back a Session struct with a real datetime, not a dict.
    assert re.fullmatch(
        r"session: Session\(user_id='user123', login_time=datetime\.datetime\(.*tzinfo=.*\), "
        r"ip_address='192\.168\.1\.100'\)",
        lines[1],
    ), lines[1]
    ttl = re.fullmatch(r"expires in (\d+\.\d) s", lines[2])
    assert ttl is not None, lines[2]
    assert 1700 < float(ttl.group(1)) <= 1800
    assert lines[3:] == [
        "active sessions: ['session:abc123']",
        "after delete: key not found: 'session:abc123'",
    ]


async def test_batch_cache(example_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await load_example("batch_cache.py").main(example_url)

    assert capsys.readouterr().out.splitlines() == [
        "batch_set 5 entries",
        # Input order, and the missing key is left out rather than mapped to an empty value.
        "cache:user:1: {'name': 'Alice', 'role': 'admin'}",
        "cache:user:2: {'name': 'Bob', 'role': 'user'}",
        "cache:config:db: {'host': 'localhost', 'port': '5432'}",
        "missing keys are left out: ['cache:user:404']",
        "batch_delete removed 2 entries",
        "remaining cache keys: ['cache:config:api', 'cache:config:db', 'cache:user:3']",
    ]


async def test_health_checks(
    example_url: str, valkey_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    await load_example("health_checks.py").main(example_url, rounds=2, interval=0.05)

    assert capsys.readouterr().out.splitlines() == [
        "redis is healthy",
        "redis responded within the timeout, extra check passed",
        "periodic check 1/2: passed",
        "periodic check 2/2: passed",
    ]
    # The extra check really wrote through the client, with its TTL.
    conn = connect(valkey_server)
    try:
        assert conn.get("health:probe") == b'"ok"'
        assert 0 < conn.pttl("health:probe") <= 5000
    finally:
        conn.close()


def test_run_all_uses_kivigo_redis_url(example_url: str) -> None:
    result = run_all(example_url)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "starting" not in out  # no embedded server when a URL is given
    assert f"(tcp, db {EXAMPLE_DB})" in out
    for name in ("session_store.py", "batch_cache.py", "health_checks.py"):
        assert f"=== {name}: " in out
        assert f"--- {name}: ok" in out
    assert "cache:config:db: {'host': 'localhost', 'port': '5432'}" in out
    assert "redis is healthy" in out
    assert out.rstrip().endswith("all 3 examples passed")


def test_run_all_starts_and_stops_its_own_server() -> None:
    # What `nox -s demo` does on a machine with no Redis: the embedded server.
    if not find_binaries():
        skip_or_fail(ServerUnavailable("no valkey-server or redis-server binary"), "valkey")
    result = run_all(None)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^starting (valkey|redis)-server ", out, re.MULTILINE), out
    address = re.search(r"running 3 examples against (127\.0\.0\.1):(\d+) \(tcp, db 0\)", out)
    assert address is not None, out
    assert re.search(r"^stopped the (valkey|redis) server$", out, re.MULTILINE), out
    assert out.rstrip().endswith("all 3 examples passed")
    # Stopped for real: nothing answers on its port any more.
    host, port = address.group(1), int(address.group(2))
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, port), timeout=5):
        pass


def test_run_all_never_prints_the_password(kivigo_server_pool: ServerPool) -> None:
    server = require_server(kivigo_server_pool, "valkey", "password")
    assert server.password is not None
    flush(server, password=server.password)
    try:
        result = run_all(f"redis://:{server.password}@{server.host}:{server.port}/{EXAMPLE_DB}")
    finally:
        left = flush(server, password=server.password)

    assert result.returncode == 0, result.stderr
    assert "all 3 examples passed" in result.stdout
    assert server.password not in result.stdout + result.stderr
    assert left == []


def test_run_all_fails_when_examples_fail() -> None:
    # Nothing listens there: every example must fail, loudly.
    with refused_port() as port:
        result = run_all(f"redis://127.0.0.1:{port}/0")

    assert result.returncode == 1
    assert result.stdout.count(": FAILED") == 3
    assert "3 of 3 examples failed" in result.stdout
    assert "BackendUnavailableError" in result.stderr
