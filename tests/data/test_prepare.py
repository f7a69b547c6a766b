"""`skinclf prepare`: lesion-grouped, stratified, reproducible splits."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from utils.paths import require, SHARED_HAM
from utils.synthetic import lesion_image, CLASS_COLOURS

from skinclf.cli import app
from skinclf.data.layout import read_metadata
from skinclf.data.prepare import SPLITS, parse_extra_classes, prepare_dataset, split_by_lesion
from skinclf.errors import SkinclfError


def assert_lesion_grouped(frame: pd.DataFrame) -> None:
    splits_per_lesion = frame.groupby("lesion_id")["split"].nunique()
    assert splits_per_lesion.max() == 1, splits_per_lesion[splits_per_lesion > 1].head()


@pytest.mark.integration
def test_split_of_full_ham10000_is_grouped_complete_stratified_and_seeded() -> None:
    meta = read_metadata(require(SHARED_HAM))
    split = split_by_lesion(meta, val=0.15, test=0.15, seed=42)
    frame = meta.assign(split=split)
    assert_lesion_grouped(frame)
    assert split.notna().all() and len(frame) == 10015 and frame["image_id"].is_unique
    whole = frame["dx"].value_counts(normalize=True)
    for name, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        part = frame[frame["split"] == name]
        assert abs(len(part) / len(frame) - share) < 0.01
        proportions = part["dx"].value_counts(normalize=True).reindex(whole.index, fill_value=0)
        assert (proportions - whole).abs().max() < 0.02, (name, proportions - whole)
    # Reproducible for a seed, different for another.
    assert split.equals(split_by_lesion(meta, val=0.15, test=0.15, seed=42))
    assert not split.equals(split_by_lesion(meta, val=0.15, test=0.15, seed=7))


@pytest.mark.integration
def test_prepare_cli_on_full_ham10000(runner, tmp_path: Path) -> None:
    src = require(SHARED_HAM)
    out = tmp_path / "prepared"
    result = runner.invoke(app, ["prepare", "--src", str(src), "--out", str(out), "--seed", "42"])
    assert result.exit_code == 0, result.output
    assert "10015" in result.output  # the total row of the table
    table = pd.read_csv(out / "split.csv")
    assert list(table.columns) == ["image_id", "lesion_id", "dx", "split", "path"]
    assert len(table) == 10015 and table["image_id"].is_unique
    assert_lesion_grouped(table)
    files = sorted(p.relative_to(out).as_posix() for s in SPLITS for p in (out / s).rglob("*.jpg"))
    assert files == sorted(table["path"])  # every image exactly once, where split.csv says
    assert sorted(p.name for p in (out / "train").iterdir()) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    # Running it again with a second output gives the same split, byte for byte.
    again = tmp_path / "again"
    assert runner.invoke(app, ["prepare", "--src", str(src), "--out", str(again)]).exit_code == 0
    assert (again / "split.csv").read_bytes() == (out / "split.csv").read_bytes()


def test_prepare_tiny_dataset(runner, tiny_ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    result = runner.invoke(app, ["prepare", "--src", str(tiny_ham), "--out", str(out), "--val", "0.2", "--test", "0.2"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "split.csv")
    assert_lesion_grouped(table)
    assert set(table["split"]) == set(SPLITS)
    for row in table.itertuples():
        assert (out / row.path).is_file() and row.path.startswith(f"{row.split}/{row.dx}/")


def test_prepare_rerun_is_noop_and_other_args_need_force(runner, tiny_ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    args = ["prepare", "--src", str(tiny_ham), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "split.csv").stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert (out / "split.csv").stat().st_mtime_ns == before

    refused = runner.invoke(app, [*args, "--seed", "7"])
    assert refused.exit_code == 1
    assert "other settings" in refused.output and "seed" in refused.output and "--force" in refused.output

    forced = runner.invoke(app, [*args, "--seed", "7", "--force"])
    assert forced.exit_code == 0, forced.output
    manifest = (out / "prepare.json").read_text()
    assert '"seed": 7' in manifest


def test_prepare_refuses_unfinished_output(runner, tiny_ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    (out / "train").mkdir(parents=True)
    result = runner.invoke(app, ["prepare", "--src", str(tiny_ham), "--out", str(out)])
    assert result.exit_code == 1 and "unfinished or foreign" in result.output


def test_extra_class_joins_the_split(tiny_ham: Path, tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    (healthy / "sub").mkdir(parents=True)
    for i in range(10):
        lesion_image(CLASS_COLOURS["healthy"], 100 + i).save(healthy / ("sub" if i % 2 else "") / f"skin_{i}.png")
    result = prepare_dataset(
        src=tiny_ham, out=tmp_path / "p", val=0.2, test=0.2, extra_classes=parse_extra_classes([f"healthy={healthy}"]),
        show_progress=False,
    )
    assert result.counts.loc["healthy", "total"] == 10
    assert result.counts.loc["healthy", "train"] >= 4
    assert len(list((tmp_path / "p").glob("*/healthy/*.png"))) == 10


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("healthy", "NAME=FOLDER"), ("he/alth=x", "NAME=FOLDER"), ("healthy=/no/such/dir", "folder not found")],
)
def test_extra_class_bad_spec(spec: str, needle: str) -> None:
    with pytest.raises(SkinclfError, match=needle):
        parse_extra_classes([spec])


def test_extra_class_cannot_shadow_a_dataset_class(tiny_ham: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mel"
    folder.mkdir()
    lesion_image((0, 0, 0), 1).save(folder / "a.jpg")
    with pytest.raises(SkinclfError, match="already a class"):
        prepare_dataset(src=tiny_ham, out=tmp_path / "p", extra_classes={"mel": folder}, show_progress=False)


@pytest.mark.parametrize(("val", "test", "needle"), [(0.0, 0.15, "--val"), (0.15, 1.2, "--test"), (0.5, 0.5, "under 20%")])
def test_prepare_rejects_bad_fractions(runner, tiny_ham: Path, tmp_path: Path, val, test, needle) -> None:
    result = runner.invoke(
        app, ["prepare", "--src", str(tiny_ham), "--out", str(tmp_path / "p"), "--val", str(val), "--test", str(test)]
    )
    assert result.exit_code == 1 and needle in result.output


def test_prepare_missing_source(runner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1
    assert "Error: dataset folder not found" in result.output and "skinclf fetch" in result.output


def test_lesion_with_two_diagnoses_is_refused() -> None:
    meta = pd.DataFrame({"lesion_id": ["L1", "L1"], "image_id": ["a", "b"], "dx": ["mel", "nv"]})
    with pytest.raises(SkinclfError, match="one diagnosis"):
        split_by_lesion(meta, val=0.15, test=0.15, seed=0)
