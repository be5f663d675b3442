"""File formats by extension, in one place: what the engine reads, what it writes, and how outputs are named.

Plain data and small helpers (no imports of the engine or of SimpleITK), used by the command line (``cli``), the data
sets (``data``), reading (``imageio``), writing (``labelwrite``) and the input checks (``datalayout``). Extensions are
lower case with their leading dot; matching a path is case-insensitive.
"""
from __future__ import annotations

import os
from pathlib import PurePath

#: 2D image files, in the order a data set's ``images/<name>.<ext>`` is looked for
IMAGE_2D_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: volume files, in the order a 3D data set's ``imagesTr/<case>.<ext>`` and ``labelsTr/<case>.<ext>`` are looked for
VOLUME_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")

#: 3D Slicer segmentation (a labelmap NRRD with Slicer's header fields); read as a volume, written with its segments
SEGMENTATION_EXTENSION = ".seg.nrrd"

#: DICOM: a file (``gms segment`` also reads a folder of one or more series, see dicomio.py); as an output, a DICOM
#: Segmentation (SEG) object that references the source series (dicomseg.py)
DICOM_EXTENSION = ".dcm"

#: the files ``gms segment`` reads: 2D images, volumes, 3D Slicer segmentations and DICOM files (and series folders)
INPUT_EXTENSIONS: tuple[str, ...] = VOLUME_EXTENSIONS + (SEGMENTATION_EXTENSION,) + IMAGE_2D_EXTENSIONS + (
    DICOM_EXTENSION,)

#: label map outputs (longest first: ``.seg.nrrd`` before ``.nrrd``)
OUTPUT_EXTENSIONS: tuple[str, ...] = (SEGMENTATION_EXTENSION, ".nii.gz", ".nrrd", ".nii", ".mha", ".png",
                                      DICOM_EXTENSION)

#: outputs written with compression
COMPRESSED_OUTPUT_EXTENSIONS: tuple[str, ...] = (".nrrd", SEGMENTATION_EXTENSION, ".mha", ".nii.gz")

#: the output of a 2D image input (outputs named automatically; also the only output that needs a 2D image)
OUTPUT_FOR_2D = ".png"

#: the output of any other input (outputs named automatically)
OUTPUT_FOR_VOLUME = SEGMENTATION_EXTENSION

#: MetaImage files (a header with the data in it, or beside it)
META_IMAGE_EXTENSIONS: tuple[str, ...] = (".mha", ".mhd")


def _by_length(extensions) -> list[str]:
    return sorted(extensions, key=len, reverse=True)


def known_extension(path: str | os.PathLike, extensions=INPUT_EXTENSIONS) -> str | None:
    """The longest of ``extensions`` that the file name of ``path`` ends with (case-insensitive), or None."""
    low = PurePath(os.fspath(path)).name.lower()
    for ext in _by_length(extensions):
        if low.endswith(ext):
            return ext
    return None


def split_extension(path: str | os.PathLike, extensions=INPUT_EXTENSIONS) -> tuple[str, str]:
    """The file name of ``path`` as (stem, extension): a known extension (of ``extensions``, lower case) whole, so
    ``a.nii.gz`` is ("a", ".nii.gz"); else the last suffix as it is spelled (``a.b.gif`` is ("a.b", ".gif"))."""
    p = PurePath(os.fspath(path))
    ext = known_extension(p, extensions)
    if ext is not None:
        return p.name[: -len(ext)], ext
    return p.stem, p.suffix


def is_2d_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a 2D image file (PNG, JPEG, BMP, TIFF) by its extension."""
    return known_extension(path) in IMAGE_2D_EXTENSIONS


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM input: a folder (of series) or a ``.dcm`` file."""
    return os.path.isdir(os.fspath(path)) or known_extension(path) == DICOM_EXTENSION


def default_output_extension(input_path: str | os.PathLike) -> str:
    """The output format of an input when no other is asked for: PNG for a 2D image, a DICOM SEG for DICOM, else a 3D
    Slicer segmentation."""
    if is_dicom(input_path):
        return DICOM_EXTENSION
    return OUTPUT_FOR_2D if is_2d_image(input_path) else OUTPUT_FOR_VOLUME


def output_extension(path: str | os.PathLike) -> str | None:
    """The output format of ``path`` (one of :data:`OUTPUT_EXTENSIONS`), or None. The name must be longer than the
    extension (``.png`` alone has none)."""
    low = os.fspath(path).lower()
    for ext in OUTPUT_EXTENSIONS:
        if low.endswith(ext) and len(os.path.basename(low)) > len(ext):
            return ext
    return None
