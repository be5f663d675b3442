"""What `GMSSegmentLib.allocator.keep_freed_memory` (glibc malloc kept from mapping and unmapping every large tensor)
saves, side by side in one run: TAEF2 encodes and decodes a batch of images in two child processes, one with glibc's
defaults (GMS_MALLOC_TUNING=0) and one with the tuning the CLI applies at start-up, and each prints wall seconds,
user and kernel CPU seconds, page faults and peak RSS for the same work.

    python benchmarks/allocator_cost.py --weights-dir ../shared/models [--size 256] [--batch 16] [--repeats 3]
        [--precision bf16|fp32] [--threads 2]

(Only Linux with glibc is affected; elsewhere both children print the same figures.)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def child(a) -> None:
    import torch

    from GMSSegmentLib.allocator import keep_freed_memory
    from GMSSegmentLib.model import load_model
    from GMSSegmentLib.modelpaths import resolve_model_path
    from GMSSegmentLib.pipeline import train_autocast

    tuned = keep_freed_memory()
    torch.set_num_threads(a.threads)
    fnd = load_model(resolve_model_path("busi-lesion"), weights_dir=a.weights_dir).foundation
    fnd.to(memory_format=torch.channels_last)
    x = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), train_autocast(torch.device("cpu"), a.precision):
        fnd.decode(fnd.encode(x))  # warm-up: oneDNN primitives, first touch of the heap
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(a.repeats):
            fnd.decode(fnd.encode(x))
        secs, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"tuned": tuned, "seconds": secs, "user": r1.ru_utime - r0.ru_utime,
                      "kernel": r1.ru_stime - r0.ru_stime, "page_faults": r1.ru_minflt - r0.ru_minflt,
                      "peak_rss_mib": r1.ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    print(f"TAEF2 encode + decode of {a.batch} images at {a.size} px, {a.repeats} times, {a.precision}, "
          f"{a.threads} threads")
    res = {}
    for name, flag in (("glibc defaults", "0"), ("kept freed memory", "1")):
        env = dict(os.environ, GMS_MALLOC_TUNING=flag)
        out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, check=True,
                             capture_output=True, text=True).stdout
        r = res[name] = json.loads(out.strip().splitlines()[-1])
        print(f"  {name:<18} {r['seconds']:6.2f} s wall; CPU {r['user']:.2f} s user + {r['kernel']:.2f} s kernel; "
              f"{r['page_faults']:,} page faults; peak RSS {r['peak_rss_mib']:.0f} MiB (tuning in effect: {r['tuned']})")
    a_, b_ = res["glibc defaults"], res["kept freed memory"]
    print(f"speed-up {a_['seconds'] / b_['seconds']:.2f}x")


if __name__ == "__main__":
    main()
