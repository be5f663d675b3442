"""Where to look, in the scene (slicer_logic/review.py) on slicer-core: a result's uncertainty map arrives as a scalar
volume on its volume's grid, equal to the command line's map; the batch's review order; the slice scores and the jump
of the slice views to the next uncertain slice."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_helpers import *  # noqa: F401,F403 (helpers and fixtures)
from conftest import run_gms


def _task(score=None, slices=(), axis=None) -> L.VolumeTask:
    return L.VolumeTask(index=0, volumeNodeID="", volumeName="v", inputPath="", outputPath="", uncertainty=score,
                        sliceUncertainty=list(slices), sliceAxis=axis)


def test_review_order_and_the_slices_to_look_at():
    a, b, c = _task(0.1), _task(0.6), _task(None)
    assert L.reviewOrder([a, c, b]) == [b, a, c]
    t = _task(0.3, [0.0, 0.5, 0.2, 0.0, 0.9], axis=0)
    assert L.uncertainSlices(t) == [4, 1, 2]  # slices scoring 0 (nothing there, no hesitation) are left out
    assert [L.nextUncertainSlice(t, c) for c in (None, 4, 1, 2, 3)] == [4, 1, 2, 4, 4]
    assert L.nextUncertainSlice(_task(0.0, [0.0, 0.0], 0)) is None


def test_result_event_scores_are_kept_and_malformed_ones_ignored():
    t = _task()
    L.takeScores(t, {"uncertainty": 0.25, "slice_uncertainty": {"axis": 0, "scores": [0.1, 0.2]},
                     "uncertainty_path": "/x/u.nrrd"})
    assert (t.uncertainty, t.sliceUncertainty, t.sliceAxis, t.uncertaintyPath) == (0.25, [0.1, 0.2], 0, "/x/u.nrrd")
    L.takeScores(t, {"uncertainty": "n/a", "slice_uncertainty": {"axis": 0}})
    assert t.uncertainty is None and t.sliceUncertainty == [] and t.sliceAxis is None


@pytest.fixture()
def full_hippocampus(shared_dir):
    return Path(shared_dir) / "data" / "hippocampus" / "imagesTr" / "hippocampus_025.nii.gz"


def test_segmenting_brings_the_map_and_the_scores_and_jumps_to_uncertain_slices(
        scene, logic, temp_root, full_hippocampus, weights_dir, tmp_path):
    model = MODULE_DIR / "Resources" / "Models" / "hippocampus"
    p = run_gms("segment", full_hippocampus, "-o", tmp_path / "m.nii.gz", "--uncertainty", tmp_path / "u.nrrd",
                "--model", model, "--device", "cpu", "--progress", "none")
    assert p.returncode == 0, p.stderr
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "u.nrrd")))
    volume = load_volume_with_slicer(scene, full_hippocampus)
    job = logic.segment(volume, str(model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    assert job.state == L.JobState.SUCCEEDED, job.errorMessage
    task = job.tasks[0]
    dims = volume.GetImageData().GetDimensions()
    assert 0.0 < task.uncertainty < 1.0 and task.sliceAxis in (0, 1, 2)
    assert len(task.sliceUncertainty) == dims[2 - task.sliceAxis]
    node = scene.GetNodeByID(task.uncertaintyNodeID)
    assert node is not None and node.IsA("vtkMRMLScalarVolumeNode") and "uncertainty" in node.GetName()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), expected)
    np.testing.assert_allclose(L.ijkToRasFromVolumeNode(node), L.ijkToRasFromVolumeNode(volume), atol=1e-9)
    display = node.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.1)
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert os.listdir(temp_root) == []

    red = slicer.vtkMRMLSliceNode()
    red.SetLayoutName("Red")
    scene.AddNode(red)
    first = L.nextUncertainSlice(task)
    assert first == int(np.argmax(task.sliceUncertainty))
    r, a, s = L.jumpToSlice(scene, task, first)
    m = red.GetSliceToRAS()
    assert [m.GetElement(i, 3) for i in range(3)] == pytest.approx([r, a, s])
    # that point lies on the slice: back in IJK it has the slice's index along the scores' axis
    ijk = np.linalg.inv(L.ijkToRasFromVolumeNode(volume)) @ np.array([r, a, s, 1.0])
    assert ijk[2 - task.sliceAxis] == pytest.approx(first)
    assert L.nextUncertainSlice(task, first) != first

    # the map goes with its result: a removed import takes it back
    job._removeImport(task)
    assert scene.GetNodeByID(node.GetID()) is None and task.uncertaintyNodeID is None


def test_no_map_when_not_asked_for(scene, logic, busi_images, weights_dir):
    volume = L.addVolumeNodeFromFile(scene, busi_images["gray"])
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    job = logic.start(volume, "busi-lesion", device="cpu", weightsDir=weights_dir, tta=False, uncertaintyMap=False)
    job.wait(JOB_TIMEOUT)
    assert job.state == L.JobState.SUCCEEDED, job.errorMessage
    assert job.tasks[0].uncertaintyNodeID is None and 0.0 <= job.tasks[0].uncertainty <= 1.0
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before
