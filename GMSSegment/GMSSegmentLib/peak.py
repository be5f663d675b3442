"""The machine's own peak, for ``gms benchmark``'s distance to the roofline: GFLOP/s of a large matrix product and of
a convolution like the foundation model's costliest ones (64 -> 64 channels, 3 x 3, 112 x 112, channels-last, batch
8), measured in this process, with its threads and in the precision the loop runs in (fp32, or bf16 autocast).

A stage's achieved GFLOP/s (``SegmentStats.stage_flops`` over its seconds) divided by the convolution peak is how far
that stage is from what this CPU does with the same kind of work; the matrix product is the CPU's arithmetic limit.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F


def _rate(flops: float, run, seconds: float) -> float:
    """GFLOP/s of ``run`` (``flops`` per call), repeated for about ``seconds`` after one warm-up call."""
    run()
    n, t0 = 0, time.perf_counter()
    while True:
        run()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return flops * n / elapsed / 1e9


def measure_peak(precision: str = "fp32", device: str = "cpu", seconds: float = 1.0) -> dict:
    """{"matmul": GFLOP/s, "conv": GFLOP/s} on ``device`` in ``precision`` ('fp32' or 'bf16')."""
    device = torch.device(device)
    bf16 = precision == "bf16"
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    x = torch.randn(8, 64, 112, 112, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    out = {}
    with torch.inference_mode(), cast:
        def matmul():
            torch.mm(a, b)
            sync()

        def conv():
            F.conv2d(x, w, padding=1)
            sync()
        out["matmul"] = _rate(2.0 * n ** 3, matmul, seconds)
        out["conv"] = _rate(2.0 * 8 * 64 * 64 * 9 * 112 * 112, conv, seconds)
    return out
