"""The CUDA path, on a machine with an NVIDIA GPU (skipped elsewhere; ``bash benchmarks/gpu_check.sh`` runs these and
``gms benchmark --device cuda`` there): the bundled models on the GPU as accurate as on the CPU, the command line and
the warm worker on ``--device cuda``, and a few training steps on the GPU."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import run_gms, worker_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

from GMSSegmentLib.imageio import read_image  # noqa: E402
from GMSSegmentLib.metrics import dice  # noqa: E402
from GMSSegmentLib.model import load_model, resolve_model_path  # noqa: E402
from GMSSegmentLib.pipeline import SliceSegmenter, segment_array  # noqa: E402


def _test_cases(busi_dir, n: int = 20) -> list[str]:
    return sorted(json.loads((busi_dir / "split.json").read_text())["test"])[:n]


def test_gpu_accuracy_matches_cpu(busi_dir, shared_dir):
    """busi-lesion on BUSI test images: CUDA autocast (auto) and CUDA fp32 against the CPU's fp32, by DSC against the
    ground truth, paired per image."""
    dsc: dict[str, list[float]] = {"cpu": [], "cuda-auto": [], "cuda-fp32": []}
    models = {d: load_model(resolve_model_path("busi-lesion"), weights_dir=shared_dir / "models", device=d)
              for d in ("cpu", "cuda")}
    for case in _test_cases(busi_dir):
        image = read_image(busi_dir / "images" / f"{case}.png").array
        truth = read_image(busi_dir / "masks" / f"{case}.png").array > 0
        for key, device, precision in (("cpu", "cpu", "fp32"), ("cuda-auto", "cuda", "auto"),
                                       ("cuda-fp32", "cuda", "fp32")):
            seg = SliceSegmenter(models[device], device, precision=precision)
            dsc[key].append(dice(segment_array(models[device], image, segmenter=seg) > 0, truth))
    cpu = np.array(dsc["cpu"])
    for key in ("cuda-auto", "cuda-fp32"):
        d = 100 * (np.array(dsc[key]) - cpu)
        print(f"{key}: DSC {100 * np.mean(dsc[key]):.2f} vs CPU fp32 {100 * cpu.mean():.2f}, paired difference "
              f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(d.size):.2f}")
        assert d.mean() >= -0.3, key


def test_cli_and_warm_worker_on_cuda(busi_dir, hippo_dir, tmp_path):
    """``gms segment --device cuda`` on a 2D image and a 3D volume, and the warm worker answering two CUDA jobs."""
    image = busi_dir / "images" / f"{_test_cases(busi_dir, 1)[0]}.png"
    volume = sorted((hippo_dir / "imagesTr").glob("*.nii.gz"))[0]
    for src, model in ((image, "busi-lesion"), (volume, "hippocampus")):
        out = {}
        for device in ("cpu", "cuda"):
            path = tmp_path / f"{model}-{device}.nrrd"
            run_gms("segment", src, "-o", path, "--model", model, "--device", device, "--progress", "none",
                    check=True)
            out[device] = read_image(path).array
        labels = sorted(set(np.unique(out["cpu"]).tolist()) - {0})
        assert labels, model
        for label in labels:
            assert dice(out["cpu"] == label, out["cuda"] == label) >= 0.97, (model, label)

    proc = subprocess.Popen([sys.executable, "-m", "GMSSegmentLib", "serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=worker_env())
    try:
        for k in range(2):
            args = ["segment", str(image), "-o", str(tmp_path / f"warm{k}.png"), "--model", "busi-lesion",
                    "--device", "cuda", "--progress", "json"]
            proc.stdin.write(json.dumps({"args": args}) + "\n")
            proc.stdin.flush()
            events = []
            while not events or events[-1]["event"] != "served":
                events.append(json.loads(proc.stdout.readline()))
            assert events[-1]["code"] == 0 and any(e["event"] == "result" for e in events), events
            assert any("on cuda" in e.get("message", "") for e in events), events
    finally:
        proc.kill()


def test_training_steps_on_cuda(busi_dir, tmp_path):
    out = tmp_path / "cuda-model"
    run_gms("train", busi_dir, "-o", out, "--device", "cuda", "--max-train", "16", "--max-val", "4", "--epochs", "2",
            "--warmup-epochs", "1", "--augment-copies", "1", "--no-postprocess-select", check=True)
    assert json.loads((out / "card.json").read_text())["training"]["epochs_run"] >= 1
    model = load_model(out, device="cuda")
    assert next(model.lmm.parameters()).is_cuda
