"""Would PyTorch's NNPACK (Winograd) convolution speed up TAEF2's 64->64 3x3 convolutions on this CPU? Effective
GFLOP/s (direct-convolution FLOPs / time) of oneDNN channels-last, oneDNN NCHW and NNPACK, at the encoder's two costly
resolutions, plus NNPACK's largest deviation from oneDNN relative to the output range.

    python benchmarks/nnpack_conv_speed.py --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from GMSSegmentLib.allocator import keep_freed_memory


def timed(f, repeats: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    keep_freed_memory()  # the allocator tuning every gms command applies at start-up
    torch.set_num_threads(args.threads)
    if not torch._nnpack_available():  # also initialises NNPACK: without this call its convolution fails
        print("NNPACK is not available in this PyTorch build")
        return 1
    torch.manual_seed(0)
    for hw, bs in ((224, 4), (112, 8)):
        x = torch.rand(bs, 64, hw, hw)
        w, b = torch.randn(64, 64, 3, 3) * 0.05, torch.zeros(64)
        xc = x.contiguous(memory_format=torch.channels_last)
        gflop = bs * hw * hw * 64 * 64 * 9 * 2 / 1e9
        t_cl = timed(lambda: F.conv2d(xc, w, b, padding=1), args.repeats)
        t_nchw = timed(lambda: F.conv2d(x, w, b, padding=1), args.repeats)
        t_nnp = timed(lambda: torch._nnpack_spatial_convolution(x, w, b, [1, 1]), args.repeats)
        ref = F.conv2d(x, w, b, padding=1)
        dev = float((torch._nnpack_spatial_convolution(x, w, b, [1, 1]) - ref).abs().max() / ref.abs().max())
        print(f"{hw}x{hw} batch {bs}: oneDNN channels-last {gflop / t_cl:.0f} GFLOP/s, oneDNN NCHW "
              f"{gflop / t_nchw:.0f}, NNPACK {gflop / t_nnp:.0f} (max deviation {dev:.1e} of the output range)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
