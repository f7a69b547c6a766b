"""After training: class weights, validation probabilities, and the post-hoc steps fitted on validation.

Prior correction, decision weights and temperature are fitted here and folded into the model's
final layer, so every engine applies them without knowing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skinclf.data.layout import LabelledImages
from skinclf.engines.runner import predict_files
from skinclf.errors import SkinclfError
from skinclf.model.network import fold_logit_transform
from skinclf.model.posthoc import calibration_report, fit_prior_tau, fit_temperature, logits_from_probs, softmax


def class_weights(spec: str, counts: dict[str, int], *, option: str = "--class-weight") -> dict[str, float]:
    """Per-class loss weights from `spec`: a base, optionally followed by per-class changes.

    Bases: 'balanced', n / (k * n_c), so every class carries the same total weight
    (scikit-learn's formula); 'sqrt', its square root, a softer correction; 'none', all 1.
    Changes, comma-separated: 'NAME=W' sets a weight, 'NAME*F' multiplies it. Without a base,
    'none' is assumed: 'mel=4,nv=1.25' (the seed's style) leaves other classes at 1;
    'balanced,mel*2' doubles melanoma's balanced weight.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    present = {c: n for c, n in counts.items() if n > 0}
    total, k = sum(present.values()), len(present)
    balanced = {c: total / (k * n) if n else 0.0 for c, n in counts.items()}
    bases = {"balanced": balanced, "sqrt": {c: math.sqrt(w) for c, w in balanced.items()},
             "none": dict.fromkeys(counts, 1.0)}
    weights = dict(bases[items.pop(0)] if items and items[0] in bases else bases["none"])
    for item in items:
        op = "=" if "=" in item else "*" if "*" in item else None
        name, _, value = item.partition(op) if op else (item, "", "")
        name = name.strip()
        if op is None or name not in counts:
            raise SkinclfError(
                f"{option} {spec!r}: expected a base (balanced, sqrt, none) and/or NAME=WEIGHT or NAME*FACTOR "
                f"items with NAME one of {', '.join(counts)}"
            )
        try:
            number = float(value)
        except ValueError:
            raise SkinclfError(f"{option} {item!r}: {value!r} is not a number") from None
        if not number > 0:
            raise SkinclfError(f"{option} {item!r}: weights must be positive")
        weights[name] = number if op == "=" else weights[name] * number
    return weights


def prior_tau(spec: str) -> float | str | None:
    """--prior-correction as None ('none'), 'fit', or a fixed tau."""
    if spec in ("none", "fit"):
        return None if spec == "none" else spec
    try:
        return float(spec)
    except ValueError:
        raise SkinclfError(f"--prior-correction {spec!r}: use none, fit, or a number such as 0.5") from None


def validation_probs(model, val_set: LabelledImages, *, image_size: int, batch_size: int, workers: int) -> np.ndarray:
    """The assembled model's probabilities on the validation images, exactly as predict runs it."""
    probs = []
    for batch in predict_files(model, val_set.paths, image_size=image_size, batch_size=batch_size, workers=workers):
        bad = [f"{p.name}: {e}" for p, e in zip(batch.paths, batch.errors) if e]
        if bad:
            raise SkinclfError(f"cannot read validation image {bad[0]}")
        probs.append(batch.probs)
    return np.concatenate(probs)


def post_hoc(model, probs: np.ndarray, labels: np.ndarray, *, classes, prior_counts: dict, decision_of: dict,
              prior_correction: str, calibrate: bool) -> tuple[np.ndarray, dict]:
    """Fold the decision weights, the prior correction and the temperature into the final layer.

    Each is fitted on the validation probabilities of the model before it; returns the final
    validation probabilities and a record of what was fitted. The decision is chosen first
    (shifts), then its confidence (temperature), which leaves every decision as it was.
    """
    prior = np.array([prior_counts[c] for c in classes], dtype="float64")
    prior = prior / prior.sum()
    tau = prior_tau(prior_correction)
    record: dict[str, Any] = {"prior": dict(zip(classes, prior.round(6).tolist())), "prior_correction": prior_correction}
    if tau == "fit":
        tau, record["val_balanced_accuracy_at_tau"] = fit_prior_tau(probs, labels, prior)
    tau = float(tau or 0.0)
    shift = -tau * np.log(prior) + np.log([decision_of[c] for c in classes])
    logits = logits_from_probs(probs) + shift
    before = calibration_report(softmax(logits), labels)
    temperature = fit_temperature(softmax(logits), labels) if calibrate else 1.0
    fold_logit_transform(model, shift=shift, temperature=temperature)
    final = softmax(logits / temperature)
    after = calibration_report(final, labels)
    record.update({"tau": tau, "temperature": temperature, "shift": dict(zip(classes, shift.round(6).tolist())),
                   "fitted_on": "validation split",
                   "validation_before": {k: before[k] for k in ("ece", "brier", "nll")},
                   "validation_after": {k: after[k] for k in ("ece", "brier", "nll")}})
    return final, record
