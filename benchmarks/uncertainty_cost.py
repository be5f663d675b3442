"""What the uncertainty (uncertainty.py) adds to the slice loop, per slice, with no network pass: keeping the soft
memberships of a batch of decoded images at the output size, the case and slice scores once the labels are known, and
the voxel map with its boundary spread (only when a map is written).

    python benchmarks/uncertainty_cost.py --size 512 --slices 64 --input-size 224

Decoded images are a smooth blob (a disc of radius a quarter of the image, blurred), as a lesion result looks;
the cost does not depend on what they show except for the boundary distance, which grows with the edge length.
Prints milliseconds per slice for each part, single-threaded numpy/torch as in the CLI's default.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from GMSSegmentLib.uncertainty import SoftMasks, result_uncertainty


def decoded_blob(n: int, s: int, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = np.mgrid[:s, :s] / s - 0.5
    disc = 1.0 / (1.0 + np.exp((np.hypot(yy, xx) - 0.25) * 40))  # soft-edged disc
    codes = torch.eye(3)[:segments] if segments > 1 else torch.ones(1, 3)
    img = torch.from_numpy(disc.astype(np.float32))[None, None] * codes[0].view(1, 3, 1, 1)
    return img.expand(n, -1, -1, -1).contiguous(), codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="output slice size (pixels a side)")
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=224, help="the model's input size (decoded images)")
    ap.add_argument("--segments", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=8.0, help="boundary spread (model-input pixels)")
    a = ap.parse_args()
    dec, codes = decoded_blob(a.batch_size, a.input_size, a.segments)
    masks = SoftMasks(a.slices, (a.size, a.size), a.segments)
    t0 = time.perf_counter()
    for b in range(0, a.slices, a.batch_size):
        idx = list(range(b, min(b + a.batch_size, a.slices)))
        masks.add(idx, dec[: len(idx)], codes)
    keep = time.perf_counter() - t0
    labels = (masks.q[:, -1] > 127).astype(np.uint8)
    soft = {"masks": masks, "labels": labels, "axis": 0, "reo": None, "input_size": a.input_size}
    t0 = time.perf_counter()
    result_uncertainty(soft, 3.0, with_map=False)
    scores = time.perf_counter() - t0
    t0 = time.perf_counter()
    result_uncertainty(soft, 3.0, 0.0)
    plain_map = time.perf_counter() - t0 - scores
    t0 = time.perf_counter()
    result_uncertainty(soft, 3.0, a.sigma)
    spread_map = time.perf_counter() - t0 - scores
    per = 1000.0 / a.slices
    print(f"{a.slices} slices of {a.size}x{a.size} from {a.input_size}x{a.input_size} decoded images, "
          f"{a.segments} segment(s), torch threads {torch.get_num_threads()}")
    print(f"  keeping the memberships : {keep * per:7.2f} ms/slice ({masks.q.nbytes / 2**20:.0f} MiB held)")
    print(f"  case and slice scores   : {scores * per:7.2f} ms/slice (every result)")
    print(f"  voxel map, no spread    : {plain_map * per:7.2f} ms/slice (only with --uncertainty)")
    print(f"  voxel map, spread {a.sigma:g}    : {spread_map * per:7.2f} ms/slice (only with --uncertainty)")


if __name__ == "__main__":
    main()
