"""The Keras engine: a bundle loaded with Keras, batch norms folded, run at its input size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from skinclf.engines.base import Engine
from skinclf.engines.registry import register_engine


class KerasEngine(Engine):
    """The `.keras` bundle on the active Keras backend, batch norms folded: the network up to its
    pooled features, then the numpy head (`model.head`), the same path as the ONNX engine."""

    name = "keras"

    def __init__(self, bundle, *, batch_size: int) -> None:
        super().__init__(meta=bundle.meta, path=bundle.path, sha256=bundle.sha256, batch_size=batch_size)
        from skinclf.model.head import head_of
        from skinclf.model.network import logits_model

        logits = inference_model(logits_model(bundle.model), image_size=bundle.image_size)
        self.model = features_model(logits)
        # A model without global average pooling (tests' tiny graphs): its logits, no features.
        self.head = head_of(bundle.model) if self.model is not None else None
        self.model = self.model or logits

    @classmethod
    def from_model(cls, model, *, batch_size: int, image_size: int | None = None,
                   meta: dict[str, Any] | None = None) -> KerasEngine:
        """An engine around an in-memory Keras model (training's final validation, tests)."""
        from skinclf.model.bundle import Bundle

        n = int(model.outputs[0].shape[-1])
        size = image_size or int(model.inputs[0].shape[1])
        meta = meta or {"classes": [str(i) for i in range(n)], "input_size": [size, size]}
        return cls(Bundle(model=model, meta=meta, path=Path(f"{model.name}.keras")), batch_size=batch_size)

    @property
    def features_dim(self) -> int:
        return self.head.features_dim if self.head is not None else 0

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = np.asarray(self.model.predict_on_batch(x), dtype="float32")
        return (out, None) if self.head is None else (self.head(out), out)


def features_model(model):
    """A model giving the pooled features of `model` (a logits network or an ensemble of them, as
    `inference_model` returns it), or None when it has no global average pooling: the features
    where the (last) GlobalAveragePooling2D is applied ('pool', before dropout and the
    classifier); an ensemble's are its members' side by side, in member order. Works for any
    functional graph (MobileNetV2's residual blocks too): each network is cloned, so its pooling
    layer has one call site to read the output of."""
    from skinclf.backend import load_keras
    from skinclf.model.ensemble_graph import members

    keras = load_keras()
    pooling = keras.layers.GlobalAveragePooling2D

    def pooled(chain):
        clone = keras.models.clone_model(chain)
        clone.set_weights(chain.get_weights())
        pools = [layer for layer in clone.layers if isinstance(layer, pooling)]
        return keras.Model(clone.inputs, pools[-1].output, name=f"{chain.name}_features") if pools else None

    nested = members(model)
    if not nested:
        return pooled(model)
    parts = [pooled(m) for m in nested]
    if any(p is None for p in parts):
        return None
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), name="image")
    features = keras.layers.Concatenate(name="features")([p(inputs) for p in parts])
    return keras.Model(inputs, features, name=f"{model.name}_features")


def keras_available() -> bool:
    """Whether Keras and its backend (KERAS_BACKEND, default TensorFlow) can be imported."""
    import importlib.util
    import os

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    return all(importlib.util.find_spec(m) is not None for m in ("keras", backend))


def inference_model(model, *, image_size: int | None = None):
    """The fastest equivalent of `model` for inference: batch norms folded into convolutions.

    The folded graph is checked against the original on a probe batch; any model that is not
    a plain chain (or folds differently) is returned unchanged.
    """
    from skinclf.model.network import fold_batch_norm

    size = image_size or int(model.inputs[0].shape[1])
    probe = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    try:
        folded = fold_batch_norm(model)
        same = np.allclose(np.asarray(folded.predict_on_batch(probe)), np.asarray(model.predict_on_batch(probe)),
                           atol=1e-4)
    except Exception:  # noqa: BLE001 - not a foldable chain: use the model as it is
        return model
    return folded if same else model


def predictor(model, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function running `model` on one batch through its compiled predict step.

    Batches are padded to `batch_size` so the compiled function sees one shape only (no
    retracing for the last, shorter batch).
    """

    def run(x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        out = model.predict_on_batch(x)
        return np.asarray(out, dtype="float32")[:n]

    return run


@register_engine("keras", suffixes=(".keras",), extra='pip install "skinclf[train]"',
                 available=lambda: keras_available())
def load_keras_engine(path: Path, *, batch_size: int, threads: int | None = None,
                      model_path: Path | None = None) -> KerasEngine:
    """A `.keras` bundle on Keras (`threads` and `model_path` are the ONNX engine's: unused here)."""
    from skinclf.model.bundle import load_bundle

    return KerasEngine(load_bundle(path), batch_size=batch_size)
