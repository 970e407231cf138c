"""The smoke test: a freshly loaded model must run on a blank image with outputs of the right shape (and give the
golden image its label, when the update ships one)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from edge_agent.bundles.bundle import Bundle
from edge_agent.bundles.manifest import AnomalyDecoder, SoftmaxDecoder, decoder_feeds
from edge_agent.errors import (
    EdgeAgentError,
    UpdateSmokeTestError,
)
from edge_agent.types import Image

log = logging.getLogger(__name__)

# --- smoke test -------------------------------------------------------------------------------------------------------


class Smokeable(Protocol):
    def predict(self, image: Any) -> Any: ...
    def predict_bytes(self, data: bytes) -> Any: ...


def smoke_test(model: Smokeable, bundle: Bundle, golden: tuple[bytes, str] | None = None) -> dict[str, Any]:
    """Run a freshly loaded model on a blank image (and the golden image); raises UpdateSmokeTestError."""
    m = bundle.manifest
    spec = m.input
    blank = Image.from_array(np.full((spec.height, spec.width, 3), 127, np.uint8), "RGB")
    try:
        result = model.predict(blank)
        _check_outputs(model, bundle, blank)
    except UpdateSmokeTestError:
        raise
    except Exception as exc:
        msg = exc.message if isinstance(exc, EdgeAgentError) else f"{type(exc).__name__}: {exc}"
        raise UpdateSmokeTestError(f"{m.name} {m.version} fails on a blank image: {msg}") from exc
    if (result.model, result.model_version) != (m.name, m.version):
        raise UpdateSmokeTestError(f"{m.name} {m.version}: the loaded model reports {result.model} "
                                   f"{result.model_version}")
    report: dict[str, Any] = {"blank": [p.to_dict() for p in result.predictions][:3]}
    if golden is not None:
        data, label = golden
        try:
            top = model.predict_bytes(data).predictions
        except Exception as exc:
            raise UpdateSmokeTestError(f"{m.name} {m.version} fails on the golden image: {exc}") from exc
        got = getattr(top[0], "label", None) if top else None
        if got != label:
            raise UpdateSmokeTestError(f"{m.name} {m.version} labels the golden image {got!r}, expected {label!r}")
        report["golden"] = label
    return report


def _check_outputs(model: Smokeable, bundle: Bundle, blank: Any) -> None:
    """Raw output shapes against the manifest, when the model exposes its runtime (``vision.model.Model`` does)."""
    runtime, pre = getattr(model, "runtime", None), getattr(model, "preprocessor", None)
    if runtime is None or pre is None:
        return
    m = bundle.manifest
    tensor, _meta = pre.run(blank)
    outputs = runtime.run({m.input.name: tensor, **decoder_feeds(m)})
    for name, value in outputs.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value)):
            raise UpdateSmokeTestError(f"{m.name} {m.version}: output {name} is not finite on a blank image")
    dec = m.decoder
    if isinstance(dec, SoftmaxDecoder):
        n = int(np.asarray(outputs[dec.output]).size)
        if n != len(m.labels):
            raise UpdateSmokeTestError(
                f"{m.name} {m.version}: output {dec.output} has {n} classes, the manifest {len(m.labels)} labels"
            )
    elif isinstance(dec, AnomalyDecoder) and np.asarray(outputs[dec.score_output]).size < 1:
        raise UpdateSmokeTestError(f"{m.name} {m.version}: output {dec.score_output} is empty")
