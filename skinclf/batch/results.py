"""The predict CSV: its columns, its rows, and reading it back (no Keras needed).

    path,top1_class,top1_prob,...,topK_class,topK_prob[,prob_<class>...],ood_score,error,warning

One row per file, `path` relative to the classified folder, probabilities to 4 decimals, an
empty `error` on success. A folder below it that could not be read is a row too (its path ends
in '/'), with an error. `ood_score` is higher the less an image is like the training images
(see `skinclf.ood`). `warning` holds short cautions about a classified image (far too small for
the model, unlike the training images), joined by "; " (see `warning_cell`); warnings never count
as errors. The rows hold nothing else, so the file opens as-is in pandas or a
spreadsheet; the model's identity and the reminder that this is not a diagnosis go in a JSON
sidecar next to it (`results.csv.json`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from skinclf.errors import SkinclfError

DISCLAIMER = (
    "Model output for decision support by a clinician; not a diagnosis. Probabilities come from a "
    "model trained on HAM10000 dermoscopic images and are not validated for clinical use."
)


WARNING_SEPARATOR = "; "

# What the HAM10000 class abbreviations stand for (as in models/README.md), for the sidecar.
CLASS_NAMES = {
    "akiec": "actinic keratosis / Bowen's disease",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}


def class_names(classes: Sequence[str]) -> dict[str, str]:
    """Each of a model's classes and what it stands for (a class of a custom model: itself)."""
    return {c: CLASS_NAMES.get(c, c) for c in classes}


def columns(classes: Sequence[str], top_k: int, all_probs: bool) -> list[str]:
    """The CSV header for a model's classes."""
    cols = ["path"]
    for i in range(1, top_k + 1):
        cols += [f"top{i}_class", f"top{i}_prob"]
    if all_probs:
        cols += [f"prob_{c}" for c in classes]
    return [*cols, "ood_score", "error", "warning"]


def warning_cell(messages: Iterable[str]) -> str:
    """The `warning` cell: each message on one line, without separators of its own, duplicates
    dropped, joined by "; ". Anything that has a caution about a row (image size, out-of-
    distribution, ...) adds its message to the list passed to `row`."""
    cleaned = (" ".join(m.replace(";", ",").split()) for m in messages)
    return WARNING_SEPARATOR.join(dict.fromkeys(m for m in cleaned if m))


def row(rel_path: str, probs: np.ndarray | None, error: str | None, classes: Sequence[str], top_k: int,
        all_probs: bool, warnings: Iterable[str] = (), *, ood_score: float | None = None) -> list[str]:
    """One CSV row; `probs` is None (or ignored) when `error` is set, and so are `warnings` and
    `ood_score`."""
    if error:
        blanks = [""] * (2 * top_k + (len(classes) if all_probs else 0))
        return [rel_path, *blanks, "", " ".join(error.split()), ""]
    order = np.argsort(-probs, kind="stable")[:top_k]  # ties keep class order
    cells = [rel_path]
    for i in order:
        cells += [classes[i], f"{probs[i]:.4f}"]
    if all_probs:
        cells += [f"{p:.4f}" for p in probs]
    score = "" if ood_score is None or not np.isfinite(ood_score) else f"{ood_score:.4f}"
    return [*cells, score, "", warning_cell(warnings)]


def header_options(header: Sequence[str]) -> dict[str, object]:
    """The predict options a CSV header was written with: top_k, all_probs and the classes."""
    top_k = sum(1 for c in header if c.startswith("top") and c.endswith("_class"))
    probs = [c.removeprefix("prob_") for c in header if c.startswith("prob_")]
    return {"top_k": top_k, "all_probs": bool(probs), "classes": probs}


def sidecar_path(csv_path: Path) -> Path:
    """Where the JSON describing a predictions CSV lives."""
    return csv_path.with_name(csv_path.name + ".json")


def read_predictions(path: Path) -> pd.DataFrame:
    """Read a predict CSV, checking it has the columns predict writes."""
    path = Path(path)
    if not path.is_file():
        raise SkinclfError(f"predictions file not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user problem
        raise SkinclfError(f"cannot read {path}: {exc}") from None
    missing = [c for c in ("path", "top1_class", "top1_prob", "error") if c not in frame.columns]
    if missing:
        raise SkinclfError(f"{path} is not a skinclf predictions CSV (missing {', '.join(missing)})")
    return frame


def probabilities(frame: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, bool]:
    """Class probabilities per row: exact from `prob_<class>` columns (`--all-probs`), else
    rebuilt from the top-k columns with the remaining mass spread evenly (approximate)."""
    prob_cols = [f"prob_{c}" for c in classes]
    if all(c in frame.columns for c in prob_cols):
        return frame[prob_cols].astype(float).to_numpy(), True
    index = {c: i for i, c in enumerate(classes)}
    k = sum(1 for c in frame.columns if c.endswith("_class") and c.startswith("top"))
    out = np.zeros((len(frame), len(classes)))
    for r, record in enumerate(frame.itertuples(index=False)):
        values = record._asdict()
        known = {values[f"top{i}_class"]: float(values[f"top{i}_prob"]) for i in range(1, k + 1)}
        rest = [i for c, i in index.items() if c not in known]
        remainder = max(0.0, 1.0 - sum(known.values()))
        for c, p in known.items():
            if c not in index:
                raise SkinclfError(f"predictions name class {c!r}, which is not among {', '.join(classes)}")
            out[r, index[c]] = p
        if rest:
            out[r, rest] = remainder / len(rest)
    return out, False
