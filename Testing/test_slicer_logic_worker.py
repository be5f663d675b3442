"""The Slicer-side job protocol with stand-in workers (crash, no result, process tree, memory kill, transforms,
cancel and shutdown never waiting) on slicer-core; helpers and fixtures in slicer_helpers.py.
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
from slicer_helpers import _live_group_members  # noqa: F401


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
    lg.keepWorkerWarm = False  # the stand-in answers one job per process (the warm worker: test_warm_worker.py)
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
