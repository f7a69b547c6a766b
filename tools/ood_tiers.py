"""Give a calibrated bundle the two-tier "unusual" / "very unlike" flag and the percentile scale
(issue 28) without refitting anything else, and measure each tier's rate.

    python tools/ood_tiers.py --model models/skinclf-mobilenet.keras --val data/prepared/val \
        --test data/prepared/test [--cache DIR]

`skinclf calibrate` fits both for every bundle it calibrates (`trust.ood.fit_ood` calls
`model.outlier.fit_tiers` on the validation scores that set the threshold); this tool does the
same for a bundle calibrated before the tiers existed, so its weights, temperature and threshold
stay as they are:

1. the bundle's own OOD score (its `meta["ood"]` record) of every validation image, through the
   model's ONNX form (outputs equal Keras's to 1e-4); `fit_tiers` on them gives the sorted
   validation scores (`reference_scores`: the percentile column) and `rare_threshold`;
2. each tier's rate on validation, on `reference_outliers()` and on the held-out test split
   (a look at test: nothing is chosen from it), stored beside the existing rates;
3. the new metadata replaces the `skinclf.json` member of the `.keras` (every other member is
   copied byte for byte, so the network is unchanged) and the ONNX form's metadata, whose export
   record then names the new `.keras` SHA-256; tests/fixed_image_expected.json gets that SHA-256.

`--cache DIR` keeps the scores (val_scores.npy, test_scores.npy, ref_scores.npz) so a rerun
does not classify 3,000 images again. Prints the rates as JSON (README and model card).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.data.layout import list_labelled_images  # noqa: E402
from skinclf.files import atomic_path, sha256_file  # noqa: E402
from skinclf.model.bundle_meta import META_MEMBER, read_bundle_meta  # noqa: E402
from skinclf.model.outlier import WARNING, WARNING_RARE, feature_scores, fit_tiers  # noqa: E402


def _scores(engine, folder: Path, record) -> tuple[np.ndarray, np.ndarray]:
    from skinclf.trust.calibrate import folder_outputs

    images = list_labelled_images(folder, classes=tuple(engine.classes))
    _, features, errors = folder_outputs(engine, list(images.paths), workers=2, description=str(folder))
    ok = np.array([e is None for e in errors])
    return feature_scores(features[ok], record["features"], record["score"]), np.asarray(images.labels)[ok]


def _rates(scores: np.ndarray, record) -> dict[str, float]:
    s = scores[np.isfinite(scores)]
    rare = float(record["rare_threshold"])
    return {"unusual_or_more": round(float(np.mean(s > record["threshold"])), 4),
            "unusual_only": round(float(np.mean((s > record["threshold"]) & (s <= rare))), 4),
            "very_unlike": round(float(np.mean(s > rare)), 4), "images": int(len(s)),
            "very_unlike_count": int(np.sum(s > rare)), "unusual_count": int(np.sum(s > record["threshold"]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.keras"))
    parser.add_argument("--val", type=Path, default=Path("data/prepared/val"))
    parser.add_argument("--test", type=Path, default=Path("data/prepared/test"))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the rates, change no file")
    args = parser.parse_args()

    meta = read_bundle_meta(args.model)
    record = dict(meta["ood"])
    if record.get("score") != "mahalanobis" or not record.get("features"):
        raise SystemExit("this tool handles a bundle whose flag reads its features (mahalanobis)")
    cache = args.cache
    if cache and (cache / "val_scores.npy").exists():
        val = np.load(cache / "val_scores.npy")
        test = np.load(cache / "test_scores.npy")
        ref = dict(np.load(cache / "ref_scores.npz"))
    else:
        from skinclf.engines.load import load_engine
        from skinclf.trust.reference_images import reference_outliers

        engine = load_engine(args.model, engine="onnx")
        val, _ = _scores(engine, args.val, record)
        test, _ = _scores(engine, args.test, record)
        ref = {k: feature_scores(engine.forward(x)[1], record["features"], record["score"])
               for k, x in reference_outliers(seed=0, size=engine.image_size).items()}
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            np.save(cache / "val_scores.npy", val)
            np.save(cache / "test_scores.npy", test)
            np.savez(cache / "ref_scores.npz", **ref)
    if abs(float(np.quantile(val, record["pass_rate"], method="higher")) - record["threshold"]) > 1e-3 * record["threshold"]:
        raise SystemExit("the validation scores do not reproduce the bundle's threshold: wrong data or model")
    record.update(fit_tiers(val), warning=WARNING, rare_warning=WARNING_RARE)
    rare = record["rare_threshold"]
    record["rare_flag_rates"] = {record["fitted_on"]: float(np.mean(val > rare)),
                                 **{k: float(np.mean(v > rare)) for k, v in ref.items()}}
    tiers = {"validation": _rates(val, record), "test": _rates(test, record),
             "reference outliers (min over sets)": {
                 "unusual_or_more": round(min(float(np.mean(v > record["threshold"])) for v in ref.values()), 4),
                 "very_unlike": round(min(float(np.mean(v > rare)) for v in ref.values()), 4)},
             "per reference set, very unlike": {k: round(float(np.mean(v > rare)), 4) for k, v in ref.items()},
             "scores": {"validation max": round(float(val.max()), 1), "test max": round(float(test.max()), 1),
                        "threshold": round(record["threshold"], 1), "rare_threshold": round(rare, 1)}}
    record["held_out"] = {**(record.get("held_out") or {}), "tiers": tiers["test"]}
    record["tiers"] = {"validation": tiers["validation"], "test": tiers["test"]}
    print(json.dumps(tiers, indent=2))
    if args.dry_run:
        return 0
    meta = {**meta, "ood": record}
    with atomic_path(args.model) as tmp:  # every member but skinclf.json copied as it is
        with zipfile.ZipFile(args.model) as src, zipfile.ZipFile(tmp, "w") as dst:
            for info in src.infolist():
                if info.filename != META_MEMBER:
                    dst.writestr(info, src.read(info.filename))
            dst.writestr(META_MEMBER, json.dumps(meta, indent=2))
    onnx_path = args.model.with_suffix(".onnx")
    if onnx_path.exists():
        import onnx

        proto = onnx.load(str(onnx_path))
        entry = next(p for p in proto.metadata_props if p.key == META_MEMBER)
        old = json.loads(entry.value)
        entry.value = json.dumps({**meta, "export": {**old["export"], "source_sha256": sha256_file(args.model)}},
                                 indent=2)
        with atomic_path(onnx_path) as tmp:
            onnx.save(proto, str(tmp))
    expected = Path(__file__).resolve().parents[1] / "tests" / "fixed_image_expected.json"
    if expected.exists() and args.model.resolve() == (expected.parents[1] / "models/skinclf-mobilenet.keras").resolve():
        fixed = json.loads(expected.read_text())
        fixed["model_sha256"] = sha256_file(args.model)
        expected.write_text(json.dumps(fixed, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
