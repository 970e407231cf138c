"""The torch side of ``edge-agent detect fit`` (the ``train`` extra): fine-tune a YOLOX graph on YOLO-labelled frames.

Only :mod:`edge_agent.toolchain.detect_fit` imports this module, and only when it trains. Nothing here knows about
bundles or files: it gets the base ONNX graph, the tensors of its head (``detect_fit.YoloxHead``) and the frames as
arrays, and returns the trained convolution weights by initializer name, which ``detect_fit`` writes
back into the same graph. The fitted bundle runs with onnxruntime alone.

* :class:`GraphNet` runs the ONNX graph itself in torch (the op set of a YOLOX export: Conv, Sigmoid, Mul, Add,
  Concat, Slice, MaxPool, nearest Resize, plus the uint8 input's Cast and normalisation), every convolution's
  weight and bias a trainable parameter. Same numbers as onnxruntime (1e-5), no architecture to keep in step.
* Loss: YOLOX's own (Ge et al. 2021): SimOTA assignment (centre prior, cost = class BCE + 3 * -log IoU,
  dynamic k from the top-10 IoUs), 5 * (1 - IoU^2) + objectness BCE + class BCE (target: the IoU), per
  foreground anchor.
* Augmentation (numpy, :func:`sample`): mosaic of four frames or one frame at a random scale and place, flips
  (and quarter turns for top-down cameras), gain, contrast and colour-cast jitter, occasional blur; the last
  epochs run without mosaic, as YOLOX does.
* AdamW with warm-up and cosine decay; the weights returned are an exponential moving average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.types import U8Image
from edge_agent.vision import imaging

F32 = npt.NDArray[np.float32]
TrainProgress = Callable[[int, int, float], None]
"""(step, total steps, loss)"""
EpochHook = Callable[[int, dict[str, F32], dict[str, F32]], None]
"""(epoch, raw weights, EMA weights), by initializer name"""

PAD = 114


# ----------------------------------------------------------------------------------------------- the graph in torch


class GraphNet(nn.Module):
    """An ONNX graph (a YOLOX export's op set) evaluated in torch, up to the tensors named in ``outputs``.

    Conv weights and biases are :class:`torch.nn.Parameter` objects, listed by initializer name in ``param_names``;
    ``conv_override`` replaces some initializers (e.g. a class convolution with fewer classes) before training.
    """

    def __init__(self, model: Any, outputs: Sequence[str], conv_override: dict[str, F32] | None = None) -> None:
        super().__init__()
        from onnx import helper, numpy_helper

        g = model.graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        inits.update(conv_override or {})
        needed = set(outputs)
        kept = []
        for node in reversed(list(g.node)):
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(x for x in node.input if x)
        kept.reverse()
        self.params = nn.ParameterList()
        self.param_names: list[str] = []
        index: dict[str, int] = {}
        self.consts: dict[str, torch.Tensor] = {}
        self.nodes: list[tuple[str, list[str], str, dict[str, Any]]] = []
        for node in kept:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            for k, x in enumerate(node.input):
                if x not in inits or x in index or x in self.consts:
                    continue
                if node.op_type == "Conv" and k > 0:
                    index[x] = len(self.params)
                    self.params.append(nn.Parameter(torch.from_numpy(np.array(inits[x], np.float32))))
                    self.param_names.append(x)
                else:
                    self.consts[x] = torch.from_numpy(np.array(inits[x]))
            self.nodes.append((node.op_type, list(node.input), node.output[0], attrs))
        self._index = index
        self.input_name = g.input[0].name
        self.outputs = list(outputs)

    def param(self, name: str) -> nn.Parameter:
        p: nn.Parameter = self.params[self._index[name]]
        return p

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = {self.input_name: x, **self.consts}
        for op, ins, out, a in self.nodes:
            env[out] = self._run(op, ins, a, env)
        return [env[o] for o in self.outputs]

    def _run(self, op: str, ins: list[str], a: dict[str, Any], env: dict[str, torch.Tensor]) -> torch.Tensor:
        if op == "Conv":
            pads = a.get("pads", [0, 0, 0, 0])
            if pads[0] != pads[2] or pads[1] != pads[3]:
                raise ValueError("asymmetric Conv padding is not supported")
            bias = self.param(ins[2]) if len(ins) > 2 and ins[2] else None
            return F.conv2d(env[ins[0]], self.param(ins[1]), bias, stride=tuple(a.get("strides", [1, 1])),
                            padding=(pads[0], pads[1]), dilation=tuple(a.get("dilations", [1, 1])),
                            groups=int(a.get("group", 1)))
        if op == "Sigmoid":
            return torch.sigmoid(env[ins[0]])
        if op in ("Mul", "Add", "Sub", "Div"):
            x, y = env[ins[0]].float(), env[ins[1]].float()
            return x * y if op == "Mul" else x + y if op == "Add" else x - y if op == "Sub" else x / y
        if op == "Concat":
            return torch.cat([env[i] for i in ins], dim=int(a["axis"]))
        if op == "MaxPool":
            k, s, p = a["kernel_shape"], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0])
            return F.max_pool2d(env[ins[0]], tuple(k), stride=tuple(s), padding=(p[0], p[1]))
        if op == "Resize":
            if a.get("mode", b"nearest") not in (b"nearest", "nearest"):
                raise ValueError("only nearest Resize is supported")
            scales = env[ins[2]].tolist()
            return F.interpolate(env[ins[0]], scale_factor=(scales[2], scales[3]), mode="nearest")
        if op == "Slice":
            t = env[ins[0]]
            start, end = int(env[ins[1]][0]), int(env[ins[2]][0])
            axis = int(env[ins[3]][0]) if len(ins) > 3 else 0
            step = int(env[ins[4]][0]) if len(ins) > 4 else 1
            idx: list[slice] = [slice(None)] * t.dim()
            idx[axis] = slice(start, min(end, t.shape[axis]), step)
            return t[tuple(idx)]
        if op in ("Cast", "Identity"):
            return env[ins[0]].float()
        raise ValueError(f"op {op} is not supported by the trainer")


# ----------------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augment:
    mosaic: float = 0.5
    scale: tuple[float, float] = (0.5, 1.25)
    hflip: bool = True
    top_down: bool = True
    """Vertical flips and quarter turns: right for cameras looking down (chutes, pens), wrong for side views."""
    color: float = 0.3
    blur: float = 0.1
    aspect: float = 0.0
    """Aspect-ratio jitter: the width is stretched by a factor drawn log-uniformly from [1/(1+a), 1+a]."""
    zoom_out: float = 0.0
    """Share of canvases that are a grid of 2x2 to 4x4 frames, each shrunk into its cell: many small animals
    (far cameras, drones) from frames of near ones."""
    saturation: float = 0.0
    """Colour saturation jitter (0.4: from 60% greyer to 40% more saturated): breeds and light differ by camera."""


def _boxes_in(boxes: F32, x0: float, y0: float, r: float | tuple[float, float], w: int, h: int,
              min_visible: float = 0.4) -> F32:
    """Boxes (N, 5: x1 y1 x2 y2 class) scaled by ``r`` (or (rx, ry)), shifted by (x0, y0), clipped to (w, h);
    those mostly outside are dropped."""
    if len(boxes) == 0:
        return boxes.reshape(0, 5)
    rx, ry = r if isinstance(r, tuple) else (r, r)
    b = boxes[:, :4] * np.array([rx, ry, rx, ry], np.float32) + np.array([x0, y0, x0, y0], np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = np.clip(b, 0, [w, h, w, h]).astype(np.float32)
    visible = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = (visible >= min_visible * np.maximum(area, 1e-6)) & (c[:, 2] - c[:, 0] >= 2) & (c[:, 3] - c[:, 1] >= 2)
    out: F32 = np.concatenate([c, boxes[:, 4:5]], axis=1)[keep]
    return out


def _paste(canvas: U8Image, img: U8Image, r: float | tuple[float, float], x0: int, y0: int) -> None:
    """Resize ``img`` by ``r`` (or (rx, ry)) and paste it with its top-left corner at (x0, y0), cropped to the
    canvas."""
    h, w = img.shape[:2]
    rx, ry = r if isinstance(r, tuple) else (r, r)
    nw, nh = max(1, round(w * rx)), max(1, round(h * ry))
    big_h, big_w = canvas.shape[:2]
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(big_w, x0 + nw), min(big_h, y0 + nh)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    scaled = imaging.resize(img, (nw, nh), "area" if max(rx, ry) < 1 else "linear")
    canvas[cy0:cy1, cx0:cx1] = scaled[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]


def _stretch(aug: Augment, rng: np.random.Generator) -> float:
    """Width factor of the aspect jitter (1 without it)."""
    return float(math.exp(rng.uniform(-1, 1) * math.log1p(aug.aspect))) if aug.aspect > 0 else 1.0


def _single(img: U8Image, boxes: F32, size: int, aug: Augment, rng: np.random.Generator) -> tuple[U8Image, F32]:
    canvas = np.full((size, size, 3), PAD, np.uint8)
    h, w = img.shape[:2]
    a = _stretch(aug, rng)
    r = min(size / (w * a), size / h) * rng.uniform(*aug.scale)
    rx, ry = r * a, r
    nw, nh = w * rx, h * ry
    x0 = int(rng.uniform(min(0.0, size - nw), max(0.0, size - nw) + 1e-6))
    y0 = int(rng.uniform(min(0.0, size - nh), max(0.0, size - nh) + 1e-6))
    _paste(canvas, img, (rx, ry), x0, y0)
    return canvas, _boxes_in(boxes, x0, y0, (rx, ry), size, size)


def _grid(frames: Sequence[tuple[U8Image, F32]], i: int, size: int, aug: Augment,
          rng: np.random.Generator) -> tuple[U8Image, F32]:
    """A zoom-out canvas: an n x n grid (n = 2-4) of frames, each shrunk into its cell at a random place."""
    n = int(rng.integers(2, 5))
    cell = size / n
    canvas = np.full((size, size, 3), PAD, np.uint8)
    out: list[F32] = []
    for k in range(n * n):
        img, boxes = frames[i] if k == 0 else frames[int(rng.integers(0, len(frames)))]
        h, w = img.shape[:2]
        a = _stretch(aug, rng)
        r = min(cell / (w * a), cell / h) * rng.uniform(0.7, 1.0)
        rx, ry = r * a, r
        cx0, cy0 = int((k % n) * cell), int((k // n) * cell)
        x0 = cx0 + int(rng.uniform(0, max(0.0, cell - w * rx)))
        y0 = cy0 + int(rng.uniform(0, max(0.0, cell - h * ry)))
        _paste(canvas, img, (rx, ry), x0, y0)
        out.append(_boxes_in(boxes, x0, y0, (rx, ry), size, size))
    return canvas, np.concatenate(out)


def _mosaic(frames: Sequence[tuple[U8Image, F32]], size: int, aug: Augment,
            rng: np.random.Generator) -> tuple[U8Image, F32]:
    """Four frames around a random centre, each at a random scale (YOLOX's mosaic, on a canvas of ``size``)."""
    canvas = np.full((size, size, 3), PAD, np.uint8)
    xc, yc = (int(rng.uniform(0.3 * size, 0.7 * size)) for _ in range(2))
    out: list[F32] = []
    for k, (img, boxes) in enumerate(frames):
        h, w = img.shape[:2]
        r = min(size / w, size / h) * rng.uniform(0.4, 0.9)
        nw, nh = round(w * r), round(h * r)
        x0 = xc - nw if k in (0, 2) else xc
        y0 = yc - nh if k in (0, 1) else yc
        # the quadrant is the part of the canvas on this side of the centre; crop the frame to it
        qx0, qx1 = (0, xc) if k in (0, 2) else (xc, size)
        qy0, qy1 = (0, yc) if k in (0, 1) else (yc, size)
        sub = canvas[qy0:qy1, qx0:qx1]
        _paste(sub, img, r, x0 - qx0, y0 - qy0)
        b = _boxes_in(boxes, x0 - qx0, y0 - qy0, r, qx1 - qx0, qy1 - qy0)
        out.append(b + np.array([qx0, qy0, qx0, qy0, 0], np.float32))
    return canvas, np.concatenate(out)


def _geometry(img: U8Image, boxes: F32, aug: Augment, rng: np.random.Generator) -> tuple[U8Image, F32]:
    size = img.shape[0]
    b = boxes.copy()
    if aug.hflip and rng.random() < 0.5:
        img = img[:, ::-1]
        b[:, [0, 2]] = size - b[:, [2, 0]]
    if aug.top_down:
        if rng.random() < 0.5:
            img = img[::-1]
            b[:, [1, 3]] = size - b[:, [3, 1]]
        if rng.random() < 0.5:  # transpose: with the flips, every quarter turn and mirror
            img = img.transpose(1, 0, 2)
            b = b[:, [1, 0, 3, 2, 4]]
    return np.ascontiguousarray(img), b


def _photometric(img: U8Image, aug: Augment, rng: np.random.Generator) -> U8Image:
    x = img.astype(np.float32)
    if aug.color > 0:
        gain = rng.uniform(1 - aug.color, 1 + aug.color)
        cast = rng.uniform(1 - aug.color / 3, 1 + aug.color / 3, size=3).astype(np.float32)
        mean = x.mean()
        contrast = rng.uniform(1 - aug.color, 1 + aug.color)
        x = ((x - mean) * contrast + mean) * gain * cast
        if aug.saturation > 0:
            grey = x.mean(axis=2, keepdims=True)
            x = grey + (x - grey) * rng.uniform(1 - aug.saturation, 1 + aug.saturation)
        if rng.random() < 0.1:
            x[...] = x.mean(axis=2, keepdims=True)
    if aug.blur > 0 and rng.random() < aug.blur:
        size = img.shape[0]
        f = rng.uniform(0.3, 0.6)
        small = imaging.resize(np.clip(x, 0, 255).astype(np.uint8), (max(8, int(size * f)),) * 2, "area")
        return imaging.resize(small, (size, size), "linear")
    return np.clip(x, 0, 255).astype(np.uint8)


def sample(frames: Sequence[tuple[U8Image, F32]], i: int, size: int, aug: Augment, mosaic: bool,
           rng: np.random.Generator) -> tuple[U8Image, F32]:
    """One augmented training canvas (size, size, 3) BGR and its boxes (N, 5): x1, y1, x2, y2 in canvas pixels,
    class id."""
    if mosaic and aug.zoom_out > 0 and rng.random() < aug.zoom_out:
        img, boxes = _grid(frames, i, size, aug, rng)
    elif mosaic and rng.random() < aug.mosaic:
        picks = [frames[i]] + [frames[int(j)] for j in rng.integers(0, len(frames), 3)]
        img, boxes = _mosaic(picks, size, aug, rng)
    else:
        img, boxes = _single(*frames[i], size, aug, rng)
    img, boxes = _geometry(img, boxes, aug, rng)
    return _photometric(img, aug, rng), boxes


# ----------------------------------------------------------------------------------------------- loss


def _pair_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(G, 4) x (K, 4) x1 y1 x2 y2 -> (G, K)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of (K, 4) x (K, 4)."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / ((a[:, 2:] - a[:, :2]).prod(-1) + (b[:, 2:] - b[:, :2]).prod(-1) - inter + 1e-9)


def simota(
    boxes: torch.Tensor, obj: torch.Tensor, cls: torch.Tensor, centres: torch.Tensor, strides: torch.Tensor,
    gt: torch.Tensor, gt_cls: torch.Tensor, radius: float = 2.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimOTA for one image (no gradient). ``boxes`` (N, 4) predicted x1 y1 x2 y2, ``obj`` (N,) and ``cls`` (N, C)
    logits, ``centres`` (N, 2) anchor centres, ``strides`` (N,), ``gt`` (G, 4), ``gt_cls`` (G,) int64.

    Returns (foreground anchor indices (F,), their gt index (F,), their IoU with it (F,)).
    """
    c = centres[None]
    in_box = ((c > gt[:, None, :2]) & (c < gt[:, None, 2:])).all(-1)  # (G, N)
    gt_c = (gt[:, :2] + gt[:, 2:]) / 2
    r = radius * strides[None, :, None]
    in_ctr = ((c > gt_c[:, None] - r) & (c < gt_c[:, None] + r)).all(-1)
    cand = (in_box | in_ctr).any(0)
    idx = torch.nonzero(cand).squeeze(1)
    empty = torch.zeros(0, dtype=torch.long)
    if idx.numel() == 0:
        return empty, empty, torch.zeros(0)
    ious = _pair_iou(gt, boxes[idx])  # (G, K)
    p = (torch.sigmoid(cls[idx]) * torch.sigmoid(obj[idx])[:, None]).sqrt()  # (K, C)
    p_gt = p[:, gt_cls].T.clamp(1e-6, 1 - 1e-6)  # (G, K): probability of each gt's class
    cost = -torch.log(p_gt) - 3.0 * torch.log(ious + 1e-8) + 1e5 * (~(in_box & in_ctr)[:, idx]).float()
    k = min(10, idx.numel())
    dyn = ious.topk(k, dim=1).values.sum(1).int().clamp(min=1)
    match = torch.zeros_like(cost, dtype=torch.bool)
    for g in range(len(gt)):
        match[g, cost[g].topk(int(dyn[g]), largest=False).indices] = True
    multi = match.sum(0) > 1
    if multi.any():
        best = cost[:, multi].argmin(0)
        match[:, multi] = False
        match[best, torch.nonzero(multi).squeeze(1)] = True
    fg = match.any(0)
    gt_of = match[:, fg].float().argmax(0)
    return idx[fg], gt_of, ious[gt_of, torch.nonzero(fg).squeeze(1)]


def yolox_loss(
    outputs: Sequence[torch.Tensor], strides: Sequence[int], targets: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """YOLOX loss over a batch. ``outputs``: per level reg (B, 4, h, w), obj (B, 1, h, w), cls (B, C, h, w) logits;
    ``targets``: per image (boxes (G, 4) in input pixels, class ids (G,))."""
    regs, objs, clss, centres, sts = [], [], [], [], []
    for lvl, s in enumerate(strides):
        reg, obj, cls = outputs[3 * lvl : 3 * lvl + 3]
        h, w = reg.shape[2], reg.shape[3]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([xs, ys], -1).reshape(-1, 2).float()
        r = reg.flatten(2).transpose(1, 2)  # (B, hw, 4)
        xy = (r[..., :2] + grid) * s
        wh = torch.exp(r[..., 2:].clamp(max=10.0)) * s
        regs.append(torch.cat([xy - wh / 2, xy + wh / 2], -1))
        objs.append(obj.flatten(2).transpose(1, 2)[..., 0])
        clss.append(cls.flatten(2).transpose(1, 2))
        centres.append((grid + 0.5) * s)
        sts.append(torch.full((h * w,), float(s)))
    boxes, obj_l, cls_l = torch.cat(regs, 1), torch.cat(objs, 1), torch.cat(clss, 1)
    ctr, stride = torch.cat(centres), torch.cat(sts)
    n_fg = 0
    loss_iou = boxes.new_zeros(())
    loss_cls = boxes.new_zeros(())
    obj_target = torch.zeros_like(obj_l)
    for i, (gt, gt_cls) in enumerate(targets):
        if len(gt) == 0:
            continue
        with torch.no_grad():
            fg, gt_of, iou_of = simota(boxes[i].detach(), obj_l[i].detach(), cls_l[i].detach(), ctr, stride,
                                       gt, gt_cls)
        if fg.numel() == 0:
            continue
        n_fg += int(fg.numel())
        obj_target[i, fg] = 1.0
        iou = _iou(boxes[i, fg], gt[gt_of])
        loss_iou = loss_iou + (1 - iou**2).sum()
        cls_target = torch.zeros_like(cls_l[i, fg])
        cls_target[torch.arange(len(fg)), gt_cls[gt_of]] = iou_of
        loss_cls = loss_cls + F.binary_cross_entropy_with_logits(cls_l[i, fg], cls_target, reduction="sum")
    loss_obj = F.binary_cross_entropy_with_logits(obj_l, obj_target, reduction="sum")
    return (5.0 * loss_iou + loss_obj + loss_cls) / max(n_fg, 1)


# ----------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    size: int = 320
    epochs: int = 30
    batch: int = 8
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    no_mosaic_epochs: int = 5
    augment: Augment = Augment()
    seed: int = 0
    threads: int = 2
    frozen_lr: float = 0.0
    """Learning rate of the convolutions ``trainable`` leaves out, as a fraction of ``lr`` (0: frozen)."""


def train(
    model: Any,
    head_outputs: Sequence[str],
    strides: Sequence[int],
    conv_override: dict[str, F32],
    frames: Sequence[tuple[U8Image, F32]],
    config: TrainConfig,
    trainable: Callable[[str], bool] | None = None,
    progress: TrainProgress | None = None,
    on_epoch: EpochHook | None = None,
) -> dict[str, F32]:
    """Fine-tune ``model`` (onnx.ModelProto) on ``frames``: BGR image, boxes (N, 5) x1 y1 x2 y2 in its pixels
    and class id.

    ``head_outputs``: per level, the reg, obj-logit and cls-logit tensor names. Returns every trained
    convolution initializer (EMA weights) by name. ``on_epoch(epoch, raw, ema)`` is called after each epoch with
    copies of the current and the EMA weights by name (weight averaging experiments).
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, config.threads))
    rng = np.random.default_rng(config.seed)
    net = GraphNet(model, head_outputs, conv_override)
    slow: list[nn.Parameter] = []
    for name, p in zip(net.param_names, net.params, strict=True):
        fast = trainable(name) if trainable is not None else True
        p.requires_grad_(fast or config.frozen_lr > 0)
        if not fast:
            slow.append(p)
    params = [p for p in net.params if p.requires_grad]
    groups = []
    for members, scale in (([p for p in params if all(p is not q for q in slow)], 1.0), (slow, config.frozen_lr)):
        if scale > 0 and members:
            groups.append({"params": [p for p in members if p.dim() > 1], "weight_decay": config.weight_decay,
                           "scale": scale})
            groups.append({"params": [p for p in members if p.dim() <= 1], "weight_decay": 0.0, "scale": scale})
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    ema = [p.detach().clone() for p in net.params]
    steps_per_epoch = max(1, math.ceil(len(frames) / config.batch))
    total = steps_per_epoch * config.epochs
    warm = max(1, int(config.warmup_epochs * steps_per_epoch))
    step = 0
    net.train()
    for epoch in range(config.epochs):
        mosaic = epoch < config.epochs - config.no_mosaic_epochs
        order = rng.permutation(len(frames))
        for s in range(steps_per_epoch):
            picks = order[s * config.batch : (s + 1) * config.batch]
            if len(picks) == 0:
                continue
            imgs, targets = [], []
            for i in picks:
                img, boxes = sample(frames, int(i), config.size, config.augment, mosaic, rng)
                imgs.append(img)
                targets.append((torch.from_numpy(boxes[:, :4].copy()), torch.from_numpy(boxes[:, 4].astype(np.int64))))
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
            lr = config.lr * (step + 1) / warm if step < warm else \
                config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
            for group in opt.param_groups:
                group["lr"] = lr * group["scale"]
            loss = yolox_loss(net(x), strides, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            step += 1
            d = min(0.998, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, net.params, strict=True):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
            if progress is not None:
                progress(step, total, float(loss.detach()))
        if on_epoch is not None:
            on_epoch(epoch, {n: p.detach().numpy().copy() for n, p in zip(net.param_names, net.params, strict=True)},
                     {n: e.numpy().copy() for n, e in zip(net.param_names, ema, strict=True)})
    return {name: e.numpy().astype(np.float32) for name, e in zip(net.param_names, ema, strict=True)}
