"""Can a threshold on what the shipped busi-lesion model decodes tell lesion-free images from lesion images? Scores
(predicted area, mean confidence inside it) on its validation lesions, normal_train, test and normal_test; writes
presence_features.json and prints percentiles. Answer: no, they overlap (Models README, "Presence").
"""
import json
import sys
import time
from pathlib import Path
import numpy as np
import torch

from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.data import load_2d, read_split
from GMSSegmentLib.evaluate import validation_cases
from GMSSegmentLib.pipeline import SliceSegmenter
torch.set_num_threads(1)
root = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/busi")
m = load_model(resolve_model_path("busi-lesion"))
val = validation_cases(m.card, root)
sp = read_split(root)
lists = {"val": val, "normal_train": sp["normal_train"], "test": sp["test"], "normal_test": sp["normal_test"]}
seg = SliceSegmenter(m, tta=None)
out = {}
for lname, names in lists.items():
    t0 = time.time()
    for n in names:
        s = load_2d(root, n)
        with torch.inference_mode():
            dec = seg.decode_slices(s.image[None])
        p = dec.mean(1)[0].numpy()
        gt = s.labels > 0
        feats = dict(list=lname, gt_frac=float(gt.mean()), frac50=float((p > 0.5).mean()), frac75=float((p > 0.75).mean()),
                     frac90=float((p > 0.9).mean()), pmax=float(p.max()), mass=float(p.mean()),
                     pmean_in=float(p[p > 0.5].mean()) if (p > 0.5).any() else 0.0)
        out[n] = feats
    print(lname, len(names), f"{time.time()-t0:.0f}s", flush=True)
json.dump(out, open("presence_features.json", "w"))
for feat in ("frac50", "mass", "pmean_in"):
    for lname in lists:
        xs = np.sort([f[feat] for f in out.values() if f["list"] == lname])
        print(feat, lname, "percentiles 10/25/50/75/90:", np.round(np.percentile(xs, [10, 25, 50, 75, 90]), 4))
