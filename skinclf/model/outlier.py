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


# The flag has two tiers, each worded for what is true at its rate (issue 28):
# - "unusual": above the `threshold` that passes `pass_rate` (95%) of the validation dermoscopic
#   images, so about 1 in 20 ordinary dermoscopic images gets it; the result is less reliable,
#   but the image is most likely still a dermoscopic image;
# - "very unlike": above `rare_threshold`, RARE_FACTOR x the highest score of any validation
#   image, where no validation dermoscopic image falls (see `fit_tiers`): very likely not a
#   dermoscopic image at all. A record without `rare_threshold` (a bundle calibrated before the
#   tiers) has the "unusual" tier only.
WARNING = "unusual image: the result is less reliable"
WARNING_RARE = "very unlike the training images: check it is a dermoscopic image"
WARNINGS = (WARNING, WARNING_RARE)  # every tier's words, the ones older skinclf wrote included
OLD_WARNING = "unlike the training images: check it is a dermoscopic image"  # skinclf <= issue 28, one tier
RARE_FACTOR = 1.2


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
    # `reference_scores` and `rare_threshold` belong to the score they were fitted for
    # (the fallback of an engine without features has neither: one tier, no percentile)
    return ood


def fit_tiers(inlier_scores: np.ndarray, *, factor: float = RARE_FACTOR) -> dict[str, Any]:
    """The readable scale and the rare tier, fitted on the inliers' scores (the validation split,
    where the `threshold` is fitted): `reference_scores`, their sorted scores (packed), from which
    `percentile` reads the share of them that score lower; and `rare_threshold`, `factor` x the
    highest of them.

    Why the maximum times 1.2 and not a quantile: a 99.9th percentile of 1,504 images is the
    second-highest score, so it would flag about 1 dermoscopic image in 1,000 by design, and the
    words "very unlike the training images" must be true for nearly every image they are printed
    on. Above the maximum no validation image falls, but the maximum of another 1,500 dermoscopic
    images is higher about half the time, so a margin is needed: on the bundled model the
    highest validation scores are 10% apart (8,913 vs 8,080), and 1.2 leaves two such gaps.
    Measured afterwards (tools/ood_tiers.py): 0 of 1,503 test images above it (the test maximum,
    8,934, is just above the validation maximum: the maximum itself would have flagged it), while
    every flat-colour and gradient image, 92% of textures and 35% of photographs are."""
    s = np.sort(np.asarray(inlier_scores, dtype="float64"))
    s = s[np.isfinite(s)]
    if len(s) < 20:
        raise SkinclfError(f"{len(s)} scores are too few to fit the flag's tiers (need at least 20)")
    return {"reference_scores": pack(s), "rare_threshold": float(s[-1] + (factor - 1) * abs(s[-1])),  # factor x max, for any sign
            "rare_rule": f"{factor:g} x the highest score of the {len(s)} inliers",
            "percentile": "share of the inliers (validation dermoscopic images) scoring lower, 0-100"}


def percentile(scores: np.ndarray, record: Mapping[str, Any] | None) -> np.ndarray:
    """For each score, the share (0-100) of the record's inliers (the validation dermoscopic
    images) that score lower; NaN where the score is NaN or the record has no `reference_scores`."""
    s = np.asarray(scores, dtype="float64")
    if not record or not record.get("reference_scores"):
        return np.full(s.shape, np.nan)
    ref = unpack(record["reference_scores"])
    probe = np.nan_to_num(s, nan=0.0).astype("<f4").astype("float64")  # as the stored scores: float32
    out = 100.0 * np.searchsorted(ref, probe, side="left") / len(ref)
    return np.where(np.isfinite(s), out, np.nan)


def levels(logits: np.ndarray, ood: Mapping[str, Any] | None,
           features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, their percentiles (`percentile`) and each image's tier: 0 none, 1 unusual (above
    the `threshold`), 2 very unlike (above `rare_threshold`, when the record has one)."""
    record = active_record(ood, features is not None)
    scores, flagged = flag(logits, ood, features)
    level = flagged.astype("int8")
    if record and record.get("rare_threshold") is not None:
        with np.errstate(invalid="ignore"):
            level[scores > float(record["rare_threshold"])] = 2
    return scores, percentile(scores, record), level


def tier_warning(level: int) -> str | None:
    """The warning cell's words for a tier (None for 0)."""
    return {1: WARNING, 2: WARNING_RARE}.get(int(level))


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
