"""Issue 32: DICOM in (predict reads .dcm / DICM files), SR out (--sr), and the reading rules.

DICOM files are built with pydicom (tests/utils/dicom_files.py) from the shared sample JPEGs:
uncompressed RGB and JPEG baseline encapsulating the JPEG's own bytes, with and without the
metadata tags, always with patient-identifying tags set, which must appear in no output.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED_FULLRES, lesion_image, require

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from utils import dicom_files as D  # noqa: E402

ONNX = REPO / "models" / "skinclf-mobilenet.onnx"
SAMPLES = ("ISIC_0024358.jpg", "ISIC_0024359.jpg")
TAGS = {"PatientAge": "045Y", "PatientSex": "F", "region": "Upper arm"}


# --- reading (no model, no shared data) ---------------------------------------------------------

def test_uncompressed_rgb_reads_back_exactly(tmp_path: Path) -> None:
    from skinclf.dicom.read import read_dicom

    pixels = np.asarray(lesion_image((150, 100, 70), 0, (40, 30)))
    image = read_dicom(D.uncompressed(pixels, tmp_path / "a.dcm", tags=TAGS), max_pixels=10**6)
    assert image.jpeg is None and np.array_equal(image.pixels, pixels)
    assert (image.tags.age, image.tags.sex, image.tags.site) == (45.0, "female", "upper extremity")
    assert not hasattr(image.tags, "patient_name") and "Doe" not in repr(image)


def test_ybr_full_is_converted_to_rgb(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    from skinclf.dicom.read import read_dicom

    rgb = np.asarray(lesion_image((200, 60, 60), 1, (32, 24)))
    ds = D.dataset(24, 32)
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    ds.save_as(tmp_path / "y.dcm", enforce_file_format=True)
    out = read_dicom(tmp_path / "y.dcm", max_pixels=10**6).pixels
    assert np.abs(out.astype(int) - rgb).max() <= 2


@pytest.mark.parametrize(("make", "says"), [
    (D.grayscale, "grayscale DICOM (MONOCHROME2"),
    (D.multiframe, "multi-frame DICOM (2 frames"),
    (D.no_pixels, "DICOM object without pixel data (Comprehensive SR Storage)"),
])
def test_what_cannot_be_classified_says_what_it_is(tmp_path: Path, make, says: str) -> None:
    from skinclf.data.images import ImageError, load_image

    with pytest.raises(ImageError, match="^" + re.escape(says)):
        load_image(make(tmp_path / "x.dcm"), 32)


def test_dicom_is_found_by_extension_or_preamble(tmp_path: Path) -> None:
    from skinclf.data.walk import walk_images
    from skinclf.dicom.read import is_dicom

    pixels = np.asarray(lesion_image((150, 100, 70), 0))
    D.uncompressed(pixels, tmp_path / "IMG0001")  # no extension, as PACS exports often are
    D.uncompressed(pixels, tmp_path / "b.DCM")
    (tmp_path / "notes.txt").write_text("x" * 200)
    assert is_dicom(tmp_path / "IMG0001") and not is_dicom(tmp_path / "notes.txt")
    walk = walk_images(tmp_path)
    assert walk.files == ["IMG0001", "b.DCM"] and walk.skipped == 1


def test_tag_values_map_onto_the_heads_fields() -> None:
    from skinclf.dicom.read import SITE_OF, parse_age, parse_sex, site_of
    from skinclf.model.patient_head import parse_site

    assert [parse_age(v) for v in ("045Y", "6M", "052W", "", "abc", None)] == [45.0, 0.5, 1.0, None, None, None]
    assert [parse_sex(v) for v in ("M", "F", "O", "", None)] == ["male", "female", None, None, None]
    assert site_of("Skin structure of back") is None or site_of("Skin of back") == "back"
    assert site_of("LOWERLIMB") == "lower extremity" and site_of("Left upper arm") == "upper extremity"
    assert all(parse_site(v) is not None for v in set(SITE_OF.values()))  # every mapped site is one the head knows


def test_without_the_extra_a_dicom_file_is_an_error_naming_the_install(tmp_path: Path, monkeypatch) -> None:
    from skinclf.data.images import ImageError, load_image

    path = D.uncompressed(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now fails
    with pytest.raises(ImageError, match=r'pip install "skinclf\[dicom\]"'):
        load_image(path, 32)


def test_the_light_install_imports_no_dicom_library() -> None:
    import subprocess

    code = ("import sys, skinclf, skinclf.data.images, skinclf.data.walk, skinclf.batch.predict, skinclf.cli; "
            "print(sorted(m for m in ('pydicom', 'highdicom', 'pynetdicom') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


# --- predict on the shared samples (the bundled ONNX model) ------------------------------------

def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def _probs(r: dict[str, str]) -> list[tuple[str, str]]:
    return [(r[f"top{i}_class"], r[f"top{i}_prob"]) for i in (1, 2, 3)] + [("ood", r["ood_percentile"])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """JPEGs, and DICOM files made from them: encapsulated (the JPEG's bytes), uncompressed (the
    pixels the JPEG decodes to at the pipeline's scale; and full size, beside a PNG of the same)."""
    require(ONNX)
    root = tmp_path_factory.mktemp("dicom") / "in"
    root.mkdir()
    for i, name in enumerate(SAMPLES):
        jpg = require(SHARED_FULLRES / name)
        shutil.copy(jpg, root / f"{i}_jpeg.jpg")
        D.encapsulated_jpeg(jpg, root / f"{i}_encapsulated.dcm")
        D.encapsulated_jpeg(jpg, root / f"{i}_tags.dcm", tags=TAGS)
        with Image.open(jpg) as im:
            im.draft("RGB", (224, 224))  # the JPEG's pixels as predict decodes them (DCT-scaled)
            D.uncompressed(np.asarray(im.convert("RGB")), root / f"{i}_uncompressed.dcm")
        with Image.open(jpg) as im:
            full = np.asarray(im.convert("RGB"))
        D.uncompressed(full, root / f"{i}_fullsize.dcm")
        Image.fromarray(full).save(root / f"{i}_fullsize.png")
    return root


@pytest.mark.integration
def test_dicom_rows_equal_the_jpeg_rows_and_carry_the_uid(folder: Path, tmp_path: Path, runner) -> None:
    from skinclf.cli import app

    out = tmp_path / "r.csv"
    done = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(ONNX)])
    assert done.exit_code == 0, done.output
    rows = _rows(out)
    for i in range(len(SAMPLES)):
        jpeg = rows[f"{i}_jpeg.jpg"]
        assert jpeg["sop_instance_uid"] == "" and jpeg["metadata"] == "missing"
        for kind in ("encapsulated", "uncompressed"):
            r = rows[f"{i}_{kind}.dcm"]
            assert _probs(r) == _probs(jpeg), kind
            assert r["sop_instance_uid"] == str(pydicom.dcmread(folder / f"{i}_{kind}.dcm").SOPInstanceUID)
            assert r["metadata"] == "missing" and r["error"] == ""
        assert _probs(rows[f"{i}_fullsize.dcm"]) == _probs(rows[f"{i}_fullsize.png"])
        assert rows[f"{i}_tags.dcm"]["metadata"] == "dicom"
    sidecar = json.loads(out.with_name("r.csv.json").read_text())
    assert sidecar["options"]["metadata"]["dicom"]["images_with_tags"] == len(SAMPLES)
    text = out.read_text() + out.with_name("r.csv.json").read_text() + done.output
    assert not [v for v in D.PHI.values() if v in text]


@pytest.mark.integration
def test_tags_feed_the_head_as_a_metadata_csv_would_and_the_csv_wins(folder: Path, tmp_path: Path, runner) -> None:
    from skinclf.cli import app

    meta = tmp_path / "meta.csv"
    meta.write_text("path,age,sex,localization\n" + "".join(
        f"{i}_jpeg.jpg,45,female,upper extremity\n{i}_encapsulated.dcm,80,male,back\n" for i in range(len(SAMPLES))))
    out = tmp_path / "m.csv"
    done = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(ONNX), "--metadata", str(meta)])
    assert done.exit_code == 0, done.output
    rows = _rows(out)
    plain = tmp_path / "plain.csv"
    assert runner.invoke(app, ["predict", str(folder), "--out", str(plain), "--model", str(ONNX),
                               "--no-dicom-metadata"]).exit_code == 0
    plain_rows = _rows(plain)
    for i in range(len(SAMPLES)):
        tags, jpeg = rows[f"{i}_tags.dcm"], rows[f"{i}_jpeg.jpg"]
        assert (tags["metadata"], jpeg["metadata"]) == ("dicom", "used")
        assert _probs(tags) == _probs(jpeg)  # the tags gave exactly what the CSV row gave the JPEG
        assert rows[f"{i}_encapsulated.dcm"]["metadata"] == "used"  # a CSV row wins
        assert _probs(rows[f"{i}_encapsulated.dcm"]) != _probs(tags)
        assert "metadata" not in plain_rows[f"{i}_tags.dcm"] or plain_rows[f"{i}_tags.dcm"]["metadata"] != "dicom"
        assert _probs(plain_rows[f"{i}_tags.dcm"]) == _probs(plain_rows[f"{i}_jpeg.jpg"])


@pytest.mark.integration
def test_sr_round_trips_and_is_never_overwritten(folder: Path, tmp_path: Path, runner) -> None:
    import highdicom as hd

    from skinclf.cli import app
    from skinclf.dicom.sr import DISCLAIMER_TEXT, sr_name

    out, sr = tmp_path / "r.csv", tmp_path / "sr"
    done = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(ONNX), "--sr", str(sr)])
    assert done.exit_code == 0, done.output
    rows = _rows(out)
    dicom_rows = {p: r for p, r in rows.items() if r["sop_instance_uid"]}
    assert len(list(sr.iterdir())) == len(dicom_rows) == 4 * len(SAMPLES)
    for rel, r in dicom_rows.items():
        source = pydicom.dcmread(folder / rel, stop_before_pixels=True)
        path = sr / sr_name(r["sop_instance_uid"])
        report = pydicom.dcmread(path)
        assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        assert report.StudyInstanceUID == source.StudyInstanceUID
        evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == source.StudyInstanceUID
        assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
        parsed = hd.sr.srread(path)  # highdicom's own reading and checks
        assert isinstance(parsed, hd.sr.ComprehensiveSR)
        found, texts = {}, []

        def walk(items):
            for item in items:
                if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99SKINCLF":
                    found[item.ConceptNameCodeSequence[0].CodeValue] = float(
                        item.MeasuredValueSequence[0].NumericValue)
                if item.ValueType == "TEXT":
                    texts.append(item.TextValue)
                walk(item.get("ContentSequence", []))

        walk(report.ContentSequence)
        assert found == {r[f"top{i}_class"]: float(r[f"top{i}_prob"]) for i in (1, 2, 3)}
        assert DISCLAIMER_TEXT in texts
    # Run again: the SRs exist, so none is replaced, and each row says so.
    before = {p.name: p.read_bytes() for p in sr.iterdir()}
    again = tmp_path / "again.csv"
    assert runner.invoke(app, ["predict", str(folder), "--out", str(again), "--model", str(ONNX), "--sr", str(sr)]).exit_code == 0
    assert {p.name: p.read_bytes() for p in sr.iterdir()} == before
    assert all("SR not written" in r["warning"] for r in _rows(again).values() if r["sop_instance_uid"])


def test_predict_sr_refuses_a_file(tmp_path: Path, runner) -> None:
    from skinclf.cli import app

    (tmp_path / "in").mkdir()
    lesion_image((150, 100, 70), 0).save(tmp_path / "in" / "a.jpg")
    (tmp_path / "taken").write_text("x")
    done = runner.invoke(app, ["predict", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"),
                               "--sr", str(tmp_path / "taken")])
    assert done.exit_code == 1 and "--sr" in done.output and "not a folder" in done.output
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.integration
def test_serve_classifies_a_dcm_upload_as_its_jpeg(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from skinclf.engines.load import load_engine
    from skinclf.web.routes import create_app

    jpg = require(SHARED_FULLRES / SAMPLES[0])
    dcm = D.encapsulated_jpeg(jpg, tmp_path / "a.dcm")
    client = TestClient(create_app(load_engine(require(ONNX), batch_size=4)))
    r = client.post("/api/predict", files=[("files", ("a.jpg", jpg.read_bytes(), "image/jpeg")),
                                           ("files", ("a.dcm", dcm.read_bytes(), "application/dicom"))])
    assert r.status_code == 200, r.text
    jpeg_result, dicom_result = r.json()["results"]
    assert not dicom_result.get("error"), dicom_result
    assert {k: v for k, v in dicom_result.items() if k != "path"} == {k: v for k, v in jpeg_result.items() if k != "path"}
    assert not [v for v in D.PHI.values() if v in r.text]


@pytest.mark.integration
def test_predict_without_the_extra_classifies_jpegs_and_names_the_install(tmp_path: Path) -> None:
    import subprocess

    jpg = require(SHARED_FULLRES / SAMPLES[0])
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(jpg, folder / "a.jpg")
    D.encapsulated_jpeg(jpg, folder / "b.dcm")
    out = tmp_path / "r.csv"
    code = ("import sys\n"
            "for m in ('pydicom', 'highdicom', 'pynetdicom', 'pylibjpeg'): sys.modules[m] = None  # not installed\n"
            "from skinclf.cli import app\n"
            f"app(['predict', {str(folder)!r}, '--out', {str(out)!r}, '--model', {str(require(ONNX))!r}])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    rows = _rows(out)
    assert rows["a.jpg"]["error"] == "" and rows["a.jpg"]["top1_class"]
    assert 'pip install "skinclf[dicom]"' in rows["b.dcm"]["error"]
