"""`skinclf calibrate`: make an existing bundle's probabilities and "unlike the training images"
flags trustworthy, fitted on a labelled folder (the validation split).

1. Temperature scaling (Guo et al., 2017): the bundle's logits z' (already z / T_old when
   training fitted a temperature) are divided by the T that minimises their negative
   log-likelihood on the folder; T is folded into the final layer, so the bundle's total
   temperature becomes T_old * T. Decisions do not change, only confidence.
2. The out-of-distribution score and threshold (`skinclf.trust.ood.fit_ood`) on the recalibrated
   logits and the pooled features of the same forward pass: the folder's images are the
   inliers, `reference_outliers()` the outliers; the feature scores' class means and covariances
   are fitted on the training folder (`train`), never on the folder that sets the threshold.

ECE (15 bins), NLL and Brier score before and after go into `meta["calibration"]`, the OOD
record into `meta["ood"]`; both are fitted and measured on the same folder, so "after" figures
are in-sample: a two-fold cross-fitted ECE is recorded beside them as the honest estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import __version__, ui
from skinclf.checks import at_least
from skinclf.config import CALIBRATE
from skinclf.data.layout import list_labelled_images, model_path
from skinclf.errors import SkinclfError
from skinclf.files import atomic_write_json, check_output_dir, check_output_file, check_output_files
from skinclf.own_outputs import JSON, MODEL, PNG
from skinclf.model.outlier import PASS_RATE, flag
from skinclf.model.posthoc import calibration_report, fit_temperature, softmax
from skinclf.trust.ood import fit_feature_stats, fit_ood, outlier_outputs
from skinclf.trust.reference_images import describe_sets, reference_outliers

TRAIN = Path("data/prepared/train")  # where `skinclf prepare` puts the training split

SUMMARY_KEYS = ("ece", "brier", "nll")


@dataclass
class CalibrationResult:
    """What `calibrate_model` did: where the bundle went and what it fitted."""

    model: Path
    calibration: dict[str, Any]
    ood: dict[str, Any]
    unreadable: list[dict[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    logits: np.ndarray | None = None  # recalibrated logits of the readable images (for reports)
    labels: np.ndarray | None = None
    features: np.ndarray | None = None  # their pooled features (None: the engine gives none)


def folder_logits(engine, paths: list[Path], *, workers: int = 2, show_progress: bool | None = None,
                  description: str = "Scoring") -> tuple[np.ndarray, list[str | None]]:
    """Logits of image files through any engine (NaN rows and an error where a file is bad)."""
    logits, _, errors = folder_outputs(engine, paths, workers=workers, show_progress=show_progress,
                                       description=description)
    return logits, errors


def folder_outputs(engine, paths: list[Path], *, workers: int = 2, show_progress: bool | None = None,
                   description: str = "Scoring") -> tuple[np.ndarray, np.ndarray | None, list[str | None]]:
    """Logits and pooled features (None when the engine gives none) of image files from one
    forward pass through any engine; NaN rows and an error where a file is bad."""
    from skinclf.engines.runner import predict_files

    parts, feats, errors = [], [], []
    with ui.progress(enabled=show_progress) as progress:
        task = progress.add_task(description, total=len(paths), rate="")
        for batch in predict_files(engine, paths, workers=workers):
            parts.append(batch.logits)
            feats.append(batch.features)
            errors += batch.errors
            progress.update(task, advance=len(batch.paths))
    logits = np.concatenate(parts) if parts else np.zeros((0, len(engine.classes)), "float32")
    features = np.concatenate(feats) if feats and all(f is not None for f in feats) else None
    return logits, features, errors


def cross_fitted(logits: np.ndarray, labels: np.ndarray, *, folds: int = 2, seed: int = 0) -> dict[str, float]:
    """ECE, Brier and NLL with each image's temperature fitted on the other folds only."""
    order = np.random.default_rng(seed).permutation(len(labels))
    probs = np.zeros(logits.shape)
    for k in range(folds):
        held = order[k::folds]
        rest = np.setdiff1d(order, held)
        t = fit_temperature(softmax(logits[rest]), labels[rest])
        probs[held] = softmax(logits[held] / t)
    report = calibration_report(probs, labels)
    return {k: report[k] for k in SUMMARY_KEYS}


def _fitted_on(meta: dict[str, Any], data: Path) -> str:
    from skinclf.evaluation.evaluate import provenance

    where = provenance(meta, data)
    if where["held_out"]:
        raise SkinclfError(
            f"{data} is the held-out test split of this model: fitting on it would make every test figure "
            "optimistic; calibrate on the validation split (e.g. data/prepared/val)"
        )
    if where["split"] == "val" and where["data_fingerprint"] and where["data_fingerprint"] == where["model_data_fingerprint"]:
        return "validation split"
    return str(data)


def calibrate_model(
    *,
    model: Path | None = None,
    data: Path = CALIBRATE.data,
    out: Path | None = None,
    report: Path | None = None,
    pass_rate: float = PASS_RATE,
    ood_score: str | None = None,
    train: Path | None = TRAIN,
    batch_size: int = CALIBRATE.batch_size,
    workers: int = CALIBRATE.workers,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool | None = None,
) -> CalibrationResult:
    """Refit the temperature and the OOD flag of the bundle `model` on the labelled folder `data`.

    Writes the bundle to `out` (default: replaces `model`, atomically) and, with `report`, a
    `calibration.json` and `reliability.png` into that folder. `ood_score` forces one of the
    scores instead of choosing the best separating one. `train` (the training split) gives the
    features' class means and covariances; None leaves the feature scores out (logits only).
    """
    from skinclf.engines.keras import KerasEngine
    from skinclf.model.bundle import load_bundle, save_bundle
    from skinclf.model.network import fold_logit_transform

    if not 0.5 <= pass_rate < 1:
        raise SkinclfError(f"--pass-rate {pass_rate}: must be in [0.5, 1), e.g. 0.95")
    at_least("--batch-size", batch_size, 1)
    source = model_path(model)
    target = Path(out or source)
    if target.suffix != ".keras":
        raise SkinclfError(f"--out {target}: the model file must end in .keras")
    if target.resolve() != source.resolve():  # replacing MODEL itself is what calibrate does by default
        check_output_file(target, example="calibrated.keras", kind=MODEL, overwrite=overwrite)
    if report is not None:
        check_output_dir(Path(report), option="--report")
        check_output_files(Path(report), {"calibration.json": JSON, "reliability.png": PNG}, overwrite=overwrite,
                           option="--report")
    bundle = load_bundle(source)
    data = Path(data)
    fitted_on = _fitted_on(bundle.meta, data)
    images = list_labelled_images(data, classes=tuple(bundle.classes))
    training = _training_images(bundle, train, data)
    engine = KerasEngine(bundle, batch_size=batch_size)
    logits, features, errors = folder_outputs(engine, images.paths, workers=workers, show_progress=show_progress,
                                              description="Calibrating")
    ok = np.array([e is None for e in errors], dtype=bool)
    if ok.sum() < 20:
        raise SkinclfError(f"only {int(ok.sum())} readable images in {data}: need at least 20 to calibrate")
    z, labels = logits[ok].astype("float64"), np.asarray(images.labels)[ok]
    features = features[ok] if features is not None else None

    factor = fit_temperature(softmax(z), labels)
    calibration = _calibration(z, labels, factor, previous=bundle.meta.get("calibration") or {},
                               fitted_on=fitted_on, data=data, seed=seed)
    ood = _fit_flag(engine, z / factor, features, factor=factor, training=training, pass_rate=pass_rate,
                    score=ood_score, fitted_on=fitted_on, seed=seed, workers=workers, show_progress=show_progress)
    # Where the flag's false alarms fall: a class flagged far above 1 - pass_rate is a class the
    # statistics do not describe well.
    flagged = flag(z / factor, ood, features)[1]
    ood["flag_rates_per_class"] = {c: round(float(flagged[labels == i].mean()), 4)
                                   for i, c in enumerate(bundle.classes) if (labels == i).any()}

    fold_logit_transform(bundle.model, temperature=factor)
    save_bundle(bundle.model, target, {**bundle.meta, "calibration": calibration, "ood": ood})
    unreadable = [{"path": str(p), "error": e} for p, e in zip(images.paths, errors) if e]
    files: list[Path] = [target]
    if report is not None:
        files += _write_report(Path(report), z, labels, target=target, calibration=calibration, ood=ood,
                               unreadable=unreadable)
    return CalibrationResult(model=target, calibration=calibration, ood=ood, unreadable=unreadable, files=files,
                             logits=z / factor, labels=labels, features=features)


def _write_report(report: Path, z: np.ndarray, labels: np.ndarray, *, target: Path, calibration: dict[str, Any],
                  ood: dict[str, Any], unreadable: list[dict[str, str]]) -> list[Path]:
    """calibration.json and reliability.png (before and after) in `report`."""
    from skinclf.evaluation.plots import reliability_png
    from skinclf.model.posthoc import reliability

    factor, old_t = calibration["refit"]["factor"], calibration["refit"]["previous_temperature"]
    tables = {"before": reliability(softmax(z), labels), "after": reliability(softmax(z / factor), labels)}
    atomic_write_json(report / "calibration.json", {"model": str(target), "calibration": calibration,
                                                    "reliability": tables, "ood": ood, "unreadable": unreadable})
    return [report / "calibration.json",
            reliability_png({f"before (T = {old_t:.3g})": tables["before"],
                             f"after (T = {old_t * factor:.3g})": tables["after"]},
                            report / "reliability.png", title=f"Reliability on {calibration['fitted_on']}")]


def _calibration(z: np.ndarray, labels: np.ndarray, factor: float, *, previous: dict[str, Any], fitted_on: str,
                 data: Path, seed: int) -> dict[str, Any]:
    """The `meta["calibration"]` record: the composed temperature, figures before and after."""
    before, after = calibration_report(softmax(z), labels), calibration_report(softmax(z / factor), labels)
    old_t = float(previous.get("temperature", 1.0))
    return {
        "temperature": old_t * factor,
        "fitted_on": fitted_on,
        "data": str(data),
        "images": len(labels),
        "validation_before": {k: before[k] for k in SUMMARY_KEYS},
        "validation_after": {k: after[k] for k in SUMMARY_KEYS},
        "validation_after_cross_fitted": cross_fitted(z, labels, seed=seed),
        "bins": before["bins"],
        "refit": {"by": f"skinclf calibrate {__version__}", "previous_temperature": old_t, "factor": factor,
                  "at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        **({"previous": previous} if previous else {}),
    }


def _training_images(bundle, train: Path | None, data: Path):
    """The labelled training images the feature statistics are fitted on (checked before any work)."""
    from skinclf.evaluation.evaluate import provenance

    if train is None:
        return None
    train = Path(train)
    if not train.is_dir():
        raise SkinclfError(f"--train {train}: not a folder; pass the training split (one sub-folder per class, "
                           "made by skinclf prepare), e.g. data/prepared/train")
    if train.resolve() == Path(data).resolve():
        raise SkinclfError(f"--train {train} is the --data folder: the feature statistics must come from other "
                           "images than the ones that set the threshold (use the training split)")
    if provenance(bundle.meta, train)["held_out"]:
        raise SkinclfError(f"--train {train} is the held-out test split of this model; pass the training split")
    return train, list_labelled_images(train, classes=tuple(bundle.classes))


def _fit_flag(engine, z: np.ndarray, features: np.ndarray | None, *, factor: float, training, pass_rate: float,
              score: str | None, fitted_on: str, seed: int, workers: int, show_progress: bool | None) -> dict[str, Any]:
    """The OOD record: feature statistics from the training images (when given and the engine has
    features), every candidate score on the inliers `z` (recalibrated logits) and `features` vs
    the reference outliers, the best one's threshold."""
    sets = reference_outliers(size=engine.image_size, seed=seed)
    outliers, outlier_features = outlier_outputs(engine, sets)
    outliers = {name: v / factor for name, v in outliers.items()}
    stats = None
    if training is not None and features is not None and outlier_features is not None:
        folder, images = training
        _, train_features, errors = folder_outputs(engine, images.paths, workers=workers,
                                                   show_progress=show_progress, description="Training features")
        ok = np.array([e is None for e in errors], dtype=bool)
        stats = fit_feature_stats(train_features[ok], np.asarray(images.labels)[ok],
                                  fitted_on=f"{int(ok.sum())} images of {folder}")
    ood = fit_ood(z, outliers, pass_rate=pass_rate, score=score, fitted_on=fitted_on, stats=stats,
                  inlier_features=features if stats else None, outlier_features=outlier_features if stats else None)
    ood["outlier_sets"] = {"images": describe_sets(sets), "source": "skinclf.trust.reference_images.reference_outliers(seed="
                           f"{seed}, size={engine.image_size})"}
    return ood
