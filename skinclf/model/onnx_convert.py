"""A small Keras -> ONNX converter for skinclf's chain models (and ensembles of them), built with `onnx.helper`.

skinclf models are plain chains (MobileNet and its head), so converting them is a walk over
the layers, each mapped to one or a few ONNX nodes:

    Rescaling          Mul, Add
    ShadesOfGray       Max, Div, Pow, ReduceMean (H, W), Pow, ReduceMean (C), Max, Div, Mul, Clip
    ZeroPadding2D      Pad
    Conv2D             Conv (TensorFlow 'same' padding made explicit)
    DepthwiseConv2D    Conv with group = channels
    BatchNormalization Mul, Add (those not folded into a convolution)
    ReLU / Activation  Relu, Clip (ReLU6), LeakyRelu
    GlobalAveragePool  GlobalAveragePool, Flatten
    Dropout            nothing (inference)
    Dense              Gemm; the last one's softmax split off

The graph takes `image`, NHWC float32 RGB 0..255 with a dynamic batch (what `images.load_image`
returns), transposes it to NCHW once, and gives three outputs: `logits`, `probabilities`
(= softmax(logits)) and `features`, the global-average-pooled features the classifier reads (an
ensemble's members' side by side), for the out-of-distribution score. Anything else raises SkinclfError naming the layer. The caller
(`skinclf.engines.export`) checks the converted graph against Keras before writing it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from skinclf.errors import SkinclfError

OPSET = 17
SUPPORTED = ("InputLayer", "Rescaling", "ShadesOfGray", "ZeroPadding2D", "Conv2D", "DepthwiseConv2D",
             "BatchNormalization", "ReLU", "Activation", "GlobalAveragePooling2D", "Dropout", "Dense")


class _Graph:
    """Nodes and initializers collected while walking the layers."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base: str, value: Any, dtype: str = "float32") -> str:
        name = self.name(base)
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, output: str | None = None, **attrs: Any) -> str:
        out = output or self.name(base)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=self.name(f"{base}/{op_type}"), **attrs))
        return out


def _activation(g: _Graph, x: str, activation: str, base: str) -> str:
    if activation in ("linear", None):
        return x
    if activation == "relu":
        return g.op("Relu", [x], base)
    if activation == "relu6":
        return g.op("Clip", [x, g.const(base, 0.0), g.const(base, 6.0)], base)
    if activation == "sigmoid":
        return g.op("Sigmoid", [x], base)
    if activation == "tanh":
        return g.op("Tanh", [x], base)
    raise SkinclfError(f"layer {base}: activation {activation!r} has no ONNX form here (linear, relu, relu6, "
                       "sigmoid, tanh; softmax only on the last Dense)")


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow 'same' padding of one spatial axis: the extra pixel goes at the end."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _conv(g: _Graph, x: str, layer, hw: tuple[int, int], *, depthwise: bool) -> tuple[str, tuple[int, int], int]:
    cfg = layer.get_config()
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise SkinclfError(f"layer {layer.name}: only channels_last convolutions are supported")
    weights = [np.asarray(w, dtype="float32") for w in layer.get_weights()]
    kernel = weights[0]
    kh, kw = kernel.shape[:2]
    sh, sw = cfg["strides"]
    dh, dw = cfg["dilation_rate"]
    if depthwise:  # (kh, kw, in, multiplier) -> (in * multiplier, 1, kh, kw), channel c*m + j
        cin, mult = kernel.shape[2], kernel.shape[3]
        w = kernel.reshape(kh, kw, cin * mult).transpose(2, 0, 1)[:, None]
        group, cout = cin, cin * mult
    else:  # (kh, kw, in / groups, out) -> (out, in / groups, kh, kw)
        w = kernel.transpose(3, 2, 0, 1)
        group, cout = int(cfg.get("groups", 1)), kernel.shape[3]
    if cfg["padding"] == "same":
        (top, bottom), (left, right) = _same_pads(hw[0], kh, sh, dh), _same_pads(hw[1], kw, sw, dw)
    elif cfg["padding"] == "valid":
        top = bottom = left = right = 0
    else:
        raise SkinclfError(f"layer {layer.name}: padding {cfg['padding']!r} is not supported (same, valid)")
    inputs = [x, g.const(f"{layer.name}.weight", w)]
    if cfg.get("use_bias", True):
        inputs.append(g.const(f"{layer.name}.bias", weights[1]))
    y = g.op("Conv", inputs, layer.name, kernel_shape=[kh, kw], strides=[sh, sw], dilations=[dh, dw],
             pads=[top, left, bottom, right], group=group)
    out_hw = ((hw[0] + top + bottom - (kh - 1) * dh - 1) // sh + 1, (hw[1] + left + right - (kw - 1) * dw - 1) // sw + 1)
    return _activation(g, y, cfg.get("activation", "linear"), layer.name), out_hw, cout


def _shades_of_gray(g: _Graph, x: str, layer) -> str:
    p = float(layer.power)
    base = layer.name
    x = g.op("Max", [x, g.const(base, 0.0)], base)
    scaled = g.op("Div", [x, g.const(base, 255.0)], base)
    powered = g.op("Pow", [scaled, g.const(base, p)], base)
    mean = g.op("ReduceMean", [powered], base, axes=[2, 3], keepdims=1)
    illuminant = g.op("Pow", [mean, g.const(base, 1.0 / p)], base)
    grey = g.op("ReduceMean", [illuminant], base, axes=[1], keepdims=1)
    gain = g.op("Div", [grey, g.op("Max", [illuminant, g.const(base, 1e-6)], base)], base)
    return g.op("Clip", [g.op("Mul", [x, gain], base), g.const(base, 0.0), g.const(base, 255.0)], base)


def _chain(g: _Graph, model, x: str, hw: tuple[int, int], *, output: str | None) -> tuple[str, str]:
    """Convert one chain model's layers from NCHW input `x`; returns its logits' and pooled
    features' names."""
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    denses = [i for i, layer in enumerate(layers) if type(layer).__name__ == "Dense"]
    if not denses:
        raise SkinclfError("the model has no Dense classifier layer to export")
    flat = False
    logits = features = ""
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        cfg = layer.get_config()
        if kind == "Rescaling":
            x = g.op("Mul", [x, g.const(f"{layer.name}.scale", np.reshape(cfg["scale"], (-1, 1, 1)) if not flat
                                        else cfg["scale"])], layer.name)
            x = g.op("Add", [x, g.const(f"{layer.name}.offset", np.reshape(cfg["offset"], (-1, 1, 1)) if not flat
                                        else cfg["offset"])], layer.name)
        elif kind == "ShadesOfGray":
            x = _shades_of_gray(g, x, layer)
        elif kind == "ZeroPadding2D":
            (top, bottom), (left, right) = cfg["padding"]
            x = g.op("Pad", [x, g.const(layer.name, [0, 0, top, left, 0, 0, bottom, right], "int64")], layer.name,
                     mode="constant")
            hw = (hw[0] + top + bottom, hw[1] + left + right)
        elif kind in ("Conv2D", "DepthwiseConv2D"):
            x, hw, _ = _conv(g, x, layer, hw, depthwise=kind == "DepthwiseConv2D")
        elif kind == "BatchNormalization":
            gamma, beta, mean, var = (np.asarray(w, dtype="float64") for w in layer.get_weights())
            scale = gamma / np.sqrt(var + layer.epsilon)
            shift = beta - mean * scale
            shape_c = (-1,) if flat else (-1, 1, 1)
            x = g.op("Mul", [x, g.const(f"{layer.name}.scale", scale.reshape(shape_c))], layer.name)
            x = g.op("Add", [x, g.const(f"{layer.name}.shift", shift.reshape(shape_c))], layer.name)
        elif kind == "ReLU":
            x = _relu(g, x, layer, cfg)
        elif kind == "Activation":
            x = _activation(g, x, cfg["activation"], layer.name)
        elif kind == "GlobalAveragePooling2D":
            if cfg.get("keepdims"):
                raise SkinclfError(f"layer {layer.name}: GlobalAveragePooling2D(keepdims=True) is not supported")
            x = g.op("Flatten", [g.op("GlobalAveragePool", [x], layer.name)], layer.name, axis=1)
            flat, features = True, x
        elif kind == "Dropout":
            continue
        elif kind == "Dense":
            if not flat:
                raise SkinclfError(f"layer {layer.name}: a Dense layer before global pooling is not supported")
            last = i == denses[-1]
            x = _dense(g, x, layer, cfg, last=last, output=output)
            if last:
                logits = x
                if i != len(layers) - 1:
                    raise SkinclfError(f"layers after the classifier {layer.name} are not supported")
        else:
            raise SkinclfError(f"layer {layer.name} ({kind}) has no ONNX form in skinclf's converter "
                               f"(supported: {', '.join(SUPPORTED[1:])})")
    return logits, features


def _relu(g: _Graph, x: str, layer, cfg: dict) -> str:
    slope, threshold, max_value = cfg.get("negative_slope", 0.0), cfg.get("threshold", 0.0), cfg.get("max_value")
    if threshold:
        raise SkinclfError(f"layer {layer.name}: ReLU with a threshold has no ONNX form here")
    if slope:
        x = g.op("LeakyRelu", [x], layer.name, alpha=float(slope))
        return g.op("Min", [x, g.const(layer.name, float(max_value))], layer.name) if max_value is not None else x
    if max_value is not None:
        return g.op("Clip", [x, g.const(layer.name, 0.0), g.const(layer.name, float(max_value))], layer.name)
    return g.op("Relu", [x], layer.name)


def _dense(g: _Graph, x: str, layer, cfg: dict, *, last: bool, output: str | None) -> str:
    """Gemm; the classifier (`last`) keeps its logits (softmax split off) under `output`."""
    kernel, *bias = (np.asarray(w, dtype="float32") for w in layer.get_weights())
    bias_name = g.const(f"{layer.name}.bias", bias[0] if bias else np.zeros(kernel.shape[1], "float32"))
    if last and cfg["activation"] not in ("softmax", "linear"):
        raise SkinclfError(f"layer {layer.name}: the classifier's activation {cfg['activation']!r} is not softmax")
    y = g.op("Gemm", [x, g.const(f"{layer.name}.weight", kernel), bias_name], layer.name,
             output=output if last else None)
    return y if last else _activation(g, y, cfg["activation"], layer.name)


def _features_width(model, nested: list) -> int:
    """Channels entering the pooling layer(s): the width of the `features` output."""
    def width(chain) -> int:
        pools = [layer for layer in chain.layers if type(layer).__name__ == "GlobalAveragePooling2D"]
        return int(pools[0].output.shape[-1]) if pools else 0

    return sum(width(m) for m in nested) if nested else width(model)


def keras_to_onnx(model, *, doc: str = "", metadata: dict[str, str] | None = None):
    """An `onnx.ModelProto` computing `model` (a skinclf chain, or an ensemble of chains) with
    outputs logits, probabilities and features.

    Pass the model with its batch norms folded (`model.fold_batch_norm`) for the fastest graph;
    unfolded batch norms become Mul/Add. An ensemble (`skinclf ensemble`) becomes each member's
    nodes on the one input, a Mean of their logits and the ensemble's classifier.
    """
    import onnx
    from onnx import TensorProto, helper

    from skinclf.model.ensemble_graph import members

    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[2] != 3 or shape[0] is None or shape[1] is None:
        raise SkinclfError(f"the model's input shape {shape} is not a fixed-size RGB image (height, width, 3)")
    g = _Graph()
    hw = (int(shape[0]), int(shape[1]))
    x = g.op("Transpose", ["image"], "to_nchw", perm=[0, 3, 1, 2])
    nested = members(model)
    if nested:
        chains = [_chain(g, m, x, hw, output=None) for m in nested]
        mean = g.op("Mean", [z for z, _ in chains], "mean_logits")
        head = model.get_layer("predictions")
        logits = _dense(g, mean, head, head.get_config(), last=True, output="logits")
        g.op("Concat", [f for _, f in chains], "features", output="features", axis=1)
    else:
        logits, features = _chain(g, model, x, hw, output="logits")
        g.op("Identity", [features], "features", output="features")
    if not all(f for _, f in (chains if nested else [(logits, features)])):
        raise SkinclfError("the model has no GlobalAveragePooling2D layer to take features from")
    g.op("Softmax", [logits], "softmax", output="probabilities", axis=1)
    n_classes = int(model.outputs[0].shape[-1])
    width = _features_width(model, nested)
    graph = helper.make_graph(
        g.nodes, "skinclf",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", int(shape[0]), int(shape[1]), 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_classes]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        initializer=g.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="skinclf",
                              doc_string=doc)
    proto.ir_version = min(proto.ir_version, 9)  # readable by older ONNX Runtime releases too
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto
