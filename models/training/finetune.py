"""Fine-tune EfficientNet-Lite0 from a given block onward on the crop photos, with online augmentation.

The earlier classifier fine-tuned only block 15 on three fixed cached views. Here blocks ``start``..15 and the head
conv are trained from pixels with random crops, flips, 90-degree turns, small rotations and colour jitter, so the
mid-level texture features (lesion shapes: corn grey leaf spot vs northern leaf blight) can adapt too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.common import SEED, SIZE, Sample, load_rgb, to_input
from training.torchnet import Backbone

log = logging.getLogger(__name__)
STORE = 256  # images are kept stretched to 256x256 uint8 in memory; crops are resampled to 224


@dataclass
class FineTuned:
    net: Backbone
    start: int
    weight: np.ndarray  # (C, 1280) linear head on the fine-tuned features
    bias: np.ndarray


def load_store(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros((len(samples), STORE, STORE, 3), np.uint8)
    for i, s in enumerate(samples):
        out[i] = cv2.resize(load_rgb(s.path), (STORE, STORE), interpolation=cv2.INTER_AREA)
    return out


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, 256, 256) float 0-255 -> (B, 3, 224, 224) randomly cropped, turned, flipped, colour-jittered."""
    b = batch.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    scale = torch.sqrt(u(0.55, 1.0))  # side of the crop relative to the image (area 0.55-1)
    log_r = u(math.log(3 / 4), math.log(4 / 3))
    sx, sy = scale * torch.exp(log_r / 2), scale / torch.exp(log_r / 2)
    sx, sy = sx.clamp(max=1.0), sy.clamp(max=1.0)
    tx, ty = (1 - sx) * u(-1, 1), (1 - sy) * u(-1, 1)
    angle = torch.randint(0, 4, (b,), generator=gen).float() * (math.pi / 2) + u(-0.26, 0.26)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * sx * flip
    theta[:, 0, 1] = -sin * sy
    theta[:, 1, 0] = sin * sx * flip
    theta[:, 1, 1] = cos * sy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, [b, 3, SIZE, SIZE], align_corners=False)
    x = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = u(0.75, 1.25)[:, None, None, None]
    contrast = u(0.75, 1.25)[:, None, None, None]
    sat = u(0.7, 1.3)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * sat + grey
    x = x * bright
    return x.clamp(0, 255)


def train(
    store: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    start: int = 5,
    epochs: int = 12,
    batch: int = 32,
    lr: float = 6e-4,
    head_lr: float = 3e-3,
    seed: int = SEED,
) -> FineTuned:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", "2")))
    net = Backbone()
    for p in net.parameters():
        p.requires_grad_(False)
    tuned = net.tuned_parameters(start)
    for p in tuned:
        p.requires_grad_(True)
    fc = nn.Linear(1280, n_classes)
    drop = nn.Dropout(0.2)
    opt = torch.optim.AdamW([{"params": tuned, "lr": lr}, {"params": fc.parameters(), "lr": head_lr}],
                            weight_decay=1e-4)
    n = len(store)
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, head_lr], total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    y_all = torch.from_numpy(labels.astype(np.int64))
    for epoch in range(epochs):
        t0 = time.time()
        order = rng.permutation(n)
        total, correct = 0.0, 0
        net.train()
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            raw = torch.from_numpy(store[idx]).permute(0, 3, 1, 2).float()
            x = (augment(raw, gen) - 127.0) / 128.0
            with torch.no_grad():
                h = net.prefix(x, start)
            f = net.forward_from(h, start)["features"]
            logits = fc(drop(f))
            loss = loss_fn(logits, y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
        log.info("fine-tune from block %d: epoch %d/%d loss %.4f train acc %.4f (%.0f s)", start, epoch + 1, epochs,
                 total / n, correct / n, time.time() - t0)
    net.eval()
    return FineTuned(net, start, fc.weight.detach().numpy().copy(), fc.bias.detach().numpy().copy())


def features(ft: FineTuned, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N, 3, 224, 224) uint8 (the bundle's input) -> (N, 1280) fine-tuned features."""
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = (torch.from_numpy(pixels[i : i + batch].astype(np.float32)) - 127.0) / 128.0
            out.append(ft.net.forward_from(x, -1)["features"].numpy())
    return np.concatenate(out)


def predict_logits(ft: FineTuned, samples: Sequence[Sample], chunk: int = 256) -> np.ndarray:
    """Classifier logits of the photos as the bundle sees them (decoded, stretched to 224), ``chunk`` at a time."""
    out = []
    for i in range(0, len(samples), chunk):
        pixels = np.stack([to_input(load_rgb(s.path)) for s in samples[i : i + chunk]])
        out.append(features(ft, pixels) @ ft.weight.T + ft.bias)
    return np.concatenate(out)


def train_cached(
    path: Path, samples: Sequence[Sample], labels: np.ndarray, n_classes: int, start: int, epochs: int,
    seed: int = SEED,
) -> FineTuned:
    """:func:`train` on ``samples``, or the weights an earlier run cached at ``path`` (saved there after training)."""
    if path.exists():
        return load(path)
    ft = train(load_store(samples), labels, n_classes, start=start, epochs=epochs, seed=seed)
    save(ft, path)
    return ft


def save(ft: FineTuned, path: Path) -> None:
    """Only what was trained, keyed by ONNX initializer name (independent of the module layout)."""
    inits = {k: v.clone() for k, v in ft.net.named_inits(ft.start).items()}
    torch.save({"start": ft.start, "inits": inits, "weight": ft.weight, "bias": ft.bias}, path)


def load(path: Path) -> FineTuned:
    saved = torch.load(path, weights_only=False)
    net = Backbone()
    with torch.no_grad():
        for op in [*net.stem, *(o for b in net.blocks for o in b), *net.head]:
            if op.w_name in saved["inits"]:
                op.weight.copy_(saved["inits"][op.w_name])
                op.bias.copy_(saved["inits"][op.b_name])
    net.eval()
    return FineTuned(net, int(saved["start"]), saved["weight"], saved["bias"])
