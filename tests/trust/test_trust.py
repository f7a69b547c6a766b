"""Trust: calibration (ECE, temperature), out-of-distribution flags, occlusion heat maps,
and the `calibrate` / `explain` commands."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from utils.models import with_ood_record
from utils.synthetic import lesion_folder, lesion_image, CLASSES, CLASS_COLOURS
from PIL import Image

from skinclf.cli import app
from skinclf.errors import SkinclfError
from skinclf.model.outlier import SCORES, WARNING, flag, ood_scores
from skinclf.model.posthoc import expected_calibration_error, fit_temperature, softmax
from skinclf.trust.explain import explain_files, occlusion_map
from skinclf.trust.ood import auroc, fit_ood
from skinclf.trust.reference_images import reference_outliers

# --- calibration ------------------------------------------------------------------------------


def hand_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE written out plainly: bins (k/bins, (k+1)/bins], weighted |accuracy - confidence|."""
    total = 0.0
    for k in range(bins):
        inside = [i for i in range(len(labels))
                  if k / bins < probs[i].max() <= (k + 1) / bins or (k == 0 and probs[i].max() == 0)]
        if inside:
            confidence = np.mean([probs[i].max() for i in inside])
            accuracy = np.mean([probs[i].argmax() == labels[i] for i in inside])
            total += len(inside) / len(labels) * abs(accuracy - confidence)
    return total


def test_ece_against_a_hand_worked_example() -> None:
    # Two images at confidence 0.9 (one right, one wrong): bin (13/15, 14/15], gap |0.5 - 0.9| = 0.4.
    # Two at 0.6 and 0.62 (both right): bin (8/15, 9/15] holds 0.6; 0.62 is in (9/15, 10/15]:
    # gaps 0.4 and 0.38. ECE = (2 * 0.4 + 0.4 + 0.38) / 4 = 0.395.
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.38, 0.62]])
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.395)
    assert hand_ece(probs, labels) == pytest.approx(0.395)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_temperature_scaling_lowers_the_ece_of_over_confident_logits() -> None:
    rng = np.random.default_rng(0)
    n, k = 4000, 5
    true_logits = rng.normal(0, 1.5, (n, k))
    labels = np.array([rng.choice(k, p=p) for p in softmax(true_logits)])  # labels drawn from the model: calibrated
    over_confident = 3.0 * true_logits
    t = fit_temperature(softmax(over_confident), labels)
    before = hand_ece(softmax(over_confident), labels)
    after = hand_ece(softmax(over_confident / t), labels)
    assert t == pytest.approx(3.0, rel=0.15)
    assert before > 0.1 and after < before / 3
    assert after == pytest.approx(expected_calibration_error(softmax(over_confident / t), labels))


# --- out-of-distribution ----------------------------------------------------------------------


class PrototypeEngine:
    """A tiny deterministic model: logits are minus the squared distance of an image's mean colour
    to each class's colour, so images near one class colour get a confident, large logit."""

    classes = list(CLASSES)
    image_size = 32

    def __init__(self) -> None:
        self.centres = np.array([CLASS_COLOURS[c] for c in CLASSES], dtype="float64")

    def logits(self, images: np.ndarray) -> np.ndarray:
        colour = np.asarray(images, dtype="float64").reshape(len(images), -1, 3).mean(axis=1)
        return -((colour[:, None, :] - self.centres[None]) ** 2).sum(axis=2) / 400.0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images))


def test_ood_score_ranks_a_constructed_outlier_above_in_distribution_images() -> None:
    engine = PrototypeEngine()
    rng = np.random.default_rng(1)
    inliers = np.stack([np.full((32, 32, 3), CLASS_COLOURS[CLASSES[i % 7]], dtype="float32")
                        + rng.normal(0, 6, (32, 32, 3)) for i in range(70)])
    outlier = np.full((1, 32, 32, 3), (0, 255, 255), dtype="float32")  # cyan: far from every class colour
    z_in, z_out = engine.logits(inliers), engine.logits(outlier)
    for score in ("energy", "max_logit", "max_prob"):
        assert ood_scores(z_out, score)[0] > ood_scores(z_in, score).max(), score
    record = fit_ood(z_in, {"cyan": z_out}, pass_rate=0.95)
    assert record["flag_rates"]["validation split"] <= 0.05 + 1e-9 and record["flag_rates"]["cyan"] == 1.0
    scores, flagged = flag(np.concatenate([z_in[:3], z_out]), record)
    assert flagged.tolist() == [False, False, False, True] and scores[3] > record["threshold"]
    with pytest.raises(SkinclfError, match="choose one of"):
        ood_scores(z_in, "entropy")


def test_auroc_and_score_formulas_by_hand() -> None:
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0
    assert auroc(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == 0.75
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    z = np.array([[0.0, np.log(3.0)]])  # softmax (0.25, 0.75), logsumexp log 4
    assert ood_scores(z, "energy")[0] == pytest.approx(-np.log(4.0))
    assert ood_scores(z, "max_logit")[0] == pytest.approx(-np.log(3.0))
    assert ood_scores(z, "max_prob")[0] == pytest.approx(-0.75)


def test_reference_outliers_are_deterministic_model_sized_sets() -> None:
    first, second = reference_outliers(size=40, seed=3, per_set=4), reference_outliers(size=40, seed=3, per_set=4)
    assert {"photographs", "text", "flat colours", "noise", "tiny images", "screenshots"} <= set(first)
    for name, images in first.items():
        assert images.shape[1:] == (40, 40, 3) and images.dtype == np.float32, name
        np.testing.assert_array_equal(images, second[name])
    assert len(first["photographs"]) >= 10  # scikit-learn's two photographs, whole and cropped, at least


# --- occlusion heat maps ----------------------------------------------------------------------


class BrightSquareEngine:
    """p(class 0) rises with the brightness of the region rows 8..15, columns 20..27 only."""

    classes = ["square", "other"]
    image_size = 32

    def __call__(self, images: np.ndarray) -> np.ndarray:
        region = np.asarray(images)[:, 8:16, 20:28].mean(axis=(1, 2, 3))
        p = 1 / (1 + np.exp(-(region - 100) / 30))
        return np.stack([p, 1 - p], axis=1)


def square_image(size: int = 32) -> np.ndarray:
    image = np.full((size, size, 3), 40.0, dtype="float32")
    image[8:16, 20:28] = 250.0
    return image


@pytest.mark.parametrize("fill", ["blur", "grey", "mean"])
def test_occlusion_map_peaks_on_the_bright_square(fill: str) -> None:
    heat, probs = occlusion_map(BrightSquareEngine(), square_image(), patch=8, stride=4, fill=fill)
    assert heat.shape == (32, 32) and probs.argmax() == 0
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert 8 <= row < 16 and 20 <= col < 28
    assert heat[8:16, 20:28].mean() > 5 * max(heat[24:, :12].mean(), 1e-9)


def test_occlusion_rejects_bad_settings() -> None:
    with pytest.raises(SkinclfError, match="--fill"):
        occlusion_map(BrightSquareEngine(), square_image(), fill="pink")
    with pytest.raises(SkinclfError, match="--patch"):
        occlusion_map(BrightSquareEngine(), square_image(), patch=64, stride=8)


def test_explain_writes_pngs_with_the_input_sized_panels_and_skips_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    picture = Image.fromarray(np.uint8(np.clip(np.kron(square_image(), np.ones((2, 2, 1)))[:, :60], 0, 255)))
    picture.save(src / "square.png")  # 60 x 64, lossless
    (src / "broken.jpg").write_bytes(b"not an image")
    files = [("broken.jpg", src / "broken.jpg"), ("square.png", src / "square.png")]
    summary = explain_files(BrightSquareEngine(), files, tmp_path / "out", top_k=2, patch=8, stride=4,
                            show_progress=False)
    assert [e for e, _ in summary.errors] == ["broken.jpg"] and len(summary.explained) == 1
    item = summary.explained[0]
    assert item.png == tmp_path / "out" / "square.png" and item.panel_size == (60, 64)
    assert item.top[0][0] == "square" and item.unlike_training is None
    with Image.open(item.png) as im:
        im.verify()
    with Image.open(item.png) as im:
        assert im.format == "PNG" and im.width > 2 * 60 and im.height >= 64
        np.testing.assert_array_equal(np.asarray(im.convert("RGB"))[:64, :60], np.asarray(picture))
        overlay = np.asarray(im.convert("RGB"))[:64, 66:126].astype(int)
    assert np.abs(overlay - np.asarray(picture, dtype=int)).mean() > 5  # the map is drawn over the image
    assert 8 / 32 <= item.peak[0] < 16 / 32 and 20 / 32 <= item.peak[1] < 28 / 32


# --- commands on a tiny MobileNet bundle ------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skinclf.model.bundle import save_bundle
    from skinclf.model.network import PREPROCESSING, build_model

    model = build_model(num_classes=7, image_size=64, alpha=0.25, weights=None, seed=0)
    meta = {"name": "tiny", "classes": list(CLASSES), "input_size": [64, 64], "preprocessing": PREPROCESSING,
            "metrics": {"validation": {}}}
    return save_bundle(model, tmp_path_factory.mktemp("mobilenet") / "tiny.keras", meta)


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled") / "val"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(4):
            lesion_image(CLASS_COLOURS[name], 100 * c + j).save(root / name / f"{name}_{j}.jpg")
    return root


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled") / "train"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(4):
            lesion_image(CLASS_COLOURS[name], 1000 + 100 * c + j).save(root / name / f"{name}_{j}.jpg")
    return root


def bundle_meta(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("skinclf.json"))


def test_calibrate_command_folds_the_temperature_and_fits_the_ood_flag(runner, mobilenet_bundle, labelled_folder,
                                                                       train_folder, tmp_path: Path) -> None:
    from skinclf.engines.load import load_engine

    out = tmp_path / "calibrated.keras"
    result = runner.invoke(app, ["calibrate", str(mobilenet_bundle), "--data", str(labelled_folder), "--out", str(out),
                                 "--report", str(tmp_path / "rep"), "--train", str(train_folder)])
    assert result.exit_code == 0, result.output
    assert "ECE" in result.output and "photographs" in result.output
    meta = bundle_meta(out)
    cal, ood = meta["calibration"], meta["ood"]
    factor = cal["refit"]["factor"]
    assert cal["temperature"] == pytest.approx(factor) and factor > 0 and cal["images"] == 28
    assert cal["validation_after"]["nll"] <= cal["validation_before"]["nll"] + 1e-9
    assert ood["score"] in SCORES and ood["pass_rate"] == 0.95
    assert {"mahalanobis", "relative_mahalanobis", "energy"} <= set(ood["separation"])  # features were candidates
    assert set(ood["flag_rates_per_class"]) == set(CLASSES)
    assert ood["flag_rates"][str(labelled_folder)] <= 0.05 + 1e-9 and "text" in ood["flag_rates"]
    assert (tmp_path / "rep" / "reliability.png").is_file()
    assert json.loads((tmp_path / "rep" / "calibration.json").read_text())["ood"]["threshold"] == ood["threshold"]

    images = np.stack([np.asarray(lesion_image(CLASS_COLOURS[c], 7).resize((64, 64)), dtype="float32")
                       for c in CLASSES])
    before, after = load_engine(mobilenet_bundle).logits(images), load_engine(out).logits(images)
    np.testing.assert_allclose(after, before / factor, rtol=1e-4, atol=1e-5)

    # Calibrating again composes with the temperature already folded in.
    again = tmp_path / "twice.keras"
    assert runner.invoke(app, ["calibrate", str(out), "--data", str(labelled_folder), "--out", str(again),
                               "--train", str(train_folder)]).exit_code == 0
    second = bundle_meta(again)["calibration"]
    assert second["refit"]["previous_temperature"] == pytest.approx(factor)
    assert second["temperature"] == pytest.approx(factor * second["refit"]["factor"])


def test_calibrate_command_failures(runner, mobilenet_bundle, labelled_folder, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["calibrate", str(mobilenet_bundle), "--data", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: folder not found")
    bad_rate = runner.invoke(app, ["calibrate", str(mobilenet_bundle), "--data", str(labelled_folder),
                                   "--pass-rate", "1.5"])
    assert bad_rate.exit_code == 1 and "--pass-rate 1.5" in bad_rate.output
    no_train = runner.invoke(app, ["calibrate", str(mobilenet_bundle), "--data", str(labelled_folder),
                                   "--train", str(tmp_path / "none"), "--out", str(tmp_path / "x.keras")])
    assert no_train.exit_code == 1 and no_train.output.startswith(f"Error: --train {tmp_path / 'none'}: not a folder")
    same = runner.invoke(app, ["calibrate", str(mobilenet_bundle), "--data", str(labelled_folder),
                               "--train", str(labelled_folder), "--out", str(tmp_path / "x.keras")])
    assert same.exit_code == 1 and "is the --data folder" in same.output
    assert not (tmp_path / "x.keras").exists()
    # The held-out test split of the model's own split is refused: fitting there would bias every test figure.
    split = tmp_path / "prepared"
    (split / "test" / "nv").mkdir(parents=True)
    lesion_image(CLASS_COLOURS["nv"], 1).save(split / "test" / "nv" / "a.jpg")
    (split / "prepare.json").write_text(json.dumps({"fingerprint": "abc"}))
    from skinclf.model.bundle import load_bundle, save_bundle

    bundle = load_bundle(mobilenet_bundle)
    fingerprinted = save_bundle(bundle.model, tmp_path / "fp.keras", {**bundle.meta, "data": {"fingerprint": "abc"}})
    held_out = runner.invoke(app, ["calibrate", str(fingerprinted), "--data", str(split / "test")])
    assert held_out.exit_code == 1 and "held-out test split" in held_out.output
    assert not (tmp_path / "fp.keras").read_bytes() == b""  # untouched


def test_predict_adds_the_ood_score_and_warns_without_failing_strict(runner, tiny_bundle, tmp_path: Path) -> None:
    flag_all = {"score": "energy", "threshold": -1e9, "pass_rate": 0.95, "fitted_on": "validation split"}
    model = with_ood_record(tiny_bundle, tmp_path / "flags.keras", flag_all)
    images = lesion_folder(tmp_path / "images", 3)
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(images), "--out", str(out), "--model", str(model), "--strict"])
    assert result.exit_code == 0, result.output
    assert "3 unusual (less reliable results)" in result.output
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["warning"] for r in rows] == [WARNING] * 3
    # A record without the validation scores (calibrated before issue 28): one tier, no percentile.
    assert all(r["ood_percentile"] == "" and r["top1_class"] for r in rows)
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["ood"]["flagged"] == 3 and sidecar["ood"]["score"] == "energy"
    # Without a fitted threshold nothing is flagged and there is no percentile.
    plain = runner.invoke(app, ["predict", str(images), "--out", str(tmp_path / "p.csv"), "--model", str(tiny_bundle)])
    assert plain.exit_code == 0 and "unlike" not in plain.output
    with open(tmp_path / "p.csv", newline="") as fh:
        assert all(r["warning"] == "" and r["ood_percentile"] == "" for r in csv.DictReader(fh))


def test_explain_command_success_and_strict_failure(runner, tiny_bundle, tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    lesion_image((150, 100, 70), 1, size=(80, 60)).save(src / "a.jpg")
    lesion_image((60, 60, 200), 2, size=(40, 40)).save(src / "sub" / "b.png")
    (src / "x_bad.jpg").write_bytes(b"")
    out = tmp_path / "maps"
    ok = runner.invoke(app, ["explain", str(src), "--out", str(out), "--model", str(tiny_bundle), "--patch", "8",
                             "--stride", "8"])
    assert ok.exit_code == 0, ok.output
    assert "x_bad.jpg: empty file" in ok.output and "2 explained, 1 could not be read" in ok.output
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "sub__b.png"]
    listing = json.loads((out / "explain.json").read_text())
    assert [i["path"] for i in listing["images"]] == ["a.jpg", "sub/b.png"]
    assert listing["images"][0]["panel_size"] == [80, 60] and listing["errors"][0]["path"] == "x_bad.jpg"
    strict = runner.invoke(app, ["explain", str(src), "--out", str(out), "--model", str(tiny_bundle), "--patch", "8",
                                 "--stride", "8", "--strict"])
    assert strict.exit_code == 1 and "Error: 1 of 3 files could not be explained" in strict.output
    bad = runner.invoke(app, ["explain", str(src), "--out", str(out), "--model", str(tiny_bundle), "--fill", "pink"])
    assert bad.exit_code == 1 and "choose one of blur, grey, mean" in bad.output


def _blank_runs(strip: np.ndarray) -> list[int]:
    """Widths of the runs of blank columns between the first and last inked column."""
    ink = (strip < 128).any(axis=(0, 2)) if strip.ndim == 3 else (strip < 128).any(axis=0)
    cols = np.nonzero(ink)[0]
    runs, blank = [], 0
    for inked in ink[cols[0] : cols[-1] + 1]:
        if inked:
            runs, blank = (runs + [blank] if blank else runs), 0
        else:
            blank += 1
    return runs


def test_explain_labels_keep_their_spaces() -> None:
    """The first label, "map: drop in p(nv)", has three spaces: three gaps wider than any gap
    between letters (Pillow's built-in font drew 2-pixel spaces, so words ran together)."""
    from skinclf.trust.explain import BAR_PANEL, GAP, render

    shown = Image.new("RGB", (40, 40), (128, 128, 128))
    canvas = render(shown, np.zeros((8, 8)), np.array([0.2, 0.8]), ["mel", "nv"], top_k=2, max_drop=0.5)
    x0 = 2 * 40 + 2 * GAP
    line = np.asarray(canvas)[2:17, x0 : x0 + BAR_PANEL]
    gaps = _blank_runs(line)
    assert sum(1 for g in gaps if g >= 4) == 3, gaps
