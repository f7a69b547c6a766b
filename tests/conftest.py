"""Shared fixtures: tiny synthetic datasets built on the fly, and the real shared data."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_HAM = SHARED / "data" / "ham10000"
SHARED_FULLRES = SHARED / "data" / "ham10000-fullres"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_1_0_224_imagenet_partial_no_top.weights.h5"
BUNDLED_MODEL = REPO / "models" / "skinclf-mobilenet.keras"

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# A distinct colour per class, so a tiny model can learn the task in a few steps.
CLASS_COLOURS = {
    "akiec": (200, 60, 60),
    "bcc": (60, 200, 60),
    "bkl": (60, 60, 200),
    "df": (200, 200, 60),
    "mel": (30, 20, 20),
    "nv": (150, 100, 70),
    "vasc": (200, 60, 200),
    "healthy": (230, 200, 180),
}


def lesion_image(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small synthetic 'lesion': a coloured disc on skin-toned noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.normal(180, 20, (h, w, 3)).clip(0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2
    base[disc] = np.array(colour) + rng.normal(0, 8, (int(disc.sum()), 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def write_ham(root: Path, per_class: int = 6, *, seed: int = 0) -> Path:
    """A tiny HAM10000-layout dataset: metadata CSV and JPEGs split over the two part folders.

    Every third lesion has two images, so grouping by lesion matters.
    """
    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    n = 0
    for dx in CLASSES:
        for j in range(per_class):
            lesion = f"HAM_{n:07d}"
            images = 2 if j % 3 == 0 else 1
            for _ in range(images):
                image_id = f"ISIC_{n:07d}"
                part = "HAM10000_images_part_1" if n % 2 == 0 else "HAM10000_images_part_2"
                path = root / part / f"{image_id}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                lesion_image(CLASS_COLOURS[dx], seed + n).save(path, quality=90)
                rows.append(f"{lesion},{image_id},{dx},histo,50.0,female,back")
                n += 1
    (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def kaggle_style_zip(ham: Path, archive: Path, *, extra_members: dict[str, bytes] | None = None) -> Path:
    """Zip `ham` the way the Kaggle archive is laid out, with its lower-case duplicate folders
    and hmnist CSVs that fetch must skip."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(ham.rglob("*")):
            if path.is_file():
                rel = path.relative_to(ham).as_posix()
                zf.write(path, rel)
                if rel.startswith("HAM10000_images_part_"):
                    zf.write(path, rel.replace("HAM10000_images_part_", "ham10000_images_part_"))
        zf.writestr("hmnist_28_28_RGB.csv", "pixel0000,label\n1,2\n")
        for name, data in (extra_members or {}).items():
            zf.writestr(name, data)
    return archive


class HTTPErrorLike(Exception):
    """What the kaggle client raises on an HTTP error status: `.response.status_code`."""

    def __init__(self, status: int):
        super().__init__(f"{status} Client Error")
        self.response = type("Response", (), {"status_code": status})()


class FakeKaggleApi:
    """Stands in for `kaggle.api.KaggleApi` at the boundary skinclf uses."""

    def __init__(self, archive: Path | None = None, error: BaseException | None = None):
        self.archive = archive
        self.error = error
        self.calls: list[tuple[str, str]] = []

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False, licenses=()):
        self.calls.append((dataset, path))
        if self.error is not None:
            raise self.error
        target = Path(path) / f"{dataset.split('/')[-1]}.zip"
        target.write_bytes(self.archive.read_bytes())


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def tiny_ham(tmp_path: Path) -> Path:
    return write_ham(tmp_path / "ham")


@pytest.fixture
def ham_zip(tiny_ham: Path, tmp_path: Path) -> Path:
    return kaggle_style_zip(tiny_ham, tmp_path / "skin-cancer-mnist-ham10000.zip")


@pytest.fixture
def no_kaggle_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def require(path: Path) -> Path:
    """Skip the test when shared data or the bundled model is absent (it is present in CI)."""
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.keras")


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


def lesion_folder(folder: Path, count: int) -> Path:
    """`count` synthetic lesion JPEGs (0.jpg, 1.jpg, ...) in a new folder."""
    folder.mkdir()
    for i in range(count):
        lesion_image((150, 100, 70), i).save(folder / f"{i}.jpg")
    return folder
