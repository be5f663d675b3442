"""``gms segment --jobs ... --cluster ray://...`` on a real local Ray cluster (head on 127.0.0.1 only, 2 CPUs, stopped at
the end): the outputs equal the one-machine batch's, every voxel, a corrupt input is that item's error, and an actor
killed during an item is replaced and the item retried. Skipped where Ray is not installed (it is an optional extra;
the set-up environment has it)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_gms, worker_env

pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    """The engine's environment; Ray's token authentication off for this cluster on 127.0.0.1 (the Ray client sends
    no token in Ray 2.60)."""
    env = worker_env()
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head node on 127.0.0.1 with 2 CPUs; its Ray client address."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = _env()
    temp = tmp_path_factory.mktemp("ray")
    client_port = _free_port()
    # every port named (ephemeral ones, outside Ray's worker port range): with the runtime-env agent's port left to
    # Ray, the client server's per-client server failed to start here (Ray 2.60)
    start = subprocess.run(
        [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
         f"--ray-client-server-port={client_port}", f"--runtime-env-agent-port={_free_port()}", "--num-cpus=2",
         "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def items(busi_dir, hippo_dir, tmp_path_factory):
    """8 items of real data: 6 BUSI images, a hippocampus volume, and a corrupt volume (cut short)."""
    folder = tmp_path_factory.mktemp("inputs")
    images = sorted((busi_dir / "images").glob("malignant_1*.png"))[:6]
    volume = sorted((hippo_dir / "imagesTr").glob("*.nii.gz"))[0]
    corrupt = folder / "corrupt.nii.gz"
    corrupt.write_bytes(volume.read_bytes()[:2000])
    return [*images, volume, corrupt]


def _jobs(inputs, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [{"input": str(p), "output": str(out / f"r{k}.nii.gz")} for k, p in enumerate(inputs)]
    path = out / "jobs.json"
    path.write_text(json.dumps(jobs))
    return path


def _arrays(folder: Path) -> dict:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("r*.nii.gz"))}


@pytest.fixture(scope="module")
def one_machine(items, tmp_path_factory) -> tuple:
    """The one-machine batch of the 8 items (one thread, as each actor): (its process, its outputs)."""
    folder = tmp_path_factory.mktemp("one")
    p = run_gms("--threads", "1", "segment", "--jobs", _jobs(items, folder), "--model", "busi-lesion", "--no-tta")
    return p, _arrays(folder)


def test_cluster_batch_equals_one_machine_and_survives_a_killed_actor(cluster, items, one_machine, tmp_path):
    """The 8 items on 2 actors through the Ray client; the actor that runs the volume is killed (SIGKILL) mid-item:
    it is replaced, the volume retried on another actor, and every output equals the one-machine batch's; the corrupt
    item is that item's error, as on one machine."""
    one, a = one_machine
    status = tmp_path / "status"
    status.mkdir()
    env = _env()
    env["GMS_ACTOR_STATUS_DIR"] = str(status)  # each actor writes the item it runs into <status>/<its pid>
    proc = subprocess.Popen([sys.executable, "-m", "GMSSegmentLib", "--threads", "1", "segment", "--jobs",
                             str(_jobs(items, tmp_path / "ray")), "--model", "busi-lesion", "--no-tta", "--cluster",
                             cluster, "--actors", "2", "--progress", "json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        for f in status.iterdir():
            if f.read_text().strip() == "6":  # an actor has started the volume: kill its process
                killed = int(f.name)
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert killed is not None, (out, err)
    assert one.returncode == 2 and proc.returncode == 2, err  # the corrupt item, in both
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("retrying on another" in e.get("message", "") for e in events), events
    errors = [e for e in events if e["event"] == "error"]
    assert [e["item"] for e in errors] == [7] and "corrupt.nii.gz" in errors[0]["message"]
    assert sorted(e["item"] for e in events if e["event"] == "result") == list(range(7))
    assert events[-1] == {"event": "done", "ok": 7, "failed": 1}
    assert any("2 Ray actor(s)" in e.get("message", "") for e in events)
    b = _arrays(tmp_path / "ray")
    assert sorted(a) == sorted(b) == [f"r{k}.nii.gz" for k in range(7)]
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert any(v.any() for v in a.values())


def test_cluster_option_refusals(tmp_path, busi_dir):
    image = sorted((busi_dir / "images").glob("*.png"))[0]
    p = run_gms("segment", image, "-o", tmp_path / "x.png", "--cluster", "spark://host")
    assert p.returncode == 2 and "--cluster takes 'ray'" in p.stderr and not (tmp_path / "x.png").exists()


def test_without_ray_the_option_says_how_to_install(monkeypatch):
    from GMSSegmentLib import GMSError
    from GMSSegmentLib.clusterrun import _ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(GMSError, match=r"pip install 'gmssegment\[ray\]'"):
        _ray()
