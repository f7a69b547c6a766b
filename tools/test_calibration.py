"""Calibration of the bundled model on the test split, with and without its temperature.

    python tools/test_calibration.py > reports/test_calibration.json

Run by tools/refresh_bundle.sh after calibration: the temperature was fitted on the validation
split, so the test split says whether it carries over (a second look at the test split, like
every test figure of this model). "Without" undoes the stored temperature T: the model's
log-probabilities times T are its logits before the temperature, up to a per-image constant
that the softmax ignores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skinclf.data.layout import list_labelled_images  # noqa: E402
from skinclf.engines.load import load_engine  # noqa: E402
from skinclf.engines.runner import predict_files  # noqa: E402
from skinclf.model.posthoc import calibration_report, softmax  # noqa: E402

SUMMARY = ("ece", "nll", "brier")


def main() -> None:
    engine = load_engine(REPO / "models" / "skinclf-mobilenet.keras")
    images = list_labelled_images(REPO / "data" / "prepared" / "test", classes=tuple(engine.classes))
    batches = list(predict_files(engine, images.paths, workers=2))
    bad = [f"{p}: {e}" for b in batches for p, e in zip(b.paths, b.errors) if e]
    if bad:
        sys.exit(f"cannot read test image {bad[0]}")
    after = np.concatenate([b.probs for b in batches]).astype("float64")
    temperature = float(engine.meta["calibration"]["temperature"])
    before = softmax(np.log(np.clip(after, 1e-12, 1.0)) * temperature)
    labels = np.asarray(images.labels)
    print(json.dumps({
        "model_sha256": engine.sha256, "engine": engine.name, "images": len(labels), "temperature": temperature,
        "test_before": {k: calibration_report(before, labels)[k] for k in SUMMARY},
        "test_after": {k: calibration_report(after, labels)[k] for k in SUMMARY},
    }, indent=2))


if __name__ == "__main__":
    main()
