"""Give a built crop bundle the blended answer (``open_set.blend_logits``) in place: a graph edit, no retraining.

    PYTHONPATH=models python -m models.training.blend_bundle models/crop_disease --weight 0.5 --version 3.1.0

The blend adds ``weight`` x the open-set head's logistic-regression logits (float nodes, also in the INT8 graph) to
the classifier's; ``build_classifiers.CLASSIFIER_BLEND`` builds the same graph from scratch. Fine-tuning is not
bit-reproducible from run to run on the CPU, so this keeps a shipped classifier and only changes how its answer is
formed.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import onnx

from edge_agent.bundles.bundle import MANIFEST_NAME, load_bundle
from training import open_set
from training.export import write_bundle

log = logging.getLogger("blend_bundle")


def blend_bundle(bundle: Path, weight: float, version: str) -> None:
    doc = json.loads((bundle / MANIFEST_NAME).read_text())
    model = onnx.load(str(bundle / doc["model_file"]))
    if any(n.name == "os_blend" for n in model.graph.node):
        raise SystemExit(f"{bundle}: the answer is already blended")
    open_set.blend_logits(model, weight)
    onnx.checker.check_model(model)
    doc["version"] = version
    doc.setdefault("metadata", {}).setdefault("training", {})["classifier_blend"] = (
        open_set.blend_note(weight) + "; metadata.holdout was measured before the blend, MODEL_CARD.md has the "
        "blended figures"
    )
    write_bundle(bundle, model, doc, doc["model_file"])
    load_bundle(bundle)
    log.info("%s: answer blended with weight %g, version %s", bundle, weight, version)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--weight", type=float, required=True)
    parser.add_argument("--version", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    blend_bundle(args.bundle, args.weight, args.version)


if __name__ == "__main__":
    main()
