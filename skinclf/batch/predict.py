"""`skinclf predict`: a whole folder of images into a top-k CSV, fast and unbreakable by bad files.

Every option and output path is checked before any work. Rows are appended to `<out>.partial`
as batches finish (whole lines, flushed per batch; see `skinclf.batch.output`); at the end that file
replaces `<out>` in one rename. An interrupted run therefore leaves every finished row in the
`.partial` file and the previous `<out>` untouched; `resume=True` continues from it. A file
that cannot be decoded, and a folder that cannot be listed (`skinclf.data.walk`), becomes a row with
an `error`, and the batch goes on; an image the model cannot judge well gets a `warning`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from skinclf import __version__, ui
from skinclf.batch.output import open_output, partial_path
from skinclf.batch.results import (
    DISCLAIMER,
    batch_rows,
    class_names,
    columns,
    row,
    sidecar_path,
)
from skinclf.batch.resume import CHECKS, file_key, record_path, run_record, sidecar_record
from skinclf.config import PREDICT, PredictConfig
from skinclf.data.images import IMAGE_EXTENSIONS
from skinclf.data.walk import Walk, walk_images
from skinclf.errors import Interrupted, SkinclfError
from skinclf.files import atomic_write_json, check_output_file
from skinclf.own_outputs import CSV, JSON


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
    skipped: int = 0  # files passed over on purpose (hidden, or not an image by extension): no row
    skipped_examples: list[str] = field(default_factory=list)
    warnings: int = 0  # classified rows with a warning
    dropped: int = 0  # rows of a resumed CSV whose files are no longer in the folder
    unlike_training: int = 0  # images flagged by the model's out-of-distribution threshold (warnings), either tier
    very_unlike: int = 0  # of those, the rare "very unlike the training images" tier
    redone: dict[str, int] = field(default_factory=dict)  # rows of a resumed CSV reclassified, by reason
    cluster: dict[str, Any] | None = None  # --ray: the cluster's address kind and its number of workers
    metadata: dict[str, Any] | None = None  # --metadata: the file, and how many images it gave metadata to
    notes: list[str] = field(default_factory=list)  # things the user should know (ignored columns, unmatched rows)
    check: str = ""  # --resume: how kept rows were checked against their files (resume.CHECKS)

    @property
    def images_per_second(self) -> float:
        return self.classified / self.seconds if self.seconds > 0 else 0.0


STDOUT = ("-", "/dev/stdout")  # --out names the terminal (or the pipe): rows stream there, nothing is replaced
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")  # s3://, gs://, az://, hdfs://, ...


def list_images(directory: Path, *, recursive: bool) -> Walk:
    """The images to classify below `directory` (sorted relative POSIX paths) and the places
    that could not be read."""
    directory = Path(directory)
    uri = _URI.match(str(directory))
    if uri and not directory.exists():  # typer's Path turns s3://bucket into s3:/bucket
        raise SkinclfError(f"{uri[1]}:// and other object-store URIs are not read directly: mount the bucket (s3fs, "
                           "mountpoint-s3, gcsfuse, ...) at the same path on this machine and every worker, and pass "
                           "that folder")
    if not directory.exists():
        raise SkinclfError(f"folder not found: {directory}")
    if directory.is_file():
        return _one_image(directory)
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


def _one_image(path: Path) -> Walk:
    """`skinclf predict one.jpg`: the one file, as a walk of its folder that found only it (its
    row's path is the file name)."""
    from skinclf.data.images import is_image_file
    from skinclf.own_outputs import PNG, is_own_output

    if not is_image_file(path):
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise SkinclfError(f"{path} is not an image by its name (looked for {kinds}, any case): give an image or a "
                           "folder of images")
    if is_own_output(path, PNG):
        raise SkinclfError(f"{path} is a picture skinclf drew (a heat map), not an image to classify")
    return Walk(files=[path.name])


def image_root(source: Path) -> Path:
    """The folder a predict's row paths are relative to: `source`, or the folder of one image."""
    source = Path(source)
    return source.parent if source.is_file() else source


SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")


def _check_options(config: PredictConfig) -> Path | None:
    """Every option checked before any work; returns the output file (None: stdout)."""
    config.validate()
    out = config.out
    if str(out) in STDOUT:
        if config.resume:
            raise SkinclfError("--resume needs a file for --out, not stdout")
        return None
    target = Path(out)
    if not target.name:  # '' arrives as '.'
        what = f"--out {out} is a folder" if str(out) else "--out is empty"
        raise SkinclfError(f"{what}: give a CSV file name, e.g. --out results.csv (or - for the terminal)")
    if target.suffix.lower() in SPREADSHEET_SUFFIXES:
        raise SkinclfError(f"--out {out}: predict writes CSV, which every spreadsheet opens; name it "
                           f"{target.with_suffix('.csv').name}")
    # Never over an image, a model or anything else the user has: only an earlier predict output.
    for path, kind in ((target, CSV), (partial_path(target), CSV), (sidecar_path(target), JSON),
                       (record_path(target), JSON)):
        check_output_file(path, example="results.csv", kind=kind, overwrite=config.overwrite)
    if not target.parent.exists() and not target.parent.is_symlink():
        raise SkinclfError(f"--out {out}: the folder {target.parent} does not exist (check the path, or create "
                           f"it first: mkdir -p {target.parent})")
    return target


def _check_same_folder(target: Path, directory: Path) -> None:
    """An earlier predict CSV at `target` holds another folder's results (its rows' paths are
    relative, only the sidecar names the folder): replacing it needs --overwrite."""
    import json

    if not target.exists():
        return
    try:
        earlier = json.loads(sidecar_path(target).read_text(encoding="utf-8")).get("directory")
    except (OSError, ValueError, AttributeError):
        return
    if earlier and Path(earlier) != directory.resolve():
        raise SkinclfError(f"--out {target} holds the results of another folder ({earlier}): add --overwrite to "
                           "replace them, or choose another --out")


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


def _active(engine) -> dict[str, Any] | None:
    """The model's OOD record this engine can score (a feature score needs its features)."""
    from skinclf.model.outlier import active_record

    return active_record(engine.meta.get("ood"), engine.features_dim > 0)


def _ood_note(ood: dict[str, Any] | None, flagged: int, very_unlike: int = 0) -> dict[str, Any]:
    """What the ood_percentile column and the two warning tiers mean for this model, for the sidecar."""
    from skinclf.model.outlier import WARNING, WARNING_RARE

    if not ood:
        return {"score": "energy", "threshold": None, "flagged": 0, "ood_percentile": None,
                "note": "this model has no fitted out-of-distribution threshold: nothing is flagged and "
                        "ood_percentile is empty (run `skinclf calibrate` to fit one)"}
    tiers = {"unusual": {"warning": WARNING, "threshold": ood["threshold"], "pass_rate": ood.get("pass_rate"),
                         "meaning": f"scores above {ood.get('pass_rate') or 0.95:.0%} of the {ood.get('fitted_on')}: "
                                    "about 1 in 20 ordinary dermoscopic images; the result is less reliable"}}
    if ood.get("rare_threshold") is not None:
        tiers["very unlike"] = {"warning": WARNING_RARE, "threshold": ood["rare_threshold"],
                                "rule": ood.get("rare_rule"),
                                "meaning": "scores above anything seen in the validation dermoscopic images: "
                                           "very likely not a dermoscopic image"}
    return {"score": ood["score"], "threshold": ood["threshold"], "pass_rate": ood.get("pass_rate"),
            "fitted_on": ood.get("fitted_on"), "flagged": flagged, "very_unlike": very_unlike, "tiers": tiers,
            "ood_percentile": ("share (0-100) of the validation dermoscopic images that score lower, i.e. are more "
                               "like the training images; 95 and above is the 'unusual' tier"
                               if ood.get("reference_scores") else
                               "empty: this model's out-of-distribution record has no validation scores "
                               "(recalibrate it with `skinclf calibrate` for the percentile and both tiers)"),
            "raw_score": "not in the CSV (the model's score, " + str(ood["score"]) + ", has no scale a reader can use)"}


@dataclass
class _Tally:
    """Rows with an error, with a warning, and flagged unlike the training images."""

    errors: int = 0
    warned: int = 0
    unlike: int = 0  # either tier
    very_unlike: int = 0  # the rare tier

    def add(self, rows: list[list[str]], header: list[str]) -> None:
        from skinclf.model.outlier import WARNING, WARNING_RARE

        errors, warned = _count(rows, header)
        warning = header.index("warning")
        self.errors += errors
        self.warned += warned
        self.unlike += sum(1 for r in rows if WARNING in r[warning] or WARNING_RARE in r[warning])
        self.very_unlike += sum(1 for r in rows if WARNING_RARE in r[warning])


def _load(model: Path | None, *, engine: str, batch_size: int, threads: int, tta: int, top_k: int | None,
          onnx_only: bool = False):
    """The engine, ready to run (prepared once, before the clock of the images/s figure starts),
    the top-k it will write, and the seconds that took. `onnx_only` (--ray): the model's ONNX form."""
    from skinclf.engines.load import load_engine
    from skinclf.engines.runner import engine_tta

    started = time.perf_counter()
    try:
        engine = load_engine(model, engine="onnx" if onnx_only else engine,
                             batch_size=batch_size, threads=threads or None)
    except SkinclfError as exc:
        if not onnx_only:
            raise
        raise SkinclfError(f"--ray runs the model's ONNX form on the workers: {exc}") from None
    top_k = _top_k(top_k, engine.classes)
    size = engine.image_size
    engine_tta(engine, tta)(np.zeros((1, size, size, 3), dtype="float32"))
    return engine, top_k, time.perf_counter() - started


def _merged(pending: list[list[str]], rows: list[list[str]], *, last: bool = False) -> list[list[str]]:
    """`rows` (in path order) with the rows of unreadable places that sort before their last path
    (all of them if `last`) taken from `pending`, so even a streamed CSV comes out sorted."""
    until = None if last or not rows else rows[-1][0]
    take = [p for p in pending if until is None or p[0] < until]
    del pending[: len(take)]
    return sorted([*take, *rows], key=lambda r: r[0])


@dataclass(frozen=True)
class PatientData:
    """--metadata: the file as read, its rows joined to the folder's images, the model's head."""

    source: Any  # batch.metadata.MetadataFile
    joined: Any  # batch.metadata.Joined
    head: Any  # model.metadata head


def _embedded(engine, *, directory: Path, todo: list[str], top_k: int, all_probs: bool, batch_size: int,
              workers: int, tta: int, patient: PatientData | None = None) -> Iterator[list[list[str]]]:
    """The rows of `todo`, batch by batch, classified on this machine (decoding in `workers` threads)."""
    from skinclf.engines.runner import predict_files

    ood = _active(engine)
    for batch in predict_files(engine, [directory / f for f in todo], image_size=engine.image_size,
                               batch_size=batch_size, workers=workers, tta=tta):
        rels = [Path(p).relative_to(directory).as_posix() for p in batch.paths]
        metas = None if patient is None else [patient.joined.get(r) for r in rels]
        yield batch_rows(batch, names=rels, classes=engine.classes, top_k=top_k, all_probs=all_probs, ood=ood,
                         metas=metas, head=None if patient is None else patient.head)


def _classify(output, batches: Iterable[list[list[str]]], *, total: int, problems: list[list[str]],
              header: list[str], show_progress: bool | None) -> _Tally:
    """Write the row batches (each in path order, batches in order) into `output` with the rows of
    unreadable places merged in; returns the tally of the rows written."""
    tally, pending = _Tally(), sorted(problems, key=lambda r: r[0])
    t0 = time.perf_counter()
    with ui.progress(enabled=show_progress) as progress:
        task = progress.add_task("Classifying", total=total, rate="")
        count = 0
        for rows in batches:
            written = _merged(pending, rows)
            output.write(written)
            tally.add(written, header)
            count += len(rows)
            progress.update(task, advance=len(rows), rate=ui.rate_text(count, time.perf_counter() - t0))
    rest = _merged(pending, [], last=True)
    output.write(rest)
    tally.add(rest, header)
    return tally


def predict_directory(directory: Path, *, show_progress: bool | None = None, **settings: Any) -> PredictSummary:
    """`predict` with its settings as keywords (`config.PredictConfig`'s fields), for library use."""
    return predict(PredictConfig(directory=Path(directory), **settings), show_progress=show_progress)


def predict(config: PredictConfig, *, show_progress: bool | None = None) -> PredictSummary:
    """Classify every image in `config.directory` into a CSV at `config.out` ('-' for stdout).

    `top_k` None: 3, or the model's number of classes if fewer. Returns a summary; with
    `strict`, raises SkinclfError after writing if any file or folder could not be read.
    `ray` (local, auto or ray://HOST:PORT): classify on a Ray cluster's workers (`batch.ray`),
    `ray_workers` of them (0: one per CPU of the cluster); the CSV and its guarantees are the same.
    `metadata`: a CSV of age, sex and body site per image (`batch.patient`), added by the
    model's metadata head; the CSV gains a `metadata` column (used / missing).
    DICOM files (issue 32, `batch.dicom_rows`): a `sop_instance_uid` column when the folder holds
    any; their age/sex/site tags feed the head unless `dicom_metadata` is False (a `metadata` CSV
    row wins; the cell says `dicom`); `sr`: a folder for one DICOM SR per classified DICOM image.
    """
    from skinclf.batch.patient import read_metadata
    from skinclf.parallel import decode_workers

    c = config
    target = _check_options(c)
    address = None
    if c.ray is not None:
        from skinclf.batch import ray as cluster

        address = cluster.check(c.ray, engine=c.engine, workers=c.ray_workers)
    from skinclf.batch import dicom_rows

    dicom_rows.check_sr_dir(c.sr)
    found = list_images(Path(c.directory), recursive=c.recursive)
    directory = image_root(c.directory)  # one image: its folder (the row's path is the file name)
    # Checked before any work; only the rows of the folder's images are kept.
    source = read_metadata(Path(c.metadata), found.files) if c.metadata is not None else None
    if target is not None and not (c.resume or c.overwrite):
        _check_same_folder(target, directory)
    engine, top_k, startup = _load(c.model, engine=c.engine, batch_size=c.batch_size, threads=c.threads, tta=c.tta,
                                   top_k=c.top_k, onnx_only=address is not None)
    patient, dicom = _patient(engine, source, directory=directory, found=found, use_tags=c.dicom_metadata)
    start = None
    if address is not None:
        def start():
            return cluster.start(address, workers=c.ray_workers, engine=engine, directory=directory, top_k=top_k,
                                 all_probs=c.all_probs, batch_size=c.batch_size, threads=c.threads, tta=c.tta,
                                 metadata=patient is not None)
    return _run(engine, start, c, target=target, directory=directory, found=found, top_k=top_k,
                workers=decode_workers(c.workers), startup=startup, show_progress=show_progress, patient=patient,
                dicom=dicom)


def _patient(engine, source, *, directory: Path, found: Walk, use_tags: bool):
    """The patient metadata the head gets (a `--metadata` CSV, DICOM tags, or None) and the folder's
    DICOM scan (None without DICOM files: `batch.dicom_rows`)."""
    from skinclf.batch import dicom_rows
    from skinclf.batch.patient import join, metadata_head

    dicom = dicom_rows.scan(directory, found.files)
    dicom = dicom if dicom.files else None
    head = metadata_head(engine) if source is not None else None
    use_tags = use_tags and dicom is not None and any(t.has_metadata for t in dicom.tags.values())
    if use_tags and head is None:
        from skinclf.model.patient_head import load_head

        head = load_head(engine.meta, path=engine.path)  # a model without a head: the tags go unused
        use_tags = head is not None and not (head.needs_features and not engine.features_dim)
    if source is None and not use_tags:
        return None, dicom
    joined = join(source, found.files) if source is not None else None
    sources = dicom_rows.Sources(joined, dicom or dicom_rows.DicomScan(), use_tags=use_tags)
    return PatientData(source=source, joined=sources, head=head), dicom


def _run(engine, start, config: PredictConfig, *, target: Path | None, directory: Path, found: Walk, top_k: int,
         workers: int, startup: float, show_progress: bool | None, patient: PatientData | None,
         dicom=None) -> PredictSummary:
    """Open the output, classify what is left to do (here, or on the workers of the cluster that
    `start` connects to, once the output is open), finish."""
    c = config
    from skinclf.batch import dicom_rows

    joined = patient.joined if patient is not None else None
    sr_dir = Path(c.sr) if c.sr is not None else None  # checked (and made) before the model loaded
    header = (columns(engine.classes, top_k, c.all_probs) + (["metadata"] if joined is not None else [])
              + ([dicom_rows.SOP_COLUMN] if dicom is not None else []))
    sha = patient.source.sha256 if patient is not None and patient.source is not None else ""
    run = run_record(identity=engine.identity(), engine=engine.name, top_k=top_k, all_probs=c.all_probs, tta=c.tta,
                     directory=directory, metadata=sha + ("+dicom" if joined is not None and joined.tag_metas else ""))
    files = {f: file_key(directory / f) for f in found.files} if target is not None else {}
    output = open_output(target, header, resume=c.resume, overwrite=c.overwrite, files=files, run=run, verify=c.verify)
    todo = [f for f in found.files if f not in output.done]
    from skinclf.batch.patient import metadata_cell

    problems = [row(p.path, None, p.reason, engine.classes, top_k, c.all_probs)
                + metadata_cell(None if joined is None else joined.get(p.path), p.reason)
                + dicom_rows.sop_cell(dicom, p.path) for p in found.problems]
    pool = None
    t0 = time.perf_counter()
    try:
        if start is not None:
            pool = start()
            startup, t0 = startup + time.perf_counter() - t0, time.perf_counter()
        if pool is None:
            batches = _embedded(engine, directory=directory, todo=todo, top_k=top_k, all_probs=c.all_probs,
                                batch_size=c.batch_size, workers=workers, tta=c.tta, patient=patient)
        else:
            batches = pool.rows(todo, metas=joined.per_file if joined is not None else None)
        if dicom is not None:  # issue 32: the sop_instance_uid cell, and an SR per DICOM row with --sr
            batches = dicom_rows.with_dicom(batches, header=header, directory=directory, dicom=dicom, sr_dir=sr_dir,
                                            model=engine.identity(), sources=joined)
        tally = _classify(output, batches, total=len(todo), problems=problems, header=header,
                          show_progress=show_progress)
    except KeyboardInterrupt:
        output.abandon()
        if output.partial is not None and output.partial.exists():
            raise Interrupted(f"finished rows are in {output.partial}; run again with --resume to complete it") from None
        raise
    except BaseException:
        output.abandon()
        raise
    finally:
        if pool is not None:
            pool.close()
    seconds = time.perf_counter() - t0
    if target is not None:
        tally = _finish(output, engine=engine, directory=directory, header=header, files=len(found.files), run=run,
                        options={"top_k": top_k, "all_probs": c.all_probs, "recursive": c.recursive, "tta": c.tta,
                                 "engine": engine.name, **({"metadata": joined.record()} if joined is not None else {})},
                        cluster=pool.describe() if pool is not None else None, verify=c.verify)
    problem_paths = {p.path for p in found.problems}
    summary = PredictSummary(out=target, files=len(found.files), classified=len(todo), resumed=len(output.done),
                             errors=tally.errors, seconds=seconds, model=engine.identity(), startup_seconds=startup,
                             unreadable=len(problem_paths), warnings=tally.warned, skipped=found.skipped,
                             skipped_examples=found.skipped_examples,
                             dropped=len([p for p in output.dropped if p not in problem_paths]),
                             unlike_training=tally.unlike, very_unlike=tally.very_unlike, redone=dict(output.redone),
                             cluster=pool.describe() if pool is not None else None,
                             metadata=joined.record() if joined is not None else None,
                             notes=joined.notes() if joined is not None else [],
                             check=CHECKS[c.verify] if c.resume else "")
    if c.strict and tally.errors:
        raise SkinclfError(_strict_message(summary, c.out))
    return summary


def _finish(output, *, engine, directory: Path, header: list[str], files: int, run: dict,
            options: dict[str, Any], cluster: dict[str, Any] | None = None, verify: bool = False) -> _Tally:
    """Move the CSV into place and write its sidecar; returns the tally over every row (kept ones too)."""
    lines = output.finish()
    tally = _Tally()
    tally.add(lines[1:], header)
    resume = sidecar_record(target=output.target, run=run, keys=output.record.keys, paths=[r[0] for r in lines[1:]],
                            kept=len(output.done), redone=output.redone, verify=verify)
    _write_sidecar(output.target, bundle=engine, directory=directory, files=files, errors=tally.errors,
                   warnings=tally.warned, options=options, ood=_ood_note(_active(engine), tally.unlike, tally.very_unlike),
                   resume=resume, cluster=cluster)
    output.forget_record()
    return tally


def _strict_message(summary: PredictSummary, out: Path | str) -> str:
    where = f"see the error column of {out}"
    failed = summary.errors - summary.unreadable
    if not summary.unreadable:
        return f"{failed} of {summary.files} files could not be classified ({where})"
    rows = "1 row is an error" if summary.errors == 1 else f"{summary.errors} rows are errors"
    places = "1 folder or link" if summary.unreadable == 1 else f"{summary.unreadable} folders or links"
    return (f"{rows}: {failed} of {summary.files} files could not be classified and {places} could not be read, "
            f"so their images are missing ({where})")


def _write_sidecar(target: Path, *, bundle, directory: Path, files: int, errors: int, warnings: int,
                   options: dict[str, Any], ood: dict[str, Any], resume: dict[str, Any],
                   cluster: dict[str, Any] | None = None) -> None:
    extra = {} if cluster is None else {"cluster": cluster}  # --ray only: the sidecar of a local run is unchanged
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
        "classes": class_names(bundle.classes),
        "resume": resume,
        **extra,
    })
