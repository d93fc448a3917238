"""Medians, ratios and the three outputs: JSON, a markdown report and a PNG chart."""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapters import BASELINE
from scenarios import BATCH_SIZES, SCENARIOS

CEILING = "redis-benchmark (no pipelining)"
METRICS = ("rate", "p50_us", "p99_us", "cpu_us_per_op")
#: Rep results: scenario -> (loop, library) -> one summary (or an error string) per repetition.
Reps = dict[str, dict[tuple[str, str], list[dict[str, Any] | str]]]

DOCS_BEGIN = "<!-- BEGIN GENERATED RESULTS: benchmarks/run.py rewrites everything down to the END marker -->"
DOCS_END = "<!-- END GENERATED RESULTS -->"


# -- environment ---------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_revision() -> dict[str, Any] | None:
    """The commit measured, and whether the tree held changes (``None``: not a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode or status.returncode:
        return None
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def parser_info() -> dict[str, str]:
    import redis
    import redis.utils

    info = {"redis-py": redis.__version__}
    if redis.utils.HIREDIS_AVAILABLE:
        import hiredis

        info["parser"] = f"hiredis {hiredis.__version__}"
    else:
        info["parser"] = "pure-Python RESP parser (hiredis is not installed)"
    return info


# -- aggregation ---------------------------------------------------------------


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _paired_ratio(
    runs: Sequence[dict[str, Any] | str], base: Sequence[dict[str, Any] | str], metric: str
) -> float | None:
    # A ratio per repetition against the baseline run next to it, then the median:
    # drift in the machine's speed between repetitions cancels out.
    ratios = []
    for mine, theirs in zip(runs, base, strict=False):
        if isinstance(mine, dict) and isinstance(theirs, dict):
            a, b = mine.get(metric), theirs.get(metric)
            if a is not None and b:
                ratios.append(a / b)
    return statistics.median(ratios) if ratios else None


def aggregate(
    reps: Reps,
    libraries: Sequence[str],
    loops: Sequence[str],
    unavailable: Mapping[str, str],
    ceiling: Mapping[str, list[dict[str, Any] | str]],
    ceiling_skip: str | None,
) -> dict[str, Any]:
    """Rows per scenario: medians over repetitions and paired ratios to raw redis-py."""
    out: dict[str, Any] = {}
    for scenario, (title, unit) in SCENARIOS.items():
        if scenario not in reps:
            continue
        rows = []
        for loop in loops:
            base = reps[scenario].get((loop, BASELINE), [])
            names = [*libraries, CEILING]
            for library in names:
                if library == CEILING:
                    runs = ceiling.get(scenario, [])
                    if not runs and ceiling_skip:
                        rows.append(_na(library, loop, ceiling_skip))
                        continue
                else:
                    if library in unavailable:
                        rows.append(_na(library, loop, unavailable[library]))
                        continue
                    runs = reps[scenario].get((loop, library), [])
                if not runs:
                    rows.append(_na(library, loop, "not measured"))
                    continue
                ok = [r for r in runs if isinstance(r, dict)]
                row: dict[str, Any] = {"library": library, "loop": loop, **run_status(runs)}
                for metric in METRICS:
                    row[metric] = _median(r.get(metric) for r in ok)
                row["ratio"] = {metric: _paired_ratio(runs, base, metric) for metric in METRICS}
                row["reps"] = runs
                rows.append(row)
        out[scenario] = {"title": title, "unit": unit, "rows": rows}
    return out


def run_status(runs: Sequence[object]) -> dict[str, Any]:
    """``status``, ``reason`` and ``repetitions`` of a row whose repetitions gave ``runs``.

    "partial" when some repetitions failed: its figures are those of the others,
    shown with a note, and a run where kivigo-async or the baseline is partial fails.
    """
    ok = sum(isinstance(r, dict) for r in runs)
    errors = sorted({r for r in runs if isinstance(r, str)})
    status = "n/a" if not runs else "error" if not ok else "partial" if errors else "ok"
    return {
        "status": status,
        "reason": "; ".join(errors) or (None if runs else "not measured"),
        "repetitions": ok,
        "attempts": len(runs),
    }


def _shown(row: Mapping[str, Any]) -> bool:
    """Whether a row has figures to show (every repetition, or some of them, worked)."""
    return row.get("status") in ("ok", "partial")


def _na(library: str, loop: str, reason: str) -> dict[str, Any]:
    return {"library": library, "loop": loop, "status": "n/a", "reason": reason}


def aggregate_codecs(reps: Mapping[str, list[dict[str, float]]], baseline: str) -> list[dict[str, Any]]:
    rows = []
    base = reps.get(baseline, [])
    for name, runs in reps.items():
        row: dict[str, Any] = {"codec": name}
        for metric in ("size_bytes", "encode_us", "decode_us", "decode_typed_us"):
            row[metric] = _median(r[metric] for r in runs)
        ratios = [
            (b["encode_us"] + b["decode_us"]) / (r["encode_us"] + r["decode_us"])
            for r, b in zip(runs, base, strict=False)
        ]
        row["round_trip_speed_vs_stdlib_json"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


# -- markdown ------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f" ({value:.2f}x)"


def _cell(row: Mapping[str, Any], metric: str, fmt: Any) -> str:
    if not _shown(row):
        return "-"
    ratio = row.get("ratio", {}).get(metric) if row.get("library") != BASELINE else None
    return f"{fmt(row.get(metric))}{_ratio(ratio)}"


def _status_note(row: Mapping[str, Any]) -> str:
    if row["status"] == "ok":
        return ""
    if row["status"] == "partial":
        return f"only {row['repetitions']} of {row['attempts']} repetitions worked: {row.get('reason') or ''}"
    return f"{row['status']}: {row.get('reason') or ''}".strip()


def _bold(row: Mapping[str, Any]) -> str:
    name = str(row["library"])
    return f"**{name}**" if name in ("kivigo-async", BASELINE) else name


def _revision_line(source: Mapping[str, Any] | None) -> str:
    if not source:
        return "- Source: not a git checkout"
    state = ", with uncommitted changes" if source["modified"] else ""
    return f"- Source: commit {source['commit']}{state}"


def markdown(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"Run {meta['started_at']} ({meta['mode']}, {meta['repetitions']} interleaved repetitions, "
        f"{meta['duration_s']:.0f} s): `{meta['command']}`",
        "",
        f"- Machine: {meta['machine']['cpu_model']}, {meta['machine']['cpu_count']} CPUs, "
        f"{meta['machine']['platform']}; load average {meta['machine']['load_before']} before, "
        f"{meta['machine']['load_after']} after",
        f"- Python: {meta['python']}",
        *([_revision_line(meta["source"])] if "source" in meta else []),
        f"- Server: {meta['server']['name']} {meta['server']['version']} on {meta['server']['where']}",
        f"- Client: redis-py {meta['parser']['redis-py']}, parser {meta['parser']['parser']}",
        f"- Loops: {', '.join(f'{k} ({v})' for k, v in meta['loops'].items())}"
        + (f"; skipped: {meta['loops_skipped']}" if meta.get("loops_skipped") else ""),
        "",
        "Figures are medians over the repetitions. `(1.23x)` is the figure divided by raw "
        f"`{BASELINE}`'s (defaults) in the same repetition on the same loop, median over repetitions: "
        "above 1 is better for rates, below 1 is better for latencies and CPU. CPU is the client "
        "process's CPU time per operation (per key for batches); for redis-benchmark, the benchmark "
        "process's.",
        "",
    ]
    scenarios = result["scenarios"]
    for sid in ("seq", "mix", "hot"):
        if sid not in scenarios:
            continue
        block = scenarios[sid]
        lines += [
            f"### {block['title']}",
            "",
            "| library | loop | ops/s | p50 µs | p99 µs | CPU µs/op | note |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in block["rows"]:
            lines.append(
                f"| {_bold(row)} | {row['loop']} | {_cell(row, 'rate', _num)} | {_cell(row, 'p50_us', _us)} "
                f"| {_cell(row, 'p99_us', _us)} | {_cell(row, 'cpu_us_per_op', _us)} | {_status_note(row)} |"
            )
        lines.append("")
    for kind in ("get", "set"):
        ids = [f"batch_{kind}_{n}" for n in BATCH_SIZES if f"batch_{kind}_{n}" in scenarios]
        if not ids:
            continue
        heads = " | ".join(f"{n:,} keys: keys/s" for n in BATCH_SIZES if f"batch_{kind}_{n}" in scenarios)
        cpu_heads = "/".join(f"{n:,}" for n in BATCH_SIZES if f"batch_{kind}_{n}" in scenarios)
        lines += [
            f"### Batch {kind} (keys per second)",
            "",
            f"| library | loop | {heads} | CPU µs/key ({cpu_heads}) | note |",
            "| --- | --- | " + "---: | " * len(ids) + "---: | --- |",
        ]
        first = scenarios[ids[0]]["rows"]
        for i, head in enumerate(first):
            cells, cpus, notes = [], [], set()
            for sid in ids:
                row = scenarios[sid]["rows"][i]
                cells.append(_cell(row, "rate", _num))
                cpus.append(_us(row.get("cpu_us_per_op")) if _shown(row) else "-")
                if row["status"] != "ok":
                    notes.add(_status_note(row))
            lines.append(
                f"| {_bold(head)} | {head['loop']} | {' | '.join(cells)} | {' / '.join(cpus)} "
                f"| {'; '.join(sorted(notes))} |"
            )
        lines.append("")
    lines += _topology_lines(result.get("cluster"), _cluster_body)
    lines += _topology_lines(result.get("sentinel"), _sentinel_body)
    if result.get("ceiling_runs"):
        lines += [
            "### redis-benchmark runs (the ceiling rows above combine these)",
            "",
            "| scenario | run | requests | requests/s | p50 µs | p99 µs | CPU µs/request |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for sid, runs in result["ceiling_runs"].items():
            for run in runs:
                lines.append(
                    f"| {sid} | {run['label']} | {run['requests']:,} | {_num(run['rps'])} | "
                    f"{_us(run['p50_us'])} | {_us(run['p99_us'])} | {_us(run['cpu_us_per_request'])} |"
                )
        lines.append("")
    if result.get("codecs"):
        lines += [
            "### Codec cost of the session value (CPU only, no I/O)",
            "",
            "| codec | bytes | encode µs | decode µs | typed decode µs | round trip x stdlib json |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in result["codecs"]:
            speed = row["round_trip_speed_vs_stdlib_json"]
            lines.append(
                f"| {row['codec']} | {_num(row['size_bytes'])} | {row['encode_us']:.2f} | "
                f"{row['decode_us']:.2f} | {row['decode_typed_us']:.2f} | "
                f"{'-' if speed is None else f'{speed:.1f}x'} |"
            )
        lines.append("")
    mem = result.get("memory")
    if mem:
        lines += ["### Memory (tracemalloc)", ""]
        if "error" in mem:
            lines.append(f"Failed: {mem['error']}")
        else:
            lines.append(
                f"{mem['library']}: {mem['operations']:,} mixed operations on 64 tasks; traced Python memory "
                f"{mem['traced_after_warmup_bytes'] / 1024:,.0f} KiB after {mem['warmup_operations']:,} "
                f"warm-up operations, {mem['traced_at_end_bytes'] / 1024:,.0f} KiB at the end: growth "
                f"{mem['growth_bytes'] / 1024:+,.1f} KiB ({mem['growth_bytes_per_op']:+.3f} bytes/op); "
                f"verdict: **{mem['verdict']}** (threshold {mem['threshold_bytes'] // 1024} KiB)."
            )
        lines.append("")
    lines += [
        "### Configuration of each library",
        "",
        "| library | version | configuration |",
        "| --- | --- | --- |",
    ]
    for name, lib in result["libraries"].items():
        lines.append(f"| {name} | {lib['version']} | {lib['config']} |")
    lines.append("")
    return "\n".join(lines)


def _topology_lines(
    block: Mapping[str, Any] | None, body: Callable[[Mapping[str, Any], str], list[str]]
) -> list[str]:
    """A topology scenario's section: its title, ``body`` (or why it did not run), the configurations."""
    if not block:
        return []
    lines = [f"### {block['title']}", ""]
    if "skipped" in block or "error" in block:
        what = "Skipped" if "skipped" in block else "Failed"
        return [*lines, f"{what}: {block.get('skipped') or block.get('error')}", ""]
    lines += body(block, block["baseline"])
    lines += _configurations(block["approaches"])
    if block.get("single"):  # the cluster's single-key workloads, after its batch read
        lines += _cluster_single_lines(block["single"])
    return [*lines, ""]


def _configurations(approaches: Mapping[str, str]) -> list[str]:
    lines = ["", "| approach | configuration |", "| --- | --- |"]
    return lines + [f"| {name} | {config} |" for name, config in approaches.items()]


def _topology_rows(rows: Sequence[Mapping[str, Any]], baseline: str) -> list[str]:
    """One table line per row: rate, p50, p99 and CPU, each with its ratio to ``baseline``."""
    lines = []
    for row in rows:
        cells = []
        for metric, fmt in (("rate", _num), ("p50_us", _us), ("p99_us", _us), ("cpu_us_per_op", _us)):
            if not _shown(row):
                cells.append("-")
                continue
            ratio = None if row["library"] == baseline else row["ratio"].get(metric)
            cells.append(f"{fmt(row.get(metric))}{_ratio(ratio)}")
        name = f"**{row['library']}**" if row["library"] in ("kivigo-async", baseline) else row["library"]
        lines.append(f"| {name} | {row['loop']} | {' | '.join(cells)} | {_status_note(row)} |")
    return lines


def _cluster_body(block: Mapping[str, Any], baseline: str) -> list[str]:
    """The cluster scenario's batch table: ratios divide by its own baseline, not by raw redis-py."""
    return [
        f"#### Batch get of {block['keys']:,} keys",
        "",
        f"{block['topology']}. One call reads {block['keys']:,} keys spread over the hash slots; "
        f"{block['calls']} calls per repetition. `(1.23x)` divides by `{baseline}` in the same repetition "
        "on the same loop.",
        "",
        "| approach | loop | keys/s | p50 µs/call | p99 µs/call | CPU µs/key | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        *_topology_rows(block["rows"], baseline),
    ]


def _cluster_single_lines(single: Mapping[str, Any]) -> list[str]:
    """The cluster's single-key workloads: keys on every node, ratios to redis-py's cluster client."""
    baseline = single["baseline"]
    return [
        "",
        "Single keys on the same cluster: the workloads of the single-server scenarios of the same "
        f"name, keys on every node. `(1.23x)` divides by `{baseline}` "
        "(`redis.asyncio.cluster.RedisCluster`) in the same repetition on the same loop.",
        *_case_tables(single["cases"], baseline),
        *_configurations(single["approaches"]),
    ]


def _sentinel_body(block: Mapping[str, Any], baseline: str) -> list[str]:
    """The Sentinel scenario's tables, one per workload; ratios divide by redis-py through Sentinel."""
    return [
        f"{block['topology']}. The workloads of the single-server scenarios of the same name, through "
        f"the primary the sentinels name. `(1.23x)` divides by `{baseline}` (through Sentinel) in the "
        "same repetition on the same loop.",
        *_case_tables(block["cases"], baseline),
    ]


def _case_tables(cases: Mapping[str, Any], baseline: str) -> list[str]:
    """One table per single-key workload (sequential, 64 tasks) of a topology scenario."""
    lines: list[str] = []
    for case in cases.values():
        lines += [
            "",
            f"#### {case['title']}",
            "",
            "| approach | loop | ops/s | p50 µs | p99 µs | CPU µs/op | note |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
            *_topology_rows(case["rows"], baseline),
        ]
    return lines


# -- chart ---------------------------------------------------------------------

_CHART_SCENARIOS = ("seq", "mix", "hot", *(f"batch_{k}_{n}" for k in ("get", "set") for n in BATCH_SIZES))
_CHART_LABELS = {
    "seq": "sequential",
    "mix": "64 tasks",
    "hot": "hot key",
    **{f"batch_{k}_{n}": f"{k} {n}" for k in ("get", "set") for n in BATCH_SIZES},
}


def chart(result: Mapping[str, Any], path: Path) -> str | None:
    """Draw rate ratios to raw redis-py, one panel per loop; return why not, or None."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib is not installed (pip install 'kivigo-async[bench]')"
    scenarios = result["scenarios"]
    ids = [s for s in _CHART_SCENARIOS if s in scenarios]
    loops = list(result["meta"]["loops"])
    if not ids or not loops:
        return "nothing to draw"
    libraries = [name for name in result["libraries"] if name != BASELINE]
    height = 0.8 + 3.6 * len(loops)
    fig, axes = plt.subplots(len(loops), 1, figsize=(11, height), squeeze=False)
    width = 0.8 / max(1, len(libraries))
    for ax, loop in zip(axes[:, 0], loops, strict=True):
        for j, library in enumerate(libraries):
            xs, ys = [], []
            for i, sid in enumerate(ids):
                for row in scenarios[sid]["rows"]:
                    if row["library"] == library and row["loop"] == loop and row["status"] == "ok":
                        ratio = row["ratio"]["rate"]
                        if ratio:
                            xs.append(i - 0.4 + width * (j + 0.5))
                            ys.append(ratio)
            ax.bar(xs, ys, width, label=library)
        cx, cy = [], []
        for i, sid in enumerate(ids):
            for row in scenarios[sid]["rows"]:
                ok = row["library"] == CEILING and row["loop"] == loop and row["status"] == "ok"
                if ok and row["ratio"]["rate"]:
                    cx.append(i)
                    cy.append(row["ratio"]["rate"])
        if cx:
            ax.scatter(cx, cy, marker="_", s=600, color="black", label=CEILING, zorder=3)
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(ids)), [_CHART_LABELS[s] for s in ids])
        ax.set_ylabel(f"rate ÷ {BASELINE}")
        ax.set_title(f"{loop}: throughput relative to raw {BASELINE} (1.0), higher is better")
    # One legend under the panels: inside, it would hide the bars it explains.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=4, fontsize="small", frameon=False)
    meta = result["meta"]
    fig.suptitle(
        f"{meta['server']['name']} {meta['server']['version']}, Python {platform.python_version()}, "
        f"{meta['machine']['cpu_count']} CPUs, {meta['started_at']} ({meta['mode']})",
        fontsize="small",
    )
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- files ---------------------------------------------------------------------


def write_outputs(result: Mapping[str, Any], out: Path, stem: str, latest: str) -> list[Path]:
    """Write ``<stem>.json/.md/.png`` and copies named ``<latest>.*``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    written = []
    for name in (stem, latest):
        json_path = out / f"{name}.json"
        json_path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        md_path = out / f"{name}.md"
        md_path.write_text(f"# kivigo-async benchmark results\n\n{text}", encoding="utf-8")
        written += [json_path, md_path]
    png = out / f"{stem}.png"
    problem = chart(result, png)
    if problem is None:
        latest_png = out / f"{latest}.png"
        latest_png.write_bytes(png.read_bytes())
        written += [png, latest_png]
    else:
        print(f"no chart: {problem}")
    return written


def update_docs(docs: Path, result: Mapping[str, Any], chart_path: Path | None) -> list[Path]:
    """Replace the generated part of ``docs`` (between the markers) with this run's report.

    The chart is copied next to the page (a docs site only serves files inside its
    folder). Returns the files written.
    """
    text = docs.read_text(encoding="utf-8") if docs.exists() else ""
    body = markdown(result)
    written = [docs]
    if chart_path is not None and chart_path.exists():
        image = docs.with_suffix(".png")
        image.write_bytes(chart_path.read_bytes())
        written.append(image)
        body = f"![Throughput relative to raw redis-py]({image.name})\n\n{body}"
    block = f"{DOCS_BEGIN}\n\n{body}\n{DOCS_END}"
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        tail = rest.split(DOCS_END, 1)[1]
        text = f"{head}{block}{tail}"
    else:
        text = f"{text.rstrip()}\n\n## Latest results\n\n{block}\n"
    docs.write_text(text, encoding="utf-8")
    return written
