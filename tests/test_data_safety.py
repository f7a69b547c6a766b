"""Data safety: nothing the user has is overwritten, and `--resume` never keeps a row
that another model, option, folder or file would have made differently."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from utils.models import interrupt_after, make_tiny_bundle
from utils.synthetic import lesion_image

from skinclf.batch.predict import predict_directory
from skinclf.cli import app
from skinclf.config import TrainConfig
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
    summary = run(scans, out, tiny_bundle, resume=True, tta=4)
    assert (summary.resumed, summary.classified, summary.redone) == (0, 5, {"another --tta": 5})
    fresh = tmp_path / "fresh.csv"
    run(scans, fresh, tiny_bundle, tta=4)
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
    out = tmp_path / "r.csv"
    with monkeypatch.context() as m:
        interrupt_after(m, 1)
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


def test_predict_replaces_nothing_before_work_even_with_resume(scans, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    (tmp_path / "r.csv.partial.json").write_text("my own notes\n")  # not ours: never replaced
    with pytest.raises(SkinclfError, match="r.csv.partial.json already exists"):
        run(scans, out, tiny_bundle)
    assert (tmp_path / "r.csv.partial.json").read_text() == "my own notes\n" and not out.exists()


# --- train -------------------------------------------------------------------------------

TINY = ["--weights", "none", "--alpha", "0.25", "--image-size", "64", "--batch-size", "8",
        "--trainable-layers", "85", "--workers", "2", "--epochs", "1", "--no-calibrate"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from utils.synthetic import write_ham

    from skinclf.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("train-data")
    prepare_dataset(src=write_ham(root / "ham", per_class=4), out=root / "prepared", val=0.25, test=0.0,
                    show_progress=False)
    return root / "prepared"


def test_train_without_out_writes_into_runs_never_models(runner, prepared, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    result = runner.invoke(app, ["train", "--data", str(prepared), *TINY])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "skinclf-mobilenet.keras").is_file()
    assert list((tmp_path / "models").iterdir()) == []  # where the bundled model lives in a checkout
    again = runner.invoke(app, ["train", "--data", str(prepared), *TINY])  # the README's command, twice
    assert again.exit_code == 1 and again.output.count("\n") == 1
    assert "runs/skinclf-mobilenet.keras already exists and is a model" in again.output and "--overwrite" in again.output


def test_train_refuses_an_existing_out_and_old_checkpoints_before_any_work(runner, prepared, tmp_path,
                                                                           monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine.keras"
    mine.write_bytes(b"PK\x03\x04 a model that took a week")  # a .keras is a zip
    result = runner.invoke(app, ["train", "--data", str(prepared), "--out", str(mine), *TINY])
    assert result.exit_code == 1 and "already exists and is a model" in result.output
    assert mine.read_bytes() == b"PK\x03\x04 a model that took a week"
    (tmp_path / "runs" / "new").mkdir(parents=True)
    (tmp_path / "runs" / "new" / "state.json").write_text("{}")
    result = runner.invoke(app, ["train", "--data", str(prepared), "--out", str(tmp_path / "new.keras"), *TINY])
    assert result.exit_code == 1 and "holds the checkpoints of an earlier run: add --resume" in result.output
    assert (tmp_path / "runs" / "new" / "state.json").read_text() == "{}"
    both = runner.invoke(app, ["train", "--data", str(prepared), "--out", str(mine), "--resume", "--overwrite"])
    assert both.exit_code == 1 and "choose one" in both.output


def test_a_failed_training_run_leaves_no_empty_run_folder(monkeypatch, prepared, tmp_path) -> None:
    import skinclf.training.train as train_mod
    from skinclf.training.train import train_model

    def offline(*args, **kwargs):
        raise SkinclfError("cannot download the ImageNet weights")

    monkeypatch.setattr(train_mod, "build_model", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SkinclfError, match="ImageNet"):
        train_model(TrainConfig(data=prepared, out=tmp_path / "m.keras", alpha=0.25, image_size=64),
                    show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_in_training_says_how_to_continue_once(runner, monkeypatch, prepared, tmp_path) -> None:
    import skinclf.training.train as train_mod

    def interrupted(*args, **kwargs):
        (tmp_path / "runs" / "m" / "state.json").write_text("{}")  # one epoch finished
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_fit", interrupted)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--data", str(prepared), "--out", "m.keras", *TINY])
    assert result.exit_code == 130
    assert result.output.count("Interrupted") == 1
    assert "saved in runs/m" in result.output and "skinclf train ... --resume" in result.output


# --- the other writers -------------------------------------------------------------------

def test_fetch_that_fails_leaves_no_destination_folder(runner, tmp_path) -> None:
    (tmp_path / "src").mkdir()  # no HAM10000 layout in it
    result = runner.invoke(app, ["fetch", "--from", str(tmp_path / "src"), "--dest", str(tmp_path / "a" / "b")])
    assert result.exit_code == 1
    assert not (tmp_path / "a").exists()


def test_evaluate_replaces_its_own_pictures_but_not_a_users(runner, tiny_bundle, tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "curves"
    for _ in range(2):
        result = runner.invoke(app, ["evaluate", "--history", "--model", str(tiny_bundle), "--out", str(out)])
        assert result.exit_code == 0, result.output
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("RGB", (8, 8)).save(mine / "history.png")
    before = (mine / "history.png").read_bytes()
    result = runner.invoke(app, ["evaluate", "--history", "--model", str(tiny_bundle), "--out", str(mine)])
    assert result.exit_code == 1 and "history.png already exists and is not a PNG picture written by skinclf" \
        in result.output
    assert (mine / "history.png").read_bytes() == before
    forced = runner.invoke(app, ["evaluate", "--history", "--model", str(tiny_bundle), "--out", str(mine),
                                 "--overwrite"])
    assert forced.exit_code == 0 and (mine / "history.png").read_bytes() != before


def test_explain_into_the_image_folder_never_replaces_an_image(runner, tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    lesion_image((120, 60, 40), 1).save(folder / "a.png")
    before = (folder / "a.png").read_bytes()
    result = runner.invoke(app, ["explain", str(folder), "--out", str(folder), "--model", str(tiny_bundle),
                                 "--patch", "16", "--stride", "16"])
    assert result.exit_code == 1 and "a.png already exists and is not a PNG picture written by skinclf" in result.output
    assert (folder / "a.png").read_bytes() == before
    maps = tmp_path / "maps"
    for _ in range(2):  # an earlier run's maps are replaced
        ok = runner.invoke(app, ["explain", str(folder), "--out", str(maps), "--model", str(tiny_bundle),
                                 "--patch", "16", "--stride", "16"])
        assert ok.exit_code == 0, ok.output
    assert (maps / "a.png").is_file()


def test_explain_out_file_is_refused_before_the_model_loads(runner, monkeypatch, tiny_bundle, tmp_path) -> None:
    import skinclf.engines.load as load_mod

    monkeypatch.setattr(load_mod, "load_engine", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "report.txt").write_text("notes")
    lesion_image((120, 60, 40), 1).save(tmp_path / "a.jpg")
    result = runner.invoke(app, ["explain", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "report.txt"),
                                 "--model", str(tiny_bundle)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "--out" in result.output and "is a file, not a folder" in result.output


def test_export_checks_its_out_before_converting(runner, monkeypatch, tiny_bundle, tmp_path) -> None:
    import skinclf.model.bundle as bundle_mod

    monkeypatch.setattr(bundle_mod, "load_bundle", lambda *a, **k: pytest.fail("converted before checking --out"))
    (tmp_path / "folder").mkdir()
    result = runner.invoke(app, ["export", str(tiny_bundle), "--out", str(tmp_path / "folder")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "is a folder" in result.output
    (tmp_path / "notes.onnx").write_text("not a model")
    result = runner.invoke(app, ["export", str(tiny_bundle), "--out", str(tmp_path / "notes.onnx")])
    assert result.exit_code == 1 and "not a skinclf ONNX export" in result.output
    result = runner.invoke(app, ["export", str(tiny_bundle), "--out", str(tmp_path / "m.tflite"), "--format", "onnx"])
    assert result.exit_code == 1 and "suffix says tflite but --format onnx" in result.output


def test_export_takes_the_format_from_the_out_suffix() -> None:
    from skinclf.engines.export import _format_for

    assert _format_for(None, Path("x.tflite")) == "tflite"
    assert _format_for(None, Path("x.int8.onnx")) == "onnx-int8"
    assert _format_for(None, Path("x.onnx")) == "onnx" and _format_for(None, None) == "onnx"
    assert _format_for("onnx-int8", Path("x.onnx")) == "onnx-int8"


def test_export_replaces_its_own_earlier_export(runner, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    bundle = make_tiny_bundle(tmp_path / "m.keras", seed=5)
    for _ in range(2):
        result = runner.invoke(app, ["export", str(bundle)])  # default: m.onnx beside it
        assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").is_file()


def test_ensemble_and_calibrate_refuse_an_existing_model(runner, tiny_bundle, tmp_path) -> None:
    other = tmp_path / "other.keras"
    other.write_bytes(b"PK\x03\x04 someone's model")  # a .keras is a zip
    result = runner.invoke(app, ["ensemble", str(tiny_bundle), str(tiny_bundle), "--out", str(other)])
    assert result.exit_code == 1 and "already exists and is a model" in result.output
    result = runner.invoke(app, ["calibrate", str(tiny_bundle), "--out", str(other), "--data", str(tmp_path)])
    assert result.exit_code == 1 and "already exists and is a model" in result.output
    assert other.read_bytes() == b"PK\x03\x04 someone's model"


# --- which model --------------------------------------------------------------------------

def test_a_corrupt_onnx_beside_a_good_keras_falls_back_with_a_warning(runner, scans, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    bundle = make_tiny_bundle(tmp_path / "m.keras", seed=2)
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07 truncated")
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(scans), "--out", str(out), "--model", str(bundle)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "cannot load ONNX model" in warnings[0] and "without m.onnx" in warnings[0]
    assert json.loads((tmp_path / "r.csv.json").read_text())["options"]["engine"] == "keras"
    failed = runner.invoke(app, ["predict", str(scans), "--out", str(out), "--model", str(bundle), "--engine", "onnx"])
    assert failed.exit_code == 1 and "cannot load ONNX model" in failed.output


def test_model_folder_and_environment_variable_are_named(runner, monkeypatch, scans, tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "a.keras").write_bytes(b"")
    result = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv"), "--model", str(folder)])
    assert result.exit_code == 1
    assert f"model {folder} is a folder, not a model file; it holds a.keras" in result.output
    monkeypatch.setenv("SKINCLF_MODEL", str(tmp_path / "gone.keras"))
    result = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"SKINCLF_MODEL={tmp_path / 'gone.keras'}: does not exist" in result.output
    for command in (["export"], ["explain", str(scans), "--out", str(tmp_path / "maps")]):  # not only predict
        other = runner.invoke(app, command)
        assert other.exit_code == 1 and "SKINCLF_MODEL=" in other.output, other.output
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    monkeypatch.setenv("SKINCLF_MODEL", str(tmp_path / "broken.keras"))
    result = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 1 and result.output.startswith(f"Error: SKINCLF_MODEL={tmp_path / 'broken.keras'}: ")
    monkeypatch.setenv("SKINCLF_MODEL", str(tiny_bundle))
    ok = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv")])
    assert ok.exit_code == 0, ok.output
