"""How well a result's uncertainty (uncertainty.py) ranks its errors, measured by ``gms evaluate`` against the ground
truth of a list of cases: the AUROC of the voxel uncertainty for wrong voxels, of the case score for cases with Dice
below 0.7 (and of the slice score for slices of volumes), the correlation of estimated and measured Dice, and
reliability tables."""
from __future__ import annotations

import math

import numpy as np

from .metrics import label_metrics
from .uncertainty import PixelHistogram, auroc, case_reliability, result_uncertainty

#: a case (or slice) is "wrong" for the case-level check when its Dice is below this
WRONG_BELOW = 0.7


def case_dice(pred: np.ndarray, gt: np.ndarray, seg_labels, spacing=None) -> float:
    """Mean Dice over the model's segments (a segment absent from both counts 1, as in ``gms evaluate``)."""
    met = label_metrics(pred, gt, seg_labels, spacing)
    return float(np.mean([v["dice"] for v in met.values()]))


def slice_dice(pred: np.ndarray, gt: np.ndarray, seg_labels, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slice along numpy ``axis``: mean Dice over the segments in the prediction or the ground truth of that slice,
    and whether any is (slices with neither are right by definition and left out of the slice check)."""
    p, g = np.moveaxis(pred, axis, 0), np.moveaxis(gt, axis, 0)
    n = p.shape[0]
    total, count = np.zeros(n), np.zeros(n)
    for lab in seg_labels:
        pk, gk = (p == lab).reshape(n, -1), (g == lab).reshape(n, -1)
        sp, sg, inter = pk.sum(1), gk.sum(1), (pk & gk).sum(1)
        there = (sp + sg) > 0
        total[there] += 2.0 * inter[there] / (sp + sg)[there]
        count += there
    return np.divide(total, count, out=np.ones(n), where=count > 0), count > 0


class UncertaintyCheck:
    """Accumulates, case by case, what ``gms evaluate`` prints about the uncertainty: voxel AUROC for wrong voxels,
    case AUROC for cases with Dice < 0.7, the same per slice for volumes, and reliability tables."""

    def __init__(self, temperature: float, sigma: float, seg_labels):
        self.temperature, self.sigma = temperature, sigma
        self.seg_labels = list(seg_labels)
        self.pixels = PixelHistogram()
        self.case_scores, self.case_dice = [], []
        self.slice_scores, self.slice_dice = [], []

    def add(self, pred: np.ndarray, gt: np.ndarray, soft: dict, dice: float) -> float:
        """One case (prediction and ground truth on the same grid, ``soft`` from segment_array_variants); returns its
        score."""
        res = result_uncertainty(soft, self.temperature, self.sigma)
        umap = res.map.reshape(pred.shape)
        self.pixels.add(umap, pred != gt)
        self.case_scores.append(res.score)
        self.case_dice.append(dice)
        if pred.ndim == 3 and pred.shape[res.axis] > 1:
            d, there = slice_dice(pred, gt, self.seg_labels, res.axis)
            self.slice_scores += list(res.slices[there])
            self.slice_dice += list(d[there])
        return res.score

    def summary(self) -> dict:
        cs, cd = np.array(self.case_scores), np.array(self.case_dice)
        out = {"temperature": self.temperature, "boundary_sigma": self.sigma, "voxel_auroc": self.pixels.auroc(),
               "case_auroc": auroc(cs, cd < WRONG_BELOW), "cases": int(cs.size),
               "cases_wrong": int((cd < WRONG_BELOW).sum()),
               "score_dice_correlation": _pearson(1 - cs, cd),
               "voxel_reliability": self.pixels.reliability(), "case_reliability": case_reliability(cs, cd)}
        if self.slice_scores:
            ss, sd = np.array(self.slice_scores), np.array(self.slice_dice)
            out.update(slice_auroc=auroc(ss, sd < WRONG_BELOW), slices=int(ss.size),
                       slices_wrong=int((sd < WRONG_BELOW).sum()))
        return out

    def print(self) -> dict:
        s = self.summary()
        print(f"uncertainty (temperature {s['temperature']:g}, boundary spread {s['boundary_sigma']:g}): voxel AUROC "
              f"for wrong voxels {_f(s['voxel_auroc'])}; case AUROC for Dice < {WRONG_BELOW} {_f(s['case_auroc'])} "
              f"({s['cases_wrong']} of {s['cases']} cases); estimated vs measured Dice r = "
              f"{_f(s['score_dice_correlation'])}")
        if "slice_auroc" in s:
            print(f"  per slice (slices holding a segment in the result or the reference): AUROC "
                  f"{_f(s['slice_auroc'])} ({s['slices_wrong']} of {s['slices']} slices with Dice < {WRONG_BELOW})")
        print("  voxel reliability: uncertainty range, voxels, fraction wrong")
        for r in s["voxel_reliability"]:
            wrong = "-" if r["wrong"] is None else f"{100 * r['wrong']:.2f} %"
            print(f"    {r['from']:.1f}-{r['to']:.1f} {r['voxels']:>12} {wrong:>9}")
        print("  case reliability: score range, cases, estimated Dice, measured Dice")
        for r in s["case_reliability"]:
            est = "-" if r["estimated_dice"] is None else f"{100 * r['estimated_dice']:.1f}"
            meas = "-" if r["measured_dice"] is None else f"{100 * r['measured_dice']:.1f}"
            print(f"    {r['from']:.1f}-{r['to']:.1f} {r['cases']:>6} {est:>7} {meas:>7}")
        return s


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
