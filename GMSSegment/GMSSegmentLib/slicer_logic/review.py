"""Where to look, in the scene: a result's uncertainty map as a scalar volume shown over its image, the order in
which a batch's results deserve a look, and the slices of a volume by their score (uncertainty.py says what the
numbers mean).

The worker writes the map (``gms segment --uncertainty``) and reports the case score and, for volumes, one score per
slice along a numpy axis of the input (``slice_uncertainty``); :class:`~.states.VolumeTask` keeps them. Everything
here is MRML only (no qt); the widget shows the map in the slice views' foreground and calls :func:`jumpToSlice`.
"""
from __future__ import annotations

import numpy as np

from .geometry import _vtkMatrix, ijkToRasFromVolumeNode
from .mrml import _removeNode, slicer
from .resultimport import addVolumeNodeFromFile
from .states import VolumeTask

#: colour table of the map: Slicer's built-in "Iron" heat scale (black - red - yellow - white)
HEAT_COLOR_NODE_ID = "vtkMRMLColorTableNodeIron"
#: voxels surer than this are not drawn (the map's lower threshold), so only hesitation shows over the image
SHOW_ABOVE = 0.1


def takeScores(task: VolumeTask, event: dict) -> None:
    """Keep what a worker's ``result`` event says about the result's uncertainty (malformed fields are ignored)."""
    try:
        task.uncertainty = float(event["uncertainty"])
    except (KeyError, TypeError, ValueError):
        task.uncertainty = None
    per = event.get("slice_uncertainty")
    try:
        task.sliceUncertainty = [float(v) for v in per["scores"]]
        task.sliceAxis = int(per["axis"])
    except (TypeError, KeyError, ValueError):
        task.sliceUncertainty, task.sliceAxis = [], None
    path = event.get("uncertainty_path")
    if path:
        task.uncertaintyPath = str(path)


def importUncertainty(scene, task: VolumeTask):
    """Load a task's uncertainty map as a scalar volume node on its volume's grid, heat colours over [0, 1] with the
    surest voxels transparent; returns the node (None without a map). The node ID is kept in the task, so a cancel
    takes it back with the segments (:func:`removeUncertainty`)."""
    if not task.uncertaintyPath:
        return None
    volumeNode = scene.GetNodeByID(task.volumeNodeID)
    if volumeNode is None:
        raise ValueError("the input volume was removed from the scene")
    node = addVolumeNodeFromFile(scene, task.uncertaintyPath, name=f"{volumeNode.GetName()} GMS uncertainty")
    try:
        node.SetIJKToRASMatrix(_vtkMatrix(ijkToRasFromVolumeNode(volumeNode)))  # the volume's own grid
        if volumeNode.GetTransformNodeID():
            node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        display = node.GetDisplayNode()
        if scene.GetNodeByID(HEAT_COLOR_NODE_ID) is not None:
            display.SetAndObserveColorNodeID(HEAT_COLOR_NODE_ID)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(1)
        display.SetLowerThreshold(SHOW_ABOVE)
        display.SetUpperThreshold(1.0)
    except BaseException:
        _removeNode(scene, node)
        raise
    task.uncertaintyNodeID = node.GetID()
    return node


def removeUncertainty(scene, task: VolumeTask) -> None:
    node = scene.GetNodeByID(task.uncertaintyNodeID) if task.uncertaintyNodeID else None
    if node is not None:
        _removeNode(scene, node)
    task.uncertaintyNodeID = None


def reviewOrder(tasks) -> list:
    """The tasks with a score, most uncertain first (the batch table's order); those without one follow in their
    order."""
    scored = [t for t in tasks if t.uncertainty is not None]
    rest = [t for t in tasks if t.uncertainty is None]
    return sorted(scored, key=lambda t: -t.uncertainty) + rest


def uncertainSlices(task: VolumeTask, minimum: float = 0.0) -> list[int]:
    """Slice indices (along ``task.sliceAxis``) by score, most uncertain first; slices scoring ``minimum`` or less
    (nothing there, and nothing the model hesitated over) are left out."""
    scores = np.asarray(task.sliceUncertainty or [], dtype=float)
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order if scores[i] > minimum]


def nextUncertainSlice(task: VolumeTask, current: int | None = None) -> int | None:
    """The slice to look at after ``current`` in :func:`uncertainSlices`' order (the first when ``current`` is None
    or not in it; it starts again after the last); None when no slice has a score above 0."""
    order = uncertainSlices(task)
    if not order:
        return None
    if current is None or current not in order:
        return order[0]
    return order[(order.index(current) + 1) % len(order)]


def sliceCenterRas(volumeNode, numpyAxis: int, index: int) -> tuple[float, float, float]:
    """RAS position of the centre of slice ``index`` along numpy axis ``numpyAxis`` (0 = K, 1 = J, 2 = I) of the
    volume (its own IJK-to-RAS; a parent transform is not applied)."""
    dims = volumeNode.GetImageData().GetDimensions()  # I, J, K
    ijk = [(d - 1) / 2.0 for d in dims]
    ijk[2 - int(numpyAxis)] = float(index)
    ras = ijkToRasFromVolumeNode(volumeNode) @ np.array(ijk + [1.0])
    return float(ras[0]), float(ras[1]), float(ras[2])


def jumpToSlice(scene, task: VolumeTask, index: int) -> tuple[float, float, float]:
    """Move every slice view to slice ``index`` of the task's volume (centred on it); returns the RAS point."""
    volumeNode = scene.GetNodeByID(task.volumeNodeID)
    if volumeNode is None:
        raise ValueError("the volume was removed from the scene")
    r, a, s = sliceCenterRas(volumeNode, task.sliceAxis, index)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return r, a, s
