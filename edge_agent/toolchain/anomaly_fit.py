"""``edge-agent inspect fit``: build a multi-scale PatchCore anomaly bundle from photos of good parts, on a CPU.

Recipe (after Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection", run at three scales):

1. The photo (stretched to 192x192 by the agent) is gain-normalised in the graph (mean brightness -> 110) and
   resized to 128, 160 and 192 px. Each size runs EfficientNet-Lite0 (ImageNet, frozen) up to blocks 14 and 15
   (stride 32: 4x4, 5x5 and 6x6 patches, 192 + 320 channels), averaged over 3x3 neighbourhoods.
2. Per scale, a memory bank of patch vectors of the good photos, thinned by greedy k-centre coreset selection.
3. Per scale, each patch's distance to its nearest bank vector, standardised by the spread of that scale's
   image scores on good photos held out of the bank (cross-validation), upsampled to 60x60, summed over the
   scales and smoothed (Gaussian, sigma 1 cell): the ``anomaly_map``. Its maximum is the image ``score``.
4. The operating point is part of the fit: K-fold cross-validation over the good photos (each photo scored by a
   bank built without it) gives out-of-bank scores; the shipped threshold is their ``1 - max_false_reject``
   quantile. The shipped banks then hold every photo.

Why this recipe (magnetic tiles, measured in ``models/tile_anomaly/MODEL_CARD.md``): the deep stride-32 features
beat finer ones (28x28 stage-3/4 features, 448 px input) by a wide margin on textured parts whose good examples
vary a lot, and small inputs (more context per patch) beat 224 px; the three scales together beat any one.
The ONNX graph holds everything (backbone x3 with shared weights, banks, distance, normalisation, upsampling,
smoothing); fitting uses onnxruntime + numpy only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import onnx

from edge_agent.bundles.bundle import MANIFEST_NAME, default_models_dir, load_bundle
from edge_agent.errors import EdgeAgentError, InputNotFoundError, ManifestError, require_extra
from edge_agent.fsutil import sha256_file
from edge_agent.toolchain.evaluate import IMAGE_SUFFIXES
from edge_agent.vision import imaging
from edge_agent.vision.decode import decode_image
from edge_agent.vision.imaging import Interpolation

log = logging.getLogger(__name__)

FitProgress = Callable[[str, int, int], None]
F32 = npt.NDArray[np.float32]

SIZE = 192
"""Model input (the agent stretches each photo to SIZE x SIZE); the largest scale."""
INTERPOLATION: Interpolation = "linear_exact"
"""The stretch: OpenCV's bit-exact bilinear, so a photo gives the same input on x86 and ARM (the score moves by up
to ~0.1 when some pixels are one level apart, which plain INTER_LINEAR's SIMD paths produce between the two)."""
SCALES = (128, 160, 192)
STRIDE = 32
MAP = 60
"""Side of the output ``anomaly_map``; a multiple of every scale's grid (4, 5, 6) so upsampling is exact."""
SMOOTH_SIGMA = 1.0
SMOOTH_K = 7
GAIN_TARGET = 110.0
T_A = "/_blocks.14/Add_output_0"  # (N, 192, s/32, s/32)
T_B = "/_blocks.15/_project_conv/Conv_output_0"  # (N, 320, s/32, s/32)
DIM = 512
DEFAULT_SOURCE_BUNDLE = "tile_anomaly"
RECIPE = (f"EfficientNet-Lite0 blocks 14 + 15 at {'/'.join(map(str, SCALES))} px, 3x3 average, greedy coreset "
          "per scale, scale-standardised nearest-neighbour maps summed, max of the smoothed map")
BACKBONE_PREFIX_KEY = "edge_agent.backbone_prefix"
FLOAT_STEM = ["/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv", "/_blocks.0/_project_conv/Conv"]
"""EfficientNet-Lite0 nodes kept in float when quantizing: INT8 there cost 0.03 image AUROC on magnetic tiles."""


@dataclass(frozen=True)
class FitConfig:
    coreset_fraction: float = 0.1
    min_bank: int = 400
    """Per scale: a bank keeps at least this many vectors (or all of them), whatever the fraction."""
    max_bank: int = 4000
    """Per scale: upper bound on the bank."""
    folds: int = 20
    """Cross-validation folds for the threshold (at most one per photo)."""
    max_false_reject: float = 0.05
    projection_dim: int = 64
    seed: int = 0
    batch: int = 8
    threads: int = 0
    scales: tuple[int, ...] = field(default=SCALES)
    defect_c: float = 0.01
    """With defect photos: inverse L2 strength of the defect head's logistic regression (standardised features)."""
    defect_weight: float = 1.0
    """With defect photos: weight of the defect head's standardised logit next to the standardised anomaly score."""
    defect_folds: int = 5
    """With defect photos: cross-validation folds of the defect head (for its out-of-fold scores)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.coreset_fraction <= 1.0:
            raise ValueError("coreset_fraction must be in (0, 1]")
        if not 0.0 <= self.max_false_reject < 1.0:
            raise ValueError("max_false_reject must be in [0, 1)")
        if self.folds < 2 or self.defect_folds < 2:
            raise ValueError("folds must be at least 2")
        if self.defect_c <= 0 or self.defect_weight <= 0:
            raise ValueError("defect_c and defect_weight must be positive")
        if not self.scales or any(s % STRIDE or s > SIZE or MAP % (s // STRIDE) for s in self.scales):
            raise ValueError(f"scales must be multiples of {STRIDE}, at most {SIZE}, with grids dividing {MAP}")


# ----------------------------------------------------------------------------------------------- graph surgery


def prune_graph(model: onnx.ModelProto, keep_outputs: Iterable[str]) -> onnx.ModelProto:
    """Drop the nodes, initializers and value_info that none of ``keep_outputs`` depends on (in place)."""
    g = model.graph
    needed = set(keep_outputs)
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    return model


def fold_uint8_input(model: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """Replace an EfficientNet-Lite float input with uint8 NCHW ``pixels`` and (x - 127) / 128 in the graph."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    old_input = g.input[0].name
    g.input.pop()
    g.input.append(helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 3, size, size]))
    g.initializer.extend([
        numpy_helper.from_array(np.array(127.0, dtype=np.float32), "pre_mean"),
        numpy_helper.from_array(np.array(1.0 / 128.0, dtype=np.float32), "pre_scale"),
    ])
    pre = [
        helper.make_node("Cast", ["pixels"], ["pre_f"], to=TensorProto.FLOAT, name="pre_cast"),
        helper.make_node("Sub", ["pre_f", "pre_mean"], ["pre_c"], name="pre_sub"),
        helper.make_node("Mul", ["pre_c", "pre_scale"], [old_input], name="pre_mul"),
    ]
    nodes = pre + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model


def default_backbone(models_dir: Path | None = None) -> Path:
    """The shipped tile anomaly bundle's ONNX: its backbone is reused for new fits."""
    base = models_dir or default_models_dir()
    try:
        return load_bundle(base / DEFAULT_SOURCE_BUNDLE).onnx_path
    except ManifestError:
        return base / DEFAULT_SOURCE_BUNDLE / f"{DEFAULT_SOURCE_BUNDLE}.onnx"


def backbone_core(model: onnx.ModelProto, source: Path | str = "backbone") -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) computing ``T_A`` and ``T_B`` from a float tensor named ``input`` ((x-127)/128, NCHW).

    Accepts the EfficientNet-Lite0 export, a bundle made by this module (one of its per-scale copies, named by
    the ``edge_agent.backbone_prefix`` metadata) and the older single-scale bundles (uint8 ``pixels`` input).
    """
    from onnx import helper

    g = model.graph
    props = {p.key: p.value for p in model.metadata_props}
    prefix = props.get(BACKBONE_PREFIX_KEY)
    init_names = {i.name for i in g.initializer}
    if prefix:  # a bundle made here: one per-scale copy of the export's nodes (their names start with "/")
        nodes = []
        for n in g.node:
            if not n.name.startswith(prefix + "/"):
                continue
            m = helper.make_node(n.op_type, [_strip(i, prefix, init_names) for i in n.input],
                                 [_strip(o, prefix, init_names) for o in n.output], name=n.name[len(prefix):])
            m.attribute.extend(n.attribute)
            nodes.append(m)
    else:  # the export (float ``input``) or an older bundle (uint8 pixels -> pre_* -> ``input``)
        nodes = [n for n in g.node if n.name not in ("pre_cast", "pre_sub", "pre_mul")]
        if not any(o == "input" for n in g.node for o in n.output) and g.input[0].name != "input":
            raise ManifestError(f"{source}: not an EfficientNet-Lite0 export (no float input named 'input')")
    produced = {o for n in nodes for o in n.output}
    if T_A not in produced or T_B not in produced:
        raise ManifestError(f"{source}: not an EfficientNet-Lite0 export (missing {T_A} / {T_B})")
    sub = _graph_of(nodes, list(g.initializer))
    prune_graph(sub, {T_A, T_B})
    return list(sub.graph.node), list(sub.graph.initializer)


def _strip(name: str, prefix: str, keep: set[str]) -> str:
    if not name or name in keep:
        return name
    if name == prefix + "input":
        return "input"
    return name[len(prefix):] if name.startswith(prefix) else name


def _graph_of(nodes: Sequence[Any], initializers: Sequence[Any]) -> onnx.ModelProto:
    from onnx import helper

    g = helper.make_graph(list(nodes), "tmp", [], [], list(initializers))
    return helper.make_model(g)


def _prefixed(nodes: Sequence[Any], prefix: str, shared: set[str], entry: str) -> list[Any]:
    """Copy ``nodes`` with every non-shared tensor and node name prefixed; ``input`` becomes ``entry``."""
    from onnx import helper

    def rename(name: str) -> str:
        if not name or name in shared:
            return name
        return entry if name == "input" else prefix + name

    out = []
    for n in nodes:
        m = helper.make_node(n.op_type, [rename(i) for i in n.input], [rename(o) for o in n.output],
                             name=prefix + (n.name or n.output[0]))
        m.attribute.extend(n.attribute)
        out.append(m)
    return out


def feature_graph(backbone: Path, scales: Sequence[int] = SCALES) -> Any:
    """uint8 NCHW ``pixels`` (N, 3, 192, 192) -> ``patches_<s>`` (N, 512, s/32, s/32) for each scale ``s``.

    Gain normalisation, resizing and (x-127)/128 are in the graph; the backbone copies share their weights.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    try:
        source = onnx.load(str(backbone))
    except Exception as exc:
        raise ManifestError(f"{backbone}: cannot read backbone ONNX: {exc}") from exc
    core_nodes, core_inits = backbone_core(source, backbone)
    shared = {i.name for i in core_inits}
    nodes: list[Any] = [
        helper.make_node("Cast", ["pixels"], ["pre_f"], to=TensorProto.FLOAT, name="pre_cast"),
        helper.make_node("ReduceMean", ["pre_f"], ["pre_mean_px"], axes=[1, 2, 3], keepdims=1, name="pre_mean"),
        helper.make_node("Max", ["pre_mean_px", "pre_one"], ["pre_mean_pos"], name="pre_floor"),
        helper.make_node("Div", ["pre_target", "pre_mean_pos"], ["pre_gain"], name="pre_gain_div"),
        helper.make_node("Mul", ["pre_f", "pre_gain"], ["pre_g"], name="pre_gain_mul"),
        helper.make_node("Clip", ["pre_g", "pre_lo", "pre_hi"], ["pre_norm"], name="pre_clip"),
        helper.make_node("Shape", ["pixels"], ["pre_shape"], name="pre_shape"),
        helper.make_node("Slice", ["pre_shape", "pre_s0", "pre_s2"], ["pre_nc"], name="pre_nc"),
    ]
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "pre_one"),
        numpy_helper.from_array(np.array(GAIN_TARGET, np.float32), "pre_target"),
        numpy_helper.from_array(np.array(0.0, np.float32), "pre_lo"),
        numpy_helper.from_array(np.array(255.0, np.float32), "pre_hi"),
        numpy_helper.from_array(np.array([0], np.int64), "pre_s0"),
        numpy_helper.from_array(np.array([2], np.int64), "pre_s2"),
        numpy_helper.from_array(np.array(127.0, np.float32), "pre_center"),
        numpy_helper.from_array(np.array(1.0 / 128.0, np.float32), "pre_scale"),
        *core_inits,
    ]
    outputs = []
    for s in scales:
        p = f"s{s}/"
        src = "pre_norm"
        if s != SIZE:
            inits.append(numpy_helper.from_array(np.array([s, s], np.int64), f"{p}hw"))
            nodes += [
                helper.make_node("Concat", ["pre_nc", f"{p}hw"], [f"{p}size"], axis=0, name=f"{p}size"),
                helper.make_node("Resize", ["pre_norm", "", "", f"{p}size"], [f"{p}resized"], mode="linear",
                                 coordinate_transformation_mode="half_pixel", name=f"{p}resize"),
            ]
            src = f"{p}resized"
        nodes += [
            helper.make_node("Sub", [src, "pre_center"], [f"{p}centered"], name=f"{p}pre_sub"),
            helper.make_node("Mul", [f"{p}centered", "pre_scale"], [f"{p}input"], name=f"{p}pre_mul"),
            *_prefixed(core_nodes, p, shared, f"{p}input"),
            helper.make_node("Concat", [p + T_A, p + T_B], [f"{p}cat"], axis=1, name=f"{p}pc_concat"),
            helper.make_node("AveragePool", [f"{p}cat"], [f"patches_{s}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                             count_include_pad=0, name=f"{p}pc_local"),
        ]
        outputs.append(helper.make_tensor_value_info(f"patches_{s}", TensorProto.FLOAT,
                                                     ["N", DIM, s // STRIDE, s // STRIDE]))
    graph = helper.make_graph(
        nodes, "edge_agent_anomaly_features",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 3, SIZE, SIZE])], outputs, inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="edge-agent anomaly_fit")
    model.ir_version = min(model.ir_version, 8)
    helper.set_model_props(model, {BACKBONE_PREFIX_KEY: f"s{max(scales)}/"})
    onnx.checker.check_model(model)
    return model


def gaussian_kernel(size: int = SMOOTH_K, sigma: float = SMOOTH_SIGMA) -> F32:
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(ax**2) / (2 * sigma**2))
    k /= k.sum()
    return np.outer(k, k).astype(np.float32)


def tail_nodes(scales: Sequence[int], stats: Sequence[tuple[float, float]]) -> tuple[list[Any], list[Any]]:
    """Nodes: ``dist_<s>`` (N, 1, g, g) -> standardise, upsample to MAP x MAP, sum, smooth -> ``anomaly_map``,
    ``score``."""
    from onnx import helper, numpy_helper

    pad = SMOOTH_K // 2
    inits = [
        numpy_helper.from_array(np.array([MAP, MAP], np.int64), "pc_map_hw"),
        numpy_helper.from_array(np.array([0], np.int64), "pc_s0"),
        numpy_helper.from_array(np.array([2], np.int64), "pc_s2"),
        numpy_helper.from_array(np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64), "pc_pads"),
        numpy_helper.from_array(gaussian_kernel()[None, None], "pc_gauss"),
    ]
    nodes = [
        helper.make_node("Shape", [f"dist_{scales[0]}"], ["pc_dshape"], name="pc_dshape"),
        helper.make_node("Slice", ["pc_dshape", "pc_s0", "pc_s2"], ["pc_nc"], name="pc_nc"),
        helper.make_node("Concat", ["pc_nc", "pc_map_hw"], ["pc_map_size"], axis=0, name="pc_map_size"),
    ]
    ups = []
    for s, (mu, sd) in zip(scales, stats, strict=True):
        p = f"s{s}/"
        inits += [numpy_helper.from_array(np.array(mu, np.float32), f"{p}pc_mu"),
                  numpy_helper.from_array(np.array(1.0 / max(sd, 1e-6), np.float32), f"{p}pc_inv_sd")]
        nodes += [
            helper.make_node("Sub", [f"dist_{s}", f"{p}pc_mu"], [f"{p}pc_dc"], name=f"{p}pc_center"),
            helper.make_node("Mul", [f"{p}pc_dc", f"{p}pc_inv_sd"], [f"{p}pc_z"], name=f"{p}pc_standardise"),
            helper.make_node("Resize", [f"{p}pc_z", "", "", "pc_map_size"], [f"{p}pc_up"], mode="linear",
                             coordinate_transformation_mode="half_pixel", name=f"{p}pc_upsample"),
        ]
        ups.append(f"{p}pc_up")
    nodes += [
        helper.make_node("Sum", ups, ["pc_sum"], name="pc_sum"),
        helper.make_node("Pad", ["pc_sum", "pc_pads"], ["pc_padded"], mode="reflect", name="pc_pad"),
        helper.make_node("Conv", ["pc_padded", "pc_gauss"], ["anomaly_map"], name="pc_smooth"),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0, name="pc_score"),
    ]
    return nodes, inits


def tail_graph(scales: Sequence[int], stats: Sequence[tuple[float, float]]) -> Any:
    """The scoring tail alone (batched): per-scale distance maps in, ``anomaly_map`` and ``score`` out."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = tail_nodes(scales, stats)
    graph = helper.make_graph(
        nodes, "edge_agent_anomaly_tail",
        [helper.make_tensor_value_info(f"dist_{s}", TensorProto.FLOAT, ["N", 1, s // STRIDE, s // STRIDE])
         for s in scales],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, MAP, MAP]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def anomaly_graph(features: Any, banks: dict[int, F32], stats: Sequence[tuple[float, float]],
                  head: DefectHead | None = None) -> Any:
    """Append nearest-neighbour scoring against each scale's bank (M_s, 512) and the tail (batch 1); with a defect
    head, ``score`` is the fused score and ``anomaly_score`` / ``defect_evidence`` are extra outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(features)
    g = model.graph
    del g.output[:]
    scales = sorted(banks)
    for s in scales:
        p = f"s{s}/"
        grid = s // STRIDE
        bank = banks[s]
        g.initializer.extend([
            numpy_helper.from_array(np.array([DIM, grid * grid], np.int64), f"{p}pc_shape"),
            numpy_helper.from_array(np.ascontiguousarray((-2.0 * bank.T).astype(np.float32)), f"{p}pc_bank_t2"),
            numpy_helper.from_array((bank.astype(np.float64) ** 2).sum(1).astype(np.float32), f"{p}pc_bank_sq"),
            numpy_helper.from_array(np.array([1, 1, grid, grid], np.int64), f"{p}pc_map_shape"),
        ])
        g.node.extend([
            helper.make_node("Reshape", [f"patches_{s}", f"{p}pc_shape"], [f"{p}pc_flat"], name=f"{p}pc_reshape"),
            helper.make_node("Transpose", [f"{p}pc_flat"], [f"{p}pc_rows"], perm=[1, 0], name=f"{p}pc_transpose"),
            helper.make_node("ReduceSumSquare", [f"{p}pc_rows"], [f"{p}pc_rows_sq"], axes=[1], keepdims=1,
                             name=f"{p}pc_sq"),
            helper.make_node("MatMul", [f"{p}pc_rows", f"{p}pc_bank_t2"], [f"{p}pc_cross_out"], name=f"{p}pc_cross"),
            helper.make_node("Add", [f"{p}pc_cross_out", f"{p}pc_rows_sq"], [f"{p}pc_d0"], name=f"{p}pc_add"),
            helper.make_node("Add", [f"{p}pc_d0", f"{p}pc_bank_sq"], [f"{p}pc_d"], name=f"{p}pc_add2"),
            helper.make_node("ReduceMin", [f"{p}pc_d"], [f"{p}pc_min_out"], axes=[1], keepdims=0, name=f"{p}pc_min"),
            helper.make_node("Relu", [f"{p}pc_min_out"], [f"{p}pc_pos"], name=f"{p}pc_relu"),
            helper.make_node("Sqrt", [f"{p}pc_pos"], [f"{p}pc_dist"], name=f"{p}pc_sqrt"),
            helper.make_node("Reshape", [f"{p}pc_dist", f"{p}pc_map_shape"], [f"dist_{s}"], name=f"{p}pc_map"),
        ])
    nodes, inits = tail_nodes(scales, stats)
    if head is not None:
        for n in nodes:
            if n.name == "pc_score":
                n.output[0] = "anomaly_score"
        more, more_inits = head_nodes(scales, head, "anomaly_score")
        nodes, inits = nodes + more, inits + more_inits
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.input[0].CopyFrom(helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, 3, SIZE, SIZE]))
    g.output.extend([
        helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, MAP, MAP]),
    ])
    if head is not None:
        g.output.extend([helper.make_tensor_value_info("anomaly_score", TensorProto.FLOAT, [1]),
                         helper.make_tensor_value_info("defect_evidence", TensorProto.FLOAT, [1])])
    onnx.checker.check_model(model)
    return model


def float_nodes(model: Any) -> list[str]:
    """Node names INT8 quantization must leave in float: pre-processing, stems, distance search, the tail and the
    defect head."""
    out = []
    for n in model.graph.node:
        name = n.name
        local = name.split("/", 1)[1] if name.startswith("s") and "/" in name else name
        if (local.startswith(("pre_", "pc_", "resize", "size")) or name.startswith(("pre_", "pc_", "dh_"))
                or any(name.endswith(stem) for stem in FLOAT_STEM)):
            out.append(name)
    return out


# ----------------------------------------------------------------------------------------------- data


def good_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 5:
        raise InputNotFoundError(f"{folder}: need at least 5 photos of good parts, found {len(paths)}")
    return paths


def to_pixels(path: Path, size: int = SIZE) -> npt.NDArray[np.uint8]:
    """Decode (as the agent does) and stretch to size x size RGB, CHW uint8 (the bundle's input spec)."""
    image = decode_image(path.read_bytes(), size_hint=lambda w, h: (min(w, size), min(h, size)))
    px = imaging.resize(image.pixels, (size, size), INTERPOLATION)
    if image.color == "BGR":
        px = px[:, :, ::-1]
    return np.ascontiguousarray(px.transpose(2, 0, 1))


def greedy_coreset(x: F32, k: int, projection_dim: int, seed: int, progress: FitProgress | None = None) -> list[int]:
    """Greedy k-centre selection (PatchCore) on a random projection of ``x``; returns row indices."""
    n = len(x)
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((x.shape[1], projection_dim)).astype(np.float32) / np.sqrt(projection_dim)
    z = np.ascontiguousarray(x @ proj)
    sq = np.einsum("ij,ij->i", z, z)
    chosen = [int(rng.integers(n))]
    # einsum, not BLAS: a matrix-vector product per step is faster single-threaded on a busy CPU
    dist = sq - 2 * np.einsum("ij,j->i", z, z[chosen[0]]) + sq[chosen[0]]
    for i in range(1, k):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        np.minimum(dist, sq - 2 * np.einsum("ij,j->i", z, z[nxt]) + sq[nxt], out=dist)
        if progress is not None and i % 200 == 0:
            progress("coreset", i, k)
    return chosen


def bank_size(n: int, config: FitConfig) -> int:
    return min(n, config.max_bank, max(min(n, config.min_bank), round(n * config.coreset_fraction)))


def _session(model: Any, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def extract_patches(
    session: Any, paths: Sequence[Path], scales: Sequence[int], batch: int, progress: FitProgress | None = None,
    label: str = "features",
) -> dict[int, F32]:
    """Per scale: (len(paths), grid * grid, 512) patch vectors."""
    out: dict[int, list[F32]] = {s: [] for s in scales}
    names = [f"patches_{s}" for s in scales]
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        pixels = []
        for p in chunk:
            try:
                pixels.append(to_pixels(p))
            except EdgeAgentError as exc:
                raise InputNotFoundError(f"{p}: {exc.message}") from exc
        for s, patches in zip(scales, session.run(names, {"pixels": np.stack(pixels)}), strict=True):
            out[s].append(patches.reshape(len(chunk), patches.shape[1], -1).transpose(0, 2, 1))
        if progress is not None:
            progress(label, min(start + batch, len(paths)), len(paths))
    return {s: np.ascontiguousarray(np.concatenate(v), dtype=np.float32) for s, v in out.items()}


def nearest_distances(patches: F32, bank: F32, chunk: int = 4096) -> F32:
    """Per-patch Euclidean distance to the nearest bank row (numpy, for thresholds and tests)."""
    flat = patches.reshape(-1, patches.shape[-1])
    bank_sq = (bank.astype(np.float64) ** 2).sum(1).astype(np.float32)
    out = np.empty(len(flat), np.float32)
    for s in range(0, len(flat), chunk):
        rows = flat[s : s + chunk]
        d = (rows**2).sum(1, keepdims=True) - 2 * rows @ bank.T + bank_sq[None, :]
        out[s : s + chunk] = np.sqrt(np.maximum(d.min(1), 0))
    return out.reshape(patches.shape[:-1])


def fold_ids(n: int, folds: int) -> npt.NDArray[np.int64]:
    """Deterministic fold of each photo (interleaved, so photos taken in sequence spread over the folds)."""
    return np.arange(n, dtype=np.int64) % min(folds, n)


def select_bank(patches: F32, config: FitConfig, seed: int, progress: FitProgress | None = None) -> F32:
    flat = patches.reshape(-1, patches.shape[-1])
    idx = greedy_coreset(flat, bank_size(len(flat), config), config.projection_dim, seed, progress)
    return np.ascontiguousarray(flat[np.sort(idx)])


def threshold_at(scores: Sequence[float] | npt.NDArray[Any], max_false_reject: float) -> float:
    """The lowest threshold that rejects (score > threshold) at most ``max_false_reject`` of ``scores``."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(max_false_reject * len(s) + 1e-9))
    return float(s[min(allowed, len(s) - 1)])


def cross_validate(
    patches: dict[int, F32], config: FitConfig, progress: FitProgress | None = None
) -> tuple[dict[int, F32], npt.NDArray[np.int64]]:
    """Out-of-bank distance maps: each photo scored against banks built from the other folds.

    Returns per scale (n, grid, grid) distances, and the fold of each photo.
    """
    n = len(next(iter(patches.values())))
    folds = fold_ids(n, config.folds)
    k = int(folds.max()) + 1
    out = {s: np.zeros((n, s // STRIDE, s // STRIDE), np.float32) for s in patches}
    for f in range(k):
        held = folds == f
        for s, p in patches.items():
            bank = select_bank(p[~held], config, config.seed + f)
            g = s // STRIDE
            out[s][held] = nearest_distances(p[held], bank).reshape(-1, g, g)
        if progress is not None:
            progress("threshold (cross-validation)", f + 1, k)
    return out, folds


def scale_stats(dists: dict[int, F32]) -> list[tuple[float, float]]:
    """Per scale (in sorted order): mean and spread of the out-of-bank image scores (max patch distance)."""
    stats = []
    for s in sorted(dists):
        img = dists[s].reshape(len(dists[s]), -1).max(1).astype(np.float64)
        stats.append((float(img.mean()), float(max(img.std(), 1e-6))))
    return stats


def run_tail(dists: dict[int, F32], stats: Sequence[tuple[float, float]], threads: int = 0) -> tuple[F32, F32]:
    """(anomaly maps (n, MAP, MAP), scores (n,)) from per-scale distance maps, through the same ONNX tail."""
    scales = sorted(dists)
    session = _session(tail_graph(scales, stats), threads)
    feeds = {f"dist_{s}": dists[s][:, None].astype(np.float32) for s in scales}
    maps, scores = session.run(["anomaly_map", "score"], feeds)
    return maps[:, 0], scores


# ----------------------------------------------------------------------------------------------- defect head


@dataclass(frozen=True)
class DefectHead:
    """Optional second evidence, fitted when photos of known defects are given (``inspect fit --defects``).

    A logistic regression (good vs defective) on each photo's pooled patch features (per scale, the mean and the
    maximum of its 3x3-averaged patch vectors), with the standardisation folded into ``weight``/``bias``. The
    image score becomes ``(anomaly - anomaly_center) / anomaly_scale + defect_weight * (logit - logit_center) /
    logit_scale``; centres and scales are the median and inter-quartile range of the good photos' out-of-fold
    values, so both terms are in "spreads of good parts" and the anomaly map keeps its own units.
    """

    weight: F32
    bias: float
    anomaly_center: float
    anomaly_scale: float
    logit_center: float
    logit_scale: float
    defect_weight: float

    def fuse(self, anomaly: npt.NDArray[Any], logit: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        a = (np.asarray(anomaly, np.float64) - self.anomaly_center) / self.anomaly_scale
        d = (np.asarray(logit, np.float64) - self.logit_center) / self.logit_scale
        return a + self.defect_weight * d

    def doc(self) -> dict[str, float]:
        return {"anomaly_center": round(self.anomaly_center, 6), "anomaly_scale": round(self.anomaly_scale, 6),
                "logit_center": round(self.logit_center, 6), "logit_scale": round(self.logit_scale, 6),
                "defect_weight": self.defect_weight, "features": int(self.weight.shape[0])}


def pooled_features(patches: dict[int, F32]) -> F32:
    """(n, 2 * DIM * scales): per scale (sorted), the mean then the maximum of each photo's patch vectors."""
    parts = [np.concatenate([patches[s].mean(1), patches[s].max(1)], 1) for s in sorted(patches)]
    return np.ascontiguousarray(np.concatenate(parts, 1), dtype=np.float32)


def fit_logistic(good: F32, defect: F32, c: float) -> tuple[F32, float]:
    """Class-balanced L2 logistic regression on standardised features; the standardisation folded in."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([good, defect]).astype(np.float64)
    y = np.r_[np.zeros(len(good)), np.ones(len(defect))]
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(scaler.transform(x), y)
    w = clf.coef_[0] / scaler.scale_
    b = float(clf.intercept_[0] - (w * scaler.mean_).sum())
    return w.astype(np.float32), b


def _spread(x: npt.NDArray[Any]) -> tuple[float, float]:
    q1, med, q3 = np.quantile(np.asarray(x, np.float64), [0.25, 0.5, 0.75])
    return float(med), float(max(q3 - q1, 1e-6))


def fit_defect_head(
    good: F32, defect: F32, good_anomaly_oof: npt.NDArray[Any], config: FitConfig,
    progress: FitProgress | None = None,
) -> tuple[DefectHead, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The head on all photos, plus the out-of-fold logits of the good and the defective photos (K-fold)."""
    k = config.defect_folds
    fg, fd = fold_ids(len(good), k), fold_ids(len(defect), k)
    oof_g, oof_d = np.zeros(len(good)), np.zeros(len(defect))
    for f in range(int(max(fg.max(), fd.max())) + 1):
        w, b = fit_logistic(good[fg != f], defect[fd != f], config.defect_c)
        oof_g[fg == f] = good[fg == f].astype(np.float64) @ w + b
        oof_d[fd == f] = defect[fd == f].astype(np.float64) @ w + b
        if progress is not None:
            progress("defect head (cross-validation)", f + 1, k)
    w, b = fit_logistic(good, defect, config.defect_c)
    a_c, a_s = _spread(good_anomaly_oof)
    l_c, l_s = _spread(oof_g)
    return DefectHead(w, b, a_c, a_s, l_c, l_s, config.defect_weight), oof_g, oof_d


def head_nodes(scales: Sequence[int], head: DefectHead, anomaly: str) -> tuple[list[Any], list[Any]]:
    """Nodes: ``patches_<s>`` and the anomaly score ``anomaly`` -> the fused ``score`` (see :class:`DefectHead`)."""
    from onnx import helper, numpy_helper

    gain = head.defect_weight / head.logit_scale
    inits = [
        numpy_helper.from_array((head.weight.astype(np.float64) * gain).astype(np.float32)[:, None], "dh_w"),
        numpy_helper.from_array(np.array([(head.bias - head.logit_center) * gain], np.float32), "dh_b"),
        numpy_helper.from_array(np.array(head.anomaly_center, np.float32), "dh_a_center"),
        numpy_helper.from_array(np.array(1.0 / head.anomaly_scale, np.float32), "dh_a_inv_scale"),
        numpy_helper.from_array(np.array([-1], np.int64), "dh_flat"),
    ]
    nodes = []
    pooled = []
    for s in sorted(scales):
        nodes += [
            helper.make_node("ReduceMean", [f"patches_{s}"], [f"dh_mean_{s}"], axes=[2, 3], keepdims=0,
                             name=f"dh_mean_{s}"),
            helper.make_node("ReduceMax", [f"patches_{s}"], [f"dh_max_{s}"], axes=[2, 3], keepdims=0,
                             name=f"dh_max_{s}"),
        ]
        pooled += [f"dh_mean_{s}", f"dh_max_{s}"]
    nodes += [
        helper.make_node("Concat", pooled, ["dh_pooled"], axis=1, name="dh_concat"),
        helper.make_node("MatMul", ["dh_pooled", "dh_w"], ["dh_mm"], name="dh_matmul"),
        helper.make_node("Add", ["dh_mm", "dh_b"], ["dh_z2"], name="dh_bias"),
        helper.make_node("Reshape", ["dh_z2", "dh_flat"], ["defect_evidence"], name="dh_flatten"),
        helper.make_node("Sub", [anomaly, "dh_a_center"], ["dh_ac"], name="dh_a_sub"),
        helper.make_node("Mul", ["dh_ac", "dh_a_inv_scale"], ["anomaly_evidence"], name="dh_a_mul"),
        helper.make_node("Add", ["anomaly_evidence", "defect_evidence"], ["score"], name="dh_fuse"),
    ]
    return nodes, inits


# ----------------------------------------------------------------------------------------------- fit


@dataclass
class FitCore:
    """What a fit computes from patch features (shared by :func:`fit_bundle` and :func:`refit_banks`)."""

    banks: dict[int, F32]
    stats: list[tuple[float, float]]
    folds: int
    oof_scores: npt.NDArray[Any]
    """Out-of-bank image scores of the good photos (fused with the defect head's out-of-fold logit if any)."""
    threshold: float
    head: DefectHead | None = None
    region_threshold: float | None = None
    """With a head: the anomaly-map level for regions (the anomaly score's own operating point)."""
    defect_oof_scores: npt.NDArray[Any] | None = None

    @property
    def cv_false_reject(self) -> float:
        return round(float(np.mean(self.oof_scores > self.threshold)), 4)

    @property
    def cv_defect_recall(self) -> float | None:
        if self.defect_oof_scores is None:
            return None
        return round(float(np.mean(self.defect_oof_scores > self.threshold)), 4)

    def fit_doc(self, config: FitConfig, scales: Sequence[int]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "bank_size": {str(s): len(b) for s, b in self.banks.items()},
            "scale_stats": {str(s): {"mean": round(m, 6), "sd": round(sd, 6)}
                            for s, (m, sd) in zip(scales, self.stats, strict=True)},
            "folds": self.folds,
            "cv_false_reject": self.cv_false_reject,
            "oof_scores": {"min": round(float(self.oof_scores.min()), 4),
                           "median": round(float(np.median(self.oof_scores)), 4),
                           "max": round(float(self.oof_scores.max()), 4)},
        }
        if self.head is not None and self.defect_oof_scores is not None:
            doc["defect_head"] = {
                **self.head.doc(), "n_defects": len(self.defect_oof_scores), "folds": config.defect_folds,
                "c": config.defect_c, "region_threshold": round(float(self.region_threshold or 0.0), 6),
                "cv_defect_recall": self.cv_defect_recall,
            }
        return doc


def fit_core(patches: dict[int, F32], config: FitConfig, defects: dict[int, F32] | None = None,
             progress: FitProgress | None = None) -> FitCore:
    """Cross-validate, set the threshold, build the banks (and, with defect patches, the defect head)."""
    scales = sorted(patches)
    oof, folds = cross_validate(patches, config, progress)
    stats = scale_stats(oof)
    _, oof_scores = run_tail(oof, stats, config.threads)
    banks = {}
    for i, s in enumerate(scales):
        if progress is not None:
            progress(f"memory bank {s} px", i, len(scales))
        banks[s] = select_bank(patches[s], config, config.seed + 1000 + s)
    if progress is not None:
        progress("memory bank", len(scales), len(scales))
    threshold = threshold_at(oof_scores, config.max_false_reject)
    core = FitCore(banks, stats, int(folds.max()) + 1, oof_scores, threshold)
    if defects is None:
        return core
    d_dist = {s: nearest_distances(defects[s], banks[s]).reshape(-1, s // STRIDE, s // STRIDE) for s in scales}
    _, d_anomaly = run_tail(d_dist, stats, config.threads)
    head, oof_g, oof_d = fit_defect_head(pooled_features(patches), pooled_features(defects), oof_scores, config,
                                         progress)
    fused_g = head.fuse(oof_scores, oof_g)
    return FitCore(banks, stats, core.folds, fused_g, threshold_at(fused_g, config.max_false_reject), head,
                   threshold, head.fuse(d_anomaly, oof_d))


def defect_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: not a folder (--defects: photos of known defective parts)")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and "ground_truth" not in p.parts and "good" not in p.parts)
    if len(paths) < 10:
        raise InputNotFoundError(f"{folder}: need at least 10 photos of defective parts for a defect head, found "
                                 f"{len(paths)} (folders named good or ground_truth are skipped)")
    return paths


def fit_bundle(
    good_dir: Path,
    out_dir: Path,
    name: str,
    config: FitConfig = FitConfig(),
    backbone: Path | None = None,
    progress: FitProgress | None = None,
    license_: str = "Apache-2.0 (EfficientNet-Lite0 weights); memory bank from the user's own photos",
    source: str | None = None,
    defect_dir: Path | None = None,
) -> dict[str, Any]:
    """Fit and write ``out_dir`` (manifest.json + ``<name>.onnx``). Returns a summary dict.

    With ``defect_dir`` (photos of known defective parts, e.g. confirmed rejects), a defect head is fitted too and
    the image score fuses both (:class:`DefectHead`); the threshold is still set on the good photos' out-of-fold
    scores for ``max_false_reject``."""
    require_extra("onnx", "tools", "edge-agent inspect fit")
    import onnx

    t0 = time.perf_counter()
    backbone_path = backbone or default_backbone()
    if not backbone_path.is_file():
        raise InputNotFoundError(
            f"{backbone_path}: backbone ONNX not found (pass --backbone: an EfficientNet-Lite0 ONNX, or the FP32 "
            f"{DEFAULT_SOURCE_BUNDLE} bundle's ONNX from the source repository's models/; the wheel does not carry it)"
        )
    paths = good_images(good_dir)
    dpaths = defect_images(defect_dir) if defect_dir is not None else None
    if dpaths is not None:
        require_extra("sklearn", "tools", "edge-agent inspect fit --defects")
    scales = tuple(sorted(config.scales))
    features = feature_graph(backbone_path, scales)
    session = _session(features, config.threads)
    patches = extract_patches(session, paths, scales, config.batch, progress)
    dpatches = (extract_patches(session, dpaths, scales, config.batch, progress, label="defect features")
                if dpaths is not None else None)
    t_features = time.perf_counter() - t0
    core = fit_core(patches, config, dpatches, progress)
    threshold, banks, stats = core.threshold, core.banks, core.stats
    t_cv = time.perf_counter() - t0 - t_features
    model = anomaly_graph(features, banks, stats, core.head)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = f"{name}.onnx"
    onnx.save(model, str(out_dir / model_file))
    thresholds: dict[str, float] = {"anomaly": round(threshold, 6)}
    if core.region_threshold is not None:
        thresholds["region"] = round(core.region_threshold, 6)
    described = ("Multi-scale PatchCore anomaly detector fitted on photos of good parts" +
                 (f", fused with a defect head fitted on {len(dpaths)} photos of known defects." if dpaths else "."))
    manifest = {
        "schema_version": 1,
        "name": name,
        "version": "3.0.0" if core.head is not None else "2.0.0",
        "task": "anomaly",
        "model_file": model_file,
        "sha256": sha256_file(out_dir / model_file),
        "license": license_,
        "source": source or f"edge-agent inspect fit {good_dir.name}",
        "description": described,
        "input": {
            "name": "pixels", "width": SIZE, "height": SIZE, "layout": "NCHW", "dtype": "uint8", "color": "RGB",
            "resize": {"mode": "stretch", "interpolation": INTERPOLATION},
            "normalize": {"scale": 1.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        },
        "decoder": {"type": "anomaly", "score_output": "score", "map_output": "anomaly_map"},
        "labels": ["good", "anomalous"],
        "thresholds": thresholds,
        "metadata": {
            "quantize": {"nodes_to_exclude": float_nodes(model)},
            "fit": {
                "recipe": RECIPE + (" + defect head (logistic regression on pooled patch features)" if dpaths else ""),
                "scales": list(scales),
                "n_fit": len(paths),
                **core.fit_doc(config, scales),
                "max_false_reject": config.max_false_reject,
                "config": fit_config_doc(config),
                "threshold_rule": threshold_rule(config, core),
            },
        },
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    load_bundle(out_dir)
    seconds = time.perf_counter() - t0
    log.info("fitted %s on %d photos in %.1f s (banks %s)", name, len(paths), seconds,
             {s: len(b) for s, b in banks.items()})
    return {
        "bundle": str(out_dir),
        "name": name,
        "n_fit": len(paths),
        "folds": core.folds,
        "bank_size": sum(len(b) for b in banks.values()),
        "threshold": threshold,
        "max_false_reject": config.max_false_reject,
        "cv_false_reject": core.cv_false_reject,
        **({"n_defects": len(dpaths), "cv_defect_recall": core.cv_defect_recall} if dpaths is not None else {}),
        "seconds": round(seconds, 2),
        "seconds_features": round(t_features, 2),
        "seconds_cross_validation": round(t_cv, 2),
    }


def threshold_rule(config: FitConfig, core: FitCore) -> str:
    rule = (f"{1 - config.max_false_reject:.3f} quantile of out-of-bank scores of the good photos ({core.folds}-fold "
            "cross-validation)")
    if core.head is not None:
        rule += (f", each fused with the defect head's out-of-fold logit ({config.defect_folds}-fold); regions: the "
                 "anomaly map above the anomaly score's own quantile")
    return rule


def fit_config_doc(config: FitConfig) -> dict[str, Any]:
    """The settings a refit needs to reproduce a fit (stored in the manifest's ``metadata.fit.config``)."""
    return {"coreset_fraction": config.coreset_fraction, "min_bank": config.min_bank, "max_bank": config.max_bank,
            "folds": config.folds, "max_false_reject": config.max_false_reject,
            "projection_dim": config.projection_dim, "seed": config.seed, "scales": list(config.scales),
            "defect_c": config.defect_c, "defect_weight": config.defect_weight, "defect_folds": config.defect_folds}


def fitted_here(metadata: dict[str, Any]) -> bool:
    """Whether a manifest's metadata says the bundle was made by :func:`fit_bundle` (and can be refitted)."""
    fit = metadata.get("fit")
    return isinstance(fit, dict) and isinstance(fit.get("config"), dict) and "scales" in fit["config"]


def has_defect_head(metadata: dict[str, Any]) -> bool:
    fit = metadata.get("fit")
    return isinstance(fit, dict) and isinstance(fit.get("defect_head"), dict)


def refit_banks(onnx_path: Path, good_dir: Path, metadata: dict[str, Any], threads: int = 0,
                progress: FitProgress | None = None, defect_dir: Path | None = None) -> dict[str, Any]:
    """Rebuild, in place, the memory banks, scale statistics and threshold of a graph made by :func:`fit_bundle`
    from the features that graph itself computes on the good photos (same settings as the fit); a defect head is
    refitted too, on the graph's own features of ``defect_dir`` (required for a bundle that has one).

    Used after INT8 quantization: with banks of FP32 features, the quantized backbone's features sit farther from
    every bank vector, and the FP32 threshold would reject about twice the target share of good parts. Returns
    the new ``threshold`` (and ``region`` with a head) and the updated ``fit`` metadata.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if not fitted_here(metadata):
        raise ManifestError(f"{onnx_path}: not a bundle made by inspect fit (no metadata.fit.config)")
    with_head = has_defect_head(metadata)
    if with_head and defect_dir is None:
        raise ManifestError(f"{onnx_path}: this bundle has a defect head; refitting it needs the photos of known "
                            "defects again (--defects DIR)")
    doc = dict(metadata["fit"]["config"])
    config = FitConfig(**{**doc, "scales": tuple(doc["scales"]), "threads": threads})
    scales = tuple(sorted(config.scales))
    model = onnx.load(str(onnx_path))
    features = onnx.ModelProto()
    features.CopyFrom(model)
    prune_graph(features, {f"patches_{s}" for s in scales})
    del features.graph.output[:]
    features.graph.output.extend(helper.make_tensor_value_info(f"patches_{s}", TensorProto.FLOAT, None) for s in scales)
    paths = good_images(good_dir)
    # batch 1: the graph was made for one photo and quantization folds its resize sizes to batch 1
    session = _session(features, threads)
    patches = extract_patches(session, paths, scales, 1, progress)
    dpatches = None
    if with_head and defect_dir is not None:
        dpatches = extract_patches(session, defect_images(defect_dir), scales, 1, progress, label="defect features")
    core = fit_core(patches, config, dpatches, progress)
    values: dict[str, F32] = {}
    for s, (mu, sd) in zip(scales, core.stats, strict=True):
        bank = core.banks[s]
        values[f"s{s}/pc_bank_t2"] = np.ascontiguousarray((-2.0 * bank.T).astype(np.float32))
        values[f"s{s}/pc_bank_sq"] = (bank.astype(np.float64) ** 2).sum(1).astype(np.float32)
        values[f"s{s}/pc_mu"] = np.array(mu, np.float32)
        values[f"s{s}/pc_inv_sd"] = np.array(1.0 / max(sd, 1e-6), np.float32)
    if core.head is not None:
        _, head_inits = head_nodes(scales, core.head, "anomaly_score")
        values.update({i.name: numpy_helper.to_array(i) for i in head_inits if i.name != "dh_flat"})
    found = set()
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
            found.add(init.name)
    missing = sorted(set(values) - found)
    if missing:
        raise ManifestError(f"{onnx_path}: memory bank tensors not found (quantized?): {', '.join(missing)}")
    onnx.save(model, str(onnx_path))
    fit = dict(metadata["fit"])
    fit.update({
        "n_fit": len(paths),
        **core.fit_doc(config, scales),
        "refit": "memory banks, scale statistics, threshold" + (" and defect head" if core.head else "") +
                 " rebuilt from this graph's own features",
    })
    out: dict[str, Any] = {"threshold": core.threshold, "fit": fit}
    if core.region_threshold is not None:
        out["region"] = core.region_threshold
    return out


def bundle_scores(onnx_path: Path, paths: Sequence[Path], threads: int = 0) -> F32:
    """Image scores (the graph's ``score`` output) of photos, one at a time, through a fitted bundle's graph."""
    import onnx

    session = _session(onnx.load(str(onnx_path)), threads)
    return np.array([float(session.run(["score"], {"pixels": to_pixels(p)[None]})[0].reshape(-1)[0])
                     for p in paths], np.float32)


def export_backbone(full_backbone: Path, out_path: Path) -> None:
    """Write the multi-scale uint8 feature graph that ``inspect fit`` can use as its backbone."""
    import onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(feature_graph(full_backbone), str(out_path))
