"""Runtimes behind one small interface: a batch of images in, logits and probabilities out.

predict, evaluate, serve and explain only ever hold an `Engine`; which runtime runs the
network (Keras on any backend, or ONNX Runtime) is chosen once by `load_engine`.

    engine = load_engine(model_path, engine="auto")
    probs = engine(images)          # (n, classes) probabilities, rows sum to 1
    logits = engine.logits(images)  # (n, classes) the final layer's logits (post-hoc shifts and
                                    # temperature included): softmax(logits) == probs
    logits, features = engine.forward(images)  # the same logits and the pooled features
                                    # (n, engine.features_dim) from the same forward pass

`images` is a float32 array (n, size, size, 3) of RGB values in 0..255, as `images.load_image`
returns them (preprocessing lives inside the model).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from skinclf.model.bundle_meta import ModelInfo
from skinclf.model.posthoc import softmax as _softmax

# The one softmax (`model.posthoc`), in float32 as every engine computes it.
softmax = partial(_softmax, dtype="float32")


class Engine(ModelInfo):
    """A loaded model and what it needs to be used; subclasses implement `_forward` (logits and
    pooled features from one run) or, for logits only, `_logits`."""

    name = "engine"

    def __init__(self, *, meta: dict[str, Any], path: Path, sha256: str, batch_size: int) -> None:
        self.meta = meta
        self.path = Path(path)
        self.sha256 = sha256
        self.batch_size = batch_size

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "engine": self.name}

    @property
    def features_dim(self) -> int:
        """Width of the pooled features `forward` returns; 0 when this model gives none."""
        return 0

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, pooled features) of any number of images from ONE forward pass per batch, in
        batches of `batch_size` (padded to one shape). Features are None when `features_dim` is 0
        (e.g. an ONNX file exported before they existed)."""
        images = np.asarray(images, dtype="float32")
        parts = [self._padded(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        if not parts:
            empty = np.zeros((0, self.features_dim), dtype="float32") if self.features_dim else None
            return np.zeros((0, len(self.classes)), dtype="float32"), empty
        logits = np.concatenate([z for z, _ in parts])
        features = None if parts[0][1] is None else np.concatenate([f for _, f in parts])
        return logits, features

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits for any number of images (the features of the same pass are dropped)."""
        return self.forward(images)[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images))

    def _padded(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # One input shape only: a compiled function never retraces for the last, shorter batch.
        n = len(x)
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        logits, features = self._forward(x)
        return (np.asarray(logits, dtype="float32")[:n],
                None if features is None else np.asarray(features, dtype="float32")[:n])

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self._logits(x), None

    def _logits(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError
