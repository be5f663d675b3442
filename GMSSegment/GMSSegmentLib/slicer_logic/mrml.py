"""The one place that imports Slicer's ``slicer`` and ``vtk`` (in the Slicer application and with the headless
``slicer-core``; None when the engine is installed without MRML), and a helper to remove a node cleanly."""
from __future__ import annotations

import contextlib

try:  # in Slicer and with slicer-core; the engine itself never needs these
    import slicer
    import vtk
except ImportError:  # pragma: no cover - only when the engine is installed without MRML
    slicer = None
    vtk = None


def _removeNode(scene, node) -> None:
    """Remove a node and the display/storage nodes it made."""
    with contextlib.suppress(Exception):
        displayIDs = [node.GetNthDisplayNodeID(i) for i in range(node.GetNumberOfDisplayNodes())]
        for did in displayIDs:
            d = scene.GetNodeByID(did)
            if d is not None:
                scene.RemoveNode(d)
    scene.RemoveNode(node)
