"""Re-derive a classifier bundle's ``thresholds.ood`` after quantization, from ITS OWN scores.

INT8 shifts the OOD score a little. Two ways to move the FP32 threshold onto the quantized model:

* ``--match FP32_BUNDLE`` (what ``make models`` does for the crop model): threshold + the median paired shift
  (INT8 score - FP32 score) on the same images, here training images (``var/splits/crop_calib``), so the held-out
  leaves stay unseen for reporting:

    python -m models.training.calibrate_ood models/crop_disease var/splits/crop_calib \
        --match var/models/crop_disease_fp32

* ``--percentile P``: the P-th percentile of the quantized model's score on in-domain images (never off-domain).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_agent.bundles.bundle import MANIFEST_NAME, load_bundle
from edge_agent.bundles.manifest import SoftmaxDecoder
from edge_agent.toolchain.evaluate import list_classification
from edge_agent.vision.decode import decode_image
from edge_agent.vision.model import Model

log = logging.getLogger("calibrate_ood")


def ood_scores(model: Model, folder: Path) -> np.ndarray:
    dec = model.manifest.decoder
    assert isinstance(dec, SoftmaxDecoder) and dec.ood_output
    pre = model.preprocessor
    out = []
    for path, _ in list_classification(folder):
        tensor, _ = pre.run(decode_image(path.read_bytes(), size_hint=pre.required_size))
        out.append(float(np.asarray(model.runtime.run({model.manifest.input.name: tensor})[dec.ood_output]).ravel()[0]))
    return np.asarray(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("heldout", type=Path, help="held-out in-domain images, <class>/*")
    parser.add_argument("--percentile", type=float, default=98.0)
    parser.add_argument("--match", type=Path, default=None, help="FP32 bundle: shift its threshold instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bundle = load_bundle(args.bundle)
    scores = ood_scores(Model.load(bundle), args.heldout)
    doc = json.loads((args.bundle / MANIFEST_NAME).read_text())
    if args.match is not None:
        ref = load_bundle(args.match)
        assert ref.manifest.thresholds.ood is not None
        shift = float(np.median(scores - ood_scores(Model.load(ref), args.heldout)))
        threshold = ref.manifest.thresholds.ood + shift
        rule = (f"{ref.manifest.name}'s threshold {ref.manifest.thresholds.ood:.4f} + the median paired shift "
                f"{shift:+.4f} (this model's score - FP32's) on {args.heldout.name}")
    else:
        threshold = float(np.percentile(scores, args.percentile))
        rule = f"{args.percentile}th percentile of this model's OOD score on in-domain images"
    doc["thresholds"]["ood"] = round(threshold, 6)
    doc.setdefault("metadata", {})["ood_calibration"] = {
        "rule": rule,
        "images": args.heldout.name,
        "n": len(scores),
        "threshold": round(threshold, 6),
    }
    (args.bundle / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    load_bundle(args.bundle)
    log.info("%s: thresholds.ood = %.4f from %d images (%s)", bundle.name, threshold, len(scores), rule)


if __name__ == "__main__":
    main()
