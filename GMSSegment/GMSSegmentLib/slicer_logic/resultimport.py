"""Bringing files into the scene: an image file as a volume node, and a worker's result as new segments (all or
nothing, names made unique)."""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import formats
from ..imageio import Geometry, read_stored
from ..modelcard import Segment
from ..terminology import slicer_terminology
from .geometry import _imageToWorld, _vtkMatrix, ijkToRasFromLpsGeometry, ijkToRasFromVolumeNode
from .mrml import _removeNode, slicer, vtk
from .states import VolumeTask


_BINARY_LABELMAP = "Binary labelmap"


def addVolumeNodeFromFile(scene, path: str, name: str | None = None, vector: bool | None = None):
    """Load an image file (any format ``imageio`` reads, e.g. PNG, which slicer-core's readers lack) as a volume node.

    RGB(A) images become ``vtkMRMLVectorVolumeNode`` (alpha dropped) unless ``vector=False``, which converts them to
    luminance; scalar images become ``vtkMRMLScalarVolumeNode``. A 2D image becomes a single-slice volume with the
    geometry Slicer gives it (the file's LPS geometry, z spacing 1).
    """
    arr, geometry = read_stored(str(path))
    ncomp = arr.shape[3] if arr.ndim == 4 else 1
    if ncomp == 4:
        arr = arr[..., :3]
    elif ncomp == 2:
        arr = arr[..., 0]
    isVector = arr.ndim == 4
    if isVector and vector is False:
        lum = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        arr = np.round(lum).astype(arr.dtype) if arr.dtype.kind in "iu" else lum.astype(arr.dtype)
        isVector = False
    className = "vtkMRMLVectorVolumeNode" if isVector else "vtkMRMLScalarVolumeNode"
    if name is None:
        name = formats.split_extension(path)[0]
    node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(arr))
    node.SetIJKToRASMatrix(_vtkMatrix(_ijkToRas(geometry)))
    node.CreateDefaultDisplayNodes()
    return node


def uniqueSegmentName(segmentation, name: str) -> str:
    """``name``, or ``name (2)``, ``name (3)``, ... if a segment of ``segmentation`` already has that name."""
    taken = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def _orientedImage(array: np.ndarray, ijkToRas: np.ndarray, extentStart=(0, 0, 0)):
    """vtkOrientedImageData (unsigned char) from a (K, J, I) array."""
    import vtk.util.numpy_support as vtk_np

    img = slicer.vtkOrientedImageData()
    k, j, i = array.shape
    i0, j0, k0 = extentStart
    img.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_np.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(array.shape)[:] = array
    img.SetImageToWorldMatrix(_vtkMatrix(ijkToRas))
    return img


def _normalisedSegments(segments: Any) -> list[dict]:
    """Name, label, colour and terminology of each segment (a card's :class:`Segment` or a worker's dict) that has a
    label; colours clamped to 0..1, a broken colour None."""
    out = []
    for i, s in enumerate(segments or []):
        if isinstance(s, Segment):
            s = s.to_dict()
        if not isinstance(s, dict) or "label" not in s:
            continue
        color = s.get("color")
        try:
            color = [min(1.0, max(0.0, float(c))) for c in color][:3] if color is not None else None
            if color is not None and len(color) != 3:
                color = None
        except (TypeError, ValueError):
            color = None
        term = s.get("terminology")
        if isinstance(term, dict):  # a card's codes: Slicer's terminology entry string (terminology.py)
            term = slicer_terminology(s)
        out.append({"name": str(s.get("name") or f"Segment_{s['label']}"), "label": int(s["label"]), "color": color,
                    "terminology": term})
    return out


@dataclass
class _LoadedSegment:
    name: str
    label: int
    color: list | None
    image: Any  # vtkOrientedImageData, 0/1 unsigned char
    terminology: str | None = None


def _readResultSegments(path: str, segments: list[dict]) -> list[_LoadedSegment]:
    """Binary labelmaps of the worker's result file, one per described segment (empty ones included).

    ``.seg.nrrd`` files are read with Slicer's own segmentation reader in a private scene; other label maps (or a
    ``.seg.nrrd`` that reader rejects) with ``imageio``. Segments are matched by label value.
    """
    loaded: list[_LoadedSegment] = []
    if path.lower().endswith(formats.SEGMENTATION_EXTENSION):
        with contextlib.suppress(Exception):
            loaded = _readWithSegmentationStorageNode(path, segments)
    if not loaded:
        loaded = _readLabelMap(path, segments)
    return loaded


def _readWithSegmentationStorageNode(path: str, segments: list[dict]) -> list[_LoadedSegment]:
    scratch = slicer.vtkMRMLScene()
    node = scratch.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scratch.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    if not storage.ReadData(node):
        raise RuntimeError(f"cannot read {path}")
    seg = node.GetSegmentation()
    byLabel, byName = {}, {}
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        s = seg.GetSegment(sid)
        byLabel.setdefault(int(s.GetLabelValue()), sid)
        byName.setdefault(s.GetName(), sid)
    if not segments:  # nothing described: take what the file has
        segments = []
        for i in range(seg.GetNumberOfSegments()):
            s = seg.GetNthSegment(i)
            segments.append({"name": s.GetName(), "label": int(s.GetLabelValue()), "color": list(s.GetColor()),
                             "terminology": None})
    reference = None
    for sid in byLabel.values():
        reference = seg.GetSegment(sid).GetRepresentation(_BINARY_LABELMAP)
        if reference is not None:
            break
    if reference is None:
        raise RuntimeError(f"{path} holds no binary labelmap")
    out = []
    for d in segments:
        sid = byLabel.get(d["label"]) or byName.get(d["name"])
        image = slicer.vtkOrientedImageData()
        if sid is not None:
            node.GetBinaryLabelmapRepresentation(sid, image)
        if sid is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
            # absent or empty segment: an empty labelmap on the file's grid
            ext = reference.GetExtent()
            shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
            image = _orientedImage(np.zeros(shape, np.uint8), _imageToWorld(reference), (ext[0], ext[2], ext[4]))
        out.append(_LoadedSegment(d["name"], d["label"], d.get("color"), image, d.get("terminology")))
    return out


def _readLabelMap(path: str, segments: list[dict]) -> list[_LoadedSegment]:
    """Any label map file ``imageio`` reads, one binary labelmap per described segment (or per label value found)."""
    arr, geometry = read_stored(path)
    if arr.ndim == 4:
        raise ValueError(f"{path} is not a label map")
    ijkToRas = _ijkToRas(geometry)
    if not segments:
        segments = [{"name": f"Segment_{v}", "label": int(v), "color": None, "terminology": None}
                    for v in np.unique(arr) if v != 0]
    return [_LoadedSegment(d["name"], d["label"], d.get("color"),
                           _orientedImage((arr == d["label"]).astype(np.uint8), ijkToRas), d.get("terminology"))
            for d in segments]


def _ijkToRas(geometry: Geometry) -> np.ndarray:
    """The IJK-to-RAS matrix of a file's geometry (see :func:`ijkToRasFromLpsGeometry`)."""
    return ijkToRasFromLpsGeometry(geometry.origin, geometry.spacing, geometry.direction)


def _snapToVolumeGeometry(image, volumeNode, tolerance: float = 1e-4) -> None:
    """Give a labelmap that lies on the volume's grid (within rounding) exactly the volume's IJK-to-RAS matrix."""
    volumeMatrix = ijkToRasFromVolumeNode(volumeNode)
    imageMatrix = _imageToWorld(image)
    scale = max(1.0, float(np.abs(volumeMatrix).max()))
    if np.allclose(imageMatrix, volumeMatrix, atol=tolerance * scale, rtol=0):
        image.SetImageToWorldMatrix(_vtkMatrix(volumeMatrix))


def _isEmpty(image) -> bool:
    """A segment's image holds no voxel of the segment (an empty extent reports the scalar range (0, 1))."""
    e = image.GetExtent()
    if e[1] < e[0] or e[3] < e[2] or e[5] < e[4]:
        return True
    return image.GetScalarRange()[1] <= 0


def importResult(scene, task: VolumeTask) -> None:
    """Import one result into the scene (new node, or new uniquely named segments); all or nothing."""
    volumeNode = scene.GetNodeByID(task.volumeNodeID)
    if volumeNode is None:
        raise ValueError("the input volume was removed from the scene")
    loaded = _readResultSegments(task.outputPath, task.segments)
    # a segment the model found nowhere (e.g. decided absent by the card's presence decision) is not added: an empty
    # segment would only be something the user has to delete; the task says what was not found instead
    task.notFound = [s.name for s in loaded if _isEmpty(s.image)]
    loaded = [s for s in loaded if not _isEmpty(s.image)]
    if not loaded:
        task.segmentationNodeID, task.segmentIDs, task.createdSegmentationNode = None, [], False
        return
    for s in loaded:
        _snapToVolumeGeometry(s.image, volumeNode)

    target = scene.GetNodeByID(task.targetSegmentationNodeID) if task.targetSegmentationNodeID else None
    created = target is None
    addedIDs: list[str] = []
    try:
        if created:
            target = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", _unusedNodeName(scene, f"{volumeNode.GetName()} GMS segmentation"))
            target.CreateDefaultDisplayNodes()
            # the transform first: the reference geometry is computed relative to the node's own parent
            # transform, so set before it the volume's transform would be folded in and then applied again
            if volumeNode.GetTransformNodeID():
                target.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            target.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        else:
            seg = target.GetSegmentation()
            if not seg.GetConversionParameter("Reference image geometry"):
                target.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentation = target.GetSegmentation()
        wasModifying = target.StartModify()
        try:
            for s in loaded:
                segment = slicer.vtkSegment()
                name = uniqueSegmentName(segmentation, s.name)
                segment.SetName(name)
                if hasattr(segment, "SetNameAutoGenerated"):
                    segment.SetNameAutoGenerated(False)
                if s.color is not None:
                    segment.SetColor(*s.color)
                    if hasattr(segment, "SetColorAutoGenerated"):
                        segment.SetColorAutoGenerated(False)
                if s.terminology:
                    if hasattr(segment, "SetTerminology"):
                        segment.SetTerminology(str(s.terminology))
                    else:
                        segment.SetTag("TerminologyEntry", str(s.terminology))
                segment.AddRepresentation(_BINARY_LABELMAP, s.image)
                segmentID = segmentation.GenerateUniqueSegmentID(re.sub(r"\W+", "_", s.name).strip("_") or "GMS")
                if not segmentation.AddSegment(segment, segmentID):
                    raise RuntimeError(f"cannot add segment '{name}'")
                addedIDs.append(segmentID)
        finally:
            target.EndModify(wasModifying)
    except BaseException:
        if target is not None:
            _takeBack(scene, target, created, addedIDs)
        raise
    task.segmentationNodeID = target.GetID()
    task.segmentIDs = addedIDs
    task.createdSegmentationNode = created


def _unusedNodeName(scene, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ... when a node of the scene has it (unlike GenerateUniqueName, names of
    removed nodes, e.g. of a cancelled job's results, count as free)."""
    candidate, k = name, 0
    while scene.GetFirstNodeByName(candidate) is not None:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _takeBack(scene, node, created: bool, segmentIDs: Sequence[str]) -> None:
    """Undo an import into segmentation ``node``: remove the node if the import created it, else the segments it
    added (a failed import, or a cancel while a batch was being imported)."""
    if created:
        _removeNode(scene, node)
        return
    for sid in segmentIDs:
        with contextlib.suppress(Exception):
            node.GetSegmentation().RemoveSegment(sid)
