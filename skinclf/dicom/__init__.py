"""DICOM: read dermoscopic DICOM images (pixels, SOP Instance UID, age/sex/site), write Structured Reports, listen.

Imports only the ground floor (it sits below `data`, which decodes DICOM through `read`), and pydicom,
highdicom and pynetdicom only inside functions (the optional `dicom` extra). Entry points:
`read.is_dicom`, `read.read_dicom`, `read.read_tags`, `sr.write_sr`, `listen.Listener`.
"""

from __future__ import annotations

EXTRA_HINT = 'pip install "skinclf[dicom]"'


def missing_extra(what: str = "reading DICOM files") -> str:
    """The message for a DICOM feature used without the `dicom` extra installed."""
    return f"{what} needs the optional dicom extra: {EXTRA_HINT}"
