"""What the clinician reads means what it says: every number, warning and column of the output.

The out-of-distribution warning has two tiers worded for their rates ("unusual image" for about
1 dermoscopic image in 20, "very unlike the training images" for none of the validation images)
and a readable `ood_percentile` column; the CSV always has `mel_prob` and the spelled-out
`top1_name`; inputs and outputs a clinic gets wrong (an .xlsx name, a missing folder, another
folder's results, one image, metadata ids with extensions, skinclf's own heat maps) are refused
or handled; serve's API and page give the same columns and the page sorts by melanoma probability.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinclf.cli.app import app
from utils.models import make_tiny_bundle, with_ood_record
from utils.paths import BUNDLED_MODEL as BUNDLED
from utils.synthetic import CLASSES, lesion_folder, lesion_image


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --- warnings that are true -------------------------------------------------------------------


def test_tiers_and_percentile_are_fitted_with_the_threshold() -> None:
    from skinclf.model.outlier import WARNING, WARNING_RARE, levels, percentile
    from skinclf.trust.ood import fit_ood

    rng = np.random.default_rng(0)
    inliers = rng.normal(0, 1, (400, 5)) + np.eye(5)[rng.integers(0, 5, 400)] * 6
    outliers = {"flat": rng.normal(0, 0.01, (30, 5))}
    record = fit_ood(inliers, outliers, score="max_logit")
    assert record["warning"] == WARNING and record["rare_warning"] == WARNING_RARE
    inside = -inliers.max(axis=1)
    assert record["rare_threshold"] > inside.max()  # no validation image is "very unlike"
    assert record["rare_flag_rates"]["validation split"] == 0.0
    assert record["rare_flag_rates"]["flat"] == 1.0
    scores, pct, level = levels(np.vstack([inliers, outliers["flat"]]), record)
    assert set(level[:400]) <= {0, 1} and (level[400:] == 2).all()
    assert 4.0 <= float(np.mean(level[:400] == 1)) * 100 <= 6.0  # the 5% tier stays 5%
    assert (pct[:400] >= 0).all() and (pct[:400] < 100).all() and (pct[400:] == 100).all()
    # The percentile is the share of validation images scoring lower.
    assert percentile(np.array([np.median(inside)]), record)[0] == pytest.approx(50, abs=0.5)


def test_a_record_without_tiers_keeps_one_tier_and_no_percentile() -> None:
    from skinclf.model.outlier import levels

    z = np.array([[3.0, 0.0], [0.1, 0.0]])
    scores, pct, level = levels(z, {"score": "max_logit", "threshold": -1.0})
    assert list(level) == [0, 1] and np.isnan(pct).all()


def test_predict_words_each_tier_and_writes_the_percentile(runner, tiny_bundle, tmp_path: Path) -> None:
    from skinclf.model.outlier import WARNING, WARNING_RARE, pack

    images = lesion_folder(tmp_path / "images", 3)
    record = {"score": "max_logit", "threshold": -1e9, "pass_rate": 0.95, "fitted_on": "validation split",
              "reference_scores": pack(np.linspace(-1.0, -0.2, 100)), "rare_threshold": 1e9}
    model = with_ood_record(tiny_bundle, tmp_path / "unusual.keras", record)
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(images), "--out", str(out), "--model", str(model)])
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert "ood_score" not in rows[0] and all(0 <= float(r["ood_percentile"]) <= 100 for r in rows)
    assert [r["warning"] for r in rows] == [WARNING] * 3
    assert "3 unusual (less reliable results)" in " ".join(result.output.split())
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert "share" in sidecar["ood"]["ood_percentile"] and set(sidecar["ood"]["tiers"]) == {"unusual", "very unlike"}
    rare = with_ood_record(tiny_bundle, tmp_path / "rare.keras", {**record, "rare_threshold": -1e9})
    result = runner.invoke(app, ["predict", str(images), "--out", str(out), "--model", str(rare)])
    assert [r["warning"] for r in rows_of(out)] == [WARNING_RARE] * 3
    assert "3 very unlike the training images" in " ".join(result.output.split())


def test_the_bundled_model_has_both_tiers_with_measured_rates() -> None:
    from skinclf.model.bundle_meta import read_bundle_meta

    ood = read_bundle_meta(BUNDLED)["ood"]
    assert ood["rare_threshold"] > ood["threshold"] and ood["reference_scores"]["shape"] == [1504]
    # calibrate's record: each tier's rate on validation and the reference sets; held_out: on test
    assert ood["rare_flag_rates"]["validation split"] == 0.0 and ood["rare_flag_rates"]["flat colours"] == 1.0
    assert 0.03 <= ood["held_out"]["flag_rate"] <= 0.07


# --- a CSV a clinician can read -----------------------------------------------------------------


def test_melanoma_probability_and_class_name_are_always_in_the_csv(runner, tiny_bundle, tmp_path: Path) -> None:
    from skinclf.batch.results import CLASS_NAMES, read_predictions

    images = lesion_folder(tmp_path / "images", 3)
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(images), "--out", str(out), "--model", str(tiny_bundle),
                                 "--top-k", "1"])
    assert result.exit_code == 0, result.output
    for r in rows_of(out):
        assert 0 <= float(r["mel_prob"]) <= 1 and r["top1_name"] == CLASS_NAMES[r["top1_class"]]
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["classes"] == {c: CLASS_NAMES[c] for c in CLASSES}
    assert len(read_predictions(out)) == 3  # evaluate --predictions still reads it
    # A CSV of an older skinclf (raw ood_score, no mel_prob) is not resumed silently.
    old = tmp_path / "old.csv"
    old.write_text('"path","top1_class","top1_prob","ood_score","error","warning"\n"0.jpg","nv","0.5","1.0","",""\n')
    result = runner.invoke(app, ["predict", str(images), "--out", str(old), "--model", str(tiny_bundle),
                                 "--top-k", "1", "--resume"])
    assert result.exit_code == 1 and "not the ones this skinclf writes" in result.output


def test_xlsx_missing_folder_and_another_folders_results_are_refused(runner, tiny_bundle, tmp_path: Path) -> None:
    images = lesion_folder(tmp_path / "images", 2)
    other = lesion_folder(tmp_path / "other", 2)
    base = ["--model", str(tiny_bundle)]
    xlsx = runner.invoke(app, ["predict", str(images), "--out", str(tmp_path / "r.xlsx"), *base])
    assert xlsx.exit_code == 1 and "r.csv" in xlsx.output and not (tmp_path / "r.xlsx").exists()
    missing = runner.invoke(app, ["predict", str(images), "--out", str(tmp_path / "nonexist" / "dir" / "r.csv"), *base])
    assert missing.exit_code == 1 and len(missing.output.strip().splitlines()) == 1
    assert "does not exist" in missing.output and not (tmp_path / "nonexist").exists()
    out = tmp_path / "same.csv"
    assert runner.invoke(app, ["predict", str(images), "--out", str(out), *base]).exit_code == 0
    assert runner.invoke(app, ["predict", str(images), "--out", str(out), *base]).exit_code == 0  # same folder: fine
    again = runner.invoke(app, ["predict", str(other), "--out", str(out), *base])
    assert again.exit_code == 1 and "another folder" in again.output and "--overwrite" in again.output
    assert runner.invoke(app, ["predict", str(other), "--out", str(out), *base, "--overwrite"]).exit_code == 0


def test_one_image_is_classified(runner, tiny_bundle, tmp_path: Path) -> None:
    images = lesion_folder(tmp_path / "images", 2)
    out = tmp_path / "one.csv"
    result = runner.invoke(app, ["predict", str(images / "1.jpg"), "--out", str(out), "--model", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in rows_of(out)] == ["1.jpg"] and rows_of(out)[0]["error"] == ""


# --- metadata ---------------------------------------------------------------------------------


def _meta(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meta.csv"
    path.write_text(text)
    return path


def test_metadata_ids_with_an_extension_match(tmp_path: Path) -> None:
    from skinclf.batch.patient import join, read_metadata

    files = ["ISIC_1.jpg", "ISIC_2.jpg"]
    for text in ("image_id,age\nISIC_1.jpg,50\nISIC_2.JPG,60\n", "Image,age\nISIC_1.jpg,50\nISIC_2.jpg,60\n"):
        joined = join(read_metadata(_meta(tmp_path, text)), files)
        assert set(joined.per_file) == set(files) and not joined.not_in_folder


def test_metadata_that_matches_almost_nothing_stops_and_doubles_are_refused(tmp_path: Path) -> None:
    from skinclf.batch.patient import join, read_metadata
    from skinclf.errors import SkinclfError

    files = ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(SkinclfError, match="3 of 3 rows match no image"):
        join(read_metadata(_meta(tmp_path, "image_id,age\nx1,50\nx2,60\nx3,70\n")), files)
    with pytest.raises(SkinclfError, match="a.jpg is named twice, by path on line 2 and by id a on line 3"):
        join(read_metadata(_meta(tmp_path, "path,image_id,age\na.jpg,,50\n,a,60\n")), files)


# --- skinclf's own outputs are never inputs ---------------------------------------------------


def test_explain_into_its_own_folder_twice_and_predict_skip_the_heat_maps(runner, tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    lesion_image((150, 100, 70), 1, (64, 48)).save(folder / "x.jpg")
    Image.new("RGB", (6, 6), (120, 80, 60)).save(folder / "small.jpg")
    args = ["explain", str(folder), "--out", str(folder), "--model", str(tiny_bundle), "--stride", "16",
            "--patch", "16", "--overwrite"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "far below the model's" in first.output  # the warning predict and the page give
    maps = sorted(p.name for p in folder.glob("*.png"))
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in folder.glob("*.png")) == maps  # no map of a map
    assert "2 explained" in second.output
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in rows_of(out)] == ["small.jpg", "x.jpg"]
    assert "heat maps" in " ".join(result.output.split())


# --- serve ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from skinclf.engines.load import load_engine
    from skinclf.web.routes import create_app

    model = make_tiny_bundle(tmp_path_factory.mktemp("serve28") / "tiny.keras")
    return model, create_app(load_engine(model, batch_size=8))


def test_api_rows_have_the_melanoma_column_and_the_names(served) -> None:
    from fastapi.testclient import TestClient

    from skinclf.batch.results import CLASS_NAMES

    _, web = served
    client = TestClient(web, base_url="http://127.0.0.1:8123")
    buf = io.BytesIO()
    lesion_image((150, 100, 70), 3).save(buf, "JPEG")
    answer = client.post("/api/predict?top_k=1", files=[("files", ("a.jpg", buf.getvalue(), "image/jpeg"))]).json()
    row = answer["results"][0]
    assert "mel_prob" in answer["columns"] and 0 <= float(row["mel_prob"]) <= 1
    assert row["top1_name"] == CLASS_NAMES[row["top1_class"]]
    assert client.get("/api/model").json()["class_names"]["akiec"] == CLASS_NAMES["akiec"]
    assert "http://127.0.0.1:8123/api/predict" in client.get("/docs").text  # the server's own port


def test_413_says_mib(served) -> None:
    from fastapi.testclient import TestClient

    from skinclf.web.classifier import Limits
    from skinclf.web.routes import create_app

    model, _ = served
    from skinclf.engines.load import load_engine

    web = create_app(load_engine(model, batch_size=8), limits=Limits(max_file_bytes=26_214_400 // 25600))
    r = TestClient(web).post("/api/predict", files=[("files", ("a.jpg", b"x" * 2048, "image/jpeg"))])
    assert r.status_code == 413 and "MiB" in r.json()["detail"]


@pytest.mark.integration
def test_page_sorts_by_melanoma_counts_passed_over_files_and_downloads_mel_prob(served, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from skinclf.web.server import background_server
    from utils.browser import headless_chromium

    model, web = served
    folder = tmp_path / "visit"
    folder.mkdir()
    for i, colour in enumerate(((150, 100, 70), (60, 40, 30), (200, 120, 120))):
        lesion_image(colour, i, (120, 90)).save(folder / f"{i}.jpg")
    (folder / "notes.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"\0")
    from skinclf.batch.predict import predict_directory

    predict_directory(directory=folder, out=tmp_path / "expected.csv", model=model, show_progress=False)
    expected = rows_of(tmp_path / "expected.csv")
    by_mel = [r["path"] for r in sorted(expected, key=lambda r: -float(r["mel_prob"]))]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = headless_chromium(downloads)
    try:
        with background_server(web) as url:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "model-name").text.startswith("tiny"))
            driver.find_element(By.ID, "folder").send_keys(str(folder))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.result[data-state='done']")) == 3)
            order = [li.get_attribute("data-path") for li in driver.find_elements(By.CSS_SELECTOR, "li.result")]
            assert order == by_mel  # the default order: melanoma probability, highest first
            status = driver.find_element(By.ID, "status").text
            assert "2 other files passed over" in status and "notes.txt" in status, status
            driver.find_element(By.ID, "download").click()
            target = downloads / "results.csv"
            wait.until(lambda d: target.exists() and not list(downloads.glob("*.crdownload")))
            got = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
            assert [r["mel_prob"] for r in got] == [r["mel_prob"] for r in expected]
    finally:
        driver.quit()


def test_a_resume_with_nothing_left_prints_no_speed(runner, tiny_bundle, tmp_path: Path) -> None:
    images = lesion_folder(tmp_path / "images", 2)
    out = tmp_path / "r.csv"
    assert runner.invoke(app, ["predict", str(images), "--out", str(out), "--model", str(tiny_bundle)]).exit_code == 0
    again = runner.invoke(app, ["predict", str(images), "--out", str(out), "--model", str(tiny_bundle), "--resume"])
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert "nothing left to classify" in text and "img/s" not in text
