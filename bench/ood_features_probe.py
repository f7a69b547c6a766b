"""Probe: does a Mahalanobis distance on the pooled features flag odd inputs better than the
logit scores `skinclf calibrate` chooses from?

    python bench/ood_features_probe.py --model models/skinclf-mobilenet.keras \
        --train data/prepared/train --val data/prepared/val --out reports/trust/features_probe.json

Class means and a shared covariance (Lee et al., 2018) of the global-average-pooled features are
fitted on `--train-images` random training images; the score is the smallest distance to a class
mean; the threshold passes 95% of the validation split; the outliers are
`skinclf.trust.ood.reference_outliers()`. The test split is not used. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.backend import load_keras  # noqa: E402
from skinclf.data.layout import list_labelled_images  # noqa: E402
from skinclf.engines.keras import inference_model  # noqa: E402
from skinclf.engines.runner import _decode
from skinclf.model.bundle import load_bundle  # noqa: E402
from skinclf.trust.ood import auroc, reference_outliers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.keras"))
    parser.add_argument("--train", type=Path, default=Path("data/prepared/train"))
    parser.add_argument("--val", type=Path, default=Path("data/prepared/val"))
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--pass-rate", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=Path("reports/trust/features_probe.json"))
    args = parser.parse_args()

    keras = load_keras()
    bundle = load_bundle(args.model)
    size = bundle.image_size
    features = inference_model(keras.Model(bundle.model.inputs, bundle.model.get_layer("pool").output))

    def of_files(paths: list[Path]) -> np.ndarray:
        parts = []
        for i in range(0, len(paths), 32):
            _, x, _ = _decode(paths[i : i + 32], size)
            parts.append(np.asarray(features.predict_on_batch(x)))
        return np.concatenate(parts).astype("float64")

    train = list_labelled_images(args.train, classes=tuple(bundle.classes))
    pick = np.random.default_rng(0).choice(len(train.paths), min(args.train_images, len(train.paths)), replace=False)
    f_train, y_train = of_files([train.paths[i] for i in pick]), np.asarray(train.labels)[pick]
    f_val = of_files(list_labelled_images(args.val, classes=tuple(bundle.classes)).paths)
    f_out = {k: np.asarray(features.predict(v, verbose=0), dtype="float64") for k, v in reference_outliers(size=size).items()}

    present = [c for c in range(len(bundle.classes)) if np.any(y_train == c)]
    means = np.stack([f_train[y_train == c].mean(axis=0) for c in present])
    centred = f_train - means[np.searchsorted(present, y_train)]
    precision = np.linalg.inv(centred.T @ centred / len(centred) + 1e-3 * np.eye(f_train.shape[1]))

    def distance(f: np.ndarray) -> np.ndarray:
        return np.stack([np.einsum("ij,jk,ik->i", f - m, precision, f - m) for m in means], axis=1).min(axis=1)

    d_val = distance(f_val)
    threshold = float(np.quantile(d_val, args.pass_rate, method="higher"))
    d_out = {k: distance(v) for k, v in f_out.items()}
    result = {"model": str(args.model), "score": "min class Mahalanobis distance of pooled features",
              "fitted_on": f"{len(pick)} training images", "threshold_passes": f"{args.pass_rate:.0%} of {args.val}",
              "auroc": {k: round(auroc(d_val, v), 4) for k, v in d_out.items()},
              "flag_rates": {"validation split": round(float(np.mean(d_val > threshold)), 4),
                             **{k: round(float(np.mean(v > threshold)), 4) for k, v in d_out.items()}}}
    result["mean_auroc"] = round(float(np.mean(list(result["auroc"].values()))), 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
