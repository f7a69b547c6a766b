"""`skinclf predict`: every format and mode, every kind of bad file, streaming, resume."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from utils.models import interrupt_after
from utils.synthetic import lesion_image, CLASSES
from PIL import Image, ImageFilter

from skinclf.batch.predict import predict_directory
from skinclf.cli import app
from skinclf.data.images import ImageError, load_image
from skinclf.engines import runner as inference
from skinclf.errors import SkinclfError

GOOD = {
    "a_rgb.jpg", "b_same.png", "c_upper.JPEG", "d_gray.png", "e_palette.png", "f_rgba.png", "g_cmyk.jpg",
    "h_16bit.png", "i.bmp", "j.tif", "k_exif_rotated.jpg", "sub/l_nested.jpg",
}
BAD = {
    "x_empty.jpg": "empty file",
    "x_truncated.jpg": "truncated",
    "x_corrupt.jpg": "not a recognised image",
    "x_text.jpg": "not a recognised image",
    "x_pdf.jpg": "not a recognised image",
    "x_bomb.png": "image too large",
}
SKIPPED = {".hidden.jpg", "notes.txt", "README.md", ".cache/inside.jpg"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder mixing good images of each format and mode with each kind of bad file."""
    d = tmp_path_factory.mktemp("mixed")
    (d / "sub").mkdir()
    (d / ".cache").mkdir()
    base = lesion_image((120, 60, 40), 7, size=(96, 72))
    base.save(d / "a_rgb.jpg", quality=95)
    base.save(d / "b_same.png")
    base.save(d / "c_upper.JPEG", quality=90)
    base.convert("L").save(d / "d_gray.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "e_palette.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "f_rgba.png")
    base.convert("CMYK").save(d / "g_cmyk.jpg")
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(d / "h_16bit.png")
    base.save(d / "i.bmp")
    base.save(d / "j.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    base.save(d / "k_exif_rotated.jpg", exif=exif, quality=95)
    lesion_image((40, 60, 120), 8).save(d / "sub" / "l_nested.jpg")

    (d / "x_empty.jpg").write_bytes(b"")
    full = (d / "a_rgb.jpg").read_bytes()
    (d / "x_truncated.jpg").write_bytes(full[: len(full) // 3])
    (d / "x_corrupt.jpg").write_bytes(full[:200] + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)))
    (d / "x_text.jpg").write_text("this is a text file with a .jpg name\n")
    (d / "x_pdf.jpg").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n")
    Image.new("1", (10_000, 9_000)).save(d / "x_bomb.png")  # 90 megapixels in a few kB

    (d / ".hidden.jpg").write_bytes(full)
    (d / "notes.txt").write_text("notes")
    (d / "README.md").write_text("readme")
    (d / ".cache" / "inside.jpg").write_bytes(full)
    return d


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_every_file_gets_a_row_and_bad_files_do_not_stop_the_batch(runner, mixed, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "results.csv"
    result = runner.invoke(app, ["predict", str(mixed), "--out", str(out), "--model", str(tiny_bundle), "--all-probs"])
    assert result.exit_code == 0, result.output
    frame = read(out)
    assert list(frame["path"]) == sorted(GOOD | set(BAD))  # one row per file, sorted; skipped files absent
    assert list(frame.columns) == ["path", "top1_class", "top1_name", "top1_prob", "top2_class", "top2_prob",
                                   "top3_class", "top3_prob", *[f"prob_{c}" for c in CLASSES],
                                   *(["mel_prob"] if "mel" in CLASSES else []), "ood_percentile", "error", "warning"]
    assert (frame["warning"] == "").all()  # every image is big enough for the model (and no OOD threshold)
    errors = dict(zip(frame["path"], frame["error"]))
    for name, needle in BAD.items():
        assert needle in errors[name], (name, errors[name])
    good = frame[frame["error"] == ""]
    assert set(good["path"]) == GOOD
    probs = good[[f"prob_{c}" for c in CLASSES]].astype(float).to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=0.0005 * len(CLASSES))
    top = good[["top1_prob", "top2_prob", "top3_prob"]].astype(float).to_numpy()
    assert (np.diff(top, axis=1) <= 0).all()  # top-k sorted
    assert list(good["top1_class"]) == [CLASSES[i] for i in probs.argmax(axis=1)]
    assert "12 classified, 6 errors" in result.output and "not a diagnosis" in result.output
    sidecar = json.loads((tmp_path / "results.csv.json").read_text())
    assert sidecar["model"]["sha256"] and "not a diagnosis" in sidecar["note"] and sidecar["errors"] == 6


def test_lossless_formats_give_identical_probabilities(mixed, tiny_bundle, tmp_path) -> None:
    predict_directory(directory=mixed, out=tmp_path / "r.csv", model=tiny_bundle, all_probs=True, show_progress=False)
    frame = read(tmp_path / "r.csv").set_index("path")
    cols = [f"prob_{c}" for c in CLASSES]
    assert (frame.loc["b_same.png", cols] == frame.loc["i.bmp", cols]).all()
    assert (frame.loc["b_same.png", cols] == frame.loc["j.tif", cols]).all()
    assert frame.loc["a_rgb.jpg", "top1_class"] == frame.loc["b_same.png", "top1_class"]


def test_modes_and_orientation_are_normalised(mixed) -> None:
    for name in GOOD:
        pixels = load_image(mixed / name, 48)
        assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8, name
    gray = load_image(mixed / "d_gray.png", 48)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    sixteen = load_image(mixed / "h_16bit.png", 48).astype(int)
    assert np.abs(sixteen - gray.astype(int)).max() <= 1  # 16-bit scaled to 8 bits, not clipped
    # EXIF orientation 6: the stored image is shown rotated 90 degrees clockwise.
    upright = np.asarray(Image.open(mixed / "a_rgb.jpg").transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    rotated = np.asarray(Image.fromarray(load_image(mixed / "k_exif_rotated.jpg", 72)))
    unrotated = load_image(mixed / "a_rgb.jpg", 72)
    expected = np.asarray(Image.fromarray(upright).resize((72, 72), Image.Resampling.BILINEAR))
    assert np.abs(rotated.astype(int) - expected.astype(int)).mean() < np.abs(unrotated.astype(int) - expected.astype(int)).mean() / 3


def test_unreadable_file_is_a_row(monkeypatch, mixed, tiny_bundle, tmp_path) -> None:
    import skinclf.data.images as images

    real_open = images.Image.open

    def guarded(path, *args, **kwargs):
        if Path(path).name == "a_rgb.jpg":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", guarded)
    predict_directory(directory=mixed, out=tmp_path / "r.csv", model=tiny_bundle, show_progress=False)
    assert read(tmp_path / "r.csv").set_index("path").loc["a_rgb.jpg", "error"] == "permission denied"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_file_without_read_permission(tmp_path, tiny_bundle) -> None:
    lesion_image((1, 2, 3), 1).save(tmp_path / "locked.jpg")
    (tmp_path / "locked.jpg").chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(tmp_path / "locked.jpg", 32)


def test_stdout_and_no_recursive(runner, mixed, tiny_bundle) -> None:
    result = runner.invoke(app, ["predict", str(mixed), "--out", "-", "--model", str(tiny_bundle), "--top-k", "1",
                                 "--no-recursive"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "top1_class", "top1_name", "top1_prob", *(["mel_prob"] if "mel" in CLASSES else []),
                       "ood_percentile", "error", "warning"]
    assert [r[0] for r in rows[1:]] == sorted((GOOD - {"sub/l_nested.jpg"}) | set(BAD))


def test_strict_exits_non_zero_after_writing(runner, mixed, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", str(mixed), "--out", str(out), "--model", str(tiny_bundle), "--strict"])
    assert result.exit_code == 1
    assert "6 of 18 files could not be classified" in result.output
    assert len(read(out)) == 18  # the CSV is complete all the same


def test_resume_after_interruption_gives_the_same_csv(monkeypatch, mixed, tiny_bundle, tmp_path) -> None:
    full = tmp_path / "full.csv"
    predict_directory(directory=mixed, out=full, model=tiny_bundle, batch_size=4, show_progress=False)

    out = tmp_path / "resumed.csv"
    out.write_text("path,top1_class,top1_prob,ood_score,error,warning\nan older results file,nv,0.5,,,\n")
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            predict_directory(directory=mixed, out=out, model=tiny_bundle, batch_size=4, show_progress=False)
    partial = tmp_path / "resumed.csv.partial"
    assert len(partial.read_text().splitlines()) == 1 + 2 * 4  # header and two whole batches
    assert "an older results file" in out.read_text()  # untouched until the run completes
    with open(partial, "a") as fh:
        fh.write("x_torn_line.jpg,nv,0.12")  # a kill in the middle of a write: no newline

    with pytest.raises(SkinclfError, match="--resume"):
        predict_directory(directory=mixed, out=out, model=tiny_bundle, batch_size=4, show_progress=False)
    summary = predict_directory(directory=mixed, out=out, model=tiny_bundle, batch_size=4, resume=True,
                                show_progress=False)
    assert summary.resumed == 8 and summary.classified == 10
    assert out.read_bytes() == full.read_bytes()
    assert not partial.exists()


def test_resume_a_finished_csv_adds_only_new_files(mixed, tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a_rgb.jpg", "b_same.png"):
        (folder / name).write_bytes((mixed / name).read_bytes())
    out = tmp_path / "r.csv"
    predict_directory(directory=folder, out=out, model=tiny_bundle, show_progress=False)
    before = read(out)
    lesion_image((10, 200, 10), 3).save(folder / "c_new.jpg")
    summary = predict_directory(directory=folder, out=out, model=tiny_bundle, resume=True, show_progress=False)
    after = read(out)
    assert summary.classified == 1 and list(after["path"]) == ["a_rgb.jpg", "b_same.png", "c_new.jpg"]
    assert after.iloc[:2].equals(before)


def test_resume_with_other_options_is_refused(mixed, tiny_bundle, tmp_path) -> None:
    out = tmp_path / "r.csv"
    predict_directory(directory=mixed, out=out, model=tiny_bundle, show_progress=False)
    with pytest.raises(SkinclfError, match=r"written with --top-k 3 \(no --all-probs\); resume with those options"):
        predict_directory(directory=mixed, out=out, model=tiny_bundle, top_k=2, resume=True, show_progress=False)
    assert not (tmp_path / "r.csv.partial").exists()


def test_decoding_streams_with_bounded_lookahead(monkeypatch, tiny_bundle, tmp_path) -> None:
    """Only a few batches are decoded ahead of the model, however many files there are."""
    from skinclf.model.bundle import load_bundle

    calls = []
    monkeypatch.setattr(inference, "load_image",
                        lambda path, size, notes=None: calls.append(path) or np.zeros((size, size, 3)))
    paths = [tmp_path / f"{i}.jpg" for i in range(10_000)]
    stream = inference.predict_files(load_bundle(tiny_bundle).model, paths, image_size=32, batch_size=8, workers=2)
    first = next(stream)
    assert len(first.paths) == 8
    assert len(calls) <= 8 * (2 * 2 + 1)  # lookahead of 2 x workers batches, plus the one in hand
    stream.close()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{missing}"], "folder not found"),
        (["{empty}"], "no images in or below"),
        (["{mixed}", "--model", "{missing}/m.keras"], "model file not found"),
        (["{mixed}", "--model", "{garbage}"], "not a valid model file"),
        (["{mixed}", "--model", "{truncated}"], "not a valid model file"),
        (["{mixed}", "--model", "{plain}"], "not a skinclf bundle"),
        (["{mixed}", "--top-k", "9"], "must be 1..7"),
        (["{mixed}", "--tta", "3"], "choose one of 1, 4"),
        (["{mixed}", "--out", "-", "--resume"], "needs a file"),
    ],
)
def test_predict_errors(runner, mixed, tiny_bundle, tmp_path, args, needle) -> None:
    from skinclf.backend import load_keras

    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.keras").write_text("not a model")
    (tmp_path / "truncated.keras").write_bytes(tiny_bundle.read_bytes()[:5000])
    keras = load_keras()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(tmp_path / "plain.keras")
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "mixed": mixed,
             "garbage": tmp_path / "garbage.keras", "truncated": tmp_path / "truncated.keras",
             "plain": tmp_path / "plain.keras"}
    argv = [a.format(**names) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(tiny_bundle)]
    result = runner.invoke(app, ["predict", *argv, "--out", str(tmp_path / "r.csv")] if "--out" not in argv
                           else ["predict", *argv])
    assert result.exit_code == 1, result.output
    assert result.output.count("Error:") == 1 and needle in result.output
    assert "Traceback" not in result.output


def test_default_model_from_environment(monkeypatch, runner, mixed, tiny_bundle, tmp_path) -> None:
    monkeypatch.setenv("SKINCLF_MODEL", str(tiny_bundle))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["predict", str(mixed), "--out", "r.csv"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.csv.json").read_text())["model"]["path"] == str(tiny_bundle)


def test_large_png_and_jpeg_of_one_picture_decode_alike(tmp_path: Path) -> None:
    """Non-JPEG files are shrunk by the factor JPEG's DCT scaling uses, so both reach the model alike."""
    from skinclf.data.images import _draft_factor, load_image

    assert [_draft_factor(s, 224) for s in [(600, 450), (320, 240), (2000, 1000), (4000, 3000), (100, 80)]] == [
        2, 1, 4, 8, 1]
    # Fine texture, like skin: a plain resize of the PNG differs from the JPEG's by ~2.4 levels.
    noise = (np.random.default_rng(0).random((450, 600, 3)) * 255).astype("uint8")
    picture = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1))
    picture.save(tmp_path / "a.png")
    picture.save(tmp_path / "a.jpg", quality=95)
    png, jpg = (load_image(tmp_path / name, 224).astype(int) for name in ("a.png", "a.jpg"))
    assert np.abs(png - jpg).mean() < 1.8
