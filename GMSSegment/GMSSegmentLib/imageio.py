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
or RGB). Anything the engine cannot segment raises :class:`GMSError` with a one-line message naming the file.

Writing (:func:`write_labels`)
------------------------------
``.nrrd``, ``.nii.gz``, ``.nii``, ``.mha``, ``.png`` (2D only) and ``.seg.nrrd`` (3D Slicer segmentation). Output is
written to a hidden temporary file in the destination folder and moved into place with ``os.replace`` only when
complete (:func:`atomic_output`), so a failed write never leaves a partial file, and an existing file is never
replaced unless ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from . import GMSError

__all__ = [
    "Geometry",
    "LoadedImage",
    "read_image",
    "write_labels",
    "atomic_output",
    "output_format",
    "SUPPORTED_OUTPUT_EXTENSIONS",
    "DEFAULT_SEGMENT_COLORS",
]

#: output extensions understood by :func:`write_labels` (longest first: ``.seg.nrrd`` before ``.nrrd``)
SUPPORTED_OUTPUT_EXTENSIONS: tuple[str, ...] = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".png")

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


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _sitk_reason(exc: BaseException) -> str:
    """The useful part of a SimpleITK/ITK exception message, on one line."""
    msg = _one_line(exc, limit=10_000)
    for marker in ("ERROR:", "Description:"):
        if marker in msg:
            msg = msg.rsplit(marker, 1)[1].strip()
    msg = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", msg)  # "PNGImageIO(0x55d...): " prefix
    return _one_line(msg, limit=200) or type(exc).__name__


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
            raise GMSError(f"invalid geometry description: {_one_line(e)}") from e

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


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read a 2D image or 3D volume with its geometry.

    Raises :class:`GMSError` (one line, naming the file) for a missing/empty/unreadable file, an unsupported
    dimensionality (not 2D/3D, multi-component pixels other than RGB/RGBA/gray+alpha in 2D or other than RGB in 3D,
    an empty size), NaN/Inf values, and constant images (nothing to segment).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise GMSError(f"image file not found: {p}")
    if os.path.isdir(p):
        raise GMSError(f"{p} is a folder, not an image file")
    try:
        if os.path.getsize(p) == 0:
            raise GMSError(f"cannot read image {p}: the file is empty")
    except OSError as e:
        raise GMSError(f"cannot read image {p}: {_one_line(e.strerror or e)}") from e
    try:
        img = sitk.ReadImage(p)
    except RuntimeError as e:
        raise GMSError(f"cannot read image {p}: {_sitk_reason(e)}") from e
    except OSError as e:  # pragma: no cover - permission problems surface as RuntimeError in SimpleITK
        raise GMSError(f"cannot read image {p}: {_one_line(e)}") from e

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
        raise GMSError(f"{p}: invalid image geometry: {_one_line(e)}") from e

    raw = sitk.GetArrayViewFromImage(img)  # (Y, X[, C]) or (Z, Y, X[, C])
    pixel_type = raw.dtype.name
    if dim == 2:
        raw = raw[np.newaxis]
    if ncomp == 2:  # gray + alpha
        raw = raw[..., 0]
    elif ncomp == 4:  # RGBA
        raw = raw[..., :3]
    is_rgb = ncomp in (3, 4)

    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        n_bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        raise GMSError(f"{p}: the image contains {n_bad} NaN or Inf values")
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

    return LoadedImage(array=array, geometry=geometry, is_rgb=is_rgb, path=p, pixel_type=pixel_type)


# -------------------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Context manager giving a temporary path to write ``path`` atomically.

    The temporary file is a hidden file in the same folder whose name ends with the destination's file name (so it has
    the same extension, e.g. ``.seg.nrrd`` or ``.nii.gz``, for writers that choose the format by name). When the block
    finishes, it is moved onto ``path`` (``os.replace``); if the block raises, the temporary file is removed and
    nothing is written. Without ``overwrite``, an existing ``path`` raises :class:`GMSError` (checked before the block
    and again, race-free where the file system supports hard links, when moving into place).

    Example::

        with atomic_output("scores.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                ...
    """
    dest = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(dest)
    if not name:
        raise GMSError(f"invalid output file name: {os.fspath(path)}")
    if not os.path.isdir(folder):
        raise GMSError(f"output folder does not exist: {folder}")
    if os.path.isdir(dest):
        raise GMSError(f"output path is a folder: {dest}")
    if not overwrite and os.path.lexists(dest):
        raise GMSError(f"output file already exists: {dest} (refusing to overwrite; use --overwrite to replace it)")

    tmp = ""
    for _ in range(100):
        candidate = os.path.join(folder, f".~{secrets.token_hex(4)}.{name}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise GMSError(f"cannot write to {folder}: {_one_line(e.strerror or e)}") from e
        os.close(fd)
        tmp = candidate
        break
    if not tmp:  # pragma: no cover - 100 collisions of 32 random bits
        raise GMSError(f"cannot create a temporary file in {folder}")

    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise GMSError(f"writing {dest} failed: the temporary output disappeared")
        with contextlib.suppress(OSError):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, dest)
        else:
            _move_no_clobber(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _move_no_clobber(tmp: str, dest: str) -> None:
    try:
        os.link(tmp, dest)  # fails if dest exists: no race with another writer
    except FileExistsError:
        raise GMSError(
            f"output file already exists: {dest} (refusing to overwrite; use --overwrite to replace it)"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                           errno.EACCES):
            raise
        # file system without hard links: best effort check, then atomic replace
        if os.path.lexists(dest):
            raise GMSError(
                f"output file already exists: {dest} (refusing to overwrite; use --overwrite to replace it)"
            ) from None
        os.replace(tmp, dest)
    else:
        os.remove(tmp)


def output_format(path: str | os.PathLike) -> str:
    """The output extension of ``path`` (one of :data:`SUPPORTED_OUTPUT_EXTENSIONS`), or :class:`GMSError`."""
    low = os.fspath(path).lower()
    for ext in SUPPORTED_OUTPUT_EXTENSIONS:
        if low.endswith(ext) and len(os.path.basename(low)) > len(ext):
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
                "terminology": _header_text(seg["terminology"]) if seg.get("terminology") else None,
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

    with atomic_output(dest, overwrite=overwrite) as tmp:
        try:
            sitk.WriteImage(img, tmp, useCompression=ext in (".nrrd", ".seg.nrrd", ".mha", ".nii.gz"))
        except RuntimeError as e:
            raise GMSError(f"cannot write {dest}: {_sitk_reason(e)}") from e
    return os.path.abspath(dest)
