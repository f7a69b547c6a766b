"""Cache the pooled features and logits of a bundle over the prepared splits (for OOD experiments).

    nohup python bench/ood_features_cache.py --model models/skinclf-mobilenet.keras \
        --splits train val test > /work/runs/ood-cache/extract.log 2>&1 &

Writes `<cache>/<model sha256[:16]>/<split>.npz` (features float32, logits float32, labels,
paths, errors) through the Keras engine's one-pass `forward`, exactly what predict and
calibrate compute. A split already cached is skipped. Minutes per thousand images on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.data.layout import list_labelled_images
from skinclf.engines.load import load_engine
from skinclf.engines.runner import predict_files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/skinclf-mobilenet.keras"))
    parser.add_argument("--data", type=Path, default=Path("/work/data/prepared"))
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--cache", type=Path, default=Path("/work/runs/ood-cache"))
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    engine = load_engine(args.model, engine="keras", batch_size=args.batch_size)
    folder = args.cache / engine.sha256[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for split in args.splits:
        out = folder / f"{split}.npz"
        if out.is_file():
            print(f"{split}: cached at {out}", flush=True)
            continue
        images = list_labelled_images(args.data / split, classes=tuple(engine.classes))
        started = time.perf_counter()
        feats, logits, errors = [], [], []
        for k, batch in enumerate(predict_files(engine, images.paths, workers=2, features=True)):
            feats.append(batch.features)
            logits.append(batch.logits)
            errors += [e or "" for e in batch.errors]
            if k % 20 == 0:
                done = sum(len(f) for f in feats)
                print(f"{split}: {done}/{len(images.paths)} in {time.perf_counter() - started:.0f} s", flush=True)
        np.savez(out.with_suffix(".tmp.npz"), features=np.concatenate(feats), logits=np.concatenate(logits),
                 labels=np.asarray(images.labels), paths=np.asarray([str(p) for p in images.paths]),
                 errors=np.asarray(errors))
        out.with_suffix(".tmp.npz").replace(out)
        print(f"{split}: {len(images.paths)} images in {time.perf_counter() - started:.0f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
