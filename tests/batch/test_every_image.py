"""No image left behind: every image reachable is classified or reported, every
refusal leads to a command that works, and nothing depends on thread timing."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import pandas as pd
import pytest
from utils.models import make_tiny_bundle
from utils.synthetic import lesion_image
from PIL import Image

from skinclf.batch.predict import predict_directory
from skinclf.batch.results import warning_cell
from skinclf.cli import app
from skinclf.data.images import ImageError, load_image
from skinclf.data.walk import walk_images
from skinclf.errors import SkinclfError


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lesion_image((120, 60, 40), seed, size=size).save(path)
    return path


def unlistable(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """Make listing these folders fail as an unreadable folder does (root reads chmod-000 ones)."""
    blocked = {os.path.realpath(f) for f in folders}
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.path.realpath(path) in blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


# --- 1. images silently left out ------------------------------------------------------------


@pytest.fixture
def clinic(tmp_path: Path) -> Path:
    """A folder with an archive mounted by link, a link loop, a locked folder and a dead link."""
    root = tmp_path / "clinic"
    image(root / "a.jpg")
    image(tmp_path / "mounted" / "2019" / "b.jpg", 1)
    (root / "archive").symlink_to(tmp_path / "mounted", target_is_directory=True)
    (root / "archive" / "2019" / "loop").symlink_to(tmp_path / "mounted", target_is_directory=True)
    image(root / "locked" / "c.jpg", 2)
    (root / "gone").symlink_to(tmp_path / "unmounted-share", target_is_directory=True)
    return root


def test_linked_folders_are_followed_and_unreadable_ones_are_error_rows(runner, monkeypatch, clinic, tiny_bundle,
                                                                        tmp_path) -> None:
    unlistable(monkeypatch, clinic / "locked")
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(clinic), "--out", str(out), "--model", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    rows = dict(zip(read(out)["path"], read(out)["error"]))
    assert rows == {
        "a.jpg": "",
        "archive/2019/b.jpg": "",  # through the link, once: the loop back to the archive is not followed again
        "gone": "broken link: its target does not exist",
        "locked/": "cannot list folder: permission denied",
    }
    assert "2 folders or links could not be read" in result.output
    strict = runner.invoke(app, ["predict", str(clinic), "--out", str(out), "--model", str(tiny_bundle), "--strict"])
    assert strict.exit_code == 1 and "2 folders or links could not be read" in strict.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists folders whatever their permissions")
def test_folder_without_permissions_is_reported(tmp_path) -> None:
    image(tmp_path / "ok.jpg")
    image(tmp_path / "locked" / "x.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        found = walk_images(tmp_path)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert found.files == ["ok.jpg"]
    assert [(p.path, p.reason) for p in found.problems] == [("locked/", "cannot list folder: permission denied")]


def _random_tree(rng: random.Random, root: Path, outside: Path) -> set[Path]:
    """Folders, images (good and bad), other files, hidden ones, links (loops, to outside, dead);
    returns the real folders that cannot be listed."""
    folders = [root]
    for i in range(rng.randint(1, 6)):
        parent = rng.choice(folders)
        folder = parent / (f".hidden{i}" if rng.random() < 0.1 else f"d{i}")
        folder.mkdir()
        folders.append(folder)
    image(outside / "far.png", 99)
    for i in range(rng.randint(2, 10)):
        folder = rng.choice(folders)
        kind = rng.random()
        if kind < 0.5:
            image(folder / f"img{i}.{rng.choice(['jpg', 'PNG', 'bmp'])}", i)
        elif kind < 0.65:
            (folder / f"bad{i}.jpg").write_bytes(b"" if rng.random() < 0.5 else b"not an image")
        elif kind < 0.75:
            (folder / f"notes{i}.txt").write_text("x")
        elif kind < 0.85:
            image(folder / f".hidden{i}.jpg", i)
        else:
            (folder / f"photo{i}.jpg").symlink_to(outside / "far.png")
    for i in range(rng.randint(0, 3)):
        target = rng.choice([*folders, outside, root.parent / "nowhere"])
        rng.choice(folders).joinpath(f"link{i}").symlink_to(target, target_is_directory=True)
    return {f.resolve() for f in folders[1:] if rng.random() < 0.2}


def _expected(root: Path, blocked: set[Path]) -> tuple[list[Path], set[Path], int]:
    """Independently of skinclf: the real image files reachable through visible, listable
    folders; the reachable folders that cannot be listed; and the dead links to report."""
    files, unlistable_seen, dead, seen, todo = [], set(), 0, set(), [root]
    while todo:
        folder = todo.pop()
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        if real in blocked:
            unlistable_seen.add(real)
            continue
        for entry in folder.iterdir():
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                todo.append(entry)
            elif entry.is_symlink() and not entry.exists():
                dead += 1
            elif entry.suffix.lower() in {".jpg", ".png", ".bmp"}:
                files.append(entry.resolve())
    return files, unlistable_seen, dead


@pytest.mark.parametrize("seed", range(20))
def test_every_reachable_image_is_a_row_exactly_once(monkeypatch, tiny_bundle, tmp_path, seed) -> None:
    rng = random.Random(seed)
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    blocked = _random_tree(rng, root, outside)
    unlistable(monkeypatch, *blocked)
    files, unlistable_seen, dead = _expected(root, blocked)
    if not files and not unlistable_seen and not dead:
        image(root / "one.jpg")
        files = [(root / "one.jpg").resolve()]
    out = tmp_path / "r.csv"
    predict_directory(directory=root, out=out, model=tiny_bundle, show_progress=False)
    frame = read(out)
    folders = frame[frame["path"].str.endswith("/")]
    links = frame[frame["error"].str.startswith("broken link")]
    rows = frame.drop(folders.index).drop(links.index)
    assert sorted((root / p).resolve() for p in rows["path"]) == sorted(files)  # each reachable image once
    assert {(root / p).resolve() for p in folders["path"]} == unlistable_seen
    assert (folders["error"] == "cannot list folder: permission denied").all()
    assert len(links) == dead


# --- 2. --resume dead ends ------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    for i in range(3):
        image(folder / f"{i}.jpg", i)
    return folder


def test_resume_with_other_options_names_the_way_out_and_leaves_nothing(small, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "a.csv"
    predict_directory(directory=small, out=out, model=tiny_bundle, show_progress=False)
    with pytest.raises(SkinclfError, match=r"resume with those options \(--resume --top-k 3\), or run without "
                                           r"--resume to replace it"):
        predict_directory(directory=small, out=out, model=tiny_bundle, all_probs=True, resume=True,
                          show_progress=False)
    assert not (tmp_path / "a.csv.partial").exists()
    # Both ways out work.
    predict_directory(directory=small, out=out, model=tiny_bundle, top_k=3, resume=True, show_progress=False)
    predict_directory(directory=small, out=out, model=tiny_bundle, all_probs=True, show_progress=False)
    assert "prob_nv" in read(out).columns


def test_an_interrupted_run_can_be_resumed_or_overwritten(small, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "a.csv"
    partial = tmp_path / "a.csv.partial"
    partial.write_text("path,top1_class,top1_name,top1_prob,mel_prob,ood_percentile,error,warning\n"
                       "0.jpg,nv,melanocytic nevus,0.5000,0.1000,50.0,,\n")
    with pytest.raises(SkinclfError, match="add --resume .* or --overwrite to start over"):
        predict_directory(directory=small, out=out, model=tiny_bundle, show_progress=False)
    with pytest.raises(SkinclfError, match=r"written with --top-k 1 \(no --all-probs\).*--resume --top-k 1.*--overwrite"):
        predict_directory(directory=small, out=out, model=tiny_bundle, resume=True, show_progress=False)
    summary = predict_directory(directory=small, out=out, model=tiny_bundle, top_k=1, resume=True,
                                show_progress=False)
    # Written by hand (no record of its model, options and file): redone rather than trusted.
    assert summary.resumed == 0 and summary.classified == 3
    assert summary.redone == {"no record of what they were computed from": 1}
    partial.write_text("junk\n")
    predict_directory(directory=small, out=out, model=tiny_bundle, overwrite=True, show_progress=False)
    assert len(read(out)) == 3 and not partial.exists()


def test_resuming_onto_a_file_that_is_not_a_csv(small, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "notes.csv"
    out.write_bytes(b"\x89PNG\r\n\x1a\n not a csv at all")
    for resume in (True, False):  # never replaced without --overwrite, resuming or not
        with pytest.raises(SkinclfError, match="already exists and is not a predict CSV written by skinclf: refusing "
                                               "to replace it; choose another path, or add --overwrite"):
            predict_directory(directory=small, out=out, model=tiny_bundle, resume=resume, show_progress=False)
    assert out.read_bytes().startswith(b"\x89PNG") and not (tmp_path / "notes.csv.partial").exists()
    predict_directory(directory=small, out=out, model=tiny_bundle, overwrite=True, show_progress=False)
    assert len(read(out)) == 3


def test_a_failed_start_leaves_no_partial(monkeypatch, small, tiny_bundle, tmp_path) -> None:
    from skinclf.engines import runner as inference

    def broken(*args, **kwargs):
        raise RuntimeError("decoder crashed")
        yield  # pragma: no cover

    monkeypatch.setattr(inference, "predict_files", broken)
    with pytest.raises(RuntimeError):
        predict_directory(directory=small, out=tmp_path / "a.csv", model=tiny_bundle, show_progress=False)
    assert list(tmp_path.glob("a.csv*")) == []


# --- 3. output paths checked before any work ------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: (d / "out.csv").mkdir(), "is a folder: give a file name"),
        (lambda d: (d / "out.csv.json").mkdir(), "out.csv.json is a folder"),
        (lambda d: (d / "out.csv.partial").mkdir(), "out.csv.partial is a folder"),
    ],
)
def test_output_paths_are_checked_before_any_work(runner, small, tmp_path, make, needle) -> None:
    make(tmp_path)
    # A model that does not exist: the output check must come first, before any work.
    result = runner.invoke(app, ["predict", str(small), "--out", str(tmp_path / "out.csv"), "--model",
                                 str(tmp_path / "no-model.keras")])
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and needle in result.output, result.output


def test_output_under_a_file_or_in_a_read_only_folder(runner, monkeypatch, small, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["predict", str(small), "--out", str(tmp_path / "file" / "sub" / "r.csv")])
    assert result.exit_code == 1 and "is a file, so no folder can be made there" in result.output
    from skinclf import files

    monkeypatch.setattr(files, "_writable", lambda folder: False)  # root may write anywhere
    result = runner.invoke(app, ["predict", str(small), "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 1 and "cannot write in" in result.output
    for command in (["evaluate", "--out", str(tmp_path / "rep")], ["prepare", "--out", str(tmp_path / "prep")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and "cannot write in" in result.output, result.output


# --- 4. numeric options validated up front, in every command ---------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["predict", "{small}", "--workers", "-1"], "--workers -1: must be at least 0"),
        (["predict", "{small}", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["predict", "{small}", "--top-k", "0"], "--top-k 0: must be at least 1"),
        (["predict", "{small}", "--tta", "3"], "--tta 3: choose one of 1, 4"),
        (["evaluate", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["evaluate", "--tta", "5"], "--tta 5: choose one of 1, 4"),
        (["train", "--workers", "0"], "--workers 0: must be at least 1"),
        (["train", "--focal-gamma", "-1"], "--focal-gamma -1.0: must be at least 0"),
        (["train", "--seed", "-1"], "--seed -1: must be at least 0"),
        (["prepare", "--seed", "-1"], "--seed -1: must be at least 0"),
        (["prepare", "--val", "0"], "--val 0.0: must be between 0 and 1"),
    ],
)
def test_numeric_options_fail_in_one_line_before_any_work(runner, small, tmp_path, monkeypatch, args, needle) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [a.format(small=small) for a in args]
    result = runner.invoke(app, [*argv, "--out", str(tmp_path / ("r.csv" if argv[0] == "predict" else "o"))]
                           if argv[0] != "train" else argv)
    assert result.exit_code == 1, result.output
    assert result.output.count("Error:") == 1 and needle in result.output and "Traceback" not in result.output
    assert list(tmp_path.glob("r.csv*")) == []


# --- 5. one message for an oversized file, whatever the threads do ---------------------------


def test_oversized_images_get_one_message_without_touching_warning_filters(monkeypatch, tmp_path) -> None:
    import sys

    Image.new("1", (12_000, 8_000)).save(tmp_path / "bomb.png")  # above Pillow's warning limit
    Image.new("1", (15_000, 13_000)).save(tmp_path / "huge.png")  # above Pillow's error limit
    real, callers = warnings.catch_warnings, []

    def recorded(*args, **kwargs):  # catch_warnings is not thread-safe: decode threads must not use it
        callers.append(sys._getframe(1).f_globals.get("__name__", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(warnings, "catch_warnings", recorded)
    with real(record=True) as seen:
        warnings.simplefilter("always")
        messages = []
        for name in ("bomb.png", "huge.png"):
            with pytest.raises(ImageError) as error:
                load_image(tmp_path / name, 32)
            messages.append(str(error.value))
    assert messages == ["image too large (12000x8000 pixels; the limit is 80,000,000)",
                        "image too large (15000x13000 pixels; the limit is 80,000,000)"]
    assert [c for c in callers if c.startswith("skinclf")] == []
    assert [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)] == []


def test_oversized_copies_all_get_the_same_row(tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "bombs"
    folder.mkdir()
    Image.new("1", (12_000, 8_000)).save(folder / "0.png")
    data = (folder / "0.png").read_bytes()
    for i in range(1, 12):
        (folder / f"{i}.png").write_bytes(data)
    predict_directory(directory=folder, out=tmp_path / "r.csv", model=tiny_bundle, batch_size=2, workers=4,
                      show_progress=False)
    assert set(read(tmp_path / "r.csv")["error"]) == {"image too large (12000x8000 pixels; the limit is 80,000,000)"}


# --- 7. images a model cannot judge ---------------------------------------------------------


def test_tiny_images_are_classified_with_a_warning_that_strict_ignores(runner, tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "imgs"
    image(folder / "ok.jpg")
    Image.new("RGB", (1, 1), (120, 60, 40)).save(folder / "dot.png")
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--model", str(tiny_bundle), "--strict"])
    assert result.exit_code == 0, result.output
    frame = read(out).set_index("path")
    assert frame.loc["dot.png", "top1_class"] and frame.loc["dot.png", "error"] == ""
    assert frame.loc["dot.png", "warning"] == ("image is 1x1 pixels, far below the model's 32x32 input: "
                                               "the result is unreliable")
    assert frame.loc["ok.jpg", "warning"] == ""
    assert "1 with warnings" in result.output


def test_warning_cell_joins_short_messages() -> None:
    assert warning_cell([]) == ""
    assert warning_cell(["too small", "out of\ndistribution; unusual", "too small"]) == (
        "too small; out of distribution, unusual")


# --- 8. smaller dead ends ---------------------------------------------------------------------


def test_default_top_k_fits_a_two_class_model(small, tmp_path) -> None:
    bundle = make_tiny_bundle(tmp_path / "two.keras", classes=("mel", "nv"))
    predict_directory(directory=small, out=tmp_path / "r.csv", model=bundle, show_progress=False)
    assert list(read(tmp_path / "r.csv").columns) == ["path", "top1_class", "top1_name", "top1_prob", "top2_class",
                                                      "top2_prob", "mel_prob", "ood_percentile", "error", "warning"]


def test_resume_drops_rows_of_deleted_files_and_says_so(runner, small, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    predict_directory(directory=small, out=out, model=tiny_bundle, show_progress=False)
    (small / "1.jpg").unlink()
    image(small / "3.jpg", 3)
    result = runner.invoke(app, ["predict", str(small), "--out", str(out), "--model", str(tiny_bundle), "--resume"])
    assert result.exit_code == 0, result.output
    assert list(read(out)["path"]) == ["0.jpg", "2.jpg", "3.jpg"]
    assert "3 files: 3 classified" in result.output and "1 row dropped: their files are no longer in the folder" \
        in result.output


def test_help_keeps_every_character_and_no_type_noise(runner) -> None:
    train = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    assert "balanced,mel*2" in train
    predict = runner.invoke(app, ["predict", "--help"], terminal_width=200).output
    assert "prob_<class>" in predict
    for text in (train, predict):
        assert "<bool>" not in text and "<str>" not in text and "{directory}" not in text
    for command in ("fetch", "prepare", "evaluate", "export", "serve", "calibrate", "explain", "ensemble"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert "<bool>" not in text and "<str>" not in text and "{" not in text, command


def test_bad_zip_given_with_from_is_not_to_be_deleted(tmp_path) -> None:
    from skinclf.data.fetch import fetch_dataset

    archive = tmp_path / "mine.zip"
    archive.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SkinclfError) as error:
        fetch_dataset(dest=tmp_path / "ham", source=archive, show_progress=False)
    assert "delete" not in str(error.value) and "copy" in str(error.value)
    assert archive.exists()


def test_legacy_h5_model_is_named_as_such(tmp_path) -> None:
    from skinclf.model.bundle_meta import read_bundle_meta

    legacy = tmp_path / "model.h5"
    legacy.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(SkinclfError, match=r"legacy Keras 2 \.h5 file.*\.keras bundle from `skinclf train`"):
        read_bundle_meta(legacy)


# --- 6. scores that mislead: images the model was trained or validated on ------------------


def _scored_csv(tmp_path: Path, names: list[str], truth: dict[str, str]) -> tuple[Path, Path]:
    from utils.predictions import one_hot_probs, write_predictions

    entries = [(f"{n}.jpg", one_hot_probs(truth[n]), None) for n in names]
    preds = write_predictions(tmp_path / "r.csv", entries, all_probs=True)
    (tmp_path / "truth.csv").write_text("image_id,dx\n" + "".join(f"{n},{truth[n]}\n" for n in names))
    return preds, tmp_path / "truth.csv"


TRUTH = {"I1": "mel", "I2": "nv", "I3": "bkl", "I4": "nv", "I5": "mel"}


def test_evaluate_counts_images_the_model_has_seen_and_scores_the_rest_alone(runner, tmp_path) -> None:
    bundle = make_tiny_bundle(tmp_path / "m.keras", data={"train_ids": ["I1", "I2"], "val_ids": ["I3"]})
    preds, truth = _scored_csv(tmp_path, list(TRUTH), TRUTH)
    result = runner.invoke(app, ["evaluate", "--predictions", str(preds), "--truth", str(truth), "--model", str(bundle),
                                 "--out", str(tmp_path / "rep")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert ("Caution: 2 of 5 scored images were in the model's training split and 1 in its validation split"
            in result.output)
    assert "Held-out rest (2 images)" in result.output
    import json

    seen = json.loads((tmp_path / "rep" / "report.json").read_text())["seen"]
    assert (seen["train"], seen["val"], seen["held_out"]) == (2, 1, 2)
    assert seen["held_out_report"]["n"] == 2 and seen["source"] == "the model's metadata"


def _split_csv(folder: Path, rows: dict[str, str]) -> str:
    from skinclf.files import atomic_write, sha256_text

    text = "image_id,lesion_id,dx,split,path\n" + "".join(
        f"{i},L{i},{TRUTH[i]},{s},{s}/{TRUTH[i]}/{i}.jpg\n" for i, s in rows.items())
    atomic_write(folder / "split.csv", text)
    return sha256_text(text)


def test_older_bundles_fall_back_to_split_csv_checked_by_fingerprint(runner, tmp_path) -> None:
    prepared = tmp_path / "prepared"
    fingerprint = _split_csv(prepared, {"I1": "train", "I2": "val", "I3": "test", "I4": "test", "I5": "test"})
    found_by_path = make_tiny_bundle(tmp_path / "a.keras", fingerprint=fingerprint, data={"path": str(prepared)})
    elsewhere = make_tiny_bundle(tmp_path / "b.keras", fingerprint=fingerprint, data={"path": "nowhere"})
    other = make_tiny_bundle(tmp_path / "c.keras", fingerprint="0" * 64, data={"path": "nowhere"})
    preds, truth = _scored_csv(tmp_path, list(TRUTH), TRUTH)
    common = ["evaluate", "--predictions", str(preds), "--truth", str(truth), "--out", str(tmp_path / "rep")]

    def seen(*args: str) -> dict:
        from skinclf.evaluation.evaluate import run_evaluation

        result = runner.invoke(app, [*common, *args], terminal_width=200)
        assert result.exit_code == 0, result.output
        return run_evaluation(predictions=preds, truth=truth, out=tmp_path / "rep", model=Path(args[1]),
                              split=Path(args[3]) if len(args) > 2 else None).report["seen"], result.output

    report, output = seen("--model", str(found_by_path))  # the split.csv where the model was trained
    assert (report["train"], report["val"], report["held_out"]) == (1, 1, 3) and "Held-out rest (3" in output
    report, output = seen("--model", str(elsewhere), "--split", str(prepared))
    assert report["train"] == 1 and report["source"] == str(prepared / "split.csv")
    report, output = seen("--model", str(elsewhere))
    assert report["known"] is False and "cannot tell which of these images the model was trained on" in output
    result = runner.invoke(app, [*common, "--model", str(other), "--split", str(prepared)])
    assert result.exit_code == 1 and "is not the split this model was trained on" in result.output


def test_evaluating_a_folder_counts_seen_images_too(tmp_path) -> None:
    from utils.synthetic import write_ham

    from skinclf.data.prepare import prepare_dataset
    from skinclf.evaluation.evaluate import evaluate_model

    ham = write_ham(tmp_path / "ham", per_class=3)
    result = prepare_dataset(src=ham, out=tmp_path / "prepared", val=0.2, test=0.3, show_progress=False)
    bundle = make_tiny_bundle(tmp_path / "m.keras", fingerprint=result.fingerprint, data={"path": "not-here"})
    test = evaluate_model(model=bundle, data=tmp_path / "prepared" / "test", out=tmp_path / "rep").report["seen"]
    assert test["known"] and (test["train"], test["val"]) == (0, 0) and test["held_out"] > 0
    val = evaluate_model(model=bundle, data=tmp_path / "prepared" / "val", out=tmp_path / "rep").report["seen"]
    assert val["val"] == len(list((tmp_path / "prepared" / "val").rglob("*.jpg"))) and val["held_out"] == 0


@pytest.mark.integration
def test_readme_samples_are_mostly_training_images(tmp_path) -> None:
    """The README's 300 full-size samples: 201 are in the bundled model's seed-42 training split."""
    from utils.paths import require, BUNDLED_MODEL, SHARED_FULLRES, SHARED_HAM

    from skinclf.data.prepare import prepare_dataset
    from skinclf.evaluation.evaluate import evaluate_predictions
    from skinclf.model.bundle_meta import read_bundle_meta

    require(SHARED_FULLRES), require(SHARED_HAM), require(BUNDLED_MODEL)
    split = prepare_dataset(src=SHARED_HAM, out=tmp_path / "prepared", seed=42, val=0.15, test=0.15,
                            show_progress=False)
    assert split.fingerprint == read_bundle_meta(BUNDLED_MODEL)["data"]["fingerprint"]
    meta = pd.read_csv(SHARED_HAM / "HAM10000_metadata.csv")
    names = sorted(p.stem for p in SHARED_FULLRES.glob("*.jpg"))
    truth = dict(zip(meta["image_id"], meta["dx"]))
    preds, truth_csv = _scored_csv(tmp_path, names, {n: truth[n] for n in names})
    report = evaluate_predictions(predictions=preds, truth=truth_csv, out=tmp_path / "rep", model=BUNDLED_MODEL,
                                  split=tmp_path / "prepared").report
    assert (report["seen"]["train"], report["seen"]["val"], report["seen"]["held_out"]) == (201, 41, 58)
