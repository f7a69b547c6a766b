"""The out-of-distribution flag on the network's pooled features: the Mahalanobis scores by hand,
features from every engine (Keras, ONNX, ensembles) in one forward pass, the flag in predict,
old bundles and old ONNX files, and explain's flat maps."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from utils.models import make_tiny_bundle, with_ood_record
from utils.synthetic import lesion_folder, lesion_image, CLASSES, CLASS_COLOURS

from skinclf.errors import SkinclfError
from skinclf.model.outlier import (
    WARNING,
    active_record,
    distances,
    feature_scores,
    fit_gaussian,
    flag,
    pack,
    unpack,
)
from skinclf.trust.ood import fit_feature_stats, fit_ood

# --- the scores by hand -----------------------------------------------------------------------

# Two classes in 2-D, each four points at (+-2, +-1) about its mean (0, 0) and (10, 0): the tied
# covariance is diag(4, 1). All eight points: mean (5, 0), covariance diag(29, 1) (x deviations
# +-3 and +-7 from 5: (4 * 9 + 4 * 49) / 8 = 29; no cross terms).
POINTS = np.array([[-2, -1], [2, -1], [-2, 1], [2, 1], [8, -1], [12, -1], [8, 1], [12, 1]], dtype="float64")
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_mahalanobis_and_relative_mahalanobis_against_a_hand_computed_example() -> None:
    # rank 1 of 2 dimensions keeps the top eigenvalue and the residual variance is the other one:
    # the low-rank form is then the exact covariance.
    stats = {"class": fit_gaussian(POINTS, LABELS, rank=1), "background": fit_gaussian(POINTS, rank=1)}
    f = np.array([[4.0, 1.0]])
    # To class 0: 4^2 / 4 + 1^2 / 1 = 5; to class 1: (-6)^2 / 4 + 1 = 10.
    np.testing.assert_allclose(distances(f, stats["class"]), [[5.0, 10.0]], rtol=1e-6)
    assert feature_scores(f, stats, "mahalanobis")[0] == pytest.approx(5.0, rel=1e-6)
    # Background: (4 - 5)^2 / 29 + 1^2 / 1 = 1 + 1/29; relative: min(5, 10) - (1 + 1/29).
    np.testing.assert_allclose(distances(f, stats["background"]), [[1 + 1 / 29]], rtol=1e-6)
    assert feature_scores(f, stats, "relative_mahalanobis")[0] == pytest.approx(4 - 1 / 29, rel=1e-6)
    # A class mean itself is at distance 0.
    assert feature_scores(np.array([[10.0, 0.0]]), stats, "mahalanobis")[0] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(SkinclfError, match="width 3"):
        distances(np.zeros((1, 3)), stats["class"])


def test_shared_covariance_weighs_each_class_the_same() -> None:
    # Class 0: 8 points spread (+-1, 0); class 1: 2 points spread (0, +-3). Per-class covariances
    # diag(1, 0) and diag(0, 9); each class weighs 1/2: diag(0.5, 4.5) (pooled by count it
    # would be diag(0.8, 1.8)). From class 0's mean, (1, 3) is 1 / 0.5 + 9 / 4.5 = 4.
    a = np.array([[-1.0, 0.0], [1.0, 0.0]] * 4)
    b = np.array([[10.0, -3.0], [10.0, 3.0]])
    g = fit_gaussian(np.concatenate([a, b]), np.array([0] * 8 + [1] * 2), rank=1)
    assert distances(np.array([[1.0, 3.0]]), g)[0, 0] == pytest.approx(4.0, rel=1e-6)


def test_low_rank_form_is_the_full_precision_with_the_tail_averaged() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 6)) @ np.diag([5, 3, 2, 1, 0.5, 0.2])
    g = fit_gaussian(f, rank=2)
    cov = np.cov(f.T, bias=True)
    values, vectors = np.linalg.eigh(cov)
    values[:-2] = values[:-2].mean()  # the four smallest replaced by their mean (PPCA)
    precision = vectors @ np.diag(1 / values) @ vectors.T
    x = rng.normal(size=(5, 6)) * 3
    d = x - f.mean(axis=0)
    np.testing.assert_allclose(distances(x, g)[:, 0], np.einsum("ij,jk,ik->i", d, precision, d), rtol=1e-4)
    a = rng.normal(size=(3, 4)).astype("float32")
    np.testing.assert_array_equal(unpack(pack(a)), a)


# --- tiny models: features from every engine --------------------------------------------------


@pytest.fixture(scope="module")
def conv_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded conv net (conv, global average pooling, classifier) whose pooled features
    vary from image to image (a random MobileNet's are all ~1e-16: no test of anything)."""
    return make_tiny_bundle(tmp_path_factory.mktemp("conv") / "conv.keras", image_size=32, seed=3)


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.stack([np.asarray(lesion_image(CLASS_COLOURS[CLASSES[i % 7]], seed + i).resize((size, size)),
                                dtype="float32") for i in range(n)])


def test_keras_engine_gives_logits_and_features_from_one_pass(conv_bundle) -> None:
    from skinclf.backend import load_keras
    from skinclf.engines.load import load_engine
    from skinclf.model.bundle import load_bundle

    engine = load_engine(conv_bundle, engine="keras", batch_size=4)
    x = _images(5, 32)
    logits, features = engine.forward(x)
    assert logits.shape == (5, 7) and features.shape == (5, engine.features_dim) and engine.features_dim == 8
    assert features.std(axis=0).min() > 1e-3  # features that differ per image
    np.testing.assert_allclose(engine.logits(x), logits, atol=1e-6)  # callers without features: unchanged
    model = load_bundle(conv_bundle).model
    pool = next(layer for layer in model.layers if type(layer).__name__ == "GlobalAveragePooling2D")
    pooled = load_keras().Model(model.inputs, pool.output).predict(x, verbose=0)
    np.testing.assert_allclose(features, pooled, atol=1e-4)


def test_onnx_export_features_equal_keras_and_old_files_still_run(conv_bundle, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from skinclf.engines.export import export_model
    from skinclf.engines.load import load_engine
    from skinclf.engines.onnx import OnnxEngine

    export_model(model=conv_bundle, format="onnx", out=tmp_path / "m.onnx")
    x = _images(6, 32, seed=3)
    keras_z, keras_f = load_engine(conv_bundle, engine="keras", batch_size=4).forward(x)
    onnx_engine = OnnxEngine(tmp_path / "m.onnx", batch_size=4)
    onnx_z, onnx_f = onnx_engine.forward(x)
    assert onnx_engine.features_dim == keras_f.shape[1]
    assert keras_f.std(axis=0).min() > 1e-3
    np.testing.assert_allclose(onnx_f, keras_f, atol=1e-4)
    np.testing.assert_allclose(onnx_z, keras_z, atol=1e-4)
    # A file exported before the features output: logits only, and the flag falls back to logits.
    proto = onnx.load(str(tmp_path / "m.onnx"))
    keep = [o for o in proto.graph.output if o.name != "features"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    old = OnnxEngine(tmp_path / "old.onnx", batch_size=4)
    z, f = old.forward(x)
    assert old.features_dim == 0 and f is None
    np.testing.assert_allclose(z, onnx_z, atol=1e-6)


def test_ensemble_features_are_the_members_side_by_side_in_keras_and_onnx(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from skinclf.backend import load_keras
    from skinclf.engines.export import export_model
    from skinclf.engines.load import load_engine
    from skinclf.model.bundle import load_bundle
    from skinclf.training.ensemble import ensemble_bundles

    members = [make_tiny_bundle(tmp_path / f"m{i}.keras", seed=i) for i in range(2)]
    ensemble_bundles(members=members, out=tmp_path / "e.keras")
    export_model(model=tmp_path / "e.keras", format="onnx", out=tmp_path / "e.onnx")
    x = np.random.default_rng(6).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    keras = load_keras()
    models = [load_bundle(p).model for p in members]
    pooled = [keras.Model(m.inputs, next(la for la in m.layers if type(la).__name__ == "GlobalAveragePooling2D"
                                         ).output).predict(x, verbose=0) for m in models]
    _, keras_f = load_engine(tmp_path / "e.keras", engine="keras").forward(x)
    _, onnx_f = load_engine(tmp_path / "e.onnx", engine="onnx").forward(x)
    assert keras_f.shape == (5, 16) and keras_f.std(axis=0).min() > 1e-3
    np.testing.assert_allclose(keras_f, np.concatenate(pooled, axis=1), atol=1e-4)
    np.testing.assert_allclose(onnx_f, keras_f, atol=1e-4)


def test_runner_passes_features_through_and_averages_them_over_tta_views(conv_bundle, tmp_path) -> None:
    from skinclf.engines.load import load_engine
    from skinclf.engines.runner import _VIEWS, predict_files

    engine = load_engine(conv_bundle, engine="keras", batch_size=4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        lesion_image(CLASS_COLOURS[CLASSES[i]], i, size=(32, 32)).save(folder / f"{i}.png")
    (folder / "3_bad.png").write_bytes(b"not an image")
    paths = sorted(folder.iterdir())
    batch = next(predict_files(engine, paths, workers=1, tta=2))
    assert batch.features.shape == (4, engine.features_dim) and np.isnan(batch.features[3]).all()
    x = np.stack([np.asarray(lesion_image(CLASS_COLOURS[CLASSES[i]], i, size=(32, 32)), dtype="float32")
                  for i in range(3)])
    views = [engine.forward(np.ascontiguousarray(v(x)))[1] for v in _VIEWS[:2]]
    np.testing.assert_allclose(batch.features[:3], np.mean(views, axis=0), atol=1e-5)


def test_a_constructed_outlier_scores_above_in_distribution_images(conv_bundle) -> None:
    from skinclf.engines.load import load_engine

    engine = load_engine(conv_bundle, engine="keras", batch_size=8)
    train, held = _images(70, 32, seed=0), _images(21, 32, seed=500)
    _, f_train = engine.forward(train)
    stats = fit_feature_stats(f_train, np.arange(70) % 7, rank=4)
    rng = np.random.default_rng(9)
    stripes = np.zeros((2, 32, 32, 3), dtype="float32")
    stripes[0, :, ::4] = 255.0  # black and white stripes
    stripes[1] = rng.integers(0, 256, (32, 32, 3))  # uniform colour noise
    _, f_held = engine.forward(held)
    _, f_out = engine.forward(stripes)
    for score in ("mahalanobis", "relative_mahalanobis"):
        inside, outside = feature_scores(f_held, stats, score), feature_scores(f_out, stats, score)
        assert outside.min() > inside.max(), score
    z_held, _ = engine.forward(held)
    record = fit_ood(z_held, {"stripes": engine.forward(stripes)[0]}, pass_rate=0.9, inlier_features=f_held,
                     outlier_features={"stripes": f_out}, stats=stats, score="mahalanobis")
    _, flagged = flag(np.concatenate([z_held[:2], engine.logits(stripes)]), record,
                           np.concatenate([f_held[:2], f_out]))
    assert flagged.tolist() == [False, False, True, True] and record["fallback"]["score"] in ("energy", "max_logit",
                                                                                                "max_prob")
    json.dumps(record)  # the record goes into the bundle's JSON metadata as it is


def test_fit_ood_chooses_among_logit_and_feature_scores_and_keeps_a_fallback() -> None:
    rng = np.random.default_rng(0)
    f_train = rng.normal(size=(300, 8))
    y_train = np.arange(300) % 3
    f_train[:, 0] += 4 * y_train
    stats = fit_feature_stats(f_train, y_train, rank=4)
    f_in = rng.normal(size=(60, 8))
    f_in[:, 0] += 4 * (np.arange(60) % 3)
    f_out = rng.normal(size=(20, 8)) + 8.0  # far in every direction
    z_in, z_out = rng.normal(size=(60, 3)), rng.normal(size=(20, 3))  # logits that cannot tell them apart
    record = fit_ood(z_in, {"far": z_out}, inlier_features=f_in, outlier_features={"far": f_out}, stats=stats)
    assert record["score"] in ("mahalanobis", "relative_mahalanobis")
    assert record["flag_rates"]["far"] == 1.0 and record["flag_rates"]["validation split"] <= 0.05 + 1e-9
    assert set(record["separation"]) == {"energy", "max_logit", "max_prob", "mahalanobis", "relative_mahalanobis"}
    # An engine without features uses the fallback; a fitted record with features uses the score.
    assert active_record(record, has_features=False)["score"] == record["fallback"]["score"]
    assert active_record(record, has_features=True) is record
    _, flagged = flag(z_out, record, None)
    assert flagged.mean() == pytest.approx(np.mean(-np.log(np.exp(z_out).sum(1)) > record["fallback"]["threshold"])) \
        if record["fallback"]["score"] == "energy" else True
    with pytest.raises(SkinclfError, match="needs the model's features"):
        fit_ood(z_in, {"far": z_out}, score="mahalanobis")


def test_bundles_without_feature_statistics_keep_the_energy_flag(tiny_bundle, tmp_path, runner) -> None:
    from skinclf.cli import app

    old = {"score": "energy", "threshold": -1e9, "pass_rate": 0.95, "fitted_on": "validation split"}
    model = with_ood_record(tiny_bundle, tmp_path / "old.keras", old)
    images = lesion_folder(tmp_path / "images", 2)
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(images), "--out", str(out), "--model", str(model)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        assert [r["warning"] for r in csv.DictReader(fh)] == [WARNING] * 2
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["ood"]["score"] == "energy"


def test_predict_flags_with_the_feature_score(conv_bundle, tmp_path, runner) -> None:
    from skinclf.cli import app
    from skinclf.engines.load import load_engine
    from skinclf.model.bundle import load_bundle, save_bundle

    engine = load_engine(conv_bundle, engine="keras", batch_size=8)
    train = _images(70, 32)
    stats = fit_feature_stats(engine.forward(train)[1], np.arange(70) % 7, rank=4)
    # Threshold between the inliers and a stripes picture, as calibrate would place it.
    stripes = np.zeros((1, 32, 32, 3), dtype="float32")
    stripes[0, :, ::4] = 255.0
    inliers = _images(14, 32, seed=300)
    threshold = float(feature_scores(engine.forward(inliers)[1], stats, "mahalanobis").max())
    assert feature_scores(engine.forward(stripes)[1], stats, "mahalanobis")[0] > threshold
    record = {"score": "mahalanobis", "threshold": threshold, "features": stats, "pass_rate": 0.95,
              "fitted_on": "validation split", "fallback": {"score": "energy", "threshold": 1e9}}
    bundle = load_bundle(conv_bundle)
    model = save_bundle(bundle.model, tmp_path / "feat.keras", {**bundle.meta, "ood": record})
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(inliers[5].astype(np.uint8)).save(folder / "a_lesion.png")  # lossless: the same pixels
    Image.fromarray(stripes[0].astype(np.uint8)).save(folder / "b_stripes.png")
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(model),
                                 "--engine", "keras"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows["b_stripes.png"]["warning"] == WARNING and rows["a_lesion.png"]["warning"] == ""
    assert json.loads(Path(f"{out}.json").read_text())["ood"]["score"] == "mahalanobis"
    with zipfile.ZipFile(model) as zf:  # the statistics travel in the bundle's metadata
        assert json.loads(zf.read("skinclf.json"))["ood"]["features"]["class"]["rank"] == 4


def _feature_bundle(engine, source: Path, out: Path) -> tuple[Path, np.ndarray]:
    """`source` with a Mahalanobis record whose threshold passes a set of lesion images and
    catches a stripes picture; returns the bundle and the stripes."""
    from skinclf.model.bundle import load_bundle, save_bundle

    stats = fit_feature_stats(engine.forward(_images(70, 32))[1], np.arange(70) % 7, rank=4)
    stripes = np.zeros((1, 32, 32, 3), dtype="float32")
    stripes[0, :, ::4] = 255.0
    threshold = float(feature_scores(engine.forward(_images(14, 32, seed=300))[1], stats, "mahalanobis").max())
    record = {"score": "mahalanobis", "threshold": threshold, "features": stats, "pass_rate": 0.95,
              "fitted_on": "validation split", "flag_rates": {"validation split": 0.05, "stripes": 1.0},
              "held_out": {"flag_rate": 0.04}, "fallback": {"score": "energy", "threshold": 1e9, "flag_rates": {}}}
    bundle = load_bundle(source)
    metrics = {"validation": {"n": 9, "balanced_accuracy": 0.9}, "test": {"n": 8, "balanced_accuracy": 0.7,
                                                                          "note": "second look"}}
    return save_bundle(bundle.model, out, {**bundle.meta, "ood": record, "metrics": metrics}), stripes


def test_serve_flags_with_features_and_api_model_shows_test_figures_and_flag_rates(conv_bundle, tmp_path) -> None:
    import io

    from PIL import Image

    from skinclf.engines.load import load_engine
    from skinclf.web.routes import model_info
    from skinclf.web.classifier import Classifier, Limits, Upload, classify_uploads

    model, stripes = _feature_bundle(load_engine(conv_bundle, engine="keras"), conv_bundle, tmp_path / "f.keras")
    engine = load_engine(model, engine="keras", batch_size=4)
    uploads = []
    for name, array in (("lesion.png", _images(14, 32, seed=300)[2]), ("stripes.png", stripes[0])):
        buf = io.BytesIO()
        Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
        uploads.append(Upload(name, bytearray(buf.getvalue())))
    classifier = Classifier(engine)
    try:
        rows = classify_uploads(classifier, uploads, classes=engine.classes, image_size=32, top_k=1, all_probs=False)
    finally:
        classifier.close()
    assert [r[-1] for r in rows] == ["", WARNING]
    info = model_info(engine, Limits(), 1)
    assert info["accepted_with"]["split"] == "test" and info["accepted_with"]["balanced_accuracy"] == 0.7
    assert info["metrics"]["validation"]["balanced_accuracy"] == 0.9
    assert info["ood"]["score"] == "mahalanobis" and info["ood"]["flag_rates"]["stripes"] == 1.0
    assert info["ood"]["held_out"] == {"flag_rate": 0.04}
    json.dumps(info)


# --- explain: flat maps -----------------------------------------------------------------------


class ConstantEngine:
    """The same probabilities whatever is covered: occlusion moves nothing."""

    classes = ("a", "b")
    image_size = 32

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.tile([[0.7, 0.3]], (len(images), 1))


def test_explain_says_when_a_map_is_flat(tmp_path) -> None:
    from skinclf.trust.explain import FLAT_DROP, explain_files

    lesion_image((150, 100, 70), 1, size=(40, 40)).save(tmp_path / "a.png")
    summary = explain_files(ConstantEngine(), [("a.png", tmp_path / "a.png")], tmp_path / "out", patch=8, stride=8,
                             top_k=2)
    [done] = summary.explained
    assert done.flat and done.max_drop < FLAT_DROP
