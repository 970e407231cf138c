"""The ``edge-agent`` command line. Thin: parse arguments, call the library, print.

Rich output for people, ``--json`` for machines. Bad input gives one clear line on stderr
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_agent import __version__
from edge_agent.bundles.bundle import default_models_dir, find_bundle, load_bundle, require_bundle_dirs
from edge_agent.cli.bench import bench_command as _bench_command
from edge_agent.cli.models import detect_app, eval_command, inspect_app, quantize_command, register_update_commands
from edge_agent.cli.run import run as _run_agent
from edge_agent.errors import EdgeAgentError, InputNotFoundError

app = typer.Typer(
    name="edge-agent",
    help="Open edge AI for farms and factories: run ONNX vision models on-device and report over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Inspect the model bundles.", no_args_is_help=True)
app.add_typer(models_app, name="models")
register_update_commands(models_app)
app.command("bench")(_bench_command)
app.command("run")(_run_agent)
app.command("eval")(eval_command)
app.command("quantize")(quantize_command)
app.add_typer(inspect_app, name="inspect")
app.add_typer(detect_app, name="detect")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ModelsDir = Annotated[
    Path,
    typer.Option("--models-dir", help="Folder of model bundles.", envvar="EDGE_AGENT_MODELS_DIR", show_default=False),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def fail(exc: EdgeAgentError | str, code: int = 2) -> typer.Exit:
    """Print one clear error line and return the Exit to raise."""
    if isinstance(exc, EdgeAgentError):
        err.print(f"[red]error[/red] {escape(f'[{exc.code}] {exc.message}')}", highlight=False)
    else:
        err.print(f"[red]error[/red] {escape(exc)}", highlight=False)
    return typer.Exit(code)


def _json_line(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _models_dir(value: Path | None) -> Path:
    return value if value is not None else default_models_dir()


def _print_version(value: bool) -> None:
    if value:
        out.print(f"edge-agent {__version__}", highlight=False)
        raise typer.Exit


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@models_app.command("list")
def models_list(models_dir: ModelsDir = None, as_json: Json = False) -> None:  # type: ignore[assignment]
    """List the model bundles and whether each is valid."""
    rows: list[dict[str, Any]] = []
    try:
        found = require_bundle_dirs(_models_dir(models_dir))
    except EdgeAgentError as exc:
        raise fail(exc) from None
    for d in found:
        try:
            m = load_bundle(d).manifest
            rows.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "task": m.task,
                    "input": f"{m.input.width}x{m.input.height} {m.input.dtype}",
                    "labels": len(m.labels),
                    "license": m.license,
                    "path": str(d),
                    "ok": True,
                }
            )
        except EdgeAgentError as exc:
            rows.append({"name": d.name, "path": str(d), "ok": False, "error": exc.to_dict()})
    if as_json:
        _json_line(rows)
        return
    table = Table("name", "version", "task", "input", "labels", "license", "status")
    for r in rows:
        status = "ok" if r["ok"] else f"[red]{r['error']['code']}[/red]"
        table.add_row(
            r["name"],
            r.get("version", ""),
            r.get("task", ""),
            r.get("input", ""),
            str(r.get("labels", "")),
            r.get("license", ""),
            status,
        )
    out.print(table)


@app.command()
def providers(as_json: Json = False) -> None:
    """Show the execution providers this machine offers and which would be used."""
    from edge_agent.vision.runtime import DEFAULT_PROVIDERS, available_providers, select_providers

    avail = available_providers()
    chosen, skipped = select_providers(DEFAULT_PROVIDERS, avail)
    if as_json:
        _json_line({"available": avail, "preference": list(DEFAULT_PROVIDERS), "selected": chosen, "skipped": skipped})
        return
    out.print(f"available: {', '.join(avail)}")
    out.print(f"selected (in order): [bold]{', '.join(chosen)}[/bold]")
    for s in skipped:
        out.print(f"  skipped: {s}")


@app.command()
def infer(
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG, PNG or WebP).", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Bundle name.")],
    models_dir: ModelsDir = None,  # type: ignore[assignment]
    threads: Annotated[int, typer.Option(help="Intra-op threads (0 = all cores).")] = 0,
    as_json: Json = False,
) -> None:
    """Run a model on images: one JSON object per image with --json."""
    from edge_agent.vision.model import Model
    from edge_agent.vision.runtime import RuntimeOptions

    try:
        m = Model.load(find_bundle(model, _models_dir(models_dir)), RuntimeOptions(intra_op_threads=threads))
        m.warmup(1)
    except EdgeAgentError as exc:
        raise fail(exc) from None
    failures = 0
    for path in images:
        try:
            try:
                data = path.read_bytes()
            except FileNotFoundError as exc:
                raise InputNotFoundError("no such file") from exc
            except OSError as exc:
                raise InputNotFoundError(f"cannot read: {exc.strerror}") from exc
            result = m.predict_bytes(data)
        except EdgeAgentError as exc:
            failures += 1
            if as_json:
                _json_line({"image": str(path), "error": exc.to_dict()})
            err.print(f"[red]error[/red] {escape(f'[{exc.code}] {path}: {exc.message}')}", highlight=False)
            continue
        doc = {"image": str(path), **result.to_dict()}
        if as_json:
            _json_line(doc)
        else:
            _print_result(str(path), doc)
    if failures:
        raise typer.Exit(1)


def _print_result(path: str, doc: dict[str, Any]) -> None:
    t = doc["timings_ms"]
    out.print(
        f"[bold]{path}[/bold]  {doc['model']} ({doc['task']})  "
        f"decode {t['decode']:.1f} ms, pre {t['preprocess']:.1f} ms, "
        f"infer {t['inference']:.1f} ms, post {t['postprocess']:.1f} ms"
    )
    if doc.get("rejected"):
        out.print("  [yellow]not recognised[/yellow] (outside what this model knows)")
    for p in doc["predictions"]:
        box = f"  box {p['box']}" if "box" in p else ""
        out.print(f"  {p['label']:<28} {p['score']:.3f}{box}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except EdgeAgentError as exc:  # last line of defence: never a traceback for expected errors
        fail(exc)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
