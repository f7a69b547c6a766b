"""Out-of-distribution flags: "this image is unlike the training images".

A classifier names one of its classes for any picture, a landscape or a page of text included.
An out-of-distribution (OOD) score says how unlike the training images an input is; a
threshold fitted on held-out dermoscopic images (the validation split) so that `pass_rate`
(95%) of them pass flags the rest. Higher scores are more unusual. Candidates
(`skinclf.model.outlier`, computed in numpy from every engine's outputs):

- from the logits: `energy` (Liu et al. 2020), `max_logit` (Hendrycks et al. 2022), `max_prob`
  (Hendrycks & Gimpel 2017);
- from the pooled features of the same forward pass (`engine.forward`): `mahalanobis` (Lee et
  al. 2018: class means and a shared covariance of the training features) and
  `relative_mahalanobis` (Ren et al. 2021: minus the distance under one background Gaussian),
  fitted on the training split by `fit_feature_stats`.

`fit_ood` picks the candidate with the best (mean ROC-AUC + worst set's flag rate) / 2 between
the validation split and `reference_outliers()`, and records it in the bundle's metadata
(`meta["ood"]`) with its threshold, the flag rate on every set, every candidate's separation,
the feature statistics it needs and a logit-score fallback for engines without features.

The reference outliers themselves are built in `trust.reference_images`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from skinclf.errors import SkinclfError
from skinclf.model.outlier import (
    FEATURE_SCORES,
    LOGIT_SCORES,
    PASS_RATE,
    SCORES,
    WARNING,
    WARNING_RARE,
    feature_scores,
    fit_tiers,
    fit_gaussian,
    ood_scores,
)


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Probability that a random outlier scores above a random inlier (ties count half): the
    ROC-AUC of the outliers as positives (`metrics.roc_auc`); NaN when either side is empty."""
    from skinclf.metrics import roc_auc

    a, b = np.asarray(inliers, dtype="float64"), np.asarray(outliers, dtype="float64")
    if not len(a) or not len(b):
        return float("nan")
    return roc_auc(np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)], np.concatenate([a, b]))


# Principal components kept per covariance, the rest one shared variance (PPCA). On the bundled
# ensemble (2048-d features) ranks 64 and 256 separate validation from the reference outliers
# alike (mean ROC-AUC 0.9996 vs 0.9998); 64 keeps the stored statistics under 1 MB.
RANK = 64


def fit_feature_stats(features: np.ndarray, labels: np.ndarray, *, rank: int = RANK,
                      fitted_on: str = "training split") -> dict[str, Any]:
    """What the feature scores need, fitted on training features (n, d) and their labels: class
    means with the tied covariance (Lee et al.) and the background Gaussian of all features
    (Ren et al.), each covariance in low-rank form (`outlier.fit_gaussian`)."""
    f = np.asarray(features, dtype="float64")
    ok = np.isfinite(f).all(axis=1)
    if ok.sum() < 20:
        raise SkinclfError(f"{int(ok.sum())} readable training images are too few to fit feature statistics "
                           "(need at least 20)")
    return {"class": fit_gaussian(f[ok], np.asarray(labels)[ok], rank=rank),
            "background": fit_gaussian(f[ok], rank=rank), "width": int(f.shape[1]), "images": int(ok.sum()),
            "fitted_on": fitted_on}


def _scores(name: str, logits: np.ndarray, features: np.ndarray | None, stats: Mapping[str, Any] | None) -> np.ndarray:
    if name in FEATURE_SCORES:
        return feature_scores(features, stats, name)
    return ood_scores(logits, name)


def _candidate(name: str, inside: np.ndarray, outside: Mapping[str, np.ndarray], pass_rate: float) -> dict[str, Any]:
    """A score's separation: ROC-AUC per outlier set and flag rates at the `pass_rate` threshold."""
    inside = inside[np.isfinite(inside)]
    threshold = float(np.quantile(inside, pass_rate, method="higher"))
    per_set = {k: auroc(inside, v) for k, v in outside.items()}
    rates = {k: float(np.mean(v > threshold)) for k, v in outside.items()}
    mean = float(np.mean(list(per_set.values()))) if per_set else float("nan")
    worst = float(min(rates.values())) if rates else float("nan")
    return {"mean_auroc": mean, "auroc": per_set, "threshold": threshold, "flag_rates": rates,
            "worst_flag_rate": worst, "merit": (mean + worst) / 2}


def fit_ood(
    inlier_logits: np.ndarray,
    outlier_logits: Mapping[str, np.ndarray],
    *,
    pass_rate: float = PASS_RATE,
    score: str | None = None,
    fitted_on: str = "validation split",
    inlier_features: np.ndarray | None = None,
    outlier_features: Mapping[str, np.ndarray] | None = None,
    stats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Choose the score that best separates inliers from the outlier sets and fit its threshold.

    Candidates: the logit scores, plus the feature scores when `stats` (`fit_feature_stats`) and
    the features of the inliers and every outlier set are given. The winner has the highest
    merit, (mean ROC-AUC over the outlier sets + the worst set's flag rate) / 2, each set
    weighing the same whatever its size, unless `score` names one; its threshold is the
    `pass_rate` quantile of the inliers' scores. Returns the record stored as `meta["ood"]`:
    score, threshold, flag rates on the inliers and on each outlier set, every candidate's
    separation, the feature statistics when a feature score wins, and a logit-score `fallback`
    for engines that give no features.
    """
    if not 0.5 <= pass_rate < 1:
        raise SkinclfError(f"pass rate {pass_rate}: must be in [0.5, 1), e.g. 0.95")
    inlier_logits = np.asarray(inlier_logits)
    if len(inlier_logits) < 20:
        raise SkinclfError(f"{len(inlier_logits)} images are too few to fit an OOD threshold (need at least 20)")
    with_features = stats is not None and inlier_features is not None and outlier_features is not None
    candidates = [score] if score else list(LOGIT_SCORES) + (list(FEATURE_SCORES) if with_features else [])
    if any(c in FEATURE_SCORES for c in candidates) and not with_features:
        raise SkinclfError(f"OOD score {score!r} needs the model's features and training statistics")
    sets = [k for k, v in outlier_logits.items() if len(v)]
    separation = {}
    for name in candidates:
        inside = _scores(name, inlier_logits, inlier_features, stats)
        outside = {k: _scores(name, outlier_logits[k], (outlier_features or {}).get(k), stats) for k in sets}
        separation[name] = _candidate(name, inside, outside, pass_rate)
    chosen = score or max(candidates, key=lambda n: (np.nan_to_num(separation[n]["merit"], nan=-1.0),
                                                     -candidates.index(n)))
    record = _record(chosen, separation[chosen], inlier_logits, inlier_features, stats, fitted_on, sets, outlier_logits,
                     outlier_features)
    record.update(pass_rate=pass_rate, fitted_on=fitted_on, separation=_rounded(separation), warning=WARNING,
                  rare_warning=WARNING_RARE,
                  chosen_by="highest (mean ROC-AUC over the outlier sets + worst set's flag rate) / 2, "
                            f"threshold passing {pass_rate:.0%} of the {fitted_on}")
    if chosen in FEATURE_SCORES:
        logit_only = max(LOGIT_SCORES, key=lambda n: np.nan_to_num(
            separation.get(n, {}).get("merit", np.nan), nan=-1.0))
        fallback = separation.get(logit_only) or _candidate(
            logit_only, ood_scores(inlier_logits, logit_only),
            {k: ood_scores(outlier_logits[k], logit_only) for k in sets}, pass_rate)
        record["fallback"] = {"score": logit_only, "formula": SCORES[logit_only], "threshold": fallback["threshold"],
                              "flag_rates": fallback["flag_rates"], "why": "engines without a features output"}
    return record


def _record(chosen, best, inlier_logits, inlier_features, stats, fitted_on, sets, outlier_logits,
            outlier_features=None) -> dict[str, Any]:
    inside = _scores(chosen, inlier_logits, inlier_features, stats)
    counts = {fitted_on: int(np.isfinite(inside).sum()), **{k: len(outlier_logits[k]) for k in sets}}
    rates = {fitted_on: float(np.mean(inside[np.isfinite(inside)] > best["threshold"])), **best["flag_rates"]}
    record = {"score": chosen, "formula": SCORES[chosen], "threshold": best["threshold"], "flag_rates": rates,
              "counts": counts}
    # The readable scale (percentile of the inliers) and the rare "very unlike" tier, fitted on
    # the same inliers as the threshold (`outlier.fit_tiers`), with that tier's rate on every set.
    record.update(fit_tiers(inside))
    rare = record["rare_threshold"]
    outside = {k: _scores(chosen, outlier_logits[k], (outlier_features or {}).get(k), stats) for k in sets}
    record["rare_flag_rates"] = {fitted_on: float(np.mean(inside[np.isfinite(inside)] > rare)),
                                 **{k: float(np.mean(v > rare)) for k, v in outside.items()}}
    if chosen in FEATURE_SCORES:  # only what the chosen score reads: the bundle stays small
        record["features"] = {k: v for k, v in stats.items() if k != "background" or chosen == "relative_mahalanobis"}
    return record


def _rounded(separation: Mapping[str, Any]) -> dict[str, Any]:
    """Every candidate's figures, without the per-candidate thresholds' noise digits."""
    return {name: {"mean_auroc": round(c["mean_auroc"], 4), "worst_flag_rate": round(c["worst_flag_rate"], 4),
                   "merit": round(c["merit"], 4), "auroc": {k: round(v, 4) for k, v in c["auroc"].items()},
                   "flag_rates": {k: round(v, 4) for k, v in c["flag_rates"].items()}}
            for name, c in separation.items()}


def with_logits_output(model):
    """A Keras model giving `[softmax(z), z]` side by side ((n, 2 * classes)) from a chain
    model ending in the 'predictions' softmax: probabilities and OOD score in one forward pass,
    batch norms folded as `inference_model` does."""
    from skinclf.backend import load_keras
    from skinclf.engines.keras import inference_model
    from skinclf.model.network import logits_model

    keras = load_keras()
    folded = inference_model(logits_model(model))
    z = folded.outputs[0]
    both = keras.layers.Concatenate(name="probs_and_logits")([keras.layers.Softmax(name="softmax")(z), z])
    return keras.Model(folded.inputs, both, name=f"{model.name}_probs_logits")


def outlier_logits(logits_fn: Callable[[np.ndarray], np.ndarray], sets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `logits_fn` (e.g. `engine.logits`) over every set."""
    return {name: np.asarray(logits_fn(images)) for name, images in sets.items()}


def outlier_outputs(engine, sets: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Logits and pooled features (None when the engine gives none) of every set, one pass each."""
    logits, features = {}, {}
    for name, images in sets.items():
        logits[name], features[name] = engine.forward(images)
    return logits, (features if all(f is not None for f in features.values()) else None)
