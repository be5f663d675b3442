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

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
sitk = pytest.importorskip("SimpleITK")

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "GMSSegment"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from GMSSegmentLib import slicer_logic as L  # noqa: E402
from GMSSegmentLib.atomicfile import STALE_AFTER_S  # noqa: E402

RGB_PNG = "benign_102.png"  # an RGB (3-channel) BUSI image
JOB_TIMEOUT = 300


# ------------------------------------------------------------------------------------------------------------ helpers


def _array(image) -> np.ndarray:
    import vtk.util.numpy_support as vtk_np

    ext = image.GetExtent()
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    return np.array(vtk_np.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape))


def node_ids(scene) -> list[str]:
    nodes = scene.GetNodes()
    return [nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())]


def scene_state(scene) -> dict:
    """Node IDs plus, for every segmentation node, its segment IDs and the sum of each segment's labelmap."""
    state = {"nodes": node_ids(scene), "segments": {}}
    segs = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for i in range(segs.GetNumberOfItems()):
        node = segs.GetItemAsObject(i)
        seg = node.GetSegmentation()
        state["segments"][node.GetID()] = [
            (seg.GetNthSegmentID(k), seg.GetNthSegment(k).GetName()) for k in range(seg.GetNumberOfSegments())]
    return state


def segment_on_volume_grid(segmentationNode, segmentID, volumeNode) -> np.ndarray:
    """The segment's binary labelmap resampled (nearest) onto the volume's voxel grid, as a (K, J, I) 0/1 array."""
    dims = volumeNode.GetImageData().GetDimensions()
    image = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentID, image)
    if image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return np.zeros(tuple(reversed(dims)), np.uint8)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    reference.SetImageToWorldMatrix(m)
    out = slicer.vtkOrientedImageData()
    assert slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, out)
    arr = _array(out)
    assert arr.shape == tuple(reversed(dims))
    return (arr > 0).astype(np.uint8)


def set_segment_array(segmentationNode, segmentID, volumeNode, array: np.ndarray) -> None:
    """Replace a segment's labelmap with ``array`` (on the volume grid), like a Segment Editor edit."""
    image = L._orientedImage(array.astype(np.uint8), L.ijkToRasFromVolumeNode(volumeNode))
    segLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segLogic.SetMRMLScene(segmentationNode.GetScene())
    assert segLogic.SetBinaryLabelmapToSegment(
        image, segmentationNode, segmentID, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
        image.GetExtent())


def reference_geometry(segmentationNode):
    geometry = segmentationNode.GetSegmentation().GetConversionParameter("Reference image geometry")
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image)
    return L._imageToWorld(image), image.GetExtent()


def assert_same_geometry(segmentationNode, volumeNode):
    matrix, extent = reference_geometry(segmentationNode)
    dims = volumeNode.GetImageData().GetDimensions()
    np.testing.assert_allclose(matrix, L.ijkToRasFromVolumeNode(volumeNode), atol=1e-9)
    assert extent == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentationNode.GetNodeReference(role) is volumeNode
    seg = segmentationNode.GetSegmentation()
    for k in range(seg.GetNumberOfSegments()):  # every labelmap lies exactly on the volume's grid
        image = seg.GetNthSegment(k).GetRepresentation(L._BINARY_LABELMAP)
        np.testing.assert_allclose(L._imageToWorld(image), L.ijkToRasFromVolumeNode(volumeNode), atol=1e-9)


def assert_masks_agree(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """The same model's mask for the same image by two routes (worker vs command line, new vs existing segmentation
    node): equal up to a voxel or two. On 2026-12-01 (commit d9c6ec9) such pairs differed in 1 of 264,702 voxels in
    two tests with the briefly trained test model (they had been equal in every earlier run); the command line itself
    gave bit-identical masks in three runs with busi-lesion, so the cause lies in the routes and is not yet found. On
    2026-12-04 (commit b359aa8; AMD EPYC, AVX512-BF16) all 15 comparisons of this module differed in 0 voxels, and the
    command line gave identical masks for a PNG and for the NRRD the worker writes from it, with 1 or 2 threads, alone
    or beside other inputs. A geometry, orientation or label error changes thousands of voxels."""
    assert got.shape == want.shape
    differ = int((got != want).sum())
    assert differ <= max(2, want.size // 20000), f"{what}: {differ} voxels differ"
    assert got.any() == want.any()


def card_of(model) -> dict:
    return json.loads((Path(model) / "card.json").read_text())


def wait_until(predicate, timeout: float, job=None, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job is not None:
            job.poll()
        if predicate():
            return True
        time.sleep(interval)
    return False


def _live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are still running (zombies waiting to be reaped do not count)."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            live.append(int(entry))
    return live


def assert_process_group_gone(pid: int) -> None:
    """Nothing of the worker's process group (pgid == worker pid) is running any more."""
    if os.name == "nt":
        return
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return
    if os.path.isdir("/proc"):  # members may linger as zombies until an init process reaps them
        assert wait_until(lambda: not _live_group_members(pid), 2.0), _live_group_members(pid)
    else:
        pytest.fail(f"process group {pid} still exists")


# ----------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weights_dir(shared_dir) -> str:
    return str(Path(shared_dir) / "models")


@pytest.fixture(scope="module")
def busi_images(shared_dir) -> dict:
    folder = Path(shared_dir) / "data" / "busi" / "images"
    rgb = folder / RGB_PNG
    if not rgb.is_file() or sitk.ReadImage(str(rgb)).GetNumberOfComponentsPerPixel() != 3:
        rgb = next(p for p in sorted(folder.glob("*.png")) if sitk.ReadImage(str(p)).GetNumberOfComponentsPerPixel() == 3)
    gray = next(p for p in sorted(folder.glob("benign_1*.png")) if sitk.ReadImage(str(p)).GetNumberOfComponentsPerPixel() == 1)
    return {"rgb": rgb, "gray": gray}


@pytest.fixture(scope="module")
def hippocampus_file(shared_dir, tmp_path_factory) -> Path:
    """Four slices of a real hippocampus MRI (with its real geometry, origin moved to the first kept slice) as
    .nii.gz: the same file is loaded into Slicer and given to the command line."""
    src = sorted((Path(shared_dir) / "data" / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    img = sitk.ReadImage(str(src))
    k0 = img.GetSize()[2] // 2 - 2
    sub = img[:, :, k0:k0 + 4]  # SimpleITK slicing keeps the physical position (origin of the first kept slice)
    out = tmp_path_factory.mktemp("hippocampus") / "hippocampus_crop.nii.gz"
    sitk.WriteImage(sub, str(out))
    return out


@pytest.fixture(scope="module")
def two_segment_model(tiny_model, tmp_path_factory) -> Path:
    """A model folder like ``tiny_model`` but with two segments (label values 1 and 5) and seeded random LMM weights.

    The briefly trained tiny model may well find nothing in these images, which would make comparing label maps
    vacuous; this model's predictions are non-empty, and it exercises multi-segment import and label values."""
    torch = pytest.importorskip("torch")
    from GMSSegmentLib.lmm import LatentMappingModel, LMMConfig
    from GMSSegmentLib.model import GMSModel, make_segments

    source = card_of(tiny_model)
    card = {k: v for k, v in source.items() if k not in ("lmm", "trainable_parameters", "format_version", "metrics")}
    card["name"] = "two-segment-random"
    card["segments"] = make_segments(["lesion", "cyst"], labels=[1, 5], colours=[(0.9, 0.2, 0.2), (0.2, 0.5, 0.9)])
    torch.manual_seed(1234)
    config = LMMConfig.from_dict(source["lmm"])
    c = config.latent_channels
    stats = {"image_mean": torch.zeros(c), "image_std": torch.ones(c), "mask_mean": torch.zeros(c),
             "mask_std": torch.ones(c)}
    folder = tmp_path_factory.mktemp("models") / "two-segment-random"
    GMSModel(card, LatentMappingModel(config), stats).save(folder)
    return folder


@pytest.fixture(scope="module", params=["tiny_model", "two_segment_model"])
def model(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def cli_reference(busi_images, hippocampus_file, weights_dir, tmp_path_factory):
    """``reference(model)[input file]``: what ``python -m GMSSegmentLib segment`` writes for each input file (one
    command line run per model for all inputs), as a (K, J, I) label array."""
    cache: dict[str, dict] = {}

    def reference(model) -> dict:
        if str(model) not in cache:
            inputs = [busi_images["rgb"], busi_images["gray"], hippocampus_file]
            cache[str(model)] = cli_segment(inputs, model, weights_dir, tmp_path_factory.mktemp("cli"))
        return cache[str(model)]

    return reference


def cli_segment(inputs, model, weights_dir, out: Path, extra=()) -> dict:
    """{input file: (K, J, I) labels} as ``python -m GMSSegmentLib segment`` writes them into the folder ``out`` (one
    run for all inputs)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "GMSSegmentLib", "segment", *map(str, inputs), "-o", str(out), "--format",
           ".nrrd", "--model", str(model), "--device", "cpu", "--weights-dir", weights_dir, "--progress", "none",
           *extra]
    proc = subprocess.run(cmd, env=L.workerEnvironment(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {}
    for path in inputs:
        name = Path(path).name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        written = out / f"{stem}_gms.nrrd"
        assert written.is_file(), sorted(os.listdir(out))
        img = sitk.ReadImage(str(written))
        arr = sitk.GetArrayFromImage(img)
        result[str(path)] = arr[np.newaxis] if img.GetDimension() == 2 else arr
    return result


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    segLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segLogic.SetMRMLScene(s)  # registers what segmentation nodes need in this scene
    s._gmsSegLogic = segLogic
    return s


@pytest.fixture
def temp_root(tmp_path) -> Path:
    root = tmp_path / "jobs"
    root.mkdir()
    return root


@pytest.fixture
def logic(scene, temp_root):
    lg = L.SegmentationLogic(scene=scene, tempRoot=str(temp_root))
    yield lg
    lg.shutdown()


def load_volume_with_slicer(scene, path: Path):
    """Load a NIfTI/NRRD file with Slicer's own volume reader (vtkSlicerVolumesLogic)."""
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLScene(scene)
    node = volumesLogic.AddArchetypeVolume(str(path), Path(path).name.split(".")[0])
    assert node is not None, f"Slicer could not read {path}"
    return node


def check_result(job, volumeNode, model, expected_labels: np.ndarray) -> None:
    assert job.state == L.JobState.SUCCEEDED, (job.errorMessage, job.log[-20:])
    card = card_of(model)
    nodes = job.segmentationNodes
    # a segment the model found nowhere is not added (nothing for the user to delete); the status says so
    present = [spec for spec in card["segments"] if (expected_labels == spec["label"]).any()]
    missing = [spec["name"] for spec in card["segments"] if spec not in present]
    assert job.tasks[0].notFound == missing
    if missing:
        assert f"no {' or '.join(missing)} found" in job.statusText
    if not present:
        assert nodes == []
        return
    assert len(nodes) == 1
    node = nodes[0]
    assert node.IsA("vtkMRMLSegmentationNode") and node.GetScene() is volumeNode.GetScene()
    assert_same_geometry(node, volumeNode)
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == len(present)
    for k, spec in enumerate(present):
        segment = seg.GetNthSegment(k)
        assert segment.GetName() == spec["name"]
        np.testing.assert_allclose(segment.GetColor(), spec["color"], atol=1e-6)
        got = segment_on_volume_grid(node, seg.GetNthSegmentID(k), volumeNode)
        want = (expected_labels == spec["label"]).astype(np.uint8)
        assert_masks_agree(got, want, spec["name"])


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
    img = sitk.ReadImage(str(hippocampus_file))
    expected = L.ijkToRasFromLpsGeometry(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    matrix, _ = reference_geometry(job.segmentationNodes[0])
    np.testing.assert_allclose(matrix, expected, atol=1e-5)
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


@pytest.mark.parametrize("room, fails", [(4096, "output_0.seg.nrrd"), (0, "input_0.nrrd")],
                         ids=["result-write", "input-export"])
def test_job_on_a_full_disk_reports_the_failed_write_and_imports_nothing(scene, tmp_path, weights_dir, room, fails):
    """The logic exports the worker's input, and the worker writes its result, through the same checked write as
    ``gms segment``: on a full disk (a small tmpfs mounted by the test) the job fails with the failed write's
    message (the input's before any worker starts), says no "Segmented", imports nothing and leaves no file."""
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


# ----------------------------------------------------------------------- the protocol, with a stand-in worker


FAKE_WORKER = textwrap.dedent('''
    import json, os, sys, time
    args = sys.argv[1:]
    mode = os.environ["FAKE_MODE"]
    def emit(**e):
        print(json.dumps(e), flush=True)
    if mode == "crash":
        print("loading things", flush=True)
        emit(event="start", total=4)
        emit(event="progress", done=1, total=4)
        print("Traceback (most recent call last):", file=sys.stderr)
        print("RuntimeError: something broke inside", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode == "noresult":
        emit(event="log", message="hello")
        sys.exit(0)
    if mode == "threshold":  # a result on the input's own grid: voxels above the mean are label 1
        import SimpleITK as sitk
        image = sitk.ReadImage(args[args.index("segment") + 1])
        array = sitk.GetArrayFromImage(image)
        labels = sitk.GetImageFromArray((array > array.mean()).astype("uint8"))
        labels.CopyInformation(image)
        out = args[args.index("-o") + 1]
        sitk.WriteImage(labels, out)
        emit(event="start", total=1)
        emit(event="result", path=out, segments=[{"name": "bright", "label": 1, "color": [1, 0, 0]}])
        sys.exit(0)
    if mode == "sleep":  # busy until ended; with FAKE_IGNORE_TERM it ignores SIGTERM, so only SIGKILL ends it
        import signal
        if os.environ.get("FAKE_IGNORE_TERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(os.environ["FAKE_PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
        emit(event="start", total=100)
        time.sleep(60)
    if mode == "grandchild":  # a child process that would outlive the worker unless the whole group is ended
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open(os.environ["FAKE_PIDFILE"], "w") as f:
            f.write(str(child.pid))
        emit(event="start", total=100)
        time.sleep(60)
''')


@pytest.fixture
def fake_logic(scene, temp_root, tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    lg = L.SegmentationLogic(scene=scene, tempRoot=str(temp_root))
    # the real command line is [python, -m, GMSSegmentLib, ...]; run the stand-in through a tiny wrapper instead
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    wrapper.chmod(0o755)
    lg.pythonExecutable = str(wrapper)
    yield lg
    lg.shutdown()


# CTK's AppLauncher (PythonSlicer) as far as exit codes go: Base/ctkAppLauncher.cpp, applicationFinished(), in
# AppLauncher v0.1.31-v0.1.34 (Slicer 5.8 to main): the program's own exit code after a normal exit; after a crash exit
# (ended by a signal) one stderr line and EXIT_FAILURE
FAKE_LAUNCHER = textwrap.dedent('''
    import subprocess, sys
    rc = subprocess.call(sys.argv[1:])
    if rc < 0:
        print(f"error: [{sys.argv[1]}] exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(rc)
''')


@pytest.fixture
def launcher_logic(fake_logic, tmp_path):
    """``fake_logic`` whose worker runs through a stand-in of Slicer's PythonSlicer launcher (a parent process that
    reports its child's end as the launcher does)."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    wrapper = tmp_path / "PythonSlicer"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {launcher} {sys.executable} {tmp_path / 'fake_worker.py'} "
                       f"\"$@\"\n")
    wrapper.chmod(0o755)
    fake_logic.pythonExecutable = str(wrapper)
    return fake_logic


@pytest.fixture
def card_model(tmp_path) -> Path:
    """A model folder with only a model card (the bundled busi-lesion's): enough for stand-in workers, which never
    load weights."""
    folder = tmp_path / "card-only-model"
    folder.mkdir()
    shutil.copy(MODULE_DIR / "Resources" / "Models" / "busi-lesion" / "card.json", folder / "card.json")
    return folder


@pytest.fixture
def small_volume(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "small")
    slicer.util.updateVolumeFromArray(volume, np.arange(64, dtype=np.int16).reshape(1, 8, 8))
    return volume


@pytest.mark.skipif(os.name == "nt", reason="POSIX shell wrapper")
def test_worker_crash_message(scene, fake_logic, temp_root, small_volume, tiny_model, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "crash")
    before = scene_state(scene)
    job = fake_logic.segment(small_volume, str(tiny_model), timeout=60)
    assert job.state == L.JobState.FAILED
    assert job.returnCode == 1
    assert "exit code 1" in job.errorMessage and "RuntimeError: something broke inside" in job.errorMessage
    assert "loading things" in job.log  # non-JSON stdout lines go to the log
    assert scene_state(scene) == before
    assert os.listdir(temp_root) == []


def test_worker_that_cannot_start(scene, logic, temp_root, small_volume, tiny_model):
    logic.pythonExecutable = str(temp_root / "no-such-python")
    before = scene_state(scene)
    with pytest.raises(RuntimeError, match="cannot start the segmentation worker"):
        logic.start(small_volume, str(tiny_model))
    if os.name != "nt":  # a file that is not executable
        plain = temp_root.parent / "python-not-executable"
        plain.write_text("#!/bin/sh\n")
        plain.chmod(0o644)
        logic.pythonExecutable = str(plain)
        with pytest.raises(RuntimeError, match="cannot start the segmentation worker .*no such executable file"):
            logic.start(small_volume, str(tiny_model))
    assert scene_state(scene) == before
    assert os.listdir(temp_root) == []
    assert not logic.running


@pytest.mark.skipif(os.name == "nt", reason="POSIX shell wrapper")
def test_worker_without_result(scene, fake_logic, temp_root, small_volume, tiny_model, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "noresult")
    job = fake_logic.segment(small_volume, str(tiny_model), timeout=60)
    assert job.state == L.JobState.FAILED
    assert "without a result" in job.errorMessage
    assert "hello" in job.log
    assert os.listdir(temp_root) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_ends_the_whole_process_tree(scene, fake_logic, temp_root, small_volume, tiny_model, tmp_path,
                                            monkeypatch):
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_MODE", "grandchild")
    monkeypatch.setenv("FAKE_PIDFILE", str(pidfile))
    job = fake_logic.start(small_volume, str(tiny_model))
    assert wait_until(lambda: job.tasks[0].state == L.TaskState.RUNNING, 30, job)
    assert wait_until(lambda: pidfile.is_file() and pidfile.read_text().strip(), 10)
    child = int(pidfile.read_text())
    assert child in _live_group_members(job.pid)  # the grandchild runs in the worker's process group
    t0 = time.monotonic()
    job.cancel()
    assert wait_until(lambda: job.finished, 2.0, job)
    assert time.monotonic() - t0 < 2.0
    assert job.state == L.JobState.CANCELLED

    assert_process_group_gone(job.pid)  # the grandchild too
    assert child not in _live_group_members(job.pid)
    assert os.listdir(temp_root) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX shell wrapper")
def test_result_of_a_volume_under_a_linear_transform_lands_on_the_volume(scene, fake_logic, card_model,
                                                                          monkeypatch):
    """A volume under a non-identity linear transform: the new segmentation node goes under the same transform and
    its reference geometry is the volume's own grid (the transform is applied once, by the parent, not folded into
    the geometry as well), so the result lies exactly where the volume lies in the world."""
    monkeypatch.setenv("FAKE_MODE", "threshold")
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moved")
    rng = np.random.default_rng(7)
    voxels = rng.integers(0, 400, (4, 9, 11)).astype(np.int16)
    slicer.util.updateVolumeFromArray(volume, voxels)
    volume.SetSpacing(0.8, 1.1, 2.0)
    volume.SetOrigin(-5.0, 3.0, 10.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved-transform")
    t = vtk.vtkTransform()
    t.Translate(40.0, -25.0, 15.0)
    t.RotateZ(30)
    t.RotateX(-20)
    transform.SetMatrixTransformToParent(t.GetMatrix())
    volume.SetAndObserveTransformNodeID(transform.GetID())

    job = fake_logic.segment(volume, str(card_model), timeout=60)
    assert job.state == L.JobState.SUCCEEDED, (job.errorMessage, job.log[-10:])
    node = job.segmentationNodes[0]
    assert node.GetTransformNodeID() == transform.GetID()
    assert_same_geometry(node, volume)  # reference geometry and labelmaps: the volume's own IJK-to-RAS

    # in the world: the segment's voxels are the volume's voxels (segmentation node -> world = volume -> world)
    toWorld = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(node.GetParentTransformNode(), None, toWorld)
    volumeToWorld = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(volume.GetParentTransformNode(), None, volumeToWorld)
    matrix, _ = reference_geometry(node)
    np.testing.assert_allclose(_numpy(toWorld) @ matrix, _numpy(volumeToWorld) @ L.ijkToRasFromVolumeNode(volume),
                               atol=1e-9)
    # Slicer's own export onto the volume (which resolves the transforms between the two nodes) gives the labels back
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(node.GetSegmentation().GetNthSegmentID(0))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, labelNode, volume)
    assert np.array_equal(L._volumeArray(labelNode), (voxels > voxels.mean()).astype(np.uint8))


def _numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_worker_killed_behind_the_launcher_tells_of_memory(scene, launcher_logic, temp_root, small_volume, card_model,
                                                           tmp_path, monkeypatch):
    """In Slicer the worker runs behind the PythonSlicer launcher, so the job's process is the launcher, which exits
    with 1 when the real worker is killed: the job still tells the user it was killed, and that memory may be why."""
    pidfile = tmp_path / "worker.pid"
    monkeypatch.setenv("FAKE_MODE", "sleep")
    monkeypatch.setenv("FAKE_PIDFILE", str(pidfile))
    before = scene_state(scene)
    job = launcher_logic.start(small_volume, str(card_model))
    assert wait_until(lambda: pidfile.is_file() and pidfile.read_text().strip(), 30, job)
    worker = int(pidfile.read_text())
    assert worker != job.pid and worker in _live_group_members(job.pid)  # the real worker is the launcher's child
    os.kill(worker, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    assert job.wait(30) == L.JobState.FAILED
    assert job.returnCode == 1
    assert "out of memory" in job.errorMessage and "killed" in job.errorMessage, job.errorMessage
    assert job.errorMessage in job.statusText
    assert scene_state(scene) == before
    assert os.listdir(temp_root) == []

    # an ordinary failure behind the launcher (exit code 1, no report of a crash) does not claim a kill
    monkeypatch.setenv("FAKE_MODE", "crash")
    job = launcher_logic.segment(small_volume, str(card_model), timeout=60)
    assert job.state == L.JobState.FAILED and job.returnCode == 1
    assert "exit code 1" in job.errorMessage and "out of memory" not in job.errorMessage


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_cancel_and_shutdown_never_wait_for_the_worker_to_end(scene, fake_logic, temp_root, small_volume, card_model,
                                                              tmp_path, monkeypatch):
    """Ending a worker can take seconds (on Windows ``taskkill`` has a 5 s timeout; a worker that ignores SIGTERM
    needs the SIGKILL after the grace): cancel and shutdown, which the GUI calls, return at once and the whole tree
    ends from a thread. Here each signalling is made as slow as a taskkill may be, and the worker ignores SIGTERM."""
    from GMSSegmentLib import workerprocess

    signalling = []
    original = workerprocess.WorkerProcess.signalTree

    def slowSignalTree(self, kill):
        signalling.append(threading.current_thread())
        time.sleep(0.5)
        original(self, kill)

    monkeypatch.setattr(workerprocess.WorkerProcess, "signalTree", slowSignalTree)
    pidfile = tmp_path / "worker.pid"
    monkeypatch.setenv("FAKE_MODE", "sleep")
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    monkeypatch.setenv("FAKE_PIDFILE", str(pidfile))
    before = scene_state(scene)

    job = fake_logic.start(small_volume, str(card_model))
    assert wait_until(lambda: pidfile.is_file() and pidfile.read_text().strip(), 30, job)
    t0 = time.monotonic()
    job.cancel()
    assert time.monotonic() - t0 < 0.1
    assert job.running and job.statusText == "Cancelling..."
    assert wait_until(lambda: job.finished, 10, job)
    assert job.state == L.JobState.CANCELLED
    assert signalling and threading.main_thread() not in signalling
    assert_process_group_gone(job.pid)
    assert os.listdir(temp_root) == [] and scene_state(scene) == before

    # shutdown (module cleanup, application exit): returns at once with every job settled; the tree and the temporary
    # folder go in the background
    pidfile.unlink()
    signalling.clear()
    job = fake_logic.start(small_volume, str(card_model))
    assert wait_until(lambda: pidfile.is_file() and pidfile.read_text().strip(), 30, job)
    t0 = time.monotonic()
    fake_logic.shutdown()
    assert time.monotonic() - t0 < 0.1
    assert job.state == L.JobState.CANCELLED and not fake_logic.running
    assert wait_until(lambda: not _live_group_members(job.pid) and not os.listdir(temp_root), 10)
    assert signalling and threading.main_thread() not in signalling
    assert scene_state(scene) == before


# ---------------------------------------------------------------------------------------- pieces without a worker


def test_export_geometry_matches_slicer_writer(scene, tmp_path):
    """exportVolumeNode writes the geometry Slicer's own NRRD writer writes (oblique, anisotropic, LPS on disk)."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    slicer.util.updateVolumeFromArray(volume, np.random.default_rng(1).integers(0, 500, (5, 6, 7)).astype(np.int16))
    t = vtk.vtkTransform()
    t.RotateX(20)
    t.RotateZ(-35)
    m = vtk.vtkMatrix4x4()
    m.DeepCopy(t.GetMatrix())
    volume.SetIJKToRASDirectionMatrix(m)
    volume.SetSpacing(0.7, 1.3, 2.5)
    volume.SetOrigin(12, -4, 7.5)
    ours = tmp_path / "ours.nrrd"
    L.exportVolumeNode(volume, str(ours))
    storage = scene.AddNewNodeByClass("vtkMRMLNRRDStorageNode")
    storage.SetFileName(str(tmp_path / "slicer.nrrd"))
    assert storage.WriteData(volume)
    a, b = sitk.ReadImage(str(ours)), sitk.ReadImage(str(tmp_path / "slicer.nrrd"))
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    back = L.ijkToRasFromLpsGeometry(a.GetOrigin(), a.GetSpacing(), a.GetDirection())
    np.testing.assert_allclose(back, L.ijkToRasFromVolumeNode(volume), atol=1e-9)


def test_export_vector_volume(scene, tmp_path):
    volume = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgba")
    rgba = np.random.default_rng(2).integers(0, 255, (1, 5, 6, 4)).astype(np.uint8)
    slicer.util.updateVolumeFromArray(volume, rgba)
    info = L.exportVolumeNode(volume, str(tmp_path / "v.nrrd"))
    assert info == {"shape": (1, 5, 6), "components": 3}
    img = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    assert img.GetNumberOfComponentsPerPixel() == 3
    assert np.array_equal(sitk.GetArrayFromImage(img), rgba[..., :3])


def test_read_plain_labelmap_result(scene, tmp_path):
    """A worker result that is a plain label map (not .seg.nrrd) is imported by label value, empty segments kept."""
    labels = np.zeros((2, 4, 5), np.uint8)
    labels[1, 1:3, 1:4] = 2
    img = sitk.GetImageFromArray(labels)
    img.SetOrigin((3.0, 4.0, 5.0))
    img.SetSpacing((0.5, 0.6, 2.0))
    path = tmp_path / "labels.nrrd"
    sitk.WriteImage(img, str(path))
    segments = [{"name": "a", "label": 1, "color": [1, 0, 0]}, {"name": "b", "label": 2, "color": [0, 1, 0]}]
    loaded = L._readResultSegments(str(path), L._normalisedSegments(segments))
    assert [s.name for s in loaded] == ["a", "b"]
    assert _array(loaded[0].image).sum() == 0
    assert np.array_equal(_array(loaded[1].image), (labels == 2).astype(np.uint8))
    np.testing.assert_allclose(L._imageToWorld(loaded[1].image)[:3, 3], [-3.0, -4.0, 5.0])


def test_unique_segment_names(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg = node.GetSegmentation()
    assert L.uniqueSegmentName(seg, "lesion") == "lesion"
    seg.AddEmptySegment("lesion", "lesion")
    assert L.uniqueSegmentName(seg, "lesion") == "lesion (2)"
    seg.AddEmptySegment("lesion_2", "lesion (2)")
    assert L.uniqueSegmentName(seg, "lesion") == "lesion (3)"


def test_requirements_and_environment(tiny_model):
    assert L.missingRequirements(["numpy>=1.0", "SimpleITK"]) == []
    assert L.missingRequirements(["numpy>=999", "surely-not-installed-gms>=1"]) == [
        "numpy>=999", "surely-not-installed-gms>=1"]
    assert "torch>=2.1" in L.requirementsForModel(str(tiny_model))
    assert not any(r.startswith("tqdm") for r in L.requirementsForModel(str(tiny_model)))  # the worker never uses it
    # what installing takes, in this Python: torch is installed here, so an older minimum needs nothing and a newer
    # one is "too old" (to be upgraded by the user in PyTorch Utils, never installed over)
    from GMSSegmentLib import dependencies as D
    plan = D.installPlan(["torch>=2.1", "numpy>=1.0", "surely-not-installed-gms>=1"])
    assert (plan.torch, plan.torchTooOld, plan.pip, plan.complete) == (None, None, ["surely-not-installed-gms>=1"],
                                                                       False)
    plan = D.installPlan(["torch>=999", "numpy>=1.0"])
    assert plan.torch is None and plan.torchTooOld == D.installedVersion("torch") and not plan.pip
    assert D.installPlan(L.requirementsForModel(str(tiny_model))).complete  # this Python runs the worker
    env = L.workerEnvironment("/some/weights")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(MODULE_DIR)
    assert env["GMS_WEIGHTS_DIR"] == "/some/weights"
    assert L.moduleDirectory() == str(MODULE_DIR)
    assert L.findPythonExecutable() == sys.executable  # outside the Slicer application
    name = Path(tiny_model).name
    assert L.resolveModel(str(tiny_model)) == os.path.abspath(tiny_model)
    assert (name, os.path.abspath(tiny_model)) in L.findModels([str(Path(tiny_model).parent)])


def test_worker_environment_carries_the_engine_settings_of_this_process(card_model, tmp_path, monkeypatch):
    """In Slicer the worker's environment is built from Slicer's startup environment, which lacks what was set in
    ``os.environ`` since (the module adds the user models folder to ``GMS_MODELS_DIR`` when it starts): every
    ``GMS_*`` variable of this process reaches the worker, which then finds a model there by name."""
    models = tmp_path / "user-models"
    shutil.copytree(card_model, models / "my-adapted")
    monkeypatch.setenv("GMS_MODELS_DIR", str(models))
    startup = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}  # a startup environment without it
    env = L.workerEnvironment(base=startup)
    assert env["GMS_MODELS_DIR"] == str(models)
    code = "from GMSSegmentLib import modelpaths; print(modelpaths.resolve_model_path('my-adapted'))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == (models / "my-adapted").resolve()
    # the weights folder chosen in the module wins over a GMS_WEIGHTS_DIR of this process
    assert L.workerEnvironment("/chosen/weights", base=startup)["GMS_WEIGHTS_DIR"] == "/chosen/weights"


def test_json_workers_never_import_tqdm(shared_dir, busi_dir, tmp_path):
    """Slicer's Python is not asked for tqdm: the workers (``--progress json``) report everything, a first download
    of the foundation weights included, as JSON lines. Both workers run here with ``import tqdm`` failing, the weights
    served from a loopback HTTP server into an empty cache (the pinned SHA-256 checked as always)."""
    import functools
    import http.server
    import threading as th

    blocker = tmp_path / "no-tqdm" / "tqdm"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('a JSON worker imported tqdm')\n")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(Path(shared_dir) / "models" / "taef2"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th.Thread(target=server.serve_forever, daemon=True).start()
    env = L.workerEnvironment()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env["PYTHONPATH"]])
    env.pop("GMS_WEIGHTS_DIR", None)
    env.update(GMS_SHARED="", GMS_DOWNLOAD_BASE_URL=f"http://127.0.0.1:{server.server_address[1]}/")

    def run(cache, *args):
        proc = subprocess.run([sys.executable, "-m", "GMSSegmentLib", "--threads", "2", *map(str, args), "--progress",
                               "json"], env={**env, "GMS_CACHE_DIR": str(tmp_path / cache)}, capture_output=True,
                              text=True, timeout=JOB_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        downloads = [e for e in events if e["event"] == "download"]
        assert downloads and downloads[-1]["done"] == downloads[-1]["total"] > 0, events[:5]
        assert sorted(p.name for p in (tmp_path / cache / "taef2").iterdir()) == ["taef2_decoder.pth",
                                                                                 "taef2_encoder.pth"]
        return events

    try:
        image = sorted((busi_dir / "images").glob("benign_1*.png"))[0]
        events = run("cache-segment", "segment", image, "-o", tmp_path / "out.nrrd", "--model", "busi-lesion",
                     "--device", "cpu", "--no-tta")
        assert any(e["event"] == "result" for e in events)
        events = run("cache-train", "train", busi_dir, "-o", tmp_path / "model", "--name", "no-tqdm", "--segments",
                     "lesion", "--max-train", "2", "--max-val", "1", "--augment-copies", "1", "--epochs", "1",
                     "--warmup-epochs", "0", "--dice-samples", "1", "--batch-size", "2", "--no-postprocess-select")
        assert any(e["event"] == "result" for e in events)
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------- training data from the scene


def _labelled_pair(scene, shared_dir, case: str, name: str):
    """A real hippocampus MRI as a volume node and its real labels as a segmentation node with named segments."""
    root = Path(shared_dir) / "data" / "hippocampus"
    vol = L.addVolumeNodeFromFile(scene, str(root / "imagesTr" / f"{case}.nii.gz"))
    vol.SetName(name)  # two studies of the same name, as from two patients' "T1" series
    lab = L.addVolumeNodeFromFile(scene, str(root / "labelsTr" / f"{case}.nii.gz"))
    lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    lm.SetAndObserveImageData(lab.GetImageData())
    m = vtk.vtkMatrix4x4()
    lab.GetIJKToRASMatrix(m)
    lm.SetIJKToRASMatrix(m)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)  # as the Segment Editor does for its source volume
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
    s = seg.GetSegmentation()
    for i, n in enumerate(("Anterior", "Posterior")):  # Label_1, Label_2 as the editor would name them
        s.GetSegment(s.GetNthSegmentID(i)).SetName(n)
    scene.RemoveNode(lm)
    scene.RemoveNode(lab)
    return vol, seg


def test_scene_pairs_export_as_a_training_set_that_the_worker_adapts_a_model_on(scene, shared_dir, tmp_path):
    """exportTrainingSet writes volume + segmentation pairs from the scene as imagesTr/labelsTr/split.json with the
    labels numbered in the order of the given segment names on each volume's grid; bad requests leave nothing behind;
    SegmentationLogic.startTraining finds the pairs in the scene, adapts the bundled hippocampus model on them in the
    worker (progress by stage and epoch, the new model published only when complete), and a cancel leaves nothing."""
    root = Path(shared_dir) / "data" / "hippocampus"
    pairs = [_labelled_pair(scene, shared_dir, c, "patient 1") for c in ("hippocampus_001", "hippocampus_003")]
    data = tmp_path / "export"
    info = L.exportTrainingSet(pairs, str(data), ["anterior", "posterior"])
    assert info["cases"] == ["patient_1", "patient_1_2"]  # node names made file-safe and unique
    assert json.loads((data / "split.json").read_text()) == {"train": info["cases"]}
    for case, src in zip(info["cases"], ("hippocampus_001", "hippocampus_003")):
        for sub in ("imagesTr", "labelsTr"):
            got = sitk.ReadImage(str(data / sub / f"{case}.nrrd"))
            want = sitk.ReadImage(str(root / sub / f"{src}.nii.gz"))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))
            np.testing.assert_allclose(got.GetOrigin(), want.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(got.GetSpacing(), want.GetSpacing(), atol=1e-5)
            np.testing.assert_allclose(got.GetDirection(), want.GetDirection(), atol=1e-5)
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / "hippocampus_001.nii.gz")))
    # the order of the names decides the label values (names match case-insensitively)
    swapped = L.exportTrainingSet(pairs[:1], str(tmp_path / "swapped"), ["Posterior", "anterior"])
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "swapped" / "labelsTr" / "patient_1.nrrd")))
    np.testing.assert_array_equal(got, np.choose(first, [0, 2, 1]))
    assert swapped["voxels"] == {"Posterior": int((first == 2).sum()), "anterior": int((first == 1).sum())}

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="no segment named 'tail'"):
        L.exportTrainingSet(pairs, str(tmp_path / "bad"), ["anterior", "tail"])
    with pytest.raises(ValueError, match="already exists"):
        L.exportTrainingSet(pairs, str(data), ["anterior", "posterior"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary folder left

    # the Slicer logic runs it: the pairs found in the scene, exported into the job's folder, the worker's progress,
    # and the model published only at the end
    logic = L.SegmentationLogic(scene=scene, tempRoot=str(tmp_path / "jobs"))
    names = ["anterior", "posterior"]
    assert [(v.GetID(), s.GetID()) for v, s in logic.trainingPairs(scene, names)] == \
        [(v.GetID(), s.GetID()) for v, s in pairs]
    assert logic.trainingPairs(scene, ["anterior", "tail"]) == []
    fast = ["--epochs", "1", "--augment-copies", "1", "--warmup-epochs", "1", "--val-fraction", "0.5",
            "--no-postprocess-select"]
    models = tmp_path / "models"
    with pytest.raises(ValueError, match="at least 2 segmented volumes"):
        logic.startTraining(pairs[:1], names, str(models / "a"), initFrom="hippocampus")
    with pytest.raises(ValueError, match="already exists"):
        logic.startTraining(pairs, names, str(data), initFrom="hippocampus")
    with pytest.raises(ValueError, match="no segment named 'tail'"):
        logic.startTraining(pairs, ["anterior", "tail"], str(models / "a"), initFrom="hippocampus")
    assert not models.exists() and os.listdir(tmp_path / "jobs") == []

    # cancelled while exporting (startTraining returns after reading the first pair; its files are written in a
    # thread): finished within 2 s, no worker started, nothing left
    job = logic.startTraining(pairs, names, str(models / "early"), initFrom="hippocampus", extraArgs=fast)
    assert job.stage == "exporting" and job.pid is None and job.running
    t0 = time.monotonic()
    job.cancel()
    assert wait_until(lambda: job.finished, 2.0, job) and time.monotonic() - t0 < 2.0
    assert job.state == L.JobState.CANCELLED and job.pid is None
    assert not models.exists() and os.listdir(tmp_path / "jobs") == [] and not logic.running
    # a case closed while exporting: the job fails with a clear message, nothing left
    extra = _labelled_pair(scene, shared_dir, "hippocampus_001", "closed soon")
    job = logic.startTraining([pairs[0], extra], names, str(models / "early"), initFrom="hippocampus")
    scene.RemoveNode(extra[1])
    assert job.wait(10) == L.JobState.FAILED and job.pid is None
    assert "was removed or emptied while the cases were exported" in job.errorMessage
    assert not models.exists() and os.listdir(tmp_path / "jobs") == [] and not logic.running
    scene.RemoveNode(extra[0])

    out = models / "hippocampus-adapted"
    job = logic.startTraining(pairs, names, str(out), initFrom="hippocampus", extraArgs=fast)
    stages, fractions = [], []
    deadline = time.monotonic() + JOB_TIMEOUT
    while not job.finished and time.monotonic() < deadline:
        job.poll()
        if not stages or stages[-1] != job.stage:
            stages.append(job.stage)
        fractions.append(job.progress)
        assert not out.exists() or job.finished  # nothing at the target before the model is complete
        time.sleep(0.05)
    assert job.state == L.JobState.SUCCEEDED, (job.errorMessage, job.log[-20:])
    assert stages[0] == "exporting" and "Exported 2 cases (anterior, posterior)" in job.log
    assert "cache" in stages and "training" in stages and stages.index("cache") < stages.index("training")
    assert fractions == sorted(fractions) and job.progress == 1.0
    assert job.modelDir == str(out) and (out / "model.safetensors").is_file()
    assert [h["epoch"] for h in job.history] == [0, 1]  # the starting point, then the one epoch
    card = card_of(out)
    assert job.card == card and card["name"] == "hippocampus-adapted"
    assert card["training"]["init_from"]["name"] == "hippocampus" and card["input_size"] == 96
    assert job.startDice == pytest.approx(card["training"]["history"][0]["val_dice"]) and job.startDice > 0.5
    assert job.bestDice == pytest.approx(max(h["val_dice"] for h in card["training"]["history"]))
    assert [s["name"] for s in card["segments"]] == names
    assert "Done: model 'hippocampus-adapted' saved" in job.statusText
    assert os.listdir(tmp_path / "jobs") == []  # export, latents and work folder removed

    # cancelled while training: within 2 s, nothing written, the worker's process group gone
    cancelled = models / "cancelled"
    job = logic.startTraining(pairs, names, str(cancelled), initFrom="hippocampus",
                              extraArgs=["--epochs", "200", "--augment-copies", "1", "--val-fraction", "0.5"])
    assert wait_until(lambda: job.finished or job.epoch >= 1, JOB_TIMEOUT, job), job.log[-10:]
    assert job.running, (job.errorMessage, job.log[-10:])
    t0 = time.monotonic()
    job.cancel()
    assert wait_until(lambda: job.finished, 2.0, job) and time.monotonic() - t0 < 2.0
    assert job.state == L.JobState.CANCELLED and job.statusText == "Cancelled: no model was written"
    assert not cancelled.exists() and sorted(p.name for p in models.iterdir()) == ["hippocampus-adapted"]
    assert os.listdir(tmp_path / "jobs") == []
    assert_process_group_gone(job.pid)
    logic.shutdown()


def _labelled_image(scene, shared_dir, case: str, vector: bool | None = None):
    """A real BUSI image as a (single-slice) volume node and its real mask as a segmentation node whose segment is
    named 'Lesion'. Returns (volume node, segmentation node, the image array as loaded, the 0/1 mask)."""
    root = Path(shared_dir) / "data" / "busi"
    vol = L.addVolumeNodeFromFile(scene, str(root / "images" / f"{case}.png"), vector=vector)
    mask = (sitk.GetArrayFromImage(sitk.ReadImage(str(root / "masks" / f"{case}.png"))) > 127).astype(np.uint8)
    if mask.ndim == 3:  # a mask stored as RGB
        mask = mask[..., 0]
    seg = _segmentationFromLabels(scene, vol, mask[np.newaxis], ["Lesion"])
    return vol, seg, slicer.util.arrayFromVolume(vol).copy(), mask


def _segmentationFromLabels(scene, volume, labels: np.ndarray, names: list[str]):
    lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(lm, np.ascontiguousarray(labels.astype(np.uint8)))
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    lm.SetIJKToRASMatrix(m)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
    s = seg.GetSegmentation()
    assert s.GetNumberOfSegments() == len(names)
    for i, n in enumerate(names):
        s.GetSegment(s.GetNthSegmentID(i)).SetName(n)
    scene.RemoveNode(lm)
    return seg


def test_2d_images_export_as_png_pairs_that_adapt_a_2d_model(scene, shared_dir, tmp_path):
    """Adapting a 2D model (busi-lesion) from the scene: single-slice gray and RGB volumes with their segmentations
    export as images/ + masks/ PNGs equal to the source files (a multi-slice clip gives its labelled slices only,
    non-8-bit volumes are refused with nothing written), trainingPairs offers RGB volumes to 2D models only, and the
    worker adapts busi-lesion on them into a 2D model."""
    from PIL import Image

    cases = ["benign_102", "benign_13", "malignant_1", "benign_1"]  # RGB (made gray), RGB, gray, gray files
    loaded = [_labelled_image(scene, shared_dir, c, vector=None if i % 2 else False) for i, c in enumerate(cases)]
    pairs = [(v, s) for v, s, _, _ in loaded]
    assert any(v.IsA("vtkMRMLVectorVolumeNode") for v, _ in pairs)  # RGB files stay RGB unless converted
    assert not all(v.IsA("vtkMRMLVectorVolumeNode") for v, _ in pairs)
    data = tmp_path / "export2d"
    info = L.exportTrainingSet(pairs, str(data), ["lesion"], dimension=2)
    assert info["cases"] == cases and info["dimension"] == 2
    assert json.loads((data / "split.json").read_text()) == {"train": cases}
    assert json.loads((data / "dataset.json").read_text())["labels"] == {"lesion": 255}
    for case, (_, _, image, mask) in zip(cases, loaded):
        np.testing.assert_array_equal(np.asarray(Image.open(data / "images" / f"{case}.png")), image[0])
        np.testing.assert_array_equal(np.asarray(Image.open(data / "masks" / f"{case}.png")), mask * 255)
    assert info["voxels"] == {"lesion": int(sum(m.sum() for _, _, _, m in loaded))}

    # a 3-slice clip labelled on its first and last slice: those two slices are the cases
    _, _, image0, mask0 = loaded[1]
    clip = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "clip")
    gray = image0[0] if image0.ndim == 3 else np.round(image0[0] @ [0.299, 0.587, 0.114]).astype(np.uint8)
    slicer.util.updateVolumeFromArray(clip, np.stack([gray, gray[::-1], gray[:, ::-1]]))
    clipSeg = _segmentationFromLabels(scene, clip, np.stack([mask0, 0 * mask0, mask0[:, ::-1]]), ["lesion"])
    clipInfo = L.exportTrainingSet([(clip, clipSeg)], str(tmp_path / "clip"), ["lesion"], dimension=2)
    assert clipInfo["cases"] == ["clip_0", "clip_2"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "clip" / "images" / "clip_2.png")), gray[:, ::-1])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "clip" / "masks" / "clip_2.png")),
                                  mask0[:, ::-1] * 255)

    # refused before anything is written: values beyond 8 bits, a 3D export of RGB volumes
    wide = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "wide")
    slicer.util.updateVolumeFromArray(wide, (gray[np.newaxis].astype(np.int16) * 4))
    wideSeg = _segmentationFromLabels(scene, wide, mask0[np.newaxis], ["lesion"])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="not an 8-bit image"):
        L.exportTrainingSet([pairs[0], (wide, wideSeg)], str(tmp_path / "bad"), ["lesion"], dimension=2)
    with pytest.raises(ValueError, match="not a scalar volume"):
        L.exportTrainingSet(pairs, str(tmp_path / "bad"), ["lesion"], dimension=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    logic = L.SegmentationLogic(scene=scene, tempRoot=str(tmp_path / "jobs"))
    found = [s.GetID() for _, s in logic.trainingPairs(scene, ["lesion"], dimension=2)]
    assert found == [s.GetID() for _, s in pairs] + [clipSeg.GetID(), wideSeg.GetID()]
    assert [s.GetID() for _, s in logic.trainingPairs(scene, ["lesion"], dimension=3)] == \
        [s.GetID() for v, s in pairs if not v.IsA("vtkMRMLVectorVolumeNode")] + [clipSeg.GetID(), wideSeg.GetID()]

    out = tmp_path / "models" / "busi-adapted"
    job = logic.startTraining(pairs, ["lesion"], str(out), initFrom="busi-lesion",
                              extraArgs=["--epochs", "1", "--augment-copies", "1", "--warmup-epochs", "1",
                                         "--val-fraction", "0.5", "--no-postprocess-select"])
    assert job.wait(JOB_TIMEOUT) == L.JobState.SUCCEEDED, (job.errorMessage, job.log[-20:])
    card = card_of(out)
    assert card["dimension"] == 2 and card["input_size"] == 224 and card["normalization"] == {"mode": "photo"}
    assert card["training"]["layout"] == "2d" and card["training"]["init_from"]["name"] == "busi-lesion"
    assert card["training"]["train_cases"] == 2 and [h["epoch"] for h in job.history] == [0, 1]
    assert job.startDice > 0.5  # busi-lesion on images of its own training list
    assert os.listdir(tmp_path / "jobs") == []
    logic.shutdown()


def test_a_volume_decided_empty_adds_no_segment_and_says_no_lesion_found(scene, logic, busi_images, weights_dir,
                                                                          tmp_path):
    """The card's presence decision clears the lesion: no empty segmentation node for the user to delete, and the
    status says "no lesion found"."""

    model = tmp_path / "never-sure"
    shutil.copytree(MODULE_DIR / "Resources" / "Models" / "busi-lesion", model)
    card = card_of(model)
    card["presence"] = {"min_area": 0.9, "min_confidence": 0.0}
    (model / "card.json").write_text(json.dumps(card))
    volume = L.addVolumeNodeFromFile(scene, busi_images["gray"])
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job = logic.segment(volume, str(model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT, tta=False)
    assert job.state == L.JobState.SUCCEEDED, (job.errorMessage, job.log[-20:])
    assert job.segmentationNodes == [] and job.tasks[0].notFound == ["lesion"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    assert job.statusText.endswith("(no lesion found)")
