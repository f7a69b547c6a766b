"""Engines: which runtime `--engine auto` picks, clear errors, Keras and ONNX agreeing, light imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from utils.models import make_tiny_bundle
from utils.paths import require, BUNDLED_MODEL, REPO, SHARED_FULLRES
from utils.synthetic import lesion_image, CLASSES

from skinclf.cli import app
from skinclf.errors import SkinclfError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """A tiny bundle with its up-to-date ONNX form beside it."""
    from skinclf.engines.export import export_model

    d = tmp_path_factory.mktemp("pair")
    bundle = make_tiny_bundle(d / "m.keras", seed=3)
    export_model(model=bundle, format="onnx", out=d / "m.onnx")
    return bundle


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    for i in range(11):
        lesion_image((20 * i, 200 - 15 * i, 90), i).save(d / f"img_{i:02d}.jpg")
    return d


def test_auto_picks_onnx_when_an_up_to_date_form_is_beside(pair) -> None:
    from skinclf.engines.load import load_engine

    engine = load_engine(pair)
    assert engine.name == "onnx" and engine.path == pair and engine.identity()["onnx"].endswith("m.onnx")


def test_auto_picks_keras_without_an_onnx_form(tiny_bundle) -> None:
    from skinclf.engines.load import load_engine

    assert not tiny_bundle.with_suffix(".onnx").exists()
    assert load_engine(tiny_bundle).name == "keras"


def test_a_stale_onnx_form_is_not_used(pair, tmp_path) -> None:
    from skinclf.engines.load import load_engine

    other = make_tiny_bundle(tmp_path / "m.keras", seed=4)  # another model, same name
    (tmp_path / "m.onnx").write_bytes(pair.with_suffix(".onnx").read_bytes())
    assert load_engine(other).name == "keras"
    with pytest.raises(SkinclfError, match=r"exported from another version .*skinclf export .*--format onnx"):
        load_engine(other, engine="onnx")


def test_explicit_onnx_without_onnxruntime_is_a_clear_error(monkeypatch, pair) -> None:
    from skinclf.engines.load import load_engine
    from skinclf.engines import onnx as onnx_engine

    monkeypatch.setattr(onnx_engine, "onnxruntime_available", lambda: False)
    with pytest.raises(SkinclfError, match="--engine onnx needs ONNX Runtime.*pip install onnxruntime"):
        load_engine(pair, engine="onnx")
    assert load_engine(pair).name == "keras"  # auto falls back


def test_no_onnx_form_and_no_tensorflow_names_both_ways_out(monkeypatch, tiny_bundle) -> None:
    from skinclf.engines import load as engines

    monkeypatch.setattr(engines, "keras_available", lambda: False)
    with pytest.raises(SkinclfError, match=r'skinclf export .*--format onnx.*pip install "skinclf\[train\]"'):
        engines.load_engine(tiny_bundle)
    with pytest.raises(SkinclfError, match=r'--engine keras needs TensorFlow.*pip install "skinclf\[train\]"'):
        engines.load_engine(tiny_bundle, engine="keras")


def test_onnx_file_with_engine_keras_and_unknown_engine_are_refused(pair) -> None:
    from skinclf.engines.load import load_engine

    with pytest.raises(SkinclfError, match="--engine keras runs a .keras bundle"):
        load_engine(pair.with_suffix(".onnx"), engine="keras")
    with pytest.raises(SkinclfError, match="choose one of auto, keras, onnx"):
        load_engine(pair, engine="tensorrt")


def test_an_onnx_file_that_is_not_a_skinclf_export(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from skinclf.engines.load import load_engine

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(SkinclfError, match="not a skinclf export .*skinclf export"):
        load_engine(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_text("junk")
    with pytest.raises(SkinclfError, match="cannot load ONNX model"):
        load_engine(tmp_path / "junk.onnx")


@pytest.mark.parametrize("tta", [1, 4])
def test_keras_and_onnx_engines_agree_through_predict_files(pair, images, tta) -> None:
    from skinclf.engines.base import softmax
    from skinclf.engines.load import load_engine
    from skinclf.engines.runner import predict_files

    paths = sorted(images.iterdir())
    out = {}
    for name in ("keras", "onnx"):
        engine = load_engine(pair, engine=name, batch_size=4)
        batches = list(predict_files(engine, paths, workers=2, tta=tta))
        out[name] = (np.concatenate([b.probs for b in batches]), np.concatenate([b.logits for b in batches]))
    assert np.abs(out["keras"][0] - out["onnx"][0]).max() <= 1e-4
    assert np.abs(out["keras"][1] - out["onnx"][1]).max() <= 1e-4
    if tta == 1:
        assert np.allclose(softmax(out["onnx"][1]), out["onnx"][0], atol=1e-6)


def test_predict_cli_engines_give_the_same_csv(runner, pair, images, tmp_path) -> None:
    frames = {}
    for name in ("keras", "onnx"):
        out = tmp_path / f"{name}.csv"
        result = runner.invoke(app, ["predict", str(images), "--out", str(out), "--model", str(pair),
                                     "--engine", name, "--all-probs", "--threads", "1"])
        assert result.exit_code == 0, result.output
        assert f"({name} engine)" in result.output
        frames[name] = pd.read_csv(out)
        assert json.loads((tmp_path / f"{name}.csv.json").read_text())["model"]["engine"] == name
    cols = [f"prob_{c}" for c in CLASSES]
    assert np.abs(frames["keras"][cols].to_numpy() - frames["onnx"][cols].to_numpy()).max() <= 1e-4
    assert (frames["keras"]["top1_class"] == frames["onnx"]["top1_class"]).all()


def test_predict_cli_engine_failure(runner, tiny_bundle, images, tmp_path) -> None:
    result = runner.invoke(app, ["predict", str(images), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_bundle),
                                 "--engine", "onnx"])
    assert result.exit_code == 1
    assert result.output.count("Error:") == 1 and "skinclf export" in result.output
    assert not (tmp_path / "r.csv").exists()


def test_missing_extra_names_the_pip_command(monkeypatch, runner, tmp_path) -> None:
    from skinclf.training import train

    def no_tensorflow(*_, **__):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(train, "train_model", no_tensorflow)
    result = runner.invoke(app, ["train", "--data", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == ('Error: skinclf train needs TensorFlow, which this install leaves out: '
                                     'pip install "skinclf[train]"')


def test_usable_cpus_honours_a_cgroup_quota(monkeypatch, tmp_path) -> None:
    from skinclf import parallel

    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert parallel._cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert parallel._cgroup_cpus(tmp_path) == 1.5
    monkeypatch.setattr(parallel, "_cgroup_cpus", lambda: 1.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert parallel.usable_cpus() == 2  # 4 CPUs allowed, quota of 1.5 CPUs: 2 threads


def test_predict_and_evaluate_predictions_never_import_tensorflow(pair, images, tmp_path) -> None:
    """The light install's paths: with TensorFlow, Keras, scikit-learn and matplotlib made
    unimportable, predict (ONNX engine) and evaluate --predictions still work."""
    truth = tmp_path / "truth.csv"
    truth.write_text("image_id,dx\n" + "".join(f"img_{i:02d},{CLASSES[i % 7]}\n" for i in range(11)))
    script = f"""
import sys
for name in ("tensorflow", "keras", "sklearn", "matplotlib", "torch", "jax", "onnx"):
    sys.modules[name] = None  # any import of them raises ImportError
from skinclf.cli import app
from typer.testing import CliRunner
r = CliRunner()
res = r.invoke(app, ["predict", {str(images)!r}, "--out", {str(tmp_path / 'r.csv')!r}, "--model", {str(pair)!r}])
assert res.exit_code == 0, res.output
assert "onnx engine" in res.output, res.output
res = r.invoke(app, ["evaluate", "--predictions", {str(tmp_path / 'r.csv')!r}, "--truth", {str(truth)!r},
                     "--out", {str(tmp_path / 'rep')!r}])
assert res.exit_code == 0, res.output
res = r.invoke(app, ["predict", {str(images)!r}, "--out", {str(tmp_path / 'k.csv')!r}, "--model", {str(pair)!r},
                     "--engine", "keras"])
assert res.exit_code == 1 and 'pip install "skinclf[train]"' in res.output, res.output
print("light ok")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "light ok" in proc.stdout
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["n"] == 11 and "matplotlib" in report["plots"]


def test_metrics_match_scikit_learn() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    from skinclf.metrics import _precision_recall_f1, confusion, roc_auc, roc_curve

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(5, 200))
        positive = rng.random(n) < 0.3
        positive[:2] = [True, False]
        score = np.round(rng.random(n), int(rng.integers(1, 4)))  # ties too
        for ours, theirs in zip(roc_curve(positive, score), skm.roc_curve(positive, score)):
            assert np.allclose(ours, theirs)
        assert roc_auc(positive, score) == pytest.approx(skm.roc_auc_score(positive, score))
        y, p = rng.integers(0, 5, n), rng.integers(0, 5, n)
        assert (confusion(y, p, 6) == skm.confusion_matrix(y, p, labels=range(6))).all()
        for ours, theirs in zip(_precision_recall_f1(y, p, 6),
                                skm.precision_recall_fscore_support(y, p, labels=range(6), zero_division=0)):
            assert np.allclose(ours, theirs)


@pytest.mark.integration
def test_bundled_onnx_is_up_to_date_and_agrees_with_keras() -> None:
    """models/skinclf-mobilenet.onnx must be the export of models/skinclf-mobilenet.keras
    (regenerate: skinclf export models/skinclf-mobilenet.keras --format onnx --out models/skinclf-mobilenet.onnx)."""
    from skinclf.data.images import load_image
    from skinclf.engines.load import load_engine
    from skinclf.files import sha256_file
    from skinclf.model.bundle import load_bundle

    onnx_path = require(BUNDLED_MODEL.with_suffix(".onnx"))
    engine = load_engine(onnx_path, engine="onnx")
    assert engine.meta["export"]["source_sha256"] == sha256_file(require(BUNDLED_MODEL)), (
        "stale ONNX: skinclf export models/skinclf-mobilenet.keras --format onnx --out models/skinclf-mobilenet.onnx")
    assert load_engine(BUNDLED_MODEL).name == "onnx"
    paths = sorted(require(SHARED_FULLRES).glob("*.jpg"))[:8]
    x = np.stack([load_image(p, 224) for p in paths]).astype("float32")
    keras_probs = np.asarray(load_bundle(BUNDLED_MODEL).model.predict_on_batch(x))
    assert np.abs(engine(x) - keras_probs).max() <= 1e-4
