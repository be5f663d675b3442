"""Real DICOM files for the tests, written with pydicom from real data: an MR series from a hippocampus volume (one
file per slice, with its geometry: Image Position/Orientation Patient, Pixel Spacing, Slice Thickness) and an
ultrasound image from a BUSI PNG (one RGB frame, no frame of reference, as ultrasound scanners write them)."""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk

pydicom = __import__("pytest").importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, UltrasoundImageStorage, generate_uid  # noqa: E402


def _dataset(path: Path, sop_class: str, study: str, series: str, number: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Hippocampus", "GMS-TEST-1", "19700101", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = datetime.date(2026, 12, 6).strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "A1", "", "1"
    ds.SeriesNumber, ds.InstanceNumber = number, 1
    ds.Manufacturer = "GMSSegment tests"
    return ds


def write_mr_series(volume: Path, folder: Path, series_number: int = 3, study: str | None = None,
                    reverse_files: bool = True) -> dict:
    """One MR Image Storage file per slice of ``volume`` (a NIfTI), int16 with its LPS geometry; the files are named
    in reverse slice order (the reader must sort by position, not by name). Returns the UIDs and the volume read by
    SimpleITK from the NIfTI (the reference grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.ReadImage(str(volume))
    arr = sitk.GetArrayFromImage(img).astype(np.int16)  # (Z, Y, X)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    study = study or generate_uid()
    series, frame = generate_uid(), generate_uid()
    n = arr.shape[0]
    for k in range(n):
        name = folder / f"IM{(n - 1 - k) if reverse_files else k:04d}.dcm"
        ds = _dataset(name, MRImageStorage, study, series, series_number)
        ds.Modality, ds.FrameOfReferenceUID, ds.InstanceNumber = "MR", frame, k + 1
        ds.ImagePositionPatient = [float(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(v) for v in list(direction[:, 0]) + list(direction[:, 1])]
        sx, sy, sz = img.GetSpacing()
        ds.PixelSpacing, ds.SliceThickness = [float(sy), float(sx)], float(sz)
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(arr[k]).tobytes()
        ds.save_as(str(name), enforce_file_format=True)
    return {"study": study, "series": series, "frame": frame, "slices": n}


def write_us_image(png: Path, path: Path) -> dict:
    """A BUSI PNG as one Ultrasound Image Storage file (RGB, 8 bit, no frame of reference)."""
    rgb = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(png).convert("RGB"))
    study, series = generate_uid(), generate_uid()
    ds = _dataset(path, UltrasoundImageStorage, study, series, 1)
    ds.Modality = "US"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return {"study": study, "series": series, "sop": ds.SOPInstanceUID}
