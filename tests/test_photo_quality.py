"""Photo-quality checks before a crop diagnosis (``edge_agent.vision.quality``) and the retake band.

Given the real leaf photos in tests/data/crops (PlantVillage lab photos and iBean field photos), when they are
checked with the shipped thresholds, then every one passes; when each is blurred, darkened, over-exposed or shrunk
into a large background, then it is refused with the matching retake code. The thresholds themselves were
measured on the full training sets (``python -m benchmarks.photo_quality``, ``docs/photo-quality.md``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage

from edge_agent.config import PhotoQualityOptions, PipelineConfig
from edge_agent.flow.pipeline import InputItem, make_sector, sector_image_side
from edge_agent.sectors.retake import with_quality
from edge_agent.types import Classification, Image, Result, Timings, U8Image
from edge_agent.vision.quality import CODES, WORK_SIDE, PhotoMeasures, QualityThresholds, check, check_photo, measure

from .conftest import CROPS

PHOTOS = sorted(CROPS.rglob("*.jpg"))


def rgb(path: Path) -> U8Image:
    with PILImage.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def blurred(img: U8Image, px: float = 3.0) -> U8Image:
    return np.asarray(cv2.GaussianBlur(img, (0, 0), px * min(img.shape[:2]) / WORK_SIDE), np.uint8)


def darker(img: U8Image) -> U8Image:
    return np.asarray(np.clip(img.astype(np.float32) * 0.25, 0, 255), np.uint8)


def overexposed(img: U8Image) -> U8Image:
    return np.asarray(np.clip(img.astype(np.float32) * 3.5, 0, 255), np.uint8)


def shrunk(img: U8Image, background: tuple[int, int, int]) -> U8Image:
    h, w = img.shape[:2]
    out = np.empty_like(img)
    out[...] = background
    small = cv2.resize(img, (w // 5, h // 5), interpolation=cv2.INTER_AREA)
    out[h // 3 : h // 3 + small.shape[0], w // 2 : w // 2 + small.shape[1]] = small
    return out


def test_the_sample_photos_cover_both_sets() -> None:
    assert len(PHOTOS) >= 20
    assert {p.relative_to(CROPS).parts[0] for p in PHOTOS} == {"plantvillage", "ibean"}


@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.name[:24])
def test_real_photos_pass_and_degraded_ones_get_the_right_code(path: Path) -> None:
    img = rgb(path)
    real = check(measure(img))
    assert real.ok, (path.name, real.to_dict())
    assert check(measure(blurred(img))).code == "blurry"
    assert check(measure(darker(img))).code == "too_dark"
    assert check(measure(overexposed(img))).code == "too_bright"
    # grey, brown soil, a pale wall that makes the frame too bright (the leaf is lit well: go closer is the hint)
    for background in ((128, 128, 128), (110, 80, 55), (215, 205, 185)):
        assert check(measure(shrunk(img, background))).code == "leaf_too_small", background
    on_dark_ground = check(measure(shrunk(img, (40, 36, 32))))  # a dark leaf there is also "too dark"
    assert "leaf_too_small" in on_dark_ground.failed and set(on_dark_ground.failed) <= {"too_dark", "leaf_too_small"}


def test_channel_order_and_scale_do_not_change_the_verdict() -> None:
    img = rgb(PHOTOS[0])
    a = measure(img, "RGB")
    b = measure(np.ascontiguousarray(img[..., ::-1]), "BGR")
    assert a == b
    big = cv2.resize(img, (img.shape[1] * 4, img.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    assert check(measure(np.asarray(big, np.uint8))).ok  # a large photo is judged at the working size


def test_bad_arrays_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="expected an"):
        measure(np.zeros((10, 10), np.uint8))
    flat = np.full((300, 300, 3), 128, np.uint8)
    report = check(measure(flat))
    assert not report.ok and "blurry" in report.failed and "leaf_too_small" in report.failed
    assert report.to_dict()["code"] == report.code == "blurry"
    assert set(report.failed) <= set(CODES)


def test_thresholds_are_configurable_and_default_to_the_measured_ones() -> None:
    opts = PhotoQualityOptions()
    assert opts.enabled and opts.thresholds() == {}
    assert PhotoQualityOptions(min_sharpness=0.5).thresholds() == {"min_sharpness": 0.5}
    img = rgb(PHOTOS[0])
    m = measure(img)
    assert not check(m, QualityThresholds(min_sharpness=m.sharpness * 2)).ok
    with pytest.raises(ValueError, match="quality options need kind: crop"):
        PipelineConfig.model_validate({"name": "p", "kind": "plain", "model": "m", "quality": {}})
    assert sector_image_side(PipelineConfig(name="c", kind="crop", model="m")) == WORK_SIDE
    assert not sector_image_side(PipelineConfig.model_validate(
        {"name": "c", "kind": "crop", "model": "m", "quality": {"enabled": False}}))
    assert not sector_image_side(PipelineConfig(name="p", kind="plain", model="m"))


def leaf_result() -> Result:
    preds = (Classification("Bean___bean_rust", 0.9, 13), Classification("Bean___healthy", 0.1, 14))
    return Result("crop", "1", "classification", preds, (500, 500), Timings())


def test_crop_sector_answers_retake_for_a_bad_photo_and_diagnoses_a_good_one() -> None:
    sector = make_sector(PipelineConfig(name="c", kind="crop", model="m"))
    img = rgb(CROPS / "ibean" / "bean_rust" / "bean_rust_train_0.jpg")

    def item(pixels: U8Image) -> InputItem:
        return InputItem(input_id="x", pipeline="c", source="s", image=Image.from_array(pixels, "RGB"))

    good = sector(leaf_result(), item(img))
    assert good["recognised"] is True and good["quality"]["ok"] is True and "retake" not in good
    bad = sector(leaf_result(), item(blurred(img)))
    assert bad["band"] == "retake" and bad["recognised"] is False and bad["crop"] is None
    assert bad["retake"] == {"code": "blurry", "hint": "retake.blurry"}
    assert bad["top3"][0]["label"] == "Bean___bean_rust"  # the model's answer is kept for audit, not shown
    no_image = sector(leaf_result(), InputItem(input_id="y", pipeline="c", source="s"))
    assert "quality" not in no_image and no_image["recognised"] is True
    off = make_sector(PipelineConfig.model_validate({"name": "c", "kind": "crop", "model": "m",
                                                     "quality": {"enabled": False}}))
    assert off(leaf_result(), item(blurred(img)))["recognised"] is True


def test_with_quality_keeps_a_passing_verdict_and_its_band() -> None:
    verdict = {"band": "unsure", "recognised": True, "label": "Bean___healthy"}
    report = check_photo(Image.from_array(rgb(PHOTOS[0]), "RGB")).to_dict()
    kept = with_quality(verdict, report)
    assert kept["band"] == "unsure" and kept["quality"] == report
    failed = with_quality(verdict, {"ok": False, "code": "too_dark", "failed": ["too_dark"], "measures": {}})
    assert failed["band"] == "retake" and failed["retake"]["code"] == "too_dark"


def test_exposure_is_judged_on_the_leaf_as_well_as_the_frame() -> None:
    t = QualityThresholds()
    black_cloth = PhotoMeasures(brightness=45.0, clipped=0.0, sharpness=2.0, leaf_fraction=0.4, leaf_brightness=120.0)
    assert check(black_cloth, t).ok  # a well-lit leaf on a black background
    dim = PhotoMeasures(brightness=45.0, clipped=0.0, sharpness=2.0, leaf_fraction=0.4, leaf_brightness=50.0)
    assert check(dim, t).code == "too_dark"
    nothing = PhotoMeasures(brightness=45.0, clipped=0.0, sharpness=2.0, leaf_fraction=0.0, leaf_brightness=-1.0)
    assert check(nothing, t).failed == ("too_dark", "leaf_too_small")
    white_wall = PhotoMeasures(brightness=205.0, clipped=0.0, sharpness=2.0, leaf_fraction=0.3, leaf_brightness=130.0)
    assert check(white_wall, t).ok
    burnt = PhotoMeasures(brightness=150.0, clipped=0.3, sharpness=2.0, leaf_fraction=0.3, leaf_brightness=130.0)
    assert check(burnt, t).code == "too_bright"  # burnt-out pixels count whatever the leaf
