"""benchmarks/run.py --quick --only cluster,sentinel starts its own topologies and reports every approach.

Only that the harness works is checked (quick numbers on a shared machine mean
nothing): the run exits 0 and its JSON and markdown hold the cluster and Sentinel rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import run_child

from kivigo_async.testing.pytest_plugin import skip_or_fail
from kivigo_async.testing.servers import ServerPool, ServerUnavailable
from kivigo_async.testing.topologies import find_cli

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
DOCS = ROOT / "docs" / "benchmarks.md"
# Starting both topologies and a quick run take well under a minute; this only bounds a hang.
SUBPROCESS_TIMEOUT = 280
APPROACHES = ("kivigo-async", "redis-py mget_nonatomic", "serial MGET per slot (cashews' approach)")
#: Sentinel's, and the cluster's single-key workloads: ours, ours without auto_pipeline, redis-py's.
SINGLE_KEY_APPROACHES = ("kivigo-async", "kivigo-async (pool)", "redis-py")

pytestmark = [pytest.mark.server, pytest.mark.timeout(SUBPROCESS_TIMEOUT + 20)]


def check_cases(block: dict[str, Any]) -> None:
    """A block of single-key workloads: every approach ran both, ratios divide by redis-py."""
    assert block["baseline"] == "redis-py"
    assert set(block["approaches"]) == set(SINGLE_KEY_APPROACHES)
    assert set(block["cases"]) == {"seq", "mix"}
    for case in block["cases"].values():
        by_name = {row["library"]: row for row in case["rows"]}
        assert set(by_name) == set(SINGLE_KEY_APPROACHES)
        for name, row in by_name.items():
            assert row["status"] == "ok", (name, row.get("reason"))
            assert row["repetitions"] == 2
            assert row["rate"] > 0
        assert by_name["redis-py"]["ratio"]["rate"] == pytest.approx(1.0)
        assert by_name["kivigo-async"]["ratio"]["rate"] is not None


def test_quick_cluster_and_sentinel_run(kivigo_server_pool: ServerPool, tmp_path: Path) -> None:
    try:
        find_cli(kivigo_server_pool.binary("valkey", "plain"))
    except ServerUnavailable as exc:
        skip_or_fail(exc, "valkey")
    docs_before = DOCS.read_bytes() if DOCS.exists() else None
    proc = run_child(
        [
            sys.executable,
            str(RUN),
            "--quick",
            "--loops",
            "asyncio",
            "--only",
            "cluster,sentinel",
            "--out",
            str(tmp_path),
        ],
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

    result = json.loads((tmp_path / "latest-quick.json").read_text(encoding="utf-8"))
    assert result["scenarios"] == {}  # --only cluster,sentinel: nothing else was measured
    block = result["cluster"]
    assert "skipped" not in block, block
    assert block["keys"] == 1000
    assert block["baseline"] == APPROACHES[2]
    assert set(block["approaches"]) == set(APPROACHES)
    rows = {row["library"]: row for row in block["rows"]}
    assert set(rows) == set(APPROACHES)
    for name, row in rows.items():
        assert row["loop"] == "asyncio"
        assert row["status"] == "ok", (name, row.get("reason"))
        assert row["repetitions"] == 2
        assert row["rate"] > 0
        assert row["ratio"]["rate"] is not None
    assert rows[APPROACHES[2]]["ratio"]["rate"] == pytest.approx(1.0)
    # The same cluster's single-key workloads, against redis-py's cluster client.
    check_cases(block["single"])

    sentinel = result["sentinel"]
    assert "skipped" not in sentinel, sentinel
    check_cases(sentinel)

    markdown = (tmp_path / "latest-quick.md").read_text(encoding="utf-8")
    assert block["title"] in markdown
    assert sentinel["title"] in markdown
    assert all(name in markdown for name in APPROACHES + SINGLE_KEY_APPROACHES)
    for cases in (block["single"]["cases"], sentinel["cases"]):
        assert all(case["title"] in markdown for case in cases.values())
    assert (DOCS.read_bytes() if DOCS.exists() else None) == docs_before
