"""`skinclf prepare`: lesion-grouped, class-stratified train/val/test folders.

Several HAM10000 images show the same lesion (same `lesion_id`). Splitting by image puts
near-identical pictures on both sides of the train/test line and inflates every figure, which
is what the earlier projects did; here a lesion's images always stay together.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from skinclf import __version__, ui
from skinclf.config import PREPARE
from skinclf.data.layout import read_metadata
from skinclf.data.walk import walk_images
from skinclf.errors import SkinclfError
from skinclf.files import (
    atomic_write,
    atomic_write_json,
    check_output_dir,
    link_or_copy,
    sha256_text,
)
from skinclf.checks import at_least

SPLITS = ("train", "val", "test")
MANIFEST = "prepare.json"
SPLIT_CSV = "split.csv"
_CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class PrepareResult:
    """Where the split was written, its per-class counts, and whether it was already there."""

    out: Path
    counts: pd.DataFrame
    fingerprint: str
    reused: bool
    linked: int = 0
    copied: int = 0


def parse_extra_classes(specs: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """Parse `NAME=PATH` strings (the `--extra-class` option) into {name: folder}."""
    extra: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not path or not _CLASS_NAME.match(name):
            raise SkinclfError(
                f"--extra-class {spec!r}: expected NAME=FOLDER with NAME made of letters, "
                "digits, '_' or '-' (e.g. healthy=data/healthy-skin)"
            )
        if name in extra:
            raise SkinclfError(f"--extra-class {name!r} given twice")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise SkinclfError(f"--extra-class {name}={path}: folder not found")
        extra[name] = folder
    return extra


def _extra_class_rows(extra: dict[str, Path], known: set[str]) -> pd.DataFrame:
    rows = []
    for name, folder in extra.items():
        if name in known:
            raise SkinclfError(
                f"--extra-class {name!r} is already a class of the dataset ({', '.join(sorted(known))})"
            )
        found = walk_images(folder)
        if found.problems:
            first = found.problems[0]
            raise SkinclfError(f"--extra-class {name}={folder}: cannot read {folder / first.path} ({first.reason}); "
                               "fix its permissions or move it out of the folder")
        files = [folder / rel for rel in found.files]
        if not files:
            raise SkinclfError(f"--extra-class {name}={folder}: no images found")
        for path in files:
            # Each plain image is its own "lesion": nothing says two of them show the same one.
            image_id = path.relative_to(folder).with_suffix("").as_posix().replace("/", "__")
            rows.append({"lesion_id": f"{name}:{image_id}", "image_id": image_id, "dx": name, "path": path})
    return pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx", "path"])


def split_by_lesion(meta: pd.DataFrame, *, val: float, test: float, seed: int) -> pd.Series:
    """Assign every row of `meta` (columns `lesion_id`, `dx`) to train, val or test.

    All images of a lesion share a split. Within each class, lesions are shuffled with `seed`
    and handed to test, then val, as long as that brings the split closer to its share of the
    class's images; the rest go to train. Deterministic for a given seed and metadata.
    """
    validate_fractions(val=val, test=test)
    lesion_dx = meta.groupby("lesion_id")["dx"].agg(lambda s: sorted(set(s)))
    mixed = lesion_dx[lesion_dx.map(len) > 1]
    if not mixed.empty:
        raise SkinclfError(
            f"lesion {mixed.index[0]} has images of several classes ({', '.join(mixed.iloc[0])}); "
            "a lesion must have one diagnosis"
        )
    sizes = meta.groupby("lesion_id").size()
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for dx in sorted(meta["dx"].unique()):
        lesions = sorted(meta.loc[meta["dx"] == dx, "lesion_id"].unique())
        order = rng.permutation(len(lesions))
        total = int(sizes[lesions].sum())
        targets = {"test": test * total, "val": val * total}
        filled = {"test": 0, "val": 0}
        for i in order:
            lesion = lesions[i]
            size = int(sizes[lesion])
            split = "train"
            for name in ("test", "val"):
                if abs(filled[name] + size - targets[name]) < abs(filled[name] - targets[name]):
                    split = name
                    filled[name] += size
                    break
            assignment[lesion] = split
    return meta["lesion_id"].map(assignment).rename("split")


def validate_fractions(*, val: float, test: float) -> None:
    """Raise unless 0 < val, 0 <= test and val + test < 1 leave a real training split."""
    if not 0 < val < 1:
        raise SkinclfError(f"--val {val}: must be between 0 and 1 (exclusive), e.g. 0.15")
    if not 0 <= test < 1:
        raise SkinclfError(f"--test {test}: must be between 0 (no test split) and 1, e.g. 0.15")
    if val + test > 0.8:
        raise SkinclfError(f"--val {val} + --test {test} leaves under 20% to train; keep the sum <= 0.8")


def counts_table(split_csv: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows) and split (columns), with a total column and row."""
    table = pd.crosstab(split_csv["dx"], split_csv["split"]).reindex(columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name = "class"
    return table


def _existing_outputs(out: Path) -> list[str]:
    return [name for name in (*SPLITS, SPLIT_CSV, MANIFEST) if (out / name).exists()]


def prepare_dataset(
    *,
    src: Path = PREPARE.src,
    out: Path = PREPARE.out,
    val: float = PREPARE.val,
    test: float = PREPARE.test,
    seed: int = PREPARE.seed,
    extra_classes: dict[str, Path] | None = None,
    force: bool = False,
    show_progress: bool | None = None,
) -> PrepareResult:
    """Write `out/{train,val,test}/<class>/` (hard links where possible), `split.csv` and a
    manifest. The same arguments again are a no-op; other arguments over an existing split
    are refused unless `force`, which replaces it."""
    validate_fractions(val=val, test=test)
    at_least("--seed", seed, 0, example=PREPARE.seed)
    src, out = Path(src), Path(out)
    check_output_dir(out)
    extra_classes = extra_classes or {}
    args = {
        "src": str(src.resolve()),
        "val": val,
        "test": test,
        "seed": seed,
        "extra_classes": {k: str(v.resolve()) for k, v in sorted(extra_classes.items())},
    }
    reused = _reuse(out, args, force=force)
    if reused is not None:
        return reused
    existing = _existing_outputs(out)
    meta = read_metadata(src)[["lesion_id", "image_id", "dx", "path"]]
    if extra_classes:
        meta = pd.concat([meta, _extra_class_rows(extra_classes, set(meta["dx"]))], ignore_index=True)
    meta = meta.assign(split=split_by_lesion(meta, val=val, test=test, seed=seed))
    meta = meta.sort_values(["split", "dx", "image_id"], kind="stable").reset_index(drop=True)
    rel = meta["split"] + "/" + meta["dx"] + "/" + meta["image_id"] + meta["path"].map(lambda p: Path(p).suffix.lower())
    modes = _link_into(out, meta["path"], rel, existing=existing, seed=seed, show_progress=show_progress)
    table = meta[["image_id", "lesion_id", "dx", "split"]].assign(path=rel)
    csv_text = table.to_csv(index=False, lineterminator="\n")
    fingerprint = sha256_text(csv_text)
    atomic_write(out / SPLIT_CSV, csv_text)
    atomic_write_json(out / MANIFEST, {"args": args, "fingerprint": fingerprint, "skinclf": __version__})
    return PrepareResult(out, counts_table(table), fingerprint, reused=False, linked=modes["link"], copied=modes["copy"])


def _reuse(out: Path, args: dict, *, force: bool) -> PrepareResult | None:
    """The existing split if it was made with the same arguments; refuse another one unless `force`."""
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and all((out / s).is_dir() for s in SPLITS):
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("args") == args and not force:
            split_csv = pd.read_csv(out / SPLIT_CSV)
            return PrepareResult(out, counts_table(split_csv), manifest["fingerprint"], reused=True)
    if _existing_outputs(out) and not force:
        old = json.loads(manifest_path.read_text()).get("args", {}) if manifest_path.is_file() else None
        if old is None:
            what = "an unfinished or foreign split (no prepare.json)"
        else:
            changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in args.items() if old.get(k) != v]
            what = "a split made with other settings (" + "; ".join(changed) + ")"
        raise SkinclfError(f"{out} already holds {what}; pass --force to replace it, or choose another --out")
    return None


def _link_into(out: Path, sources, targets, *, existing: list[str], seed: int, show_progress) -> dict[str, int]:
    """Link (or copy) every image into a staging folder, then swap it for the old split."""
    for stale in out.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f".staging-{seed}"
    staging.mkdir(parents=True)
    modes = {"link": 0, "copy": 0}
    with ui.progress(enabled=show_progress) as progress:
        task = progress.add_task("Linking images", total=len(sources), rate="")
        for source, target in zip(sources, targets):
            modes[link_or_copy(Path(source), staging / target)] += 1
            progress.advance(task)
    for split in SPLITS:
        (staging / split).mkdir(exist_ok=True)
    # Replace the old split (only with --force) and move the new one in; the manifest is
    # written last, so a split without a manifest is known to be unfinished.
    (out / MANIFEST).unlink(missing_ok=True)
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for split in SPLITS:
        (staging / split).rename(out / split)
    shutil.rmtree(staging)
    return modes
