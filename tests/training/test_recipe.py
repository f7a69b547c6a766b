"""The full fine-tuning recipe: colour constancy, random resized crops, prior correction,
temperature, train-small-test-large phases, ensembles and resuming such a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from utils.synthetic import write_ham
from test_train import TINY, run_cli

from skinclf.data.prepare import prepare_dataset
from skinclf.model.network import ShadesOfGray, build_model, fold_logit_transform
from skinclf.model.posthoc import fit_prior_tau, softmax
from skinclf.training.augment import AugmentSpec, random_affine
from skinclf.training.train import _phase_sizes


def test_shades_of_gray_by_hand() -> None:
    # A 1x2 image: pixels (255, 0, 0) and (0, 255, 0); p = 2.
    # e_r = e_g = sqrt((1^2 + 0^2) / 2) = 0.7071, e_b = 0; mean(e) = 0.4714.
    # gain_r = gain_g = 0.4714 / 0.7071 = 2/3; blue stays 0 whatever its gain.
    x = np.array([[[[255.0, 0.0, 0.0], [0.0, 255.0, 0.0]]]], dtype="float32")
    out = np.asarray(ShadesOfGray(power=2.0)(x))
    assert out == pytest.approx(np.array([[[[170.0, 0.0, 0.0], [0.0, 170.0, 0.0]]]]), abs=1e-3)


def test_shades_of_gray_neutralises_a_colour_cast() -> None:
    rng = np.random.default_rng(0)
    grey = rng.uniform(40, 200, (1, 16, 16, 1)).astype("float32").repeat(3, axis=-1)
    tinted = grey * np.array([1.0, 0.8, 0.6], dtype="float32")  # a warm illuminant
    out = np.asarray(ShadesOfGray()(tinted))
    means = out.reshape(-1, 3).mean(axis=0)
    assert means.max() / means.min() < 1.01  # channels balanced again
    assert np.asarray(ShadesOfGray()(grey)) == pytest.approx(grey, abs=1e-3)  # grey world unchanged


def test_random_resized_crop_keeps_shape_and_is_reproducible() -> None:
    image = np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    spec = AugmentSpec(crop_scale=(0.3, 1.0), color=0.2)
    a = random_affine(image, np.random.default_rng([42, 1, 7]), spec)
    b = random_affine(image, np.random.default_rng([42, 1, 7]), spec)
    c = random_affine(image, np.random.default_rng([42, 2, 7]), spec)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_random_resized_crop_zooms_in() -> None:
    # A crop of at most a third of the area (no rotation or flips) shows a quarter-image box
    # stretched: a centred 2x2 dot grows to at least 3 pixels across.
    image = np.zeros((60, 60, 3), dtype=np.uint8)
    image[29:31, 29:31] = 255
    spec = AugmentSpec(rotation=0, flips=False, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    out = random_affine(image, np.random.default_rng(0), spec)
    bright = out[..., 0] > 100
    assert bright.any() and np.ptp(np.nonzero(bright)[0]) >= 3


def test_prior_correction_changes_decisions_as_computed_by_hand() -> None:
    model = build_model(num_classes=3, image_size=32, alpha=0.25, weights=None, seed=0)
    x = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    before = np.asarray(model.predict_on_batch(x), dtype="float64")
    prior = np.array([0.7, 0.2, 0.1])
    tau, temperature = 1.0, 2.0
    fold_logit_transform(model, shift=-tau * np.log(prior), temperature=temperature)
    after = np.asarray(model.predict_on_batch(x), dtype="float64")
    expected = softmax((np.log(before) - tau * np.log(prior)) / temperature)
    assert after == pytest.approx(expected, abs=1e-5)
    # Rare classes gain: each row's odds of class 2 over class 0 grow by (0.7 / 0.1) ** (1 / T).
    ratio = (after[:, 2] / after[:, 0]) / (before[:, 2] / before[:, 0]) ** (1 / temperature)
    assert ratio == pytest.approx(np.full(6, 7.0 ** 0.5), rel=1e-4)


def test_fit_prior_tau_recovers_a_shifted_decision() -> None:
    # Class 0 is common and its logit inflated by log(prior) ratios: tau = 1 undoes it exactly.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    prior = np.array([0.8, 0.15, 0.05])
    clean = np.eye(3)[labels] * 2.0 + rng.normal(0, 0.6, (600, 3))
    probs = softmax(clean + np.log(prior))
    tau, accuracy = fit_prior_tau(probs, labels, prior)
    assert 0.6 <= tau <= 1.4
    plain = np.mean([np.mean(np.argmax(probs, 1)[labels == c] == c) for c in range(3)])
    assert accuracy > plain + 0.05


def test_phases_train_small_then_full_size() -> None:
    assert _phase_sizes(epochs=10, image_size=224, train_size=160, fixres_epochs=3) == [(0, 7, 160), (7, 10, 224)]
    assert _phase_sizes(epochs=10, image_size=224, train_size=0, fixres_epochs=3) == [(0, 10, 224)]
    assert _phase_sizes(epochs=4, image_size=224, train_size=160, fixres_epochs=4) == [(0, 4, 224)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("recipe-data")
    ham = write_ham(root / "ham", per_class=6)
    prepare_dataset(src=ham, out=root / "prepared", val=0.25, test=0.2, show_progress=False)
    return root / "prepared"


RECIPE = ["--train-size", "48", "--fixres-epochs", "1", "--schedule", "cosine", "--warmup-epochs", "1",
          "--weight-decay", "0.05", "--crop-scale", "0.3", "--color-jitter", "0.2", "--colour-constancy",
          "--prior-correction", "fit", "--label-smoothing", "0.1"]


def test_killed_full_recipe_run_resumes_to_the_same_history(prepared, tmp_path) -> None:
    args = ["train", "--data", str(prepared), "--epochs", "3", *TINY, *RECIPE]
    straight = run_cli(*args, "--out", "straight.keras", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert "2 epoch(s) at 48px then 1 epoch(s) at 64px" in straight.stderr
    killed = run_cli(*args, "--out", "resumed.keras", cwd=tmp_path, env_extra={"_SKINCLF_KILL_AFTER_EPOCH": "2"})
    assert killed.returncode != 0 and not (tmp_path / "resumed.keras").exists()
    resumed = run_cli(*args, "--out", "resumed.keras", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 2" in resumed.stderr
    a = pd.read_csv(tmp_path / "runs" / "straight" / "history.csv")
    b = pd.read_csv(tmp_path / "runs" / "resumed" / "history.csv")
    assert list(b["epoch"]) == [1, 2, 3]
    # The cosine rate continues from the restored step counter: same curve, same numbers.
    assert np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-3, atol=1e-4)
    assert a["learning_rate"].iloc[-1] < a["learning_rate"].iloc[0]

    from skinclf.model.bundle import load_bundle

    bundle = load_bundle(tmp_path / "resumed.keras")
    assert bundle.image_size == 64 and bundle.model.inputs[0].shape[1] == 64  # fixed for predict
    assert bundle.model.get_layer("colour_constancy") is not None
    post = bundle.meta["post_hoc"]
    assert post["prior_correction"] == "fit" and math.isfinite(post["tau"]) and post["temperature"] > 0
    assert bundle.meta["calibration"]["temperature"] == post["temperature"]
    assert [p["image_size"] for p in bundle.meta["training"]["phases"]] == [48, 64]


def test_resume_with_other_recipe_options_names_them(prepared, tmp_path) -> None:
    from typer.testing import CliRunner

    from skinclf.cli import app

    runner = CliRunner()
    base = ["train", "--data", str(prepared), "--epochs", "1", "--run-dir", str(tmp_path / "r"), "--out",
            str(tmp_path / "m.keras"), *TINY]
    assert runner.invoke(app, [*base, "--crop-scale", "0.3"]).exit_code == 0
    result = runner.invoke(app, [*base, "--crop-scale", "0.5", "--resume"])
    assert result.exit_code == 1 and "crop_scale" in result.output and "without --resume" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--schedule", "step"], "choose one of plateau, cosine"),
        (["--train-size", "300"], "--train-size 300"),
        (["--crop-scale", "1.5"], "--crop-scale 1.5"),
        (["--weight-decay", "-1"], "--weight-decay -1"),
        (["--prior-correction", "lots"], "use none, fit, or a number"),
        (["--train-size", "48", "--cache-views", "2"], "drop --cache-views"),
        (["--workers", "0"], "--workers 0"),
    ],
)
def test_bad_recipe_options(prepared, tmp_path, monkeypatch, args, needle) -> None:
    from typer.testing import CliRunner

    from skinclf.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--data", str(prepared), "--out", str(tmp_path / "m.keras"), *TINY, *args])
    assert result.exit_code == 1 and needle in result.output, result.output
    assert not (tmp_path / "runs").exists()
    assert json  # noqa: B018 - imported for symmetry with test_train


def _tiny_bundle(path, seed: int):
    from skinclf.model.bundle import save_bundle

    model = build_model(num_classes=3, image_size=32, alpha=0.25, weights=None, seed=seed)
    rng = np.random.default_rng(seed)
    layer = model.get_layer("predictions")
    kernel, bias = layer.get_weights()
    layer.set_weights([rng.normal(0, 0.5, kernel.shape), rng.normal(0, 1, bias.shape)])
    return save_bundle(model, path, {"name": path.stem, "classes": ["a", "b", "c"], "input_size": [32, 32],
                                     "metrics": {"validation": {"balanced_accuracy": 0.5}}})


def _logits(path, x):
    from skinclf.model.bundle import load_bundle
    from skinclf.model.network import logits_model

    return np.asarray(logits_model(load_bundle(path).model).predict_on_batch(x), dtype="float64")


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_ensemble_bundle_loads_and_equals_the_mean_of_its_members(tmp_path) -> None:
    from typer.testing import CliRunner

    from skinclf.cli import app
    from skinclf.engines.load import load_engine
    from skinclf.model.bundle import load_bundle

    members = [_tiny_bundle(tmp_path / f"m{i}.keras", i) for i in range(3)]
    result = CliRunner().invoke(app, ["ensemble", *map(str, members), "--out", str(tmp_path / "e.keras")])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(5).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = _softmax(np.mean([_logits(m, x) for m in members], axis=0))  # geometric mean of the members
    ensemble = load_bundle(tmp_path / "e.keras")
    assert np.asarray(ensemble.model.predict_on_batch(x)) == pytest.approx(expected, abs=1e-5)
    assert ensemble.meta["architecture"]["ensemble"] == 3 and len(ensemble.meta["members"]) == 3
    assert ensemble.meta["members"][0]["sha256"] == load_bundle(members[0]).sha256
    # Engines run it like any bundle: their logits are the mean of the members' logits.
    engine = load_engine(tmp_path / "e.keras", engine="keras")
    assert engine(x) == pytest.approx(expected, abs=1e-5)
    assert engine.logits(x) == pytest.approx(np.mean([_logits(m, x) for m in members], axis=0), abs=1e-4)


def test_ensemble_exports_to_onnx_and_matches_keras(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from skinclf.engines.export import export_model
    from skinclf.engines.load import load_engine
    from skinclf.training.ensemble import ensemble_bundles

    members = [_tiny_bundle(tmp_path / f"m{i}.keras", i) for i in range(2)]
    ensemble_bundles(members=members, out=tmp_path / "e.keras")
    export_model(model=tmp_path / "e.keras", format="onnx", out=tmp_path / "e.onnx")
    x = np.random.default_rng(6).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    keras_engine = load_engine(tmp_path / "e.keras", engine="keras")
    onnx_engine = load_engine(tmp_path / "e.onnx", engine="onnx")
    assert onnx_engine(x) == pytest.approx(keras_engine(x), abs=1e-5)
    assert onnx_engine.logits(x) == pytest.approx(keras_engine.logits(x), abs=1e-4)


def test_ensemble_fits_prior_correction_and_temperature_on_validation(prepared, tmp_path) -> None:
    from utils.models import make_tiny_bundle
    from utils.synthetic import CLASSES

    from skinclf.model.bundle import load_bundle
    from skinclf.training.ensemble import ensemble_bundles

    counts = {"train_counts": {c: 10 * (i + 1) for i, c in enumerate(CLASSES)}}
    members = [make_tiny_bundle(tmp_path / f"m{i}.keras", seed=i, data=counts) for i in range(2)]
    meta = ensemble_bundles(members=members, out=tmp_path / "e.keras", val=prepared / "val",
                            prior_correction="0.5", decision_weight="mel=2", calibrate=True)
    post = meta["post_hoc"]
    prior = np.array([counts["train_counts"][c] for c in CLASSES], dtype="float64")
    prior /= prior.sum()
    expected_shift = -0.5 * np.log(prior) + np.log([2.0 if c == "mel" else 1.0 for c in CLASSES])
    assert [post["shift"][c] for c in CLASSES] == pytest.approx(expected_shift, abs=1e-5)
    assert post["temperature"] > 0 and meta["metrics"]["validation"]["n"] > 0
    # The head carries the shift and temperature: softmax((mean logits + shift) / T).
    x = np.random.default_rng(7).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    mean = np.mean([_logits(m, x) for m in members], axis=0)
    got = np.asarray(load_bundle(tmp_path / "e.keras").model.predict_on_batch(x))
    assert got == pytest.approx(_softmax((mean + expected_shift) / post["temperature"]), abs=1e-4)


def test_ensemble_history_plots_its_members_curves_or_says_where_they_are(tmp_path) -> None:
    import zipfile

    from typer.testing import CliRunner

    from skinclf.cli import app
    from skinclf.model.bundle import load_bundle, save_bundle

    members = [_tiny_bundle(tmp_path / f"m{i}.keras", i) for i in range(2)]
    runner = CliRunner()
    assert runner.invoke(app, ["ensemble", *map(str, members), "--out", str(tmp_path / "bare.keras")]).exit_code == 0
    result = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "bare.keras"), "--history",
                                 "--out", str(tmp_path / "h")])
    # Members without curves: no command that needs files a clone lacks, the model card's figure instead.
    assert result.exit_code == 1 and "an ensemble of 2 networks (m0.keras, m1.keras)" in result.output
    assert "models/training_curves.png" in result.output and "runs/" not in result.output
    assert "Traceback" not in result.output

    history = [{"epoch": 1, "loss": 1.0, "val_loss": 1.2}, {"epoch": 2, "loss": 0.8, "val_loss": 1.1}]
    with_history = load_bundle(members[0])
    save_bundle(with_history.model, tmp_path / "h0.keras", {**with_history.meta, "history": history})
    assert runner.invoke(app, ["ensemble", str(tmp_path / "h0.keras"), str(members[1]),
                               "--out", str(tmp_path / "e.keras")]).exit_code == 0
    meta = __import__("json").loads(zipfile.ZipFile(tmp_path / "e.keras").read("skinclf.json"))
    assert meta["members"][0]["history"] == history
    result = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "e.keras"), "--history",
                                 "--out", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h" / "history.png").stat().st_size > 0


def test_ensemble_fitting_needs_a_validation_folder(tmp_path) -> None:
    from typer.testing import CliRunner

    from skinclf.cli import app

    members = [_tiny_bundle(tmp_path / f"m{i}.keras", i) for i in range(2)]
    result = CliRunner().invoke(app, ["ensemble", *map(str, members), "--out", str(tmp_path / "e.keras"),
                                      "--calibrate"])
    assert result.exit_code == 1 and "add --val data/prepared/val" in result.output
    result = CliRunner().invoke(app, ["ensemble", *map(str, members), "--out", str(tmp_path / "e.keras"),
                                      "--prior-correction", "lots", "--val", str(tmp_path)])
    assert result.exit_code == 1 and "--prior-correction 'lots'" in result.output
    assert not (tmp_path / "e.keras").exists()


def test_ensemble_refuses_a_single_or_mismatched_member(tmp_path) -> None:
    from typer.testing import CliRunner

    from skinclf.cli import app
    from skinclf.model.bundle import save_bundle

    one = _tiny_bundle(tmp_path / "one.keras", 0)
    runner = CliRunner()
    result = runner.invoke(app, ["ensemble", str(one), "--out", str(tmp_path / "e.keras")])
    assert result.exit_code == 1 and "at least 2" in result.output
    other = build_model(num_classes=3, image_size=32, alpha=0.25, weights=None, seed=1)
    save_bundle(other, tmp_path / "other.keras", {"classes": ["x", "y", "z"], "input_size": [32, 32]})
    result = runner.invoke(app, ["ensemble", str(one), str(tmp_path / "other.keras"), "--out", str(tmp_path / "e.keras")])
    assert result.exit_code == 1 and "other classes" in result.output and not (tmp_path / "e.keras").exists()
