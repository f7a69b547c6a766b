"""Classification figures from labels and probabilities (numpy only: no Keras, no scikit-learn).

Shared by training (the validation figures stored in the bundle) and `skinclf evaluate`.
Balanced accuracy (mean per-class recall over the classes present) is the ISIC 2018 Task 3
ranking metric and the headline figure: plain accuracy on HAM10000 rewards calling everything
a nevus (67% of the images).

ROC curves and AUCs follow scikit-learn's definitions exactly (a test compares them), so the
light install (`pip install skinclf`) scores predictions without scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MELANOMA = "mel"


def _as_float(x: float | np.floating | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as `sklearn.metrics.roc_curve` gives them (drop_intermediate=True)."""
    positive = np.asarray(positive, bool)
    score = np.asarray(score, dtype=float)
    order = np.argsort(-score, kind="mergesort")
    score, positive = score[order], positive[order]
    last = np.r_[np.where(np.diff(score))[0], len(score) - 1]  # the last index of each distinct score
    tps = np.cumsum(positive)[last].astype(float)
    fps = 1 + last - tps
    thresholds = score[last]
    if len(fps) > 2:  # drop points on straight segments: they do not change the curve
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps, thresholds = np.r_[0, tps], np.r_[0, fps], np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties counted half), as `sklearn.metrics.roc_auc_score`."""
    fpr, tpr, _ = roc_curve(positive, score)
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def _precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray, n: int):
    cm = confusion(y_true, y_pred, n).astype(float)
    tp, predicted, support = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(n), where=total > 0)
    return precision, recall, f1, support.astype(int)


def topk_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k most probable."""
    k = min(k, probs.shape[1])
    topk = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(topk == np.asarray(y_true)[:, None], axis=1)))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in `y_true`."""
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def one_vs_rest_auc(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """ROC-AUC of each class against the rest; None where the class (or the rest) is absent."""
    out: list[float | None] = []
    for c in range(probs.shape[1]):
        positive = y_true == c
        out.append(_as_float(roc_auc(positive, probs[:, c])) if 0 < positive.sum() < len(y_true) else None)
    return out


def binary_operating_points(positive: np.ndarray, score: np.ndarray, decided: np.ndarray, target_sensitivity: float) -> dict[str, Any]:
    """Sensitivity and specificity of one class (e.g. melanoma) at the model's decision and at
    the highest threshold on its probability that reaches `target_sensitivity`."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    out: dict[str, Any] = {"positives": n_pos, "negatives": n_neg}
    if n_pos == 0 or n_neg == 0:
        return out
    out["at_decision"] = {
        "sensitivity": _as_float(np.mean(decided[positive])),
        "specificity": _as_float(np.mean(~decided[~positive])),
    }
    fpr, tpr, thresholds = roc_curve(positive, score)
    i = int(np.argmax(tpr >= target_sensitivity))  # first (highest) threshold reaching the target
    out["at_target"] = {
        "target_sensitivity": target_sensitivity,
        "threshold": _as_float(min(thresholds[i], 1.0)),
        "sensitivity": _as_float(tpr[i]),
        "specificity": _as_float(1 - fpr[i]),
    }
    out["auc"] = _as_float(roc_auc(positive, score))
    out["roc"] = {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}
    return out


def classification_report(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], *, mel_sensitivity: float = 0.9
) -> dict[str, Any]:
    """Every figure skinclf reports, as a JSON-ready dict.

    `probs` holds one row of class probabilities per image; `y_true` the true class indices.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    n = len(classes)
    y_pred = probs.argmax(axis=1)
    cm = confusion(y_true, y_pred, n)
    precision, recall, f1, support = _precision_recall_f1(y_true, y_pred, n)
    aucs = one_vs_rest_auc(y_true, probs)
    defined = [a for a in aucs if a is not None]
    row_sums = cm.sum(axis=1, keepdims=True)
    report: dict[str, Any] = {
        "n": int(len(y_true)),
        "classes": list(classes),
        "accuracy": _as_float(np.mean(y_pred == y_true)),
        "balanced_accuracy": _as_float(balanced_accuracy(y_true, y_pred)),
        "top_k_accuracy": {str(k): _as_float(topk_accuracy(y_true, probs, k)) for k in (1, 2, 3) if k <= n},
        "macro_auc": _as_float(np.mean(defined)) if defined else None,
        "per_class": {
            name: {
                "precision": _as_float(precision[i]),
                "recall": _as_float(recall[i]),
                "f1": _as_float(f1[i]),
                "support": int(support[i]),
                "auc": aucs[i],
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": np.divide(cm, row_sums, out=np.zeros(cm.shape), where=row_sums > 0).round(4).tolist(),
    }
    if MELANOMA in classes:
        m = classes.index(MELANOMA)
        report["melanoma"] = binary_operating_points(y_true == m, probs[:, m], y_pred == m, mel_sensitivity)
    return report
