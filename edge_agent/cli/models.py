"""``edge-agent eval``, ``quantize``, ``inspect fit``, ``detect fit``, ``models keygen/sign/verify/install/rollback``.

Registered on the main app in ``cli.py``. Thin: parse, call evaluate/quantize/anomaly_fit/detect_fit, print.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from edge_agent.bundles.bundle import default_models_dir, find_bundle, load_bundle
from edge_agent.errors import EdgeAgentError, QuantizationGateError, require_extra

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ModelsDir = Annotated[
    Path | None,
    typer.Option("--models-dir", help="Folder of model bundles.", envvar="EDGE_AGENT_MODELS_DIR", show_default=False),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
inspect_app = typer.Typer(
    help="Inspection tools: fit an anomaly model from photos of good parts.", no_args_is_help=True
)
detect_app = typer.Typer(
    help="Detection tools: fit a detector to one camera from its own labelled frames.", no_args_is_help=True
)


def _fail(exc: EdgeAgentError | str, code: int = 2) -> typer.Exit:
    msg = f"[{exc.code}] {exc.message}" if isinstance(exc, EdgeAgentError) else exc
    err.print(f"[red]error[/red] {escape(msg)}", highlight=False)
    return typer.Exit(code)


def _json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    sys.stdout.flush()


def _bar(quiet: bool, eta: bool = False) -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=err, disable=quiet, transient=True)


def eval_command(
    directory: Annotated[Path, typer.Argument(help="Labelled folder: <class>/*, MVTec test/<good|defect>/*, "
                                              "or images/ + labels/ (YOLO).", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Bundle name.")],
    models_dir: ModelsDir = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a confusion matrix / ROC curve PNG.")] = None,
    class_map: Annotated[
        list[str] | None,
        typer.Option("--class-map", help="Detection: dataset class id = model label, e.g. 0=cow (repeatable); "
                     "without it AP50 is class-agnostic."),
    ] = None,
    unknown: Annotated[
        Path | None,
        typer.Option("--unknown", help="Classification: a folder of images that should all be answered unknown "
                     "(e.g. leaves of plants the model does not know); reports the share rejected."),
    ] = None,
    threads: Annotated[int, typer.Option(help="Intra-op threads (0 = all cores).")] = 0,
    as_json: Json = False,
) -> None:
    """Evaluate a model bundle on a labelled folder and print its metrics."""
    from edge_agent.toolchain.evaluate import evaluate, evaluate_detection, evaluate_unknown, public
    from edge_agent.toolchain.evaluate import plot as draw
    from edge_agent.vision.model import Model
    from edge_agent.vision.runtime import RuntimeOptions

    try:
        if plot is not None:  # before minutes of evaluation, not after
            require_extra("matplotlib", "plot", "edge-agent eval --plot")
        m = Model.load(find_bundle(model, models_dir or default_models_dir()), RuntimeOptions(intra_op_threads=threads))
        with _bar(as_json, eta=True) as bar:
            task = bar.add_task(f"eval {model}", total=None)
            progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
            if class_map and m.manifest.task == "detection":
                report = evaluate_detection(m, directory, _parse_class_map(class_map), progress)
            else:
                report = evaluate(m, directory, progress)
            if unknown is not None:
                report["unknown_set"] = evaluate_unknown(m, unknown, progress)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if plot is not None:
        try:
            draw(report, plot)
        except EdgeAgentError as exc:
            raise _fail(exc) from None
    doc = public(report)
    if as_json:
        _json(doc)
        return
    _print_report(doc)


def _parse_class_map(items: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in items:
        key, sep, label = item.partition("=")
        if not sep or not key.strip().isdigit() or not label.strip():
            raise typer.BadParameter(f"--class-map {item!r}: expected ID=LABEL, e.g. 0=cow")
        out[int(key)] = label.strip()
    return out


def _print_report(doc: dict[str, Any]) -> None:
    head = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    out.print("  ".join(f"[bold]{k}[/bold] {v}" for k, v in head.items()))
    per = doc.get("per_class")
    if isinstance(per, dict) and per and isinstance(next(iter(per.values())), dict):
        table = Table("class", "n", "recall", "precision", "rejected")
        for name, row in per.items():
            table.add_row(name, str(row.get("n", "")), str(row.get("recall", "-")), str(row.get("precision", "-")),
                          str(row.get("rejected", "-")))
        out.print(table)
    bands = doc.get("bands")
    if isinstance(bands, dict):
        out.print("[bold]answer bands[/bold] " + "  ".join(f"{k}: {v}" for k, v in bands.items())
                  + f"  [bold]top-1 with unsure/unknown counted wrong[/bold] {doc.get('top1_with_rejections')}")
    unknown = doc.get("unknown_set")
    if isinstance(unknown, dict):
        out.print(f"[bold]--unknown folder[/bold] n {unknown.get('n')}  answered unknown {unknown.get('rejected')}  "
                  f"not diagnosed (unknown or unsure) {unknown.get('not_diagnosed')}  bands {unknown.get('bands')}")
    at = doc.get("recall_at_false_reject")
    if isinstance(at, dict) and at:
        out.print("[bold]recall at false reject[/bold] " + "  ".join(f"{k}: {v}" for k, v in at.items()))
    types = doc.get("per_type")
    if isinstance(types, dict) and types:
        table = Table("defect type", "n", "recall at threshold", "auroc")
        for name, row in types.items():
            table.add_row(name, str(row.get("n", "")), str(row.get("recall", "-")), str(row.get("auroc", "-")))
        out.print(table)


def quantize_command(
    model: Annotated[str, typer.Option("--model", "-m", help="FP32 bundle to quantize.")],
    calib: Annotated[Path, typer.Option("--calib", help="Folder of calibration images (searched recursively); for "
                                        "a bundle made by `inspect fit`, its good photos (they rebuild its memory "
                                        "banks and threshold on INT8 features).")],
    eval_dir: Annotated[Path, typer.Option("--eval", help="Labelled folder for the gate (as for `eval`).")],
    out_name: Annotated[str, typer.Option("--out", help="Name of the INT8 bundle to write.")],
    models_dir: ModelsDir = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Folder of the new bundle "
                                                  "(default: <models-dir>/<out>).")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(help="Accuracy budget (fraction; 0.01 = 1 point).")] = 0.01,
    max_auroc_drop: Annotated[float, typer.Option(help="AUROC budget for anomaly models.")] = 0.01,
    runs: Annotated[int, typer.Option(help="Timed runs per model.")] = 30,
    threads: Annotated[int, typer.Option(help="Intra-op threads (0 = all cores).")] = 0,
    defects: Annotated[Path | None, typer.Option(
        "--defects", help="For an `inspect fit` bundle with a defect head: the photos of known defects it was fitted "
        "with (its head is refitted on INT8 features).", show_default=False)] = None,
    as_json: Json = False,
) -> None:
    """Static INT8 quantization (QDQ, U8 activations, S8 per-channel weights) behind an accuracy-and-speed gate.

    Writes the INT8 bundle only if it is faster than FP32 and within the budget; otherwise exits 1 with the reason.
    """
    from edge_agent.toolchain.quantize import GateConfig, quantize_and_gate

    base = models_dir or default_models_dir()
    config = GateConfig(max_accuracy_drop=max_accuracy_drop, max_auroc_drop=max_auroc_drop, latency_runs=runs,
                        threads=threads)
    try:
        require_extra("onnx", "tools", "edge-agent quantize")
        bundle = find_bundle(model, base)
        with _bar(as_json) as bar:
            task = bar.add_task("", total=None)
            report = quantize_and_gate(
                bundle, calib, eval_dir, out_dir or base / out_name, out_name, config,
                progress=lambda msg: bar.update(task, description=msg, completed=0, total=None),
                eval_progress=lambda done, total: bar.update(task, completed=done, total=total),
                defects_dir=defects,
            )
    except QuantizationGateError as exc:
        if as_json:
            _json({"passed": False, "error": exc.to_dict(), **{k: v for k, v in exc.report.items()
                                                                if not k.endswith("_report")}})
        raise _fail(exc, 1) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    doc = {k: v for k, v in report.to_dict().items() if not k.endswith("_report")}
    if as_json:
        _json(doc)
        return
    out.print(f"[green]gate passed[/green] {escape(report.reason)}")
    out.print(f"{report.metric}: FP32 {report.fp32:.4f}  INT8 {report.int8:.4f}   latency: FP32 "
              f"{report.fp32_latency_ms:.2f} ms  INT8 {report.int8_latency_ms:.2f} ms  (x{report.speedup:.2f})")


@inspect_app.command("fit")
def fit_command(
    good_dir: Annotated[Path | None, typer.Argument(
        help="Folder of photos of good parts (searched recursively). Leave it out with --add and --base to extend "
             "a fitted bundle without its original photos.", show_default=False)] = None,
    out_name: Annotated[str | None, typer.Option(
        "--out", help="Name of the anomaly bundle to write (with --add and --base: default the base's name).",
        show_default=False)] = None,
    models_dir: ModelsDir = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Folder of the new bundle "
                                                  "(default: <models-dir>/<out>).")] = None,
    add: Annotated[Path | None, typer.Option(
        "--add", help="Photos of good parts to add, e.g. the confirmed false rejects of operator feedback "
        "(<state_dir>/feedback/<pipeline>/false_reject; missed_defect photos are skipped). With GOOD_DIR: a full fit "
        "on both. Without: the --base bundle's memory banks are extended (threshold kept) and a new version written.",
        show_default=False)] = None,
    base: Annotated[str | None, typer.Option(
        "--base", help="With --add: the fitted bundle to start from (name under --models-dir, or a folder).",
        show_default=False)] = None,
    defects: Annotated[Path | None, typer.Option(
        "--defects", help="Photos of known defective parts (searched recursively; folders named good or "
        "ground_truth skipped), e.g. confirmed rejects. With GOOD_DIR: a defect head is fitted too and the score "
        "fuses both (threshold still from the good photos). With --add and --base: only reported (how many are "
        "still caught).", show_default=False)] = None,
    version: Annotated[str | None, typer.Option(
        "--version", help="With --add and --base: version of the new bundle (default: the base's with the fourth "
        "part plus one, e.g. 2.0.0 -> 2.0.0.1).", show_default=False)] = None,
    backbone: Annotated[Path | None, typer.Option(help="EfficientNet-Lite0 ONNX, or an anomaly bundle "
                                                  "made by this command (default: the shipped tile_anomaly).")] = None,
    max_false_reject: Annotated[float, typer.Option(
        "--max-false-reject", min=0.0, max=0.5,
        help="Target share of good parts rejected: the threshold is set from cross-validated scores of the "
             "good photos.")] = 0.05,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds for the threshold.")] = 20,
    coreset: Annotated[float | None, typer.Option(
        min=0.001, max=1.0, help="Fraction of patch features kept in each memory bank (default 0.1; with --add and "
        "--base: the base's, for the added parts' patches).", show_default=False)] = None,
    max_bank: Annotated[int, typer.Option(min=1, help="Upper bound on each scale's memory bank.")] = 4000,
    threads: Annotated[int, typer.Option(help="Intra-op threads (0 = all cores).")] = 0,
    as_json: Json = False,
) -> None:
    """Build a multi-scale PatchCore anomaly bundle from photos of good parts (CPU, about a minute for 300).

    With --add, teach it good parts it rejected (operator feedback): `inspect fit --add DIR --base line_a` extends
    the fitted bundle's memory banks and writes version +0.0.0.1 with the same threshold; `inspect fit GOOD_DIR
    --add DIR --out line_a` fits again on both sets. The report says how many added parts pass, out of fold.
    """
    from edge_agent.toolchain.anomaly_fit import FitConfig, fit_bundle

    base_models = models_dir or default_models_dir()
    if good_dir is None and (add is None or base is None):
        raise _fail("give GOOD_DIR (a fit), or --add DIR with --base BUNDLE (extend a fitted bundle)")
    if good_dir is not None and out_name is None:
        raise _fail("--out NAME is required for a fit")
    if version is not None and good_dir is not None:
        raise _fail("--version goes with --add and --base, without GOOD_DIR")
    config = FitConfig(coreset_fraction=coreset or FitConfig().coreset_fraction, max_bank=max_bank, folds=folds,
                       max_false_reject=max_false_reject, threads=threads)
    try:
        require_extra("onnx", "tools", "edge-agent inspect fit")
        base_dir = _bundle_dir(base, base_models) if base is not None else None
        with _bar(as_json, eta=True) as bar:
            task = bar.add_task("", total=None)
            stage = {"name": ""}

            def progress(msg: str, done: int, total: int) -> None:
                if msg != stage["name"]:  # a new stage: restart the clock so the ETA is the stage's own
                    stage["name"] = msg
                    bar.reset(task, description=msg, total=total, completed=done)
                else:
                    bar.update(task, completed=done, total=total)

            if good_dir is None:
                from edge_agent.toolchain.anomaly_refit import add_good_parts, next_version

                assert add is not None and base_dir is not None
                manifest = load_bundle(base_dir, verify=False).manifest
                name = out_name or manifest.name
                target = out_dir or base_models / name
                if out_dir is None and target.resolve() == base_dir.resolve():
                    target = base_models / f"{name}-{version or next_version(manifest.version)}"
                report = add_good_parts(base_dir, add, target, name=name, version=version, defects_dir=defects,
                                        coreset_fraction=coreset, threads=threads, progress=progress)
            elif add is not None:
                from edge_agent.toolchain.anomaly_refit import refit_with_added

                assert out_name is not None
                report = refit_with_added(good_dir, add, out_dir or base_models / out_name, out_name, config,
                                          base_dir=base_dir, backbone=backbone, progress=progress,
                                          defect_dir=defects)
            else:
                assert out_name is not None
                report = fit_bundle(good_dir, out_dir or base_models / out_name, out_name, config, backbone=backbone,
                                    progress=progress, defect_dir=defects)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if as_json:
        _json(report)
        return
    if report.get("mode") == "extend_banks":
        _print_added(report)
        return
    out.print(f"[green]wrote[/green] {escape(str(report['bundle']))}: {report['n_fit']} photos, banks "
              f"{report['bank_size']} patches, threshold {report['threshold']:.4f} (cross-validated false rejects "
              f"{report['cv_false_reject']:.1%}, target {report['max_false_reject']:.1%}), {report['seconds']:.0f} s")
    if "cv_defect_recall" in report:
        out.print(f"defect head from {report['n_defects']} defect photos: cross-validated, "
                  f"{report['cv_defect_recall']:.1%} of them caught at this threshold")
    if report.get("mode") == "refit":
        before = report.get("threshold_before")
        was = f" (was {before:.4f})" if isinstance(before, float) else ""
        got = report["added_in_bank"]
        out.print(f"added {report['added']} good parts{was}; in the new bank {got['passing']}/{got['of']} pass "
                  "(by construction: they are in the bank)")


def _bundle_dir(ref: str, models_dir: Path) -> Path:
    """A bundle folder given as a folder or as a name under ``models_dir``."""
    path = Path(ref)
    if (path / "manifest.json").is_file():
        return path
    return find_bundle(ref, models_dir, verify=False).directory


def _print_added(report: dict[str, Any]) -> None:
    b, o, a = report["added_before"], report["added_out_of_fold"], report["added_in_bank"]
    out.print(f"[green]wrote[/green] {escape(report['bundle'])}: {report['name']} {report['version']} (from "
              f"{report['base']['version']}), {report['added']} good parts added; banks "
              f"{sum(report['bank_size_before'].values())} -> {sum(report['bank_size'].values())} patches")
    out.print(f"threshold {report['threshold']:.4f}, unchanged: {report['threshold_note']}")
    out.print(f"added parts passing: before {b['passing']}/{b['of']}; out of fold ({o['folds']} folds, each part "
              f"scored by banks that learnt only the others) {o['passing']}/{o['of']}; in the new banks "
              f"{a['passing']}/{a['of']}")
    if report.get("defects"):
        d = report["defects"]
        out.print(f"known defects caught: {d['caught_before']}/{d['of']} before, {d['caught_after']}/{d['of']} after")
    if report["skipped"]:
        out.print(f"skipped {len(report['skipped'])} missed_defect photos")


@detect_app.command("fit")
def detect_fit_command(
    frames_dir: Annotated[Path, typer.Argument(help="Labelled frames in YOLO layout: images/, labels/ (class cx cy w "
                                               "h, normalised), optional classes.txt.", show_default=False)],
    out_name: Annotated[str, typer.Option("--out", help="Name of the detector bundle to write.")],
    models_dir: ModelsDir = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Folder of the new bundle "
                                                  "(default: <models-dir>/<out>).")] = None,
    base: Annotated[str, typer.Option(help="Bundle to start from (YOLOX with post-processing in its graph).")]
    = "yolox_nano",
    labels: Annotated[str | None, typer.Option(help="Class names, comma-separated (default: classes.txt).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training frames.")] = 30,
    size: Annotated[int, typer.Option(help="Square input size of the fitted model (multiple of 32).")] = 416,
    holdout: Annotated[float, typer.Option(help="Fraction of frames, the last in time order, held out to "
                                           "measure the bundle (0: none).")] = 0.2,
    gap: Annotated[float, typer.Option(help="Fraction of frames dropped between training and held-out frames.")]
    = 0.04,
    top_down: Annotated[bool, typer.Option("--top-down/--side-view", help="Camera looks down (flips and quarter "
                                           "turns are fair augmentations) or from the side.")] = True,
    threshold: Annotated[float | None, typer.Option(help="Shipped score threshold (default: best F1 on the "
                                                    "held-out frames).")] = None,
    threads: Annotated[int, typer.Option(help="Training threads.")] = 1,
    soup: Annotated[int, typer.Option(help="Fits (seeds) whose weights are averaged into the bundle; the fit time "
                                      "grows with it.")] = 1,
    int8: Annotated[bool, typer.Option("--int8", help="Also quantize; an <out>_int8 bundle is written only if the "
                                       "gate passes (as accurate on the held-out frames, and faster).")] = False,
    as_json: Json = False,
) -> None:
    """Fine-tune a detector on one camera's labelled frames (CPU, minutes; needs the 'train' extra)."""
    from edge_agent.toolchain.detect_fit import DetectFitConfig, fit_detector, gate_int8

    if size % 32 or size < 64:
        raise typer.BadParameter(f"--size {size}: must be a multiple of 32, at least 64")
    if soup < 1:
        raise typer.BadParameter(f"--soup {soup}: must be at least 1")
    root = models_dir or default_models_dir()
    names = tuple(n.strip() for n in labels.split(",") if n.strip()) if labels else ()
    config = DetectFitConfig(holdout=holdout, gap=gap, size=size, epochs=epochs, top_down=top_down,
                             score_threshold=threshold, threads=threads, labels=names, soup=soup)
    target = out_dir or root / out_name
    try:
        base_bundle = find_bundle(base, root)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=err, disable=as_json, transient=True) as bar:
            task = bar.add_task("", total=None)
            say = lambda msg, done, total: bar.update(task, description=msg, completed=done, total=total)  # noqa: E731
            report = fit_detector(frames_dir, target, out_name, config, base=base_bundle, progress=say)
            if int8:
                report["int8"] = gate_int8(target, frames_dir, config, progress=say)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if as_json:
        _json(report)
        return
    held = report.get("held_out")
    figures = (f"held-out AP50 {held['ap50']:.3f}, recall {held['recall']:.3f} and precision {held['precision']:.3f} "
               f"at score {report['score_threshold']}" if held else "nothing held out")
    out.print(f"[green]wrote[/green] {escape(report['bundle'])}: {report['n_train']} frames trained, {figures}; "
              f"{report['seconds']:.0f} s")
    if int8:
        gate = report["int8"]
        verdict = "[green]written[/green]" if gate.get("passed") else "[yellow]not written[/yellow]"
        out.print(f"INT8 {verdict}: {escape(str(gate.get('reason')))}")


# --- signed model updates (docs/model-updates.md) ---------------------------------------------------------------------

ConfigFile = Annotated[Path, typer.Option("--config", "-c", help="The agent's YAML config (its state_dir receives "
                                          "the update).", show_default=False)]


def keygen_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the key pair.", show_default=False)],
    name: Annotated[str, typer.Option("--name", help="File name stem: <name>.key and <name>.pub.")] = "edge-update",
    as_json: Json = False,
) -> None:
    """Make an Ed25519 signing key pair: <name>.key (private, mode 0600, keep it off the boards) and <name>.pub."""
    from edge_agent.updates.format import key_id
    from edge_agent.updates.keys import generate_keys, load_public_key

    try:
        private, public = generate_keys(out_dir, name)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    doc = {"private_key": str(private), "public_key": str(public), "key_id": key_id(load_public_key(public))}
    if as_json:
        _json(doc)
        return
    out.print(f"[green]wrote[/green] {escape(str(private))} (private, 0600) and {escape(str(public))} "
              f"(key id {doc['key_id']}); list the .pub under updates.trusted_keys on each agent")


def sign_command(
    bundle_dir: Annotated[Path, typer.Argument(help="The bundle folder (manifest.json + ONNX).", show_default=False)],
    key: Annotated[Path, typer.Option("--key", help="Private key from `models keygen`.", show_default=False)],
    out_file: Annotated[Path, typer.Option("--out", help="Update file to write.", show_default=False)],
    golden: Annotated[Path | None, typer.Option("--golden", help="An image the new model must label as "
                                                "--golden-label before it goes into service.")] = None,
    golden_label: Annotated[str | None, typer.Option("--golden-label", help="Expected label of --golden.")] = None,
    as_json: Json = False,
) -> None:
    """Sign a bundle into one update file (tar: signed statement of name, version and every file's sha256)."""
    from edge_agent.updates.archive import sign_bundle
    from edge_agent.updates.keys import load_private_key

    try:
        statement = sign_bundle(bundle_dir, load_private_key(key), out_file, golden=golden, golden_label=golden_label)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    doc = {"file": str(out_file), "model": statement.name, "version": statement.version,
           "files": len(statement.files), "golden": statement.golden is not None}
    if as_json:
        _json(doc)
        return
    out.print(f"[green]signed[/green] {statement.name} {statement.version} ({len(statement.files)} files) "
              f"-> {escape(str(out_file))}")


def verify_command(
    update: Annotated[Path, typer.Argument(help="Update file.", show_default=False)],
    trusted_key: Annotated[list[Path], typer.Option("--trusted-key", help="Public key to trust (repeatable).")],
    as_json: Json = False,
) -> None:
    """Check an update file the way an agent will (signature, every sha256, manifest) without installing it."""
    import shutil
    import tempfile

    from edge_agent.updates.archive import stage_update
    from edge_agent.updates.keys import load_trusted_keys

    try:
        with tempfile.TemporaryDirectory(prefix="edge-verify-") as tmp:
            staged = stage_update(update, Path(tmp), load_trusted_keys(trusted_key))
            shutil.rmtree(staged.root, ignore_errors=True)
    except EdgeAgentError as exc:
        if as_json:
            _json({"ok": False, "error": exc.to_dict()})
        raise _fail(exc, 1) from None
    s = staged.statement
    doc = {"ok": True, "model": s.name, "version": s.version, "files": len(s.files), "golden": s.golden is not None}
    if as_json:
        _json(doc)
        return
    out.print(f"[green]ok[/green] {s.name} {s.version}: signature and {len(s.files)} files verified")


def install_command(
    update: Annotated[Path, typer.Argument(help="Update file (e.g. from a USB stick).", show_default=False)],
    config: ConfigFile,
    trusted_key: Annotated[list[Path] | None, typer.Option("--trusted-key", help="Public key to trust instead of "
                                                           "updates.trusted_keys (repeatable).")] = None,
    as_json: Json = False,
) -> None:
    """Install an update offline (agent stopped): verify, smoke-test, switch; the agent runs it at its next start."""
    from edge_agent.agent.service import onnx_model_factory
    from edge_agent.config import load_config
    from edge_agent.updates.manager import install_offline

    try:
        doc = install_offline(load_config(config), update, onnx_model_factory, trusted_key or ())
    except EdgeAgentError as exc:
        if as_json:
            _json({"outcome": "rejected", "error": exc.to_dict()})
        raise _fail(exc, 1) from None
    if as_json:
        _json(doc)
        return
    out.print(f"[green]installed[/green] {doc['model']} {doc['version']} (was {doc['previous']}) in "
              f"{escape(doc['state_dir'])}")


def rollback_command(
    model: Annotated[str, typer.Argument(help="Model (manifest) name.", show_default=False)],
    config: ConfigFile,
    as_json: Json = False,
) -> None:
    """Offline rollback, with the agent stopped: the previous version (or the configured bundle) back in force."""
    from edge_agent.agent.service import onnx_model_factory
    from edge_agent.config import load_config
    from edge_agent.updates.manager import rollback_offline

    try:
        doc = rollback_offline(load_config(config), model, onnx_model_factory)
    except EdgeAgentError as exc:
        raise _fail(exc, 1) from None
    if as_json:
        _json(doc)
        return
    out.print(f"[green]rolled back[/green] {doc['model']} {doc['from_version']} -> {doc['version']}")


def register_update_commands(models_app: typer.Typer) -> None:
    """``edge-agent models keygen | sign | verify | install | rollback``."""
    models_app.command("keygen")(keygen_command)
    models_app.command("sign")(sign_command)
    models_app.command("verify")(verify_command)
    models_app.command("install")(install_command)
    models_app.command("rollback")(rollback_command)
