"""Which input sizes help a model at test time: validation Dice of each single size and of every average of sizes
(decoded images resized to the model's size and averaged before the mask is taken, full decoding), with and without
the largest-component post-processing. Validation cases only (the ones the model was selected on), never test.
This trial settled the option set that `gms postprocess` chooses from (the model's size, that plus ~8/7, and one more
such step: 224, 256, 288; the third since 171522f, 2026-12-05, from kvasir-polyp's figures).

    python experiments/tta_scales_trial.py ../shared/data/busi --model busi-lesion --sizes 224 192 256 288
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from GMSSegmentLib.data import find_image, load_mask
from GMSSegmentLib.evaluate import _resize_image, validation_cases
from GMSSegmentLib.imageio import read_image
from GMSSegmentLib.metrics import dice
from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.normalization import apply_range, intensity_range
from GMSSegmentLib.pipeline import SliceSegmenter, to_model_input
from GMSSegmentLib.postprocess import keep_largest_component


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", help="a 2D data set the (binary) model was trained on")
    ap.add_argument("--model", default="busi-lesion")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 192, 256, 288])
    ap.add_argument("--weights-dir", default=None)
    a = ap.parse_args()
    root = Path(a.data)
    m = load_model(resolve_model_path(a.model), weights_dir=a.weights_dir, device=torch.device("cpu"))
    if len(m.segments) != 1:
        sys.exit("this trial handles binary 2D models")
    size = m.input_size
    seg = SliceSegmenter(m, "cpu", False, tta=1)  # full decoding of every view
    names = validation_cases(m.card, root)
    lv = m.card["training"]["label_values"]
    probs = {s: [] for s in a.sizes}
    gts = []
    for name in names:
        arr = _resize_image(read_image(find_image(root, name)).array, size)
        gts.append(np.asarray(Image.fromarray(load_mask(root, name, lv)).resize((size, size), Image.NEAREST)) > 0)
        lo, hi = intensity_range(arr, m.card.get("normalization", {"mode": "photo"}))
        x = apply_range(arr, lo, hi)
        for s in a.sizes:
            with torch.inference_mode():
                dec = seg.decode(seg.predict_latents(to_model_input(x, s, "cpu"))).mean(1, keepdim=True)
                probs[s].append(F.interpolate(dec, size=(size, size), mode="bilinear",
                                              align_corners=False)[0, 0].numpy())
    print(f"{a.model}: validation Dice on {len(names)} cases at {size} px (no post-processing / largest component)")
    for k in range(1, len(a.sizes) + 1):
        for combo in itertools.combinations(a.sizes, k):
            none, lcc = [], []
            for i in range(len(names)):
                p = np.mean([probs[s][i] for s in combo], 0) > 0.5
                none.append(dice(p, gts[i]))
                lcc.append(dice(keep_largest_component(p.astype(np.uint8), [1]) > 0, gts[i]))
            print(f"  {'+'.join(map(str, combo)):<20} {np.mean(none):.4f} / {np.mean(lcc):.4f}", flush=True)


if __name__ == "__main__":
    main()
