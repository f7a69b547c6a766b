"""Prediction throughput on full-size dermoscopic JPEGs (600x450), as ratios measured in one run.

Modes:

  naive           the seed web apps' loop: PIL open, resize to 224, Keras `model.predict` per image
  pure <engine>   the engine alone (the same graph predict runs) on pre-decoded arrays, best batch size
  predict auto    `skinclf predict` with the default engine (the bundle's int8 form where it holds)
  predict onnx    `skinclf predict --engine onnx` (the float form)
  predict keras   `skinclf predict --engine keras`
  whole <rev>     a whole `skinclf predict` run (start-up included, 300 images) with the bundle as it was
                  at git revision <rev> (--baseline, default d21ae78: before the one-pass graph and int8),
                  against the same with today's bundle

Floors (issue 27, a quiet 2-core machine): predict auto >= 10x naive and >= 0.9x pure auto; whole
today / whole d21ae78 >= 1.5 (as speed). Rounds alternate modes so drift on a noisy machine hits
them alike; the best round of each is kept.

    python bench/predict_throughput.py [--images ../shared/data/ham10000-fullres] [--baseline d21ae78]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skinclf.batch.predict import predict_directory  # noqa: E402
from skinclf.data.images import load_image  # noqa: E402
from skinclf.data.layout import default_model_path  # noqa: E402
from skinclf.engines.load import load_engine  # noqa: E402
from skinclf.parallel import usable_cpus  # noqa: E402


def predict_rate(folder: Path, model_path: Path, engine: str, batch_size: int) -> tuple[float, float, float]:
    """Images per second (start-up excluded), start-up seconds and the whole run's seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = predict_directory(directory=folder, out=Path(tmp) / "r.csv", model=model_path, batch_size=batch_size,
                                    engine=engine, show_progress=False)
        whole = time.perf_counter() - t0
    return summary.images_per_second, summary.startup_seconds, whole


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
    runner.forward(arrays[:batch_size])  # prepare / compile
    t0 = time.perf_counter()
    runner.forward(arrays)
    return len(arrays) / (time.perf_counter() - t0)


def baseline_bundle(revision: str, folder: Path) -> Path:
    """The bundle (.keras and its .onnx) as committed at `revision`, written into `folder`."""
    for suffix in (".keras", ".onnx"):
        data = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:models/skinclf-mobilenet{suffix}"],
                              check=True, capture_output=True).stdout
        (folder / f"skinclf-mobilenet{suffix}").write_bytes(data)
    return folder / "skinclf-mobilenet.keras"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared/data/ham10000-fullres")
    parser.add_argument("--model", type=Path, default=None, help=".keras bundle [default: the bundled model]")
    parser.add_argument("--baseline", default="d21ae78", help="git revision of the bundle to compare whole runs with")
    parser.add_argument("--naive-images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-keras", action="store_true", help="leave out predict --engine keras")
    args = parser.parse_args()

    model_path = args.model or default_model_path()
    auto = load_engine(model_path)
    size = auto.image_size
    paths = sorted(args.images.glob("*.jpg"))
    if not paths:
        sys.exit(f"no JPEGs in {args.images}")
    with Image.open(paths[0]) as im:
        shape = f"{im.width}x{im.height}"
    arrays = np.stack([load_image(p, size) for p in paths]).astype("float32")
    best: dict[str, float] = {}
    batch_of: dict[str, int] = {}
    startup: dict[str, float] = {}

    def keep(name: str, value: float, batch: int | None = None, lower: bool = False) -> None:
        if name not in best or (value < best[name] if lower else value > best[name]):
            best[name] = value
            if batch:
                batch_of[name] = batch

    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_bundle(args.baseline, Path(tmp))
        keep("naive", naive_rate(model_path, paths[: args.naive_images], size))
        modes = [("auto", "auto"), ("onnx", "onnx")] + ([] if args.skip_keras else [("keras", "keras")])
        for _ in range(args.rounds):
            for bs in (8, 16, 32):
                keep("pure auto", pure_rate(model_path, "auto", arrays, bs), bs)
            for name, engine in modes:
                rate, startup[f"predict {name}"], whole = predict_rate(args.images, model_path, engine, args.batch_size)
                keep(f"predict {name}", rate)
                if name == "auto":
                    keep("whole today", whole, lower=True)
            _, _, whole = predict_rate(args.images, old, "auto", args.batch_size)
            keep(f"whole {args.baseline}", whole, lower=True)

    print(f"model {model_path.name} ({size}x{size}, auto = {auto.format}); {usable_cpus()} usable CPUs of "
          f"{os.cpu_count()}; {len(paths)} JPEGs of {shape}; batch {args.batch_size}; best of {args.rounds} rounds")
    print(f"{'mode':<44}{'img/s':>8}{'x naive':>9}")
    for name in ("naive", "pure auto", "predict auto", "predict onnx", "predict keras"):
        if name in best:
            label = f"{name} (best batch {batch_of[name]})" if name in batch_of else name
            label += f", start-up {startup[name]:.1f} s" if name in startup else ""
            print(f"{label:<44}{best[name]:8.1f}{best[name] / best['naive']:9.2f}")
    print(f"predict auto / naive          = {best['predict auto'] / best['naive']:5.2f}   (floor 10)")
    print(f"predict auto / pure auto      = {best['predict auto'] / best['pure auto']:5.2f}   (floor 0.9)")
    print(f"predict auto / predict onnx   = {best['predict auto'] / best['predict onnx']:5.2f}   (int8 over float)")
    print(f"whole run {args.baseline} / today   = {best[f'whole {args.baseline}'] / best['whole today']:5.2f}   "
          f"(floor 1.5; {best[f'whole {args.baseline}']:.1f} s vs {best['whole today']:.1f} s for {len(paths)} images)")


if __name__ == "__main__":
    main()
