"""Post-hoc adjustments fitted on validation data, and the measures that judge them.

Both adjustments act on logits and are folded into the model's final layer
(`skinclf.model.network.fold_logit_transform`), so every engine and export carries them:

- prior correction (Menon et al., "Long-tail learning via logit adjustment", 2021):
  logits - tau * log(training class prior), one tau chosen for validation balanced accuracy;
- temperature scaling (Guo et al., 2017): logits / T, T chosen for validation negative
  log-likelihood. It changes confidence, never a decision.

Logits are recovered from probabilities as log p: softmax is unchanged by adding a constant to
every logit, so log p behaves exactly like the model's own logits here.

NumPy only, so `evaluate --predictions` can report calibration without Keras.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from skinclf.errors import SkinclfError

ECE_BINS = 15


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """Logits (up to a per-row constant) of probability rows."""
    return np.log(np.clip(np.asarray(probs, dtype="float64"), 1e-12, 1.0))


def softmax(logits: np.ndarray, *, dtype: str = "float64") -> np.ndarray:
    """Row-wise softmax computed in `dtype` (engines use float32, so their cells match to the digit)."""
    z = np.asarray(logits, dtype=dtype)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in `labels`."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    recalls = [np.mean(predicted[labels == c] == c) for c in range(num_classes) if np.any(labels == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def fit_prior_tau(
    probs: np.ndarray, labels: np.ndarray, prior: Sequence[float], *, grid: np.ndarray | None = None
) -> tuple[float, float]:
    """The tau maximising balanced accuracy of argmax(logits - tau * log prior), and that accuracy.

    Ties go to the tau closest to 0 (the smallest change to the model).
    """
    prior = np.asarray(prior, dtype="float64")
    if np.any(prior <= 0) or len(prior) != np.asarray(probs).shape[1]:
        raise SkinclfError("the class prior must be positive, one value per class")
    grid = np.round(np.arange(-1.0, 2.0001, 0.05), 4) if grid is None else np.asarray(grid)
    logits = logits_from_probs(probs)
    log_prior = np.log(prior / prior.sum())
    scored = [(balanced_accuracy(labels, np.argmax(logits - t * log_prior, axis=1), len(prior)), -abs(t), t)
              for t in grid]
    best, _, tau = max(scored)
    return float(tau), float(best)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probs, dtype="float64")[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the squared distance to the one-hot truth."""
    p = np.asarray(probs, dtype="float64")
    truth = np.eye(p.shape[1])[np.asarray(labels)]
    return float(np.mean(np.sum((p - truth) ** 2, axis=1)))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (equal width on [0, 1]): count, mean confidence, accuracy of top-1."""
    p = np.asarray(probs, dtype="float64")
    confidence = p.max(axis=1)
    correct = np.argmax(p, axis=1) == np.asarray(labels)
    # Bin k holds confidences in (k/bins, (k+1)/bins]; a confidence of exactly 0 goes to bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for k in range(bins):
        inside = index == k
        n = int(inside.sum())
        rows.append({"low": k / bins, "high": (k + 1) / bins, "count": n,
                     "confidence": float(confidence[inside].mean()) if n else None,
                     "accuracy": float(correct[inside].mean()) if n else None})
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between top-1 confidence and accuracy over `bins` bins."""
    total = len(labels)
    if total == 0:
        return float("nan")
    return float(sum(r["count"] / total * abs(r["confidence"] - r["accuracy"])
                     for r in reliability(probs, labels, bins) if r["count"]))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (golden-section on log T)."""
    logits = logits_from_probs(probs)
    labels = np.asarray(labels)

    def loss(log_t: float) -> float:
        return nll(softmax(logits / np.exp(log_t)), labels)

    lo, hi = np.log(0.05), np.log(20.0)
    golden = (np.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2))


def calibration_report(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """ECE, Brier score, NLL and the reliability table of probability rows against labels."""
    return {"ece": expected_calibration_error(probs, labels, bins), "brier": brier(probs, labels),
            "nll": nll(probs, labels), "bins": bins, "reliability": reliability(probs, labels, bins)}
