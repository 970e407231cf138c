"""``edge-agent bench``: measure this board's loop against its floor, for every installed bundle."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_agent.errors import EdgeAgentError

_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)


def _p50(section: dict[str, Any], key: str) -> float:
    return float(section[key]["total"]["p50"]) if key in section else float("nan")


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model: p50s and the ratios that matter (loop/floor, naive/loop, pipelined/bound)."""
    rows = []
    for m in report["models"]:
        fr = m["frame"]
        row: dict[str, Any] = {"model": m["name"], "floor_ms": _p50(fr, "floor_run"), "loop_ms": _p50(fr, "loop")}
        row["frame_ratio"] = row["loop_ms"] / row["floor_ms"]
        for kind in ("1080p", "12mp"):
            if kind in m:
                ph = m[kind]
                floor = _p50(ph, "floor_decode") + _p50(ph, "floor_run")
                row[f"{kind}_ratio"] = _p50(ph, "loop") / floor
                row[f"{kind}_naive_ratio"] = _p50(ph, "naive") / _p50(ph, "loop")
        if "pipelined" in m:
            row["fps"] = m["pipelined"]["fps"]
            row["bound_fps"] = m["pipelined"]["bound_fps"]
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def bench_command(
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these bundles (repeatable).")] = None,
    models_dir: Annotated[
        Path | None, typer.Option("--models-dir", help="Folder of model bundles.", envvar="EDGE_AGENT_MODELS_DIR")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Long budgets (minutes) instead of the quick run.")] = False,
    threads: Annotated[int, typer.Option(help="Intra-op threads of the latency session (0 = all cores).")] = 0,
    spinning: Annotated[bool, typer.Option(help="Intra-op thread spinning of the latency session.")] = False,
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="Photos to tile into the 1080p/12 MP test JPEGs.")
    ] = None,
    naive: Annotated[bool, typer.Option(help="Also time the naive tutorial loop.")] = True,
    workers: Annotated[int, typer.Option(help="Pipelined worker threads (0 = one per core, -1 = skip).")] = 0,
    memory: Annotated[bool, typer.Option(help="Also measure peak RSS and cold start in a fresh process.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the full JSON report here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of a table.")] = False,
) -> None:
    """Measure floor vs loop vs naive loop and pipelined frames/s for the installed bundles."""
    import tempfile

    import numpy as np
    from PIL import Image as PILImage

    from edge_agent.bundles.bundle import default_models_dir, find_bundle, list_bundle_dirs, load_bundle
    from edge_agent.toolchain import bench
    from edge_agent.vision.runtime import RuntimeOptions

    folder = models_dir if models_dir is not None else default_models_dir()
    try:
        if model:
            bundles = [find_bundle(n, folder) for n in model]
        else:
            bundles = [load_bundle(d) for d in list_bundle_dirs(folder)]
        if not bundles:
            raise typer.BadParameter(f"no model bundles in {folder}")
        sources = [np.asarray(PILImage.open(p).convert("RGB")) for p in image] if image else bench.synthetic_sources()
    except EdgeAgentError as exc:
        _err.print(f"[red]error[/red] {escape(f'[{exc.code}] {exc.message}')}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as exc:
        _err.print(f"[red]error[/red] cannot read image: {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    cfg = bench.BenchConfig(
        budget=bench.FULL if full else bench.QUICK,
        options=RuntimeOptions(intra_op_threads=threads, allow_spinning=spinning),
        naive=naive,
        pipelined_workers=workers,
        pipelined_seconds=8.0 if full else 2.0,
    )
    inputs = bench.make_inputs(sources)
    report: dict[str, Any] = {"machine": bench.machine_info(), "inputs": inputs.describe(), "models": []}
    for b in bundles:
        if not as_json:
            _err.print(f"measuring {b.name} ...")
        report["models"].append(bench.bench_model(b, inputs, cfg))
    report["int8_vs_fp32"] = [bench.bench_int8(f, i, inputs, cfg) for f, i in bench.int8_pairs(bundles)]
    if memory:
        with tempfile.TemporaryDirectory() as tmp:
            photo = Path(tmp) / "photo.jpg"
            photo.write_bytes(inputs.photos["1080p"])
            report["memory"] = {
                "all_models": bench.probe_process([str(b.directory) for b in bundles], str(photo)),
            }
    report["summary"] = summary_rows(report)
    if output is not None:
        output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if as_json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
        return
    mach = report["machine"]
    _out.print(f"{mach['cpu']} ({mach['cores']} cores, {mach['arch']}), onnxruntime "
               f"{mach['versions'].get('onnxruntime', '?')}; p50 in ms, ratios side by side")
    table = Table("model", "floor run", "frame loop", "loop/floor", "1080p loop/floor", "12MP loop/floor",
                  "12MP naive/loop", "pipelined fps", "bound fps")
    for r in report["summary"]:
        table.add_row(r["model"], _fmt(r["floor_ms"]), _fmt(r["loop_ms"]), _fmt(r["frame_ratio"]),
                      _fmt(r.get("1080p_ratio")), _fmt(r.get("12mp_ratio")), _fmt(r.get("12mp_naive_ratio")),
                      _fmt(r.get("fps")), _fmt(r.get("bound_fps")))
    _out.print(table)
    for p in report["int8_vs_fp32"]:
        _out.print(f"INT8/FP32 {p['int8']}: session.run x{p['latency']['run_ratio']:.2f}, "
                   f"loop x{p['latency']['loop_ratio']:.2f} (below 1 = INT8 faster)")
    if "memory" in report:
        mem = report["memory"]["all_models"]
        _out.print(f"all models loaded: peak RSS {mem['peak_rss_mb']} MB, cold start {mem['cold_start_s']} s")
