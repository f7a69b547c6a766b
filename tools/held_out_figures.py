"""Record in a bundle the held-out test figures it is accepted with, and its OOD flag rate there.

    python tools/held_out_figures.py --model models/skinclf-mobilenet.keras --test data/prepared/test \
        --note "second look: ..." [--out OTHER.keras]

One forward pass of the Keras engine over the test split (logits and pooled features) gives
balanced accuracy, melanoma sensitivity/specificity at the model's decision, and how many of
these dermoscopic images the bundle's "unlike the training images" flag catches (its false
alarms on good images, per class too). They go into `meta["metrics"]["test"]` and
`meta["ood"]["held_out"]`, which `serve` shows (`/api/model`). THIS LOOKS AT THE TEST SPLIT:
run it once, after every choice is made; nothing may be changed because of what it prints.
The bundle's SHA-256 changes: export the ONNX form afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.data.layout import list_labelled_images
from skinclf.engines.keras import KerasEngine
from skinclf.metrics import balanced_accuracy
from skinclf.model.bundle import load_bundle, save_bundle
from skinclf.model.outlier import flag
from skinclf.trust.calibrate import folder_outputs


def figures(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    pred = logits.argmax(axis=1)
    out = {"n": len(labels), "accuracy": round(float(np.mean(pred == labels)), 6),
           "balanced_accuracy": round(float(balanced_accuracy(labels, pred)), 6)}
    if "mel" in classes:
        m = classes.index("mel")
        out["melanoma"] = {"positives": int((labels == m).sum()), "negatives": int((labels != m).sum()),
                           "at_decision": {"sensitivity": round(float(np.mean(pred[labels == m] == m)), 6),
                                           "specificity": round(float(np.mean(pred[labels != m] != m)), 6)}}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.keras"))
    parser.add_argument("--test", type=Path, default=Path("data/prepared/test"))
    parser.add_argument("--note", default="held-out test split, never used for any choice")
    parser.add_argument("--out", type=Path, default=None, help="default: the model, replaced atomically")
    args = parser.parse_args()

    bundle = load_bundle(args.model)
    images = list_labelled_images(args.test, classes=tuple(bundle.classes))
    logits, features, errors = folder_outputs(KerasEngine(bundle, batch_size=32), list(images.paths),
                                              description="Held-out test")
    ok = np.array([e is None for e in errors], dtype=bool)
    labels = np.asarray(images.labels)[ok]
    meta = dict(bundle.meta)
    test = {**figures(logits[ok], labels, list(bundle.classes)), "data": str(args.test), "note": args.note}
    meta["metrics"] = {**(meta.get("metrics") or {}), "test": test}
    if meta.get("ood"):
        _, flagged = flag(logits[ok], meta["ood"], None if features is None else features[ok])
        per_class = {c: round(float(flagged[labels == i].mean()), 4) for i, c in enumerate(bundle.classes)
                     if (labels == i).any()}
        meta["ood"] = {**meta["ood"], "held_out": {
            "data": str(args.test), "images": int(ok.sum()), "flagged": int(flagged.sum()),
            "flag_rate": round(float(flagged.mean()), 4), "flag_rate_per_class": per_class,
            "note": "dermoscopic images the flag wrongly calls unlike the training images (a look at test)"}}
    save_bundle(bundle.model, args.out or args.model, meta)
    print(json.dumps({"test": test, "ood_held_out": meta.get("ood", {}).get("held_out")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
