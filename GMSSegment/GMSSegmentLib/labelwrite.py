"""Writing label maps (:func:`write_labels`): ``.nrrd``, ``.nii.gz``, ``.nii``, ``.mha``, ``.png`` (2D only) and
``.seg.nrrd`` (3D Slicer segmentation), on the input's exact geometry, atomically (:mod:`.atomicfile`).

Re-exported by :mod:`.imageio`, so ``from GMSSegmentLib.imageio import write_labels`` keeps working.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import SimpleITK as sitk

from . import GMSError
from .atomicfile import atomic_output, write_failed
from .errortext import sitk_reason
from .formats import COMPRESSED_OUTPUT_EXTENSIONS, OUTPUT_EXTENSIONS, output_extension
from .inputcheck import check_stored_data

if TYPE_CHECKING:
    from .imageio import Geometry

__all__ = ["write_labels", "write_map", "write_image", "output_format", "SUPPORTED_OUTPUT_EXTENSIONS", "DEFAULT_SEGMENT_COLORS"]

#: output extensions understood by :func:`write_labels` (the registry's, :data:`.formats.OUTPUT_EXTENSIONS`)
SUPPORTED_OUTPUT_EXTENSIONS: tuple[str, ...] = OUTPUT_EXTENSIONS

#: colours (r, g, b in 0..1) given to segments that have none, by label value 1, 2, ... (cycled)
DEFAULT_SEGMENT_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.945, 0.839, 0.569),  # yellow
    (0.502, 0.682, 0.502),  # green
    (0.694, 0.478, 0.396),  # brown
    (0.435, 0.722, 0.824),  # blue
    (0.847, 0.396, 0.310),  # red
    (0.867, 0.510, 0.396),  # orange
    (0.565, 0.933, 0.565),  # light green
    (0.753, 0.408, 0.690),  # purple
    (0.863, 0.961, 0.078),  # lime
    (0.306, 0.247, 0.000),  # dark olive
)


def output_format(path: str | os.PathLike) -> str:
    """The output extension of ``path`` (one of :data:`SUPPORTED_OUTPUT_EXTENSIONS`), or :class:`GMSError`."""
    ext = output_extension(path)
    if ext is not None:
        return ext
    raise GMSError(
        f"unsupported output file type: {os.fspath(path)} (supported: {', '.join(SUPPORTED_OUTPUT_EXTENSIONS)})"
    )


def _label_dtype(max_label: int) -> type:
    if max_label <= np.iinfo(np.uint8).max:
        return np.uint8
    if max_label <= np.iinfo(np.uint16).max:
        return np.uint16
    if max_label <= np.iinfo(np.int32).max:
        return np.int32
    raise ValueError(f"label value {max_label} is too large")


def _check_labels(labels: Any, geometry: Geometry) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer or boolean array, got dtype {arr.dtype}")
    expected = geometry.shape_zyx
    if geometry.dimension == 2 and arr.ndim == 2:
        arr = arr[np.newaxis]
    if tuple(arr.shape) != expected:
        raise ValueError(f"labels of shape {tuple(arr.shape)} do not match the geometry (expected (Z, Y, X) = {expected})")
    if arr.size and int(arr.min()) < 0:
        raise ValueError("labels must not be negative")
    return arr


def _format_color(color: Sequence[float]) -> str:
    c = [float(v) for v in color]
    if len(c) != 3 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in c):
        raise ValueError(f"segment colour must be three numbers in 0..1, got {list(color)!r}")
    return " ".join(f"{v:.6g}" for v in c)


def _header_text(value: Any) -> str:
    """A value safe to put on one NRRD header line."""
    return " ".join(str(value).replace("\x00", " ").split())


def _normalise_segments(arr: np.ndarray, segments: Sequence[dict] | None) -> list[dict]:
    present = [int(v) for v in np.unique(arr) if v != 0]
    out: list[dict] = []
    seen_labels: set[int] = set()
    seen_ids: set[str] = set()
    for seg in segments or []:
        label = int(seg["label"])
        if label <= 0:
            raise ValueError(f"segment label values must be positive, got {label}")
        if label in seen_labels:
            raise ValueError(f"two segments share the label value {label}")
        seen_labels.add(label)
        name = _header_text(seg.get("name") or "")
        color = seg.get("color")
        sid = _header_text(seg.get("id") or f"Segment_{label}")
        if sid in seen_ids:
            raise ValueError(f"two segments share the ID {sid!r}")
        seen_ids.add(sid)
        out.append(
            {
                "id": sid,
                "label": label,
                "name": name or f"Segment_{label}",
                "name_auto": not name,
                "color": _format_color(color if color is not None else _default_color(label)),
                "color_auto": color is None,
                "terminology": _header_text(_terminology_text(seg["terminology"], seg)) if seg.get("terminology")
                else None,
            }
        )
    for label in present:  # labels in the map without a description still become (auto-named) segments
        if label not in seen_labels:
            sid = f"Segment_{label}"
            while sid in seen_ids:
                sid += "_"
            seen_ids.add(sid)
            out.append(
                {
                    "id": sid,
                    "label": label,
                    "name": f"Segment_{label}",
                    "name_auto": True,
                    "color": _format_color(_default_color(label)),
                    "color_auto": True,
                    "terminology": None,
                }
            )
    return out


def _default_color(label: int) -> tuple[float, float, float]:
    return DEFAULT_SEGMENT_COLORS[(label - 1) % len(DEFAULT_SEGMENT_COLORS)]


def _segment_extent(arr: np.ndarray, label: int) -> str:
    """Bounding box of ``label`` in IJK (x y z) as Slicer's ``Segment<i>_Extent``; ``0 -1 0 -1 0 -1`` when absent."""
    mask = arr == label
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in (2, 1, 0):  # x, y, z
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        bounds += [int(idx[0]), int(idx[-1])]
    return " ".join(str(b) for b in bounds)


def _segmentation_image(arr: np.ndarray, geometry: Geometry, segments: Sequence[dict] | None) -> sitk.Image:
    segs = _normalise_segments(arr, segments)
    max_label = max([int(arr.max()) if arr.size else 0] + [s["label"] for s in segs])
    img = sitk.GetImageFromArray(arr.astype(_label_dtype(max_label), copy=False))
    geometry.to_3d().apply(img)
    for i, s in enumerate(segs):
        key = f"Segment{i}_"
        img.SetMetaData(key + "ID", s["id"])
        img.SetMetaData(key + "Name", s["name"])
        img.SetMetaData(key + "NameAutoGenerated", "1" if s["name_auto"] else "0")
        img.SetMetaData(key + "Color", s["color"])
        img.SetMetaData(key + "ColorAutoGenerated", "1" if s["color_auto"] else "0")
        img.SetMetaData(key + "LabelValue", str(s["label"]))
        img.SetMetaData(key + "Layer", "0")
        img.SetMetaData(key + "Extent", _segment_extent(arr, s["label"]))
        if s["terminology"]:
            img.SetMetaData(key + "Tags", f"TerminologyEntry:{s['terminology']}|")
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    img.SetMetaData(
        "Segmentation_ConversionParameters",
        f"Reference image geometry|{_slicer_image_geometry(geometry.to_3d())}|"
        "Image geometry description string determining the geometry of the labelmap that is created in course of "
        "conversion.&",  # Slicer only parses parameters terminated by '&'
    )
    return img


def _slicer_image_geometry(geometry: Geometry) -> str:
    """Slicer's serialised image geometry (``vtkSegmentationConverter::SerializeImageGeometry``) of a 3D geometry.

    Row-major 4x4 IJK-to-RAS matrix (direction times spacing, origin in the last column), then the extent
    ``0;X-1;0;Y-1;0;Z-1``, every value followed by ``;``. ITK's LPS is turned into RAS by negating the first two rows.
    """
    d = geometry.direction
    flip = (-1.0, -1.0, 1.0)
    values: list[float] = []
    for i in range(3):
        values += [flip[i] * d[3 * i + j] * geometry.spacing[j] for j in range(3)]
        values.append(flip[i] * geometry.origin[i])
    values += [0.0, 0.0, 0.0, 1.0]
    text = [repr(v + 0.0) if v != int(v) else str(int(v)) for v in values]
    text += [str(v) for n in geometry.size for v in (0, n - 1)]
    return "".join(t + ";" for t in text)


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    geometry: Geometry,
    segments: Sequence[dict] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Write an integer label map on ``geometry`` to ``path`` atomically; returns the absolute output path.

    ``labels``: integer/boolean array ``(Z, Y, X)`` equal to ``geometry.shape_zyx`` (a ``(Y, X)`` array is accepted for
    a 2D geometry); 0 is background. The output has exactly the input's size, origin, spacing and direction, up to
    what the format can store: NIfTI keeps them in single precision, and NRRD stores direction x spacing as one
    vector per axis, so an oblique grid can come back off by an ulp (axis-aligned grids round-trip exactly).

    Formats, by extension (case-insensitive):

    * ``.nrrd``, ``.nii.gz``, ``.nii``, ``.mha`` — the label values as they are (uint8, or uint16/int32 when needed);
      2D geometry gives a 2D file.
    * ``.png`` — 2D geometry only, 8 bit. A *binary* label map (values only 0 and 1) is written as 0/255 so that it
      is visible in image viewers; a multi-label map is written with its label values (0..255) unchanged.
    * ``.seg.nrrd`` — 3D Slicer segmentation: a gzip labelmap NRRD (always 3D; a 2D geometry becomes one slice with z
      spacing 1) plus the header fields Slicer reads. ``segments`` is a list of dicts ``{"name": str, "label": int,
      "color": [r, g, b] in 0..1}`` with optional ``"id"`` and ``"terminology"`` (a Slicer terminology entry string,
      stored as the ``TerminologyEntry`` tag). Segments without a name/colour get auto-generated ones; labels present
      in the map but not listed become auto-named segments ``Segment_<label>``. ``segments`` is ignored by the other
      formats.

    Raises :class:`GMSError` for an unsupported extension, an existing output without ``overwrite=True``, a missing
    output folder, a 3D/too-large-label map for PNG, or a failed write (no file is left behind). Programming errors
    (wrong shape or dtype, negative labels, malformed segments) raise ``ValueError``.
    """
    ext = output_format(path)
    dest = os.fspath(path)
    if ext == ".dcm":
        raise GMSError(f"cannot write {dest}: a DICOM SEG references its source series; it is written from a DICOM "
                       "input (dicomseg.write_seg)")
    arr = _check_labels(labels, geometry)
    max_label = int(arr.max()) if arr.size else 0

    if ext == ".png":
        if geometry.dimension != 2:
            raise GMSError(f"cannot write {dest}: PNG output needs a 2D image; use .nrrd, .nii.gz or .seg.nrrd")
        if max_label > 255:
            raise GMSError(f"cannot write {dest}: label value {max_label} does not fit an 8-bit PNG; use .nrrd")
        out = arr[0].astype(np.uint8)
        if max_label <= 1:
            out = out * np.uint8(255)
        img = sitk.GetImageFromArray(out)
        geometry.apply(img)
    elif ext == ".seg.nrrd":
        img = _segmentation_image(arr, geometry, segments)
    else:
        data = arr[0] if geometry.dimension == 2 else arr
        img = sitk.GetImageFromArray(data.astype(_label_dtype(max_label), copy=False))
        geometry.apply(img)

    return write_image(img, dest, compress=ext in COMPRESSED_OUTPUT_EXTENSIONS, overwrite=overwrite)


def write_map(path: str | os.PathLike, values: np.ndarray, geometry: Geometry, *, overwrite: bool = False) -> str:
    """Write a map of values in [0, 1] (an uncertainty map) on ``geometry``, atomically; returns the absolute path.
    ``.nrrd``, ``.nii.gz``, ``.nii``, ``.mha``: float32 as is; ``.png`` (2D only): 8 bit, 255 = 1.0. A Slicer
    segmentation (``.seg.nrrd``) holds labels, not values, and is refused, as is any other extension."""
    ext = output_format(path)
    dest = os.fspath(path)
    if ext == ".seg.nrrd":
        raise GMSError(f"cannot write a map of values to {dest}: a .seg.nrrd holds labels; use .nrrd, .nii.gz or .png")
    arr = np.asarray(values, np.float32).reshape(geometry.shape_zyx)
    if ext == ".png":
        if geometry.dimension != 2:
            raise GMSError(f"cannot write {dest}: PNG output needs a 2D image; use .nrrd or .nii.gz")
        data = np.round(np.clip(arr[0], 0.0, 1.0) * 255).astype(np.uint8)
    else:
        data = arr[0] if geometry.dimension == 2 else arr
    img = sitk.GetImageFromArray(data)
    geometry.apply(img)
    return write_image(img, dest, compress=ext in COMPRESSED_OUTPUT_EXTENSIONS, overwrite=overwrite)


def write_image(img: sitk.Image, path: str | os.PathLike, *, compress: bool = False, overwrite: bool = False) -> str:
    """``sitk.WriteImage(img, path)``, atomically and checked (:mod:`.atomicfile`; read back voxel by voxel by
    :func:`_check_written`); returns the absolute path. :class:`GMSError` (one line) for a failed write, which leaves
    an earlier file untouched and no temporary file. Every image file the engine and the Slicer logic write goes
    through here."""
    dest = os.fspath(path)
    with atomic_output(dest, overwrite=overwrite, verify=lambda tmp: _check_written(tmp, dest, img)) as tmp:
        try:
            sitk.WriteImage(img, tmp, useCompression=compress)
        except RuntimeError as e:
            raise write_failed(dest, sitk_reason(e).replace(tmp, dest)) from None
    return os.path.abspath(dest)


def _check_written(tmp: str, dest: str, img: sitk.Image) -> None:
    """Read the written file back: it must hold exactly the voxels of ``img`` (ITK reports no error for some formats
    when the disk fills, and leaves a short or empty file), and every byte its header declares (ITK's NIfTI reader
    fills a short file with zeros: :func:`~.inputcheck.check_stored_data`, as for input files)."""
    if os.path.getsize(tmp) == 0:
        raise write_failed(dest, "nothing was written (the file is empty)")
    try:
        back = sitk.ReadImage(tmp)
    except RuntimeError as e:
        reason = sitk_reason(e).replace(tmp, dest)
        raise write_failed(dest, f"the written file does not read back ({reason})") from None
    if (back.GetSize() != img.GetSize()
            or back.GetNumberOfComponentsPerPixel() != img.GetNumberOfComponentsPerPixel()
            or not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img), equal_nan=True)):
        raise write_failed(dest, "the written file does not read back as written")
    try:  # the bytes its header declares, and an intact gzip stream, are all there
        check_stored_data(tmp)
    except GMSError as e:
        raise write_failed(dest, str(e).replace(f"{tmp}: ", "", 1).replace(tmp, dest)) from None


def _terminology_text(value, segment: dict) -> str:
    """A segment's terminology as Slicer's entry string: as given, or built from a card's codes (terminology.py)."""
    if isinstance(value, dict):
        from .terminology import slicer_terminology

        return slicer_terminology(segment)
    return str(value)
