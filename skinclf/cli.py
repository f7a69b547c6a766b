"""The `skinclf` command line: parse, call one library function, render.

Each command ends in one call to a typed library function with keyword-only options whose
defaults come from `skinclf.config`. Library code raises `SkinclfError` for bad input; this
module alone catches it, prints `Error: <message>` on stderr and exits 1. Keras is imported
only by the commands that need it, so `--help`, `fetch` and `prepare` start instantly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from skinclf import __version__
from skinclf.config import FETCH, PREPARE
from skinclf.errors import SkinclfError

app = typer.Typer(
    name="skinclf",
    help=(
        "Classify dermoscopic skin-lesion images in batches (MobileNet trained on HAM10000).\n\n"
        "Decision support for clinicians: the output is not a diagnosis."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn SkinclfError into one line on stderr and exit status 1 (130 on Ctrl-C)."""
    try:
        yield
    except SkinclfError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        raise typer.Exit(130) from None


def _examples(*lines: str) -> str:
    """Help epilog listing example invocations, one per line."""
    return "**Examples**\n\n```\n" + "\n".join(lines) + "\n```"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"skinclf {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Classify dermoscopic skin-lesion images in batches."""


@app.command(
    epilog=_examples(
        "skinclf fetch",
        "skinclf fetch --dest data/ham10000 --verify",
        "skinclf fetch --from ~/Downloads/skin-cancer-mnist-ham10000.zip",
        "skinclf fetch --from /mnt/clinic/ham10000",
    )
)
def fetch(
    dest: Path = typer.Option(FETCH.dest, "--dest", help="Folder to put the dataset in (Kaggle layout)."),
    source: Optional[Path] = typer.Option(
        None, "--from", help="Import a local copy (folder or .zip in the Kaggle layout) instead of downloading."
    ),
    verify: bool = typer.Option(False, "--verify", help="Decode every image the metadata names."),
    keep_archive: bool = typer.Option(False, "--keep-archive", help="Keep the downloaded Kaggle zip."),
) -> None:
    """Download HAM10000 from Kaggle, or import a local copy, into the Kaggle layout.

    Downloading needs Kaggle credentials (~/.kaggle/kaggle.json, or KAGGLE_USERNAME and
    KAGGLE_KEY) and the dataset's licence accepted on kaggle.com. Re-running adds only what is
    missing.
    """
    from skinclf.fetch import fetch_dataset

    with _user_errors():
        result = fetch_dataset(dest=dest, source=source, verify=verify, keep_archive=keep_archive)
    checked = ", all decodable" if result.verified else ""
    out.print(
        f"{result.images} images in {result.dest} ({result.added} files added, "
        f"{result.already_present} already there{checked}) from {result.source}"
    )


@app.command(
    epilog=_examples(
        "skinclf prepare",
        "skinclf prepare --src data/ham10000 --out data/prepared --val 0.15 --test 0.15 --seed 42",
        "skinclf prepare --extra-class healthy=data/healthy-skin --out data/prepared8",
    )
)
def prepare(
    src: Path = typer.Option(PREPARE.src, "--src", help="Dataset in the Kaggle layout (from `skinclf fetch`)."),
    out_dir: Path = typer.Option(PREPARE.out, "--out", help="Folder for train/ val/ test/ and split.csv."),
    val: float = typer.Option(PREPARE.val, "--val", help="Share of each class's images for validation."),
    test: float = typer.Option(PREPARE.test, "--test", help="Share of each class's images for the test split."),
    seed: int = typer.Option(PREPARE.seed, "--seed", help="Seed of the split; the same seed gives the same split."),
    extra_class: list[str] = typer.Option(
        [], "--extra-class", help="Add a class from a plain folder of images: NAME=FOLDER (repeatable)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing split made with other settings."),
) -> None:
    """Split the dataset by lesion into train/ val/ test/ folders, one sub-folder per class.

    No lesion has images in two splits; each split keeps the class proportions of the whole as
    far as lesions allow. Images are hard-linked where the filesystem allows, copied otherwise.
    """
    from skinclf.prepare import SPLITS, parse_extra_classes, prepare_dataset

    with _user_errors():
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
        out.print(f"{result.out} already holds this split (fingerprint {result.fingerprint[:12]}); nothing to do.")
    else:
        out.print(
            f"Wrote {result.out} ({result.linked} hard links, {result.copied} copies; "
            f"fingerprint {result.fingerprint[:12]})"
        )


@app.command(
    epilog=_examples(
        "skinclf predict ./images --out results.csv",
    )
)
def predict(
    directory: Path = typer.Argument(..., help="Folder of images to classify."),
    out_csv: Path = typer.Option(Path("results.csv"), "--out", help="CSV to write."),
) -> None:
    """Classify every image in a folder into a CSV (decision support, not a diagnosis)."""
    with _user_errors():
        raise SkinclfError("no model is bundled yet: train one with `skinclf train` (coming in the next release)")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
