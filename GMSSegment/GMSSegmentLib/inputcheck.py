"""Checks around SimpleITK's decoding of an image file: a damaged file is an error, never a silently wrong image.

:func:`read_verified` is the one way the engine turns a file into a ``sitk.Image`` (``read_image`` and training's
volume reading call it). Before any pixel buffer is allocated it checks, from the header only:

* **memory**: the buffer the header declares, plus the float32 copy ``read_image`` makes, must fit in the memory
  available now (a small file declaring a huge volume is refused before anything is allocated);
* **stored data**: a whole-file gzip stream (``.nii.gz``, ``.gipl.gz``, ...) must be complete and intact (CRC and
  length), and a file whose reader would fill missing data in silently must hold every byte of voxel data its
  header declares (:mod:`.datalayout` says where: NIfTI-1/-2 and Analyze, MetaImage, uncompressed BMP, GIPL, binary
  VTK; TIFF's and JPEG's structure is checked there too), gzip'd ones also bounded by deflate's largest
  compression ratio before anything is decompressed. ITK's NIfTI reader (niftilib's ``nifti_read_buffer``) fills
  missing bytes with zeros and reports success; the NRRD and PNG readers fail on a short read themselves;
* **finite values**: no NaN or Inf voxels. niftilib replaces non-finite floats with 0 while decoding, so for NIfTI
  the stored floats are checked while the stream is verified; every other format is checked on the decoded image.

Each problem raises :class:`GMSError` with one line naming the file. SimpleITK's own errors (``RuntimeError``)
propagate for the caller to word.
"""
from __future__ import annotations

import math
import os
import re
import sys
import zlib

import numpy as np
import SimpleITK as sitk

from . import GMSError
from .datalayout import DataLayout, check_jpeg_end, check_tiff, find_layout, open_stream

__all__ = ["read_verified", "check_stored_data", "available_memory"]

#: deflate cannot expand data by more than ~1032:1; a gzip file smaller than declared/this cannot hold the data
MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 23  # 8 MiB, a multiple of every float size


def read_verified(path: str) -> sitk.Image:
    """``sitk.ReadImage(path)`` after the checks above; raises :class:`GMSError` for each problem found."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        check_stored_data(path)  # a damaged stream (e.g. a bad gzip CRC) explains ITK's failure better
        raise
    _check_memory(path, reader)
    check_stored_data(path)
    img = reader.Execute()
    _check_finite(path, sitk.GetArrayViewFromImage(img))
    return img


# ----------------------------------------------------------------------------------------------------------- memory


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux: MemAvailable), or None where it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform == "win32":
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        status = _Status()
        status.dwLength = ctypes.sizeof(_Status)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.ullAvailPhys)
        return None
    try:  # macOS and other POSIX systems: physical memory (an upper bound; nothing better without psutil)
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _component_bytes(pixel_id: int) -> int:
    """Bytes per pixel component of a SimpleITK pixel type (from its description, e.g. 'vector of 16-bit ...')."""
    text = sitk.GetPixelIDValueAsString(pixel_id)
    m = re.search(r"(\d+)-bit", text)
    bits = int(m.group(1)) if m else 64
    return bits // 8 * (2 if "complex" in text else 1)


def _check_memory(path: str, reader: sitk.ImageFileReader) -> None:
    size = tuple(int(s) for s in reader.GetSize())
    voxels = math.prod(size)
    ncomp = int(reader.GetNumberOfComponents())
    need = voxels * ncomp * _component_bytes(reader.GetPixelID()) + voxels * min(ncomp, 3) * 4  # + float32 copy
    avail = available_memory()
    if avail is not None and need > avail:
        shape = "x".join(map(str, size))
        raise GMSError(f"{path}: reading this {shape} image needs {_gb(need)} of memory, more than the "
                       f"{_gb(avail)} available")


def _gb(n: int) -> str:
    return f"{n / 2**30:,.1f} GB"


# ------------------------------------------------------------------------------------------------------ stored data


def check_stored_data(path: str) -> None:
    """Raises :class:`GMSError` where ``path`` (or the data file its header names) holds less voxel data than its
    header declares, or a gzip stream in it is truncated or damaged, or a NIfTI file stores NaN/Inf floats."""
    check_jpeg_end(path)
    check_tiff(path)
    layout = find_layout(path)
    if layout is not None and not os.path.isfile(layout.file):
        return  # ITK says the data file is missing
    files = {path} | ({layout.file} if layout else set())
    for file in sorted(files):
        _check_stream(path, file, layout if layout and layout.file == file else None)


def _check_stream(path: str, file: str, layout: DataLayout | None) -> None:
    """Reads ``file`` through (decompressing a gzip stream, whose CRC and length are then checked), counting the
    voxel bytes ``layout`` declares and checking declared floats are finite. An uncompressed file without floats
    to check is only measured."""
    f, gz = open_stream(file)
    with f:
        if not gz and (layout is None or layout.float_dtype is None):
            if layout is not None:
                _check_count(path, layout, os.path.getsize(file) - layout.offset)
            return
        if gz and layout is not None and layout.offset + layout.nbytes > MAX_DEFLATE_RATIO * os.path.getsize(file):
            raise GMSError(f"{path}: the file cannot hold the image its header declares: {layout.nbytes:,} bytes "
                           f"of voxel data in a {os.path.getsize(file):,}-byte compressed file")
        try:
            present, bad = _read_through(f, layout)
        except (EOFError, OSError, zlib.error) as e:
            why = " ".join(str(e).split()) or type(e).__name__
            raise GMSError(f"{path}: the compressed data is truncated or damaged ({why})") from None
    if layout is not None:
        _check_count(path, layout, present)
    if bad:
        raise GMSError(f"{path}: the image contains {bad} NaN or Inf values")


def _read_through(f, layout: DataLayout | None) -> tuple[int, int]:
    """(voxel bytes present, non-finite values among them), reading ``f`` to its end."""
    skip = layout.offset if layout else 0
    want = layout.nbytes if layout else 0
    dtype = layout.float_dtype if layout else None
    present = bad = 0
    carry = b""
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        if skip:
            n = min(skip, len(chunk))
            chunk, skip = chunk[n:], skip - n
        take = chunk[: max(want - present, 0)]
        present += len(take)
        if dtype is not None and take:
            take = carry + take
            usable = len(take) - len(take) % dtype.itemsize
            values = np.frombuffer(take, dtype=dtype, count=usable // dtype.itemsize)
            if not np.isfinite(values).all():
                bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            carry = take[usable:]
    return present, bad


def _check_count(path: str, layout: DataLayout, present: int) -> None:
    if present < layout.nbytes:
        where = "the file" if layout.file == path else os.path.basename(layout.file)
        raise GMSError(f"{path}: the file is truncated: its header declares {layout.nbytes:,} bytes of voxel data, "
                       f"{where} holds {max(present, 0):,}")


# ---------------------------------------------------------------------------------------------------------- values


def _check_finite(path: str, raw: np.ndarray) -> None:
    if raw.dtype.kind in "fc" and not np.isfinite(raw).all():
        n_bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        raise GMSError(f"{path}: the image contains {n_bad} NaN or Inf values")
