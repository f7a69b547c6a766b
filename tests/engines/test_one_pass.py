"""One pass: every engine computes the pooled features once, and the logits come from the numpy head.

The head (`model.head`) is the affine map after the pooling (a network's classifier, or an
ensemble's members' classifiers, their mean and its own classifier, post-hoc steps folded in); the
ONNX graph ends at the features; Keras, ONNX float and int8 give the same features and logits.
"""

from __future__ import annotations

import numpy as np
import pytest


def _member(path, seed: int, *, classes=("a", "b", "c")):
    from skinclf.backend import load_keras
    from skinclf.model.bundle import save_bundle

    keras = load_keras()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv1")(x)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    x = keras.layers.ReLU(6.0, name="conv1_relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="conv_dw_1")(x)
    x = keras.layers.ReLU(6.0, name="conv_dw_1_relu")(x)
    x = keras.layers.Conv2D(16, 1, name="conv_pw_1")(x)
    x = keras.layers.ReLU(6.0, name="conv_pw_1_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    outputs = keras.layers.Dense(len(classes), activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name=f"m{seed}")
    rng = np.random.default_rng(seed)
    bn = model.get_layer("conv1_bn")
    bn.set_weights([rng.uniform(0.5, 2, 8), rng.normal(0, 1, 8), rng.normal(0, 1, 8), rng.uniform(0.5, 2, 8)])
    return save_bundle(model, path, {"name": path.stem, "classes": list(classes), "input_size": [32, 32]})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from skinclf.training.ensemble import ensemble_bundles

    folder = tmp_path_factory.mktemp("one_pass")
    members = [_member(folder / f"m{i}.keras", i) for i in range(2)]
    ensemble_bundles(members=members, out=folder / "e.keras")
    return folder


def _images(n: int = 6, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


@pytest.mark.parametrize("name", ["m0.keras", "e.keras"])
def test_the_numpy_head_equals_the_framework_logits(pair, name) -> None:
    from skinclf.engines.keras import features_model
    from skinclf.model.bundle import load_bundle
    from skinclf.model.head import head_of
    from skinclf.model.network import logits_model

    model = load_bundle(pair / name).model
    logits = logits_model(model)
    x = _images()
    expected = np.asarray(logits.predict_on_batch(x), dtype="float64")
    features = np.asarray(features_model(logits).predict_on_batch(x))
    got = head_of(model)(features)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_head_survives_its_json_form(pair) -> None:
    from skinclf.model.bundle import load_bundle
    from skinclf.model.head import LinearHead, head_of

    head = head_of(load_bundle(pair / "e.keras").model)
    back = LinearHead.from_json(head.to_json())
    assert np.array_equal(back.weight, head.weight) and np.array_equal(back.bias, head.bias)
    assert head.features_dim == 32 and head.classes == 3  # two members' 16 features side by side


def test_a_damaged_head_record_is_one_line() -> None:
    from skinclf.errors import SkinclfError
    from skinclf.model.head import LinearHead

    with pytest.raises(SkinclfError, match="damaged"):
        LinearHead.from_json('{"shape": [2, 2], "weight": "AAAA", "bias": ""}')


def test_the_onnx_graph_ends_at_the_features_and_every_engine_agrees(pair, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from skinclf.engines.export import export_model
    from skinclf.engines.load import load_engine

    export_model(model=pair / "e.keras", format="onnx", out=tmp_path / "e.onnx")
    graph = onnx.load(str(tmp_path / "e.onnx")).graph
    assert [o.name for o in graph.output] == ["features"]
    assert not [n for n in graph.node if n.op_type in ("Gemm", "MatMul", "Softmax")]  # the head is numpy
    x = _images(9)
    keras_engine = load_engine(pair / "e.keras", engine="keras", batch_size=4)
    onnx_engine = load_engine(tmp_path / "e.onnx", engine="onnx", batch_size=4)
    (zk, fk), (zo, fo) = keras_engine.forward(x), onnx_engine.forward(x)
    np.testing.assert_allclose(fo, fk, atol=1e-4)
    np.testing.assert_allclose(zo, zk, atol=1e-4)
    np.testing.assert_allclose(onnx_engine(x), keras_engine(x), atol=1e-5)


def test_float_nodes_keep_the_first_convolutions_of_every_member(pair, tmp_path) -> None:
    pytest.importorskip("onnx")
    import onnx

    from skinclf.engines.export import float_onnx
    from skinclf.engines.int8 import float_nodes
    from skinclf.model.bundle import load_bundle

    data = float_onnx(load_bundle(pair / "e.keras"))
    nodes = {n.name: n for n in onnx.load_from_string(data).graph.node}
    convs = [name for name, n in nodes.items() if n.op_type == "Conv"]
    assert len(convs) == 6  # three per member
    kept = float_nodes(data, 1)
    kept_convs = [name for name in kept if nodes[name].op_type == "Conv"]
    assert kept_convs == [convs[0], convs[3]]  # each member's first convolution
    assert any(nodes[name].op_type == "Transpose" for name in kept)  # the input's preprocessing stays float
    assert [name for name in float_nodes(data, 0) if nodes[name].op_type == "Conv"] == []


def test_a_residual_network_folds_and_exports_like_a_chain(tmp_path) -> None:
    """MobileNetV2-style blocks (Conv-BN-ReLU6 with an Add around them): batch norms fold, the
    converter walks the graph, and the ONNX features and logits equal Keras'."""
    pytest.importorskip("onnxruntime")
    from skinclf.backend import load_keras
    from skinclf.engines.export import export_model
    from skinclf.engines.load import load_engine
    from skinclf.model.bundle import save_bundle

    keras = load_keras()
    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="Conv1")(x)
    x = keras.layers.BatchNormalization(name="bn_Conv1")(x)
    block = keras.layers.ReLU(6.0, name="Conv1_relu")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="block_1_depthwise")(block)
    y = keras.layers.BatchNormalization(name="block_1_depthwise_BN")(y)
    y = keras.layers.ReLU(6.0, name="block_1_depthwise_relu")(y)
    y = keras.layers.Conv2D(8, 1, use_bias=False, name="block_1_project")(y)
    y = keras.layers.BatchNormalization(name="block_1_project_BN")(y)
    x = keras.layers.Add(name="block_1_add")([block, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="residual")
    rng = np.random.default_rng(2)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 1, n), rng.normal(0, 1, n), rng.uniform(0.5, 2, n)])
    save_bundle(model, tmp_path / "r.keras", {"name": "r", "classes": ["a", "b", "c"], "input_size": [32, 32]})
    export_model(model=tmp_path / "r.keras", format="onnx", out=tmp_path / "r.onnx")
    x = _images(5)
    keras_engine = load_engine(tmp_path / "r.keras", engine="keras", batch_size=4)
    onnx_engine = load_engine(tmp_path / "r.onnx", engine="onnx", batch_size=4)
    np.testing.assert_allclose(onnx_engine.forward(x)[1], keras_engine.forward(x)[1], atol=1e-4)
    np.testing.assert_allclose(onnx_engine.logits(x), np.log(np.asarray(model.predict_on_batch(x)))
                               - np.log(np.asarray(model.predict_on_batch(x))).mean(1, keepdims=True)
                               + onnx_engine.logits(x).mean(1, keepdims=True), atol=1e-4)


def test_auto_runs_the_int8_form_where_it_was_exported_and_float_is_one_option_away(pair, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import shutil

    from skinclf.engines.export import export_model
    from skinclf.engines.load import load_engine
    from skinclf.errors import SkinclfError

    bundle = tmp_path / "e.keras"
    shutil.copy(pair / "e.keras", bundle)
    export_model(model=bundle, format="onnx", out=tmp_path / "e.onnx")
    assert load_engine(bundle).format == "onnx"  # no int8 form: the float one
    with pytest.raises(SkinclfError, match=r"no up-to-date onnx-int8 form .*--format onnx-int8"):
        load_engine(bundle, engine="onnx-int8")
    calib = tmp_path / "calib"
    from PIL import Image

    for label in ("a", "b", "c"):
        (calib / label).mkdir(parents=True)
        for i, image in enumerate(_images(8, seed=ord(label))):
            Image.fromarray(image.astype("uint8")).save(calib / label / f"{i}.png")
    export_model(model=bundle, format="onnx-int8", out=tmp_path / "e.int8.onnx", calibration=calib,
                 validation=calib, min_agreement=0.0)
    auto = load_engine(bundle)
    assert auto.format == "onnx-int8" and auto.onnx_path.name == "e.int8.onnx"
    assert load_engine(bundle, engine="onnx").format == "onnx"
    assert load_engine(bundle, engine="onnx-int8").format == "onnx-int8"
    x = _images(6)
    assert auto(x).shape == (6, 3) and np.allclose(auto(x).sum(1), 1, atol=1e-5)
