"""Predict CSVs written by hand (`results.columns` and `results.row`), for tests that score them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from skinclf.batch.results import columns, row
from utils.synthetic import CLASSES


def write_predictions(path: Path, entries: list[tuple[str, np.ndarray | None, str | None]], all_probs: bool) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns(CLASSES, 3, all_probs))
        for name, probs, error in entries:
            writer.writerow(row(name, probs, error, CLASSES, 3, all_probs))
    return path


def one_hot_probs(cls: str, confidence: float = 0.7) -> np.ndarray:
    p = np.full(len(CLASSES), (1 - confidence) / (len(CLASSES) - 1))
    p[CLASSES.index(cls)] = confidence
    return p
