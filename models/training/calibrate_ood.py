"""Re-derive a classifier bundle's ``thresholds.ood`` from ITS OWN scores on held-out in-domain images.

INT8 shifts the OOD score a little, so after ``edge-agent quantize`` the threshold is chosen again on the
quantized model, from held-out leaf photos only (never from off-domain photos):

    python -m models.training.calibrate_ood models/crop_disease var/splits/crop_gate --percentile 98
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bundle = load_bundle(args.bundle)
    scores = ood_scores(Model.load(bundle), args.heldout)
    threshold = float(np.percentile(scores, args.percentile))
    doc = json.loads((args.bundle / MANIFEST_NAME).read_text())
    doc["thresholds"]["ood"] = round(threshold, 6)
    doc.setdefault("metadata", {})["ood_calibration"] = {
        "rule": f"{args.percentile}th percentile of this model's OOD score on held-out in-domain images",
        "heldout": args.heldout.name,
        "n": len(scores),
        "threshold": round(threshold, 6),
    }
    (args.bundle / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    load_bundle(args.bundle)
    log.info("%s: thresholds.ood = %.4f from %d held-out images", bundle.name, threshold, len(scores))


if __name__ == "__main__":
    main()
