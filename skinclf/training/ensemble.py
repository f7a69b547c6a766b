"""`skinclf ensemble`: average trained bundles into one bundle.

Runs of `skinclf train` with other seeds, crops or recipes make different mistakes; averaging
them is usually better than any one of them. The ensemble is one `.keras`: each member a nested
model giving its logits (its own prior correction, decision weights and temperature included),
the mean of those logits (a geometric mean of the members' probabilities), and a classifier
head that starts as the identity. With `--val`, the ensemble's own prior correction, decision
weights and temperature are fitted on that labelled folder and folded into the head, exactly
as `skinclf train` does for one network. Predict, evaluate, serve, explain and `skinclf
export` (ONNX) run it like any bundle; every member adds a full forward pass to predict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from skinclf.backend import load_keras
from skinclf.checks import at_least
from skinclf.config import ENSEMBLE
from skinclf.errors import SkinclfError
from skinclf.files import check_output_file
from skinclf.own_outputs import MODEL
from skinclf.model.bundle import load_bundle, save_bundle
from skinclf.model.ensemble_graph import ensemble_of
from skinclf.model.network import logits_model

keras = load_keras()

# Metadata every member must share: an ensemble of models that see images differently is not one.
SHARED = ("classes", "input_size")


def ensemble_model(models: list, *, name: str = "skinclf_ensemble"):
    """A model whose output is softmax(mean of `models`' logits): the members' geometric mean."""
    n = int(models[0].outputs[0].shape[-1])
    head = keras.layers.Dense(n, activation="softmax", name="predictions")
    head.build((None, n))
    head.set_weights([np.eye(n, dtype="float32"), np.zeros(n, dtype="float32")])
    return ensemble_of([logits_model(m) for m in models], head, name=name)


def _check_members(bundles: list) -> None:
    first = bundles[0]
    for bundle in bundles[1:]:
        for key in SHARED:
            if bundle.meta[key] != first.meta[key]:
                raise SkinclfError(f"{bundle.path} has other {key} than {first.path} "
                                   f"({bundle.meta[key]} vs {first.meta[key]}): members must match")


def _fit_on(model, meta: dict, val: Path, *, prior_correction: str, decision_weight: str, calibrate: bool,
            workers: int) -> dict[str, Any]:
    """Fit the head's post-hoc shift and temperature on `val`; returns the metadata to add."""
    from skinclf.data.layout import list_labelled_images
    from skinclf.metrics import classification_report
    from skinclf.training.posthoc_fit import class_weights, post_hoc, validation_probs

    classes = meta["classes"]
    val_set = list_labelled_images(Path(val), classes=tuple(classes))
    counts = meta.get("data", {}).get("train_counts")
    if not counts:
        raise SkinclfError(f"the first member has no training class counts: cannot apply --prior-correction "
                           f"{prior_correction}; use --prior-correction none")
    decision_of = class_weights(decision_weight, dict.fromkeys(classes, 1), option="--decision-weight")
    probs = validation_probs(model, val_set, image_size=meta["input_size"][0], batch_size=32, workers=workers)
    labels = np.asarray(val_set.labels)
    probs, post_hoc = post_hoc(model, probs, labels, classes=classes, prior_counts=counts, decision_of=decision_of,
                                prior_correction=prior_correction, calibrate=calibrate)
    report = classification_report(labels, probs, list(classes))
    report.get("melanoma", {}).pop("roc", None)
    report["calibration"] = post_hoc["validation_after"]
    return {"post_hoc": {**post_hoc, "decision_weight": decision_weight, "data": str(val)},
            "calibration": {"temperature": post_hoc["temperature"], "fitted_on": "validation split",
                            "validation_before": post_hoc["validation_before"],
                            "validation_after": post_hoc["validation_after"]},
            "metrics": {"validation": report}}


def ensemble_bundles(
    *,
    members: list[Path],
    out: Path,
    val: Path | None = None,
    prior_correction: str = ENSEMBLE.prior_correction,
    decision_weight: str = ENSEMBLE.decision_weight,
    calibrate: bool = ENSEMBLE.calibrate,
    workers: int = ENSEMBLE.workers,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Average the bundles at `members` into one bundle at `out`; returns its metadata.

    With `val` (a labelled folder: the validation split), fit the prior correction, apply the
    decision weights and fit the temperature there, as `skinclf train` does."""
    if len(members) < 2:
        raise SkinclfError(f"an ensemble needs at least 2 model bundles, got {len(members)}")
    out = Path(out)
    if out.suffix != ".keras":
        raise SkinclfError(f"--out {out}: the model file must end in .keras")
    check_output_file(out, example="models/ensemble.keras", kind=MODEL, overwrite=overwrite)
    from skinclf.training.posthoc_fit import prior_tau

    prior_tau(prior_correction)  # a bad value fails here, before any model is loaded
    at_least("--workers", workers, 1, example=2)
    fitting = prior_correction != "none" or decision_weight != "none" or calibrate
    if fitting and val is None:
        raise SkinclfError("--prior-correction, --decision-weight and --calibrate are fitted on a labelled folder: "
                           "add --val data/prepared/val")
    if val is not None and not Path(val).is_dir():
        raise SkinclfError(f"--val {val}: no such folder (the validation split, e.g. data/prepared/val)")
    bundles = [load_bundle(Path(m)) for m in members]
    _check_members(bundles)
    first = bundles[0]
    meta = {k: v for k, v in first.meta.items() if k not in ("created", "format", "history", "metrics", "ood",
                                                             "calibration", "post_hoc", "training")}
    meta.update({
        "name": out.stem,
        "architecture": {**first.meta.get("architecture", {}), "ensemble": len(bundles),
                         "head": "mean of the members' logits, then a dense classifier (identity plus post-hoc)"},
        "members": [{"path": Path(b.path).name, "sha256": b.sha256, "name": b.meta.get("name"),
                     "validation": b.meta.get("metrics", {}).get("validation", {}).get("balanced_accuracy"),
                     "architecture": b.meta.get("architecture"), "preprocessing": b.meta.get("preprocessing"),
                     "post_hoc": b.meta.get("post_hoc"), "training": b.meta.get("training"),
                     "history": b.meta.get("history", [])} for b in bundles],
        "metrics": {},
    })
    model = ensemble_model([b.model for b in bundles])
    if val is not None:
        meta.update(_fit_on(model, meta, Path(val), prior_correction=prior_correction,
                            decision_weight=decision_weight, calibrate=calibrate, workers=workers))
    save_bundle(model, out, meta)
    return meta
