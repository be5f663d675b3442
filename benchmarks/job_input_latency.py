"""How long does the GUI thread wait while a job's input is written? On slicer-core (headless MRML), with volume nodes
of CT size (default three 512x512x300 int16 volumes of random values): the time ``SegmentationLogic.start()`` takes to
return and the longest single ``poll()`` while the volumes are handed to the worker (each poll reads one volume's
voxels in the calling thread; a thread writes its file), plus the time one such volume takes to write as uncompressed
.nrrd and as compressed .nii.gz (what the training export wrote before). The worker is a stand-in that exits at once
(the point is the input stage, not the segmentation), so no model runs.

    python benchmarks/job_input_latency.py [--volumes 3] [--slices 300]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GMSSegment"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--model", default="hippocampus", help="any installed model (only its card is read)")
    args = ap.parse_args(argv)

    import slicer

    from GMSSegmentLib import slicer_logic as L

    scene = slicer.vtkMRMLScene()
    segLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segLogic.SetMRMLScene(scene)
    rng = np.random.default_rng(0)
    volumes = []
    for k in range(args.volumes):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"ct{k}")
        slicer.util.updateVolumeFromArray(node, rng.integers(-1000, 1500, (args.slices, 512, 512)).astype(np.int16))
        volumes.append(node)

    with tempfile.TemporaryDirectory() as tmp:
        for name, compress in (("x.nrrd", False), ("x.nii.gz", True)):
            t0 = time.perf_counter()
            L.exportVolumeNode(volumes[0], os.path.join(tmp, name), compress=compress)
            print(f"write one volume as {name[2:]:<7} ({'compressed' if compress else 'uncompressed'}): "
                  f"{time.perf_counter() - t0:.2f} s")
        stand_in = Path(tmp) / "python"
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
        logic = L.SegmentationLogic(scene=scene, tempRoot=tmp)
        logic.pythonExecutable = str(stand_in)
        t0 = time.perf_counter()
        job = logic.start(volumes, args.model)
        started = time.perf_counter() - t0
        longest, polls = 0.0, 0
        while job.pid is None and not job.finished:
            t0 = time.perf_counter()
            job.poll()
            longest, polls = max(longest, time.perf_counter() - t0), polls + 1
            time.sleep(0.02)
        job.wait(30)
        print(f"start() of {args.volumes} volumes of 512x512x{args.slices} returned in {started:.3f} s; "
              f"longest poll until the worker started {longest:.3f} s ({polls} polls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
