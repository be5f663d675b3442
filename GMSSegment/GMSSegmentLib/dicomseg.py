"""DICOM output: a result written as a DICOM Segmentation (SEG) object with **highdicom**, referencing the series it
was computed from, for PACS and any viewer that reads SEG (Slicer's DICOM module, OHIF).

- BINARY segmentation (what Slicer's and dcmqi's tools read and write; FRACTIONAL is not read by common viewers), one
  segment per model segment, numbered 1..n in the card's order, with the card's coded terminology (SNOMED CT category
  and type, see :func:`segment_codes`), algorithm type AUTOMATIC and the algorithm's identification: GMS, the model's
  name and version, and the SHA-256 of its weights.
- References: the source series' study, series and SOP instance UIDs and frame of reference, and the patient and
  study attributes (highdicom copies them from the source images).
- Frames: the empty frames of each segment are left out. When nothing at all was found, highdicom keeps every frame
  (empty), as the standard allows: a valid SEG that says "nothing here" for each segment.
- Written atomically like every output (atomicfile.py): read back before it replaces anything.

highdicom is an optional dependency (``pip install highdicom``, or ``gmssegment[dicom]``); without it a ``.dcm``
output is refused with one line before any model loads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import GMSError, __version__
from .atomicfile import atomic_write
from .terminology import segment_codes

def highdicom_problem() -> str | None:
    """Why a DICOM SEG cannot be written here (highdicom missing), or None."""
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("highdicom", "pydicom")):
        return "writing a DICOM SEG (.dcm) needs highdicom: pip install highdicom (or gmssegment[dicom])"
    return None


def weights_sha256(model_dir) -> str:
    from .weights import sha256_file

    path = Path(model_dir) / "model.safetensors"
    return sha256_file(path) if path.is_file() else ""


def write_seg(path, labels: np.ndarray, dicom_files, segments, card, model_dir=None, overwrite: bool = False) -> str:
    """Write ``labels`` (Z, Y, X; slice k computed from ``dicom_files[k]``) as a DICOM SEG at ``path``; returns the
    path. ``segments``: the card's segments (name, label, terminology). GMSError (one line) when highdicom is missing,
    the labels do not match the source, or the write fails."""
    problem = highdicom_problem()
    if problem:
        raise GMSError(problem)
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    dest = str(path)
    if not dicom_files:
        raise GMSError(f"cannot write {dest}: a DICOM SEG needs a DICOM input (a series folder or a .dcm file)")
    try:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_files]
    except Exception as e:  # pydicom's errors have no common base
        raise GMSError(f"cannot write {dest}: the source DICOM files cannot be read again: {e}") from e
    frames = sum(int(getattr(s, "NumberOfFrames", 1) or 1) for s in sources)
    if labels.shape[0] != frames:
        raise GMSError(f"cannot write {dest}: {labels.shape[0]} result slices for {frames} source frames")
    numbered = np.zeros(labels.shape, np.uint8)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"GMS {card.name or 'model'}", version=str(card.version or __version__),
        family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"), source="GMSSegment",
        parameters={"weights_sha256": weights_sha256(model_dir) if model_dir else "", "engine": __version__})
    for k, s in enumerate(segments, start=1):
        numbered[labels == s.label] = k
        codes = segment_codes(s)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=str(s.name),
            segmented_property_category=_concept(hd, codes["category"]),
            segmented_property_type=_concept(hd, codes["type"]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
    pixel = numbered[0] if frames == 1 else numbered  # (frames, rows, columns), or one frame's (rows, columns)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=_series_number(sources),
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="GMSSegment",
            manufacturer_model_name=f"GMSSegment {card.name or ''}".strip(), software_versions=__version__,
            device_serial_number="none", series_description=f"GMS {card.name or ''}".strip()[:64],
            content_label="GMS", omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError) as e:  # a source that highdicom cannot reference
        raise GMSError(f"cannot write {dest}: the DICOM SEG cannot reference this series: {e}") from e

    def verify(tmp: str) -> None:
        back = pydicom.dcmread(tmp, stop_before_pixels=True)
        if back.SOPInstanceUID != seg.SOPInstanceUID:
            raise GMSError(f"cannot write {dest}: the file read back is not the SEG written")
    atomic_write(dest, lambda tmp: seg.save_as(tmp), overwrite=overwrite, verify=verify)
    return dest


def _concept(hd, code):
    scheme, value, meaning = (str(x) for x in code)
    return hd.sr.CodedConcept(value, scheme, meaning)


def _series_number(sources) -> int:
    """The source's series number plus 1000 (a derived series, kept apart from the scanner's numbers)."""
    try:
        return int(sources[0].SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000
