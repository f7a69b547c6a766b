"""Does one more network raise the bundled ensemble? Validation balanced accuracy at melanoma recall >= 0.80.

    python bench/member_gain.py runs/member3-v2.keras [--model models/skinclf-mobilenet.keras] [--val data/prepared/val]

The bundle's members (each with its own post-hoc steps) and the new network are run on every
validation image once; for the mean of the members' logits, and for the mean with the new network,
the prior correction tau is fitted on validation balanced accuracy (as `skinclf ensemble --val`
does) and each melanoma weight of a grid is tried. Printed: each weight's balanced accuracy and
melanoma recall, the best at melanoma recall >= 0.80, and the gain (issue 27's bar: +0.005).
Validation chose everything here: these are not held-out figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skinclf.data.images import load_image  # noqa: E402
from skinclf.data.layout import list_labelled_images  # noqa: E402
from skinclf.metrics import balanced_accuracy  # noqa: E402
from skinclf.model.bundle import load_bundle  # noqa: E402
from skinclf.model.ensemble_graph import members  # noqa: E402
from skinclf.model.network import logits_model  # noqa: E402
from skinclf.model.posthoc import softmax  # noqa: E402
from skinclf.training.posthoc_fit import fit_prior_tau  # noqa: E402

WEIGHTS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def evaluate(name: str, logits: np.ndarray, labels: np.ndarray, prior: np.ndarray, mel: int):
    tau, _ = fit_prior_tau(softmax(logits), labels, prior)
    rows = []
    for w in WEIGHTS:
        z = logits - tau * np.log(prior)
        z[:, mel] += np.log(w)
        pred = z.argmax(1)
        rows.append((w, balanced_accuracy(labels, pred), float(np.mean(pred[labels == mel] == mel))))
    ok = [r for r in rows if r[2] >= 0.80]
    best = max(ok, key=lambda r: r[1]) if ok else None
    print(f"{name}: tau {tau:.2f}; " + " | ".join(f"mel x{w}: {b:.4f} / {m:.3f}" for w, b, m in rows)
          + f"; best at melanoma recall >= 0.80: {best}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", type=Path)
    parser.add_argument("--model", type=Path, default=REPO / "models/skinclf-mobilenet.keras")
    parser.add_argument("--val", type=Path, default=REPO / "data/prepared/val")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    classes = bundle.classes
    val = list_labelled_images(args.val, classes=tuple(classes))
    x = np.stack([load_image(p, bundle.image_size) for p in val.paths]).astype("float32")
    labels = np.asarray(val.labels)
    counts = bundle.meta["data"]["train_counts"]
    prior = np.array([counts[c] for c in classes], dtype="float64")
    prior /= prior.sum()
    old = [np.asarray(logits_model(m).predict(x, batch_size=32, verbose=0), "float64") for m in members(bundle.model)]
    new = np.asarray(logits_model(load_bundle(args.new).model).predict(x, batch_size=32, verbose=0), "float64")
    mel = classes.index("mel")
    evaluate("new network alone", new, labels, prior, mel)
    base = evaluate(f"the bundle's {len(old)} members", np.mean(old, axis=0), labels, prior, mel)
    more = evaluate(f"with the new network ({len(old) + 1})", np.mean([*old, new], axis=0), labels, prior, mel)
    if base and more:
        print(f"gain at melanoma recall >= 0.80: {more[1] - base[1]:+.4f} (bar +0.005)")


if __name__ == "__main__":
    main()
