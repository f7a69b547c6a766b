"""The `skinclf` command line: parse, call one library function, render.

Each command ends in one call to a typed library function with keyword-only options whose
defaults come from `skinclf.config`. Library code raises `SkinclfError` for bad input; this
module alone catches it, prints `Error: <message>` on stderr and exits 1. Keras is imported
only by the commands that need it, so `--help`, `fetch` and `prepare` start instantly.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from skinclf import __version__
from skinclf.config import CALIBRATE, ENSEMBLE, EVALUATE, EXPLAIN, EXPORT, FETCH, PREDICT, PREPARE, SERVE, TRAIN
from skinclf.errors import SkinclfError

class _Command(typer.core.TyperCommand):
    """Help without type noise: no `<bool>` beside --help, `DIR` rather than `{DIR}` in usage."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)]


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


# Packages the light install (`pip install skinclf`) leaves out, and the extra that brings each.
_EXTRAS = {
    "tensorflow": ("TensorFlow", "train"),
    "keras": ("TensorFlow and Keras", "train"),
    "matplotlib": ("matplotlib", "train"),
    "kaggle": ("the kaggle client", "train"),
    "onnx": ("onnx", "train"),
    "torch": ("PyTorch (KERAS_BACKEND=torch)", "train"),
    "jax": ("JAX (KERAS_BACKEND=jax)", "train"),
    "fastapi": ("FastAPI", "serve"),
    "uvicorn": ("uvicorn", "serve"),
}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """`skinclf <command> needs <package>: pip install "skinclf[<extra>]"`, for a known optional package."""
    import importlib

    top = (exc.name or "").split(".")[0]
    if top not in _EXTRAS:
        return None
    what, extra = _EXTRAS[top]
    command = "this command"
    for module in ("typer._click.globals", "click"):  # newer typer releases vendor click
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None and ctx.info_name:
            command = f"skinclf {ctx.info_name}"
            break
    return f'{command} needs {what}, which this install leaves out: pip install "skinclf[{extra}]"'


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn SkinclfError (and environmental failures: disk full, out of memory) into one line on
    stderr and exit status 1 (130 on Ctrl-C)."""
    try:
        yield
    except SkinclfError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc)
        if message is None:
            raise
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        raise typer.Exit(130) from None
    except MemoryError:
        typer.echo("Error: out of memory; try a smaller --batch-size", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # the machine, not the input: a full disk, a vanished mount, ...
        where = f": {exc.filename}" if exc.filename else ""
        typer.echo(f"Error: {exc.strerror or exc}{where}", err=True)
        raise typer.Exit(1) from None


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
    cls=_Command,
    epilog=_examples(
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
    from skinclf.fetch import fetch_dataset

    with _user_errors():
        result = fetch_dataset(dest=dest, source=source, verify=verify, keep_archive=keep_archive)
    checked = ", all decodable" if result.verified else ""
    out.print(
        f"{result.images} images in {result.dest} ({result.added} files added, "
        f"{result.already_present} already there{checked}) from {result.source}"
    )


@app.command(
    cls=_Command,
    epilog=_examples(
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
    cls=_Command,
    epilog=_examples(
        "skinclf train --epochs 30",
        "skinclf train --data data/prepared --weights ~/weights/mobilenet_1_0_224_tf_no_top.h5",
        "skinclf train --cache-views 10 --trainable-layers 43   # several times faster on a CPU",
        "skinclf train --class-weight mel=4,nv=1.25 --loss focal --monitor val_balanced_accuracy",
        "skinclf train --resume                                 # continue an interrupted run",
        "skinclf train --resume --decision-weight mel=1.5       # re-bundle a finished run, flagging more melanomas",
    )
)
def train(
    data: Path = typer.Option(TRAIN.data, "--data", metavar="PATH", help="Prepared data with train/ and val/ class folders."),
    out_model: Path = typer.Option(TRAIN.out, "--out", metavar="PATH", help="Model bundle to write (.keras)."),
    epochs: int = typer.Option(TRAIN.epochs, "--epochs", metavar="N", help="Maximum number of epochs."),
    batch_size: int = typer.Option(TRAIN.batch_size, "--batch-size", metavar="N", help="Images per training step."),
    lr: float = typer.Option(TRAIN.lr, "--lr", metavar="X", help="Initial learning rate (Adam); halved on plateaus down to 1e-5."),
    weights: str = typer.Option(
        TRAIN.weights, "--weights", metavar="TEXT", help="Initial base weights: imagenet (downloads), none, or a local weights file."
    ),
    trainable_layers: int = typer.Option(
        TRAIN.trainable_layers, "--trainable-layers",
        metavar="N", help="MobileNet layers trained from the top (3..85): 6 = block 13, 13 = blocks 12-13, 43 = blocks 7-13, 85 = all.",
    ),
    class_weight: str = typer.Option(
        TRAIN.class_weight, "--class-weight",
        metavar="TEXT", help="balanced, sqrt or none, optionally followed by NAME=WEIGHT or NAME*FACTOR changes "
        "(e.g. `balanced,mel*2`); `NAME=WEIGHT,...` alone leaves other classes at 1."
    ),
    decision_weight: str = typer.Option(
        TRAIN.decision_weight, "--decision-weight",
        metavar="TEXT", help="Multiply class probabilities after training, e.g. mel=1.5 (more melanomas flagged, at a cost to other "
        "classes); built into the model. Choose it on validation; with --resume it re-bundles a finished run.",
    ),
    loss: str = typer.Option(TRAIN.loss, "--loss", metavar="TEXT", help="crossentropy or focal."),
    focal_gamma: float = typer.Option(TRAIN.focal_gamma, "--focal-gamma", metavar="X", help="Focusing parameter of --loss focal."),
    monitor: str = typer.Option(
        TRAIN.monitor, "--monitor",
        metavar="TEXT", help="Validation metric that picks the best epoch: val_top2_accuracy, val_top1_accuracy, val_top3_accuracy, "
        "val_balanced_accuracy or val_loss.",
    ),
    patience: int = typer.Option(TRAIN.patience, "--patience", metavar="N", help="Epochs without improvement before stopping early."),
    dropout: float = typer.Option(TRAIN.dropout, "--dropout", metavar="X", help="Dropout before the classifier."),
    label_smoothing: float = typer.Option(TRAIN.label_smoothing, "--label-smoothing", metavar="X", help="Label smoothing of the loss."),
    seed: int = typer.Option(TRAIN.seed, "--seed", metavar="N", help="Seed for initialisation, shuffling and augmentation."),
    image_size: int = typer.Option(TRAIN.image_size, "--image-size", metavar="N", help="Input side in pixels."),
    alpha: float = typer.Option(TRAIN.alpha, "--alpha", metavar="X", help="MobileNet width multiplier (0.25, 0.5, 0.75, 1.0)."),
    cache_views: int = typer.Option(
        TRAIN.cache_views, "--cache-views",
        metavar="N", help="Cache the frozen layers' outputs for N augmented views per training image (0: augment afresh each epoch).",
    ),
    color_jitter: float = typer.Option(
        TRAIN.color_jitter, "--color-jitter", metavar="X", help="Also jitter brightness, contrast and saturation by up to this share."
    ),
    crop_scale: float = typer.Option(
        TRAIN.crop_scale, "--crop-scale",
        metavar="X", help="Random resized crops covering at least this share of the image (e.g. 0.3; 0: the seed's zoom/shift).",
    ),
    weight_decay: float = typer.Option(
        TRAIN.weight_decay, "--weight-decay", metavar="X", help="Decoupled weight decay: AdamW when positive (e.g. 0.05), else Adam."
    ),
    schedule: str = typer.Option(
        TRAIN.schedule, "--schedule",
        metavar="TEXT", help="Learning rate: plateau (halve when the monitor stalls) or cosine (warm-up, then cosine decay).",
    ),
    warmup_epochs: int = typer.Option(TRAIN.warmup_epochs, "--warmup-epochs", metavar="N", help="Warm-up epochs of --schedule cosine."),
    train_size: int = typer.Option(
        TRAIN.train_size, "--train-size",
        metavar="N", help="Train small, test large (FixRes): epochs at this side in pixels, the last --fixres-epochs at --image-size "
        "(0: all at --image-size).",
    ),
    fixres_epochs: int = typer.Option(TRAIN.fixres_epochs, "--fixres-epochs", metavar="N", help="Final epochs at --image-size."),
    colour_constancy: bool = typer.Option(
        TRAIN.colour_constancy, "--colour-constancy/--no-colour-constancy",
        metavar="", help="Shades of Gray colour constancy as the model's first layer (applied by predict and every export too).",
    ),
    prior_correction: str = typer.Option(
        TRAIN.prior_correction, "--prior-correction",
        metavar="TEXT", help="Subtract tau x log(training class share) from the logits after training: none, fit (tau chosen on "
        "validation balanced accuracy) or a number.",
    ),
    calibrate: bool = typer.Option(
        TRAIN.calibrate, "--calibrate/--no-calibrate",
        metavar="", help="Fit a temperature on validation after training, so probabilities mean what they say.",
    ),
    workers: int = typer.Option(TRAIN.workers, "--workers", metavar="N", help="Threads decoding and augmenting images."),
    run_dir: Optional[Path] = typer.Option(
        None, "--run-dir", metavar="PATH", help="Checkpoints, history and feature cache [default: runs/<model name>]."
    ),
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue the interrupted run in --run-dir."),
) -> None:
    """Fine-tune ImageNet MobileNet (1.0, 224) on the prepared images, class-weighted and augmented.

    Keeps the epoch with the best validation top-2 accuracy (see --monitor), halves the learning
    rate on plateaus and stops early. Uses a GPU when the Keras backend sees one (KERAS_BACKEND =
    tensorflow, torch or jax). The bundle carries its class names, input size, preprocessing,
    settings, data fingerprint and validation metrics.
    """
    with _user_errors():
        from skinclf.train import train_model

        result = train_model(
            data=data, out=out_model, epochs=epochs, batch_size=batch_size, lr=lr, weights=weights,
            trainable_layers=trainable_layers, class_weight=class_weight, decision_weight=decision_weight, loss=loss,
            focal_gamma=focal_gamma, monitor=monitor, patience=patience, dropout=dropout, label_smoothing=label_smoothing, seed=seed,
            image_size=image_size, alpha=alpha, cache_views=cache_views, color_jitter=color_jitter,
            crop_scale=crop_scale, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
            train_size=train_size, fixres_epochs=fixres_epochs, colour_constancy=colour_constancy,
            prior_correction=prior_correction, calibrate=calibrate, workers=workers, run_dir=run_dir,
            resume=resume,
        )
    val = result.val_metrics
    mel = val.get("melanoma", {}).get("at_decision", {})
    out.print(
        f"Saved {result.model_path}: best epoch {result.best_epoch} of {result.epochs_run} "
        f"({result.monitor} {result.best_value:.4f}); validation balanced accuracy {val['balanced_accuracy']:.3f}, "
        f"accuracy {val['accuracy']:.3f}"
        + (f", melanoma recall {mel['sensitivity']:.3f}" if mel else "")
        + (f"; {result.images_per_second:.1f} img/s training" if result.images_per_second else "")
        + f". Checkpoints in {result.run_dir}"
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _render_report(report: dict) -> None:
    """Confusion matrix, per-class table and headline figures, on the terminal."""
    classes = report["classes"]
    matrix = Table(title="Confusion matrix (rows: true class; count and share of the row)")
    matrix.add_column("true \\ predicted")
    for name in classes:
        matrix.add_column(name, justify="right")
    for name, counts, shares in zip(classes, report["confusion_matrix"], report["confusion_matrix_normalized"]):
        cells = [f"{c} ({s:.0%})" if c else "." for c, s in zip(counts, shares)]
        matrix.add_row(name, *cells)
    out.print(matrix)
    per_class = Table(title="Per class")
    for column in ("class", "precision", "recall", "F1", "AUC", "support"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for name, row in report["per_class"].items():
        style = "bold" if name == "mel" else None
        per_class.add_row(name, _fmt(row["precision"]), _fmt(row["recall"]), _fmt(row["f1"]), _fmt(row["auc"]),
                          str(row["support"]), style=style)
    out.print(per_class)
    topk = ", ".join(f"top-{k} {_fmt(v)}" for k, v in report["top_k_accuracy"].items())
    out.print(f"Images scored: {report['n']}")
    out.print(f"[bold]Balanced accuracy {_fmt(report['balanced_accuracy'])}[/bold] (mean per-class recall); "
              f"accuracy {_fmt(report['accuracy'])}; {topk}; macro ROC-AUC {_fmt(report['macro_auc'])}")
    mel = report.get("melanoma", {})
    if mel.get("at_decision"):
        d, t = mel["at_decision"], mel["at_target"]
        out.print(f"Melanoma: sensitivity {_fmt(d['sensitivity'])}, specificity {_fmt(d['specificity'])} at the "
                  f"model's decision; sensitivity {_fmt(t['sensitivity'])} with specificity {_fmt(t['specificity'])} "
                  f"when flagging p(mel) >= {_fmt(t['threshold'], 4)}")
    cal = report.get("calibration")
    if cal:
        out.print(f"Calibration: ECE {_fmt(cal['ece'])} (15 bins), Brier {_fmt(cal['brier'])}, NLL {_fmt(cal['nll'])}"
                  + ("" if cal["exact"] else " (approximate: top-k columns only; predict --all-probs for exact)"))
    if "provenance" in report:
        out.print(f"Data: {report['provenance']['note']}")
    _render_seen(report.get("seen"))
    if report.get("data", {}).get("unreadable"):
        out.print(f"[yellow]{len(report['data']['unreadable'])} unreadable image(s) skipped (listed in report.json)[/yellow]")
    if "matching" in report:
        m = report["matching"]
        out.print(f"Matched {m['scored']} of {m['predictions']} predictions to {m['truth']} truths ({m['truth_format']}); "
                  f"{m['prediction_errors']} prediction errors, {m['no_truth']} without truth, "
                  f"{m['no_prediction']} truths without prediction. Probabilities: {report['probabilities']}")


def _render_seen(seen: dict | None) -> None:
    """Say how many scored images the model has seen, and score the held-out rest on its own."""
    if not seen or (seen["known"] and not seen["train"] and not seen["val"]):
        return
    out.print(f"[yellow]Caution: {seen['note']}.[/yellow]")
    rest = seen.get("held_out_report")
    if rest:
        mel = rest.get("melanoma", {}).get("at_decision")
        out.print(f"[bold]Held-out rest ({rest['n']} images): balanced accuracy {_fmt(rest['balanced_accuracy'])}"
                  f"[/bold], accuracy {_fmt(rest['accuracy'])}"
                  + (f", melanoma sensitivity {_fmt(mel['sensitivity'])}" if mel else ""))
    elif seen["known"]:
        out.print("[yellow]No scored image is held out: these figures say little about new patients.[/yellow]")


@app.command(
    cls=_Command,
    epilog=_examples(
        "skinclf evaluate",
        "skinclf evaluate --model models/skinclf-mobilenet.keras --data data/prepared/test --out reports/test",
        "skinclf evaluate --predictions results.csv --truth ISIC2018_Task3_Test_GroundTruth.csv",
        "skinclf evaluate --predictions results.csv --truth HAM10000_metadata.csv --split data/prepared/split.csv",
        "skinclf evaluate --history --out reports/curves",
        "skinclf evaluate --json > report.json",
        "skinclf evaluate --model models/skinclf-mobilenet.onnx --data data/prepared/val   # no TensorFlow needed",
    )
)
def evaluate(
    model: Optional[Path] = typer.Option(None, "--model", metavar="PATH", help="Model bundle [default: the bundled model]."),
    data: Path = typer.Option(EVALUATE.data, "--data", metavar="PATH", help="Labelled folder: one sub-folder per class."),
    out_dir: Path = typer.Option(EVALUATE.out, "--out", metavar="PATH", help="Folder for report.json and the PNGs."),
    predictions: Optional[Path] = typer.Option(
        None, "--predictions", metavar="PATH", help="Score this predict CSV instead of running a model (needs --truth)."
    ),
    truth: Optional[Path] = typer.Option(
        None, "--truth", metavar="PATH", help="Ground truth: HAM10000 metadata (image_id,dx) or ISIC one-hot (image,MEL,NV,...)."
    ),
    mel_sensitivity: float = typer.Option(
        EVALUATE.mel_sensitivity, "--mel-sensitivity", metavar="X", help="Melanoma sensitivity for which to report the threshold."
    ),
    history: bool = typer.Option(False, "--history", metavar="", help="Only plot the model's training curves (history.png)."),
    tta: int = typer.Option(1, "--tta", metavar="N", help="Average over 1, 2, 4 or 8 flips/rotations of each image."),
    batch_size: int = typer.Option(EVALUATE.batch_size, "--batch-size", metavar="N", help="Images per model call."),
    split: Optional[Path] = typer.Option(
        None, "--split", metavar="PATH",
        help="split.csv (or its folder) of the `skinclf prepare` run the model was trained on, for models that do not "
        "record their training images [default: where the model was trained, if found].",
    ),
    engine: str = typer.Option(
        EVALUATE.engine, "--engine", metavar="NAME",
        help="auto (ONNX Runtime when the model has an up-to-date .onnx beside it or is one, else Keras), onnx or keras.",
    ),
    threads: int = typer.Option(EVALUATE.threads, "--threads", metavar="N", help="ONNX Runtime threads (0: one per usable CPU)."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the report as JSON on stdout (no tables)."),
) -> None:
    """Confusion matrix, per-class precision/recall/F1, balanced accuracy, top-k accuracy, ROC-AUC,
    melanoma sensitivity/specificity, and training curves.

    Writes report.json, confusion_matrix.png, roc.png and history.png into --out. The report says
    whether the data is held out from the model's training split.
    """
    with _user_errors():
        from skinclf.evaluate import run_evaluation

        result = run_evaluation(model=model, data=data, out=out_dir, predictions=predictions, truth=truth,
                                history=history, mel_sensitivity=mel_sensitivity, batch_size=batch_size, tta=tta,
                                split=split, engine=engine, threads=threads)
    if not result.report:  # --history: only the curves
        out.print("Wrote " + ", ".join(str(p) for p in result.files))
        return
    if as_json:
        typer.echo(json.dumps(result.report, indent=2))
        return
    _render_report(result.report)
    out.print("Wrote " + ", ".join(str(p) for p in result.files))


@app.command(
    cls=_Command,
    epilog=_examples(
        "skinclf predict ./images --out results.csv",
        "skinclf predict ./images --out results.csv --top-k 2 --all-probs",
        "skinclf predict /mnt/clinic/2026-11 --out nov.csv --resume     # finish an interrupted run",
        "skinclf predict ./images --out - --no-recursive | head",
        "skinclf predict ./images --out results.csv --model my-model.keras --strict",
        "skinclf predict ./images --out results.csv --engine keras          # TensorFlow instead of ONNX Runtime",
        "skinclf predict ./images --out results.csv --model models/skinclf-mobilenet.int8.onnx",
    )
)
def predict(
    directory: Path = typer.Argument(..., metavar="DIR", help="Folder of images (JPEG, PNG, BMP, TIFF) to classify."),
    out_csv: str = typer.Option("results.csv", "--out", metavar="CSV", help="CSV to write, or - for stdout."),
    model: Optional[Path] = typer.Option(
        None, "--model", metavar="PATH", help="Model bundle [default: $SKINCLF_MODEL, else the bundled model]."
    ),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", metavar="N",
        help=f"How many most-probable classes per image [default: {PREDICT.top_k}, or all the model's classes if fewer].",
    ),
    batch_size: int = typer.Option(PREDICT.batch_size, "--batch-size", metavar="N", help="Images per model call."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", metavar="", help="Include sub-folders."),
    all_probs: bool = typer.Option(False, "--all-probs", metavar="", help="Add a `prob_<class>` column for every class."),
    resume: bool = typer.Option(
        False, "--resume", metavar="", help="Continue an interrupted run (same options): skip files already in the CSV."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", metavar="", help="Start over, discarding the rows of an interrupted run (`CSV.partial`)."
    ),
    strict: bool = typer.Option(
        False, "--strict", metavar="", help="Exit with status 1 if any file or folder could not be read or classified."
    ),
    tta: int = typer.Option(1, "--tta", metavar="N", help="Average over 1, 2, 4 or 8 flips/rotations (slower)."),
    workers: int = typer.Option(PREDICT.workers, "--workers", metavar="N",
                                help="Threads decoding images (0: one per usable CPU)."),
    engine: str = typer.Option(
        PREDICT.engine, "--engine", metavar="NAME",
        help="auto (ONNX Runtime when the model has an up-to-date .onnx beside it or is one, else Keras), onnx or keras.",
    ),
    threads: int = typer.Option(PREDICT.threads, "--threads", metavar="N", help="ONNX Runtime threads (0: one per usable CPU)."),
) -> None:
    """Classify every image in a folder into a CSV of the top-k classes and their probabilities.

    One row per file, sorted by path; a file that cannot be read, or a folder that cannot be
    listed, gets a row with an error and the batch goes on; an image the model cannot judge well
    (far too small) gets a warning. The output informs a clinician; it is not a diagnosis. The
    model's identity is recorded in a JSON sidecar (results.csv.json).
    """
    with _user_errors():
        from skinclf.predict import predict_directory

        summary = predict_directory(
            directory=directory, out=out_csv, model=model, top_k=top_k, batch_size=batch_size, recursive=recursive,
            all_probs=all_probs, resume=resume, overwrite=overwrite, strict=strict, tta=tta, workers=workers,
            engine=engine, threads=threads,
        )
    typer.echo(_predict_summary(summary), err=True)


def _predict_summary(summary) -> str:
    """One line: what was classified, what failed, what deserves caution, what was kept or dropped."""
    classified = summary.files - (summary.errors - summary.unreadable)
    parts = [f"{summary.files} files: {classified} classified, {summary.errors - summary.unreadable} errors"]
    if summary.unreadable:
        parts.append(f"{summary.unreadable} folders or links could not be read (rows with an error; their images "
                     "are missing)")
    if summary.warnings:
        parts.append(f"{summary.warnings} with warnings (see the warning column)")
    if summary.unlike_training:
        parts.append(f"{summary.unlike_training} unlike the training images (check they are dermoscopic images)")
    if summary.resumed:
        parts.append(f"{summary.resumed} rows kept from the earlier run")
    if summary.dropped:
        parts.append(f"{summary.dropped} rows dropped: their files are no longer in the folder")
    return (", ".join(parts) + f"; {summary.images_per_second:.1f} img/s ({summary.model.get('engine', 'keras')} "
            f"engine) after {summary.startup_seconds:.1f} s start-up"
            + (f"; wrote {summary.out}" if summary.out else "") + ". Decision support, not a diagnosis.")


@app.command(
    "export",
    cls=_Command,
    epilog=_examples(
        "skinclf export models/skinclf-mobilenet.keras --format onnx --out models/skinclf-mobilenet.onnx",
        "skinclf export runs/exp02.keras                              # writes runs/exp02.onnx",
        "skinclf export --format onnx-int8 --calibration data/prepared/train --validation data/prepared/val",
        "skinclf export --format tflite --out skinclf.tflite",
    ),
)
def export(
    model: Optional[Path] = typer.Argument(None, help="Model bundle (.keras) [default: the bundled model]."),
    fmt: str = typer.Option(
        EXPORT.format, "--format", metavar="FORMAT",
        help="onnx (float32), onnx-int8 (static int8, calibrated), tflite (float32) or tfjs (not available: its "
        "converter cannot be installed beside TensorFlow 2.21 / Keras 3).",
    ),
    out_path: Optional[Path] = typer.Option(
        None, "--out", help="File to write [default: beside the model: .onnx, .int8.onnx or .tflite]."
    ),
    probes: Optional[Path] = typer.Option(
        None, "--probes", help="Also check the export on the first images of this folder (besides synthetic probes)."
    ),
    calibration: Path = typer.Option(
        EXPORT.calibration, "--calibration", help="onnx-int8: labelled folder of training images to calibrate on."
    ),
    calibration_images: int = typer.Option(
        EXPORT.calibration_images, "--calibration-images", help="onnx-int8: how many calibration images."
    ),
    validation: Path = typer.Option(
        EXPORT.validation, "--validation",
        help="onnx-int8: labelled folder to compare int8 and float balanced accuracy on (skipped if absent).",
    ),
) -> None:
    """Convert a model bundle to ONNX (float32 or int8) or TensorFlow Lite, checked before it is written.

    The export's probabilities on probe images must match the Keras model's (max abs difference
    <= 1e-4 for float formats; int8 prints its top-1 agreement and validation figures) or nothing
    is written. The ONNX file carries the bundle's metadata, so `skinclf predict --model X.onnx`
    runs it with ONNX Runtime alone. Re-export whenever the .keras model changes: predict uses the
    .onnx beside a .keras only while its recorded SHA-256 matches.
    """
    with _user_errors():
        from skinclf.export import export_model

        result = export_model(model=model, format=fmt, out=out_path, probes=probes, calibration=calibration,
                              calibration_images=calibration_images, validation=validation)
    line = (f"Wrote {result.out} ({result.format}, {result.size_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s; "
            f"max abs difference of probabilities from Keras {result.max_abs_diff:.2g} on {result.probes} probe images")
    if result.top1_agreement is not None:
        line += f"; top-1 agreement {result.top1_agreement:.2%}"
    out.print(line)
    if result.validation:
        v = result.validation
        f, q = v["float"], v["int8"]
        out.print(f"Validation ({v['images']} images in {v['folder']}): balanced accuracy float {f['balanced_accuracy']:.4f}"
                  f" -> int8 {q['balanced_accuracy']:.4f}; melanoma recall {_fmt(f.get('mel_recall'), 4)} -> "
                  f"{_fmt(q.get('mel_recall'), 4)}")


@app.command(
    cls=_Command,
    epilog=_examples(
        "skinclf serve                      # then open http://127.0.0.1:8000/",
        "skinclf serve --port 8080 --model my-model.keras",
        "skinclf serve --max-files 16 --max-file-mb 10",
        "skinclf serve --host 0.0.0.0       # no authentication: trusted networks only",
        "curl -F files=@a.jpg 'http://127.0.0.1:8000/api/predict?format=csv'",
    )
)
def serve(
    host: str = typer.Option(SERVE.host, "--host", metavar="HOST", help="Address to listen on; anything but loopback is reachable by others."),
    port: int = typer.Option(SERVE.port, "--port", help="Port to listen on (0: any free port)."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model bundle [default: $SKINCLF_MODEL, else the bundled model]."
    ),
    engine: str = typer.Option(SERVE.engine, "--engine", metavar="ENGINE", help="Runtime: auto, keras or onnx."),
    batch_size: int = typer.Option(SERVE.batch_size, "--batch-size", help="Images per model call."),
    top_k: int = typer.Option(SERVE.top_k, "--top-k", help="Default number of most-probable classes per image."),
    max_file_mb: float = typer.Option(SERVE.max_file_mb, "--max-file-mb", help="Largest accepted file, in MB (413 above)."),
    max_files: int = typer.Option(SERVE.max_files, "--max-files", help="Most files in one request (413 above)."),
    max_request_mb: float = typer.Option(
        SERVE.max_request_mb, "--max-request-mb", help="Largest accepted request, in MB (413 above)."
    ),
) -> None:
    """Serve a local web page and JSON API that classify images with the same model as predict.

    For the clinic desk: drop one image or a whole folder on the page, see the most probable
    classes per image, sort by melanoma probability, download the CSV `skinclf predict` would
    write. Images are decoded in memory, never stored or logged, and never leave this machine.
    API: POST /api/predict, GET /api/model, GET /healthz; documented at /docs. Needs the extra
    `pip install "skinclf[serve]"`.
    """

    def ready(info) -> None:
        for warning in info.warnings:
            typer.echo(f"Warning: {warning}", err=True)
        typer.echo(f"Model {info.model['name']} ({info.model['sha256'][:12]}, {info.model['engine']} engine) loaded.")
        typer.echo(f"Open {info.url} in a browser (Ctrl-C to stop). Decision support, not a diagnosis.")

    with _user_errors():
        from skinclf.serve import serve as run_server

        run_server(host=host, port=port, model=model, engine=engine, batch_size=batch_size, top_k=top_k,
                   max_file_mb=max_file_mb, max_files=max_files, max_request_mb=max_request_mb, on_ready=ready)


@app.command(
    cls=_Command,
    epilog=_examples(
        "skinclf ensemble runs/seed1.keras runs/seed2.keras runs/seed3.keras --out models/ensemble.keras",
        "skinclf ensemble a.keras b.keras --out ab.keras --val data/prepared/val --prior-correction fit --calibrate",
        "skinclf evaluate --model models/ensemble.keras --data data/prepared/val   # is it worth it?",
    )
)
def ensemble(
    members: list[Path] = typer.Argument(..., metavar="MODEL", help="Two or more model bundles (.keras) with the same classes."),
    out_model: Path = typer.Option(..., "--out", metavar="PATH", help="The ensemble bundle to write (.keras)."),
    val: Optional[Path] = typer.Option(None, "--val", metavar="PATH", help="Labelled folder (the validation split) on which the "
                                       "options below are fitted."),
    prior_correction: str = typer.Option(ENSEMBLE.prior_correction, "--prior-correction", metavar="TAU",
                                         help="none, fit (tau chosen on --val balanced accuracy) or a number."),
    decision_weight: str = typer.Option(ENSEMBLE.decision_weight, "--decision-weight", metavar="SPEC",
                                        help="Post-hoc probability multipliers, e.g. mel=1.75."),
    calibrate: bool = typer.Option(ENSEMBLE.calibrate, "--calibrate/--no-calibrate", metavar="",
                                   help="Fit a temperature on --val (changes no decision)."),
    workers: int = typer.Option(ENSEMBLE.workers, "--workers", metavar="N", help="Image-decoding threads for --val."),
) -> None:
    """Average trained bundles (other seeds, crops or recipes) into one bundle: the softmax of the
    mean of their logits (a geometric mean of their probabilities).

    Every member adds a forward pass to predict: bundle an ensemble only if it beats the best
    single network on validation by a clear margin. With --val, the ensemble's own prior
    correction, decision weights and temperature are fitted there, as skinclf train does.
    """
    with _user_errors():
        from skinclf.ensemble import ensemble_bundles

        meta = ensemble_bundles(members=members, out=out_model, val=val, prior_correction=prior_correction,
                                decision_weight=decision_weight, calibrate=calibrate, workers=workers)
    fitted = meta.get("metrics", {}).get("validation")
    summary = f"; validation balanced accuracy {fitted['balanced_accuracy']:.3f}" if fitted else ""
    out.print(f"Wrote {out_model}: the mean of {len(meta['members'])} models over {', '.join(meta['classes'])}"
              f"{summary}. "
              f"Next: skinclf calibrate {out_model} --data data/prepared/val")


@app.command(
    cls=_Command,
    epilog=_examples(
        "skinclf calibrate runs/exp03.keras --data data/prepared/val",
        "skinclf calibrate models/skinclf-mobilenet.keras --data data/prepared/val --out models/calibrated.keras",
        "skinclf calibrate my.keras --data clinic-labelled/ --report reports/calibration --pass-rate 0.9",
    )
)
def calibrate(
    model: Path = typer.Argument(..., help="Model bundle (.keras) to calibrate."),
    data: Path = typer.Option(CALIBRATE.data, "--data", help="Labelled folder (one sub-folder per class): the "
                              "validation split, never the test split."),
    out_model: Optional[Path] = typer.Option(None, "--out", help="Where to write the calibrated bundle "
                                             "[default: replace MODEL]."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write calibration.json and reliability.png "
                                          "(before and after) into this folder."),
    pass_rate: float = typer.Option(CALIBRATE.pass_rate, "--pass-rate", help="Share of the folder's images that "
                                    "must pass the 'unlike the training images' flag."),
    ood_score: Optional[str] = typer.Option(None, "--ood-score", metavar="SCORE", help="Force the OOD score: energy, max_logit or "
                                            "max_prob [default: the one separating best]."),
    batch_size: int = typer.Option(CALIBRATE.batch_size, "--batch-size", help="Images per model call."),
    workers: int = typer.Option(CALIBRATE.workers, "--workers", help="Threads decoding images."),
) -> None:
    """Refit a bundle's temperature (confidence) and its 'unlike the training images' threshold on a
    labelled folder, so probabilities mean what they say and odd inputs are flagged.

    The temperature is folded into the final layer (composed with any earlier one; decisions do
    not change); the out-of-distribution score that best separates the folder from reference
    non-dermoscopic images (photographs, text, screenshots, flat colours, noise...) gets a
    threshold passing --pass-rate of the folder. ECE, NLL and Brier before and after, and the
    flag rate on every set, are stored in the bundle.
    """
    with _user_errors():
        from skinclf.calibrate import calibrate_model

        result = calibrate_model(model=model, data=data, out=out_model, report=report, pass_rate=pass_rate,
                                 ood_score=ood_score, batch_size=batch_size, workers=workers)
    cal, ood = result.calibration, result.ood
    table = Table(title=f"Calibration on {cal['fitted_on']} ({cal['images']} images)")
    for column in ("", "ECE (15 bins)", "NLL", "Brier"):
        table.add_column(column, justify="left" if not column else "right")
    for label, key in (("before", "validation_before"), ("after", "validation_after"),
                       ("after, cross-fitted", "validation_after_cross_fitted")):
        row = cal[key]
        table.add_row(label, _fmt(row["ece"], 4), _fmt(row["nll"], 4), _fmt(row["brier"], 4))
    out.print(table)
    out.print(f"Temperature {cal['temperature']:.4g} (x{cal['refit']['factor']:.4g} on the previous "
              f"{cal['refit']['previous_temperature']:.4g}).")
    flags = Table(title=f"Unlike the training images: {ood['score']} > {ood['threshold']:.4g} "
                        f"({ood['pass_rate']:.0%} of {ood['fitted_on']} pass)")
    for column in ("images", "n", "flagged", "ROC-AUC"):
        flags.add_column(column, justify="left" if column == "images" else "right")
    aucs = ood["separation"][ood["score"]]["auroc"]
    for name, rate in ood["flag_rates"].items():
        flags.add_row(name, str(ood["counts"][name]), f"{rate:.1%}", _fmt(aucs.get(name)))
    out.print(flags)
    if result.unreadable:
        out.print(f"[yellow]{len(result.unreadable)} unreadable image(s) skipped[/yellow]")
    out.print("Wrote " + ", ".join(str(p) for p in result.files))


@app.command(
    cls=_Command,
    epilog=_examples(
        "skinclf explain lesion.jpg --out reports/explain",
        "skinclf explain ./images --out reports/explain --top-k 2",
        "skinclf explain ./images --out maps --patch 48 --stride 24 --fill grey --model my.keras",
        "skinclf explain ./images --out maps --strict     # exit 1 if any file could not be read",
    )
)
def explain(
    source: Path = typer.Argument(..., help="An image file, or a folder of images (searched recursively)."),
    out_dir: Path = typer.Option(EXPLAIN.out, "--out", help="Folder for one PNG per image and explain.json."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model bundle [default: $SKINCLF_MODEL, else the bundled model]."
    ),
    top_k: int = typer.Option(EXPLAIN.top_k, "--top-k", help="How many most-probable classes to show."),
    patch: int = typer.Option(EXPLAIN.patch, "--patch", help="Side of the occluding patch, in model-input pixels."),
    stride: int = typer.Option(EXPLAIN.stride, "--stride", help="Step of the sliding patch (smaller: finer, slower)."),
    fill: str = typer.Option(EXPLAIN.fill, "--fill", metavar="FILL", help="What covers the patch: blur, grey or mean (colour)."),
    max_side: int = typer.Option(EXPLAIN.max_side, "--max-side", help="Longest side of the picture's panels."),
    batch_size: int = typer.Option(EXPLAIN.batch_size, "--batch-size", help="Images per model call."),
    strict: bool = typer.Option(False, "--strict", metavar="", help="Exit with status 1 if any file could not be read."),
) -> None:
    """Heat maps of what drove each image's top class (occlusion sensitivity), beside the top-k bars.

    A patch slides over the image and the drop of the top class's probability is mapped; it
    needs forward passes only, so it works with any engine. Bad files get one line each and
    the batch goes on. A map shows where the model looked, not why; it is not a diagnosis.
    """
    with _user_errors():
        from skinclf.explain import explain_images

        summary = explain_images(source=source, out=out_dir, model=model, top_k=top_k, patch=patch, stride=stride,
                                 fill=fill, max_side=max_side, batch_size=batch_size, strict=strict)
    for item in summary.explained:
        top = ", ".join(f"{c} {p:.2f}" for c, p in item.top)
        odd = "  [unlike the training images]" if item.unlike_training else ""
        out.print(f"{item.png}  ({item.path}: {top}){odd}", markup=False)
    typer.echo(f"{len(summary.explained)} explained, {len(summary.errors)} could not be read; wrote "
               f"{summary.out / 'explain.json'}", err=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
