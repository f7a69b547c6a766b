"""`skinclf export`: each format round-trips, broken exports are refused, and the ONNX carries its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from utils.synthetic import lesion_image, CLASSES, CLASS_COLOURS

from skinclf.cli import app
from skinclf.errors import SkinclfError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _mobilenet_bundle(path: Path, *, colour_constancy: bool) -> Path:
    """A tiny MobileNet (alpha 0.25, 64x64) with non-trivial batch norms, saved as a bundle."""
    from skinclf.backend import load_keras
    from skinclf.model.bundle import save_bundle
    from skinclf.model.network import PREPROCESSING, build_model

    keras = load_keras()
    keras.utils.set_random_seed(1)
    model = build_model(num_classes=7, image_size=64, alpha=0.25, weights=None, colour_constancy=colour_constancy)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.2, b.shape),
                               rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 1.5, v.shape)])
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([kernel * 20, rng.normal(0, 1, bias.shape)])  # spread the outputs
    meta = {"classes": list(CLASSES), "input_size": [64, 64], "preprocessing": PREPROCESSING,
            "metrics": {"validation": {"balanced_accuracy": 0.5}}, "ood": {"threshold": -3.5}}
    return save_bundle(model, path, meta)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "colour-constancy"])
def mobilenet_bundle(request, tmp_path_factory) -> Path:
    return _mobilenet_bundle(tmp_path_factory.mktemp("mn") / "mn.keras", colour_constancy=request.param)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A labelled folder (one sub-folder per class) of synthetic lesions, for int8 calibration."""
    root = tmp_path_factory.mktemp("labelled")
    for i, name in enumerate(CLASSES):
        (root / name).mkdir()
        for j in range(4):
            lesion_image(CLASS_COLOURS[name], 100 * i + j, size=(80, 64)).save(root / name / f"{name}_{j}.jpg")
    return root


def _keras_probs(path: Path, x: np.ndarray) -> np.ndarray:
    from skinclf.model.bundle import load_bundle

    return np.asarray(load_bundle(path).model.predict_on_batch(x))


def test_onnx_export_matches_keras_and_carries_all_metadata(mobilenet_bundle, tmp_path) -> None:
    from skinclf.engines.export import export_model, probe_images
    from skinclf.engines.onnx import OnnxEngine
    from skinclf.files import sha256_file
    from skinclf.model.bundle_meta import read_bundle_meta

    result = export_model(model=mobilenet_bundle, format="onnx", out=tmp_path / "m.onnx")
    assert result.out.is_file() and result.max_abs_diff <= 1e-4
    engine = OnnxEngine(result.out, batch_size=4)
    x = probe_images(64, count=6) * np.array([1.0, 0.6, 0.3], dtype="float32")  # a colour cast, too
    assert np.abs(engine(x) - _keras_probs(mobilenet_bundle, x)).max() <= 1e-4
    meta = engine.meta
    source = read_bundle_meta(mobilenet_bundle)
    for key, value in source.items():  # the whole bundle metadata, including keys skinclf does not know yet
        assert meta[key] == json.loads(json.dumps(value))
    assert meta["ood"] == {"threshold": -3.5}
    assert meta["export"]["source_sha256"] == sha256_file(mobilenet_bundle) == engine.identity()["sha256"]
    assert engine.classes == list(CLASSES) and engine.image_size == 64
    names = [o.name for o in engine.session.get_outputs()]
    assert names == ["logits", "probabilities", "features"]  # features: the pooled features, for the OOD score
    assert engine.session.get_inputs()[0].shape[0] == "batch"  # any batch size
    assert engine(x[:1]).shape == (1, 7) and engine(x).shape == (6, 7)


def test_int8_export_reports_agreement_and_is_refused_below_the_floor(mobilenet_bundle, labelled, tmp_path) -> None:
    from skinclf.engines.export import export_model
    from skinclf.engines.onnx import OnnxEngine

    result = export_model(model=mobilenet_bundle, format="onnx-int8", out=tmp_path / "m.int8.onnx",
                          calibration=labelled, validation=labelled, min_agreement=0.0)
    assert result.out.is_file() and 0.0 <= result.top1_agreement <= 1.0
    assert set(result.validation["float"]) >= {"balanced_accuracy", "mel_recall"}
    engine = OnnxEngine(result.out, batch_size=4)
    assert engine.meta["export"]["format"] == "onnx-int8" and engine.meta["export"]["calibration"]["images"] == 28
    assert any(n.op_type == "QuantizeLinear" for n in __import__("onnx").load(str(result.out)).graph.node)

    refused = tmp_path / "refused.int8.onnx"
    with pytest.raises(SkinclfError, match="nothing written"):
        export_model(model=mobilenet_bundle, format="onnx-int8", out=refused, calibration=labelled,
                     validation=labelled, min_agreement=1.01)
    assert not refused.exists()


def test_int8_without_calibration_images_says_what_to_pass(tiny_bundle, tmp_path) -> None:
    from skinclf.engines.export import export_model

    with pytest.raises(SkinclfError, match="--calibration .*data/prepared/train"):
        export_model(model=tiny_bundle, format="onnx-int8", out=tmp_path / "t.onnx", calibration=tmp_path / "none")


@pytest.mark.slow
def test_tflite_export_matches_keras(tmp_path) -> None:
    pytest.importorskip("tensorflow")
    from skinclf.engines.export import _tflite_bytes, export_model, probe_images
    from skinclf.model.bundle import load_bundle
    from skinclf.model.network import fold_batch_norm, logits_model

    bundle = _mobilenet_bundle(tmp_path / "cc.keras", colour_constancy=True)
    result = export_model(model=bundle, format="tflite", out=tmp_path / "m.tflite")
    assert result.out.stat().st_size > 10_000 and result.max_abs_diff <= 1e-4
    _, run = _tflite_bytes(fold_batch_norm(logits_model(load_bundle(bundle).model)))
    x = probe_images(64, count=4)
    assert np.abs(run(x) - _keras_probs(bundle, x)).max() <= 1e-4


def test_a_broken_export_is_refused_and_nothing_is_written(monkeypatch, tiny_bundle, tmp_path) -> None:
    from skinclf.engines import export

    real = export._keras_logits

    def broken(bundle):  # a converter bug: one weight off
        model = real(bundle)
        layer = model.get_layer("predictions")
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, bias + np.eye(1, len(bias), 2, dtype=bias.dtype)[0]])
        return model

    monkeypatch.setattr(export, "_keras_logits", broken)
    out = tmp_path / "broken.onnx"
    with pytest.raises(SkinclfError, match=r"does not match the Keras model .*nothing written"):
        export.export_model(model=tiny_bundle, format="onnx", out=out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unsupported_layer_is_named(tmp_path) -> None:
    from skinclf.backend import load_keras
    from skinclf.engines.export import export_model
    from skinclf.model.bundle import save_bundle

    keras = load_keras()
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.MaxPooling2D(name="maxpool")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(7, activation="softmax", name="predictions")(x)
    path = save_bundle(keras.Model(inputs, outputs), tmp_path / "odd.keras",
                       {"classes": list(CLASSES), "input_size": [16, 16]})
    with pytest.raises(SkinclfError, match="maxpool .*MaxPooling2D.*supported"):
        export_model(model=path, format="onnx", out=tmp_path / "odd.onnx")


def test_export_cli_writes_a_checked_onnx(runner, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "exported" / "tiny.onnx"
    result = runner.invoke(app, ["export", str(tiny_bundle), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Wrote {out}" in result.output and "max abs difference" in result.output
    assert out.is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--format", "tfjs"], "--format tfjs is not available"),
        (["--format", "coreml"], "choose one of onnx, onnx-int8, tflite, tfjs"),
        (["--out", "{model}"], "would overwrite the model"),
    ],
)
def test_export_cli_failures_are_one_line(runner, tiny_bundle, tmp_path, args, needle) -> None:
    argv = [a.format(model=tiny_bundle) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.onnx")]
    result = runner.invoke(app, ["export", str(tiny_bundle), *argv])
    assert result.exit_code == 1
    assert result.output.count("Error:") == 1 and needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_export_help_has_examples(runner) -> None:
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0
    assert "skinclf export models/skinclf-mobilenet.keras --format onnx" in result.output
    assert "tfjs" in result.output
