"""``edge-agent detect fit``: adapt the bundled YOLOX-Nano detector to one camera from its labelled frames, on a CPU.

FRAMES_DIR is in YOLO layout: ``images/``, ``labels/<stem>.txt`` (one ``class cx cy w h`` line per box, normalised;
an empty file is a frame with nothing in it) and an optional ``classes.txt`` (one name a line; looked up in
FRAMES_DIR, then its parent). Every label line is checked first; a bad one stops the fit with a
:class:`DatasetError` naming the file and line.

Recipe (chosen by measurement, see ``models/cattle_overhead/MODEL_CARD.md``): the frames are sorted by name (the
camera's time order), the last ``holdout`` fraction is kept aside as one block with ``gap`` frames dropped before
it (no neighbouring frames on both sides), and YOLOX-Nano (COCO, Apache-2.0) is fine-tuned on the rest, its backbone
frozen and its neck and head trained, with YOLOX's own loss and augmentation
(:mod:`edge_agent.toolchain.detect_train`, ``train`` extra). ``holdout=0`` fits every frame and measures nothing
(``models/training/cattle_cv.py`` cross-validates a recipe in temporal folds instead).
The trained weights are written back into the bundled graph (its class convolutions cut to the new classes), which
keeps the post-processing and uint8 input in the graph (decoder ``detections``), so the bundle runs with
onnxruntime alone. The held-out block is then scored by the real bundle (AP50, recall and precision at the
shipped score threshold) and the figures go into the manifest and the model card stub.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.bundles.bundle import MANIFEST_NAME, Bundle, find_bundle, load_bundle
from edge_agent.errors import (
    DatasetError,
    EdgeAgentError,
    InputNotFoundError,
    ManifestError,
    QuantizationGateError,
    require_extra,
)
from edge_agent.fsutil import sha256_file
from edge_agent.toolchain import detector_heads
from edge_agent.toolchain.evaluate import IMAGE_SUFFIXES
from edge_agent.vision.decode import decode_image

log = logging.getLogger(__name__)

FitProgress = Callable[[str, int, int], None]
"""(stage, done, total)"""
F32 = npt.NDArray[np.float32]
DEFAULT_BASE = "yolox_nano"
EDGE = 0.005
"""Tolerance (normalised) for boxes that poke out of the frame by rounding; they are clipped."""


# ----------------------------------------------------------------------------------------------- the frames


@dataclass(frozen=True)
class Frame:
    image: Path
    boxes: tuple[tuple[int, float, float, float, float], ...]
    """(class id, cx, cy, w, h), normalised to the image, clipped to it."""


def natural_key(path: Path) -> list[int | str]:
    """Sort key that puts frame_9 before frame_10 (the camera's time order for numbered frames)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def read_classes(root: Path) -> list[str] | None:
    for folder in (root, root.parent):
        path = folder / "classes.txt"
        if path.is_file():
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not names:
                raise DatasetError(f"{path}: no class names")
            return names
    return None


def parse_label_file(path: Path, n_classes: int | None) -> tuple[tuple[int, float, float, float, float], ...]:
    """Parse and check one YOLO label file; raises :class:`DatasetError` naming ``path`` and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    boxes = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{number}"
        if len(parts) != 5:
            raise DatasetError(f"{where}: expected 'class cx cy w h', got {len(parts)} fields")
        try:
            cid_f, cx, cy, w, h = (float(v) for v in parts)
        except ValueError:
            raise DatasetError(f"{where}: not a number in {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in (cid_f, cx, cy, w, h)):
            raise DatasetError(f"{where}: not a finite number in {line.strip()!r}")
        if cid_f != int(cid_f) or cid_f < 0:
            raise DatasetError(f"{where}: class id {parts[0]!r} is not a non-negative integer")
        cid = int(cid_f)
        if n_classes is not None and cid >= n_classes:
            raise DatasetError(f"{where}: unknown class id {cid} (classes.txt has {n_classes}: 0-{n_classes - 1})")
        if w <= 0 or h <= 0:
            raise DatasetError(f"{where}: box width and height must be > 0, got w={w} h={h}")
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        if min(x1, y1) < -EDGE or max(x2, y2) > 1 + EDGE:
            raise DatasetError(f"{where}: box out of range: cx cy w h must be normalised to 0-1 and the box must "
                               f"lie inside the image (x {x1:.3f}..{x2:.3f}, y {y1:.3f}..{y2:.3f})")
        if min(x1, y1) < 0 or max(x2, y2) > 1:  # within the tolerance: clip
            x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(1.0, x2), min(1.0, y2)
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        boxes.append((cid, cx, cy, w, h))
    return tuple(boxes)


def read_frames(root: Path, labels: Sequence[str] | None = None) -> tuple[list[Frame], list[str]]:
    """Frames in time order and the class names; every label file checked (see :func:`parse_label_file`)."""
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise InputNotFoundError(f"{root}: no images/ folder (expected YOLO layout: images/, labels/)")
    if not lab_dir.is_dir():
        raise InputNotFoundError(f"{root}: no labels/ folder (expected YOLO layout: images/, labels/)")
    names = list(labels) if labels else read_classes(root)
    images = sorted((p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=natural_key)
    if not images:
        raise InputNotFoundError(f"{img_dir}: no images")
    frames = []
    for img in images:
        label = lab_dir / f"{img.stem}.txt"
        if not label.is_file():
            raise DatasetError(f"{label}: missing label file for {img.name} (an empty file means no objects)")
        frames.append(Frame(img, parse_label_file(label, len(names) if names else None)))
    if names is None:
        top = max((b[0] for f in frames for b in f.boxes), default=0)
        names = [f"class_{i}" for i in range(top + 1)]
    if not any(f.boxes for f in frames):
        raise DatasetError(f"{lab_dir}: no boxes in any label file")
    return frames, names


def temporal_split(n: int, holdout: float, gap: int) -> tuple[list[int], list[int]]:
    """Indices (train, held out) of ``n`` frames in time order: the last ``holdout`` fraction is held out as one
    block and the ``gap`` frames before it are used by neither side."""
    if holdout <= 0:
        return list(range(n)), []
    k = max(1, round(n * holdout))
    start = n - k
    train_end = max(0, start - gap)
    if train_end < 2:
        raise DatasetError(f"{n} frames are too few for a {holdout:.0%} hold-out with a gap of {gap} frames")
    return list(range(train_end)), list(range(start, n))


def load_frame(frame: Frame) -> tuple[npt.NDArray[np.uint8], F32]:
    """BGR pixels (as the agent decodes them: EXIF orientation applied) and boxes (N, 5) x1 y1 x2 y2 class."""
    try:
        image = decode_image(frame.image.read_bytes(), fast_jpeg=False)
    except (EdgeAgentError, OSError) as exc:
        raise DatasetError(f"{frame.image}: {exc}") from exc
    px = image.pixels if image.color == "BGR" else image.pixels[:, :, ::-1]
    h, w = px.shape[:2]
    b = np.array([[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h, c]
                  for c, cx, cy, bw, bh in frame.boxes], np.float32).reshape(-1, 5)
    return np.ascontiguousarray(px), b


# ----------------------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class YoloxHead:
    """Where a YOLOX graph's decoupled head ends, per level (stride 8, 16, 32)."""

    raw: str
    """The (1, 5 + C, N) concatenation the post-processing reads."""
    reg: tuple[str, ...]
    obj: tuple[str, ...]
    """Objectness logits (before their Sigmoid)."""
    cls: tuple[str, ...]
    """Class logits (before their Sigmoid)."""
    cls_weights: tuple[tuple[str, str], ...]
    """(weight, bias) initializers of each level's class convolution."""
    reshape_shapes: tuple[str, ...]
    """Initializers holding each level's (1, 5 + C, -1) shape."""
    strides: tuple[int, ...] = (8, 16, 32)

    def outputs(self) -> list[str]:
        return [t for lvl in zip(self.reg, self.obj, self.cls, strict=True) for t in lvl]


def find_yolox_head(model: Any) -> YoloxHead:
    """Locate the head of a YOLOX export (``raw`` = Concat of per-level Reshapes of Concat(reg, σ(obj), σ(cls)))."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    raw = g.output[0].name
    top = producer.get(raw)
    if top is None or top.op_type != "Concat" or len(top.input) != 3:
        raise ManifestError("base model: not a YOLOX graph (its output is not a concatenation of three levels)")
    reg, obj, cls, weights, shapes = [], [], [], [], []
    for name in top.input:
        reshape = producer.get(name)
        level = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        if reshape is None or level is None or level.op_type != "Concat" or len(level.input) != 3:
            raise ManifestError("base model: not a YOLOX graph (a level is not Reshape(Concat(reg, obj, cls)))")
        sig_obj, sig_cls = producer.get(level.input[1]), producer.get(level.input[2])
        if sig_obj is None or sig_cls is None or sig_obj.op_type != "Sigmoid" or sig_cls.op_type != "Sigmoid":
            raise ManifestError("base model: not a YOLOX graph (objectness and classes are not sigmoids)")
        conv = producer.get(sig_cls.input[0])
        if conv is None or conv.op_type != "Conv" or len(conv.input) < 3:
            raise ManifestError("base model: not a YOLOX graph (no class convolution)")
        reg.append(level.input[0])
        obj.append(sig_obj.input[0])
        cls.append(sig_cls.input[0])
        weights.append((conv.input[1], conv.input[2]))
        shapes.append(reshape.input[1])
    return YoloxHead(raw, tuple(reg), tuple(obj), tuple(cls), tuple(weights), tuple(shapes))


def base_graph(bundle: Bundle) -> tuple[Any, YoloxHead]:
    """The bundle's graph without its post-processing (it ends at the raw head), and where its head is."""
    import onnx

    if bundle.manifest.task != "detection" or bundle.manifest.decoder.type != "detections":
        raise ManifestError(f"{bundle.name}: the base must be a detector with post-processing in its graph "
                            "(decoder 'detections', e.g. yolox_nano)")
    model = onnx.load(str(bundle.onnx_path))
    if detector_heads.detach_head(model) is None:
        raise ManifestError(f"{bundle.name}: no post-processing nodes in the graph")
    return model, find_yolox_head(model)


def class_init(model: Any, head: YoloxHead, base_labels: Sequence[str], labels: Sequence[str]) -> dict[str, F32]:
    """New class convolutions for ``labels``: a class the base knows starts from its row, others from the mean."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, F32] = {}
    index = {name: i for i, name in enumerate(base_labels)}
    for w_name, b_name in head.cls_weights:
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        b = numpy_helper.to_array(inits[b_name]).astype(np.float32)
        rows = [index.get(name) for name in labels]
        out[w_name] = np.stack([w[r] if r is not None else w.mean(0) for r in rows]).astype(np.float32)
        out[b_name] = np.array([b[r] if r is not None else b.mean() for r in rows], np.float32)
    return out


def write_graph(model: Any, head: YoloxHead, weights: dict[str, F32], n_classes: int, size: int, path: Path) -> None:
    """``model`` with ``weights`` written in, the head cut to ``n_classes``, input ``size``, post-processing and
    the uint8 input in the graph; saved to ``path``."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    for init in g.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
        elif init.name in head.reshape_shapes:
            init.CopyFrom(numpy_helper.from_array(np.array([1, 5 + n_classes, -1], np.int64), init.name))
    dims = g.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = size
    dims[3].dim_value = size
    del g.output[:]
    g.node.append(helper.make_node("Transpose", [head.raw], ["output"], perm=[0, 2, 1], name="pp_raw_transpose"))
    g.output.append(helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, None, 5 + n_classes]))
    detector_heads.add_yolox_postprocess(model, (size, size), head.strides, "output")
    model.producer_name = "edge-agent detect fit"
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class DetectFitConfig:
    holdout: float = 0.2
    """Fraction of frames (the last ones in time order) held out to measure the bundle; 0: none."""
    gap: float = 0.04
    """Fraction of frames dropped between the training frames and the held-out block."""
    size: int = 416
    epochs: int = 30
    batch: int = 8
    lr: float = 3e-3
    train_scope: str = "neck_head"
    """neck_head (backbone frozen) | head (the decoupled head only) | all: see models/cattle_overhead/MODEL_CARD.md."""
    top_down: bool = True
    """The camera looks down: vertical flips and quarter turns are fair augmentations."""
    mosaic: float = 0.5
    zoom_out: float = 0.0
    """Share of training canvases that are a grid of 2x2 to 4x4 shrunk frames (small, many animals)."""
    aspect: float = 0.0
    """Aspect-ratio jitter of the training frames (0.3: widths stretched by 1/1.3 to 1.3)."""
    saturation: float = 0.0
    """Colour saturation jitter of the training frames."""
    backbone_lr: float = 0.0
    """Learning rate of the convolutions ``train_scope`` leaves out, as a fraction of ``lr`` (0: frozen)."""
    seed: int = 0
    soup: int = 1
    """Fits averaged into the shipped weights (a "model soup"): seeds ``seed`` to ``seed + soup - 1`` from the same
    COCO start, their EMA weights averaged (models/cattle_overhead/MODEL_CARD.md); the fit time grows by ``soup``."""
    threads: int = 1
    """Torch threads. 1 by default: on a busy 2-core board two threads ran 4-7x slower than one (barrier waits)."""
    score_threshold: float | None = None
    """Shipped score threshold; None: the one with the best F1 on the held-out frames (0.3 without them)."""
    iou_threshold: float = 0.45
    labels: tuple[str, ...] = ()
    """Class names (overrides classes.txt)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Trainer options passed through (experiments)."""


def fit_detector(
    frames_dir: Path,
    out_dir: Path,
    name: str,
    config: DetectFitConfig = DetectFitConfig(),
    base: Bundle | None = None,
    progress: FitProgress | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Fit a detector bundle ``name`` in ``out_dir`` from ``frames_dir``; returns the fit report."""
    t0 = time.perf_counter()
    say = progress or (lambda _stage, _done, _total: None)
    frames, labels = read_frames(frames_dir, config.labels or None)
    gap = round(len(frames) * config.gap) if config.holdout > 0 else 0
    train_idx, test_idx = temporal_split(len(frames), config.holdout, gap)
    base_bundle = base or find_bundle(DEFAULT_BASE, _models_dir())
    model, head = base_graph(base_bundle)
    t_train = time.perf_counter()
    weights = _train(model, head, base_bundle, labels, frames, train_idx, config, say)
    t_train = time.perf_counter() - t_train
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = f"{name}.onnx"
    write_graph(model, head, weights, len(labels), config.size, out_dir / model_file)
    manifest = _manifest(name, model_file, out_dir, base_bundle, labels, config, source or frames_dir.name)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    report: dict[str, Any] = {
        "bundle": str(out_dir), "name": name, "labels": labels, "n_frames": len(frames),
        "n_train": len(train_idx), "n_gap": gap if test_idx else 0, "n_held_out": len(test_idx),
        "train_boxes": sum(len(frames[i].boxes) for i in train_idx),
        "held_out_boxes": sum(len(frames[i].boxes) for i in test_idx),
        "held_out_first": frames[test_idx[0]].image.name if test_idx else None,
        "seconds_train": round(t_train, 1),
    }
    threshold = config.score_threshold if config.score_threshold is not None else 0.3
    if test_idx:
        from edge_agent.toolchain.evaluate import detection_report
        from edge_agent.vision.model import Model
        from edge_agent.vision.runtime import RuntimeOptions

        fitted = Model.load(load_bundle(out_dir), RuntimeOptions(intra_op_threads=config.threads))
        items = [(frames[i].image, frames_dir / "labels" / f"{frames[i].image.stem}.txt") for i in test_idx]
        held = detection_report(fitted, items, progress=lambda d, t: say("measuring held-out frames", d, t))
        if config.score_threshold is None:
            threshold = float(held["best_f1_threshold"])
        report["held_out"] = {k: held[k] for k in ("n", "n_truth", "ap50", "best_f1_threshold")}
    manifest["thresholds"]["score"] = round(threshold, 4)
    report["score_threshold"] = manifest["thresholds"]["score"]
    if test_idx:
        report["held_out"].update(_at_threshold(held, threshold))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    manifest["metadata"]["fit"] = {k: v for k, v in report.items() if k not in ("bundle", "name")}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    load_bundle(out_dir)
    _copy_licences(base_bundle, out_dir)
    if not (out_dir / "MODEL_CARD.md").exists():
        (out_dir / "MODEL_CARD.md").write_text(model_card_stub(report, manifest, frames_dir))
    log.info("fitted %s on %d frames in %.0f s", name, len(train_idx), report["seconds"])
    return report


def _train(
    model: Any, head: YoloxHead, base: Bundle, labels: Sequence[str], frames: Sequence[Frame],
    indices: Sequence[int], config: DetectFitConfig, say: FitProgress,
) -> dict[str, F32]:
    """Trained convolution weights (by initializer name) from ``frames[indices]``."""
    say("loading frames", 0, len(indices))
    data = []
    for k, i in enumerate(indices):
        data.append(load_frame(frames[i]))
        say("loading frames", k + 1, len(indices))
    require_extra("torch", "train", "edge-agent detect fit")
    from edge_agent.toolchain import detect_train
    tc = detect_train.TrainConfig(
        size=config.size, epochs=config.epochs, batch=config.batch, lr=config.lr,
        augment=detect_train.Augment(mosaic=config.mosaic, top_down=config.top_down, zoom_out=config.zoom_out,
                                     aspect=config.aspect, saturation=config.saturation),
        seed=config.seed, threads=config.threads, frozen_lr=config.backbone_lr, **config.extra,
    )
    override = class_init(model, head, base.manifest.labels, labels)
    n = max(1, config.soup)
    runs = []
    for k in range(n):
        stage = "training" if n == 1 else f"training {k + 1}/{n}"

        def report(step: int, total: int, _loss: float, stage: str = stage) -> None:
            say(stage, step, total)

        runs.append(detect_train.train(model, head.outputs(), head.strides, override, data,
                                       replace(tc, seed=config.seed + k), _scope(model, head, config.train_scope),
                                       progress=report))
    return soup_weights(runs)


def soup_weights(runs: Sequence[dict[str, F32]]) -> dict[str, F32]:
    """The element-wise mean of several fits' weights (by initializer name) from the same start."""
    return {k: np.mean([r[k] for r in runs], axis=0).astype(np.float32) for k in runs[0]}


def _at_threshold(held: dict[str, Any], threshold: float) -> dict[str, Any]:
    from edge_agent.toolchain.evaluate import recall_precision

    return recall_precision(held["_matches"], held["n_truth"], threshold)


def _scope(model: Any, head: YoloxHead, scope: str) -> Callable[[str], bool]:
    """Which convolution initializers train: ``all``; ``neck_head`` (the backbone frozen: from the convolution
    feeding the first upsampling on); ``head`` (the convolutions only one level's outputs depend on)."""
    if scope == "all":
        return lambda _name: True
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}

    def ancestors(tensors: Sequence[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(tensors)
        while todo:
            node = producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen

    convs = [n for n in g.node if n.op_type == "Conv"]
    if scope == "head":
        levels = [ancestors([r, o, c]) for r, o, c in zip(head.reg, head.obj, head.cls, strict=True)]
        own = set().union(*(lvl - set().union(*(o for o in levels if o is not lvl)) for lvl in levels))
        names = {x for n in convs if n.name in own for x in n.input[1:]}
    elif scope == "neck_head":
        resize = next(n for n in g.node if n.op_type == "Resize")
        frozen = ancestors([resize.input[0]])
        lateral = next(n for n in reversed(convs) if n.name in frozen)  # the convolution feeding the upsampling
        frozen -= {lateral.name}
        names = {x for n in convs if n.name not in frozen for x in n.input[1:]}
    else:
        raise ValueError(f"train_scope {scope!r}: expected all, neck_head or head")
    return lambda name: name in names


def _models_dir() -> Path:
    from edge_agent.bundles.bundle import default_models_dir

    return default_models_dir()


def _manifest(name: str, model_file: str, out_dir: Path, base: Bundle, labels: Sequence[str],
              config: DetectFitConfig, source: str) -> dict[str, Any]:
    b = base.manifest
    inp = b.input.model_dump(mode="json", exclude_unset=True)
    inp["width"] = inp["height"] = config.size
    return {
        "schema_version": 1,
        "name": name,
        "version": "1.0.0",
        "task": "detection",
        "model_file": model_file,
        "sha256": sha256_file(out_dir / model_file),
        "license": f"{b.license} (base weights: {b.name}); fine-tuned on {source}: see MODEL_CARD.md",
        "source": f"edge-agent detect fit of {b.name} {b.version} on {source}",
        "description": f"YOLOX-Nano fine-tuned on one camera's frames ({', '.join(labels)}), {config.size}x"
                       f"{config.size}; uint8 input, post-processing (filter, decode, class-aware NMS) in the graph.",
        "input": inp,
        "decoder": {"type": "detections"},
        "labels": list(labels),
        "thresholds": {"score": 0.3, "iou": config.iou_threshold, "max_detections": 100},
        "metadata": {
            "quantize": b.metadata.get("quantize", {}),
            "recipe": {k: v for k, v in asdict(config).items() if k not in ("labels", "extra")} | config.extra,
        },
    }


def _copy_licences(base: Bundle, out_dir: Path) -> None:
    for f in base.directory.iterdir():
        if f.name.startswith("LICENSE") and f.is_file():
            shutil.copyfile(f, out_dir / f.name)


def model_card_stub(report: dict[str, Any], manifest: dict[str, Any], frames_dir: Path) -> str:
    held = report.get("held_out")
    figures = (
        f"| AP50 (IoU 0.5) | {held['ap50']:.3f} |\n"
        f"| recall at score {report['score_threshold']} | {held['recall']:.3f} |\n"
        f"| precision at score {report['score_threshold']} | {held['precision']:.3f} |\n"
        if held else "| (no frames held out: nothing measured) | |\n"
    )
    return f"""# {manifest['name']}: model card (stub written by `edge-agent detect fit`)

{manifest['description']}

## Data
- Frames: `{frames_dir}`: {report['n_frames']} frames, classes {', '.join(report['labels'])}.
- Trained on the first {report['n_train']} frames in time order ({report['train_boxes']} boxes); the last
  {report['n_held_out']} frames (from `{report.get('held_out_first')}`, {report['held_out_boxes']} boxes) were held
  out, {report['n_gap']} frames between them dropped.
- **Licence of the frames: fill in.** The fitted weights derive from them and from {manifest['license']}.

## Figures on the held-out frames (FP32, this bundle)
| metric | value |
| --- | --- |
{figures}
Fit time: {report['seconds']:.0f} s ({report['seconds_train']:.0f} s training).

## Limits
Measured on frames of the same camera as the training frames: another camera, angle or light needs its own
frames and its own fit.
"""


def link_split(frames: Sequence[Frame], frames_dir: Path, folder: Path) -> Path:
    """A YOLO folder of symbolic links to ``frames`` (images/ + labels/), for the evaluation and gate tools."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for f in frames:
        (folder / "images" / f.image.name).symlink_to(f.image.resolve())
        label = frames_dir / "labels" / f"{f.image.stem}.txt"
        (folder / "labels" / label.name).symlink_to(label.resolve())
    return folder


def gate_int8(
    bundle_dir: Path, frames_dir: Path, config: DetectFitConfig, out_dir: Path | None = None,
    progress: FitProgress | None = None,
) -> dict[str, Any]:
    """Static INT8 of a fitted bundle behind the gate (toolchain.quantize): calibrated on the training frames,
    judged on the same held-out frames as the fit; ``<name>_int8`` is written beside it only if the gate passes."""
    import tempfile

    from edge_agent.toolchain.quantize import GateConfig, quantize_and_gate

    say = progress or (lambda _stage, _done, _total: None)
    frames, _ = read_frames(frames_dir, config.labels or None)
    gap = round(len(frames) * config.gap) if config.holdout > 0 else 0
    train_idx, test_idx = temporal_split(len(frames), config.holdout, gap)
    if not test_idx:
        return {"passed": False, "reason": "no held-out frames to judge INT8 on"}
    bundle = load_bundle(bundle_dir)
    name = f"{bundle.name}_int8"
    target = out_dir or bundle_dir.parent / name
    with tempfile.TemporaryDirectory(prefix="edge-detect-int8-") as tmp:
        held = link_split([frames[i] for i in test_idx], frames_dir, Path(tmp) / "held_out")
        calib = link_split([frames[i] for i in train_idx], frames_dir, Path(tmp) / "calib") / "images"
        try:
            report = quantize_and_gate(
                bundle, calib, held, target, name, GateConfig(threads=config.threads),
                progress=lambda msg: say(msg, 0, 1),
                eval_progress=lambda done, total: say("measuring INT8 and FP32", done, total),
            ).to_dict()
        except QuantizationGateError as exc:
            report = dict(exc.report)
    out = {k: v for k, v in report.items() if not k.endswith("_report")}
    for side in ("fp32", "int8"):
        r = report.get(f"{side}_report") or {}
        out[f"{side}_recall"] = r.get("recall")
        out[f"{side}_precision"] = r.get("precision")
    out["bundle"] = str(target) if out.get("passed") else None
    return out
