"""`skinclf train`: tiny runs (alpha 0.25, 64 px, no pretrained weights) on synthetic data."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from utils.synthetic import write_ham, CLASSES

from skinclf.cli import app
from utils.paths import REPO
from skinclf.config import TrainConfig
from skinclf.data.prepare import prepare_dataset
from skinclf.errors import SkinclfError

TINY = ["--weights", "none", "--alpha", "0.25", "--image-size", "64", "--batch-size", "8",
        "--trainable-layers", "85", "--workers", "2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    ham = write_ham(root / "ham", per_class=6)
    prepare_dataset(src=ham, out=root / "prepared", val=0.25, test=0.2, show_progress=False)
    return root / "prepared"


def run_cli(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "skinclf", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)


# --- class weights ------------------------------------------------------------------------


def test_balanced_class_weights_by_hand() -> None:
    from skinclf.training.posthoc_fit import class_weights

    # n = 40 images, k = 2 classes: weight = n / (k * n_c)
    assert class_weights("balanced", {"a": 10, "b": 30}) == pytest.approx({"a": 2.0, "b": 40 / 60})
    assert class_weights("sqrt", {"a": 10, "b": 30}) == pytest.approx({"a": math.sqrt(2.0), "b": math.sqrt(40 / 60)})
    assert class_weights("none", {"a": 10, "b": 30}) == {"a": 1.0, "b": 1.0}
    # Every class carries the same total weight under 'balanced'.
    w = class_weights("balanced", {"mel": 779, "nv": 4693, "df": 81})
    assert 779 * w["mel"] == pytest.approx(4693 * w["nv"]) == pytest.approx(81 * w["df"])


def test_explicit_class_weights() -> None:
    from skinclf.training.posthoc_fit import class_weights

    assert class_weights("mel=4,nv=1.25", {"mel": 5, "nv": 9, "df": 1}) == {"mel": 4.0, "nv": 1.25, "df": 1.0}
    # A base with changes: melanoma's balanced weight doubled, df's set outright.
    counts = {"mel": 10, "nv": 30, "df": 20}  # n = 60, k = 3
    assert class_weights("balanced,mel*2,df=1", counts) == pytest.approx({"mel": 4.0, "nv": 60 / 90, "df": 1.0})
    with pytest.raises(SkinclfError, match="NAME=WEIGHT"):
        class_weights("melanoma=4", {"mel": 5})
    with pytest.raises(SkinclfError, match="not a number"):
        class_weights("mel=x", {"mel": 5})
    with pytest.raises(SkinclfError, match="positive"):
        class_weights("mel=0", {"mel": 5})


def test_balanced_accuracy_metric_matches_numpy() -> None:
    from skinclf.metrics import balanced_accuracy
    from skinclf.training.callbacks import BalancedAccuracy

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    y[y == 3] = 2  # one class absent: the mean runs over present classes only
    probs = rng.random((200, 4)).astype("float32")
    metric = BalancedAccuracy(4)
    metric.update_state(np.eye(4, dtype="float32")[y[:120]], probs[:120])
    metric.update_state(np.eye(4, dtype="float32")[y[120:]], probs[120:])
    assert float(metric.result()) == pytest.approx(balanced_accuracy(y, probs.argmax(1)), abs=1e-6)


# --- training runs ------------------------------------------------------------------------


def test_tiny_training_produces_a_complete_bundle(runner, prepared: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tiny.keras"
    result = runner.invoke(app, ["train", "--data", str(prepared), "--out", str(out), "--epochs", "2", *TINY])
    assert result.exit_code == 0, result.output
    assert f"Saved {out}" in result.output

    from skinclf.model.bundle import load_bundle

    bundle = load_bundle(out)
    assert bundle.classes == list(CLASSES)
    assert bundle.image_size == 64
    probs = np.asarray(bundle.model.predict_on_batch(np.full((3, 64, 64, 3), 128, dtype="float32")))
    assert probs.shape == (3, len(CLASSES))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    meta = bundle.meta
    assert meta["preprocessing"]["input_range"] == [0, 255]
    assert meta["training"]["weights"] == "none" and meta["training"]["epochs_run"] == 2
    assert meta["data"]["fingerprint"] == json.loads((prepared / "prepare.json").read_text())["fingerprint"]
    assert meta["versions"]["keras"] and meta["versions"]["backend"]
    assert 0 <= meta["metrics"]["validation"]["balanced_accuracy"] <= 1
    assert [row["epoch"] for row in meta["history"]] == [1, 2]
    history = pd.read_csv(tmp_path / "runs" / "tiny" / "history.csv")
    assert list(history["epoch"]) == [1, 2] and "val_top2_accuracy" in history.columns


def test_training_with_feature_cache_and_focal_loss(prepared: Path, tmp_path: Path) -> None:
    from skinclf.model.bundle import load_bundle
    from skinclf.training.train import train_model

    result = train_model(TrainConfig(
        data=prepared, out=tmp_path / "cached.keras", epochs=2, batch_size=8, weights="none", alpha=0.25,
        image_size=64, trainable_layers=76, cache_views=2, loss="focal", workers=2, run_dir=tmp_path / "runs" / "c",
    ), show_progress=False)
    caches = list((tmp_path / "runs").glob("feature-cache-*"))
    assert len(caches) == 1
    assert sorted(p.name for p in caches[0].iterdir()) == ["train-view0.npy", "train-view1.npy", "val-view0.npy"]
    views = np.load(caches[0] / "train-view0.npy", mmap_mode="r")
    assert views.dtype == np.float16 and views.shape[0] == len(list((prepared / "train").rglob("*.jpg")))
    assert not np.array_equal(views, np.load(caches[0] / "train-view1.npy", mmap_mode="r"))  # augmented differently
    assert result.epochs_run == 2
    # Cut early: in a randomly initialised MobileNet deeper activations vanish below float16.
    assert load_bundle(result.model_path).meta["architecture"]["first_trainable_layer"] == "conv_pad_2"


def test_decision_weight_rebundles_a_finished_run(runner, prepared: Path, tmp_path: Path, monkeypatch) -> None:
    """--resume on a finished run with --decision-weight trains nothing and scales the probabilities."""
    from skinclf.model.bundle import load_bundle

    monkeypatch.chdir(tmp_path)
    # No temperature: each bundle would fit its own, and the comparison is of the shift alone.
    base = ["train", "--data", str(prepared), "--epochs", "1", "--run-dir", "runs/r", "--no-calibrate", *TINY]
    assert runner.invoke(app, [*base, "--out", "plain.keras"]).exit_code == 0
    result = runner.invoke(app, [*base, "--out", "shifted.keras", "--resume", "--decision-weight", "mel=3,nv=0.5"])
    assert result.exit_code == 0, result.output
    plain, shifted = load_bundle(tmp_path / "plain.keras"), load_bundle(tmp_path / "shifted.keras")
    x = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3)).astype("float32")
    p, q = (np.asarray(b.model.predict_on_batch(x), dtype="float64") for b in (plain, shifted))
    w = np.array([{"mel": 3.0, "nv": 0.5}.get(c, 1.0) for c in plain.classes])
    assert q == pytest.approx(p * w / (p * w).sum(axis=1, keepdims=True), rel=1e-4)
    training = shifted.meta["training"]
    assert training["decision_weight"] == "mel=3,nv=0.5" and training["decision_weights"]["mel"] == 3.0
    assert training["epochs_run"] == 1 and plain.meta["training"]["decision_weights"]["mel"] == 1.0


# The third member's recipe in small: MobileNetV2 (batch norms frozen), cosine schedule, train small
# then test large (the bundle's input fixed by cloning the residual graph).
TINY_V2 = ["--arch", "mobilenetv2", "--weights", "none", "--image-size", "64", "--train-size", "48",
           "--fixres-epochs", "1", "--schedule", "cosine", "--warmup-epochs", "1", "--batch-size", "8",
           "--trainable-layers", "118", "--workers", "2"]


@pytest.mark.parametrize("recipe", [TINY, TINY_V2], ids=["mobilenet", "mobilenetv2"])
def test_killed_run_resumes_to_the_same_result(prepared: Path, tmp_path: Path, recipe: list[str]) -> None:
    args = ["train", "--data", str(prepared), "--epochs", "3", *recipe]
    straight = run_cli(*args, "--out", "straight.keras", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr

    killed = run_cli(*args, "--out", "resumed.keras", cwd=tmp_path, env_extra={"_SKINCLF_KILL_AFTER_EPOCH": "1"})
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "runs" / "resumed" / "state.json").read_text())
    assert state["epoch"] == 1
    assert not (tmp_path / "resumed.keras").exists()  # no half-written model

    resumed = run_cli(*args, "--out", "resumed.keras", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stderr

    a = pd.read_csv(tmp_path / "runs" / "straight" / "history.csv")
    b = pd.read_csv(tmp_path / "runs" / "resumed" / "history.csv")
    assert list(b["epoch"]) == [1, 2, 3]
    # Same data order, augmentation and dropout masks per epoch: the same numbers, up to
    # floating-point nondeterminism of the backend.
    assert np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-3, atol=1e-4)

    from skinclf.model.bundle import load_bundle

    assert load_bundle(tmp_path / "resumed.keras").meta["training"]["epochs_run"] == 3


# --- errors -------------------------------------------------------------------------------


def test_wrong_architecture_weights_file(runner, prepared: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    from skinclf.backend import load_keras

    keras = load_keras()
    other = keras.applications.MobileNet(input_shape=(64, 64, 3), alpha=0.5, include_top=False, weights=None)
    weights = tmp_path / "alpha05.weights.h5"
    other.save_weights(weights)
    result = runner.invoke(app, ["train", "--data", str(prepared), "--out", str(tmp_path / "m.keras"),
                                 *TINY, "--weights", str(weights)])
    assert result.exit_code == 1
    assert "does not fit MobileNet alpha=0.25" in result.output
    assert "Traceback" not in result.output


def test_missing_weights_file(runner, prepared: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--data", str(prepared), "--out", str(tmp_path / "m.keras"),
                                 *TINY, "--weights", str(tmp_path / "nope.h5")])
    assert result.exit_code == 1 and "weights file not found" in result.output


def test_imagenet_download_failure_suggests_a_local_file(monkeypatch, prepared: Path, tmp_path: Path) -> None:
    import skinclf.model.network as model_mod
    from skinclf.training.train import train_model

    real = model_mod.keras.applications.MobileNet

    def offline(*args, weights=None, **kwargs):
        if weights == "imagenet":
            raise Exception("URL fetch failure on https://storage.googleapis.com/...: [Errno -3] name resolution")
        return real(*args, weights=weights, **kwargs)

    monkeypatch.setattr(model_mod.keras.applications, "MobileNet", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SkinclfError, match="--weights PATH"):
        train_model(TrainConfig(data=prepared, out=tmp_path / "m.keras", weights="imagenet", alpha=0.25, image_size=64),
                    show_progress=False)


def test_no_prepared_data(runner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.keras")])
    assert result.exit_code == 1
    assert "no prepared data" in result.output and "skinclf prepare" in result.output


def test_empty_class_folder(runner, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ham = write_ham(tmp_path / "ham", per_class=3)
    prepare_dataset(src=ham, out=tmp_path / "p", val=0.3, test=0.0, show_progress=False)
    (tmp_path / "p" / "train" / "healthy").mkdir()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "p"), "--out", str(tmp_path / "m.keras"), *TINY])
    assert result.exit_code == 1 and "holds no images" in result.output and "healthy" in result.output


def test_resume_with_nothing_to_resume(runner, prepared: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(prepared), "--out", str(tmp_path / "m.keras"),
                                 "--run-dir", str(tmp_path / "empty"), "--resume", *TINY])
    assert result.exit_code == 1 and "nothing to resume" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--trainable-layers", "2"], "must be 3..85"),
        (["--monitor", "val_auc"], "choose one of"),
        (["--loss", "hinge"], "choose one of"),
        (["--class-weight", "bogus"], "NAME=WEIGHT"),
        (["--alpha", "0.3"], "0.25, 0.5, 0.75 and 1.0"),
        (["--epochs", "0"], "at least 1"),
        (["--out", "model.h5"], "must end in .keras"),
        (["--color-jitter", "1.5"], "must be in [0, 1)"),
        (["--decision-weight", "melanoma=2"], "--decision-weight 'melanoma=2'"),
    ],
)
def test_bad_training_options(runner, prepared: Path, tmp_path: Path, monkeypatch, args: list[str], needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["train", "--data", str(prepared), "--out", str(tmp_path / "m.keras"), *TINY]
    result = runner.invoke(app, [*base, *args])
    assert result.exit_code == 1, result.output
    assert needle in result.output
    assert not (tmp_path / "runs").exists()  # options are checked before anything is written


@pytest.mark.slow
def test_torch_backend_trains_a_bundle_tensorflow_loads(prepared: Path, tmp_path: Path) -> None:
    """The model, data and training path hold no TensorFlow-only code: KERAS_BACKEND=torch trains,
    and the bundle loads under the default backend with the same outputs."""
    torch_python = os.environ.get("SKINCLF_TORCH_PYTHON", sys.executable)
    probe = subprocess.run([torch_python, "-c", "import torch"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("PyTorch is not installed (set SKINCLF_TORCH_PYTHON to a Python that has it)")
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [torch_python, "-c",
         "import numpy as np, sys; from pathlib import Path; from skinclf.training.train import train_model; "
         "from skinclf.config import TrainConfig; "
         "from skinclf.model.bundle import load_bundle; "
         f"r = train_model(TrainConfig(data=Path({str(prepared)!r}), out=Path('t.keras'), epochs=1, batch_size=8, "
         "weights='none', alpha=0.25, image_size=64, trainable_layers=85, workers=2), show_progress=False); "
         "x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype('float32'); "
         "np.save('torch_out.npy', np.asarray(load_bundle(Path('t.keras')).model.predict_on_batch(x)))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    from skinclf.model.bundle import load_bundle

    bundle = load_bundle(tmp_path / "t.keras")
    assert bundle.meta["versions"]["backend"] == "torch"
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    assert np.allclose(np.asarray(bundle.model.predict_on_batch(x)), np.load(tmp_path / "torch_out.npy"), atol=1e-5)
