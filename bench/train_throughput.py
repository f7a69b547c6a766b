"""Training throughput of MobileNet 1.0/224 at batch 32, in images per second.

Measures, in one run and through the same Keras `fit` path `skinclf train` uses:

  full       every layer trained, images decoded and augmented each step (the baseline)
  top        only the top `--trainable-layers` layers trained, images decoded each step
  cached     the same top layers trained from the feature cache (frozen outputs precomputed)
  recipe     the bundled model's recipe (top 63 layers, colour constancy, random resized crops and
             colour jitter) at 160 px (its first epochs) and at 224 px (its last, FixRes)

and prints each as images/s and as a ratio to the full fine-tune measured in the same run
(these machines are noisy: only same-run ratios compare). Runs on whatever the Keras backend
sees: `KERAS_BACKEND=torch python bench/train_throughput.py` on a GPU machine.

    python bench/train_throughput.py [--images ../shared/data/ham10000] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinclf.backend import accelerator, load_keras  # noqa: E402
from skinclf.model.network import build_model, set_trainable, split_model  # noqa: E402
from skinclf.training.augment import WINNERS  # noqa: E402
from skinclf.training.loader import FeatureBatches, ImageBatches, in_background  # noqa: E402

keras = load_keras()


class EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.t0)


def images_per_second(model, dataset, n_images: int, epochs: int = 3) -> float:
    """Best of the epochs after the first (which traces and compiles)."""
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    timer = EpochTimer()
    model.fit(dataset, epochs=epochs, verbose=0, callbacks=[timer], shuffle=False)
    return n_images / min(timer.seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/ham10000")
    parser.add_argument("--steps", type=int, default=8, help="steps of 32 images per timed epoch")
    parser.add_argument("--trainable-layers", type=int, default=43)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    batch = 32
    paths = sorted(args.images.rglob("*.jpg"))[: batch * args.steps]
    if len(paths) < batch * args.steps:
        sys.exit(f"need {batch * args.steps} JPEGs under {args.images}")
    labels = np.arange(len(paths)) % 7
    images = {"num_classes": 7, "image_size": 224, "batch_size": batch, "workers": args.workers, "augment": True}

    model = build_model(num_classes=7, weights=None)
    set_trainable(model, 85)
    full = images_per_second(model, ImageBatches(paths, labels, **images), len(paths))

    model = build_model(num_classes=7, weights=None)
    start = set_trainable(model, args.trainable_layers)
    top = images_per_second(model, ImageBatches(paths, labels, **images), len(paths))

    prefix, suffix = split_model(model, start)
    source = ImageBatches(paths, labels, **images)
    features = np.concatenate(
        [np.asarray(prefix.predict_on_batch(x), "float16") for x, _ in in_background(
            [lambda b=b: source[b] for b in range(len(source))], workers=args.workers)]
    )
    cached = images_per_second(suffix, FeatureBatches([features], labels, num_classes=7, batch_size=batch), len(paths))

    recipe = {}
    for size in (160, 224):
        model = build_model(num_classes=7, weights=None, image_size=None, colour_constancy=True)
        set_trainable(model, 63)
        data = ImageBatches(paths, labels, **{**images, "image_size": size, "augment": WINNERS})
        recipe[size] = images_per_second(model, data, len(paths))

    device = accelerator() or "CPU"
    print(f"MobileNet 1.0/224, batch {batch}, {len(paths)} images/epoch, backend {keras.backend.backend()}, {device}")
    print(f"{'mode':<44}{'img/s':>8}{'x full':>8}")
    for name, value in (
        ("full fine-tune (all 85 layers), from images", full),
        (f"top {args.trainable_layers} layers, from images", top),
        (f"top {args.trainable_layers} layers, from the feature cache", cached),
        ("bundled recipe (top 63, augmented) at 160 px", recipe[160]),
        ("bundled recipe (top 63, augmented) at 224 px", recipe[224]),
    ):
        print(f"{name:<44}{value:8.1f}{value / full:8.2f}")


if __name__ == "__main__":
    main()
