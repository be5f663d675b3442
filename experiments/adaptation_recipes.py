"""Which few-shot adaptation recipe helps kvasir-polyp on a new site? Screens recipes fast, in one process: the k
adaptation cases (every 6th id of cvc-clinicdb-dev's `adapt` list) are encoded once with augmented copies, the `test`
frames once at the model's input size; each recipe adapts the LMM (adapt.fit_fold, as gms train does) and is scored
by one plain pass per test frame (no test-time views: for ranking recipes, not the product figure, which
benchmarks/adaptation_curve.py measures with the user's command).

    python experiments/adaptation_recipes.py [--k 20] [--recipes base lr5e-4 ...]
Prints one line per recipe: fit seconds, mean test Dice at the input size, and the starting model's.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from GMSSegmentLib.adapt import Recipe, fit_fold
from GMSSegmentLib.data import load_2d
from GMSSegmentLib.latentcache import LatentCache
from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.options import TrainConfig
from GMSSegmentLib.pipeline import classify
from GMSSegmentLib.trainstep import per_image_dice

RECIPES = {  # name: (TrainConfig changes, Recipe changes)
    "base": ({}, {}),
    "lr5e-4": ({}, {"lr": 5e-4}),
    "lr2e-4": ({}, {"lr": 2e-4}),
    "lr5e-4-ema": ({"ema": 0.99}, {"lr": 5e-4}),
    "lr5e-4-anchor": ({}, {"lr": 5e-4, "anchor": 1e-3}),
    "lr5e-4-mse": ({"dice_samples": 0}, {"lr": 5e-4}),
    "lr5e-4-ep30": ({}, {"lr": 5e-4, "epochs": 30}),
    "lr1e-3-ep30": ({}, {"lr": 1e-3, "epochs": 30}),
    # the image latents standardised with the site's own statistics (no labels needed), without / with training
    "restats": ({"restats": True}, {"epochs": 0}),
    "restats-lr5e-4": ({"restats": True}, {"lr": 5e-4}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cvc-clinicdb-dev"))
    ap.add_argument("--model", default="kvasir-polyp")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--budget-s", type=float, default=None, help="time limit per fit")
    ap.add_argument("--out", type=Path, default=Path("runs/adaptation-recipes.jsonl"))
    a = ap.parse_args()
    m = load_model(resolve_model_path(a.model))
    split = json.loads((a.data / "split.json").read_text())
    key = lambda s: int(s)  # noqa: E731
    cases = sorted(split["adapt"], key=key)[::6][:a.k]
    test = sorted(split["test"], key=key)
    codes = m.codes.numpy()
    fnd, size = m.foundation, m.input_size
    samples_fn = lambda n: [load_2d(a.data, n, [255], m.card.normalization_or_default)]  # noqa: E731
    t0 = time.time()
    cache = a.out.parent / "adaptation-recipes-cache"  # reused by later runs with the same k and copies
    tr = LatentCache.build(samples_fn, cases, a.copies, fnd, size, codes, 0, cache / f"k{a.k}-c{a.copies}.safetensors",
                           log=lambda s: None)
    te = LatentCache.build(samples_fn, test, 1, fnd, size, codes, 0, cache / "test.safetensors", log=lambda s: None)
    print(f"encoded {len(cases)} x {a.copies} + {len(test)} in {time.time() - t0:.0f} s; cases {cases}", flush=True)
    codes_t = torch.from_numpy(codes)

    @torch.inference_mode()
    def score(lmm) -> float:
        out = []
        for i in range(0, len(te.img), 16):
            z = m.denorm_mask(lmm(m.norm_image(te.img[i:i + 16].float()), final_only=True).float())
            pred = classify(fnd.decode(z.contiguous(memory_format=torch.channels_last)), codes_t, (size, size))
            out.append(per_image_dice(pred, te.labels[i:i + 16].long(), 1))
        return float(np.concatenate(out).mean())

    before = score(m.lmm.eval())
    print(f"starting model: test Dice {100 * before:.2f} (one plain pass at {size})", flush=True)
    entries = torch.arange(len(cases) * a.copies)
    shipped = {k: getattr(m, k).clone() for k in ("image_mean", "image_std")}
    site = {"image_mean": tr.img.float().mean(dim=(0, 2, 3)).view_as(shipped["image_mean"]),
            "image_std": tr.img.float().std(dim=(0, 2, 3)).clamp_min(1e-3).view_as(shipped["image_std"])}
    for name in a.recipes:
        cfg_changes, recipe_changes = RECIPES[name]
        cfg_changes = dict(cfg_changes)
        for k, v in (site if cfg_changes.pop("restats", False) else shipped).items():
            getattr(m, k).copy_(v)
        cfg = replace(TrainConfig(data="", output=""), **cfg_changes)
        recipe = replace(Recipe(epochs=a.epochs, lr=cfg.lr, warmup_epochs=5, anchor=0.0), **recipe_changes)
        t1 = time.time()
        lmm = fit_fold(m, tr, entries, a.copies, codes_t, cfg, recipe, "fp32", a.budget_s, log=lambda s: None)
        fit_s = time.time() - t1
        d = score(lmm)
        row = {"recipe": name, "k": a.k, "copies": a.copies, "fit_s": round(fit_s, 1), "test_dice": round(100 * d, 2),
               "before": round(100 * before, 2), "cfg": cfg_changes, "recipe_changes": recipe_changes}
        print(json.dumps(row), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
