"""Reading images and volumes with their geometry; writing label maps atomically.

Array layout
------------
Every image is handed around as a numpy array in SimpleITK/numpy index order: ``(Z, Y, X)`` for scalar images and
``(Z, Y, X, C)`` for multi-component (RGB) ones. A 2D image gets ``Z = 1``; its :class:`Geometry` stays 2D
(``dimension == 2``) so that it is written back as a 2D image. :class:`Geometry` itself lists ``size``, ``origin`` and
``spacing`` in ITK order ``(x, y[, z])``, in LPS physical coordinates (ITK's convention); ``Geometry.shape_zyx`` and
``Geometry.spacing_zyx`` give the array-ordered equivalents.

Reading (:func:`read_image`)
----------------------------
PNG / JPEG / BMP / TIFF (8 or 16 bit, gray or RGB; an alpha channel is dropped) and NRRD / NIfTI / MHA volumes (scalar,
or RGB): the extensions in :data:`.formats.INPUT_EXTENSIONS` (re-exported here). Anything the engine cannot segment
raises :class:`GMSError` with a one-line message naming the file.

Writing (:func:`write_labels`)
------------------------------
``.nrrd``, ``.nii.gz``, ``.nii``, ``.mha``, ``.png`` (2D only) and ``.seg.nrrd`` (3D Slicer segmentation;
:data:`.formats.OUTPUT_EXTENSIONS`). Output is written to a hidden temporary file in the destination folder and moved
into place with ``os.replace`` only when complete (:func:`atomic_output`), so a failed write never leaves a partial
file, and an existing file is never replaced unless ``overwrite=True``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import GMSError
from .errortext import one_line, sitk_reason
from .formats import INPUT_EXTENSIONS, is_dicom  # noqa: F401  (re-exported: the files read_image is meant for)
from .inputcheck import read_verified

__all__ = [
    "Geometry",
    "LoadedImage",
    "read_image",
    "write_labels",
    "atomic_output",
    "output_format",
    "INPUT_EXTENSIONS",
    "SUPPORTED_OUTPUT_EXTENSIONS",
    "DEFAULT_SEGMENT_COLORS",
]




# --------------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Image grid: ``size``, ``origin``, ``spacing`` in ITK order (x, y[, z]); ``direction`` row-major flattened.

    Equality (``==``) is exact; use :meth:`isclose` / :meth:`differences` for tolerant comparisons.
    """

    dimension: int
    size: tuple[int, ...]
    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        dim = int(self.dimension)
        if dim not in (2, 3):
            raise ValueError(f"geometry dimension must be 2 or 3, got {self.dimension!r}")
        size = tuple(int(v) for v in self.size)
        origin = tuple(float(v) for v in self.origin)
        spacing = tuple(float(v) for v in self.spacing)
        direction = tuple(float(v) for v in self.direction)
        if len(size) != dim or len(origin) != dim or len(spacing) != dim or len(direction) != dim * dim:
            raise ValueError(
                f"geometry of dimension {dim} needs {dim} sizes/origins/spacings and {dim * dim} direction values, got "
                f"{len(size)}/{len(origin)}/{len(spacing)}/{len(direction)}"
            )
        if any(s < 1 for s in size):
            raise ValueError(f"geometry size must be positive, got {size}")
        if not all(math.isfinite(v) for v in origin + spacing + direction):
            raise ValueError("geometry origin, spacing and direction must be finite")
        if any(s <= 0 for s in spacing):
            raise ValueError(f"geometry spacing must be positive, got {spacing}")
        object.__setattr__(self, "dimension", dim)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "direction", direction)

    # -- construction / application
    @classmethod
    def from_sitk(cls, img: sitk.Image) -> "Geometry":
        return cls(
            dimension=img.GetDimension(),
            size=img.GetSize(),
            origin=img.GetOrigin(),
            spacing=img.GetSpacing(),
            direction=img.GetDirection(),
        )

    def apply(self, img: sitk.Image) -> sitk.Image:
        """Set origin, spacing and direction on ``img`` (in place; also returned). Its size must match."""
        if img.GetDimension() != self.dimension or tuple(img.GetSize()) != self.size:
            raise ValueError(
                f"image of dimension {img.GetDimension()} and size {tuple(img.GetSize())} does not fit a geometry of "
                f"dimension {self.dimension} and size {self.size}"
            )
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        img.SetDirection(self.direction)
        return img

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists of numbers)."""
        return {
            "dimension": self.dimension,
            "size": list(self.size),
            "origin": list(self.origin),
            "spacing": list(self.spacing),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Geometry":
        try:
            return cls(
                dimension=d["dimension"],
                size=tuple(d["size"]),
                origin=tuple(d["origin"]),
                spacing=tuple(d["spacing"]),
                direction=tuple(d["direction"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise GMSError(f"invalid geometry description: {one_line(e)}") from e

    # -- array-ordered views
    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Shape of the matching label array ``(Z, Y, X)``; Z = 1 for a 2D geometry."""
        if self.dimension == 2:
            return (1, self.size[1], self.size[0])
        return (self.size[2], self.size[1], self.size[0])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array order ``(Z, Y, X)``; 1.0 for the Z of a 2D geometry."""
        if self.dimension == 2:
            return (1.0, self.spacing[1], self.spacing[0])
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.size))

    def to_3d(self) -> "Geometry":
        """The same grid as a 3D geometry (a 2D one gets one slice, z origin 0, z spacing 1, identity z direction)."""
        if self.dimension == 3:
            return self
        d = self.direction
        return Geometry(
            dimension=3,
            size=(self.size[0], self.size[1], 1),
            origin=(self.origin[0], self.origin[1], 0.0),
            spacing=(self.spacing[0], self.spacing[1], 1.0),
            direction=(d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0),
        )

    # -- comparisons
    def differences(self, other: "Geometry", tol: float = 1e-6) -> list[str]:
        """Human-readable list of what differs (empty when equal within ``tol``, relative for origin/spacing)."""
        out: list[str] = []
        if self.dimension != other.dimension:
            return [f"dimension {self.dimension} vs {other.dimension}"]
        if self.size != other.size:
            out.append(f"size {self.size} vs {other.size}")
        for name in ("origin", "spacing", "direction"):
            a, b = getattr(self, name), getattr(other, name)
            scale = 1.0 if name == "direction" else max(1.0, *(abs(v) for v in a + b))
            if any(abs(x - y) > tol * scale for x, y in zip(a, b)):
                out.append(f"{name} {a} vs {b}")
        return out

    def isclose(self, other: "Geometry", tol: float = 1e-6) -> bool:
        """Same dimension and size, origin/spacing/direction equal within ``tol`` (relative for origin/spacing)."""
        return not self.differences(other, tol)

    def same_grid(self, img: sitk.Image, tol: float = 1e-6) -> bool:
        """Whether the SimpleITK image ``img`` lies on this grid (within ``tol``)."""
        return self.isclose(Geometry.from_sitk(img), tol)


# -------------------------------------------------------------------------------------------------------- reading


@dataclass
class LoadedImage:
    """An image read by :func:`read_image`.

    ``array``: float32, ``(Z, Y, X)`` for scalar images, ``(Z, Y, X, 3)`` for RGB; Z = 1 for 2D images.
    ``pixel_type``: numpy name of the stored component type (e.g. ``"uint8"``, ``"int16"``), useful for intensity
    normalisation.
    """

    array: np.ndarray
    geometry: Geometry
    is_rgb: bool
    path: str
    pixel_type: str = field(default="float32")
    #: for a DICOM input: the file behind each slice, in the array's slice order (what a DICOM SEG references)
    dicom_files: tuple = ()

    @property
    def is_2d(self) -> bool:
        return self.geometry.dimension == 2

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])


_COMPLEX_IDS = {
    getattr(sitk, n)
    for n in ("sitkComplexFloat32", "sitkComplexFloat64")
    if isinstance(getattr(sitk, n, None), int)
}


def read_image(path: str | os.PathLike, series_uid: str | None = None) -> LoadedImage:
    """Read a 2D image or 3D volume with its geometry; a DICOM series folder or ``.dcm`` file through dicomio.py
    (``series_uid`` picks one series of a folder that holds several).

    Raises :class:`GMSError` (one line, naming the file) for a missing/empty/unreadable file, an unsupported
    dimensionality (not 2D/3D, multi-component pixels other than RGB/RGBA/gray+alpha in 2D or other than RGB in 3D,
    an empty size), NaN/Inf values, and constant images (nothing to segment); and, before decoding
    (:mod:`.inputcheck`), truncated or damaged voxel data and a declared size that memory cannot hold.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise GMSError(f"image file not found: {p}")
    if is_dicom(p):
        from .dicomio import read_dicom

        img, files = read_dicom(p, series_uid)
        return _loaded(img, p, dicom_files=files)
    try:
        if os.path.getsize(p) == 0:
            raise GMSError(f"cannot read image {p}: the file is empty")
    except OSError as e:
        raise GMSError(f"cannot read image {p}: {one_line(e.strerror or e)}") from e
    try:
        img = read_verified(p)  # also refuses truncated/damaged data, NaN/Inf and what memory cannot hold
    except RuntimeError as e:
        raise GMSError(f"cannot read image {p}: {sitk_reason(e)}") from e
    except OSError as e:  # pragma: no cover - permission problems surface as RuntimeError in SimpleITK
        raise GMSError(f"cannot read image {p}: {one_line(e)}") from e
    return _loaded(img, p)


def _loaded(img: sitk.Image, p: str, dicom_files: tuple = ()) -> LoadedImage:
    """The checks of a read image (dimension, components, geometry, finite and not constant) and its LoadedImage."""
    dim = img.GetDimension()
    size = tuple(img.GetSize())
    if dim not in (2, 3):
        raise GMSError(f"{p}: unsupported {dim}D image of size {size}; GMSSegment reads 2D images and 3D volumes")
    if any(s == 0 for s in size):
        raise GMSError(f"{p}: the image is empty (size {size})")
    if img.GetPixelID() in _COMPLEX_IDS:
        raise GMSError(f"{p}: complex-valued images are not supported")
    ncomp = img.GetNumberOfComponentsPerPixel()
    if dim == 2:
        allowed = (1, 2, 3, 4)  # gray, gray+alpha, RGB, RGBA
    else:
        allowed = (1, 3)  # scalar or RGB volume
    if ncomp not in allowed:
        what = "2D image" if dim == 2 else "3D volume"
        raise GMSError(
            f"{p}: unsupported {what} with {ncomp} components per pixel; only scalar (gray) or RGB images are supported"
        )

    try:
        geometry = Geometry.from_sitk(img)
    except ValueError as e:
        raise GMSError(f"{p}: invalid image geometry: {one_line(e)}") from e

    raw = sitk.GetArrayViewFromImage(img)  # (Y, X[, C]) or (Z, Y, X[, C])
    pixel_type = raw.dtype.name
    if dim == 2:
        raw = raw[np.newaxis]
    if ncomp == 2:  # gray + alpha
        raw = raw[..., 0]
    elif ncomp == 4:  # RGBA
        raw = raw[..., :3]
    is_rgb = ncomp in (3, 4)

    # always a copy: ``raw`` is a view into ``img``'s buffer, which is freed when this function returns
    array = np.array(raw, dtype=np.float32, order="C", copy=True)
    del raw
    if not np.isfinite(array).all():
        raise GMSError(f"{p}: the image has values outside the float32 range")

    flat = array.reshape(-1, array.shape[-1]) if is_rgb else array.reshape(-1, 1)
    if bool((flat.min(axis=0) == flat.max(axis=0)).all()):
        v = flat[0].tolist()
        shown = v[0] if len(v) == 1 else tuple(v)
        raise GMSError(f"{p}: the image is constant (every voxel is {shown}); nothing to segment")

    return LoadedImage(array=array, geometry=geometry, is_rgb=is_rgb, path=p, pixel_type=pixel_type,
                       dicom_files=tuple(dicom_files))


# -------------------------------------------------------------------------------------------------------- writing
# The write path lives in its own modules; re-exported here so callers keep importing it from imageio.
from .atomicfile import atomic_output  # noqa: E402,F401
from .labelwrite import DEFAULT_SEGMENT_COLORS, SUPPORTED_OUTPUT_EXTENSIONS, output_format, write_labels  # noqa: E402,F401


def read_stored(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """An image file's voxels as stored and its geometry, for the Slicer side (volumes and label maps it loads).

    The array keeps the stored type and every component: ``(Z, Y, X)`` or ``(Z, Y, X, C)``, Z = 1 for a 2D image.
    The file passes the same checks before decoding as in :func:`read_image`, but none of its checks on the content
    (a constant label map is fine here)."""
    p = os.fspath(path)
    img = read_verified(p)
    array = sitk.GetArrayFromImage(img)
    if img.GetDimension() == 2:
        array = array[np.newaxis]
    return array, Geometry.from_sitk(img)
