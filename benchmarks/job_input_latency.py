"""How long does the GUI thread wait while a job's input is written and its results are imported? On slicer-core
(headless MRML), with volume nodes of CT size (default three 512x512x300 int16 volumes of random values): the time
``SegmentationLogic.start()`` takes to return and the longest single ``poll()`` while the volumes are handed to the
worker (each poll reads one volume's voxels in the calling thread; a thread writes its file), plus the time one such
volume takes to write as uncompressed .nrrd and as compressed .nii.gz (what the training export wrote before); then
the longest ``poll()`` while the results are imported (one volume per poll) against all imports together (what the
one poll that imported every result took before). The worker is a stand-in that writes a ball-shaped label map as
each volume's .seg.nrrd result (the point is the GUI side, not the segmentation), so no model runs.

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
        script = Path(tmp) / "stand_in_worker.py"
        script.write_text(STAND_IN)
        stand_in = Path(tmp) / "python"
        stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
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
        print(f"start() of {args.volumes} volumes of 512x512x{args.slices} returned in {started:.3f} s; "
              f"longest poll until the worker started {longest:.3f} s ({polls} polls)")
        while job._worker.returncode() is None:  # the stand-in writes its results (its output is read in threads)
            time.sleep(0.02)
        longest, total, polls = 0.0, 0.0, 0
        while not job.finished:
            t0 = time.perf_counter()
            job.poll()
            took = time.perf_counter() - t0
            longest, total, polls = max(longest, took), total + took, polls + 1
            time.sleep(0.02)
        assert job.state == L.JobState.SUCCEEDED, (job.errorMessage, job.log[-10:])
        print(f"import of {args.volumes} results (one per poll, {polls} polls): longest poll {longest:.3f} s; "
              f"all together {total:.3f} s (what one poll took when every result was imported at once)")
    return 0


STAND_IN = """
import json, sys
import numpy as np
from GMSSegmentLib.imageio import read_image, write_labels
args = sys.argv[1:]
jobs = json.load(open(args[args.index("--jobs") + 1]))
segments = [{"name": "ball", "label": 1, "color": [0.9, 0.5, 0.2]}]
for i, job in enumerate(jobs):
    img = read_image(job["input"])
    k, j, i3 = np.ogrid[tuple(slice(0, n) for n in img.array.shape[:3])]
    c = [n // 2 for n in img.array.shape[:3]]
    labels = (((k - c[0]) / (c[0] + 1)) ** 2 + ((j - c[1]) / (c[1] + 1)) ** 2
              + ((i3 - c[2]) / (c[2] + 1)) ** 2 < 0.25).astype(np.uint8)
    path = write_labels(job["output"], labels, img.geometry, segments)
    print(json.dumps({"event": "result", "item": i, "path": path, "segments": segments}), flush=True)
"""


if __name__ == "__main__":
    sys.exit(main())
