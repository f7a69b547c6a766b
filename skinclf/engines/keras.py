"""The Keras engine: a bundle loaded with Keras, batch norms folded, run at its input size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from skinclf.engines.base import Engine
from skinclf.engines.registry import register_engine


class KerasEngine(Engine):
    """The `.keras` bundle on the active Keras backend, batch norms folded, softmax split off."""

    name = "keras"

    def __init__(self, bundle, *, batch_size: int) -> None:
        super().__init__(meta=bundle.meta, path=bundle.path, sha256=bundle.sha256, batch_size=batch_size)
        from skinclf.model.network import logits_model

        logits = inference_model(logits_model(bundle.model), image_size=bundle.image_size)
        # One model, two outputs: the pooled features come free with the logits' forward pass.
        self.model = with_features(logits) or logits
        self._two = len(self.model.outputs) == 2

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
        return int(self.model.outputs[1].shape[-1]) if self._two else 0

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not self._two:  # a model without global average pooling: logits only
            return np.asarray(self.model.predict_on_batch(x), dtype="float32"), None
        logits, features = self.model.predict_on_batch(x)
        return np.asarray(logits, dtype="float32"), np.asarray(features, dtype="float32")


def with_features(model):
    """A model giving `[logits, features]` from one forward pass of `model` (a logits chain or an
    ensemble of them, as `inference_model` returns it), or None when it has no global average
    pooling: the same layers (weights shared) re-applied to a fresh input, the features taken
    where the (last) GlobalAveragePooling2D is applied ('pool', before dropout and the
    classifier). An ensemble's features are its members' side by side, in member order."""
    from skinclf.backend import load_keras
    from skinclf.model.ensemble_graph import members

    keras = load_keras()
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), name="image")
    nested = members(model)
    if not nested:
        logits, features = _chain_with_features(model, inputs)
        return None if features is None else keras.Model(inputs, [logits, features], name=f"{model.name}_features")
    pairs = []
    for m in nested:  # each member its own sub-model: members' layers share names
        own = keras.Input(tuple(m.inputs[0].shape[1:]), name="image")
        logits, features = _chain_with_features(m, own)
        if features is None:
            return None
        pairs.append(keras.Model(own, [logits, features], name=m.name)(inputs))
    mean = keras.layers.Average(name="mean_logits")([z for z, _ in pairs])
    logits = model.get_layer("predictions")(mean)
    features = keras.layers.Concatenate(name="features")([f for _, f in pairs])
    return keras.Model(inputs, [logits, features], name=f"{model.name}_features")


def _chain_with_features(model, x):
    # Re-applying the layers (not `layer.output`): a layer shared by several graphs has several
    # call sites, and its `.output` would name the wrong one.
    from skinclf.backend import load_keras

    pooling = load_keras().layers.GlobalAveragePooling2D
    features = None
    for layer in model.layers[1:]:
        x = layer(x)
        if isinstance(layer, pooling):
            features = x
    return x, features


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
