"""What the user sees: help without type noise, argument errors as one line,
`--out -` counts and order, a closed pipe, plurals, one "Interrupted", class names explained."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from utils.models import interrupt_after
from utils.paths import BUNDLED_MODEL, REPO
from utils.synthetic import lesion_image

from skinclf.cli import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
TYPE_NOISE = re.compile(r"<(bool|int|float|str|path|text|list\[[^\]]*\])>", re.IGNORECASE)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_has_no_type_noise(runner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"] if command else ["--help"], terminal_width=200)
    assert result.exit_code == 0
    assert not TYPE_NOISE.findall(result.output), TYPE_NOISE.findall(result.output)
    assert "--help" in result.output


@pytest.mark.parametrize(("args", "needle"), [
    (["predict"], "Error: Missing argument 'DIR'"),
    (["predict", "x", "--no-such"], "Error: No such option: --no-such"),
    (["predict", "x", "--batch-size", "many"], "Error: Invalid value for '--batch-size'"),
    (["ensemble", "--out", "x.keras"], "Error: Missing argument 'MODEL'"),
    (["no-such-command"], "Error: No such command 'no-such-command'"),
])
def test_argument_errors_are_one_line_and_exit_1(runner, args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.output.startswith(needle) and result.output.count("\n") == 1, result.output
    assert "--help" in result.output  # the one short hint


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Good images, a file that is no image, and a dead link sorting between them."""
    d = tmp_path / "d"
    d.mkdir()
    for name in ("a.jpg", "c.jpg", "z.jpg"):
        lesion_image((120, 60, 40), ord(name[0])).save(d / name)
    (d / "b_bad.jpg").write_bytes(b"")
    (d / "gone").symlink_to(tmp_path / "unmounted", target_is_directory=True)
    return d


def test_stdout_rows_are_sorted_and_the_summary_counts_them(runner, mixed, tiny_bundle) -> None:
    result = runner.invoke(app, ["predict", str(mixed), "--out", "-", "--model", str(tiny_bundle), "--top-k", "1"])
    assert result.exit_code == 0, result.output
    header, *rows = list(csv.reader(io.StringIO(result.stdout)))
    assert [r[0] for r in rows] == ["a.jpg", "b_bad.jpg", "c.jpg", "gone", "z.jpg"]
    errors = [r[0] for r in rows if r[header.index("error")]]
    assert errors == ["b_bad.jpg", "gone"]
    assert "4 files: 3 classified, 1 error, 1 folder or link could not be read" in result.stderr


def test_stdout_strict_counts_like_a_file(runner, mixed, tiny_bundle, tmp_path) -> None:
    for out in ("-", str(tmp_path / "r.csv")):
        result = runner.invoke(app, ["predict", str(mixed), "--out", out, "--model", str(tiny_bundle), "--strict"])
        assert result.exit_code == 1
        assert ("2 rows are errors: 1 of 4 files could not be classified and 1 folder or link could not be read"
                in result.stderr), result.stderr


def test_a_closed_pipe_ends_quietly(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    for i in range(3):
        lesion_image((40 * i, 90, 120), i).save(tmp_path / f"{i}.jpg")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited: every write fails with EPIPE
    done = subprocess.run([sys.executable, "-m", "skinclf", "predict", str(tmp_path), "--out", "-", "--model",
                           str(BUNDLED_MODEL.with_suffix(".onnx"))], stdout=write_end, stderr=subprocess.PIPE,
                          env=env, text=True, check=False)
    os.close(write_end)
    assert done.returncode in (0, 141), done.stderr
    assert "Error" not in done.stderr and "Traceback" not in done.stderr and "Exception" not in done.stderr


def test_plurals_and_one_interrupted(runner, monkeypatch, tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    lesion_image((120, 60, 40), 1).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"")
    out = tmp_path / "r.csv"
    first = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(tiny_bundle)])
    assert "2 files: 1 classified, 1 error;" in first.output
    lesion_image((20, 160, 40), 2).save(folder / "c.jpg")
    resumed = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(tiny_bundle), "--resume"])
    assert "2 rows kept from the earlier run" in resumed.output

    interrupt_after(monkeypatch, 1)
    result = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "x.csv"), "--model",
                                 str(tiny_bundle), "--batch-size", "1"])
    assert result.exit_code == 130
    assert result.output.count("Interrupted") == 1 and "--resume" in result.output


def test_the_sidecar_and_the_readme_explain_the_class_abbreviations(runner, tiny_bundle, tmp_path) -> None:
    lesion_image((120, 60, 40), 1).save(tmp_path / "a.jpg")
    out = tmp_path / "out" / "r.csv"
    out.parent.mkdir()
    result = runner.invoke(app, ["predict", str(tmp_path), "--out", str(out), "--model", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    names = json.loads((tmp_path / "out" / "r.csv.json").read_text())["classes"]
    assert names["akiec"] == "actinic keratosis / Bowen's disease" and names["nv"] == "melanocytic nevus"
    readme = (REPO / "README.md").read_text()
    text = " ".join(readme[readme.index("### predict"):readme.index("### serve")].split())
    for full in ("actinic keratosis / Bowen's disease", "basal cell carcinoma", "benign keratosis", "dermatofibroma",
                 "melanoma", "melanocytic nevus", "vascular lesion"):
        assert full in text


def test_an_empty_or_folder_out_is_one_line_before_any_work(runner, tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    lesion_image((120, 60, 40), 1).save(folder / "a.jpg")
    for out, says in (("", "Error: --out is empty: give a CSV file name"), (str(folder), "is a folder: give a file name")):
        result = runner.invoke(app, ["predict", str(folder), "--out", out, "--model", str(tiny_bundle)])
        assert result.exit_code == 1 and says in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg"]


def test_files_passed_over_on_purpose_are_counted_in_the_summary(runner, tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    lesion_image((120, 60, 40), 1).save(folder / "a.jpg")
    (folder / "b.webp").write_bytes(b"RIFF....WEBP")
    (folder / ".hidden.jpg").write_bytes(b"")
    (folder / "sub" / "notes.txt").write_text("visit notes")
    result = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 file: 1 classified" in text
    assert "3 other files passed over (hidden, skinclf's own heat maps, or not .jpg, .jpeg, .png, .bmp, .tif or .tiff: e.g. .hidden.jpg, " \
           "b.webp, sub/notes.txt)" in text
