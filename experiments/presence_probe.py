"""Can a linear probe on what the shipped busi-lesion model computes tell lesion-free images from lesion images?
Features of each image (one view at the model's input size): the image latent's per-channel mean and standard
deviation, the LMM's deepest features (mean- and max-pooled), the predicted mask latent's distance to the empty-mask
latent, and the decoded mask's area and confidence. Writes presence_probe.npz (features per list; reused when it
exists), then fits an L2 logistic regression on the training lists (lesion vs normal_train, class-balanced) for each
feature group and prints the AUC on each list and, at the threshold that keeps every validation lesion, how many
normal_test images it empties and how many test lesions it loses.
Usage: python experiments/presence_probe.py [DATA] [OUT.npz]
Answer (Models README, "Presence"): test AUC up to 0.98, but at that threshold at most 13 of 40 normals emptied.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from GMSSegmentLib.data import load_2d, read_split, negative_names
from GMSSegmentLib.evaluate import validation_cases
from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.pipeline import SliceSegmenter, to_model_input
from GMSSegmentLib.presence import slice_scores


def extract(root: Path, out_path: str) -> None:
    m = load_model(resolve_model_path("busi-lesion"))
    val = validation_cases(m.card, root)
    sp = read_split(root)
    neg_train, neg_val = negative_names(root, "normal_train", 0.1, 0)
    lists = {"val": val, "neg_val": neg_val, "test": sp["test"], "normal_test": sp["normal_test"],
             "train": sorted(set(sp["train"]) - set(val)), "neg_train": neg_train}
    seg = SliceSegmenter(m, tta=1)
    deep = {}
    m.lmm.encoder[-1].register_forward_hook(lambda mod, i, o: deep.__setitem__("x", o))
    with torch.inference_mode():
        z0 = m.foundation.encode(torch.zeros(1, 3, m.input_size, m.input_size))
        empty_mask_latent = z0.float()  # the latent of an all-black (empty) mask
    res = {}
    for lname, names in lists.items():
        t0 = time.time()
        rows = []
        for n in names:
            s = load_2d(root, n)
            x = to_model_input(s.image[None], m.input_size, "cpu")
            with torch.inference_mode():
                z = m.foundation.encode(x).float()
                pred = m.denorm_mask(m.lmm(m.norm_image(z), final_only=True).float())
                dec = seg.decode(pred)
            area, conf = slice_scores(dec, m.codes)
            f = deep["x"].float()[0]
            dist = float((pred - empty_mask_latent).norm() / empty_mask_latent.norm())
            rows.append(np.concatenate([z[0].mean((1, 2)).numpy(), z[0].std((1, 2)).numpy(),
                                        f.mean((1, 2)).numpy(), f.amax((1, 2)).numpy(),
                                        [dist, float(area[0, 0]), float(conf[0, 0]), float(s.labels.any())]]))
        res[lname] = np.stack(rows)
        res[lname + "_names"] = np.array(names)
        print(lname, len(names), f"{time.time() - t0:.0f}s", flush=True)
    np.savez(out_path, **res)


def fit_and_report(path: str) -> None:
    d = np.load(path)

    def lists(*names):
        return (np.concatenate([d[n][:, :-1] for n in names]), np.concatenate([d[n][:, -1] for n in names]))

    (xtr, ytr), (xva, yva), (xte, yte) = lists("train", "neg_train"), lists("val", "neg_val"), lists("test",
                                                                                                  "normal_test")
    groups = {"decoded area/confidence/latent distance": slice(320, 323), "image latent statistics": slice(0, 64),
              "LMM deepest features": slice(64, 320), "all": slice(0, 323)}

    def auc(s, y):
        pos, neg = s[y == 1], s[y == 0]
        return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())

    for name, cols in groups.items():
        for lam in (1e-3, 1e-2, 1e-1):
            x = xtr[:, cols]
            mu, sd = x.mean(0), x.std(0) + 1e-6
            z = (x - mu) / sd
            w, b = np.zeros(z.shape[1]), 0.0
            weight = np.where(ytr == 1, 1.0, (ytr == 1).sum() / (ytr == 0).sum())
            for _ in range(3000):
                g = (1 / (1 + np.exp(-(z @ w + b))) - ytr) * weight
                w -= 0.1 * (z.T @ g / len(ytr) + lam * w)
                b -= 0.1 * g.mean()
            score = lambda x: ((x[:, cols] - mu) / sd) @ w + b  # noqa: E731
            sva, ste = score(xva), score(xte)
            t = sva[yva == 1].min()  # keeps every validation lesion
            print(f"{name:42s} L2 {lam:g}: AUC train {auc(score(xtr), ytr):.3f} val {auc(sva, yva):.3f} test "
                  f"{auc(ste, yte):.3f}; normal_test emptied {(ste[yte == 0] < t).sum()}/{(yte == 0).sum()}, "
                  f"test lesions lost {(ste[yte == 1] < t).sum()}/{(yte == 1).sum()}")


if __name__ == "__main__":
    data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/busi")
    npz = sys.argv[2] if len(sys.argv) > 2 else "presence_probe.npz"
    if not Path(npz).is_file():
        extract(data, npz)
    fit_and_report(npz)
