"""A model = manifest + runtime + pre-processing + post-processing -> ``predict()``.

``predict`` is safe to call from several threads: each thread gets its own pre-processing
buffers, and onnxruntime sessions are thread-safe.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
from pydantic import ValidationError

from edge_agent.bundles.bundle import Bundle
from edge_agent.bundles.manifest import (
    AnomalyDecoder,
    DetectionsDecoder,
    Manifest,
    NanodetDecoder,
    SoftmaxDecoder,
    Thresholds,
    Yolov8Decoder,
    YoloxDecoder,
    decoder_feeds,
)
from edge_agent.errors import ManifestError
from edge_agent.types import (
    AnomalyRegion,
    AnomalyScore,
    Band,
    Classification,
    Detection,
    Image,
    Prediction,
    PreprocessMeta,
    Result,
    Timings,
)
from edge_agent.vision import postprocess as pp
from edge_agent.vision.decode import DEFAULT_MAX_PIXELS, PixelBudget, SizeHint, decode_image
from edge_agent.vision.preprocess import Preprocessor, map_box_to_original
from edge_agent.vision.runtime import Array, OrtRuntime, Runtime, RuntimeOptions

_ms = 1000.0


class Model:
    """Runs one bundle. Build with :meth:`load`, or directly with any :class:`Runtime` (tests)."""

    def __init__(
        self,
        manifest: Manifest,
        runtime: Runtime,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        pixel_budget: PixelBudget | None = None,
    ) -> None:
        self.manifest = manifest
        self.runtime = runtime
        self.max_pixels = max_pixels
        self.pixel_budget = pixel_budget
        self._local = threading.local()
        if manifest.input.name not in runtime.input_names:
            raise ManifestError(
                f"{manifest.name}: field input.name: {manifest.input.name!r} is not an input of the model "
                f"(inputs: {', '.join(runtime.input_names)})"
            )
        missing = [o for o in _decoder_outputs(manifest) if o not in runtime.output_names]
        if missing:
            raise ManifestError(
                f"{manifest.name}: field decoder: outputs {missing} not in the model "
                f"(outputs: {', '.join(runtime.output_names)})"
            )
        extra = decoder_feeds(manifest)
        missing = [i for i in extra if i not in runtime.input_names]
        if missing:
            raise ManifestError(
                f"{manifest.name}: field decoder: inputs {missing} not in the model "
                f"(inputs: {', '.join(runtime.input_names)})"
            )
        self._extra: tuple[Thresholds, dict[str, Array]] = (manifest.thresholds, extra)

    @classmethod
    def load(cls, bundle: Bundle, options: RuntimeOptions | None = None, **kwargs: Any) -> Model:
        return cls(bundle.manifest, OrtRuntime(bundle.onnx_path, options or RuntimeOptions()), **kwargs)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def preprocessor(self) -> Preprocessor:
        """This thread's pre-processor (its buffers are reused call after call)."""
        pre: Preprocessor | None = getattr(self._local, "pre", None)
        if pre is None:
            pre = self._local.pre = Preprocessor(self.manifest.input)
        return pre

    def decode(self, data: bytes, min_side: int = 0) -> Image:
        """Decode untrusted bytes at the smallest size that loses nothing for this model (and, with ``min_side``,
        whose shorter side is at least that many pixels when the photo has them: for checks on the photo itself)."""
        need = self.preprocessor.required_size
        hint = need if min_side <= 0 else _at_least(need, min_side)
        return decode_image(data, size_hint=hint, max_pixels=self.max_pixels, budget=self.pixel_budget)

    def predict_bytes(self, data: bytes) -> Result:
        t0 = time.perf_counter()
        image = self.decode(data)
        return self.predict(image, decode_ms=(time.perf_counter() - t0) * _ms)

    def feeds(self, tensor: Array, manifest: Manifest | None = None) -> dict[str, Array]:
        """The feeds of one run: the image ``tensor`` and what the decoder needs (the thresholds of a
        ``detections`` graph), for ``manifest`` (default: the model's current one)."""
        m = manifest or self.manifest
        thresholds, extra = self._extra
        if thresholds is not m.thresholds:  # set_thresholds swapped them: build the threshold tensors once
            extra = decoder_feeds(m)
            self._extra = (m.thresholds, extra)
        return {m.input.name: tensor, **extra} if extra else {m.input.name: tensor}

    def predict(self, image: Image, *, decode_ms: float = 0.0) -> Result:
        m = self.manifest  # one snapshot: set_thresholds may swap it meanwhile
        t0 = time.perf_counter()
        tensor, meta = self.preprocessor.run(image)
        t1 = time.perf_counter()
        outputs = self.runtime.run(self.feeds(tensor, m))
        t2 = time.perf_counter()
        predictions, rejected = self._postprocess(outputs, meta, m)
        ood_score, band = self._open_set(outputs, predictions, m)
        t3 = time.perf_counter()
        return Result(
            model=self.manifest.name,
            model_version=self.manifest.version,
            task=self.manifest.task,
            predictions=predictions,
            image_size=image.original_size,
            timings=Timings(decode_ms, (t1 - t0) * _ms, (t2 - t1) * _ms, (t3 - t2) * _ms),
            rejected=rejected,
            ood_score=ood_score,
            band=band,
        )

    @staticmethod
    def _open_set(
        outputs: dict[str, Array], predictions: tuple[Prediction, ...], m: Manifest
    ) -> tuple[float | None, Band | None]:
        """A classifier's OOD score and, when the manifest has an ``open_set`` section, its answer band."""
        dec = m.decoder
        if not isinstance(dec, SoftmaxDecoder) or dec.ood_output is None:
            return None, None
        score = pp.anomaly_score(outputs[dec.ood_output])
        if m.open_set is None or m.thresholds.ood is None:
            return score, None
        top1 = predictions[0].score if predictions else 0.0
        return score, pp.open_set_band(top1, score, m.thresholds.ood, m.open_set.unsure_below, m.open_set.unsure_ood)

    def set_thresholds(self, **changes: float) -> dict[str, Any]:
        """Change score/iou (detection) or anomaly (anomaly) thresholds at run time, all or nothing.

        Raises ValueError naming the key when a change does not apply to this model's task or is
        out of range; returns the thresholds now in force. The swap is atomic for concurrent callers.
        """
        allowed = {"detection": {"score", "iou"}, "anomaly": {"anomaly"}, "classification": set()}[self.manifest.task]
        wrong = sorted(set(changes) - allowed)
        if wrong:
            raise ValueError(f"{', '.join(wrong)} does not apply to {self.manifest.task} model {self.manifest.name}")
        merged = {**self.manifest.thresholds.model_dump(), **changes}
        try:
            new = Thresholds.model_validate(merged)
        except ValidationError as exc:
            raise ValueError(str(exc.errors()[0]["msg"])) from exc
        self.manifest = self.manifest.model_copy(update={"thresholds": new})
        return new.model_dump(exclude_none=True)

    def warmup(self, runs: int = 2) -> None:
        """Run the model on a blank image so the first real request is not the slow one."""
        spec = self.manifest.input
        blank = Image.from_array(np.full((spec.height, spec.width, 3), 127, np.uint8), "RGB")
        for _ in range(runs):
            self.predict(blank)

    def _postprocess(
        self, outputs: dict[str, Array], meta: PreprocessMeta, manifest: Manifest | None = None
    ) -> tuple[tuple[Prediction, ...], bool]:
        m = manifest or self.manifest
        dec = m.decoder
        th = m.thresholds
        if isinstance(dec, SoftmaxDecoder):
            logits = np.asarray(outputs[dec.output], dtype=np.float32).reshape(-1)
            if logits.size <= pp.SMALL_CLASSES:
                idx, vals = pp.softmax_top_k_small(logits.tolist(), dec.top_k, dec.apply_softmax)
            else:
                probs = pp.softmax(logits) if dec.apply_softmax else logits
                top_idx, top_vals = pp.top_k(probs, dec.top_k)
                idx, vals = top_idx.tolist(), top_vals.tolist()
            labels = m.labels
            preds: tuple[Prediction, ...] = tuple(
                Classification(label=labels[i], score=v, index=i) for i, v in zip(idx, vals, strict=True)
            )
            rejected = False
            if dec.ood_output is not None and th.ood is not None:
                rejected = pp.anomaly_score(outputs[dec.ood_output]) > th.ood
            return preds, rejected
        if isinstance(dec, AnomalyDecoder):
            score = pp.anomaly_score(outputs[dec.score_output])
            heat = pp.anomaly_map(outputs[dec.map_output]) if dec.map_output else None
            assert th.anomaly is not None  # guaranteed by the manifest validator
            regions: tuple[AnomalyRegion, ...] = ()
            if heat is not None and dec.map_regions and score > th.anomaly:
                w_in, h_in = m.input.width, m.input.height
                level = pp.region_level(heat, th.anomaly, th.region)
                regions = tuple(
                    AnomalyRegion(box=map_box_to_original((x1 * w_in, y1 * h_in, x2 * w_in, y2 * h_in), meta),
                                  score=peak, area=area)
                    for (x1, y1, x2, y2), peak, area in pp.anomaly_regions(heat, level)
                )
            return (AnomalyScore(score=score, threshold=th.anomaly, heatmap=heat, regions=regions,
                                 map_threshold=th.region),), False
        if isinstance(dec, DetectionsDecoder):  # filtered, decoded and NMS-ed in the graph, best first
            xyxy = outputs[dec.boxes_output].tolist()
            scores = outputs[dec.scores_output].tolist()
            cls = outputs[dec.class_ids_output].tolist()
            t = th.score  # a candidate under it may survive NMS (it cannot suppress a better box): drop it here
            keep = [i for i, s in enumerate(scores) if s >= t]
            return self._detections(xyxy, scores, cls, keep, meta, m), False
        size = (m.input.width, m.input.height)
        if isinstance(dec, YoloxDecoder):
            boxes = pp.decode_yolox(outputs[dec.output], size, dec.strides, th.score)
        elif isinstance(dec, NanodetDecoder):
            boxes = pp.decode_nanodet(
                [outputs[n] for n in dec.cls_outputs],
                [outputs[n] for n in dec.reg_outputs],
                size,
                dec.strides,
                dec.reg_max,
                th.score,
            )
        else:
            assert isinstance(dec, Yolov8Decoder)
            boxes = pp.decode_yolov8(outputs[dec.output], th.score)
        if len(boxes) <= pp.SMALL_NMS:  # a real frame: a few dozen candidates, plain Python from here on
            xyxy, scores, cls = boxes.xyxy.tolist(), boxes.scores.tolist(), boxes.class_ids.tolist()
            keep = pp.batched_nms_keep(xyxy, scores, cls, th.iou, th.max_detections)
        else:
            boxes = pp.batched_nms(boxes, th.iou, th.max_detections)
            xyxy, scores, cls = boxes.xyxy.tolist(), boxes.scores.tolist(), boxes.class_ids.tolist()
            keep = list(range(len(scores)))
        return self._detections(xyxy, scores, cls, keep, meta, m), False

    @staticmethod
    def _detections(
        xyxy: list[list[float]], scores: list[float], cls: list[int], keep: list[int], meta: PreprocessMeta,
        m: Manifest,
    ) -> tuple[Prediction, ...]:
        labels = m.labels
        n_labels = len(labels)
        return tuple(
            Detection(
                label=labels[cls[i]] if 0 <= cls[i] < n_labels else str(cls[i]),
                score=scores[i],
                class_id=cls[i],
                box=map_box_to_original(xyxy[i], meta),
            )
            for i in keep
        )


def _at_least(need: SizeHint, side: int) -> SizeHint:
    def hint(width: int, height: int) -> tuple[int, int]:
        w, h = need(width, height)
        k = min(1.0, side / max(1, min(width, height)))
        return (max(w, math.ceil(width * k)), max(h, math.ceil(height * k)))

    return hint


def _decoder_outputs(manifest: Manifest) -> list[str]:
    dec = manifest.decoder
    if isinstance(dec, SoftmaxDecoder):
        return [dec.output] + ([dec.ood_output] if dec.ood_output else [])
    if isinstance(dec, AnomalyDecoder):
        return [dec.score_output] + ([dec.map_output] if dec.map_output else [])
    if isinstance(dec, NanodetDecoder):
        return [*dec.cls_outputs, *dec.reg_outputs]
    if isinstance(dec, DetectionsDecoder):
        return [dec.boxes_output, dec.scores_output, dec.class_ids_output]
    return [dec.output]
