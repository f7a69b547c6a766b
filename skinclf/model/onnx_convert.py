"""A small Keras -> ONNX converter for skinclf's networks (and ensembles of them), built with `onnx.helper`.

skinclf networks are graphs of single-input layers (MobileNet's chain) joined by Add
(MobileNetV2's residual blocks), so converting one is a walk over its nodes, input first, each
layer mapped to one or a few ONNX nodes:

    Rescaling          Mul, Add
    ShadesOfGray       Max, Div, Pow, ReduceMean (H, W), Pow, ReduceMean (C), Max, Div, Mul, Clip
    ZeroPadding2D      Pad
    Conv2D             Conv (TensorFlow 'same' padding made explicit)
    DepthwiseConv2D    Conv with group = channels
    BatchNormalization Mul, Add (those not folded into a convolution; folded ones pass through)
    Add                Add
    ReLU / Activation  Relu, Clip (ReLU6), LeakyRelu
    GlobalAveragePool  GlobalAveragePool, Flatten (where the graph ends)

The graph takes `image`, NHWC float32 RGB 0..255 with a dynamic batch (what `images.load_image`
returns), transposes it to NCHW once, and gives one output, `features`: the global-average-pooled
features the classifier reads (an ensemble's members' side by side). The linear head after them
(dropout, the Dense layers, an ensemble's mean and classifier) is one affine map applied in numpy
(`skinclf.model.head`), stored in the file's metadata; the out-of-distribution score and the
metadata head read the same features. Anything else raises SkinclfError naming the layer. The caller
(`skinclf.engines.export`) checks the converted graph against Keras before writing it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from skinclf.errors import SkinclfError

OPSET = 17
SUPPORTED = ("InputLayer", "Rescaling", "ShadesOfGray", "ZeroPadding2D", "Conv2D", "DepthwiseConv2D",
             "BatchNormalization", "FoldedBatchNorm", "ReLU", "Activation", "Add", "GlobalAveragePooling2D")


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
                       "sigmoid, tanh)")


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


def _layer(g: _Graph, layer, x: str, hw: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """One single-input layer's ONNX nodes on NCHW input `x`; its output's name and size."""
    kind = type(layer).__name__
    cfg = layer.get_config()
    if kind == "Rescaling":
        x = g.op("Mul", [x, g.const(f"{layer.name}.scale", np.reshape(cfg["scale"], (-1, 1, 1)))], layer.name)
        return g.op("Add", [x, g.const(f"{layer.name}.offset", np.reshape(cfg["offset"], (-1, 1, 1)))], layer.name), hw
    if kind == "ShadesOfGray":
        return _shades_of_gray(g, x, layer), hw
    if kind == "ZeroPadding2D":
        (top, bottom), (left, right) = cfg["padding"]
        pads = g.const(layer.name, [0, 0, top, left, 0, 0, bottom, right], "int64")
        return g.op("Pad", [x, pads], layer.name, mode="constant"), (hw[0] + top + bottom, hw[1] + left + right)
    if kind in ("Conv2D", "DepthwiseConv2D"):
        y, hw, _ = _conv(g, x, layer, hw, depthwise=kind == "DepthwiseConv2D")
        return y, hw
    if kind == "BatchNormalization":
        gamma, beta, mean, var = (np.asarray(w, dtype="float64") for w in layer.get_weights())
        scale = gamma / np.sqrt(var + layer.epsilon)
        x = g.op("Mul", [x, g.const(f"{layer.name}.scale", scale.reshape(-1, 1, 1))], layer.name)
        return g.op("Add", [x, g.const(f"{layer.name}.shift", (beta - mean * scale).reshape(-1, 1, 1))], layer.name), hw
    if kind == "ReLU":
        return _relu(g, x, layer, cfg), hw
    if kind == "Activation":
        return _activation(g, x, cfg["activation"], layer.name), hw
    if kind in ("FoldedBatchNorm", "Identity"):
        return x, hw
    if kind == "GlobalAveragePooling2D":
        if cfg.get("keepdims"):
            raise SkinclfError(f"layer {layer.name}: GlobalAveragePooling2D(keepdims=True) is not supported")
        return g.op("Flatten", [g.op("GlobalAveragePool", [x], layer.name)], layer.name, axis=1), (1, 1)
    raise SkinclfError(f"layer {layer.name} ({kind}) has no ONNX form in skinclf's converter "
                       f"(supported: {', '.join(SUPPORTED[1:])})")


def _chain(g: _Graph, model, x: str, hw: tuple[int, int]) -> str:
    """Convert one network (a chain like MobileNet, or any graph of single-input layers and Add,
    like MobileNetV2) from NCHW input `x` up to its global average pooling; returns the pooled
    features' name (the head after it runs in numpy: `model.head`)."""
    tensors: dict[int, tuple[str, tuple[int, int]]] = {}
    features = ""
    # Keras numbers a graph's nodes by their distance to the output: deepest first is input first.
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer, kind = node.operation, type(node.operation).__name__
            if kind in ("Dropout", "Dense"):  # the head: numpy
                continue
            inputs = [tensors[id(t)] for t in node.input_tensors]
            if kind == "InputLayer":
                out = (x, hw)
            elif kind == "Add":
                out = (g.op("Add", [name for name, _ in inputs], layer.name), inputs[0][1])
            else:
                out = _layer(g, layer, *inputs[0])
                if kind == "GlobalAveragePooling2D":
                    features = out[0]
            tensors[id(node.outputs[0])] = out
    if not features:
        raise SkinclfError(f"model {model.name} has no GlobalAveragePooling2D layer to take features from")
    return features


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


def keras_to_onnx(model, *, doc: str = "", metadata: dict[str, str] | None = None):
    """An `onnx.ModelProto` computing the pooled features of `model` (a skinclf chain, or an
    ensemble of chains: its members' features side by side), output `features`.

    The head after the pooling is linear (`model.head.head_of`): it is stored beside the graph
    under `skinclf.head` and applied in numpy, so the graph stops at the features. Pass the model
    with its batch norms folded (`fold_batch_norm`) for the fastest graph; unfolded batch norms
    become Mul/Add.
    """
    import onnx
    from onnx import TensorProto, helper

    from skinclf.model.ensemble_graph import members
    from skinclf.model.head import HEAD_KEY, head_of

    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[2] != 3 or shape[0] is None or shape[1] is None:
        raise SkinclfError(f"the model's input shape {shape} is not a fixed-size RGB image (height, width, 3)")
    head = head_of(model)
    g = _Graph()
    hw = (int(shape[0]), int(shape[1]))
    x = g.op("Transpose", ["image"], "to_nchw", perm=[0, 3, 1, 2])
    chains = members(model) or [model]
    pooled = [_chain(g, m, x, hw) for m in chains]
    if len(pooled) > 1:
        g.op("Concat", pooled, "features", output="features", axis=1)
    else:
        g.op("Identity", pooled, "features", output="features")
    graph = helper.make_graph(
        g.nodes, "skinclf",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", int(shape[0]), int(shape[1]), 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", head.features_dim])],
        initializer=g.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="skinclf",
                              doc_string=doc)
    proto.ir_version = min(proto.ir_version, 9)  # readable by older ONNX Runtime releases too
    for key, value in {**(metadata or {}), HEAD_KEY: head.to_json()}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto
