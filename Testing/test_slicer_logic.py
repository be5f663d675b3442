"""The Slicer-side logic (GMSSegmentLib.slicer_logic) on the headless MRML library (slicer-core), with the real worker.

End to end: volume nodes made from real data (BUSI ultrasound as RGB vector and as scalar volume, a hippocampus MRI
volume) are segmented by the engine command line running as a background worker, and the imported segmentation is
compared with what ``python -m GMSSegmentLib segment`` writes for the same input file. Also: cancel, a worker killed
with SIGKILL, re-runs that must not touch edited segments, and a batch with broken volumes.

Needs the ``tiny_model`` and ``shared_dir`` fixtures (Testing/conftest.py); one test also runs the bundled busi-lesion
and hippocampus models, whose masks of these images are not empty.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from slicer_helpers import *  # noqa: F401,F403 (helpers and fixtures)


# --------------------------------------------------------------------------------------------------- end to end


def test_reference_outputs_are_not_trivial(two_segment_model, cli_reference):
    """Guard against vacuous comparisons: the two-segment model finds every one of its labels somewhere."""
    labels = {int(v) for arr in cli_reference(two_segment_model).values() for v in np.unique(arr)}
    assert labels == {0, 1, 5}
    for arr in cli_reference(two_segment_model).values():
        assert (arr != 0).any() and (arr == 0).any()


def test_busi_rgb_vector_volume(scene, logic, temp_root, busi_images, model, weights_dir, cli_reference):
    volume = L.addVolumeNodeFromFile(scene, busi_images["rgb"])
    assert volume.IsA("vtkMRMLVectorVolumeNode")
    assert slicer.util.arrayFromVolume(volume).shape[-1] == 3
    job = logic.start(volume, str(model), device="cpu", weightsDir=weights_dir)
    assert job.running and not job.batch
    job.wait(JOB_TIMEOUT)
    check_result(job, volume, model, cli_reference(model)[str(busi_images["rgb"])])
    assert job.progress == 1.0
    assert any("Imported" in line for line in job.log)
    assert os.listdir(temp_root) == []


def test_busi_scalar_volume(scene, logic, temp_root, busi_images, model, weights_dir, cli_reference):
    volume = L.addVolumeNodeFromFile(scene, busi_images["gray"])
    assert volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA("vtkMRMLVectorVolumeNode")
    job = logic.segment(volume, str(model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    check_result(job, volume, model, cli_reference(model)[str(busi_images["gray"])])
    assert os.listdir(temp_root) == []


def test_hippocampus_volume(scene, logic, temp_root, hippocampus_file, model, weights_dir, cli_reference):
    volume = load_volume_with_slicer(scene, hippocampus_file)
    dims = volume.GetImageData().GetDimensions()
    assert dims[2] == 4 and min(dims) > 1
    job = logic.segment(volume, str(model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    check_result(job, volume, model, cli_reference(model)[str(hippocampus_file)])
    # the node's geometry is the file's: compare with SimpleITK's reading of the same file
    # (a model that finds nothing adds no node, see check_result; the two-segment model always adds one)
    img = sitk.ReadImage(str(hippocampus_file))
    expected = L.ijkToRasFromLpsGeometry(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    for node in job.segmentationNodes:
        matrix, _ = reference_geometry(node)
        np.testing.assert_allclose(matrix, expected, atol=1e-5)
    if "two-segment" in str(model):
        assert len(job.segmentationNodes) == 1
    assert os.listdir(temp_root) == []


@pytest.mark.parametrize("name, inputs", [("busi-lesion", ("rgb", "gray")), ("hippocampus", ("hippocampus",))])
def test_bundled_models_through_the_worker(scene, logic, temp_root, busi_images, hippocampus_file, weights_dir,
                                           tmp_path, name, inputs):
    """The shipped models on their own modality, with their cards' inference options: real lesions and hippocampi,
    so the masks compared are not empty (the briefly trained test model finds nothing in these images). The worker's
    imported segments equal the command line's label maps, and the command line finds every segment somewhere."""
    model = MODULE_DIR / "Resources" / "Models" / name
    files = {"rgb": busi_images["rgb"], "gray": busi_images["gray"], "hippocampus": hippocampus_file}
    paths = [files[k] for k in inputs]
    expected = cli_segment(paths, model, weights_dir, tmp_path / "cli")
    assert {int(v) for arr in expected.values() for v in np.unique(arr)} == \
        {0} | {s["label"] for s in card_of(model)["segments"]}
    for path in paths:
        if path == hippocampus_file:
            volume = load_volume_with_slicer(scene, path)
        else:
            volume = L.addVolumeNodeFromFile(scene, path)
        job = logic.segment(volume, str(model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
        check_result(job, volume, model, expected[str(path)])
        # each segment carries the card's codes as Slicer's terminology entry: Slicer's own DICOM export of the node
        # writes them into its SEG (category and type, the 2nd and 3rd of the entry's seven parts)
        segmentation = job.segmentationNodes[0].GetSegmentation()
        cards = {s["name"]: s["terminology"] for s in card_of(model)["segments"]}
        for k in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(k)
            if hasattr(segment, "GetTerminology"):  # Slicer 5.10 and later
                entry = segment.GetTerminology()
            else:
                value = vtk.reference("")
                segment.GetTag("TerminologyEntry", value)
                entry = str(value)
            parts = entry.split("~")
            codes = cards[segment.GetName()]
            assert parts[1:3] == ["^".join(codes["category"]), "^".join(codes["type"])], entry
    assert os.listdir(temp_root) == []


def test_test_time_augmentation_switch_reaches_the_worker(scene, logic, busi_images, two_segment_model, weights_dir,
                                                         tmp_path):
    """The module's 'Test-time augmentation' box. On: the worker uses the card's choice (here two input sizes, as
    chosen for busi-lesion); off: it runs one plain pass (--no-tta). Each result is what the command line writes with
    the same switch, and the two differ."""
    folder = tmp_path / "two-scales"
    shutil.copytree(two_segment_model, folder)
    card = json.loads((folder / "card.json").read_text())
    card["tta"] = {"views": 1, "scales": [224, 256]}
    (folder / "card.json").write_text(json.dumps(card))
    results = {}
    for tta in (True, False):
        volume = L.addVolumeNodeFromFile(scene, busi_images["gray"])
        job = logic.start(volume, str(folder), device="cpu", weightsDir=weights_dir, tta=tta)
        assert ("--no-tta" in job.args) == (not tta)
        job.wait(JOB_TIMEOUT)
        out = tmp_path / f"cli-{tta}"
        expected = cli_segment([busi_images["gray"]], folder, weights_dir, out, () if tta else ("--no-tta",))
        results[tta] = expected[str(busi_images["gray"])]
        check_result(job, volume, folder, results[tta])
    assert not np.array_equal(results[True], results[False])


# ------------------------------------------------------------------------------------------------ cancel / crash


@pytest.fixture
def long_volume(scene, shared_dir):
    """A real MRI volume with enough slices that the worker is still busy when we interrupt it."""
    src = sorted((Path(shared_dir) / "data" / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    return load_volume_with_slicer(scene, src)


def _start_and_wait_for_slices(logic, volume, model, weights_dir):
    job = logic.start(volume, str(model), device="cpu", weightsDir=weights_dir, axis=0)
    assert wait_until(lambda: job.finished or job.tasks[0].state == L.TaskState.RUNNING, JOB_TIMEOUT, job), \
        "the worker never started segmenting"
    assert job.running, (job.state, job.errorMessage, job.log[-10:])
    return job


def test_cancel_mid_run(scene, logic, temp_root, long_volume, tiny_model, weights_dir):
    before = scene_state(scene)
    job = _start_and_wait_for_slices(logic, long_volume, tiny_model, weights_dir)
    assert os.listdir(temp_root)  # the job folder exists while it runs
    t0 = time.monotonic()
    job.cancel()
    assert wait_until(lambda: job.finished, 2.0, job), "cancel did not take effect within 2 s"
    assert time.monotonic() - t0 < 2.0
    assert job.state == L.JobState.CANCELLED
    assert job.statusText == "Cancelled"
    assert "cancel" in job.errorMessage
    assert all(t.state == L.TaskState.CANCELLED for t in job.tasks)
    assert scene_state(scene) == before
    assert os.listdir(temp_root) == []
    assert_process_group_gone(job.pid)
    assert not logic.running


def test_worker_killed_with_sigkill(scene, logic, temp_root, long_volume, tiny_model, weights_dir):
    if os.name == "nt":
        pytest.skip("POSIX signals")
    before = scene_state(scene)
    job = _start_and_wait_for_slices(logic, long_volume, tiny_model, weights_dir)
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(30) == L.JobState.FAILED
    assert "killed by SIGKILL" in job.errorMessage
    assert job.returnCode == -signal.SIGKILL
    assert "killed by SIGKILL" in job.statusText
    assert scene_state(scene) == before
    assert os.listdir(temp_root) == []


# ---------------------------------------------------------------------------------------------------------- re-run


def test_rerun_keeps_edited_segment(scene, logic, busi_images, two_segment_model, weights_dir):
    volume = L.addVolumeNodeFromFile(scene, busi_images["gray"])
    card = card_of(two_segment_model)
    first = logic.segment(volume, str(two_segment_model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    assert first.state == L.JobState.SUCCEEDED, first.errorMessage
    node = first.segmentationNodes[0]
    seg = node.GetSegmentation()
    # the segments the model drew in this image (one it finds nowhere is not added: nothing to delete)
    found = [s for s in card["segments"] if s["name"] not in first.tasks[0].notFound]
    assert found and seg.GetNumberOfSegments() == len(found)
    segmentID = seg.GetNthSegmentID(0)
    name = seg.GetSegment(segmentID).GetName()

    predicted = segment_on_volume_grid(node, segmentID, volume)
    assert predicted.any()

    # the user edits the segment: a rectangle that the model would hardly produce
    edited = np.zeros(tuple(reversed(volume.GetImageData().GetDimensions())), np.uint8)
    edited[0, 10:40, 20:90] = 1
    assert not np.array_equal(edited, predicted)
    set_segment_array(node, segmentID, volume, edited)
    assert np.array_equal(segment_on_volume_grid(node, segmentID, volume), edited)
    seg.GetSegment(segmentID).SetColor(0.1, 0.2, 0.3)

    # re-run into the same segmentation node: new, uniquely named segments; the edited one is untouched
    second = logic.segment(volume, str(two_segment_model), device="cpu", weightsDir=weights_dir,
                           outputSegmentationNode=node, timeout=JOB_TIMEOUT)
    assert second.state == L.JobState.SUCCEEDED, second.errorMessage
    assert second.segmentationNodes == [node]
    assert seg.GetNumberOfSegments() == 2 * len(found)
    names = [seg.GetNthSegment(k).GetName() for k in range(seg.GetNumberOfSegments())]
    assert names[: len(found)] == [s["name"] for s in found]
    assert names[len(found):] == [f"{s['name']} (2)" for s in found]
    assert segmentID not in second.tasks[0].segmentIDs
    assert np.array_equal(segment_on_volume_grid(node, segmentID, volume), edited)
    assert seg.GetSegment(segmentID).GetColor() == pytest.approx((0.1, 0.2, 0.3))
    assert seg.GetSegment(segmentID).GetName() == name

    # re-run without an output node: a new segmentation node; the first node is untouched
    third = logic.segment(volume, str(two_segment_model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    assert third.state == L.JobState.SUCCEEDED, third.errorMessage
    assert third.segmentationNodes[0] is not node
    assert third.segmentationNodes[0].GetName() != node.GetName()
    assert seg.GetNumberOfSegments() == 2 * len(found)
    assert np.array_equal(segment_on_volume_grid(node, segmentID, volume), edited)
    # both re-runs produced what the first run produced before the edit
    third_node = third.segmentationNodes[0]
    assert_masks_agree(segment_on_volume_grid(node, second.tasks[0].segmentIDs[0], volume), predicted, "second run")
    assert_masks_agree(segment_on_volume_grid(third_node, third.tasks[0].segmentIDs[0], volume), predicted, "third run")


# ----------------------------------------------------------------------------------------------------------- batch


def test_batch_with_broken_volumes(scene, logic, temp_root, busi_images, two_segment_model, weights_dir, cli_reference):
    good_gray = L.addVolumeNodeFromFile(scene, busi_images["gray"])
    constant = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "constant")
    slicer.util.updateVolumeFromArray(constant, np.full((1, 64, 64), 7, np.int16))
    nan = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nan")
    arr = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    arr[0, 5, 5] = np.nan
    slicer.util.updateVolumeFromArray(nan, arr)
    good_rgb = L.addVolumeNodeFromFile(scene, busi_images["rgb"])
    volumes = [good_gray, constant, nan, good_rgb]
    assert logic.loadedVolumes(scene) == volumes

    job = logic.start(volumes, str(two_segment_model), device="cpu", weightsDir=weights_dir)
    assert job.batch
    seen_running = set()
    while not job.finished:
        job.poll()
        seen_running |= {t.index for t in job.tasks if t.state == L.TaskState.RUNNING}
        time.sleep(0.05)
        assert time.monotonic() - job.startTime < JOB_TIMEOUT
    assert job.state == L.JobState.PARTIAL, (job.errorMessage, job.log[-20:])
    states = [t.state for t in job.tasks]
    assert states == [L.TaskState.SUCCEEDED, L.TaskState.FAILED, L.TaskState.FAILED, L.TaskState.SUCCEEDED]
    assert "constant" in job.tasks[1].message
    assert "NaN" in job.tasks[2].message
    assert "constant" in job.errorMessage and "nan:" in job.errorMessage
    assert "2 of 4" in job.statusText
    # the successful volumes were imported, each in its own new node, exactly like the command line does
    nodes = job.segmentationNodes
    assert len(nodes) == 2
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    for task, volume, key in ((job.tasks[0], good_gray, "gray"), (job.tasks[3], good_rgb, "rgb")):
        node = scene.GetNodeByID(task.segmentationNodeID)
        assert_same_geometry(node, volume)
        expected = cli_reference(two_segment_model)[str(busi_images[key])]
        card = card_of(two_segment_model)
        for k, spec in enumerate(card["segments"]):
            got = segment_on_volume_grid(node, node.GetSegmentation().GetNthSegmentID(k), volume)
            assert np.array_equal(got, (expected == spec["label"]).astype(np.uint8))
    for task in job.tasks[1:3]:
        assert task.segmentationNodeID is None
    assert job.progress == pytest.approx(1.0)
    assert os.listdir(temp_root) == []


def test_batch_results_are_imported_one_per_poll_and_a_cancel_while_importing_takes_them_back(
        scene, logic, temp_root, busi_images, two_segment_model, weights_dir):
    def count():
        return scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    volumes = [L.addVolumeNodeFromFile(scene, busi_images[k], name=f"import {i}")
               for i, k in enumerate(("gray", "rgb", "gray"))]
    before, n0 = scene_state(scene), count()
    # the random two-segment model draws in every image (an empty result would add no node)
    job = logic.start(volumes, str(two_segment_model), device="cpu", weightsDir=weights_dir, tta=False)
    # the poll that sees the worker's exit imports the first result, and only that one
    assert wait_until(lambda: job.returnCode is not None, JOB_TIMEOUT, job), job.log[-20:]
    assert job.returnCode == 0 and job.running
    assert count() == n0 + 1 and job.statusText == "Importing the results: 1/3"
    assert [t.state for t in job.tasks] == [L.TaskState.SUCCEEDED, L.TaskState.SEGMENTED, L.TaskState.SEGMENTED]
    job.poll()
    assert job.running and count() == n0 + 2 and job.statusText == "Importing the results: 2/3"
    job.cancel()  # the user cancels before the batch has been imported: nothing of it stays
    assert wait_until(lambda: job.finished, 2.0, job)
    assert job.state == L.JobState.CANCELLED
    assert [t.state for t in job.tasks] == [L.TaskState.CANCELLED] * 3
    assert all(t.segmentationNodeID is None for t in job.tasks)
    assert scene_state(scene) == before and job.segmentationNodes == []
    assert "Cancelled: the scene was not changed" in job.log
    assert os.listdir(temp_root) == []

    # the random two-segment model draws in every image (an empty result would add no node)
    job = logic.start(volumes, str(two_segment_model), device="cpu", weightsDir=weights_dir, tta=False)
    counts = [count()]
    while not job.finished:
        job.poll()
        counts.append(count())
        time.sleep(0.02)
        assert time.monotonic() - job.startTime < JOB_TIMEOUT
    assert job.state == L.JobState.SUCCEEDED, (job.errorMessage, job.log[-20:])
    assert counts[-1] == n0 + 3 and max(np.diff(counts)) == 1
    assert [scene.GetNodeByID(t.segmentationNodeID).GetName() for t in job.tasks] == \
        [f"import {i} GMS segmentation" for i in range(3)]

    # a result that cannot be imported counts as handled: the count goes on to 2/3 instead of shrinking to 1/2
    # the random two-segment model draws in every image (an empty result would add no node)
    job = logic.start(volumes, str(two_segment_model), device="cpu", weightsDir=weights_dir, tta=False)
    assert wait_until(lambda: job.returnCode is not None, JOB_TIMEOUT, job), job.log[-20:]
    assert job.statusText == "Importing the results: 1/3"
    os.remove(job.tasks[1].outputPath)
    job.poll()
    assert job.tasks[1].state == L.TaskState.FAILED and job.statusText == "Importing the results: 2/3"
    assert wait_until(lambda: job.finished, 5.0, job)
    assert job.state == L.JobState.PARTIAL and "wrote no file" in job.errorMessage


# ------------------------------------------------------------------------------------- errors reported clearly


def test_bad_model_folder_fails_cleanly(scene, logic, temp_root, busi_images, tmp_path, weights_dir):
    volume = L.addVolumeNodeFromFile(scene, busi_images["gray"])
    before = scene_state(scene)
    # not a model folder at all: refused before anything starts
    with pytest.raises(ValueError, match="card.json"):
        logic.start(volume, str(tmp_path))
    assert os.listdir(temp_root) == []
    # a card but no weights: the worker reports it (exit code 2) and the job fails with its message
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "card.json").write_text(json.dumps({"name": "broken", "segments": [
        {"name": "lesion", "label": 1, "color": [1, 0, 0]}], "input_size": 224, "axis": 0, "foundation": {}}))
    job = logic.segment(volume, str(broken), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    assert job.state == L.JobState.FAILED
    assert job.returnCode == 2
    assert "model.safetensors" in job.errorMessage
    assert scene_state(scene) == before
    assert os.listdir(temp_root) == []


@pytest.mark.parametrize("room, fails", [(4096, "uncertainty_0.nrrd"), (0, "input_0.nrrd")],
                         ids=["result-write", "input-export"])
def test_job_on_a_full_disk_reports_the_failed_write_and_imports_nothing(scene, tmp_path, weights_dir, room, fails):
    """The logic exports the worker's input, and the worker writes its result, through the same checked write as
    ``gms segment``: on a full disk (a small tmpfs mounted by the test) the job fails with the failed write's
    message (the input's before any worker starts; of the result, its uncertainty map, written first), says no
    "Segmented", imports nothing and leaves no file."""
    from smalldisk import fill, small_tmpfs

    with small_tmpfs(tmp_path / "disk", size="1m") as disk:
        logic = L.SegmentationLogic(scene=scene, tempRoot=str(disk))
        try:
            volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
            pixels = np.random.default_rng(2).integers(0, 256, (1, 32, 32)).astype(np.uint8)
            slicer.util.updateVolumeFromArray(volume, pixels)
            before = scene_state(scene)
            fill(disk, leave=room)  # one page: room for the exported input, none for the result
            job = logic.segment(volume, "busi-lesion", device="cpu", weightsDir=weights_dir, tta=False,
                                timeout=JOB_TIMEOUT)
        finally:
            logic.shutdown()
        assert job.state == L.JobState.FAILED, job.log
        assert job.errorMessage.startswith("cannot write ") and job.errorMessage.endswith(
            f"{fails}: no space left on the device"), job.errorMessage
        assert not any("Segmented" in line for line in job.log), job.log
        if room == 0:  # no worker was started
            assert job.returnCode is None and not any("Started worker" in line for line in job.log), job.log
        else:
            assert job.returnCode == 2
        assert job.segmentationNodes == []
        assert scene_state(scene) == before
        assert os.listdir(disk) == ["filler"]


MAKE_JOB_FOLDER = """
import sys, time
from GMSSegmentLib.ownedtemp import make_temp_folder
folder = make_temp_folder(sys.argv[1], sys.argv[2])
open(folder + "/input_0.nrrd", "wb").write(b"half an input")
print(folder, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_logic_at_start_removes_the_folders_a_killed_slicer_left(scene, tmp_path):
    """Job folders of a Slicer killed mid-job are removed when a logic starts (and a staged model when the next is
    staged beside it), once stale; those of a running process, fresh ones, and anything not of its naming stay."""
    root = tmp_path / "jobs"
    root.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))

    def folder_of_a_process(prefix: str, kill: bool) -> tuple[Path, subprocess.Popen]:
        proc = subprocess.Popen([sys.executable, "-c", MAKE_JOB_FOLDER, str(root), prefix], stdout=subprocess.PIPE,
                                text=True, env=env)
        folder = Path(proc.stdout.readline().strip())
        proc.stdout.close()
        if kill:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        return folder, proc

    killed, _ = folder_of_a_process("GMSSegment-", kill=True)
    killed_staging, _ = folder_of_a_process(".gms-model-", kill=True)
    running, alive = folder_of_a_process("GMSSegment-", kill=False)
    try:
        fresh, _ = folder_of_a_process("GMSSegment-", kill=True)
        others = [root / "GMSSegment-notes", root / "GMSSegment-12x-y"]
        for p in others:
            p.mkdir()
        a_file = root / f"GMSSegment-{alive.pid + 1000000}-file"
        a_file.write_text("not a folder")
        old = time.time() - STALE_AFTER_S - 60
        for p in [killed, killed_staging, running, *others, a_file]:
            os.utime(p, (old, old))

        logic = L.SegmentationLogic(scene=scene, tempRoot=str(root))
        logic.shutdown()
        assert not killed.exists()
        assert all(p.exists() for p in [running, fresh, *others, a_file])
        # a model staged for publishing lives beside its target: removed when one is next published there
        assert killed_staging.exists()
        source = tmp_path / "trained"
        source.mkdir()
        (source / "card.json").write_text("{}")
        assert L._publishFolder(str(source), str(root / "model")) == str(root / "model")
        assert not killed_staging.exists()
    finally:
        alive.kill()
        alive.wait(30)


def test_invalid_requests_change_nothing(scene, logic, temp_root, tiny_model):
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labelmap, np.zeros((1, 8, 8), np.uint8))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ok")
    slicer.util.updateVolumeFromArray(volume, np.arange(64, dtype=np.int16).reshape(1, 8, 8))
    before = scene_state(scene)
    with pytest.raises(ValueError, match="not a scalar or RGB volume"):
        logic.start(labelmap, str(tiny_model))
    with pytest.raises(ValueError, match="no image data"):
        logic.start(empty, str(tiny_model))
    with pytest.raises(ValueError, match="unknown device"):
        logic.start(volume, str(tiny_model), device="tpu")
    with pytest.raises(ValueError, match="axis"):
        logic.start(volume, str(tiny_model), axis=3)
    with pytest.raises(ValueError, match="model not found"):
        logic.start(volume, str(temp_root / "nope"))
    with pytest.raises(ValueError, match="weights folder"):
        logic.start(volume, str(tiny_model), weightsDir=str(temp_root / "nope"))
    with pytest.raises(ValueError, match="no volume"):
        logic.start([], str(tiny_model))
    with pytest.raises(ValueError, match="twice"):
        logic.start([volume, volume], str(tiny_model))
    assert scene_state(scene) == before
    assert os.listdir(temp_root) == []
    assert not logic.running
