"""Trainable parts: the last EfficientNet-Lite0 block + head conv (the "tail") and a linear classifier.

The tail mirrors the ONNX nodes of the shared backbone exactly (BatchNorm already folded into the convs),
so trained weights are written straight back into the ONNX initializers (see ``export.py``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from training.common import BACKBONE, SEED

log = logging.getLogger(__name__)

# ONNX initializer names of block 15 and the head conv in the shared export.
TAIL_INITS = {
    "expand.weight": "onnx::Conv_1036",
    "expand.bias": "onnx::Conv_1037",
    "dw.weight": "onnx::Conv_1039",
    "dw.bias": "onnx::Conv_1040",
    "project.weight": "onnx::Conv_1042",
    "project.bias": "onnx::Conv_1043",
    "head.weight": "onnx::Conv_1045",
    "head.bias": "onnx::Conv_1046",
}
# Block 14 (192 -> 1152 -> dw5x5 -> 192, residual), fine-tuned only with ``Tail(block14=True)``. In the exported
# graph the fine-tuned copy gets its own initializers (``FT14_INITS`` values, see ``export.finetuned_block14``) so
# the frozen block 14 still feeds pool(block 14) for the classifier and the open-set head.
B14_INITS = {
    "b14_expand.weight": "onnx::Conv_1027",
    "b14_expand.bias": "onnx::Conv_1028",
    "b14_dw.weight": "onnx::Conv_1030",
    "b14_dw.bias": "onnx::Conv_1031",
    "b14_project.weight": "onnx::Conv_1033",
    "b14_project.bias": "onnx::Conv_1034",
}
FT14_INITS = {k: "ft14_" + k.replace(".", "_") for k in B14_INITS}


class Tail(nn.Module):
    """Block 15 (192 -> 1152 -> dw3x3 -> 320) + head conv (320 -> 1280) + ReLU6 + global mean.

    ``block14``: also block 14 in front (input = block-13 output instead of block-14 output)."""

    def __init__(self, block14: bool = False) -> None:
        super().__init__()
        self.block14 = block14
        if block14:
            self.b14_expand = nn.Conv2d(192, 1152, 1)
            self.b14_dw = nn.Conv2d(1152, 1152, 5, padding=2, groups=1152)
            self.b14_project = nn.Conv2d(1152, 192, 1)
        self.expand = nn.Conv2d(192, 1152, 1)
        self.dw = nn.Conv2d(1152, 1152, 3, padding=1, groups=1152)
        self.project = nn.Conv2d(1152, 320, 1)
        self.head = nn.Conv2d(320, 1280, 1)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block14:
            x = x + self.b14_project(self.act(self.b14_dw(self.act(self.b14_expand(x)))))
        x = self.act(self.expand(x))
        x = self.act(self.dw(x))
        x = self.project(x)
        x = self.act(self.head(x))
        return x.mean(dim=(2, 3))

    def load_pretrained(self) -> None:
        inits = {i.name: i for i in onnx.load(str(BACKBONE)).graph.initializer}
        names = {**TAIL_INITS, **(B14_INITS if self.block14 else {})}
        state = {k: torch.from_numpy(numpy_helper.to_array(inits[v]).copy()) for k, v in names.items()}
        self.load_state_dict(state)

    def onnx_arrays(self) -> dict[str, np.ndarray]:
        sd = self.state_dict()
        names = {**TAIL_INITS, **(FT14_INITS if self.block14 else {})}
        return {names[k]: sd[k].detach().cpu().numpy().astype(np.float32) for k in names}


@dataclass
class Head:
    """Standardise -> linear, folded on export into one Gemm: logits = x @ W.T + b."""

    weight: np.ndarray  # (C, D) already divided by std
    bias: np.ndarray  # (C,)


class _Net(nn.Module):
    def __init__(self, tail: Tail | None, d_extra: int, n_classes: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.tail = tail
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(mean.numel(), n_classes)
        self.d_extra = d_extra

    def features(self, a7: torch.Tensor | None, extra: torch.Tensor) -> torch.Tensor:
        parts = [extra]
        if self.tail is not None and a7 is not None:
            parts.append(self.tail(a7))
        return torch.cat(parts, dim=1)

    def forward(self, a7: torch.Tensor | None, extra: torch.Tensor) -> torch.Tensor:
        mean: torch.Tensor = self.mean  # type: ignore[assignment]
        std: torch.Tensor = self.std  # type: ignore[assignment]
        f = (self.features(a7, extra) - mean) / std
        out: torch.Tensor = self.fc(self.drop(f))
        return out


def train(
    extra: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    a7: np.ndarray | None = None,
    epochs: int = 12,
    tail_lr: float = 2e-4,
    head_lr: float = 2e-3,
    weight_decay: float = 1e-4,
    batch: int = 64,
    block14: bool = False,
) -> tuple[Tail | None, Head, np.ndarray, np.ndarray]:
    """Train on (N, V, ...) arrays (V augmented views, each a sample). Returns tail, head, feature mean, std.

    ``extra``: fixed pooled features (N, V, D0); ``a7``: block-14 output (N, V, 192, 7, 7) to fine-tune the tail
    on (its 1280-d output is appended to ``extra``), or None for a linear probe on ``extra`` only; with
    ``block14`` ``a7`` is the block-13 output and block 14 is fine-tuned too.
    """
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", "2")))  # 1 on a shared machine
    n, v = extra.shape[:2]
    ex = torch.from_numpy(extra.reshape(n * v, -1).astype(np.float32))
    y = torch.from_numpy(np.repeat(labels, v).astype(np.int64))
    a = torch.from_numpy(a7.reshape(n * v, 192, 7, 7).astype(np.float32)) if a7 is not None else None
    tail: Tail | None = None
    if a is not None:
        tail = Tail(block14)
        tail.load_pretrained()
        tail.eval()
        with torch.no_grad():
            f0 = torch.cat([ex, torch.cat([tail(a[i : i + 256]) for i in range(0, len(a), 256)])], dim=1)
    else:
        f0 = ex
    mean = f0.mean(0)
    std = f0.std(0) + 1e-3
    net = _Net(tail, ex.shape[1], n_classes, mean, std)
    groups: list[dict[str, Any]] = [{"params": net.fc.parameters(), "lr": head_lr}]
    lrs = [head_lr]
    if tail is not None:
        groups.append({"params": tail.parameters(), "lr": tail_lr})
        lrs.append(tail_lr)
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    steps = epochs * ((n * v + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lrs, total_steps=steps, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(n * v))
        total = 0.0
        for i in range(0, n * v, batch):
            idx = order[i : i + batch]
            logits = net(a[idx] if a is not None else None, ex[idx])
            loss = loss_fn(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.info("epoch %d loss %.4f", epoch, total / (n * v))
    net.eval()
    w = net.fc.weight.detach().numpy() / net.std.numpy()[None, :]  # type: ignore[operator]
    b = net.fc.bias.detach().numpy() - w @ net.mean.numpy()  # type: ignore[operator]
    return tail, Head(w.astype(np.float32), b.astype(np.float32)), net.mean.numpy(), net.std.numpy()  # type: ignore[operator]


def embed(tail: Tail | None, extra: np.ndarray, a7: np.ndarray | None) -> np.ndarray:
    """Features the head sees for (N, D0) extra and (N, 192, 7, 7) a7 (one view)."""
    if tail is None or a7 is None:
        return extra.astype(np.float32)
    tail.eval()
    with torch.no_grad():
        t = torch.from_numpy(a7.astype(np.float32))
        out = torch.cat([tail(t[i : i + 256]) for i in range(0, len(t), 256)]).numpy()
    return np.concatenate([extra.astype(np.float32), out], axis=1)
