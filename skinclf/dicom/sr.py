"""A DICOM Comprehensive SR (highdicom) per classified DICOM image: the model's answer, stored where a PACS can file it.

The report (TID 1500 Measurement Report) references the source instance (study, series, SOP
Instance UIDs) in its image library and its measurement group, holds the top-k classes as coded
findings (a probability each, UCUM unit "1", in skinclf's own coding scheme 99SKINCLF), names the
model and its SHA-256 as the algorithm identification, and carries the row's warnings and the
words "decision support, not a diagnosis" as text. It copies the source's patient and study
modules, as DICOM requires for the PACS to file it with the study: it is written only where the
user points `--sr`, never in the CSV or the logs. Files are written atomically and never replace
an existing file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from skinclf.dicom import missing_extra

SCHEME = "99SKINCLF"
DISCLAIMER_TEXT = "decision support, not a diagnosis"
MANUFACTURER = "skinclf"


class SRError(Exception):
    """The SR could not be written; the message is one line."""


@dataclass(frozen=True)
class Finding:
    """One of the top-k classes: its code (the class abbreviation), meaning and probability."""

    code: str
    meaning: str
    probability: float


def sr_name(sop_instance_uid: str) -> str:
    """The SR's file name for a source instance: one per source, so a rerun never duplicates it."""
    return f"SR_{sop_instance_uid}.dcm"


def _modules():
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise SRError(missing_extra("--sr")) from None
    return hd, pydicom, codes


def build_sr(source, findings: Sequence[Finding], *, model_name: str, model_sha256: str, version: str,
             warnings: Sequence[str] = ()):
    """The SR dataset for the pydicom dataset `source` (read with its pixels or without)."""
    hd, pydicom, codes = _modules()
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TextContentItem,
        TrackingIdentifier,
        DeviceObserverIdentifyingAttributes,
    )

    algorithm = AlgorithmIdentification(name=model_name[:64] or "skinclf", version=model_sha256[:64] or "unknown",
                                        parameters=[f"skinclf {version}"[:64]])
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=pydicom.uid.generate_uid(), name=f"skinclf {version}"[:64], manufacturer_name=MANUFACTURER,
            model_name=model_name[:64] or "skinclf"))
    probability = CodedConcept("1", "UCUM", "no units")
    measurements = [
        Measurement(name=CodedConcept(f.code[:16], SCHEME, f"Probability of {f.meaning}"[:64]), value=f.probability,
                    unit=probability, algorithm_id=algorithm)
        for f in findings
    ]
    top = findings[0]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=pydicom.uid.generate_uid(), identifier="skinclf classification"),
        algorithm_id=algorithm,
        finding_type=CodedConcept("LESION", SCHEME, "Skin lesion (dermoscopy)"),
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(name=codes.DCM.Finding,
                                                       value=CodedConcept(top.code[:16], SCHEME, top.meaning[:64]))],
        source_images=[SourceImageForMeasurementGroup(referenced_sop_class_uid=source.SOPClassUID,
                                                      referenced_sop_instance_uid=source.SOPInstanceUID)],
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=CodedConcept("DERMOSCOPY", SCHEME, "Dermoscopy image classification"),
        imaging_measurements=[group],
        referenced_images=[source],
    )
    comment = CodedConcept("121106", "DCM", "Comment")
    for text in [DISCLAIMER_TEXT, *(f"warning: {w}" for w in warnings)]:
        report[0].ContentSequence.append(TextContentItem(name=comment, value=text[:1024], relationship_type="CONTAINS"))
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=pydicom.uid.generate_uid(), series_number=900,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False)


def write_sr(source: Path | str | BinaryIO | bytes, out_dir: Path, findings: Sequence[Finding], *, model_name: str,
             model_sha256: str, version: str, warnings: Sequence[str] = ()) -> Path:
    """Write the SR for the DICOM file `source` into `out_dir` (created if needed); returns its path.
    Raises SRError, writing nothing, when one exists there already or it cannot be built."""
    hd, pydicom, _ = _modules()
    import io

    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001
        raise SRError(f"cannot read the source DICOM ({' '.join(str(exc).split())[:160]})") from None
    target = Path(out_dir) / sr_name(str(ds.SOPInstanceUID))
    if target.exists():
        raise SRError(f"{target.name} exists in {out_dir}: not replaced")
    try:
        sr = build_sr(ds, findings, model_name=model_name, model_sha256=model_sha256, version=version,
                      warnings=warnings)
    except SRError:
        raise
    except Exception as exc:  # noqa: BLE001 - a source highdicom refuses (missing study attributes, ...)
        raise SRError(f"cannot build the SR: {' '.join(str(exc).split())[:200]}") from None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sr.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        sr.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)  # fails if the target exists: never over an existing file
        except FileExistsError:
            raise SRError(f"{target.name} exists in {out_dir}: not replaced") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target

