"""`skinclf predict`: a whole folder of images into a top-k CSV, fast and unbreakable by bad files.

Every option and output path is checked before any work. Rows are appended to `<out>.partial`
as batches finish (whole lines, flushed per batch; see `skinclf.output`); at the end that file
replaces `<out>` in one rename. An interrupted run therefore leaves every finished row in the
`.partial` file and the previous `<out>` untouched; `resume=True` continues from it. A file
that cannot be decoded, and a folder that cannot be listed (`skinclf.walk`), becomes a row with
an `error`, and the batch goes on; an image the model cannot judge well gets a `warning`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import __version__, ui
from skinclf.batch.output import open_output, partial_path
from skinclf.batch.results import DISCLAIMER, columns, row, sidecar_path
from skinclf.config import PREDICT, TTA_CHOICES
from skinclf.data.images import IMAGE_EXTENSIONS
from skinclf.data.layout import default_model_path
from skinclf.data.walk import Walk, walk_images
from skinclf.errors import SkinclfError
from skinclf.files import atomic_write_json, check_output_file
from skinclf.options import at_least, one_of


@dataclass(frozen=True)
class PredictSummary:
    """What a predict run did."""

    out: Path | None  # None: the CSV went to stdout
    files: int
    classified: int  # in this run (excludes rows kept from a resumed run)
    resumed: int
    errors: int  # rows with an error: files that could not be classified, places that could not be read
    seconds: float  # classifying the files, after start-up
    model: dict[str, Any]
    startup_seconds: float = 0.0  # loading, folding and compiling the model
    unreadable: int = 0  # folders, links and other entries that could not be read (rows with an error)
    warnings: int = 0  # classified rows with a warning
    dropped: int = 0  # rows of a resumed CSV whose files are no longer in the folder
    unlike_training: int = 0  # images flagged by the model's out-of-distribution threshold (warnings)

    @property
    def images_per_second(self) -> float:
        return self.classified / self.seconds if self.seconds > 0 else 0.0


def list_images(directory: Path, *, recursive: bool) -> Walk:
    """The images to classify below `directory` (sorted relative POSIX paths) and the places
    that could not be read."""
    directory = Path(directory)
    if not directory.exists():
        raise SkinclfError(f"folder not found: {directory}")
    if not directory.is_dir():
        raise SkinclfError(f"not a folder: {directory} (predict classifies every image in a folder)")
    found = walk_images(directory, recursive=recursive)
    if found.problems and found.problems[0].path == "./":
        raise SkinclfError(f"{found.problems[0].reason}: {directory}")
    if not found.files and not found.problems:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        where = "in or below" if recursive else "directly in"
        raise SkinclfError(f"no images {where} {directory} (looked for {kinds}, any case; hidden files skipped)")
    return found


def _check_options(*, out: Path | str, top_k: int | None, batch_size: int, workers: int, tta: int, resume: bool,
                   overwrite: bool, threads: int = 0) -> Path | None:
    """Every option checked before any work; returns the output file (None: stdout)."""
    if top_k is not None:
        at_least("--top-k", top_k, 1, example=3)
    at_least("--batch-size", batch_size, 1, example=PREDICT.batch_size)
    at_least("--threads", threads, 0, example=2)  # 0: one per usable CPU
    at_least("--workers", workers, 0, example=2)  # 0: one per usable CPU
    one_of("--tta", tta, TTA_CHOICES)
    if resume and overwrite:
        raise SkinclfError("--resume continues an interrupted run and --overwrite starts over: choose one")
    if str(out) == "-":
        if resume:
            raise SkinclfError("--resume needs a file for --out, not stdout")
        return None
    target = Path(out)
    for path in (target, partial_path(target), sidecar_path(target)):
        check_output_file(path, example="results.csv")
    return target


def _top_k(top_k: int | None, classes: list[str]) -> int:
    if top_k is None:
        return min(PREDICT.top_k, len(classes))
    if top_k > len(classes):
        raise SkinclfError(f"--top-k {top_k}: must be 1..{len(classes)} (the model's classes: {', '.join(classes)})")
    return top_k


def _count(lines: list[list[str]], header: list[str]) -> tuple[int, int]:
    """Rows with an error, and rows with a warning."""
    error, warning = header.index("error"), header.index("warning")
    return sum(1 for r in lines if r[error]), sum(1 for r in lines if r[warning])


def _ood_note(ood: dict[str, Any] | None, flagged: int) -> dict[str, Any]:
    """What the ood_score column means for this model, for the sidecar."""
    if not ood:
        return {"score": "energy", "threshold": None, "flagged": 0,
                "note": "this model has no fitted out-of-distribution threshold: nothing is flagged "
                        "(run `skinclf calibrate` to fit one)"}
    return {"score": ood["score"], "threshold": ood["threshold"], "pass_rate": ood.get("pass_rate"),
            "fitted_on": ood.get("fitted_on"), "flagged": flagged,
            "note": "ood_score above the threshold: the image is unlike the training images (warning column)"}


def predict_directory(
    *,
    directory: Path,
    out: Path | str,
    model: Path | None = None,
    top_k: int | None = None,
    batch_size: int = PREDICT.batch_size,
    recursive: bool = True,
    all_probs: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    tta: int = 1,
    workers: int = PREDICT.workers,
    engine: str = PREDICT.engine,
    threads: int = PREDICT.threads,
    show_progress: bool | None = None,
) -> PredictSummary:
    """Classify every image in `directory` into a CSV at `out` ('-' for stdout).

    `top_k` None: 3, or the model's number of classes if fewer. Returns a summary; with
    `strict`, raises SkinclfError after writing if any file or folder could not be read.
    """
    target = _check_options(out=out, top_k=top_k, batch_size=batch_size, workers=workers, tta=tta, resume=resume,
                            overwrite=overwrite, threads=threads)
    directory = Path(directory)
    found = list_images(directory, recursive=recursive)

    from skinclf.engines.load import load_engine
    from skinclf.engines.runner import engine_tta, predict_files
    from skinclf.model.outlier import WARNING as UNLIKE_TRAINING
    from skinclf.model.outlier import active_record, flag
    from skinclf.parallel import usable_cpus

    started = time.perf_counter()
    runner = load_engine(model or default_model_path(), engine=engine, batch_size=batch_size, threads=threads or None)
    classes = runner.classes
    top_k = _top_k(top_k, classes)
    ood = active_record(runner.meta.get("ood"), runner.features_dim > 0)  # what this engine can score
    # Prepare and run the engine once, before the clock of the images/s figure starts.
    size = runner.image_size
    engine_tta(runner, tta)(np.zeros((1, size, size, 3), dtype="float32"))
    workers = workers or usable_cpus()
    startup = time.perf_counter() - started
    header = columns(classes, top_k, all_probs)

    output = open_output(target, header, resume=resume, overwrite=overwrite, keep=set(found.files))
    problems = {p.path for p in found.problems}
    todo = [f for f in found.files if f not in output.done]
    errors = warned = unlike = 0  # this run's rows; recounted over the whole file at the end
    t0 = time.perf_counter()
    try:
        output.write([row(p.path, None, p.reason, classes, top_k, all_probs) for p in found.problems])
        with ui.progress(enabled=show_progress) as progress:
            task = progress.add_task("Classifying", total=len(todo), rate="")
            count = 0
            for batch in predict_files(runner, [directory / f for f in todo], image_size=size,
                                       batch_size=batch_size, workers=workers, tta=tta):
                scores, flagged = flag(batch.logits, ood, batch.features)
                rows = []
                for path, probs, error, notes, score, odd in zip(batch.paths, batch.probs, batch.errors,
                                                                 batch.warnings, scores, flagged):
                    notes = [*notes, UNLIKE_TRAINING] if odd and error is None else notes
                    rows.append(row(path.relative_to(directory).as_posix(), probs, error, classes, top_k, all_probs,
                                    notes, ood_score=score))
                output.write(rows)
                batch_errors, batch_warned = _count(rows, header)
                errors, warned = errors + batch_errors, warned + batch_warned
                count += len(rows)
                progress.update(task, advance=len(rows), rate=ui.rate_text(count, time.perf_counter() - t0))
    except KeyboardInterrupt:
        output.abandon()
        if output.partial is not None and output.partial.exists():
            ui.stderr.print(f"Interrupted: finished rows are in {output.partial}; run again with --resume to complete it.")
        raise
    except BaseException:
        output.abandon()
        raise
    seconds = time.perf_counter() - t0
    lines = output.finish()
    if lines:
        errors, warned = _count(lines[1:], header)
        warning = header.index("warning")
        unlike = sum(1 for r in lines[1:] if UNLIKE_TRAINING in r[warning])
        _write_sidecar(target, bundle=runner, directory=directory, files=len(found.files), errors=errors,
                       warnings=warned, options={"top_k": top_k, "all_probs": all_probs, "recursive": recursive,
                                                 "tta": tta, "engine": runner.name}, ood=_ood_note(ood, unlike))
    summary = PredictSummary(out=target, files=len(found.files), classified=len(todo), resumed=len(output.done),
                             errors=errors, seconds=seconds, model=runner.identity(), startup_seconds=startup,
                             unreadable=len(problems), warnings=warned,
                             dropped=len([p for p in output.dropped if p not in problems]), unlike_training=unlike)
    if strict and errors:
        raise SkinclfError(_strict_message(summary, out))
    return summary


def _strict_message(summary: PredictSummary, out: Path | str) -> str:
    where = f"see the error column of {out}"
    if not summary.unreadable:
        return f"{summary.errors} of {summary.files} files could not be classified ({where})"
    failed = summary.errors - summary.unreadable
    return (f"{summary.errors} rows are errors: {failed} of {summary.files} files could not be classified and "
            f"{summary.unreadable} folders or links could not be read, so their images are missing ({where})")


def _write_sidecar(target: Path, *, bundle, directory: Path, files: int, errors: int, warnings: int,
                   options: dict[str, Any], ood: dict[str, Any]) -> None:
    atomic_write_json(sidecar_path(target), {
        "note": DISCLAIMER,
        "model": bundle.identity(),
        "skinclf": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "directory": str(directory.resolve()),
        "options": options,
        "files": files,
        "errors": errors,
        "warnings": warnings,
        "ood": ood,
    })
