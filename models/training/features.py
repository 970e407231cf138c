"""Extract and cache backbone activations for a list of samples (var/training/*.npz, never in git).

Per image and view we keep: pooled stage features (112 @14x14, 320 @7x7), the full 7x7x192 block-14 output
(to fine-tune the last block) and the 1280-d pooled head features. Views: 0 = as is, 1 = horizontal flip,
2 = centre 85% crop + vertical flip (light, deterministic augmentation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from training.common import CACHE, T_7A, T_7B, T_13, T_14, T_FEAT, Sample, load_rgb, to_input, uint8_backbone

log = logging.getLogger(__name__)
BATCH = 32


def _views(rgb: np.ndarray, n_views: int) -> list[np.ndarray]:
    out = [to_input(rgb)]
    if n_views > 1:
        out.append(to_input(rgb, flip=True))
    if n_views > 2:
        h, w = rgb.shape[:2]
        dy, dx = int(h * 0.075), int(w * 0.075)
        crop = rgb[dy : h - dy, dx : w - dx][::-1]
        out.append(to_input(np.ascontiguousarray(crop)))
    return out


def session(outputs: Sequence[str], threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("TRAIN_THREADS", "2"))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        uint8_backbone(outputs).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


def extract(samples: Sequence[Sample], name: str, n_views: int = 1) -> dict[str, np.ndarray]:
    """Cached: returns arrays p14 (N,V,112), a7 (N,V,192,7,7) float16, p7 (N,V,320), feat (N,V,1280)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}_v{n_views}.npz"
    keys = np.array([str(s.path) for s in samples])
    if path.exists():
        data = dict(np.load(path))
        if data["keys"].shape == keys.shape and bool((data["keys"] == keys).all()):
            return data
    sess = session([T_14, T_7A, T_7B, T_FEAT])
    n = len(samples)
    p14 = np.zeros((n, n_views, 112), np.float32)
    a7 = np.zeros((n, n_views, 192, 7, 7), np.float16)
    p7 = np.zeros((n, n_views, 320), np.float32)
    feat = np.zeros((n, n_views, 1280), np.float32)
    for start in range(0, n, BATCH):
        chunk = samples[start : start + BATCH]
        pix = np.stack([v for s in chunk for v in _views(load_rgb(s.path), n_views)])
        o14, o7a, o7b, of = sess.run([T_14, T_7A, T_7B, T_FEAT], {"pixels": pix})
        k = len(chunk)
        p14[start : start + k] = o14.mean(axis=(2, 3)).reshape(k, n_views, -1)
        a7[start : start + k] = o7a.reshape(k, n_views, 192, 7, 7)
        p7[start : start + k] = o7b.mean(axis=(2, 3)).reshape(k, n_views, -1)
        feat[start : start + k] = of.reshape(k, n_views, -1)
        log.info("%s: %d/%d", name, min(start + BATCH, n), n)
    data = {"keys": keys, "p14": p14, "a7": a7, "p7": p7, "feat": feat}
    np.savez(path, **data)
    return data


def extract_block13(samples: Sequence[Sample], name: str, n_views: int = 1) -> np.ndarray:
    """Cached block-13 output (N, V, 192, 7, 7) float16, the input of a fine-tuned block 14 (same views)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}_a6_v{n_views}.npy"
    if path.exists():
        cached: np.ndarray = np.load(path)
        if cached.shape[0] == len(samples):
            return cached
    sess = session([T_13])
    a6 = np.zeros((len(samples), n_views, 192, 7, 7), np.float16)
    for start in range(0, len(samples), BATCH):
        chunk = samples[start : start + BATCH]
        pix = np.stack([v for s in chunk for v in _views(load_rgb(s.path), n_views)])
        (out,) = sess.run([T_13], {"pixels": pix})
        a6[start : start + len(chunk)] = out.reshape(len(chunk), n_views, 192, 7, 7)
        log.info("%s block 13: %d/%d", name, min(start + BATCH, len(samples)), len(samples))
    np.save(path, a6)
    return a6


def cache_path(name: str) -> Path:
    return CACHE / name
