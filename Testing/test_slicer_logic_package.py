"""The layout of the Slicer-side logic (GMSSegmentLib/slicer_logic/): one module per concern, the one optional
import of slicer / vtk in mrml.py, jobs that import their own results, and files read through imageio."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "GMSSegment"
PACKAGE = MODULE_DIR / "GMSSegmentLib" / "slicer_logic"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from GMSSegmentLib.imageio import Geometry, read_stored  # noqa: E402


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative ones as written, e.g. ``.mrml``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
    return out


def test_every_module_is_small_and_only_mrml_imports_slicer_or_vtk():
    files = sorted(PACKAGE.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "mrml.py", "states.py", "jobs.py", "logic.py"}
    for path in files:
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 600, path.name
        mrml = {m for m in _imports(path) if m.split(".")[0] in ("slicer", "vtk", "qt", "ctk")}
        if path.name == "mrml.py":
            assert mrml == {"slicer", "vtk"}
        else:  # vtk.util.numpy_support is loaded inside functions, after mrml found vtk
            assert mrml <= {"vtk.util.numpy_support"}, (path.name, mrml)


def test_jobs_do_not_call_back_into_the_logic():
    for name in ("workerjob.py", "jobs.py"):
        source = (PACKAGE / name).read_text(encoding="utf-8")
        assert ".logic" not in _imports(PACKAGE / name), name
        attributes = {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)}
        assert "logic" not in attributes and "_importTask" not in attributes, name


def test_package_keeps_the_old_module_api():
    from GMSSegmentLib import slicer_logic as L

    assert all(hasattr(L, name) for name in L.__all__)
    assert Path(L.moduleDirectory()) == MODULE_DIR  # the worker's PYTHONPATH: the folder holding GMSSegmentLib
    assert "How a job runs" in L.__doc__


def test_read_stored_keeps_type_components_and_constant_images(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    labels = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))  # an empty result: constant, still a label map
    labels.SetOrigin((1.0, 2.0, 3.0))
    labels.SetSpacing((0.5, 0.75, 2.0))
    labels.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    array, geometry = read_stored(tmp_path / "labels.nrrd")
    assert array.dtype == np.int16 and array.shape == (3, 4, 5) and not array.any()
    assert geometry == Geometry(3, (5, 4, 3), (1.0, 2.0, 3.0), (0.5, 0.75, 2.0),
                                (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))

    rgba = np.random.default_rng(0).integers(0, 256, (6, 7, 4)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "photo.png"))
    array, geometry = read_stored(tmp_path / "photo.png")
    assert array.shape == (1, 6, 7, 4) and array.dtype == np.uint8 and np.array_equal(array[0], rgba)
    assert geometry.dimension == 2 and geometry.size == (7, 6)


def test_import_result_adds_a_new_segmentation_node_without_the_segment_found_nowhere(tmp_path):
    slicer = pytest.importorskip("slicer")
    from GMSSegmentLib.slicer_logic import resultimport, states

    scene = slicer.vtkMRMLScene()
    segLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segLogic.SetMRMLScene(scene)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "vol")
    slicer.util.updateVolumeFromArray(volume, np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    volume.SetSpacing(0.5, 0.75, 2.0)
    volume.SetOrigin(10.0, -4.0, 7.0)
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 1:3, 2:4] = 1
    path = str(tmp_path / "result.nrrd")
    from GMSSegmentLib.slicer_logic.geometry import _writeVolumeArray, ijkToRasFromVolumeNode

    _writeVolumeArray(labels, ijkToRasFromVolumeNode(volume), path)
    task = states.VolumeTask(index=0, volumeNodeID=volume.GetID(), volumeName="vol", inputPath="", outputPath=path,
                             segments=[{"name": "lesion", "label": 1, "color": [1, 0, 0], "terminology": None},
                                       {"name": "cyst", "label": 2, "color": None, "terminology": None}])
    resultimport.importResult(scene, task)
    node = scene.GetNodeByID(task.segmentationNodeID)
    assert task.createdSegmentationNode and node.GetName() == "vol GMS segmentation"
    segmentation = node.GetSegmentation()
    # "cyst" is nowhere in the result: no empty segment for the user to delete; the task says it was not found
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["lesion"]
    assert len(task.segmentIDs) == 1 and task.notFound == ["cyst"] and task.foundText == "no cyst found"
