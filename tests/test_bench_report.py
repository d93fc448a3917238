"""The benchmark report's bookkeeping: failed repetitions are shown and fail the run."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return {name: importlib.import_module(name) for name in ("report", "run", "scenarios")}


def measured(rate: float) -> dict[str, Any]:
    return {"rate": rate, "p50_us": 100.0, "p99_us": 200.0, "cpu_us_per_op": 50.0}


def test_a_row_with_a_failed_repetition_is_partial_and_fails_the_run(bench: dict[str, ModuleType]) -> None:
    report, run = bench["report"], bench["run"]
    assert report.run_status([measured(1), measured(2)])["status"] == "ok"
    assert report.run_status(["timed out"])["status"] == "error"
    assert report.run_status([])["status"] == "n/a"
    partial = report.run_status([measured(1), "timed out"])
    assert (partial["status"], partial["repetitions"], partial["attempts"]) == ("partial", 1, 2)

    reps = {
        "seq": {
            ("asyncio", "kivigo-async"): [measured(150), "TimeoutError: timed out"],
            ("asyncio", "redis-py"): [measured(100), measured(100)],
        }
    }
    result = report.aggregate(reps, ["kivigo-async", "redis-py"], ["asyncio"], {}, {}, "no ceiling")
    rows = {row["library"]: row for row in result["seq"]["rows"]}
    assert rows["kivigo-async"]["status"] == "partial"
    assert "only 1 of 2 repetitions worked" in report._status_note(rows["kivigo-async"])
    assert report._cell(rows["kivigo-async"], "rate", report._num).startswith("150")  # shown, with the note
    assert run._exit_status({"scenarios": result}) == 1
    rows["kivigo-async"].update(report.run_status([measured(150), measured(150)]))
    assert run._exit_status({"scenarios": result}) == 0


class Forgetful:
    """An adapter whose reads find nothing, as a library that swallows errors returns."""

    name = "forgetful"
    slug = "forgetful"

    async def get(self, key: str) -> object:
        return None

    async def set(self, key: str) -> None:
        return None


def test_a_measurement_whose_reads_come_back_empty_fails(bench: dict[str, ModuleType]) -> None:
    scenarios = bench["scenarios"]
    with pytest.raises(RuntimeError, match="10 of 10 reads found no value"):
        asyncio.run(scenarios.run_seq(Forgetful(), 10))
    with pytest.raises(RuntimeError, match="reads found no value"):
        asyncio.run(scenarios.run_hot(Forgetful(), 5))
