"""Measures the training-cost choices of `gms train` on this machine, side by side in one run:
seconds per training step (batch 8, 32x28x28 latents; the loss `gms train` computes, `train.step_loss`, on the bundled
busi-lesion model) with the decoded-Dice term on 0, 2 and 8 samples of the final head and on 2 samples of the last 3
heads (`--dice-heads 3`, the paper's loss), in fp32 and in bf16 autocast (what `gms train --precision auto` picks on
CPUs with AMX / AVX512-BF16), and the cost of encoding the batch's images and masks, which the latent cache removes
from every epoch.

With --compile it adds the bf16 step with the LMM compiled by torch.compile (what `gms train --compile` runs; the
compilation itself, minutes, is timed separately).

    python benchmarks/train_step_cost.py [--weights-dir ../shared/models] [--steps 5] [--compile]
        [--precisions fp32] [--threads 1]

(On a CPU without bf16 hardware the bf16 arms are emulated and slow: ``--precisions fp32`` skips them.)
"""
from __future__ import annotations

import argparse
import time

import torch

from GMSSegmentLib.allocator import keep_freed_memory
from GMSSegmentLib.model import load_model
from GMSSegmentLib.modelpaths import resolve_model_path
from GMSSegmentLib.pipeline import cpu_has_fast_bf16, train_autocast
from GMSSegmentLib.train import step_loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--compile", action="store_true", help="also time the bf16 step with the LMM compiled")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: all cores)")
    a = ap.parse_args()
    keep_freed_memory()  # the allocator tuning every gms command applies at start-up
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(resolve_model_path("busi-lesion"), weights_dir=a.weights_dir)
    fnd, lmm, codes = model.foundation, model.lmm, model.codes
    fnd.to(memory_format=torch.channels_last)  # frozen already: every foundation model is loaded frozen
    lmm.to(memory_format=torch.channels_last).train().requires_grad_(True)  # load_model freezes it for inference
    opt = torch.optim.AdamW(lmm.parameters(), lr=1e-4)
    s, h = a.size, a.size // 8
    zi = torch.randn(8, 32, h, h).contiguous(memory_format=torch.channels_last)
    zm = torch.randn(8, 32, h, h)
    labels = (torch.rand(8, s, s) > 0.7).long()
    cpu = torch.device("cpu")
    print(f"threads {torch.get_num_threads()}, input {s}x{s}, batch 8, bf16 hardware: {cpu_has_fast_bf16()}")
    arms = [(p, d, k, False) for p in a.precisions for d, k in ((0, 1), (2, 1), (8, 1), (2, 3))]
    if a.compile:
        arms += [("bf16", 2, 1, True)]
        compiled = torch.compile(lmm, dynamic=False)
    for precision, d, heads, comp in arms:
        net = compiled if comp else lmm
        times = []
        for i in range(a.steps + 1):
            t0 = time.perf_counter()
            with train_autocast(cpu, precision):
                loss = step_loss(model, net(zi), zm, labels[:d], codes, d, heads)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first step warms up (and compiles)
                times.append(time.perf_counter() - t0)
            else:
                first = time.perf_counter() - t0
        what = f"{precision} step with decoded Dice on {d} of 8 samples"
        if heads > 1:
            what += f", last {heads} heads"
        if comp:
            what += f", LMM compiled (first step with the compilation: {first:.0f} s)"
        print(f"  {what}: {sum(times) / len(times):.2f} s")
    x = torch.rand(8, 3, s, s).contiguous(memory_format=torch.channels_last)
    for precision in a.precisions:
        with torch.inference_mode(), train_autocast(cpu, precision):
            fnd.encode(x)
            t0 = time.perf_counter()
            for _ in range(2):
                fnd.encode(x)
            enc = (time.perf_counter() - t0) / 2 * 2  # images and masks
        print(f"  {precision} encoding of the batch's 8 images + 8 masks (saved per step by the latent cache): "
              f"{enc:.2f} s")

if __name__ == "__main__":
    main()
