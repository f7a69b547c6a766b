"""`skinclf evaluate`: what a model gets right and wrong, per class, melanoma first.

Two sources of predictions:
- a model run over a labelled folder (one sub-folder per class, e.g. `data/prepared/test`);
- an existing predict CSV scored against ground truth, in HAM10000 metadata form
  (`image_id,dx`) or ISIC challenge form (`image,MEL,NV,BCC,AKIEC,BKL,DF,VASC` one-hot), so a
  model can be scored on an external test set without re-running it.

Writes `report.json` (every figure, the model's identity, the data's fingerprint, and a note on
whether the data is truly held out) and PNGs, atomically, into the output folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinclf import __version__
from skinclf.batch.results import probabilities, read_predictions, sidecar_path
from skinclf.config import EVALUATE, EvaluateConfig
from skinclf.data.layout import list_labelled_images, model_path
from skinclf.errors import SkinclfError
from skinclf.evaluation.seen import SeenImages, seen_images, seen_report
from skinclf.files import atomic_write_json, check_output_dir, check_output_files, sha256_file, sha256_text
from skinclf.own_outputs import JSON, PNG
from skinclf.metrics import classification_report

# What evaluate writes into --out.
REPORT_FILES = {"report.json": JSON, "confusion_matrix.png": PNG, "roc.png": PNG, "history.png": PNG,
                "reliability.png": PNG}
ISIC_COLUMNS = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc"}


@dataclass
class Evaluation:
    """A finished evaluation: the report and the files written."""

    report: dict[str, Any]
    out: Path
    files: list[Path] = field(default_factory=list)


def read_truth(path: Path) -> tuple[pd.Series, str]:
    """Ground truth as a Series image_id -> class, and the form it came in ('ham' or 'isic')."""
    path = Path(path)
    if not path.is_file():
        raise SkinclfError(f"truth file not found: {path}")
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise SkinclfError(f"cannot read {path}: {exc}") from None
    if {"image_id", "dx"} <= set(frame.columns):
        truth, form = frame.set_index(frame["image_id"].astype(str))["dx"].astype(str).str.lower(), "ham"
    elif "image" in frame.columns and set(ISIC_COLUMNS) <= set(frame.columns):
        onehot = frame[list(ISIC_COLUMNS)].to_numpy(dtype=float)
        bad = ~np.isclose(onehot.sum(axis=1), 1.0) | ~np.isin(onehot, (0.0, 1.0)).all(axis=1)
        if bad.any():
            raise SkinclfError(f"{path}: row for image {frame['image'].iloc[int(np.argmax(bad))]} is not one-hot")
        labels = np.array(list(ISIC_COLUMNS.values()))[onehot.argmax(axis=1)]
        truth, form = pd.Series(labels, index=frame["image"].astype(str)), "isic"
    else:
        raise SkinclfError(
            f"{path}: unrecognised truth format (columns {', '.join(map(str, frame.columns[:8]))}); expected "
            "HAM10000 metadata (image_id,dx) or ISIC one-hot (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC)"
        )
    if truth.index.duplicated().any():
        raise SkinclfError(f"{path}: image {truth.index[truth.index.duplicated()][0]} is listed twice")
    return truth, form


def provenance(model_meta: dict[str, Any], data: Path) -> dict[str, Any]:
    """Whether `data` is held out from the model's training, judged from the split fingerprints."""
    manifest = data.parent / "prepare.json"
    data_fp = json.loads(manifest.read_text(encoding="utf-8"))["fingerprint"] if manifest.is_file() else None
    model_fp = model_meta.get("data", {}).get("fingerprint")
    split = data.name
    if data_fp and model_fp and data_fp == model_fp:
        note = {
            "test": "held-out test split of the lesion-grouped split the model was trained on: none of its lesions "
                    "was seen in training or used to choose settings",
            "val": "validation split: it chose the best epoch and the settings, so these figures are optimistic",
            "train": "training split: these figures say nothing about new lesions",
        }.get(split, "a folder of the split the model was trained on")
        held_out = split == "test"
    elif data_fp and model_fp:
        note = ("a different split from the model's (other seed, fractions or data): its images may include "
                "lesions the model was trained on, so figures may be inflated")
        held_out = False
    else:
        note = "unknown provenance: make sure no lesion in this folder was in the model's training data"
        held_out = None
    return {"split": split, "data_fingerprint": data_fp, "model_data_fingerprint": model_fp,
            "held_out": held_out, "note": note}


def _write(report: dict[str, Any], out: Path, y_true: np.ndarray, probs: np.ndarray,
           history: list[dict] | None = None) -> list[Path]:
    classes = report["classes"]
    try:
        from skinclf.evaluation.plots import confusion_matrix_png, history_png, reliability_png, roc_png
    except ModuleNotFoundError:  # the light install has no matplotlib: the report, without PNGs
        report["plots"] = 'not drawn: matplotlib is not installed (pip install "skinclf[train]")'
        atomic_write_json(out / "report.json", report)
        return [out / "report.json"]
    files = [confusion_matrix_png(report["confusion_matrix"], classes, out / "confusion_matrix.png")]
    mel = report.get("melanoma", {})
    points = {}
    if mel.get("at_decision"):
        points = {"mel at decision": mel["at_decision"],
                  f"mel at sensitivity {mel['at_target']['target_sensitivity']:g}": mel["at_target"]}
    files.append(roc_png(y_true, probs, classes, out / "roc.png", operating_points=points))
    if history:
        files.append(history_png(history, out / "history.png"))
    if report.get("calibration"):
        files.append(reliability_png({"model": report["calibration"]["reliability"]}, out / "reliability.png",
                                     title="Reliability diagram" + ("" if report["calibration"]["exact"] else
                                                                    " (approximate: top-k columns only)")))
    atomic_write_json(out / "report.json", report)
    return [out / "report.json", *files]


def evaluate_model(
    *,
    model: Path | None = None,
    data: Path = EVALUATE.data,
    out: Path = EVALUATE.out,
    mel_sensitivity: float = EVALUATE.mel_sensitivity,
    batch_size: int = EVALUATE.batch_size,
    workers: int = EVALUATE.workers,
    tta: int = 1,
    split: Path | None = None,
    engine: str = EVALUATE.engine,
    threads: int = EVALUATE.threads,
    metadata: Path | None = None,
) -> Evaluation:
    """Run a model over a labelled folder (with `engine`: auto, keras or onnx) and write the report into `out`.
    With `metadata` (a CSV as `predict --metadata` reads it), the report's `metadata` section has
    the figures with and without the model's metadata head on the same images."""
    from skinclf.batch.patient import join, metadata_head, read_metadata, with_metadata
    from skinclf.engines.load import load_engine
    from skinclf.engines.runner import predict_files
    from skinclf.parallel import decode_workers

    _check_sensitivity(mel_sensitivity)
    if metadata is not None:
        read_metadata(Path(metadata), [])  # the file and its header checked before the model loads
    engine = load_engine(model, engine=engine, batch_size=batch_size, threads=threads or None)
    head = metadata_head(engine) if metadata is not None else None
    data = Path(data)
    images = list_labelled_images(data, classes=tuple(engine.classes))
    rels = [p.relative_to(data).as_posix() for p in images.paths]
    source = read_metadata(Path(metadata), rels) if metadata is not None else None  # the folder's rows only
    joined = join(source, rels) if source is not None else None
    probs_parts, meta_parts, used_parts, unreadable = [], [], [], []
    for batch in predict_files(engine, images.paths, image_size=engine.image_size, batch_size=batch_size,
                               workers=decode_workers(workers), tta=tta):
        probs_parts.append(batch.probs)
        if joined is not None:
            metas = [joined.get(p.relative_to(data).as_posix()) for p in batch.paths]
            fused, used = with_metadata(head, batch.logits, batch.probs, metas, batch.features)
            meta_parts.append(fused)
            used_parts.append(used)
        unreadable += [{"path": str(p), "error": e} for p, e in zip(batch.paths, batch.errors) if e]
    probs = np.concatenate(probs_parts)
    ok = ~np.isnan(probs).any(axis=1)
    if not ok.any():
        raise SkinclfError(f"none of the {len(images.paths)} images in {data} could be read")
    y_true = np.asarray(images.labels)[ok]
    report = {
        "skinclf": __version__,
        **classification_report(y_true, probs[ok], engine.classes, mel_sensitivity=mel_sensitivity),
        "model": engine.identity(),
        "data": {
            "path": str(data),
            "images": len(images.paths),
            "scored": int(ok.sum()),
            "unreadable": unreadable,
            "fingerprint": sha256_text("\n".join(f"{p.parent.name}/{p.name}" for p in images.paths)),
        },
        "provenance": provenance(engine.meta, data),
        "seen": seen_report([p.stem for p, good in zip(images.paths, ok) if good], y_true, probs[ok], engine.classes,
                            seen_images(engine.meta, split=split, near=data.parent), mel_sensitivity=mel_sensitivity),
        "tta": tta,
        "calibration": calibration_section(probs[ok], y_true, exact=True),
    }
    if joined is not None:
        report["metadata"] = metadata_section(y_true, probs[ok], np.concatenate(meta_parts)[ok],
                                              np.concatenate(used_parts)[ok], engine.classes, joined)
    out = Path(out)
    return Evaluation(report, out, _write(report, out, y_true, probs[ok], engine.meta.get("history")))


def _headline(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from skinclf.metrics import balanced_accuracy

    pred = np.argmax(probs, axis=1)
    recall = {c: round(float(np.mean(pred[y_true == i] == i)), 4) for i, c in enumerate(classes) if np.any(y_true == i)}
    out = {"n": int(len(y_true)), "balanced_accuracy": round(float(balanced_accuracy(y_true, pred)), 4),
           "accuracy": round(float(np.mean(pred == y_true)), 4), "recall": recall}
    if "mel" in classes:
        m = classes.index("mel")
        out["melanoma"] = {"sensitivity": recall.get("mel"),
                           "specificity": round(float(np.mean(pred[y_true != m] != m)), 4)}
    return out


def metadata_section(y_true: np.ndarray, image_only: np.ndarray, with_meta: np.ndarray, used: np.ndarray,
                     classes: list[str], joined) -> dict[str, Any]:
    """The figures without and with the metadata head on the same images (all scored images;
    those without metadata have the same answer both ways), and on the images that had metadata."""
    section = {**joined.record(), "images_scored_with_metadata": int(used.sum()),
               "image_only": _headline(y_true, image_only, classes),
               "with_metadata": _headline(y_true, with_meta, classes)}
    if 0 < used.sum() < len(used):
        section["only_images_with_metadata"] = {"image_only": _headline(y_true[used], image_only[used], classes),
                                                "with_metadata": _headline(y_true[used], with_meta[used], classes)}
    return section


def evaluate_predictions(
    *,
    predictions: Path,
    truth: Path,
    out: Path = EVALUATE.out,
    mel_sensitivity: float = EVALUATE.mel_sensitivity,
    model: Path | None = None,
    split: Path | None = None,
) -> Evaluation:
    """Score an existing predict CSV against ground truth; unmatched rows are counted, not dropped.

    The model's metadata (from `model`, else the model the CSV's sidecar names) tells which
    images it was trained or validated on; those are counted and the rest scored on its own."""
    _check_sensitivity(mel_sensitivity)
    frame = read_predictions(predictions)
    truth_series, form = read_truth(truth)
    sidecar = sidecar_path(Path(predictions))
    model_info = json.loads(sidecar.read_text(encoding="utf-8")).get("model") if sidecar.is_file() else None
    stems = frame["path"].map(lambda p: Path(p).stem)
    if stems.duplicated().any():
        raise SkinclfError(f"cannot match by file name: {stems[stems.duplicated()].iloc[0]} appears twice in {predictions}")
    failed = frame["error"] != ""
    has_truth = stems.isin(truth_series.index)
    scored = frame[~failed & has_truth]
    if scored.empty:
        raise SkinclfError(
            f"no prediction in {predictions} matches an image in {truth} (matched by file name without extension, "
            f"e.g. {stems.iloc[0] if len(stems) else '-'})"
        )
    topk_classes = {c for col in frame.columns if col.endswith("_class") for c in frame[col] if c}
    classes = list(model_info["classes"]) if model_info else sorted(topk_classes | set(truth_series))
    classes += sorted(set(truth_series[stems[scored.index]]) - set(classes))  # truths the model cannot name
    probs, exact = probabilities(scored, classes)
    y_true = np.array([classes.index(c) for c in truth_series[stems[scored.index]]])
    no_prediction = sorted(set(truth_series.index) - set(stems))
    report = {
        "skinclf": __version__,
        **classification_report(y_true, probs, classes, mel_sensitivity=mel_sensitivity),
        "model": model_info,
        "matching": {
            "predictions": len(frame),
            "truth": len(truth_series),
            "truth_format": form,
            "scored": len(scored),
            "prediction_errors": int(failed.sum()),
            "no_truth": int((~failed & ~has_truth).sum()),
            "no_prediction": len(no_prediction),
            "examples": {
                "prediction_errors": frame.loc[failed, "path"].head(5).tolist(),
                "no_truth": frame.loc[~failed & ~has_truth, "path"].head(5).tolist(),
                "no_prediction": no_prediction[:5],
            },
        },
        "seen": seen_report(list(stems[scored.index]), y_true, probs, classes,
                            _seen_for_predictions(model, model_info, split), mel_sensitivity=mel_sensitivity),
        "probabilities": "exact (prob_<class> columns)" if exact else
                         "approximate: rebuilt from the top-k columns (run predict with --all-probs for exact AUC)",
        "sources": {"predictions": str(predictions), "truth": str(truth)},
        "calibration": calibration_section(probs, y_true, exact=exact),
    }
    out = Path(out)
    return Evaluation(report, out, _write(report, out, y_true, probs))


def _seen_for_predictions(model: Path | None, model_info: dict | None, split: Path | None) -> SeenImages | None:
    """The training images of the model behind a predictions CSV: `--model`, else the model its
    sidecar names if that file is still the same model."""
    from skinclf.engines.onnx import read_model_meta

    if model is None and model_info and Path(model_info["path"]).is_file():
        if sha256_file(Path(model_info["path"])) == model_info.get("sha256"):
            model = Path(model_info["path"])
    meta = read_model_meta(model) if model is not None else {}
    return seen_images(meta, split=split)


def plot_history(*, model: Path | None = None, out: Path = EVALUATE.out) -> Path:
    """Write the training curves stored in a model bundle as `history.png`."""
    from skinclf.model.bundle_meta import read_bundle_meta

    path = model_path(model)
    meta = read_bundle_meta(path)
    history = meta.get("history") or _first_member_history(meta)
    if not history and meta.get("members"):
        names = ", ".join(str(m.get("path")) for m in meta["members"])
        raise SkinclfError(f"{path} is an ensemble of {len(meta['members'])} networks ({names}) bundled before "
                           "ensembles kept their members' histories; its model card shows their curves "
                           "(models/training_curves.png), or plot a member bundle you have: "
                           "skinclf evaluate --history --model MEMBER.keras")
    if not history:
        raise SkinclfError(f"{path} carries no training history")
    from skinclf.evaluation.plots import history_png

    return history_png(history, Path(out) / "history.png")


def _first_member_history(meta: dict[str, Any]) -> list:
    """An ensemble's curves: those of its first member that kept a history (`skinclf ensemble` stores them)."""
    return next((m["history"] for m in meta.get("members", []) if m.get("history")), [])


def run_evaluation(config: EvaluateConfig | None = None, /, **settings: Any) -> Evaluation:
    """The `evaluate` command (`config`, or its fields as keywords): training curves only
    (`history`), a predictions CSV against `truth`, or the model over the labelled folder `data`.
    Files in `out` that an earlier evaluate did not write are replaced only with `overwrite`."""
    c = config if config is not None else EvaluateConfig(**settings)
    c.validate()
    check_output_dir(Path(c.out))
    check_output_files(Path(c.out), {"history.png": PNG} if c.history else REPORT_FILES, overwrite=c.overwrite)
    if c.history:
        return Evaluation(report={}, out=Path(c.out), files=[plot_history(model=c.model, out=c.out)])
    if c.predictions is not None:
        return evaluate_predictions(predictions=c.predictions, truth=c.truth, out=c.out,
                                    mel_sensitivity=c.mel_sensitivity, model=c.model, split=c.split)
    return evaluate_model(model=c.model, data=c.data, out=c.out, mel_sensitivity=c.mel_sensitivity,
                          batch_size=c.batch_size, tta=c.tta, split=c.split, engine=c.engine, threads=c.threads,
                          metadata=c.metadata)


def calibration_section(probs: np.ndarray, y_true: np.ndarray, *, exact: bool) -> dict[str, Any]:
    """ECE (15 bins), Brier score, NLL and the reliability table; `exact` False when the
    probabilities were rebuilt from top-k columns (Brier and NLL then approximate; ECE, which
    only uses the top-1 probability, is exact)."""
    from skinclf.model.posthoc import calibration_report

    section = {**calibration_report(probs, y_true), "exact": exact}
    if not exact:
        section["note"] = ("approximate: probabilities rebuilt from the top-k columns (the rest spread evenly), so "
                           "Brier and NLL are approximate; ECE uses only the top-1 probability and is exact to 4 "
                           "decimals. Run predict with --all-probs for exact figures")
    return section


def _check_sensitivity(value: float) -> None:
    if not 0 < value < 1:
        raise SkinclfError(f"--mel-sensitivity {value}: must be between 0 and 1, e.g. 0.9")
