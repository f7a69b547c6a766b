"""`predict --metadata meta.csv`: reading patient metadata and joining it to the images of a folder.

A row names its image by id (the file name without extension: HAM10000's `image_id`, ISIC's
`image`/`isic_id`) or by path relative to the classified folder (`path`, `file`, `filename`),
and gives any of age (`age`, ISIC's `age_approx`), sex (`sex`, `gender`) and body site
(HAM10000's `localization`, ISIC's `anatom_site_general_challenge` / `anatom_site_general`,
`site`, `body_site`). Column names are matched ignoring case, spaces and dashes; other columns
(`lesion_id`, `dx`, ...) are ignored, with a note. Values are parsed tolerantly
(`model.metadata.parse_*`); a bad value stops the run before any work with one line naming the
file, the line, the image and the value. A row for an image that is not in the folder is
counted and reported, never fatal; an image without a row is classified from the image alone.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import numpy as np

from skinclf.errors import SkinclfError
from skinclf.files import sha256_file
from skinclf.model.patient_head import NO_METADATA, PatientMeta, parse_age, parse_sex, parse_site

COLUMNS = {
    "id": ("image_id", "image", "isic_id", "image_name", "id"),
    "path": ("path", "file", "filename", "file_name", "relative_path"),
    "age": ("age", "age_approx", "patient_age", "age_years"),
    "sex": ("sex", "gender", "patient_sex"),
    "site": ("localization", "anatom_site_general_challenge", "anatom_site_general", "anatom_site_special",
             "site", "body_site", "location", "anatomic_site", "anatom_site"),
}
USED, MISSING = "used", "missing"  # the CSV's `metadata` column
MAX_BYTES = 64 * 1024 * 1024  # HAM10000's 10,015 rows are 0.6 MB; ISIC 2020's 33,126 rows 2 MB


def _norm_column(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").replace(".", " ").split())


def _norm_path(text: str) -> str:
    return PurePosixPath(text.strip().replace("\\", "/")).as_posix().removeprefix("./")


@dataclass
class MetadataFile:
    """A checked metadata CSV: one PatientMeta per key (a relative path or an image id)."""

    path: Path
    sha256: str
    by_path: dict[str, PatientMeta] = field(default_factory=dict)
    by_id: dict[str, PatientMeta] = field(default_factory=dict)  # lower-cased ids
    columns: dict[str, str] = field(default_factory=dict)  # role -> the file's column name
    ignored: list[str] = field(default_factory=list)
    line_of: dict[str, int] = field(default_factory=dict)  # key -> line number (for messages)
    names: dict[str, str] = field(default_factory=dict)  # key -> the id or path as the file spells it
    total: int = 0  # rows in the file
    elsewhere: int = 0  # rows for images not in the folder, not kept (read with `files`)
    elsewhere_examples: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.total

    def notes(self) -> list[str]:
        if not self.ignored:
            return []
        shown = ", ".join(self.ignored[:8]) + (f" and {len(self.ignored) - 8} more" if len(self.ignored) > 8 else "")
        return [f"{self.path.name}: ignored column{'s' if len(self.ignored) > 1 else ''} {shown} "
                "(only image id or path, age, sex and site are read)"]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SkinclfError(f"--metadata {path}: file not found")
    if not path.is_file():
        raise SkinclfError(f"--metadata {path}: not a file (expected a CSV with image_id or path, age, sex, site)")
    if path.stat().st_size > MAX_BYTES:
        raise SkinclfError(f"--metadata {path}: over {MAX_BYTES // (1024 * 1024)} MB, more than a clinic's metadata "
                           "file holds (one row per image: a million images fit in 64 MB); is this a metadata CSV? "
                           "Keep the rows and columns of the images to classify")


def _lines(fh: TextIO, path: Path) -> Iterator[str]:
    for line in fh:
        if "\x00" in line:
            raise SkinclfError(f"--metadata {path}: not a text file (expected a CSV with image_id or path, age, sex, site)")
        yield line


def _encoding(path: Path) -> str:
    """utf-8 (with or without a BOM) if the whole file decodes so, else latin-1 (read in blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    with open(path, "rb") as fh:
        try:
            while block := fh.read(1 << 20):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8-sig"


def read_metadata(path: Path, files: list[str] | None = None) -> MetadataFile:
    """Read and check a metadata CSV; any problem is one SkinclfError naming the file and line.

    The file is streamed (never held whole) and only the id, path, age, sex and site cells are
    looked at. With `files` (the folder's images, relative POSIX paths), only the rows for those
    images are checked and kept: the others are counted, with a few examples, so memory follows
    the folder, not the file."""
    path = Path(path)
    _check_file(path)
    try:
        with open(path, encoding=_encoding(path), newline="") as fh:
            return _read_rows(path, fh, files)
    except csv.Error as exc:
        raise SkinclfError(f"--metadata {path}: not a readable CSV ({exc})") from None
    except OSError as exc:
        raise SkinclfError(f"--metadata {path}: cannot read it ({exc.strerror or exc})") from None


def _header_index(result: MetadataFile, header: list[str]) -> dict[str, int]:
    path = result.path
    index: dict[str, int] = {}
    for i, name in enumerate(header):
        norm = _norm_column(name)
        role = next((r for r, names in COLUMNS.items() if norm in names), None)
        if role is not None and role not in index:
            index[role] = i
            result.columns[role] = name
        elif name.strip():
            result.ignored.append(name.strip())
    if "id" not in index and "path" not in index:
        raise SkinclfError(f"--metadata {path}: no column naming the image (expected image_id, image, isic_id or "
                           f"path; found {', '.join(h.strip() for h in header[:8])})")
    if not {"age", "sex", "site"} & set(index):
        raise SkinclfError(f"--metadata {path}: no age, sex or site column (expected age or age_approx, sex, and "
                           f"localization or anatom_site_general_challenge; found {', '.join(h.strip() for h in header[:8])})")
    return index


def _read_rows(path: Path, fh: TextIO, files: list[str] | None) -> MetadataFile:
    sample = fh.read(4096)
    fh.seek(0)
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(_lines(fh, path), dialect)
    header = next(reader, [])
    if "\x00" in sample:
        raise SkinclfError(f"--metadata {path}: not a text file (expected a CSV with image_id or path, age, sex, site)")
    if not any(c.strip() for c in header):
        raise SkinclfError(f"--metadata {path}: empty (expected a header: image_id or path, and age, sex or site)")
    result = MetadataFile(path=path, sha256=sha256_file(path))
    index = _header_index(result, header)
    wanted = _Wanted(files) if files is not None else None
    for number, cells in enumerate(reader, start=2):
        if any(c.strip() for c in cells):
            _add_row(result, number, cells, index, wanted)
    if not result.total:
        raise SkinclfError(f"--metadata {path}: no rows below the header")
    return result


class _Wanted:
    """The folder's images by relative path and by id (file name without extension, lower case)."""

    def __init__(self, files: list[str]) -> None:
        self.paths = set(files)
        self.ids = {_id_key(rel) for rel in files}

    def __contains__(self, key: tuple[str | None, str | None]) -> bool:
        rel, image_id = key
        return rel in self.paths if rel else _id_key(image_id) in self.ids


def _cell(cells: list[str], index: dict[str, int], role: str) -> str | None:
    i = index.get(role)
    return cells[i] if i is not None and i < len(cells) else None


def _add_row(result: MetadataFile, number: int, cells: list[str], index: dict[str, int],
             wanted: _Wanted | None = None) -> None:
    where = f"--metadata {result.path}, line {number}"
    rel, image_id = _cell(cells, index, "path"), _cell(cells, index, "id")
    rel = _norm_path(rel) if rel and rel.strip() else None
    image_id = image_id.strip() if image_id and image_id.strip() else None
    if rel is None and image_id is None:
        raise SkinclfError(f"{where}: no image id or path")
    name = rel or image_id
    result.total += 1
    if wanted is not None and (rel, image_id) not in wanted:  # for an image not in the folder: counted only
        result.elsewhere += 1
        if len(result.elsewhere_examples) < 5:
            result.elsewhere_examples.append(name)
        return
    try:
        meta = PatientMeta(age=parse_age(_cell(cells, index, "age")), sex=parse_sex(_cell(cells, index, "sex")),
                           site=parse_site(_cell(cells, index, "site")))
    except ValueError as exc:
        raise SkinclfError(f"{where} (image {name}): {exc}") from None
    table, key = (result.by_path, rel) if rel else (result.by_id, _id_key(image_id))
    if key in table:
        raise SkinclfError(f"{where}: image {name} is listed twice (also on line {result.line_of[key]}); keep one row "
                           "per image")
    table[key] = meta
    result.line_of[key] = number
    result.names[key] = name


def _id_key(image_id: str) -> str:
    """How an id is matched: its file name without an image extension (`ISIC_0024358.jpg`, an
    `Image` column of file names, names the image `ISIC_0024358` names), ignoring case."""
    from skinclf.data.images import IMAGE_EXTENSIONS

    name = PurePosixPath(image_id.replace("\\", "/")).name
    stem, dot, ext = name.rpartition(".")
    return (stem if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS else name).lower()


@dataclass
class Joined:
    """Metadata per image of a folder, and what in the file matched nothing."""

    source: MetadataFile
    per_file: dict[str, PatientMeta]  # relative path -> metadata (images with a row only)
    not_in_folder: list[str]  # keys of rows that match no image (some of them, when read for a folder)
    not_in_folder_count: int = 0

    def get(self, rel: str) -> PatientMeta:
        return self.per_file.get(rel, NO_METADATA)

    def status(self, rel: str) -> str:
        """The CSV's `metadata` cell for a classified image: used, or missing (no row, or a row with no value)."""
        return metadata_cell(self.get(rel), None)[0]

    def record(self) -> dict[str, Any]:
        """What the sidecar says about the metadata file."""
        used = sum(1 for m in self.per_file.values() if m.present)
        return {"file": str(self.source.path.resolve()), "sha256": self.source.sha256, "rows": self.source.rows,
                "columns": self.source.columns, "ignored_columns": self.source.ignored,
                "images_with_metadata": used, "rows_not_in_folder": self.not_in_folder_count,
                "not_in_folder_examples": self.not_in_folder[:5]}

    def notes(self) -> list[str]:
        notes = self.source.notes()
        if self.not_in_folder_count:
            n = self.not_in_folder_count
            notes.append(f"{self.source.path.name}: {n} row{'s' if n > 1 else ''} for images not in the folder "
                         f"(e.g. {', '.join(self.not_in_folder[:3])}); ignored")
        return notes


def join(source: MetadataFile, files: list[str]) -> Joined:
    """Each image (relative POSIX path) with its row: by path first, else by id (its file name
    without extension, ignoring case). An id that names two images of the folder is refused:
    which row belongs to which image cannot be told."""
    by_stem: dict[str, list[str]] = {}
    for rel in files:
        by_stem.setdefault(PurePosixPath(rel).stem.lower(), []).append(rel)
    per_file: dict[str, PatientMeta] = {}
    used: set[str] = set()
    for key, meta in source.by_path.items():
        if key in by_stem.get(PurePosixPath(key).stem.lower(), []):
            per_file[key] = meta
            used.add(key)
    for key, meta in source.by_id.items():
        named = [rel for rel in by_stem.get(key, []) if rel in per_file]
        if named:  # README: an image named by two rows is refused, whatever names it
            raise SkinclfError(f"--metadata {source.path}: image {named[0]} is named twice, by path on line "
                               f"{source.line_of[named[0]]} and by id {source.names[key]} on line "
                               f"{source.line_of[key]}; keep one row per image")
        matches = by_stem.get(key, [])
        if len(matches) > 1:
            raise SkinclfError(f"--metadata {source.path}, line {source.line_of[key]}: image id {source.names[key]} matches "
                               f"{len(matches)} images in the folder ({', '.join(matches[:3])}); give a path column "
                               "instead of ids")
        if matches:
            per_file[matches[0]] = meta
            used.add(key)
    missing = sorted(set(source.by_path) - used) + sorted(source.names[k] for k in source.by_id if k not in used)
    # Most rows match nothing and most images got no row: the file names its images in a way
    # the folder does not (another folder, another naming); going on would classify every image
    # without its metadata while the user believes it was used.
    unmatched = len(missing) + source.elsewhere
    if files and unmatched > source.rows / 2 and len(per_file) < len(files) / 2:
        example = (missing + source.elsewhere_examples)[0]
        raise SkinclfError(f"--metadata {source.path}: {unmatched} of {source.rows} rows match no image in the "
                           f"folder and {len(files) - len(per_file)} of {len(files)} images have no row (e.g. row "
                           f"{example!r}, image {files[0]!r}); rows must name images by id (file name, with or "
                           "without extension) or by path relative to the folder; is it the right file and folder?")
    return Joined(source=source, per_file=per_file, not_in_folder=missing + source.elsewhere_examples,
                  not_in_folder_count=unmatched)


def metas_from_json(text: str, names: list[str]) -> tuple[list[PatientMeta], list[str]]:
    """Per-file metadata sent to `serve` (form field `metadata`): a JSON list with one entry per
    file in upload order (null: none), or an object keyed by file name. Each entry is an object
    with any of age, sex and site (the CSV's column names work too). Returns one PatientMeta per
    file and notes (keys ignored, names that match no file); a bad value is a SkinclfError naming
    the file, as `predict --metadata` names the line."""
    import json

    from skinclf.json_input import parse_json

    data = parse_json(text, what="metadata") if text.strip() else None
    notes: list[str] = []
    entries: list[Any] = [None] * len(names)
    if data is None:
        pass
    elif isinstance(data, list):
        if len(data) != len(names):
            raise SkinclfError(f"metadata: a list of {len(data)} entries for {len(names)} files; give one entry per "
                               "file, in upload order (null for none)")
        entries = data
    elif isinstance(data, dict):
        index: dict[str, int] = {}
        for i, name in enumerate(names):
            index.setdefault(name, i if name not in index else -1)
        for key, value in data.items():
            i = index.get(key)
            if i is None:
                notes.append(f"metadata for {key}, which is not among the uploaded files: ignored")
            elif i < 0:
                raise SkinclfError(f"metadata for {key}: two uploaded files have that name; send a list in upload order")
            else:
                entries[i] = value
    else:
        raise SkinclfError("metadata: expected a JSON list (one entry per file) or an object keyed by file name")
    metas = []
    for name, entry in zip(names, entries):
        if entry is None:
            metas.append(NO_METADATA)
            continue
        if not isinstance(entry, dict):
            raise SkinclfError(f"metadata for {name}: expected an object with age, sex and site, not {json.dumps(entry)[:40]}")
        values: dict[str, Any] = {}
        for key, value in entry.items():
            norm = _norm_column(str(key))
            role = next((r for r, aliases in COLUMNS.items() if norm in aliases and r in ("age", "sex", "site")), None)
            if role is None:
                notes.append(f"metadata for {name}: ignored field {key} (only age, sex and site are read)")
            else:
                values[role] = value
        try:
            metas.append(PatientMeta(age=parse_age(values.get("age")), sex=parse_sex(values.get("sex")),
                                     site=parse_site(values.get("site"))))
        except ValueError as exc:
            raise SkinclfError(f"metadata for {name}: {exc}") from None
    return metas, notes


# --- applying the head (predict on one machine or on Ray workers, evaluate) -------------------


def with_metadata(head, batch_logits: np.ndarray, batch_probs: np.ndarray, metas: list,
                  features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities with the metadata head applied where an image has metadata, and whether it had:
    an image without any is left with exactly its image-only probabilities (`batch_probs`)."""
    from skinclf.engines.base import softmax

    present = np.array([m.present for m in metas], dtype=bool)
    if head is None or not present.any():
        return batch_probs, np.zeros(len(metas), dtype=bool)
    fused = head.apply(batch_logits, metas, features)
    probs = np.array(batch_probs, copy=True)
    probs[present] = softmax(fused[present])
    return probs, present


def metadata_cell(meta: PatientMeta | None, error: str | None) -> list[str]:
    """The `metadata` column's cell for an image with `meta` (None: no --metadata, so no cell at
    all): empty on an error row, else used or missing (no row, or a row with no value)."""
    if meta is None:
        return []
    return [""] if error else [USED if meta.present else MISSING]


def metadata_head(engine):
    """The model's metadata head, checked against this engine, for --metadata (SkinclfError if unusable)."""
    from skinclf.model.patient_head import load_head

    head = load_head(engine.meta, path=engine.path)
    if head is None:
        raise SkinclfError(f"--metadata: model {engine.path} has no metadata head, so it cannot use age, sex or site; "
                           "run without --metadata, or fit one: python tools/fit_metadata_head.py --model MODEL")
    if head.needs_features and not engine.features_dim:
        raise SkinclfError(f"--metadata: the metadata head of {engine.path} needs the pooled features, which this "
                           f"{engine.name} engine does not give (an ONNX file exported before they existed); "
                           "re-export it with skinclf export, or use --engine keras")
    return head
