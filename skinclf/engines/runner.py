"""Running an engine over image files: decode in threads while the engine runs the previous batch.

Shared by `predict` (CSV rows), `evaluate` (labelled folders) and `train` (final validation).
Memory stays flat: only `lookahead` decoded batches exist at any time, however many files.
The model is an `engines.Engine` (Keras or ONNX Runtime); this module imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from skinclf.checks import one_of
from skinclf.config import TTA_CHOICES
from skinclf.data.images import ImageError, load_image
from skinclf.parallel import in_background


@dataclass
class BatchResult:
    """One batch of files: probabilities and logits (NaN rows where decoding failed), per-file
    errors, and per-file warnings (the file was classified, but the result deserves caution).

    With test-time augmentation, `probs` is the mean of the views' probabilities, `logits` and
    `features` (the pooled features of the same forward pass; None when the engine gives none)
    the mean of theirs."""

    paths: list[Path]
    probs: np.ndarray
    errors: list[str | None]
    warnings: list[list[str]] = field(default_factory=list)
    logits: np.ndarray | None = None
    features: np.ndarray | None = None


# The dihedral group of the square: flips and quarter turns leave a dermoscopic image a valid
# image of the same lesion, so test-time augmentation averages over the first `tta` of them.
_VIEWS = (
    lambda x: x,
    lambda x: x[:, :, ::-1],
    lambda x: x[:, ::-1],
    lambda x: x[:, ::-1, ::-1],
    lambda x: x.transpose(0, 2, 1, 3),
    lambda x: x.transpose(0, 2, 1, 3)[:, :, ::-1],
    lambda x: x.transpose(0, 2, 1, 3)[:, ::-1],
    lambda x: x.transpose(0, 2, 1, 3)[:, ::-1, ::-1],
)


def with_tta(run: Callable[[np.ndarray], np.ndarray], tta: int) -> Callable[[np.ndarray], np.ndarray]:
    """Average `run` over the first `tta` flips/rotations of each batch (tta=1: no averaging)."""
    one_of("--tta", tta, TTA_CHOICES)
    if tta == 1:
        return run
    return lambda x: np.mean([run(np.ascontiguousarray(view(x))) for view in _VIEWS[:tta]], axis=0)


def _decode(paths: list[Path], image_size: int) -> tuple[list[Path], np.ndarray, list[str | None], list[list[str]]]:
    x = np.zeros((len(paths), image_size, image_size, 3), dtype="float32")
    errors: list[str | None] = [None] * len(paths)
    notes: list[list[str]] = [[] for _ in paths]
    for j, path in enumerate(paths):
        try:
            x[j] = load_image(path, image_size, notes=notes[j])
        except ImageError as exc:
            errors[j] = str(exc)
    return paths, x, errors, notes


def engine_tta(engine, tta: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """A function from a batch to (probabilities, logits, features): the logits averaged over `tta`
    views (probabilities = their softmax, as without TTA; measured on validation, the mean of logits
    scores higher than the mean of probabilities), the features of the un-augmented view only, so the
    out-of-distribution score and flag never depend on `tta` (the threshold was fitted on one view);
    features are None when the engine gives none."""
    from skinclf.engines.base import softmax

    one_of("--tta", tta, TTA_CHOICES)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        outs = [engine.forward(np.ascontiguousarray(view(x))) for view in _VIEWS[:tta]]
        logits = np.mean([np.asarray(z, dtype="float32") for z, _ in outs], axis=0, dtype="float32")
        features = None if outs[0][1] is None else np.asarray(outs[0][1], dtype="float32")
        return softmax(logits), logits, features

    return run


def as_engine(model, *, batch_size: int, image_size: int | None = None):
    """`model` if it is an Engine, else a Keras engine around an in-memory Keras model."""
    from skinclf.engines.base import Engine
    from skinclf.engines.keras import KerasEngine

    if isinstance(model, Engine):
        return model
    return KerasEngine.from_model(model, batch_size=batch_size, image_size=image_size)


def predict_files(
    engine, paths: Sequence[Path], *, image_size: int | None = None, batch_size: int | None = None, workers: int,
    tta: int = 1, optimize: bool = True, features: bool = True,
) -> Iterator[BatchResult]:
    """Yield a BatchResult per `batch_size` files, in order; bad files never stop the stream.

    `engine` is an `engines.Engine` (a Keras model is wrapped in a KerasEngine, batch norms
    folded). Decoding runs in `workers` threads a few batches ahead. `optimize` is kept for
    callers of the Keras-model form; engines are always prepared. Each batch carries the pooled
    features of the same forward pass when the engine gives them (`features` False: dropped).
    """
    batch_size = batch_size or getattr(engine, "batch_size", 16)
    engine = as_engine(engine, batch_size=batch_size, image_size=image_size)
    image_size = image_size or engine.image_size
    run = engine_tta(engine, tta)
    n_classes, width = len(engine.classes), engine.features_dim if features else 0
    tasks = [partial(_decode, list(paths[i : i + batch_size]), image_size) for i in range(0, len(paths), batch_size)]
    for batch_paths, x, errors, notes in in_background(tasks, workers=max(0, workers)):
        ok = [j for j, e in enumerate(errors) if e is None]
        probs = np.full((len(batch_paths), n_classes), np.nan, dtype="float32")
        logits = np.full((len(batch_paths), n_classes), np.nan, dtype="float32")
        feats = np.full((len(batch_paths), width), np.nan, dtype="float32") if width else None
        if ok:
            rows = slice(None) if len(ok) == len(errors) else ok
            p, z, f = run(x if len(ok) == len(errors) else x[ok])
            probs[rows], logits[rows] = p, z
            if feats is not None and f is not None:
                feats[rows] = f
        yield BatchResult(paths=batch_paths, probs=probs, errors=errors, logits=logits, warnings=notes,
                          features=feats)
