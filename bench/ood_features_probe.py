"""Probe: which out-of-distribution score separates the validation split from the reference
outliers best, and at which rank of the low-rank covariance? Validation and outliers only.

    python bench/ood_features_cache.py --model models/skinclf-mobilenet.keras --splits train val
    python bench/ood_features_probe.py --model models/skinclf-mobilenet.keras --ranks 32 64 256 \
        --out reports/trust/features_probe.json

Reads the cached training and validation features (`bench/ood_features_cache.py`), runs the
reference outliers (`skinclf.trust.reference_images.reference_outliers`) through the Keras engine, and for
each rank fits the feature statistics on the training split (`fit_feature_stats`) and every
candidate score with `fit_ood` (threshold: 95% of validation passes): mean ROC-AUC, worst set's
flag rate and the stored size. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.engines.load import load_engine
from skinclf.trust.ood import fit_feature_stats, fit_ood, outlier_outputs  # noqa: E402
from skinclf.trust.reference_images import reference_outliers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.keras"))
    parser.add_argument("--cache", type=Path, default=Path("/work/runs/ood-cache"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[64])
    parser.add_argument("--pass-rate", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=Path("reports/trust/features_probe.json"))
    args = parser.parse_args()

    engine = load_engine(args.model, engine="keras", batch_size=32)
    folder = args.cache / engine.sha256[:16]
    train, val = np.load(folder / "train.npz"), np.load(folder / "val.npz")
    logits, features = outlier_outputs(engine, reference_outliers(size=engine.image_size))
    result = {"model": str(args.model), "pass_rate": args.pass_rate, "ranks": {}}
    for rank in args.ranks:
        started = time.perf_counter()
        stats = fit_feature_stats(train["features"], train["labels"], rank=rank)
        record = fit_ood(val["logits"], logits, pass_rate=args.pass_rate, inlier_features=val["features"],
                         outlier_features=features, stats=stats)
        result["ranks"][rank] = {"chosen": record["score"], "fit_seconds": round(time.perf_counter() - started, 1),
                                 "stored_mb": round(len(json.dumps(record)) / 1e6, 2),
                                 "separation": record["separation"]}
        print(f"rank {rank}: chosen {record['score']}, " + ", ".join(
            f"{n} {c['mean_auroc']:.4f}/{c['worst_flag_rate']:.2f}" for n, c in record["separation"].items()),
            flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
