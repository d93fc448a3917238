"""benchmarks/run.py --quick runs end to end against a real server and reports every scenario.

Only that the harness works is checked: numbers from a quick run on a shared
machine mean nothing, so no figure is compared with anything.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import redis
from conftest import run_child

from kivigo_async.testing.pytest_plugin import in_ci
from kivigo_async.testing.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
DOCS = ROOT / "docs" / "benchmarks.md"
# Its own database on the shared server: the check that it cleaned up sees only its keys.
BENCH_DB = 12
# A quick run takes well under a minute; this only bounds a hang on a loaded machine.
SUBPROCESS_TIMEOUT = 280
PEERS = ("aiocache", "cashews", "key_value.aio.stores.redis")
LIBRARIES = (
    "kivigo-async",
    "kivigo-async (pool)",
    "kivigo-async (typed)",
    "kivigo-async (bytes)",
    "kivigo-async + client cache",
    "redis-py",
    "redis-py (no timeout)",
    "redis-py + orjson",
    "aiocache",
    "cashews",
    "py-key-value-aio",
)
SCENARIOS = (
    "seq",
    "mix",
    "hot",
    *(f"batch_{kind}_{n}" for kind in ("get", "set") for n in (10, 100, 1000)),
)
CODECS = (
    "stdlib json",
    "orjson",
    "msgspec json",
    "msgspec msgpack",
    "kivigo JsonCodec",
    'kivigo MsgspecCodec("msgpack")',
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(SUBPROCESS_TIMEOUT + 20)]


def require_peers() -> None:
    """The peers come with the test extra; a missing one skips here and fails under CI."""
    missing = []
    for module in PEERS:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        message = f"benchmark peers not installed: {', '.join(missing)} (pip install -e '.[test]')"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def bench_keys(server: RedisServer) -> list[bytes]:
    conn = redis.Redis(host=server.host, port=server.port, db=BENCH_DB)
    try:
        return list(conn.scan_iter(match="kivigo-bench:*", count=1000))
    finally:
        conn.close()


def test_quick_run_writes_every_scenario(valkey_server: RedisServer, tmp_path: Path) -> None:
    require_peers()
    docs_before = DOCS.read_bytes() if DOCS.exists() else None
    env = dict(os.environ, KIVIGO_REDIS_URL=f"{valkey_server.url}/{BENCH_DB}")
    proc = run_child(
        [sys.executable, str(RUN), "--quick", "--loops", "asyncio", "--out", str(tmp_path)],
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    result = json.loads((tmp_path / "latest-quick.json").read_text(encoding="utf-8"))
    assert result["meta"]["mode"] == "quick"
    assert result["meta"]["server"]["name"] in ("valkey", "redis")
    # The server KIVIGO_REDIS_URL names, not one the benchmark started for itself.
    where = f"{valkey_server.host}:{valkey_server.port} (KIVIGO_REDIS_URL)"
    assert result["meta"]["server"]["where"] == where
    assert list(result["meta"]["loops"]) == ["asyncio"]
    # The commit measured (the tests run from a git checkout), shown in the report.
    source = result["meta"]["source"]
    assert source is None or (len(source["commit"]) == 12 and isinstance(source["modified"], bool))
    assert set(result["scenarios"]) == set(SCENARIOS)
    for sid in SCENARIOS:
        rows = {row["library"]: row for row in result["scenarios"][sid]["rows"]}
        for library in LIBRARIES:
            row = rows[library]
            assert row["status"] == "ok", (sid, library, row.get("reason"))
            assert row["rate"] > 0
            assert row["repetitions"] == 2
            assert row["ratio"]["rate"] is not None
        assert rows["redis-py"]["ratio"]["rate"] == pytest.approx(1.0)
        ceiling = rows["redis-benchmark (no pipelining)"]
        assert ceiling["status"] == "ok" or (ceiling["status"] == "n/a" and ceiling["reason"]), ceiling
    assert [row["codec"] for row in result["codecs"]] == list(CODECS)
    assert all(row["encode_us"] > 0 and row["decode_typed_us"] > 0 for row in result["codecs"])
    memory = result["memory"]
    assert memory["operations"] == 4000
    assert memory["verdict"] == "not judged (quick)"
    assert isinstance(memory["growth_bytes"], int)
    assert set(result["libraries"]) == set(LIBRARIES)

    markdown = (tmp_path / "latest-quick.md").read_text(encoding="utf-8")
    for title in ("Sequential set then get", "64 concurrent tasks", "Batch get", "Batch set", "Codec cost"):
        assert title in markdown
    assert "- Source: " in markdown
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        pass
    else:
        assert (tmp_path / "latest-quick.png").read_bytes().startswith(b"\x89PNG")
    # A quick run into another folder leaves the published page alone...
    assert (DOCS.read_bytes() if DOCS.exists() else None) == docs_before
    # ... and the server as it found it.
    assert bench_keys(valkey_server) == []
