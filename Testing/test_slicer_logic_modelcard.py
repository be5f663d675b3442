"""The Slicer side reads model cards as typed ModelCards: checked for display (readModelCard), read once per click
(openModel: one name resolution and one card.json read for the requirement check, the job and its import), and the
worker gets the resolved folder. Stand-in workers: no torch, no weights."""
from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "GMSSegment"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from GMSSegmentLib import dependencies, modelpaths  # noqa: E402
from GMSSegmentLib import slicer_logic as L  # noqa: E402
from GMSSegmentLib.modelcard import ModelCard  # noqa: E402

BUSI_CARD = MODULE_DIR / "Resources" / "Models" / "busi-lesion" / "card.json"

# the worker's command line is [python, -m, GMSSegmentLib, segment, IN, -o, OUT, ...]: voxels above the mean become
# label 1; the result names no segments, so the job takes the card's names and colours
STAND_IN_WORKER = textwrap.dedent('''
    import json, sys
    import SimpleITK as sitk
    args = sys.argv[1:]
    if "segment" not in args:
        sys.exit(3)
    image = sitk.ReadImage(args[args.index("segment") + 1])
    array = sitk.GetArrayFromImage(image)
    labels = sitk.GetImageFromArray((array > array.mean()).astype("uint8"))
    labels.CopyInformation(image)
    out = args[args.index("-o") + 1]
    sitk.WriteImage(labels, out)
    print(json.dumps({"event": "result", "path": out}), flush=True)
''')


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    """A models folder on GMS_MODELS_DIR holding ``card-only``: the bundled busi-lesion's card, no weights."""
    folder = tmp_path / "models"
    (folder / "card-only").mkdir(parents=True)
    shutil.copy(BUSI_CARD, folder / "card-only" / "card.json")
    monkeypatch.setenv("GMS_MODELS_DIR", str(folder))
    return folder


@pytest.fixture
def counted(monkeypatch) -> dict:
    """Counts, in this process, what resolves a model name (modelpaths.resolve_model_path) and what opens a
    card.json file (builtins.open and io.open, which pathlib uses)."""
    counts = {"resolved": 0, "card reads": 0}
    realOpen, realResolve = builtins.open, modelpaths.resolve_model_path

    def countingOpen(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) == "card.json":
            counts["card reads"] += 1
        return realOpen(file, *args, **kwargs)

    def countingResolve(*args, **kwargs):
        counts["resolved"] += 1
        return realResolve(*args, **kwargs)

    monkeypatch.setattr(builtins, "open", countingOpen)
    monkeypatch.setattr(io, "open", countingOpen)
    monkeypatch.setattr(modelpaths, "resolve_model_path", countingResolve)
    return counts


def test_read_model_card_is_typed_and_checked_and_open_model_leaves_the_checks_to_the_worker(models):
    card = L.readModelCard("card-only")
    assert isinstance(card, ModelCard) and card.name == "busi-lesion" and [s.name for s in card.segments] == ["lesion"]
    assert card.foundation.name == "taef2" and L.modelSummary(card).startswith("busi-lesion: ")
    raw = json.loads(BUSI_CARD.read_text())
    assert L.modelSummary(raw) == L.modelSummary(card) and L.headlineMetric(raw) == L.headlineMetric(card)
    broken = dict(raw, segments=[])
    (models / "card-only" / "card.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"card\.json: 'segments' must be a non-empty list"):
        L.readModelCard("card-only")
    opened = L.openModel("card-only")  # a job still starts: its worker reports the broken model
    assert opened.folder == str((models / "card-only").resolve()) and opened.card.segments == []
    assert L.openModel(opened) is opened
    (models / "card-only" / "card.json").write_text("[]")
    for read in (L.readModelCard, L.openModel):
        with pytest.raises(ValueError, match="is not a JSON object"):
            read("card-only")


def test_requirements_for_a_card_read_its_foundation():
    diffusers = ModelCard.from_dict({"foundation": {"name": "diffusers-sd-vae"}})
    assert dependencies.requirementsForCard(diffusers)[-1].startswith("diffusers")
    assert dependencies.requirementsForCard({"foundation": "AutoencoderKL"})[-1].startswith("diffusers")
    plain = list(dependencies.REQUIREMENTS)
    assert dependencies.requirementsForCard(ModelCard.from_dict({"foundation": {"name": "taef2"}})) == plain
    assert dependencies.requirementsForCard(None) == plain == dependencies.requirementsForCard(ModelCard())


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer")
    return slicer.vtkMRMLScene()


@pytest.fixture
def logic(scene, tmp_path):
    script = tmp_path / "stand_in_worker.py"
    script.write_text(STAND_IN_WORKER)
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    wrapper.chmod(0o755)
    lg = L.SegmentationLogic(scene=scene, pythonExecutable=str(wrapper), tempRoot=str(tmp_path / "jobs"))
    lg.keepWorkerWarm = False  # a stand-in worker answers one job per process
    yield lg
    lg.shutdown()


def _volume(scene, name: str):
    import slicer

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volume, np.arange(64, dtype=np.uint8).reshape(1, 8, 8))
    return volume


def _finish(job, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    assert job.finished, job.log


@pytest.mark.skipif(os.name == "nt", reason="POSIX shell wrapper")
def test_one_segment_click_resolves_the_model_and_reads_its_card_once(scene, logic, models, counted):
    """As the module's Segment button: open the model, check its requirements, start the job and import its
    result: one resolution and one card read in all; the worker gets the folder, the segment the card's name and
    colour. Starting with the name alone reads the card once too."""
    volume = _volume(scene, "scan")
    opened = L.openModel("card-only")
    assert "torch>=2.1" in L.requirementsForModel(opened)
    job = logic.start(volume, opened, device="cpu")
    _finish(job)
    assert job.state == L.JobState.SUCCEEDED, job.errorMessage
    assert counted == {"resolved": 1, "card reads": 1}
    assert job.args[job.args.index("--model") + 1] == opened.folder == job.modelDir and job.card is opened.card
    segmentation = job.segmentationNodes[0].GetSegmentation()
    segment = segmentation.GetNthSegment(0)
    assert segmentation.GetNumberOfSegments() == 1 and segment.GetName() == "lesion"
    assert list(segment.GetColor()) == pytest.approx(opened.card.segments[0].color)

    counted.update({"resolved": 0, "card reads": 0})
    job = logic.start(volume, "card-only", device="cpu")
    _finish(job)
    assert job.state == L.JobState.SUCCEEDED, job.errorMessage
    assert counted == {"resolved": 1, "card reads": 1} and job.modelDir == opened.folder


def test_training_start_reads_the_starting_model_card_once(scene, logic, models, counted, tmp_path):
    """Adapt: the starting model is resolved and its card read once (its dimension decides how the cases are
    exported); the job is cancelled before its worker starts."""
    import slicer

    pairs = []
    for i in range(2):
        volume = _volume(scene, f"case {i}")
        labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.util.updateVolumeFromArray(labels, (np.arange(64).reshape(1, 8, 8) > 31).astype(np.uint8))
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, seg)
        seg.GetSegmentation().GetNthSegment(0).SetName("lesion")
        scene.RemoveNode(labels)
        pairs.append((volume, seg))
    opened = L.openModel("card-only")
    job = logic.startTraining(pairs, ["lesion"], str(tmp_path / "adapted"), initFrom=opened)
    assert counted == {"resolved": 1, "card reads": 1}
    assert job.args[job.args.index("--init-from") + 1] == opened.folder
    job.cancel()
    _finish(job)
    assert job.state == L.JobState.CANCELLED and not (tmp_path / "adapted").exists()
