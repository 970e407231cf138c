"""Manifest-driven pre-processing: geometry round trips (property tests) and exact tensors."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.bundles.manifest import InputSpec, Normalize, Resize
from edge_agent.types import Image, PreprocessMeta
from edge_agent.vision.preprocess import (
    Preprocessor,
    center_crop_geometry,
    letterbox_geometry,
    map_box_to_original,
    map_boxes_to_original,
)

sizes = st.integers(min_value=1, max_value=5000)
model_sizes = st.integers(min_value=8, max_value=1024)


@given(w=sizes, h=sizes, mw=model_sizes, mh=model_sizes, centre=st.booleans())
def test_letterbox_fits_inside_and_keeps_aspect(w: int, h: int, mw: int, mh: int, centre: bool) -> None:
    (nw, nh), (px, py) = letterbox_geometry((w, h), (mw, mh), "center" if centre else "top_left")
    assert 1 <= nw <= mw and 1 <= nh <= mh
    assert px + nw <= mw and py + nh <= mh and px >= 0 and py >= 0
    assert nw == mw or nh == mh, "one side touches the canvas"
    r = min(mw / w, mh / h)
    assert abs(nw - w * r) <= 1 and abs(nh - h * r) <= 1


@given(
    w=st.integers(16, 4000),
    h=st.integers(16, 4000),
    mw=model_sizes,
    mh=model_sizes,
    centre=st.booleans(),
    fx=st.floats(0, 1),
    fy=st.floats(0, 1),
)
def test_letterbox_point_round_trip(w: int, h: int, mw: int, mh: int, centre: bool, fx: float, fy: float) -> None:
    (nw, nh), (px, py) = letterbox_geometry((w, h), (mw, mh), "center" if centre else "top_left")
    meta = PreprocessMeta(nw / w, nh / h, px, py, (w, h))
    x, y = fx * w, fy * h
    model_pt = np.array([[x * meta.scale_x + px, y * meta.scale_y + py] * 2], np.float32)
    back = map_boxes_to_original(model_pt, meta)[0]
    assert abs(back[0] - x) < 1e-2 * max(1.0, w / nw) + 1e-3
    assert abs(back[1] - y) < 1e-2 * max(1.0, h / nh) + 1e-3


@given(w=st.integers(1, 3000), h=st.integers(1, 3000), mw=model_sizes, mh=model_sizes, frac=st.floats(0.5, 1.0))
def test_center_crop_covers_the_canvas(w: int, h: int, mw: int, mh: int, frac: float) -> None:
    (rw, rh), (ox, oy) = center_crop_geometry((w, h), (mw, mh), frac)
    assert rw >= mw and rh >= mh and ox >= 0 and oy >= 0
    assert ox + mw <= rw and oy + mh <= rh


@settings(max_examples=50)
@given(
    boxes=st.lists(
        st.tuples(st.floats(-50, 500), st.floats(-50, 500), st.floats(0, 300), st.floats(0, 300)),
        min_size=1,
        max_size=20,
    ),
    sx=st.floats(0.05, 5),
    sy=st.floats(0.05, 5),
    px=st.floats(0, 100),
    py=st.floats(0, 100),
)
def test_mapped_boxes_stay_inside_the_original_image(
    boxes: list[tuple[float, float, float, float]], sx: float, sy: float, px: float, py: float
) -> None:
    arr = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], np.float32)
    meta = PreprocessMeta(sx, sy, px, py, (640, 480))
    out = map_boxes_to_original(arr, meta)
    assert (out[:, 0] >= 0).all() and (out[:, 2] <= 640).all()
    assert (out[:, 1] >= 0).all() and (out[:, 3] <= 480).all()
    assert (out[:, 2] >= out[:, 0]).all() and (out[:, 3] >= out[:, 1]).all()
    one_by_one = np.array([map_box_to_original(b, meta) for b in arr.tolist()], np.float64)
    np.testing.assert_allclose(one_by_one, out, rtol=1e-5, atol=1e-3)  # plain-Python twin, float64 vs float32


def _spec(**kw: object) -> InputSpec:
    base: dict[str, object] = {"name": "x", "width": 8, "height": 4, "resize": Resize(mode="stretch")}
    base.update(kw)
    return InputSpec.model_validate(base)


def test_normalisation_matches_the_naive_formula_with_channel_swap() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 8, 3), dtype=np.uint8)
    spec = _spec(color="BGR", normalize=Normalize(scale=1.0, mean=(103.5, 116.3, 123.7), std=(57.4, 57.1, 58.4)))
    tensor, meta = Preprocessor(spec).run(Image(pixels, "RGB", (8, 4)))
    bgr = pixels[:, :, ::-1].astype(np.float64)
    naive = ((bgr - np.array(spec.normalize.mean)) / np.array(spec.normalize.std)).transpose(2, 0, 1)[None]
    assert tensor.dtype == np.float32 and tensor.shape == (1, 3, 4, 8)
    np.testing.assert_allclose(np.asarray(tensor, dtype=np.float64), naive, atol=1e-4)
    assert (meta.scale_x, meta.scale_y, meta.pad_x, meta.pad_y) == (1.0, 1.0, 0.0, 0.0)


def test_uint8_nhwc_input_is_a_plain_copy() -> None:
    pixels = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
    tensor, _ = Preprocessor(_spec(layout="NHWC", dtype="uint8")).run(Image(pixels, "RGB", (8, 4)))
    assert tensor.dtype == np.uint8
    np.testing.assert_array_equal(tensor[0], pixels)


def test_letterbox_pads_with_the_manifest_value_and_reports_geometry() -> None:
    spec = _spec(
        width=8,
        height=8,
        resize=Resize(mode="letterbox", pad_value=114, placement="center"),
        layout="NHWC",
        dtype="uint8",
    )
    pixels = np.full((2, 8, 3), 10, np.uint8)
    tensor, meta = Preprocessor(spec).run(Image(pixels, "RGB", (16, 4)))
    assert (tensor[0, :3] == 114).all() and (tensor[0, 5:] == 114).all()
    assert (tensor[0, 3:5] == 10).all()
    assert meta.pad_y == 3 and meta.scale_x == 0.5


def test_buffers_are_reused_between_calls() -> None:
    pre = Preprocessor(_spec())
    a, _ = pre.run(Image(np.zeros((4, 8, 3), np.uint8), "RGB", (8, 4)))
    b, _ = pre.run(Image(np.ones((40, 80, 3), np.uint8), "RGB", (80, 40)))
    assert a is b


def test_required_size_never_exceeds_the_image() -> None:
    pre = Preprocessor(_spec(width=416, height=416, resize=Resize(mode="letterbox")))
    assert pre.required_size(4000, 3000) == (416, 312)
    assert pre.required_size(100, 50) == (100, 50)


def test_letterbox_stream_matches_a_fresh_preprocessor_for_every_frame() -> None:
    """Padding is written once per geometry; frames of the same size then only refresh the picture's region.
    Every tensor must still equal what a fresh instance makes (sizes and channel orders change mid-stream)."""
    rng = np.random.default_rng(1)
    norm = Normalize(scale=1.0, mean=(103.5, 116.3, 123.7), std=(57.4, 57.1, 58.4))
    frames = [
        Image(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), color, (w, h))  # type: ignore[arg-type]
        for (w, h), color in [((64, 36), "BGR"), ((64, 36), "BGR"), ((30, 50), "BGR"), ((64, 36), "RGB"),
                              ((64, 36), "BGR"), ((32, 32), "BGR"), ((64, 36), "BGR")]
    ]
    for layout in ("NCHW", "NHWC"):
        for placement in ("center", "top_left"):
            spec = _spec(width=32, height=32, resize=Resize(mode="letterbox", pad_value=114, placement=placement),
                         color="BGR", normalize=norm, layout=layout)
            shared = Preprocessor(spec)
            for frame in frames:
                got, meta = shared.run(frame)
                want, want_meta = Preprocessor(spec).run(frame)
                np.testing.assert_array_equal(got, want)
                assert meta == want_meta
