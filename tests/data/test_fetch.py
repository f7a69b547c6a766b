"""`skinclf fetch`: local folder and zip import, zip-slip refusal, the Kaggle path against a fake."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from utils.paths import require, SHARED_HAM
from utils.synthetic import kaggle_style_zip, FakeKaggleApi, HTTPErrorLike

from skinclf.cli import app
from skinclf.data import fetch as fetch_mod
from skinclf.data.fetch import explain_kaggle_error, fetch_dataset, kaggle_credentials_present, layout_path
from skinclf.errors import SkinclfError


def layout_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        ("HAM10000_metadata.csv", "HAM10000_metadata.csv"),
        ("HAM10000_images_part_1/ISIC_0024306.jpg", "HAM10000_images_part_1/ISIC_0024306.jpg"),
        ("nested/HAM10000_images_part_2/ISIC_0029306.jpg", "HAM10000_images_part_2/ISIC_0029306.jpg"),
        ("ham10000_images_part_1/ISIC_0024306.jpg", None),  # Kaggle's lower-case duplicate
        ("hmnist_28_28_RGB.csv", None),
        ("HAM10000_images_part_1/.DS_Store", None),
    ],
)
def test_layout_path_keeps_only_metadata_and_images(member: str, expected: str | None) -> None:
    assert layout_path(member) == expected


def test_fetch_from_folder(runner, tiny_ham: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = runner.invoke(app, ["fetch", "--from", str(tiny_ham), "--dest", str(dest), "--verify"])
    assert result.exit_code == 0, result.output
    assert layout_files(dest) == layout_files(tiny_ham)
    assert "all decodable" in result.output
    # Hard links where the filesystem allows: the same inode, no second copy of the bytes.
    some = next((tiny_ham / "HAM10000_images_part_1").iterdir())
    assert (dest / "HAM10000_images_part_1" / some.name).stat().st_ino == some.stat().st_ino


def test_fetch_is_idempotent(runner, tiny_ham: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    first = fetch_dataset(dest=dest, source=tiny_ham, show_progress=False)
    second = fetch_dataset(dest=dest, source=tiny_ham, show_progress=False)
    assert first.added == first.images + 1  # the images and the metadata file
    assert (second.added, second.already_present) == (0, first.added)
    result = runner.invoke(app, ["fetch", "--from", str(tiny_ham), "--dest", str(dest)])
    assert result.exit_code == 0 and "0 files added" in result.output


def test_fetch_from_zip_skips_duplicates_and_hmnist(runner, tiny_ham: Path, ham_zip: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = runner.invoke(app, ["fetch", "--from", str(ham_zip), "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    assert layout_files(dest) == layout_files(tiny_ham)
    assert not (dest / "ham10000_images_part_1").exists()


def test_fetch_refuses_zip_slip(runner, tiny_ham: Path, tmp_path: Path) -> None:
    archive = kaggle_style_zip(tiny_ham, tmp_path / "evil.zip", extra_members={"../escaped.txt": b"owned"})
    dest = tmp_path / "inner" / "dest"
    result = runner.invoke(app, ["fetch", "--from", str(archive), "--dest", str(dest)])
    assert result.exit_code == 1
    assert "Error:" in result.output and "outside the destination" in result.output
    assert not (tmp_path / "inner" / "escaped.txt").exists()
    assert not dest.exists() or not any(dest.rglob("*.jpg"))  # nothing extracted at all


def test_fetch_refuses_absolute_member(tiny_ham: Path, tmp_path: Path) -> None:
    archive = kaggle_style_zip(tiny_ham, tmp_path / "abs.zip", extra_members={"/etc/evil": b"x"})
    with pytest.raises(SkinclfError, match="outside the destination"):
        fetch_dataset(dest=tmp_path / "dest", source=archive, show_progress=False)


def test_fetch_truncated_zip(runner, ham_zip: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(ham_zip.read_bytes()[: ham_zip.stat().st_size // 2])
    result = runner.invoke(app, ["fetch", "--from", str(truncated), "--dest", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "truncated or corrupt" in result.output
    assert "Traceback" not in result.output


def test_fetch_corrupt_member_crc(ham_zip: Path, tmp_path: Path) -> None:
    data = bytearray(ham_zip.read_bytes())
    with zipfile.ZipFile(ham_zip) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".jpg"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 100] ^= 0xFF  # flip bits inside a stored member: CRC mismatch on read
    broken = tmp_path / "crc.zip"
    broken.write_bytes(bytes(data))
    with pytest.raises(SkinclfError, match="truncated or corrupt"):
        fetch_dataset(dest=tmp_path / "d", source=broken, show_progress=False)


def test_fetch_verify_reports_undecodable_image(runner, tiny_ham: Path, tmp_path: Path) -> None:
    victim = next((tiny_ham / "HAM10000_images_part_2").iterdir())
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    result = runner.invoke(app, ["fetch", "--from", str(tiny_ham), "--dest", str(tmp_path / "d"), "--verify"])
    assert result.exit_code == 1
    assert "cannot be decoded" in result.output and victim.name in result.output


def test_fetch_reports_missing_images(runner, tiny_ham: Path, tmp_path: Path) -> None:
    victim = next((tiny_ham / "HAM10000_images_part_1").iterdir())
    victim.unlink()
    result = runner.invoke(app, ["fetch", "--from", str(tiny_ham), "--dest", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "missing" in result.output and victim.stem in result.output


def test_fetch_from_nonexistent_source(runner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["fetch", "--from", str(tmp_path / "nope"), "--dest", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "no such file or folder" in result.output


def test_fetch_from_folder_without_layout(runner, tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hi")
    result = runner.invoke(app, ["fetch", "--from", str(tmp_path / "random"), "--dest", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "HAM10000_metadata.csv" in result.output


# --- the Kaggle path, against a fake of the kaggle API ----------------------------------------


def test_kaggle_download_through_fake_api(tiny_ham: Path, ham_zip: Path, tmp_path: Path) -> None:
    api = FakeKaggleApi(archive=ham_zip)
    dest = tmp_path / "dest"
    result = fetch_dataset(dest=dest, api=api, show_progress=False)
    assert api.calls == [("kmader/skin-cancer-mnist-ham10000", str(dest / ".download"))]
    assert result.source == "kaggle:kmader/skin-cancer-mnist-ham10000"
    assert layout_files(dest) == layout_files(tiny_ham)  # the archive itself was removed


def test_kaggle_keep_archive(ham_zip: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    fetch_dataset(dest=dest, api=FakeKaggleApi(archive=ham_zip), keep_archive=True, show_progress=False)
    assert (dest / ".download" / "skin-cancer-mnist-ham10000.zip").is_file()


def test_kaggle_missing_credentials(runner, no_kaggle_credentials, tmp_path: Path) -> None:
    assert not kaggle_credentials_present()
    result = runner.invoke(app, ["fetch", "--dest", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "Kaggle credentials not found" in result.output and "kaggle.json" in result.output
    assert "Traceback" not in result.output


def test_kaggle_credentials_found_in_file_or_env(no_kaggle_credentials, tmp_path: Path) -> None:
    assert kaggle_credentials_present({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k", "HOME": str(tmp_path)})
    (tmp_path / "home" / ".kaggle").mkdir(parents=True)
    (tmp_path / "home" / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_credentials_present()


def test_kaggle_403_says_accept_the_licence(runner, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fetch_mod, "kaggle_api", lambda: FakeKaggleApi(error=HTTPErrorLike(403)))
    result = runner.invoke(app, ["fetch", "--dest", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "403" in result.output and "accept the dataset's licence" in result.output


def test_kaggle_no_network(monkeypatch, tmp_path: Path) -> None:
    import requests

    api = FakeKaggleApi(error=requests.exceptions.ConnectionError("Failed to resolve 'www.kaggle.com'"))
    with pytest.raises(SkinclfError, match="cannot reach kaggle.com"):
        fetch_dataset(dest=tmp_path / "d", api=api, show_progress=False)


def test_kaggle_truncated_download(ham_zip: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "short.zip"
    truncated.write_bytes(ham_zip.read_bytes()[:1000])
    with pytest.raises(SkinclfError, match="truncated or corrupt"):
        fetch_dataset(dest=tmp_path / "d", api=FakeKaggleApi(archive=truncated), show_progress=False)


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (HTTPErrorLike(401), "rejected the credentials"),
        (HTTPErrorLike(404), "not found"),
        (SystemExit(1), "rejected the credentials"),
        (TimeoutError("timed out"), "cannot reach kaggle.com"),
        (RuntimeError("disk on fire"), "disk on fire"),
    ],
)
def test_explain_kaggle_error(error: BaseException, needle: str) -> None:
    message = str(explain_kaggle_error(error, "kmader/skin-cancer-mnist-ham10000"))
    assert needle in message and "\n" not in message


@pytest.mark.integration
def test_fetch_shared_dataset(tmp_path: Path) -> None:
    src = require(SHARED_HAM)
    result = fetch_dataset(dest=tmp_path / "ham", source=src, show_progress=False)
    assert result.images == 10015
    assert len(list((tmp_path / "ham").rglob("*.jpg"))) == 10015
