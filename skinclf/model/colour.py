"""Colour constancy as a Keras layer: the first step of every network skinclf builds (MobileNet and
the distillation student alike), so both import it from here."""

from __future__ import annotations

from typing import Any

from skinclf.backend import load_keras

keras = load_keras()


@keras.saving.register_keras_serializable(package="skinclf")
class ShadesOfGray(keras.layers.Layer):
    """Colour constancy (Shades of Gray, Finlayson & Trezzi 2004) as a layer, on 0-255 RGB.

    Each image's illuminant is estimated per channel as the Minkowski p-norm mean of its
    pixels, e_c = mean(x_c^p)^(1/p), and each channel is scaled by mean(e) / e_c, so a grey
    illuminant leaves the image unchanged and a tinted one is neutralised. Inside the model,
    training, evaluate, predict and every export apply it identically.
    """

    def __init__(self, power: float = 6.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.power = float(power)

    def call(self, x):
        ops = keras.ops
        x = ops.maximum(x, 0.0)
        # Scale to [0, 1] before the power: 255^6 would lose precision in float32.
        illuminant = ops.power(ops.mean(ops.power(x / 255.0, self.power), axis=(1, 2), keepdims=True), 1.0 / self.power)
        gain = ops.mean(illuminant, axis=-1, keepdims=True) / ops.maximum(illuminant, 1e-6)
        return ops.clip(x * gain, 0.0, 255.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "power": self.power}
