"""Overlap and surface-distance metrics for binary masks and label maps.

Conventions
-----------
* Masks are boolean (or 0/non-0) numpy arrays of the same shape, 2D or 3D. ``spacing`` is given **per array axis, in
  array order** (for a ``(Z, Y, X)`` array: ``(sz, sy, sx)``, i.e. ``Geometry.spacing_zyx``); ``None`` means 1.
* Empty masks: both empty -> Dice 1.0, IoU 1.0, HD95 0.0 (perfect agreement that there is nothing);
  exactly one empty -> Dice 0.0, IoU 0.0, HD95 ``nan`` (a distance to nothing is undefined; aggregate with
  ``numpy.nanmean`` or report the count of such cases separately).
* HD95 is the 95th percentile (numpy's default linear interpolation) of the pooled symmetric surface distances: the
  distance of every surface voxel of ``pred`` to the nearest surface voxel of ``gt`` together with the distance of every
  surface voxel of ``gt`` to the nearest surface voxel of ``pred``, in physical units (Euclidean distance transform with
  the voxel spacing). A surface voxel is a foreground voxel with at least one face-neighbour (6-/4-connectivity) in
  the background; voxels on the array border count as surface (outside the array is background). Axes of length 1
  (e.g. the Z of a 2D image stored as ``(1, Y, X)``) are dropped first, so a 2D slice is measured in 2D.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["dice", "iou", "hd95", "surface_distances", "label_metrics"]


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred).astype(bool, copy=False)
    g = np.asarray(gt).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    return p, g


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P∩G| / (|P|+|G|); 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union |P∩G| / |P∪G|; 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim  # type: ignore[arg-type]
    sp = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(sp) != ndim:
        raise ValueError(f"spacing has {len(sp)} values for a {ndim}D array (give one per array axis, array order)")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive, got {sp}")
    return sp


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | float | None = None
) -> np.ndarray | None:
    """Pooled symmetric surface distances (pred->gt then gt->pred), or ``None`` when either mask is empty."""
    p, g = _pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        return None
    # drop length-1 axes: they carry no surface (a 2D slice stored as (1, Y, X) is measured in 2D)
    keep = [a for a in range(p.ndim) if p.shape[a] > 1]
    if len(keep) < p.ndim:
        p = p.reshape([p.shape[a] for a in keep])
        g = g.reshape([g.shape[a] for a in keep])
        sp = tuple(sp[a] for a in keep)
    if p.ndim == 0:  # a single voxel, set in both
        return np.zeros(2)
    # crop to the union's bounding box plus one voxel: exact (distances only involve surface voxels inside it,
    # and the added margin is background just as outside the array is) and much faster on large volumes
    union = p | g
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    p = p[tuple(slices)]
    g = g[tuple(slices)]
    ps, gs = _surface(p), _surface(g)
    dist_to_g = ndimage.distance_transform_edt(~gs, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~ps, sampling=sp)
    return np.concatenate([dist_to_g[ps], dist_to_p[gs]])


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | float | None = None) -> float:
    """95th percentile Hausdorff distance in physical units; 0.0 if both empty, ``nan`` if exactly one is empty.

    ``spacing``: one value per array axis, in array order (``Geometry.spacing_zyx`` for ``(Z, Y, X)`` arrays).
    """
    p, g = _pair(pred, gt)
    _spacing(spacing, p.ndim)  # validate even for empty masks
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return float("nan")
    d = surface_distances(p, g, spacing)
    assert d is not None
    return float(np.percentile(d, 95))


def label_metrics(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    labels: Iterable[int],
    spacing: Sequence[float] | float | None = None,
) -> dict[int, dict[str, float]]:
    """``{label: {"dice": .., "iou": .., "hd95": ..}}`` comparing ``pred_labels == label`` with ``gt_labels == label``."""
    pl = np.asarray(pred_labels)
    gl = np.asarray(gt_labels)
    if pl.shape != gl.shape:
        raise ValueError(f"pred and gt label maps differ in shape: {pl.shape} vs {gl.shape}")
    out: dict[int, dict[str, float]] = {}
    for label in labels:
        lab = int(label)
        p = pl == lab
        g = gl == lab
        out[lab] = {"dice": dice(p, g), "iou": iou(p, g), "hd95": hd95(p, g, spacing)}
    return out
