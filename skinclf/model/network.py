"""The network (MobileNet 1.0/224 with a new head) and the model bundle that carries it.

The model is one flat Keras functional graph:

    image (RGB, 0-255) -> preprocess (x/127.5 - 1) -> MobileNet conv1 ... conv_pw_13_relu
                       -> pool -> dropout -> predictions (softmax over the classes)

Preprocessing lives inside the model, so callers only decode and resize. The bundle is a
single `.keras` file with one extra member, `skinclf.json`, holding everything predict and
evaluate need: class names, input size, preprocessing, training settings, the data split's
fingerprint, package versions and the validation metrics it was accepted with.

Counting trainable layers from the top of the MobileNet base (`trainable_layers`):
3 = conv_pw_13 only, 6 = block 13, 13 = blocks 12-13, 19 = 11-13, 25 = 10-13, 31 = 9-13,
37 = 8-13, 43 = 7-13, 50 = 6-13, 56 = 5-13, 63 = 4-13, 85 = the whole base.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from skinclf.backend import load_keras
from skinclf.errors import SkinclfError
from skinclf.model.colour import ShadesOfGray
from skinclf.model.ensemble_graph import ensemble_of, members

keras = load_keras()

BASE_FIRST, BASE_LAST = "conv1", "conv_pw_13_relu"
MIN_TRAINABLE = 3  # conv_pw_13 + its batch norm + relu: the offline weights leave it untrained
BASE_LAYERS = 85  # layers of keras.applications.MobileNet without top, input excluded
# Each architecture's (first, last) base layer and its layer count (input excluded).
ARCHITECTURES = {"mobilenet": (BASE_FIRST, BASE_LAST, BASE_LAYERS), "mobilenetv2": ("Conv1", "out_relu", 153)}
PREPROCESSING = {
    "color": "RGB",
    "decode": "EXIF orientation applied; grayscale, palette, alpha, CMYK and 16-bit converted to 8-bit RGB",
    "resize": "whole image resized (not cropped) to input_size, bilinear with antialiasing (Pillow)",
    "input_range": [0, 255],
    "in_model": "x / 127.5 - 1 (MobileNet scaling, layer 'preprocess')",
}


def _mobilenet(image_size: int | None, alpha: float, weights: str | Path | None):
    """A MobileNet base without its top, with `weights` ('imagenet', a file path, or None).

    `image_size` None builds it for any input size (train small, test large)."""
    shape = (image_size, image_size, 3)
    if weights == "imagenet":
        try:
            return keras.applications.MobileNet(input_shape=shape, alpha=alpha, include_top=False, weights="imagenet")
        except Exception as exc:  # noqa: BLE001 - download or availability failure
            reason = " ".join(str(exc).split())[:200]
            raise SkinclfError(
                f"could not get the ImageNet weights for MobileNet alpha={alpha} {image_size}x{image_size} "
                f"({reason}); with no network, pass --weights PATH to a local weights file"
            ) from None
    base = keras.applications.MobileNet(input_shape=shape, alpha=alpha, include_top=False, weights=None)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise SkinclfError(f"weights file not found: {path} (valid: imagenet, none, or a .weights.h5/.h5 file)")
        try:
            # Keras only warns when part of a file does not match and leaves those layers
            # randomly initialised; that must be an error, not a silently worse model.
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                base.load_weights(str(path))
        except Exception as exc:  # noqa: BLE001 - any mismatch is the same user problem
            reason = " ".join(str(exc).split())[:200]
            raise SkinclfError(
                f"weights file {path} does not fit MobileNet alpha={alpha} without top ({reason})"
            ) from None
    return base


def build_model(
    *,
    num_classes: int,
    image_size: int | None = 224,
    alpha: float = 1.0,
    weights: str | Path | None = "imagenet",
    dropout: float = 0.25,
    seed: int | None = None,
    colour_constancy: bool = False,
    arch: str = "mobilenet",
):
    """MobileNet(alpha, image_size) (or MobileNetV2 1.0) with `weights`, preprocessing in front and a new head.

    `image_size` None accepts any square size (the weights do not depend on it);
    `colour_constancy` puts a Shades of Gray layer before the scaling."""
    if num_classes < 2:
        raise SkinclfError(f"need at least 2 classes to train, found {num_classes}")
    if arch == "mobilenetv2":
        from skinclf.model.mobilenet_v2 import build_student

        if weights == "imagenet":
            raise SkinclfError("--arch mobilenetv2 needs --weights PATH (a MobileNetV2 1.0 .weights.h5) or none")
        return build_student(num_classes=num_classes, image_size=image_size, weights=weights, dropout=dropout,
                             seed=seed, colour_constancy=colour_constancy)
    base = _mobilenet(image_size, alpha, weights)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = ShadesOfGray(name="colour_constancy")(inputs) if colour_constancy else inputs
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(x)
    for layer in base.layers[1:]:  # MobileNet is a plain chain: re-apply its layers in order
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="skinclf_mobilenet")


def base_layer_range(model) -> tuple[int, int]:
    """Indices (in `model.layers`) of the first and last base layers (MobileNet or MobileNetV2)."""
    names = [layer.name for layer in model.layers]
    first, last = next((f, l) for f, l, _ in ARCHITECTURES.values() if f in names)
    return names.index(first), names.index(last)


def check_trainable_layers(trainable_layers: int, n_base: int = BASE_LAYERS) -> None:
    """Raise unless `trainable_layers` is a valid count of top base layers to train."""
    if not MIN_TRAINABLE <= trainable_layers <= n_base:
        raise SkinclfError(
            f"--trainable-layers {trainable_layers}: must be {MIN_TRAINABLE}..{n_base} "
            f"(e.g. 6 = block 13, 13 = blocks 12-13, 43 = blocks 7-13, {n_base} = everything)"
        )


def set_trainable(model, trainable_layers: int) -> int:
    """Freeze the base except its top `trainable_layers` layers (the head always trains).

    Returns the index in `model.layers` of the first trainable layer. Frozen batch-norm layers
    run in inference mode, so the frozen part computes the same thing in training and use.
    """
    first, last = base_layer_range(model)
    check_trainable_layers(trainable_layers, last - first + 1)
    start = last + 1 - trainable_layers
    # MobileNetV2's offline weights fold each batch norm into its convolution (gamma 1, mean 0):
    # training those layers would renormalise with batch statistics, so they stay frozen.
    keep_bn_frozen = model.layers[first].name == ARCHITECTURES["mobilenetv2"][0]
    for i, layer in enumerate(model.layers):
        layer.trainable = i >= start and not (keep_bn_frozen and isinstance(layer, keras.layers.BatchNormalization))
    return start


def split_model(model, start: int):
    """Split a chain model before layer `start` into (frozen prefix, trainable suffix).

    Both share the layer objects (and weights) with `model`: training the suffix trains the
    model. The prefix's outputs are what the feature cache stores.
    """
    def chain(inputs, layers, name):
        # Layers shared with the MobileNet they came from have several call sites, so
        # `layer.output` is ambiguous; re-applying the chain to a fresh input is not.
        x = inputs
        for layer in layers:
            x = layer(x)
        return keras.Model(inputs, x, name=name)

    prefix = chain(keras.Input(tuple(model.inputs[0].shape[1:]), name="image"), model.layers[1:start], "frozen_prefix")
    features = keras.Input(tuple(prefix.outputs[0].shape[1:]), name="features")
    return prefix, chain(features, model.layers[start:], "trainable_suffix")


def _copy(model, *, name: str, **clone_options):
    """A copy of a one-output functional model (any graph: MobileNetV2's residual blocks too) with
    the same weights and one output tensor (clone_model may give a one-element list)."""
    clone = keras.models.clone_model(model, **clone_options)
    clone.set_weights(model.get_weights())
    return keras.Model(clone.inputs, clone.outputs[0], name=name)


def with_input_size(model, image_size: int):
    """A copy of a functional model with a fixed `image_size` input (same layers' weights).

    Models trained at several sizes accept any; the bundle fixes the size predict uses."""
    return _copy(model, name=model.name,
                 input_tensors=keras.Input((image_size, image_size, 3), name=model.inputs[0].name))


def logits_model(model):
    """A copy of a chain model (or an ensemble) that outputs the classifier's logits (softmax left off).

    Shares nothing with `model`; engines apply the softmax themselves, so they can give
    logits (for out-of-distribution scores) and probabilities from one forward pass."""
    nested = members(model)
    if nested:
        return ensemble_of([logits_model(m) for m in nested], model.get_layer("predictions"),
                           name=f"{model.name}_logits", activation="linear")
    if "predictions" not in {layer.name for layer in model.layers}:
        raise SkinclfError(f"model {model.name} has no classifier layer named 'predictions'")

    def clone(layer):
        config = layer.get_config()
        if layer.name == "predictions":
            config["activation"] = "linear"
        return layer.__class__.from_config(config)

    return _copy(model, name=f"{model.name}_logits", clone_function=clone)


def fold_logit_transform(model, *, shift=None, temperature: float = 1.0) -> None:
    """Build `softmax((z + shift) / temperature)` into the classifier, in place.

    z are the classifier's logits; `shift` (one per class) moves decisions (prior correction:
    -tau * log(prior); decision weights: log(w)), `temperature` calibrates confidence without
    changing any decision. Both go into the final Dense layer's kernel and bias, so every
    engine and export carries them with no extra step.
    """
    layer = model.get_layer("predictions")
    kernel, bias = layer.get_weights()
    shift = np.zeros_like(bias) if shift is None else np.asarray(shift, dtype="float64")
    if shift.shape != bias.shape:
        raise SkinclfError(f"{len(shift)} logit shifts for a model of {bias.shape[0]} classes")
    if not temperature > 0:
        raise SkinclfError(f"temperature {temperature}: must be positive")
    layer.set_weights([(kernel / temperature).astype(kernel.dtype), ((bias + shift) / temperature).astype(bias.dtype)])


@keras.saving.register_keras_serializable(package="skinclf")
class FoldedBatchNorm(keras.layers.Layer):
    """Where a batch norm was folded into the convolution before it: passes its input on."""

    def call(self, x, training=None, mask=None):  # the batch norm's call arguments, ignored
        return x


def _folded(conv, bn) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias of convolution `conv` with batch norm `bn` after it folded in
    (kernel scaled by gamma / sqrt(var + eps), a bias added)."""
    gamma, beta, mean, var = (np.asarray(w) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    weights = [np.asarray(w) for w in conv.get_weights()]
    kernel = weights[0]
    if isinstance(conv, keras.layers.DepthwiseConv2D):  # kernel (h, w, channels, multiplier)
        kernel = kernel * scale.reshape(1, 1, kernel.shape[2], kernel.shape[3])
    else:  # kernel (h, w, in, out)
        kernel = kernel * scale.reshape(1, 1, 1, -1)
    return kernel, beta - mean * scale + (weights[1] * scale if conv.use_bias else 0.0)


def _foldable(model) -> dict[str, Any]:
    """Batch norm name -> the convolution it follows, for each batch norm that alone reads a
    convolution's output (so the convolution can absorb it)."""
    conv_types = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    pairs = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and len(layer._inbound_nodes) == 1:
            parent = layer._inbound_nodes[0].input_tensors[0]._keras_history[0]
            if isinstance(parent, conv_types) and len(parent._outbound_nodes) == 1:
                pairs[layer.name] = parent
    return pairs


def fold_batch_norm(model):
    """An inference-only copy of a model (any functional graph: MobileNet's chain, MobileNetV2's
    residual blocks; an ensemble member by member) with each batch norm folded into the
    convolution before it; the batch norm becomes a pass-through (`FoldedBatchNorm`).

    The same function up to float rounding, with 27 fewer operations for MobileNet: about 1.4x
    faster on a CPU. Only for inference: the folded copy cannot be fine-tuned as before.
    """
    nested = members(model)
    if nested:
        return ensemble_of([fold_batch_norm(m) for m in nested], model.get_layer("predictions"),
                           name=f"{model.name}_inference")
    # A fresh copy first: layers shared with another graph (a base re-applied by build_model) have
    # several call sites, and only this graph's consumers may decide what folds.
    model = _copy(model, name=model.name)
    pairs = _foldable(model)
    convs = {conv.name: bn for bn_name, conv in pairs.items() for bn in [model.get_layer(bn_name)]}

    def clone(layer):
        if layer.name in pairs:
            return FoldedBatchNorm(name=layer.name)
        config = layer.get_config()
        if layer.name in convs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        source = model.get_layer(layer.name)
        if layer.name in convs:
            layer.set_weights(list(_folded(source, convs[layer.name])))
        elif layer.weights:
            layer.set_weights(source.get_weights())
    return keras.Model(copy.inputs, copy.outputs[0], name=f"{model.name}_inference")


# --- the bundle ---------------------------------------------------------------------------


