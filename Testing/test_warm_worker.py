"""The warm worker (serve.py, slicer_logic/warmworker.py): one ``gms serve`` process answers one job after another
with the results a one-job worker gives, keeps its model loaded, ends itself when idle or when its stdin closes, and a
cancel or a kill ends it as it ends a one-job worker (the next job then starts a new one).

The cancel and SIGKILL tests of test_slicer_logic.py run in the warm worker too (it is the logic's default).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from slicer_helpers import *  # noqa: F401,F403 (helpers and fixtures)
from slicer_helpers import _live_group_members  # noqa: F401

from GMSSegmentLib.serve import END_LINE  # noqa: E402


def _serve(*extra, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "GMSSegmentLib", "serve", *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or L.workerEnvironment())


def _job(proc: subprocess.Popen, args: list, cwd=None) -> tuple[list[dict], list[str]]:
    """Send one job; return its stdout events (the ``served`` line last) and its stderr lines (without the end)."""
    proc.stdin.write(json.dumps({"args": [str(a) for a in args], **({"cwd": str(cwd)} if cwd else {})}) + "\n")
    proc.stdin.flush()
    events, errors = [], []
    while True:
        event = json.loads(proc.stdout.readline())
        events.append(event)
        if event["event"] == "served":
            break
    while True:
        line = proc.stderr.readline().rstrip("\n")
        if line == END_LINE:
            return events, errors
        errors.append(line)


def test_serve_protocol(tiny_model, busi_images, weights_dir, tmp_path):
    """Jobs one after another in one process: refusals and failures answered with the exit code the command would
    have had, the next job unharmed; results equal to those of a one-job run; stdin closed: it ends."""
    reference = cli_segment([busi_images["gray"]], tiny_model, weights_dir, tmp_path / "cli")[str(busi_images["gray"])]
    proc = _serve()
    try:
        common = ["--model", tiny_model, "--device", "cpu", "--weights-dir", weights_dir, "--progress", "json"]
        events, errors = _job(proc, ["train", "data", "-o", tmp_path / "m"])
        assert events[-1] == {"event": "served", "code": 2}
        assert errors == ["gms: error: the warm worker serves segment only, not train"]

        events, errors = _job(proc, ["segment", tmp_path / "missing.png", "-o", tmp_path / "x.nrrd", *common])
        assert events[-1]["code"] == 2 and [e["event"] for e in events][-2] == "error"
        assert not (tmp_path / "x.nrrd").exists()

        for k in range(2):  # relative paths are the job folder's
            events, errors = _job(proc, ["segment", busi_images["gray"], "-o", f"out{k}.nrrd", *common], cwd=tmp_path)
            assert events[-1]["code"] == 0, errors
            result = [e for e in events if e["event"] == "result"]
            assert len(result) == 1 and result[0]["path"].endswith(f"out{k}.nrrd")
            got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"out{k}.nrrd")))
            assert np.array_equal(got[np.newaxis] if got.ndim == 2 else got, reference)

        events, errors = _job(proc, ["segment", "--no-such-option"])  # argparse's own refusal
        assert events[-1]["code"] == 2 and any("unrecognized arguments" in e for e in errors)
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_serve_ends_when_idle(tmp_path):
    proc = _serve("--idle-minutes", "0.001")  # at least a second
    try:
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    bad = subprocess.run([sys.executable, "-m", "GMSSegmentLib", "serve", "--idle-minutes", "0"],
                         capture_output=True, text=True, env=L.workerEnvironment(), timeout=60)
    assert bad.returncode == 2 and "--idle-minutes must be positive" in bad.stderr


def test_model_cache_reloads_a_changed_folder(tiny_model, weights_dir, tmp_path):
    import shutil

    from GMSSegmentLib.serve import ModelCache

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    cache = ModelCache(size=1)
    first = cache(folder, weights_dir=weights_dir)
    assert cache(folder, weights_dir=weights_dir) is first and cache.loads == 1
    card = folder / "card.json"
    data = json.loads(card.read_text())
    data["description"] = "changed"
    card.write_text(json.dumps(data))
    os.utime(card, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = cache(folder, weights_dir=weights_dir)
    assert second is not first and cache.loads == 2 and second.card.description == "changed"


def test_logic_reuses_the_warm_worker(scene, logic, temp_root, busi_images, tiny_model, weights_dir, cli_reference,
                                      monkeypatch, tmp_path):
    """Two clicks: the second job runs in the same process, whose model is already loaded, and both results equal
    the command line's; after a cancel the next job starts a new worker; shutdown ends the warm one."""
    volume = L.addVolumeNodeFromFile(scene, busi_images["gray"])
    reference = cli_reference(tiny_model)[str(busi_images["gray"])]
    first = logic.segment(volume, str(tiny_model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    check_result(first, volume, tiny_model, reference)
    assert any(line.startswith("Started the warm worker") for line in first.log)
    assert os.listdir(temp_root) == []
    warm = logic.warmWorkers.idle
    assert len(warm) == 1 and warm[0].pid == first.pid  # still running, waiting for the next job

    second = logic.segment(volume, str(tiny_model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    check_result(second, volume, tiny_model, reference)
    assert second.pid == first.pid and logic.warmWorkers.started == 1
    assert any(line.startswith("Sent to the warm worker") for line in second.log)
    assert not any(line.startswith("Started") for line in second.log)

    # another environment (here: another GMS_MODELS_DIR, which the worker inherits): a new worker replaces the idle one
    monkeypatch.setenv("GMS_MODELS_DIR", str(tmp_path))
    third = logic.start(volume, str(tiny_model), device="cpu", weightsDir=weights_dir)
    assert wait_until(lambda: third.pid is not None or third.finished, JOB_TIMEOUT, third)
    third.cancel()
    assert wait_until(lambda: third.finished, 2.0, third)
    assert third.state == L.JobState.CANCELLED and third.pid != first.pid
    assert wait_until(lambda: not _live_group_members(first.pid), 10)  # the replaced idle worker ended
    assert_process_group_gone(third.pid)
    assert logic.warmWorkers.idle == []

    fourth = logic.segment(volume, str(tiny_model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    check_result(fourth, volume, tiny_model, reference)
    assert fourth.pid not in (first.pid, third.pid) and logic.warmWorkers.started == 3
    logic.shutdown()
    assert wait_until(lambda: not _live_group_members(fourth.pid), 10)
    assert os.listdir(temp_root) == []


def test_warm_worker_failure_then_success(scene, logic, busi_images, tiny_model, weights_dir, cli_reference):
    """A job the worker refuses fails with the worker's own message, and the same worker answers the next job."""
    volume = L.addVolumeNodeFromFile(scene, busi_images["gray"])
    logic.extraWorkerArgs = ["--batch-size", "0"]
    bad = logic.segment(volume, str(tiny_model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    assert bad.state == L.JobState.FAILED and bad.returnCode == 2, (bad.state, bad.log)
    assert "batch" in bad.errorMessage.lower(), bad.errorMessage
    logic.extraWorkerArgs = []
    good = logic.segment(volume, str(tiny_model), device="cpu", weightsDir=weights_dir, timeout=JOB_TIMEOUT)
    check_result(good, volume, tiny_model, cli_reference(tiny_model)[str(busi_images["gray"])])
    assert good.pid == bad.pid
