"""Volume nodes as arrays and files: IJK-to-RAS matrices and the LPS geometry that files store, voxel arrays, and
writing a volume's voxels (with its geometry) as the worker's input."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..labelwrite import write_image
from .mrml import vtk


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def ijkToRasFromVolumeNode(volumeNode) -> np.ndarray:
    """The volume node's IJK-to-RAS matrix (4x4 numpy array; local coordinates, parent transforms not applied)."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def lpsGeometryFromIjkToRas(ijkToRas: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """``(origin, spacing, direction)`` in ITK's LPS convention (direction row-major, columns = axis directions)."""
    ijkToRas = np.asarray(ijkToRas, dtype=float)
    lin = ijkToRas[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ValueError(f"invalid volume geometry: spacing {spacing.tolist()}")
    direction = _RAS_TO_LPS @ (lin / spacing)
    origin = _RAS_TO_LPS @ ijkToRas[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.flatten().tolist())


def ijkToRasFromLpsGeometry(origin, spacing, direction) -> np.ndarray:
    """Inverse of :func:`lpsGeometryFromIjkToRas` (2D geometries get z spacing 1, origin z 0)."""
    origin, spacing, direction = list(origin), list(spacing), list(direction)
    if len(origin) == 2:
        origin, spacing = origin + [0.0], spacing + [1.0]
        d = direction
        direction = [d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0]
    m = np.eye(4)
    m[:3, :3] = _RAS_TO_LPS @ np.array(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    m[:3, 3] = _RAS_TO_LPS @ np.array(origin, dtype=float)
    return m


def _vtkMatrix(m: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            out.SetElement(i, j, float(m[i][j]))
    return out


def _imageToWorld(image) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _volumeShape(volumeNode) -> tuple:
    """(K, J, I) of a volume node that has voxels; ValueError naming it otherwise. Cheap: reads no voxels."""
    image = volumeNode.GetImageData() if volumeNode is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volumeNode.GetName() if volumeNode else None}' has no image data")
    dims = image.GetDimensions()
    if min(dims) < 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' is empty (dimensions {dims})")
    return tuple(reversed(dims))


def _volumeArray(volumeNode, copy: bool = True) -> np.ndarray:
    """A copy of the voxels: (K, J, I) scalar or (K, J, I, 3) RGB; RGBA drops alpha, other multi-component keeps one.
    ``copy=False`` may return a view of the node's own voxels instead (to check them, never to keep)."""
    shape = _volumeShape(volumeNode)
    import vtk.util.numpy_support as vtk_np

    image = volumeNode.GetImageData()
    ncomp = image.GetNumberOfScalarComponents()
    arr = vtk_np.vtk_to_numpy(image.GetPointData().GetScalars())
    arr = arr.reshape(shape + ((ncomp,) if ncomp > 1 else ()))
    if copy:
        arr = np.array(arr, copy=True)
    if ncomp == 4:
        arr = arr[..., :3]
    elif ncomp == 2 or ncomp > 4:
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def exportVolumeNode(volumeNode, path: str, compress: bool = False) -> dict:
    """Write a scalar or RGB vector volume node with its geometry (LPS, as files store it) to ``path`` via SimpleITK.

    Returns ``{"shape": (K, J, I), "components": n}``. The node's own IJK-to-RAS is used (a parent transform is not
    hardened); results are imported back into the same coordinate frame.
    """
    return _writeVolumeArray(_volumeArray(volumeNode), ijkToRasFromVolumeNode(volumeNode), path, compress)


def _checkStillInScene(nodes: Sequence, when: str) -> None:
    """ValueError if one of ``nodes`` left its scene (or a volume lost its voxels) since a job checked them; jobs read
    their input one poll at a time, and the user may close a study meanwhile."""
    for node in nodes:
        if node.GetScene() is None or (node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is None):
            raise ValueError(f"'{node.GetName()}' was removed or emptied {when}")


def _volumeInputStep(volumeNode, path: str):
    """Read a volume node's voxels and geometry now (the caller's thread); return a function that writes them to
    ``path`` (any thread). See ``_WorkerJob._prepare``."""
    _checkStillInScene([volumeNode], "before it was exported")
    arr, ijkToRas = _volumeArray(volumeNode), ijkToRasFromVolumeNode(volumeNode)
    return lambda: _writeVolumeArray(arr, ijkToRas, path)


def _writeVolumeArray(arr: np.ndarray, ijkToRas: np.ndarray, path: str, compress: bool = False) -> dict:
    """Write a (K, J, I) or (K, J, I, 3) array on the grid ``ijkToRas`` (RAS) as ``path``; touches no MRML node, so
    it may run in any thread."""
    import SimpleITK as sitk

    isVector = arr.ndim == 4
    if arr.dtype == np.int64 or arr.dtype == np.uint64:  # not every reader handles 64-bit integers
        arr = arr.astype(np.float64)
    img = sitk.GetImageFromArray(arr, isVector=isVector)
    origin, spacing, direction = lpsGeometryFromIjkToRas(ijkToRas)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    write_image(img, path, compress=compress, overwrite=True)  # checked: a full disk is an error, not a short file
    return {"shape": tuple(arr.shape[:3]), "components": arr.shape[3] if isVector else 1}
