"""Issue 32: what DICOM adds to predict's rows: the SOP Instance UID column, age/sex/site from the
tags for the metadata head (a `--metadata` CSV row wins), and a DICOM SR per classified image (`--sr`).

The header of each DICOM file is read once, before any classification (`scan`), keeping only
`dicom.read.DicomTags` (UIDs, age, sex, site): no patient-identifying value reaches a row, the
sidecar or a message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinclf.dicom.read import DicomTags, is_dicom
from skinclf.errors import SkinclfError
from skinclf.model.patient_head import NO_METADATA, PatientMeta

SOP_COLUMN = "sop_instance_uid"
DICOM = "dicom"  # the `metadata` cell of a row whose values came from the DICOM tags
TAGS_READ = ["PatientAge", "PatientSex", "AnatomicRegionSequence", "BodyPartExamined"]


@dataclass
class DicomScan:
    """The DICOM files of a folder (relative paths) and their tags (absent: unreadable header)."""

    files: list[str] = field(default_factory=list)
    tags: dict[str, DicomTags] = field(default_factory=dict)


def scan(directory: Path, files: Iterable[str]) -> DicomScan:
    """Read the header (not the pixels) of every DICOM file among `files`. Without the dicom extra,
    the files are listed and their rows get the error from decoding (which says what to install)."""
    from skinclf.dicom.read import DicomError, read_tags

    from skinclf.data.images import IMAGE_EXTENSIONS
    from skinclf.dicom.read import DICOM_EXTENSIONS

    found = DicomScan()
    for rel in files:
        path = Path(directory) / rel
        suffix = Path(rel).suffix.lower()
        if suffix in IMAGE_EXTENSIONS - DICOM_EXTENSIONS or not is_dicom(path):
            continue
        found.files.append(rel)
        try:
            found.tags[rel] = read_tags(path)
        except DicomError:
            pass  # the row's error comes from decoding, with the same reason
    return found


def meta_of(tags: DicomTags) -> PatientMeta:
    return PatientMeta(age=tags.age, sex=tags.sex, site=tags.site)


class Sources:
    """Per-image metadata from a `--metadata` CSV (`joined`, which wins) and from DICOM tags; the
    same interface as `batch.metadata.Joined` (get, status, per_file, record, notes)."""

    def __init__(self, joined, dicom: DicomScan, *, use_tags: bool) -> None:
        self.joined = joined
        self.tag_metas = {rel: meta_of(t) for rel, t in dicom.tags.items() if use_tags and t.has_metadata}
        self.per_file: dict[str, PatientMeta] = dict(self.tag_metas)
        self.from_csv: set[str] = set()
        if joined is not None:
            self.from_csv = {rel for rel, m in joined.per_file.items() if m.present}
            self.per_file.update({rel: joined.per_file[rel] for rel in self.from_csv})

    def get(self, rel: str) -> PatientMeta:
        return self.per_file.get(rel, NO_METADATA)

    def status(self, rel: str) -> str:
        from skinclf.batch.patient import MISSING, USED

        if rel in self.from_csv:
            return USED
        return DICOM if rel in self.tag_metas else MISSING

    def record(self) -> dict[str, Any]:
        record = self.joined.record() if self.joined is not None else {}
        used = sum(1 for m in self.per_file.values() if m.present)
        return {**record, "images_with_metadata": used, "dicom": {"images_with_tags": len([r for r in self.tag_metas if r not in self.from_csv]),
                                    "tags": TAGS_READ, "csv_wins": self.joined is not None}}

    def notes(self) -> list[str]:
        return self.joined.notes() if self.joined is not None else []


def sop_cell(dicom: DicomScan | None, rel: str) -> list[str]:
    """The `sop_instance_uid` cell (no column at all when the folder holds no DICOM file)."""
    if dicom is None:
        return []
    tags = dicom.tags.get(rel)
    return [tags.sop_instance_uid if tags is not None else ""]


def check_sr_dir(sr: Path | None) -> Path | None:
    """--sr DIR checked before any work: a folder (created), and the extra installed."""
    if sr is None:
        return None
    sr = Path(sr)
    if sr.exists() and not sr.is_dir():
        raise SkinclfError(f"--sr {sr}: not a folder (give a folder for the DICOM SR files)")
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError:
        from skinclf.dicom import missing_extra

        raise SkinclfError(missing_extra("--sr")) from None
    try:
        sr.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SkinclfError(f"--sr {sr}: cannot create the folder ({exc.strerror or exc})") from None
    return sr


def findings_of(row: list[str], header: list[str]):
    """The top-k classes and probabilities exactly as the row holds them."""
    from skinclf.batch.results import CLASS_NAMES
    from skinclf.dicom.sr import Finding

    out = []
    for i in range(1, 1 + sum(1 for c in header if c.startswith("top") and c.endswith("_class"))):
        code, prob = row[header.index(f"top{i}_class")], row[header.index(f"top{i}_prob")]
        if code:
            out.append(Finding(code=code, meaning=CLASS_NAMES.get(code, code), probability=float(prob)))
    return out


def write_report(source, row: list[str], header: list[str], *, sr_dir: Path, model: dict[str, Any]) -> str | None:
    """Write the SR of one classified DICOM row; returns a warning when it could not be written."""
    from skinclf import __version__
    from skinclf.batch.results import WARNING_SEPARATOR
    from skinclf.dicom.sr import SRError, write_sr

    warning = row[header.index("warning")]
    try:
        write_sr(source, sr_dir, findings_of(row, header), model_name=str(model.get("name", "")),
                 model_sha256=str(model.get("sha256", "")), version=__version__,
                 warnings=warning.split(WARNING_SEPARATOR) if warning else [])
    except SRError as exc:
        return f"SR not written: {exc}"
    return None


def with_dicom(batches: Iterable[list[list[str]]], *, header: list[str], directory: Path, dicom: DicomScan | None,
               sr_dir: Path | None, model: dict[str, Any], sources=None) -> Iterator[list[list[str]]]:
    """The row batches with the sop_instance_uid cell added, and an SR written per classified
    DICOM row with `sr_dir` (a failure to write one becomes a warning on its row). With `sources`,
    the `metadata` cell says where each classified row's values came from (Ray workers only know
    used / missing)."""
    from skinclf.batch.results import warning_cell

    warning, error = header.index("warning"), header.index("error")
    for rows in batches:
        out = []
        for r in rows:
            r = r + sop_cell(dicom, r[0])
            if sources is not None and "metadata" in header and not r[error]:
                r[header.index("metadata")] = sources.status(r[0])
            if sr_dir is not None and dicom is not None and r[0] in dicom.tags and not r[error]:
                problem = write_report(Path(directory) / r[0], r, header, sr_dir=sr_dir, model=model)
                if problem:
                    r[warning] = warning_cell([*filter(None, r[warning].split("; ")), problem])
            out.append(r)
        yield out
