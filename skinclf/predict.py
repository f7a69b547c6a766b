"""`skinclf predict`: a whole folder of images into a top-k CSV, fast and unbreakable by bad files.

Rows are appended to `<out>.partial` as batches finish (whole lines, flushed per batch); at
the end that file replaces `<out>` in one rename. An interrupted run therefore leaves every
finished row in the `.partial` file and the previous `<out>` untouched; `resume=True`
continues from it. A file that cannot be decoded becomes a row with an `error`, and the batch
goes on.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from skinclf import __version__, ui
from skinclf.config import PREDICT
from skinclf.errors import SkinclfError
from skinclf.files import atomic_write_json
from skinclf.images import IMAGE_EXTENSIONS, iter_image_files
from skinclf.layout import default_model_path
from skinclf.results import DISCLAIMER, columns, row, sidecar_path


@dataclass(frozen=True)
class PredictSummary:
    """What a predict run did."""

    out: Path | None  # None: the CSV went to stdout
    files: int
    classified: int  # in this run (excludes rows kept from a resumed run)
    resumed: int
    errors: int
    seconds: float  # classifying the files, after start-up
    model: dict[str, Any]
    startup_seconds: float = 0.0  # loading, folding and compiling the model
    unlike_training: int = 0  # images flagged by the model's out-of-distribution threshold (warnings)

    @property
    def images_per_second(self) -> float:
        return self.classified / self.seconds if self.seconds > 0 else 0.0


def list_images(directory: Path, *, recursive: bool) -> list[str]:
    """Paths (relative to `directory`, POSIX style) of the images to classify, sorted."""
    directory = Path(directory)
    if not directory.exists():
        raise SkinclfError(f"folder not found: {directory}")
    if not directory.is_dir():
        raise SkinclfError(f"not a folder: {directory} (predict classifies every image in a folder)")
    found = sorted(p.relative_to(directory).as_posix() for p in iter_image_files(directory, recursive=recursive))
    if not found:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        where = "in or below" if recursive else "directly in"
        raise SkinclfError(f"no images {where} {directory} (looked for {kinds}, any case; hidden files skipped)")
    return found


def _finished_rows(partial: Path, header: list[str]) -> set[str]:
    """Paths already written to an interrupted run's CSV; a torn last line is cut off."""
    with open(partial, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            fh.truncate(keep)
            data = data[:keep]
    lines = csv.reader(io.StringIO(data.decode("utf-8")))
    first = next(lines, None)
    if first is None:
        return set()
    if first != header:
        raise SkinclfError(
            f"cannot resume {partial}: it was written with other options or another model "
            "(different columns); run without --resume to start over"
        )
    return {line[0] for line in lines if line}


def _sorted_in_place(path: Path) -> None:
    """Sort a finished CSV's rows by path if resuming left them out of order."""
    with open(path, newline="", encoding="utf-8") as fh:
        lines = list(csv.reader(fh))
    header, rows = lines[0], lines[1:]
    if all(rows[i][0] <= rows[i + 1][0] for i in range(len(rows) - 1)):
        return
    rows.sort(key=lambda r: r[0])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


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
    top_k: int = PREDICT.top_k,
    batch_size: int = PREDICT.batch_size,
    recursive: bool = True,
    all_probs: bool = False,
    resume: bool = False,
    strict: bool = False,
    tta: int = 1,
    workers: int = PREDICT.workers,
    show_progress: bool | None = None,
) -> PredictSummary:
    """Classify every image in `directory` into a CSV at `out` ('-' for stdout).

    Returns a summary; with `strict`, raises SkinclfError after writing if any file failed.
    """
    if batch_size < 1:
        raise SkinclfError(f"--batch-size {batch_size}: must be at least 1")
    directory = Path(directory)
    to_stdout = str(out) == "-"
    if to_stdout and resume:
        raise SkinclfError("--resume needs a file for --out, not stdout")
    files = list_images(directory, recursive=recursive)

    from skinclf.inference import predict_files, predictor, with_tta
    from skinclf.model import load_bundle
    from skinclf.ood import WARNING as UNLIKE_TRAINING
    from skinclf.ood import flag, with_logits_output

    started = time.perf_counter()
    bundle = load_bundle(model or default_model_path())
    classes = bundle.classes
    if not 1 <= top_k <= len(classes):
        raise SkinclfError(f"--top-k {top_k}: must be 1..{len(classes)} (the model's classes: {', '.join(classes)})")
    # Fold batch norms and compile once, before the clock of the images/s figure starts. The
    # model gives probabilities and logits side by side: logits feed the OOD score.
    runnable = with_logits_output(bundle.model)
    ood = bundle.meta.get("ood")
    size = bundle.image_size
    with_tta(predictor(runnable, batch_size), tta)(np.zeros((1, size, size, 3), dtype="float32"))
    startup = time.perf_counter() - started
    header = columns(classes, top_k, all_probs)

    done: set[str] = set()
    sink: TextIO
    if to_stdout:
        sink, partial, target = sys.stdout, None, None
    else:
        target = Path(out)
        partial = target.with_name(target.name + ".partial")
        target.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            if not partial.exists() and target.exists():
                partial.write_bytes(target.read_bytes())  # continue a finished CSV: add new files
            if partial.exists():
                done = _finished_rows(partial, header)
        elif partial.exists():
            raise SkinclfError(
                f"{partial} holds the rows of an interrupted run: pass --resume to continue it, or delete it"
            )
        sink = open(partial, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed below
    todo = [f for f in files if f not in done]
    writer = csv.writer(sink, lineterminator="\n")
    if not done:
        writer.writerow(header)
    errors = 0  # this run's rows; with resumed rows, recounted over the whole file at the end
    unlike = 0
    t0 = time.perf_counter()
    try:
        with ui.progress(enabled=show_progress) as progress:
            task = progress.add_task("Classifying", total=len(todo), rate="")
            count = 0
            for batch in predict_files(runnable, [directory / f for f in todo], image_size=size,
                                       batch_size=batch_size, workers=workers, tta=tta, optimize=False):
                rows = []
                scores, flagged = flag(batch.probs[:, len(classes):], ood)
                for path, probs, error, score, odd in zip(batch.paths, batch.probs[:, : len(classes)], batch.errors,
                                                          scores, flagged):
                    warning = UNLIKE_TRAINING if odd and error is None else ""
                    rows.append(row(path.relative_to(directory).as_posix(), probs, error, classes, top_k, all_probs,
                                    ood_score=score, warning=warning))
                    errors += error is not None
                    unlike += bool(warning)
                writer.writerows(rows)
                sink.flush()
                count += len(rows)
                progress.update(task, advance=len(rows), rate=ui.rate_text(count, time.perf_counter() - t0))
    except KeyboardInterrupt:
        if partial is not None:
            sink.close()
            ui.stderr.print(f"Interrupted: finished rows are in {partial}; run again with --resume to complete it.")
        raise
    seconds = time.perf_counter() - t0
    if partial is not None:
        os.fsync(sink.fileno())
        sink.close()
        _sorted_in_place(partial)
        if done:  # count errors over the whole file, not only this run's rows
            with open(partial, newline="", encoding="utf-8") as fh:
                finished = list(csv.DictReader(fh))
            errors = sum(1 for r in finished if r["error"])
            unlike = sum(1 for r in finished if UNLIKE_TRAINING in r["warning"])
        os.replace(partial, target)
        atomic_write_json(sidecar_path(target), {
            "note": DISCLAIMER,
            "model": bundle.identity(),
            "skinclf": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "directory": str(directory.resolve()),
            "options": {"top_k": top_k, "all_probs": all_probs, "recursive": recursive, "tta": tta},
            "files": len(files),
            "errors": errors,
            "ood": _ood_note(ood, unlike),
        })
    summary = PredictSummary(out=target, files=len(files), classified=len(todo), resumed=len(done), errors=errors,
                             seconds=seconds, model=bundle.identity(), startup_seconds=startup, unlike_training=unlike)
    if strict and errors:
        raise SkinclfError(f"{errors} of {len(files)} files could not be classified (see the error column of {out})")
    return summary
