"""Reading a DICOM file: RGB pixels (or the JPEG bitstream it encapsulates), its UIDs, and the
patient metadata the metadata head uses. Nothing else leaves this module.

Only these attributes are read: the pixel description (SamplesPerPixel, PhotometricInterpretation,
Rows, Columns, NumberOfFrames, BitsAllocated, the transfer syntax), the Study/Series/SOP Instance
UIDs and the SOP Class UID (to join results back to the PACS and reference them in an SR),
PatientAge, PatientSex and AnatomicRegionSequence / BodyPartExamined (the metadata head's age, sex
and site). Patient name, ID, birth date, accession number, institution and every other attribute
are never copied out: `DicomImage` and `DicomTags` have no field that could hold them.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from skinclf.dicom import missing_extra

MAGIC_OFFSET, MAGIC = 128, b"DICM"
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})

# AnatomicRegionSequence code meanings (SNOMED CT, CID 4031/4028) and BodyPartExamined values
# (CID 4031's code strings), lower-cased, onto the metadata head's sites (model.metadata.SITES
# and ISIC's coarser groups; tests/dicom/test_dicom.py checks every value parses there).
SITE_OF = {
    "abdomen": "abdomen", "abdominal wall": "abdomen", "skin of abdomen": "abdomen",
    "back": "back", "upper back": "back", "lower back": "back", "skin of back": "back", "thoracic back": "back",
    "chest": "chest", "thorax": "chest", "chest wall": "chest", "breast": "chest", "skin of chest": "chest",
    "ear": "ear", "external ear": "ear", "auricle": "ear",
    "face": "face", "cheek": "face", "nose": "face", "forehead": "face", "lip": "face", "chin": "face",
    "eyelid": "face", "skin of face": "face",
    "foot": "foot", "toe": "foot", "heel": "foot", "ankle": "foot", "sole": "acral", "sole of foot": "acral",
    "palm": "acral", "palm of hand": "acral", "acral": "acral",
    "genital": "genital", "genitalia": "genital", "penis": "genital", "scrotum": "genital", "vulva": "genital",
    "hand": "hand", "finger": "hand", "thumb": "hand", "wrist": "hand",
    "lower extremity": "lower extremity", "lower limb": "lower extremity", "leg": "lower extremity",
    "lower leg": "lower extremity", "thigh": "lower extremity", "knee": "lower extremity",
    "buttock": "lower extremity", "hip": "lower extremity", "lowerlimb": "lower extremity",
    "neck": "neck", "skin of neck": "neck",
    "scalp": "scalp", "skin of scalp": "scalp",
    "trunk": "trunk", "torso": "trunk", "flank": "trunk", "shoulder": "trunk",
    "upper extremity": "upper extremity", "upper limb": "upper extremity", "arm": "upper extremity",
    "upper arm": "upper extremity", "forearm": "upper extremity", "elbow": "upper extremity",
    "upperlimb": "upper extremity",
    "head": "head/neck", "head and neck": "head/neck", "headneck": "head/neck",
}
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


class DicomError(Exception):
    """A DICOM file skinclf cannot classify; the message says what it is, on one line."""


@dataclass(frozen=True)
class DicomTags:
    """What skinclf takes from a DICOM header: UIDs and the metadata head's fields (None: absent)."""

    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    age: float | None = None  # years
    sex: str | None = None  # "female" / "male"
    site: str | None = None  # a model.metadata site name or ISIC group

    @property
    def has_metadata(self) -> bool:
        return self.age is not None or self.sex is not None or self.site is not None


@dataclass(frozen=True)
class DicomImage:
    """A decodable single-frame colour DICOM image: either `jpeg` (the JPEG baseline bitstream it
    encapsulates, decoded like any JPEG file) or `pixels` (RGB uint8, rows x columns x 3)."""

    tags: DicomTags
    width: int
    height: int
    jpeg: bytes | None = None
    pixels: np.ndarray | None = None


def has_magic(head: bytes) -> bool:
    return len(head) >= MAGIC_OFFSET + 4 and head[MAGIC_OFFSET:MAGIC_OFFSET + 4] == MAGIC


def is_dicom(source: Path | str | BinaryIO | bytes, name: str | Path | None = None) -> bool:
    """True for a `.dcm` name or content with the DICM preamble (offset 128). Needs no pydicom."""
    if name is None and isinstance(source, (str, Path)):
        name = source
    if name is not None and Path(name).suffix.lower() in DICOM_EXTENSIONS:
        return True
    if isinstance(source, bytes):
        return has_magic(source[:MAGIC_OFFSET + 4])
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as fh:
                return has_magic(fh.read(MAGIC_OFFSET + 4))
        except OSError:
            return False
    try:
        where = source.tell()
        head = source.read(MAGIC_OFFSET + 4)
        source.seek(where)
    except (OSError, ValueError):
        return False
    return has_magic(head)


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DicomError(missing_extra()) from None
    return pydicom


def _dataset(source: Path | str | BinaryIO | bytes, *, header_only: bool):
    pydicom = _pydicom()
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        return pydicom.dcmread(source, stop_before_pixels=header_only, force=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is one per-file reason
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DicomError(f"not a readable DICOM file ({reason})") from None


def parse_age(value: object) -> float | None:
    """PatientAge (AS: nnnD/W/M/Y, e.g. 045Y) in years; None when absent or malformed."""
    match = _AGE.match(str(value or ""))
    if not match:
        return None
    years = int(match[1]) * _DAYS_PER[(match[2] or "Y").upper()] / 365.25
    return round(years, 2) if years <= 120 else None


def parse_sex(value: object) -> str | None:
    """PatientSex: M / F (O and anything else: unknown)."""
    return {"F": "female", "M": "male"}.get(str(value or "").strip().upper())


def site_of(text: object) -> str | None:
    """A body-site name (code meaning or BodyPartExamined) as a metadata head site, or None."""
    key = " ".join(str(text or "").replace("_", " ").lower().replace("structure", "").split())
    if not key:
        return None
    if key in SITE_OF:
        return SITE_OF[key]
    for prefix in ("skin of ", "entire ", "left ", "right ", "skin of left ", "skin of right "):
        if key.startswith(prefix) and key.removeprefix(prefix) in SITE_OF:
            return SITE_OF[key.removeprefix(prefix)]
    return None


def _site(ds) -> str | None:
    for item in ds.get("AnatomicRegionSequence", None) or []:
        site = site_of(item.get("CodeMeaning", ""))
        if site:
            return site
    return site_of(ds.get("BodyPartExamined", ""))


def tags_of(ds) -> DicomTags:
    """The UIDs and metadata fields of a dataset; nothing else."""
    return DicomTags(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""), sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        age=parse_age(ds.get("PatientAge", None)), sex=parse_sex(ds.get("PatientSex", None)), site=_site(ds))


def read_tags(source: Path | str | BinaryIO | bytes) -> DicomTags:
    """The header's UIDs and metadata, without reading the pixel data. Raises DicomError."""
    return tags_of(_dataset(source, header_only=True))


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a DICOM header claims, without reading its pixels; None if unreadable."""
    try:
        ds = _dataset(data, header_only=True)
        return int(ds.Columns), int(ds.Rows)
    except Exception:  # noqa: BLE001 - decoding then gives the file its error
        return None


def _kind(ds) -> str:
    sop = ds.get("SOPClassUID", None)
    name = getattr(sop, "name", "") if sop is not None else ""
    return name if name and name != str(sop) else (str(sop) if sop else "unknown SOP class")


def read_dicom(source: Path | str | BinaryIO | bytes, *, max_pixels: int) -> DicomImage:
    """A single-frame colour DICOM image, ready to decode. Raises DicomError saying what a file
    skinclf cannot classify is (multi-frame, grayscale, no pixel data, too large, undecodable)."""
    ds = _dataset(source, header_only=False)
    if "PixelData" not in ds:
        raise DicomError(f"DICOM object without pixel data ({_kind(ds)}): not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames, {_kind(ds)}): skinclf reads single-frame images only")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 3 or photometric.startswith("MONOCHROME") or photometric == "PALETTE COLOR":
        modality = str(ds.get("Modality", "") or "unknown")
        raise DicomError(f"grayscale DICOM ({photometric or 'no photometric interpretation'}, {samples} sample per "
                         f"pixel, modality {modality}): skinclf reads colour dermoscopic images only")
    height, width = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if width * height > max_pixels:
        raise DicomError(f"image too large ({width}x{height} pixels; the limit is {max_pixels:,})")
    tags = tags_of(ds)
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if "file_meta" in dir(ds) and ds.file_meta else ""
    if syntax == JPEG_BASELINE and photometric != "RGB":
        # The encapsulated bitstream is an ordinary JPEG: decoded by the same decoder, at the same
        # (DCT-reduced) scale as a .jpg file, so it gives that file's pixels exactly.
        from pydicom.encaps import generate_frames

        try:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        except Exception as exc:  # noqa: BLE001
            raise DicomError(f"cannot read the DICOM's encapsulated JPEG ({exc})") from None
        return DicomImage(tags=tags, width=width, height=height, jpeg=bytes(frame))
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - a codec missing or the data corrupt
        reason = " ".join(str(exc).split())[:200]
        name = getattr(ds.file_meta.get("TransferSyntaxUID", None), "name", syntax or "unknown")
        raise DicomError(f"cannot decode DICOM pixel data (transfer syntax {name}): {reason}") from None
    return DicomImage(tags=tags, width=width, height=height, pixels=_rgb8(ds, pixels, photometric, syntax))


def _rgb8(ds, pixels: np.ndarray, photometric: str, syntax: str) -> np.ndarray:
    """Pixels as RGB uint8 (pydicom 3 already converts YBR_FULL / YBR_FULL_422 to RGB), 16 bits scaled."""
    if pixels.dtype != np.uint8:
        bits = int(ds.get("BitsStored", 8) or 8)
        pixels = np.clip(pixels.astype(np.float64) * (255.0 / max(1, 2 ** bits - 1)), 0, 255).round().astype(np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DicomError(f"unexpected DICOM pixel array shape {pixels.shape}")
    return np.ascontiguousarray(pixels)
