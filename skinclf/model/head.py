"""The classifier head as numpy: pooled features in, logits out, one affine map.

Every skinclf model ends in linear layers after global average pooling: a single network's
`predictions` Dense (dropout is the identity at inference), or an ensemble's members' Dense
layers, the mean of their logits and the ensemble's own `predictions` Dense. The post-hoc steps
(prior correction, decision weights, temperature) are folded into that last Dense. So the logits
are `features @ weight + bias`, and the network only needs to compute the pooled features: the
logits, the out-of-distribution score and the metadata head all read the same features of one
forward pass (no second output to fetch, nothing computed twice, in every engine).

The map is composed in float64 from the Keras layers; the ONNX export stores it beside the graph
(`skinclf.head`, base64 float32) so the light install needs no Keras to apply it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import numpy as np

from skinclf.errors import SkinclfError

HEAD_KEY = "skinclf.head"


@dataclass(frozen=True)
class LinearHead:
    """logits = features @ weight + bias; weight (features, classes), bias (classes,)."""

    weight: np.ndarray
    bias: np.ndarray

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype="float32") @ self.weight + self.bias).astype("float32", copy=False)

    @property
    def features_dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def classes(self) -> int:
        return int(self.weight.shape[1])

    def to_json(self) -> str:
        pack = {"format": "float32-le base64", "shape": list(self.weight.shape),
                "weight": base64.b64encode(self.weight.astype("<f4").tobytes()).decode("ascii"),
                "bias": base64.b64encode(self.bias.astype("<f4").tobytes()).decode("ascii")}
        return json.dumps(pack)

    @classmethod
    def from_json(cls, text: str) -> LinearHead:
        try:
            pack = json.loads(text)
            rows, cols = (int(n) for n in pack["shape"])
            weight = np.frombuffer(base64.b64decode(pack["weight"]), dtype="<f4").reshape(rows, cols)
            bias = np.frombuffer(base64.b64decode(pack["bias"]), dtype="<f4").reshape(cols)
        except (ValueError, KeyError, TypeError) as exc:
            raise SkinclfError(f"the model's {HEAD_KEY} record is damaged ({exc}); export the model again") from None
        return cls(weight=weight.astype("float32"), bias=bias.astype("float32"))


def _dense(layer) -> tuple[np.ndarray, np.ndarray]:
    kernel, *bias = (np.asarray(w, dtype="float64") for w in layer.get_weights())
    return kernel, (bias[0] if bias else np.zeros(kernel.shape[1]))


def _chain_head(model) -> tuple[np.ndarray, np.ndarray]:
    """The affine map from a single network's pooled features to its logits: the Dense layers
    after its GlobalAveragePooling2D (dropout is the identity at inference)."""
    names = [type(layer).__name__ for layer in model.layers]
    if "GlobalAveragePooling2D" not in names:
        raise SkinclfError(f"model {model.name} has no global average pooling to take features from")
    weight, bias = None, None
    for layer, kind in zip(model.layers[names.index("GlobalAveragePooling2D") + 1:],
                           names[names.index("GlobalAveragePooling2D") + 1:]):
        if kind == "Dropout":
            continue
        if kind != "Dense" or layer.get_config()["activation"] not in ("linear", "softmax"):
            raise SkinclfError(f"layer {layer.name} ({kind}) after the pooling is not a linear head")
        w, b = _dense(layer)
        weight, bias = (w, b) if weight is None else (weight @ w, bias @ w + b)
    if weight is None:
        raise SkinclfError(f"model {model.name} has no Dense classifier after its pooling")
    return weight, bias


def head_of(model) -> LinearHead:
    """The numpy head of a skinclf Keras model (a single network or an ensemble): the same logits
    as the model's final layer before its softmax, from the features `features_model` gives."""
    from skinclf.backend import load_keras

    keras = load_keras()
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not nested:
        weight, bias = _chain_head(model)
    else:
        parts = [_chain_head(m) for m in nested]
        # mean of the members' logits, then the ensemble's own classifier
        w_mean = np.concatenate([w for w, _ in parts]) / len(parts)
        b_mean = np.mean([b for _, b in parts], axis=0)
        w_head, b_head = _dense(model.get_layer("predictions"))
        weight, bias = w_mean @ w_head, b_mean @ w_head + b_head
    return LinearHead(weight=weight.astype("float32"), bias=bias.astype("float32"))
