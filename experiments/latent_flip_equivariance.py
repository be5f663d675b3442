"""Is the foundation encoder flip/rotation-equivariant? If it were, flipping cached latents would be a free training
augmentation. For each image: relative L2 distance between E(flip(x)) and flip(E(x)) (0 = equivariant), and the mean
absolute difference between decode(flip(z)) and flip(decode(z)) in [0, 1] pixel units.

    python experiments/latent_flip_equivariance.py ../shared/data/busi --weights-dir ../shared/models --images 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from GMSSegmentLib.autoencoders import load_foundation
from GMSSegmentLib.data import find_image, read_split
from GMSSegmentLib.imageio import read_image
from GMSSegmentLib.normalization import apply_range, intensity_range
from GMSSegmentLib.pipeline import to_model_input

OPS = {"hflip": lambda t: t.flip(-1), "vflip": lambda t: t.flip(-2), "rot90": lambda t: t.rot90(1, (-2, -1))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a 2D data set folder (images/ masks/ split.json)")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--images", type=int, default=4, help="the first N cases of the train list")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    ae = load_foundation({"name": "taef2"}, weights_dir=args.weights_dir).eval()
    errs = {k: [] for k in OPS}
    print(f"{'case':<16} {'op':<6} {'latent rel. L2':>14} {'decoded mean abs':>17}")
    with torch.inference_mode():
        for name in read_split(root)["train"][: args.images]:
            a = read_image(find_image(root, name)).array[0]
            lo, hi = intensity_range(a, {"mode": "photo"})
            x = to_model_input(apply_range(a[None], lo, hi), args.size, "cpu").contiguous()
            z = ae.encode(x)
            dz = ae.decode(z)
            for k, f in OPS.items():
                zf = ae.encode(f(x).contiguous())
                e = float((f(z) - zf).norm() / zf.norm())
                d = float((ae.decode(f(z).contiguous()) - f(dz)).abs().mean())
                errs[k].append(e)
                print(f"{name:<16} {k:<6} {e:>14.3f} {d:>17.4f}")
    for k, v in errs.items():
        print(f"{k}: latent relative L2 {min(v):.3f} .. {max(v):.3f} over {len(v)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
