"""Hostile paths, bodies and names: outputs that are not regular files, FIFOs, deep JSON, huge
metadata files, terminal escapes, files edited in place, Ray's network chatter. One test (or more)
per class of fault; tiny ONNX models only (no TensorFlow), nothing timed."""

from __future__ import annotations

import io
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import CLASS_COLOURS, lesion_image, make_tiny_onnx

from skinclf.cli import app
from skinclf.errors import SkinclfError

pytest.importorskip("onnxruntime")

PWNED = "\x1b]0;PWNED\x07"  # an OSC sequence: retitles the terminal window, then BEL


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    return make_tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "visit"
    root.mkdir()
    for i in range(2):
        lesion_image(CLASS_COLOURS["nv"], i).save(root / f"{i}.jpg")
    return root


# --- 1. every JSON serve parses is bounded -----------------------------------------------------------

def test_deeply_nested_metadata_json_is_one_error_not_a_recursion_error() -> None:
    from skinclf.batch.patient import metas_from_json

    deep = "[" * 2000 + "]" * 2000  # 4 KB: RecursionError in json.loads before the fix
    with pytest.raises(SkinclfError, match="nested more than"):
        metas_from_json(deep, ["a.jpg"])
    with pytest.raises(SkinclfError, match="over the limit"):
        metas_from_json('["' + "x" * 70_000 + '"]', ["a.jpg"])
    with pytest.raises(SkinclfError, match="not valid JSON"):
        metas_from_json("[{]", ["a.jpg"])
    assert metas_from_json('[{"age": 40, "note": "[[[[[[[[[[[["}]', ["a.jpg"])[0][0].age == 40.0  # brackets in strings


def test_serve_answers_422_to_a_deep_metadata_field(monkeypatch, onnx_model: Path, folder: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from skinclf.engines.load import load_engine
    from skinclf.web import routes

    monkeypatch.setattr(routes, "serve_head", lambda engine: object())  # a model with a metadata head
    client = TestClient(routes.create_app(load_engine(onnx_model, batch_size=4)), raise_server_exceptions=False)
    files = [("files", ("0.jpg", (folder / "0.jpg").read_bytes(), "image/jpeg"))]
    got = client.post("/api/predict", files=files, data={"metadata": "[" * 2000 + "]" * 2000})
    assert got.status_code == 422 and "nested more than" in got.json()["detail"]


# --- 3. an output that is not a regular file is refused, for every command ----------------------------

_WRITERS: list[int] = []


@pytest.fixture(autouse=True)
def _close_writers():
    yield
    while _WRITERS:
        os.close(_WRITERS.pop())


def _special(kind: str, path: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
        # A writer holding a predict CSV's header: code that wrongly opens the pipe reads it and
        # goes on (the test then fails) instead of blocking for ever.
        _WRITERS.append(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        os.write(_WRITERS[-1], b'"path","top1_class","error"\n{"model": "m"}\n')
    elif kind == "char device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
        except PermissionError:
            pytest.skip("mknod of a character device needs root")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:  # a link to a device
        path.symlink_to("/dev/null")
    return path


SPECIAL = ["fifo", "char device", "socket", "link to /dev/null"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_every_output_check_refuses_what_is_not_a_regular_file_even_with_overwrite(tmp_path: Path, kind: str) -> None:
    from skinclf.files import check_output_file, check_output_files
    from skinclf.own_outputs import CSV, JSON, MODEL, ONNX, PNG

    path = _special(kind, tmp_path / "x")
    for what in (CSV, JSON, PNG, ONNX, MODEL, None):  # predict, reports, pictures, exports, models
        with pytest.raises(SkinclfError, match="not a file: skinclf writes only regular files"):
            check_output_file(path, kind=what, overwrite=True)
    with pytest.raises(SkinclfError, match="regular files"):  # the files of evaluate, explain, calibrate --report
        check_output_files(tmp_path, {"x": JSON}, overwrite=True)
    assert not path.is_file() or path.is_symlink()


@pytest.mark.parametrize("kind", SPECIAL)
def test_predict_overwrite_onto_a_device_or_pipe_is_one_line_and_leaves_it(runner, tmp_path: Path, folder: Path,
                                                                          onnx_model: Path, kind: str) -> None:
    path = _special(kind, tmp_path / "x.csv")
    before = os.lstat(path)
    result = runner.invoke(app, ["predict", str(folder), "--model", str(onnx_model), "--out", str(path), "--overwrite"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "regular files" in result.output
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # still the device, pipe or link


def test_evaluate_report_onto_a_fifo_is_refused(runner, tmp_path: Path, onnx_model: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    _special("fifo", out / "report.json")
    result = runner.invoke(app, ["evaluate", "--model", str(onnx_model), "--data", str(tmp_path / "none"),
                                 "--out", str(out), "--overwrite"])
    assert result.exit_code == 1 and "report.json is a named pipe" in result.output, result.output


# --- 4. no hang on a FIFO: recognising our own output never opens what is not a file ---------------------

def test_recognising_an_earlier_output_never_opens_a_fifo(monkeypatch, tmp_path: Path) -> None:
    from skinclf import own_outputs
    from skinclf.own_outputs import CSV, JSON, ONNX, PNG, is_own_output

    fifo = _special("fifo", tmp_path / "f.csv")
    opened: list[str] = []

    def refuse(path, *args, **kwargs):  # opening a pipe blocks until a writer comes, reading until it closes
        opened.append(str(path))
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(own_outputs, "open", refuse, raising=False)
    monkeypatch.setattr(Path, "read_text", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    for kind in (CSV, JSON, PNG, ONNX):
        try:
            assert not is_own_output(fifo, kind)
        except AssertionError:
            pass
    assert opened == []


def test_predict_out_dev_stdout_streams_like_dash(runner, folder: Path, onnx_model: Path) -> None:
    result = runner.invoke(app, ["predict", str(folder), "--model", str(onnx_model), "--out", "/dev/stdout"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith('"path"') and "0.jpg" in result.stdout


# --- 5. every command's success path reaches its summary -------------------------------------------------

def test_export_int8_with_validation_prints_its_summary(runner, monkeypatch, tmp_path: Path) -> None:
    from skinclf.engines import export

    result = SimpleNamespace(out=tmp_path / "m.int8.onnx", format="onnx-int8", size_bytes=4e6, seconds=3.0,
                             max_abs_diff=0.01, probes=8, top1_agreement=0.99,
                             validation={"images": 10, "folder": "val", "float": {"balanced_accuracy": 0.8, "mel_recall": 0.7},
                                         "int8": {"balanced_accuracy": 0.79, "mel_recall": None}})
    monkeypatch.setattr(export, "export_model", lambda **kwargs: result)
    got = runner.invoke(app, ["export", "--format", "onnx-int8"])
    assert got.exit_code == 0, got.output  # TypeError: 'str' object is not callable before the fix
    assert "melanoma recall 0.7000 -> -" in got.output and "top-1 agreement 99.00%" in got.output


def test_predict_and_explain_reach_their_summaries(runner, folder: Path, onnx_model: Path, tmp_path: Path) -> None:
    got = runner.invoke(app, ["predict", str(folder), "--model", str(onnx_model), "--out", str(tmp_path / "r.csv")])
    assert got.exit_code == 0 and "2 files: 2 classified" in got.output, got.output
    got = runner.invoke(app, ["explain", str(folder), "--model", str(onnx_model), "--out", str(tmp_path / "maps"),
                              "--patch", "16", "--stride", "16"])
    assert got.exit_code == 0 and "2 explained, 0 could not be read" in got.output, got.output


# --- 6. nothing a user or a file supplies reaches the terminal raw ----------------------------------------

def test_one_escaping_function_shows_control_characters() -> None:
    from skinclf.ui import printable

    assert printable(PWNED + ".webp") == "\\x1b]0;PWNED\\x07.webp"
    assert printable("a\x9bb\u202ec\r\n") == "a\\x9bb\\u202ec\\x0d\\x0a"  # C1 CSI, RLO, CR, LF
    assert printable("line 1\nline \x1b2", lines=True) == "line 1\nline \\x1b2"
    assert printable("Ärzte/Bild 1.jpg") == "Ärzte/Bild 1.jpg"


def test_hostile_names_reach_the_terminal_escaped(runner, folder: Path, onnx_model: Path, tmp_path: Path) -> None:
    (folder / f"{PWNED}.webp").write_bytes(b"RIFF")  # passed over: named in the summary
    lesion_image(CLASS_COLOURS["mel"], 9).save(folder / f"{PWNED}.jpg")
    got = runner.invoke(app, ["predict", str(folder), "--model", str(onnx_model), "--out", str(tmp_path / "r.csv")])
    assert got.exit_code == 0, got.output
    assert "\x1b" not in got.stderr and "\x07" not in got.stderr
    assert "\\x1b]0;PWNED\\x07.webp" in got.stderr
    got = runner.invoke(app, ["explain", str(folder), "--model", str(onnx_model), "--out", str(tmp_path / "maps"),
                              "--patch", "16", "--stride", "16"])
    assert got.exit_code == 0 and "\x1b" not in got.output and "\\x1b]0;PWNED" in got.output, got.output
    got = runner.invoke(app, ["predict", str(tmp_path / PWNED), "--out", str(tmp_path / "s.csv")])
    assert got.exit_code == 1 and "\x1b" not in got.output and "folder not found" in got.output


# --- 9. small ones ------------------------------------------------------------------------------------------

def test_a_text_file_named_like_a_model_is_not_called_a_model(tmp_path: Path) -> None:
    from skinclf.files import check_output_file
    from skinclf.own_outputs import MODEL

    text = tmp_path / "y.tflite"
    text.write_text("my notes\n")
    with pytest.raises(SkinclfError, match="is not a model"):
        check_output_file(text, kind=MODEL)
    real = tmp_path / "z.tflite"
    real.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    with pytest.raises(SkinclfError, match="already exists and is a model"):
        check_output_file(real, kind=MODEL)


def test_serve_keeps_backslashes_so_its_csv_equals_predicts(onnx_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from skinclf.batch.predict import predict_directory
    from skinclf.engines.load import load_engine
    from skinclf.web.routes import create_app
    from skinclf.web.uploads import upload_name

    assert upload_name("scan\\left\\a.jpg", 1) == "scan\\left\\a.jpg"
    root = tmp_path / "visit"
    root.mkdir()
    lesion_image(CLASS_COLOURS["mel"], 1).save(root / "left\\arm.jpg")
    predict_directory(directory=root, out=tmp_path / "p.csv", model=onnx_model, show_progress=False)
    client = TestClient(create_app(load_engine(onnx_model, batch_size=4)))
    data = (root / "left\\arm.jpg").read_bytes()
    got = client.post("/api/predict", params={"format": "csv"}, files=[("files", ("left\\arm.jpg", data, "image/jpeg"))])
    assert got.status_code == 200 and got.text == (tmp_path / "p.csv").read_text(encoding="utf-8")


def _tiff_pages(path: Path, pages: int) -> None:
    frames = [lesion_image(CLASS_COLOURS["nv"], i) for i in range(pages)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def test_a_multi_page_tiff_is_classified_on_page_1_with_a_warning(runner, onnx_model: Path, tmp_path: Path) -> None:
    import csv

    root = tmp_path / "visit"
    root.mkdir()
    _tiff_pages(root / "stack.tif", 3)
    _tiff_pages(root / "single.tif", 1)
    got = runner.invoke(app, ["predict", str(root), "--model", str(onnx_model), "--out", str(tmp_path / "r.csv")])
    assert got.exit_code == 0, got.output
    rows = {r["path"]: r for r in csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text(encoding="utf-8")))}
    assert rows["stack.tif"]["top1_class"] and not rows["stack.tif"]["error"]
    assert "3 pages" in rows["stack.tif"]["warning"] and "page 1" in rows["stack.tif"]["warning"]
    assert "page" not in rows["single.tif"]["warning"]


# --- 2. --metadata keeps only what the folder needs ---------------------------------------------------------

def test_metadata_is_streamed_and_only_the_folders_rows_are_kept(tmp_path: Path) -> None:
    from skinclf.batch import patient

    rows = "".join(f"H{i},ISIC_{i:07d},nv,histo,{i % 90},male,back\n" for i in range(5000))
    meta = tmp_path / "m.csv"
    meta.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n" + rows + "H,ISIC_9999999,nv,histo,300,,\n")
    files = ["ISIC_0000007.jpg", "sub/ISIC_0004000.png"]
    source = patient.read_metadata(meta, files)  # the bad age is on a row for another image: not checked
    assert set(source.by_id) == {"isic_0000007", "isic_0004000"} and source.rows == 5001
    joined = patient.join(source, files)
    assert joined.record()["rows_not_in_folder"] == 4999 and "4999 rows for images not in the folder" in joined.notes()[1]


def test_a_metadata_file_larger_than_a_clinics_is_refused_saying_why(monkeypatch, tmp_path: Path) -> None:
    from skinclf.batch import patient

    assert patient.MAX_BYTES <= 64 * 1024 * 1024
    meta = tmp_path / "m.csv"
    meta.write_text("image_id,age\nISIC_1,40\n")
    monkeypatch.setattr(patient, "MAX_BYTES", 10)
    with pytest.raises(SkinclfError, match="more than a clinic's metadata file holds"):
        patient.read_metadata(meta, ["ISIC_1.jpg"])


# --- 8. a Ray skinclf starts has no dashboard, no metrics export, no usage statistics -------------------

def test_ray_local_starts_without_dashboard_metrics_or_usage_stats_and_sigterm_is_one_line(
        monkeypatch, onnx_model: Path, tmp_path: Path) -> None:
    import signal
    import sys

    from skinclf.batch import ray as cluster
    from skinclf.batch.ray_address import parse_address

    calls: list[dict] = []
    fake = SimpleNamespace(init=lambda **kw: calls.append(kw), shutdown=lambda: None, put=lambda data: "ref",
                           cluster_resources=lambda: {"CPU": 2})
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(cluster, "require_ray", lambda: None)
    monkeypatch.setattr(cluster, "loopback_only", lambda: False)
    monkeypatch.setattr(cluster, "_temp_dir", lambda: str(tmp_path / "ray"))
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_enable_metrics_collection", cluster.USAGE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(cluster.USAGE_ENV, "0")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        engine = SimpleNamespace(onnx_path=str(onnx_model))
        pool = cluster.start(parse_address("local"), workers=1, engine=engine, directory=tmp_path, top_k=3,
                             all_probs=False, batch_size=4, threads=1, tta=1)
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    (init,) = calls
    assert init["include_dashboard"] is False and init["_system_config"]["enable_metrics_collection"] is False
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0" and os.environ["RAY_enable_metrics_collection"] == "0"
    assert pool.workers == 1
    with pytest.raises(KeyboardInterrupt):  # predict's interrupted path: one line naming the .partial, exit 130
        handler(signal.SIGTERM, None)


# --- 9. resume without --metadata after a --metadata run names the option ----------------------------------

def test_resume_without_metadata_after_a_metadata_run_names_the_option(runner, folder: Path, onnx_model: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    assert runner.invoke(app, ["predict", str(folder), "--model", str(onnx_model), "--out", str(out)]).exit_code == 0
    text = out.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join([text[0] + ',"metadata"', *(line + ',"missing"' for line in text[1:])]) + "\n")
    got = runner.invoke(app, ["predict", str(folder), "--model", str(onnx_model), "--out", str(out), "--resume"])
    assert got.exit_code == 1 and "written with --metadata" in got.output and "older version" not in got.output


# --- 7. --resume --verify catches an edit in place that kept size and modification time --------------------

def test_resume_verify_redoes_a_file_edited_in_place_with_its_old_mtime(runner, folder: Path, onnx_model: Path,
                                                                       tmp_path: Path) -> None:
    import json

    out = tmp_path / "r.csv"
    args = ["predict", str(folder), "--model", str(onnx_model), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    image = folder / "0.jpg"
    before = os.stat(image)
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a corrupted byte, same size
    image.write_bytes(bytes(data))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p / rsync -t leave it
    plain = runner.invoke(app, [*args, "--resume"])
    assert plain.exit_code == 0 and "2 rows kept" in plain.output and "(checked: size and modification time)" in plain.output
    verified = runner.invoke(app, [*args, "--resume", "--verify"])
    assert verified.exit_code == 0, verified.output
    assert "1 row kept" in verified.output and "SHA-256 of the content (--verify)" in verified.output
    assert "1 row redone (file content changed since (SHA-256, --verify))" in verified.output
    sidecar = json.loads((tmp_path / "r.csv.json").read_text(encoding="utf-8"))["resume"]
    assert sidecar["check"].startswith("size, modification time and SHA-256") and len(sidecar["files"]["1.jpg"]) == 3
    again = runner.invoke(app, [*args, "--resume", "--verify"])
    assert again.exit_code == 0 and "2 rows kept" in again.output
    assert runner.invoke(app, [*args, "--verify"]).exit_code == 1  # --verify needs --resume


def test_serve_reaches_its_ready_lines_with_names_escaped(runner, monkeypatch) -> None:
    pytest.importorskip("fastapi")
    from skinclf.web import server

    info = SimpleNamespace(warnings=[f"{PWNED}.onnx is stale"], url="http://127.0.0.1:8000/",
                           model={"name": f"m{PWNED}", "sha256": "ab" * 32, "engine": "onnx"})
    monkeypatch.setattr(server, "serve", lambda **kwargs: kwargs["on_ready"](info))
    got = runner.invoke(app, ["serve"])
    assert got.exit_code == 0 and "Open http://127.0.0.1:8000/ in a browser" in got.output, got.output
    assert "\x1b" not in got.output and "Warning: \\x1b]0;PWNED\\x07.onnx is stale" in got.output
