"""The 8-bit SiLU benchmark compares like with like: every way computes SiLU; its model accounting is right."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from benchmarks import int8_silu
from edge_agent.toolchain import bench
from tests.conftest import MODELS

X_SCALE, X_ZERO, Y_SCALE, Y_ZERO = 0.05, 128, 0.04, 7  # the quantization silu_graphs uses


def _run(graph: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def test_every_way_computes_silu_within_one_step() -> None:
    codes = np.resize(np.arange(256, dtype=np.uint8), int8_silu.SHAPE)  # every code, repeated
    real = (codes.astype(np.float32) - X_ZERO) * X_SCALE
    silu = real / (1 + np.exp(-real))
    graphs = int8_silu.silu_graphs()
    assert set(graphs) == {"fp32_quickgelu", "int8_sigmoid_mul", "int8_float_island", "int8_gather_table",
                           "int8_one_table"}
    np.testing.assert_allclose(_run(graphs["fp32_quickgelu"], real), silu, atol=1e-5)
    for name in ("int8_sigmoid_mul", "int8_float_island", "int8_gather_table"):
        out = _run(graphs[name], codes)
        assert out.dtype == np.uint8, name
        got = (out.astype(np.float32) - Y_ZERO) * Y_SCALE
        # half an output step of rounding, plus (sigmoid_mul) the sigmoid's own 1/255 steps times |x| <= 6.4
        assert np.abs(got - silu).max() <= Y_SCALE / 2 + 6.4 / 255, name
    # the lower-bound graph is one table pass: leaky ReLU, not SiLU (it is only timed)
    leaky = (_run(graphs["int8_one_table"], codes).astype(np.float32) - Y_ZERO) * Y_SCALE
    assert leaky[real > 1].min() > 1.0


def test_conv_blocks_split_yolox_into_depthwise_and_full_convolutions() -> None:
    blocks = int8_silu.conv_blocks(MODELS / "yolox_nano" / "yolox_nano.onnx")
    kinds = [kind for kind, _ in blocks.values()]
    assert kinds.count("depthwise") == 30 and kinds.count("conv") == len(blocks) - 30
    kind, names = blocks["Conv_44"]  # the stem's 3x3 depthwise convolution with its SiLU
    assert kind == "depthwise" and names == ["Conv_44", "Sigmoid_45", "Mul_46"]


def test_profiled_kernels_map_back_to_graph_nodes() -> None:
    producer = {"1180": "Conv_44"}
    assert int8_silu._node_of("Conv_47_token_9", producer) == "Conv_47"
    assert int8_silu._node_of("Mul_43/QuickGeluFusion/", producer) == "Mul_43"
    assert int8_silu._node_of("1180_nchwc", producer) == "Conv_44"
    assert int8_silu._node_of("Sigmoid_45", producer) == "Sigmoid_45"
    assert int8_silu._node_of("unknown_nchwc", producer) == "unknown_nchwc"


def test_activation_bench_reports_every_way() -> None:
    tiny = bench.Budget(seconds=0.01, min_reps=2, max_reps=3, warmup=1)
    rows = int8_silu.bench_activation(1, tiny)
    assert set(rows) == set(int8_silu.silu_graphs())
    assert rows["fp32_quickgelu"]["vs_fp32_quickgelu"] == 1.0
    assert all(r["n"] >= 2 and r["p50_us"] > 0 for r in rows.values())
