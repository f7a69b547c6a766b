"""The out-of-distribution score and flag a bundle carries ("unlike the training images").

Scores are computed in numpy from an engine's outputs (logits and the pooled features of the
same forward pass), so every engine flags alike, serve included; fitting the statistics and
the threshold (`skinclf calibrate`) lives in `trust/ood.py`. Higher scores are more unusual.

Logit scores: `energy` -logsumexp(z) (Liu et al. 2020), `max_logit` -max(z) (Hendrycks et al.
2022), `max_prob` -max softmax(z) (Hendrycks & Gimpel 2017).

Feature scores, on the global-average-pooled features f (an ensemble's members' side by side):

- `mahalanobis` (Lee et al. 2018): min over classes c of MD_c(f) = (f - mu_c)^T P (f - mu_c),
  mu_c the class means of the training features and P the precision of their shared (tied,
  within-class) covariance. Each class weighs the same in that covariance (the mean of the
  per-class covariances), not its share of the images: pooled by count, nevi (67% of the
  training split) set the shape, and on validation 35% of dermatofibromas and 27% of vascular
  lesions were flagged; class-balanced, at most 9% of any class, every reference set still
  flagged in full;
- `relative_mahalanobis` (Ren et al. 2021): min over c of MD_c(f) - MD_0(f), MD_0 the distance
  under one background Gaussian fitted to all training features (mean and covariance).

Each covariance is stored in a low-rank form (probabilistic PCA, Tipping & Bishop 1999): the top
`rank` eigenvectors V and eigenvalues l, and the mean s2 of the remaining eigenvalues, i.e.
Sigma = V diag(l) V^T + s2 (I - V V^T), whose precision is exact and cheap:

    d(x) = |x|^2 / s2 + sum_j (v_j . x)^2 (1 / l_j - 1 / s2),   x = f - mu

The residual off the top components weighs 1/s2: an input whose features leave the subspace
the training images span scores high. Arrays are stored as base64 float32 (`pack`), so a
2048-d model with rank 256 keeps about 3 MB in its metadata.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from skinclf.errors import SkinclfError

LOGIT_SCORES: dict[str, str] = {
    "energy": "-logsumexp(logits)",
    "max_logit": "-max(logits)",
    "max_prob": "-max(softmax(logits))",
}
FEATURE_SCORES: dict[str, str] = {
    "mahalanobis": "min over classes of the Mahalanobis distance of the pooled features to the class mean, "
                   "shared (tied) covariance (Lee et al. 2018), low-rank + isotropic (PPCA) precision",
    "relative_mahalanobis": "min over classes of [class Mahalanobis distance - distance under one background "
                            "Gaussian of all training features] (Ren et al. 2021), PPCA precisions",
}
SCORES: dict[str, str] = {**LOGIT_SCORES, **FEATURE_SCORES}


PASS_RATE = 0.95


WARNING = "unlike the training images: check it is a dermoscopic image"


def ood_scores(logits: np.ndarray, score: str = "energy") -> np.ndarray:
    """One logit score per row of `logits`; higher means more unlike the training images."""
    if score not in LOGIT_SCORES:
        raise SkinclfError(f"OOD score {score!r} from logits: choose one of {', '.join(LOGIT_SCORES)}")
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


# --- stored arrays ---------------------------------------------------------------------------


def pack(array: np.ndarray) -> dict[str, Any]:
    """A float32 array as JSON: shape and base64 of its little-endian bytes."""
    a = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack(record: Mapping[str, Any]) -> np.ndarray:
    """The array `pack` stored (cached: scoring every batch must not decode megabytes again)."""
    return _unpacked(record["base64"], tuple(record["shape"]))


@lru_cache(maxsize=16)
def _unpacked(b64: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(b64), dtype="<f4").astype("float64").reshape(shape)
    a.setflags(write=False)
    return a


# --- Gaussians in low-rank form ------------------------------------------------------------------


def fit_gaussian(features: np.ndarray, labels: np.ndarray | None = None, *, rank: int) -> dict[str, Any]:
    """Means and a low-rank + isotropic covariance of `features` (n, d), packed for the bundle.

    With `labels`: one mean per label present (named in `labels`) and the shared covariance, the
    mean of the per-class covariances about their own class means (each class weighs the same);
    without: the background Gaussian (one mean, the plain covariance)."""
    f = np.asarray(features, dtype="float64")
    if f.ndim != 2 or len(f) < 2:
        raise SkinclfError(f"features must be (images, width) with at least 2 rows, got shape {f.shape}")
    if labels is None:
        present, means = [0], f.mean(axis=0, keepdims=True)
        centred = f - means[0]
        cov = centred.T @ centred / len(f)
    else:
        y = np.asarray(labels)
        present = [int(c) for c in np.unique(y)]
        means = np.stack([f[y == c].mean(axis=0) for c in present])
        cov = np.zeros((f.shape[1], f.shape[1]))
        for c, mean in zip(present, means):
            centred = f[y == c] - mean
            cov += centred.T @ centred / len(centred) / len(present)
    eigenvalues, vectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0, None), vectors[:, order]
    rank = int(min(rank, f.shape[1] - 1, len(f) - 1))
    floor = max(float(eigenvalues[0]) * 1e-6, 1e-12)  # keeps 1 / l finite for degenerate features
    s2 = max(float(eigenvalues[rank:].mean()), floor)
    return {"labels": present, "means": pack(means), "components": pack(vectors[:, :rank].T),
            "eigenvalues": pack(np.maximum(eigenvalues[:rank], s2)), "residual_variance": s2, "rank": rank}


def distances(features: np.ndarray, gaussian: Mapping[str, Any]) -> np.ndarray:
    """Squared Mahalanobis distance (n, means) of every row of `features` to every stored mean."""
    f = np.asarray(features, dtype="float64")
    means, v, lam = unpack(gaussian["means"]), unpack(gaussian["components"]), unpack(gaussian["eigenvalues"])
    s2 = float(gaussian["residual_variance"])
    if f.ndim != 2 or f.shape[1] != means.shape[1]:
        raise SkinclfError(f"features of width {f.shape[-1]} do not match the stored statistics "
                           f"(width {means.shape[1]}): the model and its OOD record disagree")
    sq = (f**2).sum(axis=1)[:, None] - 2 * f @ means.T + (means**2).sum(axis=1)[None, :]
    proj = (f @ v.T)[:, None, :] - (means @ v.T)[None, :, :]  # (n, means, rank)
    return sq / s2 + (proj**2 * (1 / lam - 1 / s2)).sum(axis=2)


def feature_scores(features: np.ndarray, stats: Mapping[str, Any], score: str) -> np.ndarray:
    """One feature score per row; NaN rows (unreadable images) stay NaN."""
    if score not in FEATURE_SCORES:
        raise SkinclfError(f"OOD score {score!r} from features: choose one of {', '.join(FEATURE_SCORES)}")
    md = distances(features, stats["class"])
    if score == "relative_mahalanobis":
        md = md - distances(features, stats["background"])
    return md.min(axis=1)


# --- the flag --------------------------------------------------------------------------------


def active_record(ood: Mapping[str, Any] | None, has_features: bool) -> Mapping[str, Any] | None:
    """The part of a bundle's `meta["ood"]` an engine can use: the record itself, or its
    logit-based `fallback` when the record's score reads features the engine does not give (an
    ONNX file exported before the `features` output). None: no fitted flag."""
    if not ood:
        return None
    if "score" not in ood:  # records without a score are energy
        ood = {**ood, "score": "energy"}
    if ood["score"] in FEATURE_SCORES and not (has_features and ood.get("features")):
        fallback = ood.get("fallback")
        return {**fallback, "pass_rate": ood.get("pass_rate"), "fitted_on": ood.get("fitted_on")} if fallback else None
    return ood


def flag(logits: np.ndarray, ood: Mapping[str, Any] | None,
         features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and flags (score above the threshold) under a bundle's `meta["ood"]`.

    Without a fitted record the score is the energy and nothing is flagged. A feature score
    needs the engine's features (the same forward pass's); without them the record's
    logit-based `fallback` is used (`active_record`). Unreadable rows (NaN) are never flagged."""
    record = active_record(ood, features is not None)
    if not record:
        return ood_scores(logits, "energy"), np.zeros(len(logits), dtype=bool)
    if record["score"] in FEATURE_SCORES:
        scores = feature_scores(features, record["features"], record["score"])
    else:
        scores = ood_scores(logits, record["score"])
    with np.errstate(invalid="ignore"):
        return scores, scores > float(record["threshold"])
