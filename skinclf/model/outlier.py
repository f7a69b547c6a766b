"""The out-of-distribution score and flag a bundle carries ("unlike the training images").

Scores are computed in numpy from an engine's outputs, so every engine flags alike; fitting
the threshold (`skinclf calibrate`) lives in `trust/ood.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from skinclf.errors import SkinclfError

SCORES: dict[str, str] = {
    "energy": "-logsumexp(logits)",
    "max_logit": "-max(logits)",
    "max_prob": "-max(softmax(logits))",
}


PASS_RATE = 0.95


WARNING = "unlike the training images: check it is a dermoscopic image"


def ood_scores(logits: np.ndarray, score: str = "energy") -> np.ndarray:
    """One score per row of `logits`; higher means more unlike the training images."""
    if score not in SCORES:
        raise SkinclfError(f"OOD score {score!r}: choose one of {', '.join(SCORES)}")
    z = np.asarray(logits, dtype="float64")
    if z.ndim != 2 or z.shape[1] < 2:
        raise SkinclfError(f"logits must be (images, classes), got shape {z.shape}")
    top = z.max(axis=1)
    if score == "max_logit":
        return -top
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    if score == "energy":
        return -lse
    return -np.exp(top - lse)  # max softmax probability


def flag(logits: np.ndarray, ood: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and flags (score above the threshold) of logits under a bundle's `meta["ood"]`.

    Without a fitted record the score is the energy and nothing is flagged."""
    if not ood:
        return ood_scores(logits, "energy"), np.zeros(len(logits), dtype=bool)
    scores = ood_scores(logits, ood.get("score", "energy"))  # records without a score are energy
    return scores, scores > float(ood["threshold"])
