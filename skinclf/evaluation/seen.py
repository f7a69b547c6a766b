"""Which images a model was trained or validated on, so `evaluate` never passes off figures on
them as held-out ones.

The bundle records them in its metadata (`data.train_ids` and `data.val_ids`, written by
`split_image_ids` at training time). Bundles made before that carry only the split's
fingerprint and path; their `split.csv` (`image_id,lesion_id,dx,split,path`, written by
`skinclf prepare`) is used instead, from `--split` or where the model says it was trained, and
only if its SHA-256 is the fingerprint the model recorded.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinclf.errors import SkinclfError
from skinclf.files import sha256_text
from skinclf.metrics import classification_report

SPLIT_CSV = "split.csv"


def split_image_ids(train_paths: Iterable[Path], val_paths: Iterable[Path]) -> dict[str, list[str]]:
    """For the bundle metadata's `data`: the ids (file names without extension) of the images
    the model was trained and validated on."""
    return {"train_ids": sorted(Path(p).stem for p in train_paths), "val_ids": sorted(Path(p).stem for p in val_paths)}


@dataclass(frozen=True)
class SeenImages:
    """Image ids of a model's training and validation splits, and where they were read."""

    train: frozenset[str]
    val: frozenset[str]
    source: str


def _from_split_csv(csv: Path, fingerprint: str | None, *, given: bool) -> SeenImages | None:
    text = csv.read_text(encoding="utf-8")
    if fingerprint and sha256_text(text) != fingerprint:
        if given:
            raise SkinclfError(f"--split {csv} is not the split this model was trained on (its SHA-256 is not the "
                               f"model's data fingerprint {fingerprint[:12]}); pass the split.csv of the "
                               "`skinclf prepare` run the model was trained on")
        return None
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str)
        ids = {name: frozenset(frame.loc[frame["split"] == name, "image_id"]) for name in ("train", "val")}
    except (KeyError, ValueError) as exc:
        raise SkinclfError(f"{csv} is not a split.csv from `skinclf prepare` (image_id,lesion_id,dx,split,path): "
                           f"{exc}") from None
    checked = "" if fingerprint else " (not checked: the model records no data fingerprint)"
    return SeenImages(train=ids["train"], val=ids["val"], source=f"{csv}{checked}")


def seen_images(meta: dict[str, Any], *, split: Path | None = None, near: Path | None = None) -> SeenImages | None:
    """The model's training and validation image ids: from its metadata, else from `split`
    (a split.csv or the folder holding one), else from the split.csv where the model was
    trained (or beside `near`, a folder being evaluated) if its fingerprint matches; None if unknown."""
    data = meta.get("data") or {}
    if split is None and "train_ids" in data:
        return SeenImages(frozenset(data["train_ids"]), frozenset(data.get("val_ids", ())), "the model's metadata")
    if split is not None:
        csv = Path(split) / SPLIT_CSV if Path(split).is_dir() else Path(split)
        if not csv.is_file():
            raise SkinclfError(f"--split {split}: no split.csv there (`skinclf prepare` writes it in its --out folder)")
        return _from_split_csv(csv, data.get("fingerprint"), given=True)
    folders = [data.get("path"), (meta.get("training") or {}).get("data"), near]
    for folder in (Path(f) for f in folders if f):
        if (folder / SPLIT_CSV).is_file() and data.get("fingerprint"):
            found = _from_split_csv(folder / SPLIT_CSV, data["fingerprint"], given=False)
            if found:
                return found
    return None


def seen_report(ids: list[str], y_true: np.ndarray, probs: np.ndarray, classes: list[str], seen: SeenImages | None,
                *, mel_sensitivity: float) -> dict[str, Any]:
    """How many scored images the model was trained or validated on, and the figures of the
    held-out rest on their own."""
    if seen is None:
        return {"known": False, "note": "cannot tell which of these images the model was trained on: pass --split "
                                        "with the split.csv of the `skinclf prepare` run it was trained on"}
    ids_array = np.asarray(ids, dtype=object)
    in_train = np.isin(ids_array, list(seen.train))
    in_val = np.isin(ids_array, list(seen.val)) & ~in_train
    held = ~(in_train | in_val)
    out: dict[str, Any] = {"known": True, "source": seen.source, "train": int(in_train.sum()),
                           "val": int(in_val.sum()), "held_out": int(held.sum())}
    if held.all():
        out["note"] = "none of these images was used to train or validate the model"
        return out
    out["note"] = (f"{out['train']} of {len(ids)} scored images were in the model's training split and {out['val']} "
                   "in its validation split: figures over all of them are optimistic")
    if held.any():
        out["held_out_report"] = classification_report(y_true[held], probs[held], classes,
                                                       mel_sensitivity=mel_sensitivity)
    return out
