"""The crop classifier's training path (models/training): the torch mirror of the shared EfficientNet-Lite0 export,
the fine-tuned branch written back into an ONNX graph beside the frozen blocks, and the fine-tune cache format.

If the mirror drifted from the ONNX graph, weights trained in torch would mean something else once exported; if the
branch export touched the frozen blocks, the open-set score (which reads them) would silently change."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch  # the train extra: make venv installs it
from onnx import TensorProto, helper

from .conftest import ROOT, SHARED

pytestmark = pytest.mark.datasets
sys.path.insert(0, str(ROOT / "models"))

from training.common import T_7A, T_14, prune, uint8_backbone  # noqa: E402
from training.export import finetuned_classifier_graph  # noqa: E402
from training.finetune import FineTuned, augment, load, save, train_cached  # noqa: E402
from training.open_set import add_to_graph, blend_logits, fit_calibrated, fit_head, view_parts  # noqa: E402
from training.torchnet import Backbone  # noqa: E402

BACKBONE = SHARED / "models" / "efficientnet_lite0_imagenet" / "efficientnet_lite0.onnx"


def _pixels(n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 255, (n, 3, 28, 28), dtype=np.uint8)
    return np.ascontiguousarray(base.repeat(8, axis=2).repeat(8, axis=3))  # blocky, image-like 224x224


def _run(model: onnx.ModelProto, outputs: list[str], pixels: np.ndarray) -> list[np.ndarray]:
    del model.graph.output[:]
    for name in outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    model = prune(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in sess.run(outputs, {"pixels": pixels})]


def _float(pixels: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(pixels.astype(np.float32)) - 127.0) / 128.0


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    if not BACKBONE.exists():
        pytest.fail(f"{BACKBONE} missing: the shared models belong beside the repository")
    return _pixels()


def test_torch_mirror_matches_the_onnx_backbone(pixels: np.ndarray) -> None:
    net = Backbone().eval()
    b10, b14, feats = _run(uint8_backbone([T_14, T_7A, "features"]), [T_14, T_7A, "features"], pixels)
    with torch.no_grad():
        out = net.forward_from(_float(pixels), -1, (10, 14))
    assert np.abs(out["b10"].numpy() - b10).max() < 1e-3
    assert np.abs(out["b14"].numpy() - b14).max() < 1e-3
    assert np.abs(out["features"].numpy() - feats).max() < 1e-3
    assert float(np.abs(feats).max()) > 0.1  # not a trivially zero comparison


def test_finetuned_branch_exports_exactly_and_leaves_the_frozen_blocks_alone(pixels: np.ndarray) -> None:
    net = Backbone().eval()
    with torch.no_grad():  # "training": move blocks 6 and 15 so the branch differs from the frozen copy
        for i in (6, 15):
            for op in net.blocks[i]:
                op.weight.mul_(1.1)
    arrays = {k: v.numpy() for k, v in net.named_inits(5).items()}
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 1280)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    model = finetuned_classifier_graph(5, arrays, w, b)
    logits, p14, p7a = _run(model, ["logits", "p14", "p7a"], pixels)
    with torch.no_grad():
        f = net.forward_from(_float(pixels), -1)["features"].numpy()
    assert np.abs(logits - (f @ w.T + b)).max() < 1e-3
    frozen14, frozen7 = _run(uint8_backbone([T_14, T_7A]), [T_14, T_7A], pixels)
    assert np.abs(p14 - frozen14.mean(axis=(2, 3))).max() < 1e-5
    assert np.abs(p7a - frozen7.mean(axis=(2, 3))).max() < 1e-5


def test_finetune_cache_round_trip(tmp_path: Path) -> None:
    net = Backbone().eval()
    with torch.no_grad():
        net.blocks[9][0].bias.add_(0.5)
    ft = FineTuned(net, 5, np.ones((3, 1280), np.float32), np.zeros(3, np.float32))
    save(ft, tmp_path / "ft.pt")
    back = load(tmp_path / "ft.pt")
    assert back.start == 5 and np.array_equal(back.weight, ft.weight)
    assert torch.equal(back.net.blocks[9][0].bias, net.blocks[9][0].bias)
    assert not torch.equal(back.net.blocks[9][0].bias, Backbone().blocks[9][0].bias)
    # a cached run is loaded, not re-trained (no samples to train on here)
    cached = train_cached(tmp_path / "ft.pt", [], np.zeros(0, np.int64), 3, start=5, epochs=12)
    assert torch.equal(cached.net.blocks[9][0].bias, net.blocks[9][0].bias)


def test_augment_keeps_shape_and_range_and_is_seeded() -> None:
    batch = torch.from_numpy(np.random.default_rng(1).uniform(0, 255, (3, 3, 256, 256)).astype(np.float32))
    a = augment(batch, torch.Generator().manual_seed(3))
    b = augment(batch, torch.Generator().manual_seed(3))
    c = augment(batch, torch.Generator().manual_seed(4))
    assert a.shape == (3, 3, 224, 224)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 255.0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_blended_logits_add_the_open_set_regression_to_the_classifier(pixels: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(3, 1280)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(60, 304)).astype(np.float32)
    head = fit_head(x, np.arange(60) % 3)
    plain = finetuned_classifier_graph(5, {}, w, b)
    add_to_graph(plain, ["p14", "p7a"], head)
    blended = onnx.ModelProto()
    blended.CopyFrom(plain)
    blend_logits(blended, 0.5)
    cls, p14, p7a = _run(plain, ["logits", "p14", "p7a"], pixels)
    (mixed,) = _run(blended, ["logits"], pixels)
    os_logits = np.concatenate([p14, p7a], 1) @ head.lr_w.T + head.lr_b
    assert np.abs(mixed - (cls + 0.5 * os_logits)).max() < 1e-3
    assert np.abs(mixed - cls).max() > 1e-2  # the regression really moved the answer


def test_test_time_view_average_scores_the_mean_of_the_views_parts() -> None:
    rng = np.random.default_rng(3)
    y = np.arange(90) % 3
    x = (rng.normal(size=(90, 3, 20)) + y[:, None, None]).astype(np.float32)
    head = fit_head(x, y)
    assert np.allclose(view_parts(head, x), head.parts(x[:, 0]))  # shipped: the photo as it comes
    assert np.allclose(view_parts(head, x[:, 0]), head.parts(x[:, 0]))
    two = view_parts(head, x, 2)
    assert np.allclose(two, (head.parts(x[:, 0]) + head.parts(x[:, 1])) / 2)
    assert np.abs(two - head.parts(x[:, 0])).max() > 1e-3
    groups = [i // 3 for i in range(90)]  # one leaf = three rows
    _, thr1, oof1 = fit_calibrated(x, y, groups, 0.05)
    _, thr2, oof2 = fit_calibrated(x, y, groups, 0.05, score_views=2)
    assert thr1 != thr2 and not np.allclose(oof1, oof2)  # the average reaches the calibration too
