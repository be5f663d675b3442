"""Where an image file's header says its voxel data is, format by format, for :mod:`.inputcheck` to measure.

Some ITK readers fill missing voxel data in silently (niftilib zero-fills a short NIfTI/Analyze file, and GIPL, VTK
and BMP read what is there), or fail only after printing to stderr (MetaImage). For those, a ``*_layout`` function
reads the header and returns a :class:`DataLayout`: the file holding the voxels, where they start and how many bytes
the header declares (of the decompressed stream, for a whole-file gzip). NRRD and PNG readers fail on a short read
themselves. TIFF and JPEG hold no single data block: :func:`check_tiff` and :func:`check_jpeg_end` check their
structure instead.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from . import GMSError
from .formats import META_IMAGE_EXTENSIONS

__all__ = ["DataLayout", "find_layout", "open_stream", "check_tiff", "check_jpeg_end"]

GZIP_MAGIC = b"\x1f\x8b"
# NIfTI datatype codes whose stored values niftilib checks (and zeroes when not finite)
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


@dataclass(frozen=True)
class DataLayout:
    """Where a header says its voxel data is: ``file`` from byte ``offset``, ``nbytes`` long, uncompressed (once a
    whole-file gzip stream is decompressed)."""

    file: str
    offset: int
    nbytes: int
    float_dtype: np.dtype | None = None  # set where the reader rewrites non-finite stored values (niftilib)


def open_stream(path: str):
    """(a binary file object for ``path``, decompressing it when it is a gzip stream; whether it is)."""
    with open(path, "rb") as f:
        gz = f.read(2) == GZIP_MAGIC
    return (gzip.open(path, "rb") if gz else open(path, "rb")), gz


def _head(path: str, n: int) -> bytes:
    """The first ``n`` bytes of ``path`` (decompressed), or b"" where they cannot be read (ITK then reports it)."""
    try:
        f, _ = open_stream(path)
        with f:
            return f.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


_NIFTI_NAME = re.compile(r"\.(nii|hdr|img)(\.gz)?$", re.IGNORECASE)


def _nifti_layout(path: str) -> DataLayout | None:
    """NIfTI-1/-2 or Analyze 7.5 (ITK's NiftiImageIO, chosen by extension): single file or .hdr/.img pair."""
    m = _NIFTI_NAME.search(path)
    if m is None:
        return None
    header_path = path
    if m.group(1).lower() == "img":  # a pair named by its image file: the header is the .hdr beside it
        header_path = path[: m.start()] + (".HDR" if m.group(1) == "IMG" else ".hdr") + (m.group(2) or "")
    head = _head(header_path, 540)
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", head[70:74])
            offset = struct.unpack(endian + "f", head[108:112])[0]
            paired = head[344:348] != b"n+1\0"
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "hh", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            paired = head[4:8] != b"n+2\0"
            break
    else:
        return None
    ndim = dims[0] if 1 <= dims[0] <= 7 else 0
    if not ndim or bitpix <= 0 or not math.isfinite(offset):
        return None  # ITK refuses such headers itself
    nbytes = math.prod(max(int(d), 1) for d in dims[1 : ndim + 1]) * int(bitpix) // 8
    data_file = _pair_image(header_path) if paired else header_path
    if data_file is None:
        return None  # no image file: ITK says so
    dtype = _NIFTI_FLOATS.get(int(datatype))
    return DataLayout(data_file, max(int(offset), 0), nbytes, np.dtype(endian + dtype) if dtype else None)


def _pair_image(header_path: str) -> str | None:
    stem = _NIFTI_NAME.sub("", header_path)
    for ext in (".img", ".IMG", ".img.gz", ".IMG.gz"):  # niftilib's search order
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


def _bmp_layout(path: str) -> DataLayout | None:
    """Uncompressed (BI_RGB) BMP: rows of ``bits * width`` bits padded to 4 bytes, from ``bfOffBits``."""
    head = _head(path, 34)
    if len(head) < 34 or head[:2] != b"BM" or struct.unpack("<I", head[14:18])[0] < 40:
        return None
    offset, = struct.unpack("<I", head[10:14])
    width, height, _, bits, compression = struct.unpack("<iiHHI", head[18:34])
    if compression != 0 or width <= 0 or bits <= 0:
        return None  # RLE/bitfield data: ITK's reader decodes (or refuses) it
    return DataLayout(path, offset, (bits * width + 31) // 32 * 4 * abs(height))


_GIPL_MAGICS = (0xEFFFE9B0, 0x2AE389B8)
_GIPL_BYTES = {7: 1, 8: 1, 15: 2, 16: 2, 31: 4, 32: 4, 64: 4, 65: 8}


def _gipl_layout(path: str) -> DataLayout | None:
    """GIPL: a 256-byte big-endian header, then the voxels."""
    head = _head(path, 256)
    if len(head) < 256 or struct.unpack(">I", head[252:256])[0] not in _GIPL_MAGICS:
        return None
    dims = struct.unpack(">4H", head[:8])
    per_voxel = _GIPL_BYTES.get(struct.unpack(">H", head[8:10])[0])
    if per_voxel is None:
        return None
    return DataLayout(path, 256, math.prod(max(d, 1) for d in dims) * per_voxel)


_META_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_FLOAT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_DOUBLE": 8}


def _meta_layout(path: str) -> DataLayout | None:
    """MetaImage (.mha/.mhd) with binary data, local or in one named file. MetaIO fails on a short read too, but
    only after printing its own lines to stderr and with a misleading reason; this says it in one line first."""
    if not path.lower().endswith(META_IMAGE_EXTENSIONS):
        return None
    head = _head(path, 1 << 16)
    fields: dict[str, str] = {}
    offset = 0
    for line in head.split(b"\n"):
        offset += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return None
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return None
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        per_voxel = _META_BYTES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        return None
    if fields.get("BinaryData", "True") != "True" or "HeaderSize" in fields or any(d < 0 for d in dims):
        return None
    nbytes = math.prod(dims) * per_voxel
    if fields.get("CompressedData", "False") == "True":
        if "CompressedDataSize" not in fields or not fields["CompressedDataSize"].isdigit():
            return None
        nbytes = int(fields["CompressedDataSize"])
    name = fields["ElementDataFile"]
    if name == "LOCAL":
        return DataLayout(path, offset, nbytes)
    if name.split()[0] in ("LIST",) or "%" in name or len(name.split()) != 1:
        return None
    return DataLayout(os.path.join(os.path.dirname(path), name), 0, nbytes)


_VTK_BYTES = {"unsigned_char": 1, "char": 1, "unsigned_short": 2, "short": 2, "unsigned_int": 4, "int": 4,
              "float": 4, "double": 8}


def _vtk_layout(path: str) -> DataLayout | None:
    """Legacy VTK structured points, binary: the header's text lines, then POINT_DATA's values."""
    head = _head(path, 1 << 16)
    if not head.startswith(b"# vtk DataFile"):
        return None
    lines = head.split(b"\n")
    if len(lines) < 3 or lines[2].strip().upper() != b"BINARY":
        return None
    offset, points, per_point = 0, None, None
    for line in lines:
        offset += len(line) + 1
        words = line.decode("latin-1").split()
        key = words[0].upper() if words else ""
        if key == "POINT_DATA" and len(words) == 2 and words[1].isdigit():
            points = int(words[1])
        elif key in ("SCALARS", "VECTORS") and len(words) >= 3 and words[2] in _VTK_BYTES:
            ncomp = int(words[3]) if key == "SCALARS" and len(words) > 3 and words[3].isdigit() else 1
            per_point = _VTK_BYTES[words[2]] * (3 if key == "VECTORS" else ncomp)
            if key == "VECTORS":
                break
        elif key == "COLOR_SCALARS" and len(words) == 3 and words[2].isdigit():
            per_point = int(words[2])
            break
        elif key == "LOOKUP_TABLE" and per_point is not None:
            break
    else:
        return None
    if points is None or per_point is None:
        return None
    return DataLayout(path, offset, points * per_point)


#: formats whose reader fills missing voxel data in instead of failing (or fails noisily), and where their headers
#: say the data is. The NRRD and PNG readers fail on a short read themselves; TIFF is compressed per strip.
LAYOUTS = (_nifti_layout, _meta_layout, _bmp_layout, _gipl_layout, _vtk_layout)


def check_jpeg_end(path: str) -> None:
    """libjpeg only warns about a truncated scan (and ITK fills the rest with grey): a JPEG must have its
    end-of-image marker after its last start-of-scan (an EXIF thumbnail's markers come before both)."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return
        data = f.read()
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise GMSError(f"{path}: the file is truncated: the JPEG data ends before its end-of-image marker")


def check_tiff(path: str) -> None:
    """libtiff stops at a page directory it cannot read and ITK returns the pages before it: every directory of a
    (classic) TIFF, and every strip or tile it points to, must lie inside the file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] not in (b"II*\0", b"MM\0*"):
            return
        e = "<" if head[:2] == b"II" else ">"
        size = os.path.getsize(path)
        ifd, page, seen = struct.unpack(e + "I", head[4:8])[0], 0, set()
        while ifd and ifd not in seen:
            seen.add(ifd)
            page += 1
            f.seek(ifd)
            raw = f.read(2)
            n = struct.unpack(e + "H", raw)[0] if len(raw) == 2 else 0
            entries = f.read(12 * n + 4)
            if len(raw) < 2 or len(entries) < 12 * n + 4:
                raise GMSError(f"{path}: the file is truncated: page {page}'s directory is cut off")
            tags = {}
            for i in range(n):
                tag, kind, count, value = struct.unpack(e + "HHI4s", entries[12 * i : 12 * i + 12])
                tags[tag] = (kind, count, value)
            offsets = _tiff_values(f, e, tags.get(273) or tags.get(324))  # StripOffsets / TileOffsets
            counts = _tiff_values(f, e, tags.get(279) or tags.get(325))  # StripByteCounts / TileByteCounts
            end = max((o + c for o, c in zip(offsets or (), counts or ())), default=0)
            if offsets is None or counts is None or end > size:
                raise GMSError(f"{path}: the file is truncated: page {page}'s image data ends at byte {end:,}, "
                               f"the file holds {size:,}")
            ifd = struct.unpack(e + "I", entries[-4:])[0]


def _tiff_values(f, e: str, entry) -> list[int] | None:
    """The SHORT/LONG values of a TIFF directory entry (inline or at its offset); None where they are cut off."""
    if entry is None:
        return []
    kind, count, value = entry
    width = {3: 2, 4: 4}.get(kind)
    if width is None:
        return []
    raw = value[: count * width] if count * width <= 4 else None
    if raw is None:
        f.seek(struct.unpack(e + "I", value)[0])
        raw = f.read(count * width)
        if len(raw) < count * width:
            return None
    return list(struct.unpack(f"{e}{count}{'H' if width == 2 else 'I'}", raw))


def find_layout(path: str) -> DataLayout | None:
    """The data layout ``path``'s header declares, for the formats in :data:`LAYOUTS`; None for any other."""
    return next((lay for lay in (parse(path) for parse in LAYOUTS) if lay is not None), None)
