"""Hostile files and names: a PostScript file called .jpg, a name that is not UTF-8, a name that a
spreadsheet would run as a formula, a model whose metadata lies or is malformed. Each gets a row
or one clear line, never a traceback, never a decoder it should not reach."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from utils.models import make_tiny_onnx
from utils.paths import REPO
from utils.synthetic import lesion_image, CLASSES, CLASS_COLOURS

from skinclf.batch.results import cell_value, csv_cell, read_predictions
from skinclf.cli import app
from skinclf.data.images import ImageError, load_image

pytest.importorskip("onnxruntime")

# A real (if tiny) Encapsulated PostScript file: what Ghostscript would be asked to run.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
FORMULAS = ["=1+1.jpg", "+1.jpg", "-2+3.jpg", "@SUM(A1).jpg", "\tx.jpg", "\rx.jpg"]


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    return make_tiny_onnx(tmp_path / "tiny.onnx")


def jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    lesion_image(CLASS_COLOURS["mel"], seed).save(buffer, format="JPEG")
    return buffer.getvalue()


def write(folder: Path, name: str | bytes, data: bytes) -> None:
    """Create a file by its raw name (bytes names need not be UTF-8)."""
    raw = os.fsencode(folder) + b"/" + (name if isinstance(name, bytes) else name.encode())
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def predict(runner, folder: Path, model: Path, out: Path, *extra: str):
    return runner.invoke(app, ["predict", str(folder), "--model", str(model), "--out", str(out), *extra])


def raw_text(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as fh:  # no newline translation: names may hold \r
        return fh.read()


def raw_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(raw_text(path), newline="")))


# --- decoders: only what the extension family promises --------------------------------------------

@pytest.fixture
def eps_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every time Pillow's EPS plugin is asked to open a file (and stop it there)."""
    from PIL import EpsImagePlugin, Image

    Image.init()
    reached: list[str] = []

    def spy(self) -> None:
        reached.append(str(getattr(self, "filename", "")))
        raise SyntaxError("the EPS plugin was reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    return reached


def test_a_postscript_file_named_jpg_is_a_row_with_an_error_and_never_reaches_the_eps_plugin(
        runner, tmp_path: Path, onnx_model: Path, eps_spy: list[str]) -> None:
    folder = tmp_path / "visit"
    folder.mkdir()
    write(folder, "lesion.jpg", EPS)
    write(folder, "good.jpg", jpeg_bytes())
    with pytest.raises(ImageError, match="not a recognised image file.*JPEG, PNG, BMP and TIFF"):
        load_image(folder / "lesion.jpg", 32)
    out = tmp_path / "results.csv"
    result = predict(runner, folder, onnx_model, out)
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in read_predictions(out).to_dict("records")}
    assert rows["good.jpg"]["error"] == "" and rows["good.jpg"]["top1_class"]
    assert rows["lesion.jpg"]["error"].startswith("not a recognised image file")
    assert eps_spy == []


def test_explain_and_serve_uploads_refuse_postscript_too(eps_spy: list[str], onnx_model: Path) -> None:
    from PIL import UnidentifiedImageError

    from skinclf.data.images import decode_image, open_image

    with pytest.raises(ImageError, match="not a recognised image file"):
        decode_image(EPS, 32, name="lesion.jpg")  # what serve does with an upload
    with pytest.raises(UnidentifiedImageError):
        open_image(io.BytesIO(EPS), "lesion.jpg")  # what explain shows the file through
    assert eps_spy == []


def test_a_png_named_jpg_is_read_as_the_png_it_is(tmp_path: Path) -> None:
    """Decided: content in any of the four formats is read whatever the (supported) extension
    says; the same decoders are reachable by renaming, so refusing would only lose a result."""
    image = lesion_image(CLASS_COLOURS["nv"], 3)
    image.save(tmp_path / "true.png")
    shutil.copy(tmp_path / "true.png", tmp_path / "mislabelled.jpg")
    np.testing.assert_array_equal(load_image(tmp_path / "mislabelled.jpg", 32), load_image(tmp_path / "true.png", 32))


# --- names that are not UTF-8 ---------------------------------------------------------------------

def test_a_name_that_is_not_utf8_gets_a_row_and_resume_works(runner, tmp_path: Path, onnx_model: Path) -> None:
    folder = tmp_path / "visit"
    folder.mkdir()
    write(folder, b"bad\xff.jpg", jpeg_bytes(1))
    write(folder, b"ok.jpg", jpeg_bytes(2))
    out = tmp_path / "results.csv"
    result = predict(runner, folder, onnx_model, out)
    assert result.exit_code == 0, result.output
    assert [r[0] for r in raw_rows(out)[1:]] == ["bad\\xff.jpg", "ok.jpg"]  # readable, and unambiguous
    frame = read_predictions(out)
    assert list(frame["path"]) == [os.fsdecode(b"bad\xff.jpg"), "ok.jpg"]  # the very name on disk
    assert (frame["error"] == "").all()

    # An interrupted run that had done only the bad name: --resume keeps that row, does ok.jpg.
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "results.csv.partial").write_text("".join(lines[:2]), encoding="utf-8")
    resumed = predict(runner, folder, onnx_model, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert out.read_text(encoding="utf-8") == "".join(lines)


# --- formula injection ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "'", "x.jpg", "''=x", "'=x", "=x", "-1.5000", "-x", "a\\b", "bad\udcff.jpg",
                                   "\\x80", "\\\\x80", "\t", "\r=", "@", "'plain", "caf\u00e9 \U0001f600.jpg"])
def test_cells_round_trip(value: str) -> None:
    assert cell_value(csv_cell(value)) == value
    assert not csv_cell(value).startswith(("=", "+", "@", "\t", "\r")) and (
        not csv_cell(value).startswith("-") or re.fullmatch(r"-[0-9.]+", csv_cell(value)))


def test_formula_names_are_neutralised_in_the_csv_and_read_back(runner, tmp_path: Path, onnx_model: Path) -> None:
    folder = tmp_path / "visit"
    folder.mkdir()
    for i, name in enumerate(FORMULAS):
        write(folder, name, jpeg_bytes(i))
    out = tmp_path / "results.csv"
    result = predict(runner, folder, onnx_model, out)
    assert result.exit_code == 0, result.output
    text = raw_text(out)
    requoted = io.StringIO()
    csv.writer(requoted, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(raw_rows(out))
    assert requoted.getvalue() == text  # every cell quoted
    cells = [r[0] for r in raw_rows(out)[1:]]
    assert sorted(cells) == sorted("'" + name for name in FORMULAS)
    assert sorted(read_predictions(out)["path"]) == sorted(FORMULAS)  # evaluate --predictions sees the names

    # Resuming reads the guarded rows back as the same files: nothing is redone or duplicated.
    # A run killed after three rows leaves them in `.partial` and their record beside it.
    lines = text.split("\n")  # rows end in \n; a \r inside a quoted name is not a line end
    (tmp_path / "results.csv.partial").write_bytes("\n".join(lines[:4] + [""]).encode())
    record = json.loads((tmp_path / "results.csv.json").read_text(encoding="utf-8"))["resume"]
    first = [cell_value(r[0]) for r in raw_rows(out)[1:4]]
    (tmp_path / "results.csv.partial.json").write_text(
        "".join(json.dumps(entry) + "\n" for entry in [record["run"], *([p, *record["files"][p]] for p in first)]),
        encoding="utf-8")
    resumed = predict(runner, folder, onnx_model, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "3 rows kept" in " ".join(resumed.output.split())
    assert raw_text(out) == text


def test_formula_names_are_neutralised_in_the_apis_csv(onnx_model: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from skinclf.engines.load import load_engine
    from skinclf.web.routes import create_app

    client = TestClient(create_app(load_engine(onnx_model)))
    files = [("files", ("=1+1.jpg", jpeg_bytes(), "image/jpeg")), ("files", ("@x.jpg", b"not an image", "image/jpeg"))]
    answer = client.post("/api/predict", params={"format": "csv"}, files=files)
    assert answer.status_code == 200
    rows = list(csv.reader(io.StringIO(answer.text, newline="")))
    assert [r[0] for r in rows[1:]] == ["'=1+1.jpg", "'@x.jpg"]
    assert [r["path"] for r in client.post("/api/predict", files=files).json()["results"]] == ["=1+1.jpg", "@x.jpg"]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_pages_csv_download_applies_the_same_rule() -> None:
    """The pages' csvCell (page.js, shared by serve's page and the exported site), run in node, quotes
    every value exactly as the server's CSV does."""
    page = (REPO / "skinclf" / "web" / "static" / "page.js").read_text(encoding="utf-8")
    start = page.index("  const FORMULA_START")
    end = page.index("  function csvText")
    values = ["=1+1.jpg", "'=x", "-0.1234", "-x", "a\\b", "plain.jpg", 'say "hi".jpg', "\tx", "@", "0.5000", ""]
    script = page[start:end] + f"\nprocess.stdout.write(JSON.stringify({json.dumps(values)}.map(csvCell)));"
    got = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True).stdout)
    expected = []
    for value in values:
        buffer = io.StringIO()
        csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="").writerow([csv_cell(value)])
        expected.append(buffer.getvalue())
    assert got == expected


# --- malformed model metadata ---------------------------------------------------------------------

def rewrite_bundle_meta(source: Path, target: Path, meta: object) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = json.dumps(meta).encode() if item.filename == "skinclf.json" else zin.read(item.filename)
            zout.writestr(item, data)
    return target


def good_meta() -> dict:
    return {"format": "skinclf-bundle/1", "classes": list(CLASSES), "input_size": [32, 32],
            "export": {"format": "onnx", "source_sha256": ""}}


ONNX_CASES = {
    "input_size_zero": ({**good_meta(), "input_size": 0}, {}, "input_size 0; expected [N, N]"),
    "input_size_text": ({**good_meta(), "input_size": ["224", "224"]}, {}, 'input_size ["224", "224"]'),
    "input_size_zeros": ({**good_meta(), "input_size": [0, 0]}, {}, "input_size [0, 0]"),
    "meta_a_list": ([1, 2], {}, "metadata is a JSON list, expected a JSON object"),
    "no_classes": ({k: v for k, v in good_meta().items() if k != "classes"}, {}, "metadata has no classes"),
    "classes_a_string": ({**good_meta(), "classes": "akiec bcc"}, {}, "classes \"akiec bcc\"; expected a list"),
    "five_classes_seven_outputs": ({**good_meta(), "classes": list(CLASSES)[:5]}, {"outputs": 7},
                                   "the network has 7 outputs but its skinclf.json metadata names 5 classes"),
    "size_not_the_graphs": ({**good_meta(), "input_size": [64, 64]}, {}, "the network takes 32x32 images"),
    "ood_not_an_object": ({**good_meta(), "ood": ["energy", 1]}, {}, "ood [\"energy\", 1]; expected an object"),
    "export_a_list": ({**good_meta(), "export": []}, {}, "export []; expected a JSON object"),
    "export_a_string": ({**good_meta(), "export": "onnx"}, {}, "export \"onnx\"; expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_malformed_onnx_metadata_is_one_line_naming_file_and_field(runner, tmp_path: Path, case: str) -> None:
    meta, options, needle = ONNX_CASES[case]
    folder = tmp_path / "visit"
    folder.mkdir()
    write(folder, "a.jpg", jpeg_bytes())
    model = make_tiny_onnx(tmp_path / "bad.onnx", meta=meta, **options)
    result = predict(runner, folder, model, tmp_path / "results.csv")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("Error:") == 1
    error = next(line for line in result.output.splitlines() if line.startswith("Error:"))
    assert str(model) in " ".join(result.output.split()) and needle in " ".join(result.output.split()), error


def test_onnx_metadata_that_is_not_json_is_one_line(runner, tmp_path: Path) -> None:
    import onnx

    model = make_tiny_onnx(tmp_path / "bad.onnx")
    proto = onnx.load(str(model))
    proto.metadata_props[0].value = "{not json"
    onnx.save(proto, str(model))
    folder = tmp_path / "visit"
    folder.mkdir()
    write(folder, "a.jpg", jpeg_bytes())
    result = predict(runner, folder, model, tmp_path / "results.csv")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is not valid JSON" in " ".join(result.output.split())


BUNDLE_CASES = {
    "meta_a_list": (["classes"], "metadata is a JSON list"),
    "input_size_zero": ({"input_size": 0}, "input_size 0; expected [N, N]"),
    "input_size_text": ({"input_size": "32"}, 'input_size "32"; expected [N, N]'),
    "no_input_size": ({"input_size": None}, "metadata has no input_size"),
    "five_classes": ({"classes": list(CLASSES)[:5]}, "the network has 7 outputs but its skinclf.json metadata names 5"),
    "bad_ood": ({"ood": {"score": "guess", "threshold": "high"}}, "ood {\"score\": \"guess\""),
}


@pytest.mark.parametrize("case", sorted(BUNDLE_CASES))
def test_malformed_bundle_metadata_is_one_line_naming_file_and_field(runner, tmp_path: Path, tiny_bundle: Path,
                                                                     case: str) -> None:
    pytest.importorskip("keras")
    change, needle = BUNDLE_CASES[case]
    with zipfile.ZipFile(tiny_bundle) as zf:
        meta = json.loads(zf.read("skinclf.json"))
    if isinstance(change, dict):
        meta.update(change)
        meta = {k: v for k, v in meta.items() if v is not None}
    else:
        meta = change
    model = rewrite_bundle_meta(tiny_bundle, tmp_path / "bad.keras", meta)
    folder = tmp_path / "visit"
    folder.mkdir()
    write(folder, "a.jpg", jpeg_bytes())
    result = predict(runner, folder, model, tmp_path / "results.csv", "--engine", "keras")
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "Traceback" not in result.output and result.output.count("Error:") == 1
    assert str(model) in flat and needle in flat, flat
