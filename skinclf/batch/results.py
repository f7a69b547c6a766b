"""The predict CSV: its columns, its rows, and reading it back (no Keras needed).

    path,top1_class,top1_name,top1_prob,...,topK_class,topK_prob[,prob_<class>...][,mel_prob],ood_percentile,error,warning

One row per file, `path` relative to the classified folder, probabilities to 4 decimals, an
empty `error` on success. A folder below it that could not be read is a row too (its path ends
in '/'), with an error. `top1_name` spells out the top class (`CLASS_NAMES`), `mel_prob` is the
melanoma probability of every image whenever the model has a `mel` class, and `ood_percentile`
is the share (0-100) of the validation dermoscopic images that are more like the training
images than this one (see `skinclf.model.outlier` and `skinclf.trust.ood`; empty when the model
records no such scale). `warning` holds short cautions about a classified image (far too small
for the model, an unusual image, one very unlike the training images), joined by "; " (see
`warning_cell`); warnings never count as errors. The rows hold nothing else, so the file opens as-is in pandas or a
spreadsheet; the model's identity and the reminder that this is not a diagnosis go in a JSON
sidecar next to it (`results.csv.json`). Every cell is quoted, and a cell a spreadsheet would run
as a formula starts with a single quote (`csv_cell`; `read_predictions` removes it).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from skinclf.errors import SkinclfError

DISCLAIMER = (
    "Model output for decision support by a clinician; not a diagnosis. Probabilities come from a "
    "model trained on HAM10000 dermoscopic images and are not validated for clinical use."
)


WARNING_SEPARATOR = "; "

# What the HAM10000 class abbreviations stand for: the one set of names, used by the CSV's
# `top1_name`, the sidecar, the page (served by /api/model) and the README and model card.
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


# --- CSV cells: the one place that turns a value into what a CSV holds, and back ------------------
# Formula injection (OWASP "CSV Injection"): a spreadsheet runs a cell starting with = + - @, tab
# or carriage return as a formula, and a file name is chosen by whoever made the file. Such a
# cell gets a leading single quote (shown as text, never run), every cell is quoted, and reading
# a CSV back (evaluate --predictions, predict --resume) removes the guard. web/static/page.js (both
# pages' download) mirrors this rule (csvCell); tests/test_hostile.py keeps the two alike.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")  # probabilities and scores are numbers, not formulas
# A file name that is not valid UTF-8 reaches Python with each bad byte as a lone surrogate
# (surrogateescape); UTF-8 cannot hold those, so they are written as \xNN, and backslashes as
# \\, which reads back to the very same name (so --resume recognises the file).
_ESCAPE = re.compile(r"[\\\ud800-\udfff]")
_UNESCAPE = re.compile(r"\\(\\|x[89a-f][0-9a-f]|u[dD][89a-fA-F][0-9a-fA-F]{2})")


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _unescape(match: re.Match) -> str:
    token = match.group(1)
    if token == "\\":
        return "\\"
    return chr(0xDC00 + int(token[1:], 16)) if token[0] == "x" else chr(int(token[1:], 16))


def csv_cell(value: str) -> str:
    """What the CSV holds for `value`: undecodable bytes and backslashes escaped, and a leading
    quote on text a spreadsheet would run as a formula (also on text that already starts with
    quotes before such a character, so that `cell_value` can always tell the guard apart)."""
    text = _ESCAPE.sub(lambda m: _escape(m.group()), value) if _ESCAPE.search(value) else value
    if text.lstrip("'").startswith(FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def cell_value(cell: str) -> str:
    """The value `csv_cell` wrote as `cell`: the inverse, for reading a CSV back."""
    if cell.startswith("'") and cell.lstrip("'").startswith(FORMULA_START):
        cell = cell[1:]
    return _UNESCAPE.sub(_unescape, cell) if "\\" in cell else cell


def write_csv(sink: TextIO, rows: Iterable[Sequence[str]]) -> None:
    """Write rows (header included, if any) as skinclf's CSVs are written: every cell through
    `csv_cell` and quoted, '\\n' line ends."""
    csv.writer(sink, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows([csv_cell(c) for c in r] for r in rows)


def read_csv(text: str) -> list[list[str]]:
    """The rows of a CSV written by `write_csv` (or by an older skinclf), cell values restored."""
    return [[cell_value(c) for c in line] for line in csv.reader(io.StringIO(text, newline="")) if line]


MELANOMA = "mel"


def columns(classes: Sequence[str], top_k: int, all_probs: bool) -> list[str]:
    """The CSV header for a model's classes."""
    cols = ["path"]
    for i in range(1, top_k + 1):
        cols += [f"top{i}_class", *(["top1_name"] if i == 1 else []), f"top{i}_prob"]
    if all_probs:
        cols += [f"prob_{c}" for c in classes]
    if MELANOMA in classes:
        cols.append("mel_prob")
    return [*cols, "ood_percentile", "error", "warning"]


def warning_cell(messages: Iterable[str]) -> str:
    """The `warning` cell: each message on one line, without separators of its own, duplicates
    dropped, joined by "; ". Anything that has a caution about a row (image size, out-of-
    distribution, ...) adds its message to the list passed to `row`."""
    cleaned = (" ".join(m.replace(";", ",").split()) for m in messages)
    return WARNING_SEPARATOR.join(dict.fromkeys(m for m in cleaned if m))


def row(rel_path: str, probs: np.ndarray | None, error: str | None, classes: Sequence[str], top_k: int,
        all_probs: bool, warnings: Iterable[str] = (), *, ood_percentile: float | None = None) -> list[str]:
    """One CSV row; `probs` is None (or ignored) when `error` is set, and so are `warnings` and
    `ood_percentile`."""
    mel = list(classes).index(MELANOMA) if MELANOMA in classes else None
    if error:
        blanks = [""] * (2 * top_k + 1 + (len(classes) if all_probs else 0) + (mel is not None))
        return [rel_path, *blanks, "", " ".join(error.split()), ""]
    order = np.argsort(-probs, kind="stable")[:top_k]  # ties keep class order
    cells = [rel_path]
    for n, i in enumerate(order):
        cells += [classes[i], *([CLASS_NAMES.get(classes[i], classes[i])] if n == 0 else []), f"{probs[i]:.4f}"]
    if all_probs:
        cells += [f"{p:.4f}" for p in probs]
    if mel is not None:
        cells.append(f"{probs[mel]:.4f}")
    where = "" if ood_percentile is None or not np.isfinite(ood_percentile) else f"{ood_percentile:.1f}"
    return [*cells, where, "", warning_cell(warnings)]


def batch_rows(batch, *, names: Sequence[str], classes: Sequence[str], top_k: int, all_probs: bool, ood,
               metas: Sequence | None = None, head=None) -> list[list[str]]:
    """The CSV rows of one `engines.runner.BatchResult`, `names[i]` naming `batch`'s i-th image:
    OOD scores and flags from the same forward pass, warnings, error rows, and with `metas` (one
    `PatientMeta` per image: --metadata) the metadata `head` applied and the `metadata` cell.
    The one place rows are made from model output: predict on this machine, on a cluster's
    workers (`batch.ray`) and in `serve` (`web.classifier`); a new column is added here."""
    from skinclf.batch.patient import metadata_cell, with_metadata
    from skinclf.model.outlier import levels, tier_warning

    _, where, tier = levels(batch.logits, ood, batch.features)  # the image's own logits, before metadata
    probs, cells = batch.probs, [[] for _ in names]
    if metas is not None:
        probs, _ = with_metadata(head, batch.logits, batch.probs, list(metas), batch.features)
        cells = [metadata_cell(meta, error) for meta, error in zip(metas, batch.errors)]
    rows = []
    for name, p, error, notes, pct, level, cell in zip(names, probs, batch.errors, batch.warnings, where, tier, cells):
        notes = [*notes, tier_warning(level)] if level and error is None else notes
        rows.append(row(name, p, error, classes, top_k, all_probs, notes, ood_percentile=pct) + cell)
    return rows


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
        frame = pd.read_csv(path, dtype=object, keep_default_na=False, encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user problem
        raise SkinclfError(f"cannot read {path}: {exc}") from None
    # Formula guards and escapes off: the paths predict saw. Plain Python strings (object), as
    # pandas' Arrow strings cannot hold the surrogates of a name that is not UTF-8.
    for column in frame.columns:
        frame[column] = pd.Series([cell_value(c) for c in frame[column]], index=frame.index, dtype=object)
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
