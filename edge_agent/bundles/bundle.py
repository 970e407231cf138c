"""Model bundles on disk: ``<dir>/manifest.json`` + the ONNX file it names, checked by sha256."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.bundles.manifest import Manifest, parse_manifest
from edge_agent.errors import ChecksumError, ManifestError, ModelNotFoundError
from edge_agent.fsutil import sha256_file

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.manifest.model_file

    @property
    def name(self) -> str:
        return self.manifest.name




SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
"""Where an installed wheel keeps its bundles (the repo's ``models/`` folder, packaged; see setup.py)."""

CHECKOUT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
"""The ``models/`` folder of a source checkout, where ``make models`` and the import scripts write bundles."""

MODELS_DIR_HINT = "set models_dir in the config, --models-dir or EDGE_AGENT_MODELS_DIR"


def default_models_dir() -> Path:
    """The bundled models: ``edge_agent/bundles/shipped/`` in an installed wheel, else ``models/`` of this checkout."""
    return SHIPPED_DIR if SHIPPED_DIR.is_dir() else CHECKOUT_MODELS_DIR


def load_bundle(directory: Path, *, verify: bool = True) -> Bundle:
    """Read and validate ``directory/manifest.json``; with ``verify`` check the ONNX sha256."""
    manifest_path = directory / MANIFEST_NAME
    try:
        text = manifest_path.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(f"{manifest_path}: missing") from exc
    except OSError as exc:
        raise ManifestError(f"{manifest_path}: unreadable: {exc}") from exc
    manifest = parse_manifest(text, source=str(manifest_path))
    bundle = Bundle(directory=directory, manifest=manifest)
    onnx_path = bundle.onnx_path
    if not onnx_path.is_file():
        raise ManifestError(f"{manifest_path}: field model_file: {manifest.model_file} not found beside the manifest")
    if verify:
        actual = sha256_file(onnx_path)
        if actual != manifest.sha256:
            raise ChecksumError(
                f"{manifest_path}: field sha256: {manifest.model_file} has sha256 {actual}, "
                f"manifest says {manifest.sha256}"
            )
    return bundle


def list_bundle_dirs(models_dir: Path) -> list[Path]:
    """Sub-folders of ``models_dir`` that hold a manifest, sorted by name."""
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if (p / MANIFEST_NAME).is_file())


def require_bundle_dirs(models_dir: Path) -> list[Path]:
    """:func:`list_bundle_dirs`, where a missing folder, or one without bundles, is an error naming it."""
    if not models_dir.is_dir():
        raise ModelNotFoundError(f"models_dir {models_dir} does not exist or is not a folder ({MODELS_DIR_HINT})")
    found = list_bundle_dirs(models_dir)
    if not found:
        raise ModelNotFoundError(
            f"no model bundles in {models_dir}: no <bundle>/{MANIFEST_NAME} there ({MODELS_DIR_HINT})"
        )
    return found


def find_bundle(name: str, models_dir: Path, *, verify: bool = True) -> Bundle:
    """The bundle called ``name`` (folder name or manifest name) under ``models_dir``."""
    direct = models_dir / name
    if (direct / MANIFEST_NAME).is_file():
        return load_bundle(direct, verify=verify)
    for d in require_bundle_dirs(models_dir):
        try:
            b = load_bundle(d, verify=False)
        except ManifestError:
            continue
        if b.manifest.name == name:
            return load_bundle(d, verify=verify) if verify else b
    known = ", ".join(d.name for d in list_bundle_dirs(models_dir)) or "none"
    raise ModelNotFoundError(f"unknown model {name!r} in {models_dir} (known: {known})")
