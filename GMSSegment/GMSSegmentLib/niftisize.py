"""Whether a NIfTI file holds all the voxel bytes its header declares.

ITK's NIfTI reader fills a short file's missing voxels with zeros without an error (a ``.nii`` cut short, or a
``.nii.gz`` whose gzip stream ends early), unlike its NRRD and MetaImage readers. :func:`nifti_shortfall` finds that,
for NIfTI-1 and NIfTI-2 single files (``.nii``, ``.nii.gz``), from the header and the length of the (decompressed)
file; it reads only the header for ``.nii`` and streams a ``.nii.gz`` once without keeping it.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

__all__ = ["nifti_shortfall"]

_CHUNK = 1 << 20


def _declared_end(header: bytes) -> int | None:
    """The byte offset where the voxel data of this NIfTI-1/2 header ends, or None when it is not such a header."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dim = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dim = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    rank = dim[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or any(d < 0 for d in dim[1:rank + 1]):
        return None
    count = 1
    for d in dim[1:rank + 1]:
        count *= max(int(d), 1)
    return max(offset, 348) + count * bitpix // 8


def nifti_shortfall(path: str | os.PathLike) -> str | None:
    """None when ``path`` (``.nii`` / ``.nii.gz``) holds every byte its header declares, else a short reason, e.g.
    ``"the file ends 4096 bytes before the end of the data its header declares"``. Not a NIfTI header: None (the
    image reader reports that). ``OSError`` of reading passes."""
    p = os.fspath(path)
    if p.lower().endswith(".gz"):
        try:
            with gzip.open(p, "rb") as f:
                header = f.read(540)
                end = _declared_end(header)
                if end is None:
                    return None
                size = len(header)
                while size < end:
                    chunk = f.read(min(_CHUNK, end - size))
                    if not chunk:
                        break
                    size += len(chunk)
                while f.read(_CHUNK):  # to the end of the stream: gzip checks its length and CRC there
                    pass
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            return f"the compressed data is cut short or damaged ({' '.join(str(e).split()) or type(e).__name__})"
    else:
        with open(p, "rb") as f:
            end = _declared_end(f.read(540))
            size = os.fstat(f.fileno()).st_size
        if end is None:
            return None
    if size < end:
        return f"the file ends {end - size} bytes before the end of the data its header declares"
    return None
