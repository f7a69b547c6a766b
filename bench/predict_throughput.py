"""Prediction throughput on full-size dermoscopic JPEGs (600x450), as ratios measured in one run.

Modes, all on the same model:

  naive         the seed web apps' loop: PIL open, resize to 224, Keras `model.predict` per image
  onnx pure     ONNX Runtime alone on pre-decoded arrays, at the best of several batch sizes
  keras pure    the Keras engine (batch norms folded) alone on the same arrays, best batch
  predict keras `skinclf predict --engine keras` (listing, threaded decoding, CSV written)
  predict onnx  `skinclf predict --engine onnx`
  predict int8  `skinclf predict --model <int8 .onnx>` (when --int8 PATH is given or beside the model)

predict rates exclude the one-off start-up (printed separately). Floors the ONNX issue sets, on
a quiet 2-core machine: predict onnx >= 1.4x predict keras, >= 10x naive, >= 0.85x onnx pure.
Rounds alternate modes so drift on a noisy machine hits them alike; the best round is kept.

    python bench/predict_throughput.py [--images ../shared/data/ham10000-fullres] [--model PATH] [--int8 PATH]
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

from skinclf.batch.predict import predict_directory  # noqa: E402
from skinclf.data.images import load_image  # noqa: E402
from skinclf.data.layout import default_model_path  # noqa: E402
from skinclf.engines.load import load_engine  # noqa: E402
from skinclf.parallel import usable_cpus  # noqa: E402


def predict_rate(folder: Path, model_path: Path, engine: str, batch_size: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        summary = predict_directory(directory=folder, out=Path(tmp) / "r.csv", model=model_path, batch_size=batch_size,
                                    engine=engine, show_progress=False)
    return summary.images_per_second, summary.startup_seconds


def naive_rate(model_path: Path, paths: list[Path], size: int) -> float:
    from skinclf.model.bundle import load_bundle

    model = load_bundle(model_path).model
    model.predict(np.zeros((1, size, size, 3), "float32"), verbose=0)
    t0 = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB").resize((size, size))
        model.predict(np.asarray(image, dtype="float32")[None], verbose=0)
    return len(paths) / (time.perf_counter() - t0)


def pure_rate(model_path: Path, engine: str, arrays: np.ndarray, batch_size: int) -> float:
    runner = load_engine(model_path, engine=engine, batch_size=batch_size)
    runner.logits(arrays[:batch_size])  # prepare / compile
    t0 = time.perf_counter()
    runner.logits(arrays)
    return len(arrays) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/ham10000-fullres")
    parser.add_argument("--model", type=Path, default=None, help=".keras bundle [default: the bundled model]")
    parser.add_argument("--int8", type=Path, default=None, help="int8 .onnx [default: <model>.int8.onnx if present]")
    parser.add_argument("--copies", type=int, default=4, help="hard-linked copies of the folder (amortises start-up)")
    parser.add_argument("--naive-images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    model_path = args.model or default_model_path()
    int8 = args.int8 or model_path.with_name(model_path.stem + ".int8.onnx")
    size = load_engine(model_path, engine="onnx").image_size
    paths = sorted(args.images.glob("*.jpg"))
    if not paths:
        sys.exit(f"no JPEGs in {args.images}")
    with Image.open(paths[0]) as im:
        shape = f"{im.width}x{im.height}"
    arrays = np.stack([load_image(p, size) for p in paths]).astype("float32")

    best: dict[str, float] = {}
    batch_of: dict[str, int] = {}
    startup: dict[str, float] = {}

    def keep(name: str, rate: float, batch: int | None = None) -> None:
        if rate > best.get(name, 0.0):
            best[name] = rate
            if batch:
                batch_of[name] = batch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        for copy in range(args.copies):
            (folder / str(copy)).mkdir(parents=True)
            for p in paths:
                os.link(p, folder / str(copy) / p.name)
        n_files = len(paths) * args.copies
        keep("naive", naive_rate(model_path, paths[: args.naive_images], size))
        for _ in range(args.rounds):
            for bs in (8, 16, 32):
                keep("onnx pure", pure_rate(model_path, "onnx", arrays, bs), bs)
                keep("keras pure", pure_rate(model_path, "keras", arrays, bs), bs)
            for name, engine, model in (("predict keras", "keras", model_path), ("predict onnx", "onnx", model_path),
                                        ("predict int8", "onnx", int8)):
                if model.is_file():
                    rate, startup[name] = predict_rate(folder, model, engine, args.batch_size)
                    keep(name, rate)

    print(f"model {model_path.name} ({size}x{size}); {usable_cpus()} usable CPUs of {os.cpu_count()}; "
          f"{len(paths)} JPEGs of {shape} ({n_files} files for predict); batch {args.batch_size}")
    print(f"{'mode':<44}{'img/s':>8}{'x naive':>9}{'x keras predict':>17}")
    for name in ("naive", "keras pure", "onnx pure", "predict keras", "predict onnx", "predict int8"):
        if name in best:
            label = f"{name} (best batch {batch_of[name]})" if name in batch_of else name
            label += f", start-up {startup[name]:.1f} s" if name in startup else ""
            print(f"{label:<44}{best[name]:8.1f}{best[name] / best['naive']:9.2f}"
                  f"{best[name] / best['predict keras']:17.2f}")
    print(f"predict onnx / predict keras = {best['predict onnx'] / best['predict keras']:5.2f}   (floor 1.4)")
    print(f"predict onnx / naive         = {best['predict onnx'] / best['naive']:5.2f}   (floor 10)")
    print(f"predict onnx / onnx pure     = {best['predict onnx'] / best['onnx pure']:5.2f}   (floor 0.85)")
    if "predict int8" in best:
        print(f"predict int8 / predict onnx  = {best['predict int8'] / best['predict onnx']:5.2f}")


if __name__ == "__main__":
    main()
