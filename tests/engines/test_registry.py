"""Engines come from a registry: one registered in a test is listed, loaded by its suffix, and
runs `predict` end to end without any other module knowing of it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinclf.engines.base import Engine
from skinclf.engines.registry import engine_choices, register_engine, registered, unregister_engine
from skinclf.errors import SkinclfError

CLASSES = ["benign", "malignant"]


class ColourEngine(Engine):
    """Logits from the mean red and blue of each image: red images are 'malignant'."""

    name = "fake"

    def _logits(self, x: np.ndarray) -> np.ndarray:
        red, blue = x[..., 0].mean(axis=(1, 2)), x[..., 2].mean(axis=(1, 2))
        return np.stack([(blue - red) / 20, (red - blue) / 20], axis=1)


@pytest.fixture
def fake_engine():
    @register_engine("fake", suffixes=(".fake",), extra="pip install fake-runtime")
    def load_fake(path: Path, *, batch_size: int, threads: int | None = None, model_path: Path | None = None):
        return ColourEngine(meta={"classes": CLASSES, "input_size": [16, 16], "name": "fake"}, path=path,
                            sha256="0" * 64, batch_size=batch_size)

    yield load_fake
    unregister_engine("fake")


def test_a_registered_engine_is_listed_and_chosen_by_suffix(fake_engine, tmp_path: Path) -> None:
    from skinclf.engines.load import engine_help, load_engine

    assert "fake" in engine_choices() and registered()["fake"].extra == "pip install fake-runtime"
    assert "fake" in engine_help()
    model = tmp_path / "m.fake"
    model.write_bytes(b"weights")
    assert isinstance(load_engine(model), ColourEngine)
    assert isinstance(load_engine(model, engine="fake"), ColourEngine)
    with pytest.raises(SkinclfError, match="--engine onnx does not run"):
        load_engine(model, engine="onnx")


def test_predict_runs_on_an_engine_registered_in_the_test(fake_engine, tmp_path: Path) -> None:
    from skinclf.batch.predict import predict_directory

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (20, 20), (220, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (20, 20), (30, 30, 220)).save(folder / "blue.png")
    model = tmp_path / "m.fake"
    model.write_bytes(b"weights")
    predict_directory(directory=folder, out=tmp_path / "out.csv", model=model, workers=1, show_progress=False)
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows["red.png"]["top1_class"] == "malignant" and rows["blue.png"]["top1_class"] == "benign"
    assert float(rows["red.png"]["top1_prob"]) > 0.9


def test_unregistered_engine_is_gone() -> None:
    assert "fake" not in engine_choices()
