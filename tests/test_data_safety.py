"""Data safety (issue 18): nothing the user has is overwritten, and `--resume` never keeps a row
that another model, option, folder or file would have made differently."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import lesion_image, make_tiny_bundle

from skinclf.batch.predict import predict_directory
from skinclf.cli import app
from skinclf.errors import SkinclfError


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """A tiny bundle with its up-to-date ONNX form beside it (so both engines can run it)."""
    pytest.importorskip("onnxruntime")
    from skinclf.engines.export import export_model

    d = tmp_path_factory.mktemp("pair")
    bundle = make_tiny_bundle(d / "m.keras", seed=3)
    export_model(model=bundle, format="onnx", out=d / "m.onnx")
    return bundle


@pytest.fixture
def scans(tmp_path) -> Path:
    d = tmp_path / "scans"
    d.mkdir()
    for i in range(5):
        lesion_image((30 * i, 180 - 20 * i, 90), i).save(d / f"scan_{i:04d}.jpg")
    return d


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def run(folder: Path, out: Path, model: Path, **options):
    return predict_directory(directory=folder, out=out, model=model, show_progress=False, **options)


# --- --resume trusts nothing but what a row was computed from ------------------------------

def test_an_unchanged_resume_keeps_every_row_byte_identical(scans, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    run(scans, out, tiny_bundle)
    before = out.read_bytes()
    summary = run(scans, out, tiny_bundle, resume=True)
    assert (summary.resumed, summary.classified, summary.redone) == (5, 0, {})
    assert out.read_bytes() == before
    sidecar = json.loads((tmp_path / "r.csv.json").read_text())
    assert sidecar["resume"]["kept"] == 5 and sidecar["resume"]["redone"] == 0
    assert not (tmp_path / "r.csv.partial.json").exists()


def test_resume_with_another_model_of_the_same_classes_reclassifies(runner, scans, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    run(scans, out, tiny_bundle)
    other = make_tiny_bundle(tmp_path / "other.keras", seed=7)
    fresh = tmp_path / "fresh.csv"
    run(scans, fresh, other)
    result = runner.invoke(app, ["predict", str(scans), "--out", str(out), "--model", str(other), "--resume"])
    assert result.exit_code == 0, result.output
    assert "5 rows redone (another model)" in result.output
    assert out.read_bytes() == fresh.read_bytes()  # no row of the first model left
    sidecar = json.loads((tmp_path / "r.csv.json").read_text())
    assert sidecar["resume"]["redone_why"] == {"another model": 5} and sidecar["model"]["path"].endswith("other.keras")


def test_resume_with_another_tta_reclassifies(scans, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    run(scans, out, tiny_bundle)
    summary = run(scans, out, tiny_bundle, resume=True, tta=2)
    assert (summary.resumed, summary.classified, summary.redone) == (0, 5, {"another --tta": 5})
    fresh = tmp_path / "fresh.csv"
    run(scans, fresh, tiny_bundle, tta=2)
    assert out.read_bytes() == fresh.read_bytes()


def test_resume_with_another_engine_reclassifies(scans, pair, tmp_path) -> None:
    out = tmp_path / "r.csv"
    run(scans, out, pair, engine="keras")
    summary = run(scans, out, pair, resume=True, engine="onnx")
    assert summary.redone == {"another --engine": 5} and summary.resumed == 0
    assert json.loads((tmp_path / "r.csv.json").read_text())["options"]["engine"] == "onnx"


@pytest.mark.parametrize("same_size", [True, False])
def test_a_file_replaced_under_the_same_name_is_reclassified(scans, tiny_bundle, tmp_path, same_size) -> None:
    out = tmp_path / "r.csv"
    run(scans, out, tiny_bundle)
    target = scans / "scan_0001.jpg"
    stat = target.stat()
    if same_size:  # other pixels, same length: only the modification time tells
        data = bytearray(target.read_bytes())
        data[-100:-2] = bytes(98)
        target.write_bytes(bytes(data))
        assert target.stat().st_size == stat.st_size
    else:
        lesion_image((250, 10, 10), 99, size=(80, 60)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    old_row = read(out).iloc[1].tolist()
    summary = run(scans, out, tiny_bundle, resume=True)
    assert (summary.resumed, summary.classified) == (4, 1)
    assert summary.redone == {"file changed since (size or modification time)": 1}
    fresh = tmp_path / "fresh.csv"
    run(scans, fresh, tiny_bundle)
    assert out.read_bytes() == fresh.read_bytes()
    if not same_size:
        assert read(out).iloc[1].tolist() != old_row


def test_resume_against_another_folder_reclassifies(scans, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    run(scans, out, tiny_bundle)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(scans, elsewhere)  # same names, sizes and times: only the folder differs
    summary = run(elsewhere, out, tiny_bundle, resume=True)
    assert summary.redone == {"another folder": 5} and summary.resumed == 0


def test_an_interrupted_run_resumed_with_another_model_keeps_no_row(monkeypatch, scans, tiny_bundle, tmp_path) -> None:
    from skinclf.engines import runner as inference

    out = tmp_path / "r.csv"
    real = inference.predict_files

    def interrupted(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield batch

    with monkeypatch.context() as m:
        m.setattr(inference, "predict_files", interrupted)
        with pytest.raises(KeyboardInterrupt, match="--resume"):
            run(scans, out, tiny_bundle, batch_size=2)
    assert (tmp_path / "r.csv.partial.json").is_file()  # what the two finished rows were computed from
    other = make_tiny_bundle(tmp_path / "other.keras", seed=7)
    summary = run(scans, out, other, resume=True, batch_size=2)
    assert summary.redone == {"another model": 2} and summary.classified == 5
    fresh = tmp_path / "fresh.csv"
    run(scans, fresh, other)
    assert out.read_bytes() == fresh.read_bytes()
    assert not (tmp_path / "r.csv.partial").exists() and not (tmp_path / "r.csv.partial.json").exists()


def test_a_sidecar_that_does_not_describe_the_csv_keeps_no_row(scans, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    run(scans, out, tiny_bundle)
    out.write_text(out.read_text() + "\n")  # touched by hand (or the sidecar is an older one): not trusted
    summary = run(scans, out, tiny_bundle, resume=True)
    assert summary.redone == {"no record of what they were computed from": 5}


# --- never over something the user has -----------------------------------------------------

def test_predict_refuses_to_write_over_an_image(runner, scans, tiny_bundle) -> None:
    image = scans / "scan_0000.jpg"
    before = image.read_bytes()
    result = runner.invoke(app, ["predict", str(scans), "--out", str(image), "--model", str(tiny_bundle)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "Error: --out" in result.output and "--overwrite" in result.output
    assert image.read_bytes() == before
    assert sorted(p.name for p in scans.iterdir()) == [f"scan_{i:04d}.jpg" for i in range(5)]


def test_predict_replaces_its_own_earlier_csv(runner, scans, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    for _ in range(2):
        result = runner.invoke(app, ["predict", str(scans), "--out", str(out), "--model", str(tiny_bundle)])
        assert result.exit_code == 0, result.output
    assert len(read(out)) == 5


def test_predict_refuses_a_csv_with_other_columns_and_a_foreign_sidecar(scans, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "patients.csv"
    out.write_text("patient,name\n1,Jane\n")
    with pytest.raises(SkinclfError, match="is not a predict CSV"):
        run(scans, out, tiny_bundle)
    assert out.read_text() == "patient,name\n1,Jane\n"
    out.unlink()
    (tmp_path / "patients.csv.json").write_text('["my notes"]\n')
    with pytest.raises(SkinclfError, match="patients.csv.json already exists"):
        run(scans, out, tiny_bundle)
    run(scans, out, tiny_bundle, overwrite=True)
    assert len(read(out)) == 5
