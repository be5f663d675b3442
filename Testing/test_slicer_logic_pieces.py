"""The Slicer-side pieces that need no worker (export geometry, result reading, segment names, requirements,
the worker's environment) on slicer-core; helpers and fixtures in slicer_helpers.py.
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
from slicer_helpers import _array  # noqa: F401


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
            "--no-postprocess-select", "--cv-folds", "0"]
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

    # the default for a few cases: cross-validated; adapting that changes nothing (learning rate 0) is refused, the
    # job succeeds without a model and says so
    refused = models / "refused"
    job = logic.startTraining(pairs, names, str(refused), initFrom="hippocampus",
                              extraArgs=["--epochs", "1", "--augment-copies", "1", "--lr", "0"])
    stages = []
    while not job.finished and time.monotonic() < deadline + JOB_TIMEOUT:
        job.poll()
        if not stages or stages[-1] != job.stage:
            stages.append(job.stage)
        time.sleep(0.05)
    assert job.state == L.JobState.SUCCEEDED and job.refused, (job.errorMessage, job.log[-20:])
    assert "cross-validation" in stages and job.foldsTotal == 2 and job.progress == 1.0
    assert job.estimate["cases"] == 2 and job.estimate["gain"] == 0 and job.estimate["adopted"] is False
    assert job.statusText.startswith("No model saved: cross-validated Dice ")
    assert "keep using the starting model" in job.statusText
    assert not refused.exists() and job.modelDir == ""
    assert os.listdir(tmp_path / "jobs") == []  # export, latents and work folder removed

    # cancelled while training: within 2 s, nothing written, the worker's process group gone
    cancelled = models / "cancelled"
    job = logic.startTraining(pairs, names, str(cancelled), initFrom="hippocampus",
                              extraArgs=["--epochs", "200", "--augment-copies", "1", "--val-fraction", "0.5",
                                         "--cv-folds", "0"])
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
                                         "--val-fraction", "0.5", "--no-postprocess-select", "--cv-folds", "0"])
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
