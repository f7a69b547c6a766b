"""Building DICOM files for the tests (pydicom): VL Photographic Images from JPEGs, with PHI set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-93817", "PatientBirthDate": "19790412",
       "AccessionNumber": "ACC-55201", "InstitutionName": "St Example Dermatology"}
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"


def dataset(rows: int, cols: int, *, tags: dict | None = None, phi: bool = True, syntax: str | None = None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = VL_PHOTO
    ds.SOPClassUID = VL_PHOTO
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "XC", "20260101", "120000", "1", 1, 1
    ds.ReferringPhysicianName, ds.Manufacturer = "", "test"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "", "", ""
    ds.PatientSex = ""
    ds.AccessionNumber = ""
    for key, value in (PHI if phi else {}).items():
        setattr(ds, key, value)
    for key, value in (tags or {}).items():
        if key == "region":
            from pydicom.dataset import Dataset as Item

            item = Item()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "123037004", "SCT", value
            ds.AnatomicRegionSequence = [item]
        else:
            setattr(ds, key, value)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 3, 8, 8, 7, 0
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    return ds


def uncompressed(pixels: np.ndarray, path: Path, **kw) -> Path:
    ds = dataset(*pixels.shape[:2], **kw)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def encapsulated_jpeg(jpeg: Path, path: Path, **kw) -> Path:
    """The JPEG file's own bytes as JPEG baseline pixel data (YBR_FULL_422, as JPEG stores it)."""
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    with Image.open(jpeg) as im:
        cols, rows = im.size
    ds = dataset(rows, cols, syntax=JPEGBaseline8Bit, **kw)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([Path(jpeg).read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.save_as(path, enforce_file_format=True)
    return path


def grayscale(path: Path, *, frames: int = 1) -> Path:
    ds = dataset(16, 16)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Modality = 1, "MONOCHROME2", "CT"
    del ds.PlanarConfiguration
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.zeros((frames, 16, 16), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def multiframe(path: Path) -> Path:
    ds = dataset(16, 16)
    ds.NumberOfFrames = 2
    ds.PixelData = np.zeros((2, 16, 16, 3), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def no_pixels(path: Path) -> Path:
    ds = dataset(16, 16)
    for key in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "PlanarConfiguration", "PhotometricInterpretation"):
        delattr(ds, key)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.save_as(path, enforce_file_format=True)
    return path
