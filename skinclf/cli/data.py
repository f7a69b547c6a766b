"""Commands of the data stage: `skinclf fetch` and `skinclf prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skinclf.cli.app import Command, app, examples, out, say, user_errors
from skinclf.config import FETCH, PREPARE


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf fetch",
        "skinclf fetch --dest data/ham10000 --verify",
        "skinclf fetch --from ~/Downloads/skin-cancer-mnist-ham10000.zip",
        "skinclf fetch --from /mnt/clinic/ham10000",
    )
)
def fetch(
    dest: Path = typer.Option(FETCH.dest, "--dest", metavar="PATH", help="Folder to put the dataset in (Kaggle layout)."),
    source: Optional[Path] = typer.Option(
        None, "--from", metavar="PATH", help="Import a local copy (folder or .zip in the Kaggle layout) instead of downloading."
    ),
    verify: bool = typer.Option(False, "--verify", metavar="", help="Decode every image the metadata names."),
    keep_archive: bool = typer.Option(False, "--keep-archive", metavar="", help="Keep the downloaded Kaggle zip."),
) -> None:
    """Download HAM10000 from Kaggle, or import a local copy, into the Kaggle layout.

    Downloading needs Kaggle credentials (~/.kaggle/kaggle.json, or KAGGLE_USERNAME and
    KAGGLE_KEY) and the dataset's licence accepted on kaggle.com. Re-running adds only what is
    missing.
    """
    from skinclf.data.fetch import fetch_dataset

    with user_errors():
        result = fetch_dataset(dest=dest, source=source, verify=verify, keep_archive=keep_archive)
    checked = ", all decodable" if result.verified else ""
    say(
        f"{result.images} images in {result.dest} ({result.added} files added, "
        f"{result.already_present} already there{checked}) from {result.source}", err=False,
    )


@app.command(
    cls=Command,
    epilog=examples(
        "skinclf prepare",
        "skinclf prepare --src data/ham10000 --out data/prepared --val 0.15 --test 0.15 --seed 42",
        "skinclf prepare --extra-class healthy=data/healthy-skin --out data/prepared8",
    )
)
def prepare(
    src: Path = typer.Option(PREPARE.src, "--src", metavar="PATH", help="Dataset in the Kaggle layout (from `skinclf fetch`)."),
    out_dir: Path = typer.Option(PREPARE.out, "--out", metavar="PATH", help="Folder for train/ val/ test/ and split.csv."),
    val: float = typer.Option(PREPARE.val, "--val", metavar="X", help="Share of each class's images for validation."),
    test: float = typer.Option(PREPARE.test, "--test", metavar="X", help="Share of each class's images for the test split."),
    seed: int = typer.Option(PREPARE.seed, "--seed", metavar="N", help="Seed of the split; the same seed gives the same split."),
    extra_class: list[str] = typer.Option(
        [], "--extra-class", metavar="NAME=FOLDER", help="Add a class from a plain folder of images: NAME=FOLDER (repeatable)."
    ),
    force: bool = typer.Option(False, "--force", metavar="", help="Replace an existing split made with other settings."),
) -> None:
    """Split the dataset by lesion into train/ val/ test/ folders, one sub-folder per class.

    No lesion has images in two splits; each split keeps the class proportions of the whole as
    far as lesions allow. Images are hard-linked where the filesystem allows, copied otherwise.
    """
    from skinclf.data.prepare import SPLITS, parse_extra_classes, prepare_dataset

    with user_errors():
        extra = parse_extra_classes(extra_class)
        result = prepare_dataset(src=src, out=out_dir, val=val, test=test, seed=seed, extra_classes=extra, force=force)
    table = Table(title=f"Images per split (by lesion, seed {seed})")
    table.add_column("class")
    for column in (*SPLITS, "total"):
        table.add_column(column, justify="right")
    for name, row in result.counts.iterrows():
        style = "bold" if name == "total" else None
        table.add_row(str(name), *(str(int(row[c])) for c in (*SPLITS, "total")), style=style)
    out.print(table)
    if result.reused:
        say(f"{result.out} already holds this split (fingerprint {result.fingerprint[:12]}); nothing to do.", err=False)
    else:
        say(
            f"Wrote {result.out} ({result.linked} hard links, {result.copied} copies; "
            f"fingerprint {result.fingerprint[:12]})", err=False,
        )
