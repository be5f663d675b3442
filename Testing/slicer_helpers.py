"""Helpers and fixtures of the Slicer-side logic tests (test_slicer_logic*.py): real volume nodes on slicer-core,
the real worker, stand-in workers.
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


@pytest.fixture
def card_model(tmp_path) -> Path:
    """A model folder with only a model card (the bundled busi-lesion's): enough for stand-in workers, which never
    load weights."""
    folder = tmp_path / "card-only-model"
    folder.mkdir()
    shutil.copy(MODULE_DIR / "Resources" / "Models" / "busi-lesion" / "card.json", folder / "card.json")
    return folder
