"""Fit the metadata head (age, sex, body site) of a bundle and store it in the bundle.

    python tools/fit_metadata_head.py --model models/skinclf-mobilenet.keras \
        [--metadata ../shared/data/ham10000/HAM10000_metadata.csv] [--data data/prepared] \
        [--cache DIR] [--test] [--out OTHER.keras] [--report reports/metadata_head.json]

1. The image model's logits and pooled features on data/prepared/train and val (Keras engine, one
   pass each; with --cache, kept in DIR per split and reused while the image model is the same);
2. the metadata of each image from the HAM10000 metadata CSV, read exactly as `predict --metadata`
   reads it (`skinclf.batch.patient`);
3. p(class | metadata) fitted on the train split's metadata (fields hidden at random) for each L2,
   its weight, the melanoma shift and the prior correction chosen on validation (largest balanced
   accuracy with melanoma recall not below the image model's), the temperature fitted there
   (`skinclf.training.patient_fit.choose`); the head goes into the bundle (`metadata_head`);
4. with --test: the figures with and without metadata on data/prepared/test, recorded beside the
   validation ones. THIS LOOKS AT THE TEST SPLIT: after every choice; nothing may change because
   of what it prints.

Runs in `tools/refresh_bundle.sh` after calibrate and before export, whenever the image model
changes (a head fitted to another version of the image model is refused at run time). The
bundle's SHA-256 changes: export the ONNX form afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.batch.patient import read_metadata  # noqa: E402
from skinclf.data.layout import list_labelled_images  # noqa: E402
from skinclf.model.patient_head import HEAD_KEY, NO_METADATA, encode, image_model_fingerprint  # noqa: E402
from skinclf.model.bundle_meta import read_bundle_meta  # noqa: E402
from skinclf.training.patient_fit import Outputs, choose, figures  # noqa: E402

DEFAULT_METADATA = ("../shared/data/ham10000/HAM10000_metadata.csv", "data/raw/HAM10000_metadata.csv",
                    "data/HAM10000_metadata.csv")


def split_outputs(model: Path, meta: dict, folder: Path, cache: Path | None) -> tuple[np.ndarray, np.ndarray | None,
                                                                                         np.ndarray, list[str]]:
    """Logits, features, labels and image ids of a labelled folder (cached per image model)."""
    images = list_labelled_images(folder, classes=tuple(meta["classes"]))
    ids = [p.stem for p in images.paths]
    key = image_model_fingerprint(meta)
    file = cache / f"{folder.name}.npz" if cache else None
    if file is not None and file.is_file():
        saved = np.load(file, allow_pickle=False)
        if str(saved.get("image_model", "")) == key and list(saved["ids"]) == ids:
            print(f"{folder}: cached outputs ({file})", file=sys.stderr)
            feats = saved["features"] if saved["features"].size else None
            return saved["logits"], feats, saved["labels"], ids
    from skinclf.engines.keras import KerasEngine
    from skinclf.model.bundle import load_bundle
    from skinclf.trust.calibrate import folder_outputs

    engine = KerasEngine(load_bundle(model), batch_size=32)
    logits, features, errors = folder_outputs(engine, list(images.paths), description=f"Outputs on {folder.name}")
    if any(errors):
        bad = next(e for e in errors if e)
        raise SystemExit(f"Error: {folder}: an image could not be read ({bad})")
    labels = np.asarray(images.labels)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(file, logits=logits, features=features if features is not None else np.zeros(0),
                            labels=labels, ids=np.array(ids), image_model=key)
    return logits, features, labels, ids


def outputs(model, meta, folder, cache, table) -> Outputs:
    logits, features, labels, ids = split_outputs(model, meta, folder, cache)
    metas = [table.get(i.lower(), NO_METADATA) for i in ids]
    x, present = encode(metas)
    return Outputs(logits=np.asarray(logits, "float64"), labels=np.asarray(labels), metadata=x, present=present,
                   features=None if features is None else np.asarray(features, "float64"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.keras"))
    parser.add_argument("--metadata", type=Path, default=None, help="HAM10000_metadata.csv (default: found beside the repo)")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="the prepared split (train/ val/ test/)")
    parser.add_argument("--cache", type=Path, default=None, help="keep the image model's outputs here, per split")
    parser.add_argument("--test", action="store_true", help="also record the test split's figures (a first look)")
    parser.add_argument("--out", type=Path, default=None, help="default: the model, replaced atomically")
    parser.add_argument("--report", type=Path, default=None, help="write the variants' validation table here (JSON)")
    args = parser.parse_args()

    metadata = args.metadata or next((Path(p) for p in DEFAULT_METADATA if Path(p).is_file()), None)
    if metadata is None:
        raise SystemExit(f"Error: no HAM10000_metadata.csv found (looked at {', '.join(DEFAULT_METADATA)}); pass --metadata")
    meta = read_bundle_meta(args.model)
    classes = list(meta["classes"])
    source = read_metadata(metadata)
    train = outputs(args.model, meta, args.data / "train", args.cache, source.by_id)
    val = outputs(args.model, meta, args.data / "val", args.cache, source.by_id)
    print(f"metadata for {train.present.sum()}/{len(train.present)} train and {val.present.sum()}/{len(val.present)} "
          "validation images", file=sys.stderr)
    fitted, table = choose(train, val, classes, log=lambda s: print(s, file=sys.stderr))
    result = {"validation": fitted.validation, "variants": table}
    if args.test:
        test = outputs(args.model, meta, args.data / "test", args.cache, source.by_id)
        result["test"] = {"image_only": figures(test.logits, test.labels, classes),
                          "with_metadata": figures(fitted.fused(test), test.labels, classes),
                          "note": "first look at the test split for the metadata head, after every choice was made"}
    spec = fitted.spec(classes=classes, image_model=image_model_fingerprint(meta), extra={
        "fitted": {"on": "training split (fields hidden at random)", "chosen_on": "validation split",
                   "temperature_on": "validation split", "metadata": metadata.name, "metadata_sha256": source.sha256,
                   "at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "figures": {k: v for k, v in result.items() if k != "variants"},
        "variants": table})
    from skinclf.model.bundle import load_bundle, save_bundle

    bundle = load_bundle(args.model)
    save_bundle(bundle.model, args.out or args.model, {**bundle.meta, HEAD_KEY: spec})
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({"chosen": fitted.variant.describe(), "temperature": fitted.temperature,
                                           **result}, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"chosen": fitted.variant.name, "temperature": round(fitted.temperature, 4),
                      **{k: v for k, v in result.items() if k != "variants"}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
