"""Shortcuts that could take inference past the ceiling `gms benchmark` prints (reference seconds / our encoder's
seconds), measured side by side in one run on this CPU:

1. the encoder's arithmetic: TAEF2's encoder on a batch of real BUSI test images at the model's input size, in fp32
   (what inference runs), fp16 and bf16 autocast, fp32 with oneDNN's implicit bf16 convolutions
   (``torch.backends.mkldnn.conv.fp32_precision = "bf16"``) and fp32 through ``torch.jit.optimize_for_inference``:
   seconds per batch and the latent's relative L2 error against fp32;
2. a screening pass: the plain pass at smaller input sizes as a detector of slices to skip, on BUSI `normal` and
   `test` images; for each size and threshold on the screen's largest decoded-mask value, how many images the plain
   pass at the model's size finds foreground on would be skipped (missed), and how many images would be skipped at all.

    python benchmarks/encoder_shortcuts.py ../shared/data/busi --model busi-lesion --weights-dir ../shared/models \
        [--images 48] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from GMSSegmentLib.allocator import keep_freed_memory
from GMSSegmentLib.benchmark import stack_slice
from GMSSegmentLib.data import find_image
from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.normalization import apply_range, intensity_range
from GMSSegmentLib.pipeline import SliceSegmenter, to_model_input

SCREEN_SIZES = (112, 96, 64)
THRESHOLDS = (0.1, 0.2, 0.3)


def _slices(model, root: Path, names: list[str]) -> np.ndarray:
    """The images as the benchmark stack holds them (grey, 512x512), normalised as inference normalises a volume
    (one intensity range for the whole stack): (N, 512, 512) in [0, 1]."""
    stack = np.stack([stack_slice(find_image(root, n), 512, 512) for n in names])
    lo, hi = intensity_range(stack, model.card.get("normalization", {"mode": "photo"}))
    return apply_range(stack, lo, hi)


def _time(fn, x, repeats: int):
    with torch.inference_mode():
        fn(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn(x)
    return out.float(), (time.perf_counter() - t0) / repeats


def encoder_arms(model, x: torch.Tensor, repeats: int) -> None:
    enc = model.foundation.encoder

    def autocast(dtype):
        def run(t):
            with torch.autocast("cpu", dtype=dtype):
                return enc(t)
        return run

    def implicit_bf16(t):
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
        try:
            return enc(t)
        finally:
            torch.backends.mkldnn.conv.fp32_precision = "none"

    ref, t32 = _time(enc, x, repeats)
    arms = {"fp16 autocast": autocast(torch.float16), "bf16 autocast": autocast(torch.bfloat16),
            "fp32, oneDNN implicit bf16 convolutions": implicit_bf16}
    print(f"encoder on {x.shape[0]} images of {x.shape[-1]} px, seconds per batch and relative L2 error of the latent")
    try:
        with torch.no_grad():
            arms["fp32, jit.optimize_for_inference"] = torch.jit.optimize_for_inference(torch.jit.trace(enc, x))
    except Exception as e:  # TorchScript is optional in some builds: say so instead of dropping the arm silently
        print(f"  {'fp32, jit.optimize_for_inference':<42} not available here ({type(e).__name__}: {e})")
    print(f"  {'fp32 (inference)':<42} {t32:7.3f} s  1.00x  error 0")
    for name, fn in arms.items():
        out, secs = _time(fn, x, repeats)
        err = float((out - ref).norm() / ref.norm())
        print(f"  {name:<42} {secs:7.3f} s  {t32 / secs:.2f}x  error {err:.1e}")


def screening(model, slices: np.ndarray, kinds: list[str], batch: int) -> None:
    size = model.input_size
    segs = {s: SliceSegmenter(model, "cpu", True, tta=1, scales=[s]) for s in (size, *SCREEN_SIZES)}
    peak = {s: [] for s in segs}
    fg = []
    for b in range(0, len(slices), batch):
        for s, seg in segs.items():
            prob = seg.decode_slices(slices[b:b + batch]).mean(dim=1).flatten(1)
            peak[s] += prob.max(dim=1).values.tolist()
            if s == size:
                fg += (prob > 0.5).any(dim=1).tolist()
    fg, kinds = np.array(fg), np.array(kinds)
    print(f"plain pass at {size} px: foreground on {int(fg[kinds == 'normal'].sum())} of {(kinds == 'normal').sum()} "
          f"normal and {int(fg[kinds == 'test'].sum())} of {(kinds == 'test').sum()} test images")
    print("screening pass (skip an image when the screen's largest decoded-mask value is below the threshold)")
    for s in SCREEN_SIZES:
        p = np.array(peak[s])
        for th in THRESHOLDS:
            skip = p < th
            print(f"  {s:>4} px, threshold {th}: skips {int(skip.sum())} of {len(p)} images, "
                  f"{int((skip & fg).sum())} of them with foreground at {size} px")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="BUSI (images/ masks/ split.json with 'normal' and 'test' lists)")
    ap.add_argument("--model", default="busi-lesion")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--images", type=int, default=48, help="the first N images of each of the two lists")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    keep_freed_memory()  # as the CLI does
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    model = load_model(resolve_model_path(args.model), weights_dir=args.weights_dir)
    model = model.eval().to(memory_format=torch.channels_last)
    split = json.loads((root / "split.json").read_text())
    names, kinds = [], []
    for kind in ("normal", "test"):
        got = sorted(split[kind])[: args.images]
        names += got
        kinds += [kind] * len(got)
    slices = _slices(model, root, names)
    x = to_model_input(slices[args.images: args.images + args.batch], model.input_size, "cpu")
    print(f"{args.model}, {args.threads} thread(s)")
    encoder_arms(model, x, args.repeats)
    screening(model, slices, kinds, args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
