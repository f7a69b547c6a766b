"""Integration: the committed model in models/ on CPU, with the real full-size images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from utils.paths import require, BUNDLED_MODEL, SHARED_FULLRES, SHARED_HAM
from utils.synthetic import CLASSES
from PIL import Image

from skinclf.cli import app

pytestmark = pytest.mark.integration

# The bundled model's probabilities for fixed full-size images, recorded by tools/fixed_image.py
# (run by tools/refresh_bundle.sh) when the model was committed: any accidental change of the
# model or the preprocessing shows.
EXPECTED = json.loads((Path(__file__).with_name("fixed_image_expected.json")).read_text())


@pytest.fixture(scope="module")
def bundle():
    from skinclf.model.bundle import load_bundle

    return load_bundle(require(BUNDLED_MODEL))


def test_bundle_is_small_and_carries_its_metadata(bundle) -> None:
    meta = bundle.meta
    networks = meta.get("members") or [meta]  # an ensemble (skinclf ensemble) records each member
    assert BUNDLED_MODEL.stat().st_size < 15 * 1024 * 1024 * len(networks)  # at most 15 MB a network
    assert bundle.classes == list(CLASSES)
    assert bundle.image_size == 224
    assert meta["architecture"]["base"] == "MobileNet" and meta["architecture"]["alpha"] == 1.0
    assert meta["preprocessing"]["input_range"] == [0, 255]
    assert all(n["training"]["weights"] for n in networks) and meta["data"]["fingerprint"]
    assert meta["metrics"]["validation"]["balanced_accuracy"] > 0.7
    # Everything derived from the model travels with it (tools/refresh_bundle.sh): a temperature
    # fitted on validation and the out-of-distribution threshold the predict CSV's flag uses.
    assert meta["calibration"]["temperature"] > 0
    calibration = meta["calibration"]
    # The temperature minimises validation NLL, and "no change" was one of its candidates.
    assert calibration["temperature"] > 0
    assert calibration["validation_after"]["nll"] <= calibration["validation_before"]["nll"] + 1e-6
    ood = meta["ood"]
    assert ood["score"] == "mahalanobis" and np.isfinite(ood["threshold"])
    assert 0 < ood["flag_rates"][ood["fitted_on"]] <= 0.1
    # The flag's floors: every non-dermoscopic set >= 90% flagged, held-out dermoscopic <= 7%.
    assert all(rate >= 0.9 for name, rate in ood["flag_rates"].items() if name != ood["fitted_on"])
    assert ood["held_out"]["flag_rate"] <= 0.07


def test_fixed_images_match_the_recorded_output(bundle) -> None:
    from skinclf.data.images import load_image

    assert bundle.sha256 == EXPECTED["model_sha256"], "the model changed: run bash tools/refresh_bundle.sh"
    for name, expected in EXPECTED["images"].items():
        x = load_image(require(SHARED_FULLRES) / name, bundle.image_size)[None].astype("float32")
        probs = np.asarray(bundle.model.predict_on_batch(x))[0]
        assert probs == pytest.approx([expected[c] for c in bundle.classes], abs=2e-4), name


@pytest.mark.parametrize("engine,tolerance", [("onnx", 2e-4), ("onnx-int8", 0.02)])
def test_the_onnx_forms_are_up_to_date_and_give_the_recorded_output(engine, tolerance) -> None:
    """The float and int8 ONNX forms beside the bundle were exported from it (predict uses them only
    then) and still give what they gave when committed (int8 kernels differ a little between CPUs:
    the same top class, probabilities within 0.02)."""
    from skinclf.data.images import load_image
    from skinclf.engines.load import load_engine

    loaded = load_engine(require(BUNDLED_MODEL), engine=engine)
    assert loaded.format == engine
    for name, expected in EXPECTED["engines"][engine].items():
        x = load_image(require(SHARED_FULLRES) / name, loaded.image_size)[None].astype("float32")
        probs = loaded(x)[0]
        assert probs == pytest.approx([expected[c] for c in loaded.classes], abs=tolerance), name
        assert loaded.classes[int(np.argmax(probs))] == max(expected, key=expected.get)


def test_same_image_as_jpeg_and_png_gets_the_same_top1(tmp_path: Path, bundle) -> None:
    from skinclf.batch.predict import predict_directory

    images = sorted(require(SHARED_FULLRES).glob("*.jpg"))[:12]
    for path in images:
        with Image.open(path) as im:
            im.save(tmp_path / f"{path.stem}.png")
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "out").mkdir()
    predict_directory(directory=tmp_path, out=tmp_path / "out" / "r.csv", model=BUNDLED_MODEL, show_progress=False)
    frame = pd.read_csv(tmp_path / "out" / "r.csv", keep_default_na=False)
    frame["stem"] = frame["path"].map(lambda p: Path(p).stem)
    frame["suffix"] = frame["path"].map(lambda p: Path(p).suffix)
    pairs = frame.pivot(index="stem", columns="suffix", values="top1_class")
    assert len(pairs) == 12 and (frame["error"] == "").all()
    assert (pairs[".jpg"] == pairs[".png"]).all(), pairs


def test_predict_on_full_size_images_from_another_directory(runner, monkeypatch, tmp_path: Path) -> None:
    """With no --model, the bundled model is found whatever the working directory."""
    monkeypatch.delenv("SKINCLF_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = require(SHARED_FULLRES)
    result = runner.invoke(app, ["predict", str(folder), "--out", "r.csv"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    assert len(frame) == len(list(folder.glob("*.jpg"))) and (frame["error"] == "").all()
    assert json.loads((tmp_path / "r.csv.json").read_text())["model"]["name"] == "skinclf-mobilenet"
    # Far better than chance on these (mostly unseen) images: check against their labels.
    truth = pd.read_csv(require(SHARED_HAM) / "HAM10000_metadata.csv").set_index("image_id")["dx"]
    labels = truth[frame["path"].map(lambda p: Path(p).stem)].to_numpy()
    assert (frame["top1_class"].to_numpy() == labels).mean() > 0.6
