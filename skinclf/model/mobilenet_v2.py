"""The distillation student: MobileNetV2 1.0 with the project's preprocessing and head, as one flat graph.

image -> [Shades of Gray] -> x/127.5 - 1 -> MobileNetV2 (batch norms frozen) -> pool -> dropout -> predictions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from skinclf.backend import load_keras
from skinclf.errors import SkinclfError
from skinclf.model.colour import ShadesOfGray

keras = load_keras()


def _load_base(weights: str | Path) -> dict[str, list]:
    """Each weighted layer's weights (by name) of MobileNetV2 1.0 without top from a weights file."""
    path = Path(weights)
    if not path.is_file():
        raise SkinclfError(f"weights file not found: {path} (MobileNetV2 1.0/224 without top, .weights.h5)")
    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=1.0, include_top=False, weights=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a partial load must fail, not train a worse model
            base.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - any mismatch is the same user problem
        raise SkinclfError(f"weights file {path} does not fit MobileNetV2 1.0 without top ({exc})") from None
    return {layer.name: layer.get_weights() for layer in base.layers if layer.weights}


def build_student(*, num_classes: int, image_size: int | None = 224, weights: str | Path | None = None,
                  dropout: float = 0.25, seed: int | None = None, colour_constancy: bool = True):
    """MobileNetV2 1.0 with `weights` (a file, or None), preprocessing in front and a new head.

    Every BatchNormalization layer is frozen (inference mode): the offline weights fold the
    batch norms into them (see the weights' README). `image_size` None accepts any square size."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = ShadesOfGray(name="colour_constancy")(inputs) if colour_constancy else inputs
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input shape undefined": no weights are loaded here
        base = keras.applications.MobileNetV2(input_tensor=x, alpha=1.0, include_top=False, weights=None)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(base.outputs[0])
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="skinclf_mobilenet_v2")
    if weights is not None:
        for name, values in _load_base(weights).items():
            model.get_layer(name).set_weights(values)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return model
