"""The model-bundle manifest: everything needed to run one ONNX model.

Pure: parses and validates data that the caller has already read (see ``bundle.py`` for
the file side). A bundle is ``models/<name>/manifest.json`` next to the ONNX file.

Schema versions are integers; ``upgrade`` turns an older document into the current one.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.errors import ManifestError

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resize(_Strict):
    mode: Literal["stretch", "letterbox", "center_crop"] = Field(
        description="stretch: resize to W x H ignoring aspect; letterbox: keep aspect and pad; "
        "center_crop: resize the short side to size/crop_fraction then crop the centre."
    )
    pad_value: int = Field(default=114, ge=0, le=255, description="Letterbox pad value.")
    placement: Literal["top_left", "center"] = Field(
        default="center", description="Where the letterboxed image sits on the canvas."
    )
    crop_fraction: float = Field(
        default=0.875, gt=0.0, le=1.0, description="center_crop: fraction of the resized short side kept."
    )
    interpolation: Literal["linear", "linear_exact", "area", "nearest"] = Field(
        default="linear", description="OpenCV resize: linear (fast; ARM and x86 differ by one level in some pixels), "
        "linear_exact (bit-exact on every CPU), area, nearest.")


class Normalize(_Strict):
    """tensor = (pixel * scale - mean) / std, per channel in the model's colour order."""

    scale: float = Field(default=1.0, description="Multiplies raw 0..255 pixels first.")
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @model_validator(mode="after")
    def _std_nonzero(self) -> Normalize:
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self


class InputSpec(_Strict):
    name: str = Field(description="ONNX input tensor name.")
    width: int = Field(gt=0, le=8192)
    height: int = Field(gt=0, le=8192)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "uint8"] = "float32"
    color: Literal["RGB", "BGR"] = "RGB"
    resize: Resize
    normalize: Normalize = Normalize()


class SoftmaxDecoder(_Strict):
    type: Literal["softmax"]
    output: str = Field(description="Output tensor holding (1, C) logits or probabilities.")
    apply_softmax: bool = True
    top_k: int = Field(default=5, ge=1)
    ood_output: str | None = Field(
        default=None,
        description="Optional (1,) or (1, 1) output: out-of-domain score, higher = less like the training data.",
    )
    ood_label: str = Field(
        default="not_recognised", description="Label reported when the OOD score passes its threshold."
    )


class YoloxDecoder(_Strict):
    type: Literal["yolox"]
    output: str
    strides: tuple[int, ...] = (8, 16, 32)


class NanodetDecoder(_Strict):
    type: Literal["nanodet"]
    cls_outputs: tuple[str, ...] = Field(description="Per-stride (1, N, C) class scores, already sigmoid.")
    reg_outputs: tuple[str, ...] = Field(description="Per-stride (1, N, 4*(reg_max+1)) distance bins.")
    strides: tuple[int, ...] = (8, 16, 32)
    reg_max: int = 7

    @model_validator(mode="after")
    def _same_lengths(self) -> NanodetDecoder:
        if not (len(self.cls_outputs) == len(self.reg_outputs) == len(self.strides)):
            raise ValueError("cls_outputs, reg_outputs and strides must have the same length")
        return self


class Yolov8Decoder(_Strict):
    type: Literal["yolov8"]
    output: str = Field(description="(1, 4+nc, N): cx, cy, w, h in input pixels, then class scores.")


class DetectionsDecoder(_Strict):
    """Post-processing inside the graph (``toolchain.detector_heads``): filtered, decoded, class-aware NMS-ed.

    The graph takes the thresholds as 0-d inputs (fed from ``thresholds`` on every run) and returns the kept
    detections best first; boxes are x1, y1, x2, y2 in model-input pixels.
    """

    type: Literal["detections"]
    boxes_output: str = Field(default="boxes", description="(M, 4) float32 x1, y1, x2, y2, model-input pixels.")
    scores_output: str = Field(default="scores", description="(M,) float32, best first.")
    class_ids_output: str = Field(default="class_ids", description="(M,) int64 indices into labels.")
    score_threshold_input: str = Field(default="score_threshold", description="0-d float32 input.")
    iou_threshold_input: str = Field(default="iou_threshold", description="0-d float32 input.")
    max_detections_input: str = Field(default="max_detections", description="0-d int64 input.")


class AnomalyDecoder(_Strict):
    type: Literal["anomaly"]
    score_output: str = Field(description="(1,) or (1, 1) image anomaly score.")
    map_output: str | None = Field(default=None, description="Optional (1, 1, h, w) or (1, h, w) anomaly map.")
    map_regions: bool = Field(
        default=True,
        description="The map is in the score's units (the score is its maximum): the areas above the threshold "
        "are reported as boxes of anomalous regions. False for a map on another scale (no boxes).",
    )


Decoder = Annotated[
    SoftmaxDecoder | YoloxDecoder | NanodetDecoder | Yolov8Decoder | DetectionsDecoder | AnomalyDecoder,
    Field(discriminator="type"),
]


class Thresholds(_Strict):
    score: float = Field(default=0.3, ge=0.0, le=1.0, description="Detections below are dropped.")
    iou: float = Field(default=0.45, ge=0.0, le=1.0, description="NMS IoU threshold.")
    max_detections: int = Field(default=100, ge=1)
    anomaly: float | None = Field(default=None, description="Image score above which a part is anomalous.")
    ood: float | None = Field(default=None, description="OOD score above which an input is rejected.")
    region: float | None = Field(
        default=None, description="Anomaly bundles whose score fuses other evidence: the anomaly-map level above "
        "which cells form the reported regions (default: thresholds.anomaly).")


class OpenSet(_Strict):
    """Three answer bands of a classifier with an OOD score (``decoder.ood_output``): ``known`` (a confident answer),
    ``unsure`` (one of the known classes is likely, but not sure: show the top two, ask for another photo) and
    ``unknown`` (OOD score above ``thresholds.ood``: not something this model knows)."""

    unsure_below: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Top-1 probability below which a known-looking input is 'unsure'."
    )
    unsure_ood: float | None = Field(
        default=None,
        description="Optional: OOD score above which (and up to thresholds.ood) the answer is 'unsure'.",
    )


class Manifest(_Strict):
    schema_version: int = Field(description="Integer schema version of this document.")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")
    version: str = Field(default="1.0.0", min_length=1, max_length=32)
    task: Literal["classification", "detection", "anomaly"]
    model_file: str = Field(pattern=r"^[A-Za-z0-9_.\-]+\.onnx$", description="ONNX file beside the manifest.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    license: str
    source: str
    description: str = ""
    input: InputSpec
    decoder: Decoder
    labels: tuple[str, ...] = Field(min_length=1)
    label_aliases: dict[str, str] = Field(
        default_factory=dict, description="Dataset folder name -> model label, for evaluation."
    )
    thresholds: Thresholds = Thresholds()
    open_set: OpenSet | None = Field(
        default=None, description="Answer bands (known / unsure / unknown) of a classifier with an OOD score."
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form: metrics, training recipe.")

    @model_validator(mode="after")
    def _task_matches_decoder(self) -> Manifest:
        expected = {
            "softmax": "classification",
            "yolox": "detection",
            "nanodet": "detection",
            "yolov8": "detection",
            "detections": "detection",
            "anomaly": "anomaly",
        }[self.decoder.type]
        if expected != self.task:
            raise ValueError(f"decoder {self.decoder.type!r} does not fit task {self.task!r}")
        if self.task == "anomaly" and self.thresholds.anomaly is None:
            raise ValueError("anomaly bundles need thresholds.anomaly")
        if self.open_set is not None:
            dec = self.decoder
            if not isinstance(dec, SoftmaxDecoder) or dec.ood_output is None or self.thresholds.ood is None:
                raise ValueError("open_set needs a softmax decoder with ood_output and thresholds.ood")
            if self.open_set.unsure_ood is not None and self.open_set.unsure_ood > self.thresholds.ood:
                raise ValueError("open_set.unsure_ood must not be above thresholds.ood")
        return self


def decoder_feeds(manifest: Manifest) -> dict[str, npt.NDArray[Any]]:
    """Inputs besides the image that the decoder needs on every run: the thresholds of a ``detections`` graph."""
    dec = manifest.decoder
    if not isinstance(dec, DetectionsDecoder):
        return {}
    th = manifest.thresholds
    return {
        dec.score_threshold_input: np.array(th.score, np.float32),
        dec.iou_threshold_input: np.array(th.iou, np.float32),
        dec.max_detections_input: np.array(th.max_detections, np.int64),
    }


def upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """Bring an older manifest document to SCHEMA_VERSION (pure; returns a new dict)."""
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError("schema_version must be an integer")
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this agent understands ({SCHEMA_VERSION})")
    return dict(doc)


def parse_manifest(text: str | bytes, source: str = "manifest.json") -> Manifest:
    """Parse and validate a manifest; errors name ``source`` and the offending field."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: top level must be an object")
    try:
        doc = upgrade(doc)
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise ManifestError(f"{source}: field {loc}: {err['msg']}") from exc
    except ValueError as exc:
        raise ManifestError(f"{source}: field schema_version: {exc}") from exc
