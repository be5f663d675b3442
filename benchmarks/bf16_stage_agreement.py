"""Which stage of the slice loop costs agreement with fp32 when it runs in bf16 autocast on the CPU: the encoder, the
LMM, the decoder, or all three (what `--precision bf16` does). For each arm: masks pooled over the images, Dice
against the fp32 loop's masks, and the loop's seconds. One plain pass (no test-time augmentation, no
post-processing), the fast decoder on, as `gms benchmark` runs ours. Only meaningful on CPUs with bf16 hardware
(AMX / AVX512-BF16); elsewhere bf16 is emulated and slow.

With --encoder-groups it adds arms with only part of TAEF2's encoder in bf16, by resolution (its 15 modules: the
full-resolution input conv and block, then 1/2, 1/4 and 1/8 resolution), and the encoder from each resolution down,
to find out whether a few sensitive layers cost the agreement (they could then stay in fp32).

    python benchmarks/bf16_stage_agreement.py ../shared/data/busi --model busi-lesion --images 40 --threads 2 \
        [--encoder-groups]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from GMSSegmentLib.allocator import keep_freed_memory
from GMSSegmentLib.data import find_image
from GMSSegmentLib.imageio import read_image
from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.options import InferenceOptions
from GMSSegmentLib.pipeline import SliceSegmenter, segment_array

ARMS = {"fp32": (), "encoder": ("encoder",), "lmm": ("lmm",), "decoder": ("decoder",),
        "all (--precision bf16)": ("encoder", "lmm", "decoder")}
#: TAEF2 encoder modules by resolution: conv + block at 1/1, a strided conv + 3 blocks at 1/2, 1/4, 1/8 (+ out conv)
ENCODER_GROUPS = {"1/1": range(0, 2), "1/2": range(2, 6), "1/4": range(6, 10), "1/8": range(10, 15)}


def _bf16(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


class _Bf16Module(torch.nn.Module):
    """Runs one module under bf16 autocast and hands fp32 on, as a stage boundary of the slice loop does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with _bf16(True):
            return self.inner(x).float()


@contextlib.contextmanager
def _encoder_modules_in_bf16(encoder, indices):
    """Temporarily wrap the encoder's modules ``indices`` (the rest stays fp32)."""
    saved = {i: encoder[i] for i in indices}
    for i in indices:
        encoder[i] = _Bf16Module(saved[i])
    try:
        yield
    finally:
        for i, mod in saved.items():
            encoder[i] = mod


class StageSegmenter(SliceSegmenter):
    """The real slice loop with bf16 autocast on the named stages only."""

    def __init__(self, model, stages, **kw):
        super().__init__(model, "cpu", True, tta=1, precision="fp32", **kw)
        self.stages = set(stages)

    def _autocast(self, stage):
        return _bf16(stage in self.stages)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a 2D data set (images/ masks/ split.json)")
    ap.add_argument("--model", default="busi-lesion")
    ap.add_argument("--list", default="test", help="split.json list whose images are used")
    ap.add_argument("--images", type=int, default=40, help="the first N images of the list (sorted)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--encoder-groups", action="store_true",
                    help="add arms with parts of the encoder in bf16 (by resolution, and from each resolution down)")
    args = ap.parse_args(argv)
    keep_freed_memory()  # the allocator tuning every gms command applies at start-up
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    m = load_model(resolve_model_path(args.model), weights_dir=args.weights_dir)
    names = sorted(json.loads((root / "split.json").read_text())[args.list])[: args.images]
    segs = {arm: StageSegmenter(m, stages) for arm, stages in ARMS.items()}
    modules = {arm: () for arm in segs}  # encoder modules run in bf16 (besides the stages)
    if args.encoder_groups:
        last = len(m.foundation.encoder)
        groups = {f"encoder {name} only": idx for name, idx in ENCODER_GROUPS.items()}
        # "1/1 and below" is the whole encoder, module by module
        groups |= {f"encoder {name} and below": range(idx.start, last) for name, idx in ENCODER_GROUPS.items()}
        for arm, idx in groups.items():
            segs[arm], modules[arm] = StageSegmenter(m, ()), tuple(idx)
    inter = dict.fromkeys(segs, 0)
    total = dict.fromkeys(segs, 0)
    secs = dict.fromkeys(segs, 0.0)
    for name in names:
        img = read_image(find_image(root, name)).array
        masks = {}
        for arm, seg in segs.items():
            t0 = time.perf_counter()
            with _encoder_modules_in_bf16(m.foundation.encoder, modules[arm]):
                masks[arm] = segment_array(m, img, InferenceOptions(postprocess={}), segmenter=seg).astype(bool)
            secs[arm] += time.perf_counter() - t0
        for arm in segs:
            inter[arm] += int((masks[arm] & masks["fp32"]).sum())
            total[arm] += int(masks[arm].sum() + masks["fp32"].sum())
    print(f"{args.model} on {len(names)} '{args.list}' images of {root}, {args.threads} thread(s), one plain pass")
    print(f"{'bf16 stages':<28} {'Dice vs fp32':>12} {'seconds':>8}")
    for arm in segs:
        print(f"{arm:<28} {2 * inter[arm] / max(total[arm], 1):>12.5f} {secs[arm]:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
