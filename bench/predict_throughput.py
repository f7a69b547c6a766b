"""Prediction throughput on full-size dermoscopic JPEGs (600x450), in images per second.

Measures, in one run on the same model:

  predict     `skinclf predict`'s path (predict_directory: listing, decoding in threads with JPEG
              draft scaling, the compiled model, CSV rows written as batches finish); its
              images/s excludes the one-off start-up (loading, folding, compiling: ~1-2 s),
              which is printed separately
  naive       the seed web apps' loop: PIL open, resize to 224, `model.predict` on one image
  inference   the model alone on pre-decoded arrays, at the best of several batch sizes, in the
              form predict runs it (batch norms folded into the convolutions); the bundled
              model as saved is timed too, for reference

and prints the two ratios the predict issue sets floors for: predict / naive (>= 10) and
predict / inference (>= 0.8, decoding hidden behind compute). Rounds alternate so that drift
on a noisy machine hits every mode alike; the best round of each mode is kept.

    python bench/predict_throughput.py [--images ../shared/data/ham10000-fullres] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.backend import accelerator, load_keras  # noqa: E402
from skinclf.images import load_image  # noqa: E402
from skinclf.inference import inference_model, predictor  # noqa: E402
from skinclf.layout import default_model_path  # noqa: E402
from skinclf.model import load_bundle  # noqa: E402
from skinclf.predict import predict_directory  # noqa: E402

keras = load_keras()


def predict_rate(folder: Path, model_path: Path, batch_size: int, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        summary = predict_directory(directory=folder, out=Path(tmp) / "r.csv", model=model_path, batch_size=batch_size,
                                    workers=workers, show_progress=False)
    return summary.images_per_second, summary.startup_seconds


def naive_rate(model, paths: list[Path], size: int) -> float:
    t0 = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB").resize((size, size))
        model.predict(np.asarray(image, dtype="float32")[None], verbose=0)
    return len(paths) / (time.perf_counter() - t0)


def inference_rate(model, arrays: np.ndarray, batch_size: int) -> float:
    run = predictor(model, batch_size)
    run(arrays[:batch_size])  # trace and compile
    t0 = time.perf_counter()
    for i in range(0, len(arrays), batch_size):
        run(arrays[i : i + batch_size])
    return len(arrays) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/ham10000-fullres")
    parser.add_argument("--model", type=Path, default=None, help="bundle [default: the bundled model]")
    parser.add_argument("--copies", type=int, default=8, help="hard-linked copies of the folder (amortises start-up)")
    parser.add_argument("--naive-images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    model_path = args.model or default_model_path()
    bundle = load_bundle(model_path)
    size = bundle.image_size
    paths = sorted(args.images.glob("*.jpg"))
    if not paths:
        sys.exit(f"no JPEGs in {args.images}")
    with Image.open(paths[0]) as im:
        shape = f"{im.width}x{im.height}"
    arrays = np.stack([load_image(p, size) for p in paths]).astype("float32")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        for copy in range(args.copies):
            (folder / str(copy)).mkdir(parents=True)
            for p in paths:
                os.link(p, folder / str(copy) / p.name)
        n_files = len(paths) * args.copies
        folded = inference_model(bundle.model)
        best = {"inference": 0.0, "predict": 0.0, "unfolded": 0.0}
        best_batch = args.batch_size
        naive = naive_rate(bundle.model, paths[: args.naive_images], size)
        for _ in range(args.rounds):
            for bs in (8, 16, 32, 64):
                rate = inference_rate(folded, arrays, bs)
                if rate > best["inference"]:
                    best["inference"], best_batch = rate, bs
                best["unfolded"] = max(best["unfolded"], inference_rate(bundle.model, arrays, bs))
            rate, startup = predict_rate(folder, model_path, args.batch_size, args.workers)
            best["predict"] = max(best["predict"], rate)

    print(f"model {model_path.name} ({size}x{size}), backend {keras.backend.backend()}, {accelerator() or 'CPU'}, "
          f"{os.cpu_count()} CPUs")
    print(f"images: {len(paths)} JPEGs of {shape} from {args.images} ({n_files} files for predict)")
    print(f"{'mode':<58}{'img/s':>8}")
    print(f"{'naive loop (PIL resize + model.predict per image)':<58}{naive:8.1f}")
    print(f"{'pure inference, model as saved (best batch)':<58}{best['unfolded']:8.1f}")
    print(f"{f'pure inference, as predict runs it (best batch {best_batch})':<58}{best['inference']:8.1f}")
    print(f"{f'skinclf predict (batch {args.batch_size}, {args.workers} decode threads)':<58}{best['predict']:8.1f}")
    print(f"predict start-up (load, fold, compile; not in its img/s): {startup:.1f} s")
    print(f"predict / naive     = {best['predict'] / naive:6.2f}   (floor 10)")
    print(f"predict / inference = {best['predict'] / best['inference']:6.2f}   (floor 0.80)")


if __name__ == "__main__":
    main()
