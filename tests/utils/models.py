"""Tiny models built in a test (a Keras bundle, an ONNX file), and ways to interrupt or re-flag them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.synthetic import CLASSES


def make_tiny_bundle(path: Path, *, image_size: int = 32, fingerprint: str | None = None, seed: int = 0,
                     classes: tuple[str, ...] = CLASSES, data: dict | None = None) -> Path:
    """A skinclf bundle around a tiny seeded conv net: fast, and its outputs differ per image."""
    from skinclf.backend import load_keras
    from skinclf.model.bundle import save_bundle
    from skinclf.model.network import PREPROCESSING

    keras = load_keras()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(classes), activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    history = [
        {"epoch": e, "loss": 2.0 / e, "val_loss": 2.2 / e, "top1_accuracy": 0.3 + 0.1 * e,
         "val_top1_accuracy": 0.25 + 0.1 * e, "top2_accuracy": 0.5 + 0.05 * e, "val_top2_accuracy": 0.45 + 0.05 * e,
         "top3_accuracy": 0.6 + 0.05 * e, "val_top3_accuracy": 0.55 + 0.05 * e}
        for e in (1, 2, 3)
    ]
    meta = {"classes": list(classes), "input_size": [image_size, image_size], "preprocessing": PREPROCESSING,
            "data": {"fingerprint": fingerprint, **(data or {})}, "history": history}
    return save_bundle(model, path, meta)


def make_tiny_onnx(path: Path, *, meta: object = None, outputs: int = len(CLASSES), image_size: int = 32) -> Path:
    """A skinclf-style ONNX (input `image` NHWC, outputs `logits` and `probabilities`) of a few
    nodes, written without Keras: mean colour times a fixed matrix. `meta` (any JSON value)
    replaces the usual `skinclf.json` metadata, for tests of malformed models."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(0, 0.05, (3, outputs)).astype("float32")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", image_size, image_size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", outputs])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    if meta is None:
        meta = {"format": "skinclf-bundle/1", "name": "tiny-onnx", "classes": list(CLASSES)[:outputs],
                "input_size": [image_size, image_size], "export": {"format": "onnx", "source_sha256": ""}}
    helper.set_model_props(model, {"skinclf.json": json.dumps(meta)})
    onnx.save(model, str(path))
    return path


def interrupt_after(monkeypatch, batches: int) -> None:
    """Make predict_files raise KeyboardInterrupt (Ctrl-C) after `batches` batches."""
    from skinclf.engines import runner as inference

    real = inference.predict_files

    def interrupted(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == batches:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(inference, "predict_files", interrupted)


def with_ood_record(bundle_path: Path, out: Path, record: dict) -> Path:
    """A copy of a bundle carrying another out-of-distribution record."""
    from skinclf.model.bundle import load_bundle, save_bundle

    bundle = load_bundle(bundle_path)
    return save_bundle(bundle.model, out, {**bundle.meta, "ood": record})


def random_spec(meta: dict, *, features: int = 0, hidden: int = 0, seed: int = 0, temperature: float = 1.3) -> dict:
    """A head with random weights (large enough to change answers), as the fitting tool stores it."""
    from skinclf.model.patient_head import ENCODING_WIDTH, image_model_fingerprint
    from skinclf.training.patient_fit import Fitted, Variant

    rng = np.random.default_rng(seed)
    k = len(meta["classes"])
    inputs = ("metadata", "logits") + (("features",) if features else ())
    width = ENCODING_WIDTH + k + features
    params = {}
    if hidden:
        params.update(W1=rng.normal(0, 0.5, (width, hidden)), b1=rng.normal(0, 0.1, hidden))
    params.update(W=rng.normal(0, 1.0, (hidden or width, k)), b=rng.normal(0, 0.5, k))
    fitted = Fitted(variant=Variant("test", inputs=inputs, hidden=hidden), params=params,
                    feature_center=rng.normal(0, 0.1, features) if features else None,
                    feature_scale=rng.uniform(0.5, 2, features) if features else None, temperature=temperature)
    return fitted.spec(classes=list(meta["classes"]), image_model=image_model_fingerprint(meta),
                       extra={"figures": {"validation": {"image_only": {"balanced_accuracy": 0.5},
                                                         "with_metadata": {"balanced_accuracy": 0.6}}}})
