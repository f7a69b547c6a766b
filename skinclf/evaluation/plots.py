"""PNG figures: confusion matrix, ROC curves, training curves (matplotlib, no display needed).

Figures are built with matplotlib's object API (no pyplot state, safe in threads and servers)
and written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skinclf.files import atomic_path
from skinclf.metrics import roc_curve


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        # The marker lets a later run tell its own picture from a user's PNG (`files.check_replace`).
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png", metadata={"Software": "skinclf"})
    return path


def confusion_matrix_png(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, *, title: str = "") -> Path:
    """Heat map of the row-normalised confusion matrix, annotated with counts and row %."""
    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    fig = Figure(figsize=(1.0 * n + 2.5, 1.0 * n + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "Confusion matrix (rows: true class)")
    for i in range(n):
        for j in range(n):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(cm[i, j])}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=8, color=colour)
    return _save(fig, path)


def roc_png(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, *,
            highlight: str = "mel", operating_points: dict | None = None) -> Path:
    """One-vs-rest ROC curve per class, `highlight` (melanoma) drawn bold with its operating points."""
    fig = Figure(figsize=(6.5, 6))
    ax = fig.add_subplot()
    for c, name in enumerate(classes):
        positive = np.asarray(y_true) == c
        if not 0 < positive.sum() < len(positive):
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        bold = name == highlight
        ax.plot(fpr, tpr, lw=2.5 if bold else 1.0, alpha=1.0 if bold else 0.7, label=name, zorder=3 if bold else 2)
    for label, point in (operating_points or {}).items():
        if point and point.get("sensitivity") is not None:
            ax.scatter(1 - point["specificity"], point["sensitivity"], s=60, zorder=4, label=label, edgecolor="black")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC, one class vs the rest")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def history_png(history: Sequence[dict], path: Path) -> Path:
    """Training curves: loss and top-1/2/3 accuracy (plus balanced accuracy), train vs validation."""
    epochs = [row["epoch"] for row in history]
    panels = [("loss", "loss"), ("top1_accuracy", "top-1 accuracy"), ("top2_accuracy", "top-2 accuracy"),
              ("top3_accuracy", "top-3 accuracy"), ("balanced_accuracy", "balanced accuracy")]
    panels = [(key, title) for key, title in panels if any(key in row for row in history)]
    fig = Figure(figsize=(4 * len(panels), 3.6))
    for i, (key, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + key, np.nan) for row in history]
            ax.plot(epochs, values, marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def reliability_png(curves: dict[str, Sequence[dict]], path: Path, *, title: str = "Reliability diagram") -> Path:
    """Reliability diagram: accuracy against mean top-1 confidence per bin, one line per curve
    (rows from `skinclf.model.posthoc.reliability`), with the diagonal of perfect calibration and
    the share of images per bin below."""
    fig = Figure(figsize=(6, 6.8))
    ax = fig.add_axes((0.12, 0.34, 0.83, 0.58))
    hist = fig.add_axes((0.12, 0.08, 0.83, 0.18), sharex=ax)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
    width = None
    for i, (label, rows) in enumerate(curves.items()):
        used = [r for r in rows if r["count"]]
        total = sum(r["count"] for r in rows) or 1
        ece = sum(r["count"] / total * abs(r["confidence"] - r["accuracy"]) for r in used)
        ax.plot([r["confidence"] for r in used], [r["accuracy"] for r in used], marker="o", ms=4,
                label=f"{label}: ECE {ece:.3f}")
        width = (rows[0]["high"] - rows[0]["low"]) if rows else 0.1
        offset = (i - (len(curves) - 1) / 2) * width / max(len(curves), 1)
        hist.bar([(r["low"] + r["high"]) / 2 + offset for r in rows], [r["count"] / total for r in rows],
                 width=width / max(len(curves), 1), alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_ylabel("accuracy of the top class")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("share")
    return _save(fig, path)
