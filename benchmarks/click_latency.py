"""How long a click on a 2D image takes in Slicer, end to end: ``SegmentationLogic.segment()`` on slicer-core (the
volume node handed to the worker, the segmentation, the result imported into a Segmentation node), with the real
worker protocol. The first click starts the warm worker (Python, PyTorch, the model: ``cold click``); the later ones
find it waiting with the model loaded (``warm click``, the median of ``--clicks``). ``--no-warm`` measures the
one-job-per-worker way for comparison (every click is cold).

    python benchmarks/click_latency.py [--model busi-lesion] [--image ../shared/data/busi/images/benign_1.png]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_kind() -> str:
    """The CPU's name and the flags that decide its speed here (AMX, AVX512-BF16, AVX2)."""
    name, flags = platform.processor() or "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    kind = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{name or 'unknown CPU'} ({', '.join(kind) or 'no AVX2'}), {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="busi-lesion")
    ap.add_argument("--image", default=str(REPO.parent / "shared" / "data" / "busi" / "images" / "benign_1.png"))
    ap.add_argument("--clicks", type=int, default=5, help="warm clicks after the cold one (default 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights-dir", default=os.environ.get("GMS_WEIGHTS_DIR") or
                    (str(REPO.parent / "shared" / "models") if (REPO.parent / "shared" / "models").is_dir() else None))
    ap.add_argument("--no-warm", action="store_true", help="a new worker for every click (the way before)")
    args = ap.parse_args(argv)

    import slicer

    from GMSSegmentLib import slicer_logic as L

    scene = slicer.vtkMRMLScene()
    segLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segLogic.SetMRMLScene(scene)
    volume = L.addVolumeNodeFromFile(scene, args.image)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        logic = L.SegmentationLogic(scene=scene, tempRoot=tmp)
        logic.keepWorkerWarm = not args.no_warm
        try:
            for k in range(1 + args.clicks):
                t0 = time.perf_counter()
                job = logic.segment(volume, args.model, device=args.device, weightsDir=args.weights_dir,
                                    timeout=600)
                seconds = time.perf_counter() - t0
                if job.state != L.JobState.SUCCEEDED:
                    print(f"click {k + 1} failed: {job.errorMessage}")
                    return 1
                times.append(seconds)
                for node in job.segmentationNodes:  # the next click starts from the same scene
                    scene.RemoveNode(node)
        finally:
            logic.shutdown()
    print(f"CPU: {cpu_kind()}; model {args.model}; image {Path(args.image).name} "
          f"({'a new worker per click' if args.no_warm else 'warm worker'})")
    print(f"cold click: {times[0]:.2f} s")
    if len(times) > 1:
        print(f"warm click: {statistics.median(times[1:]):.2f} s (median of {len(times) - 1}; "
              f"{', '.join(f'{t:.2f}' for t in times[1:])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
