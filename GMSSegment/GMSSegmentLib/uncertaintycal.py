"""``gms uncertainty``: choose the temperature of a model's uncertainty (uncertainty.py) on its own validation cases
and store it in its card.

The temperature is the one whose case score best ranks the validation cases that went wrong (Dice below 0.7) above
the others (the highest AUROC; on a tie, the one whose estimated Dice, 1 - score, is closest to the measured Dice).
The boundary spread of the voxel map is the one that best ranks the validation cases' wrong voxels (voxel AUROC).
Nothing of a test list is used for the choice; ``gms evaluate`` then measures how well the scores rank errors
(uncertaintycheck.py).
"""
from __future__ import annotations

import math
import time

import numpy as np

from .evaluate import _predict_case, _update_card, open_validation
from .model import CARD
from .modelcard import ModelCard
from .options import InferenceOptions
from .pipeline import segmenter_for
from .presencecal import _slices
from .uncertainty import (SIGMAS, TEMPERATURES, PixelHistogram, auroc, boundary_distance, scores_from_sums,
                          spread)
from .uncertaintycheck import WRONG_BELOW, _f, case_dice


def calibrate_uncertainty(model, data, weights_dir=None, device="auto", batch_size: int = 8, write: bool = True,
                          command: str | None = None, log=print) -> dict:
    """Choose the temperature of ``model`` on its validation cases in ``data`` (with the card's inference options, at
    native resolution) and, with ``write``, store it in the card as ``uncertainty``. Returns that entry."""
    root, layout, dev, model_dir, m, names = open_validation(model, data, weights_dir, device)
    seg = segmenter_for(m, InferenceOptions(), dev)
    seg_labels = m.card.label_values
    scores, dice = [], []
    voxels = {sigma: PixelHistogram() for sigma in SIGMAS}
    t0 = time.perf_counter()
    for name in names:
        soft: dict = {}
        (pred,), gt, spacing = _predict_case(m, seg, root, layout, name, "native", batch_size, soft=soft)
        sums = soft["masks"].sums(soft["labels"], TEMPERATURES).sum(axis=1)  # T, K, 3
        scores.append(scores_from_sums(sums))
        dice.append(case_dice(pred, gt, seg_labels, spacing))
        wrong = _slices(pred != gt, soft["reo"], soft["axis"])
        u, dist = soft["masks"].uncertainty_map(), boundary_distance(soft["labels"])
        scale = soft["labels"].shape[-1] / float(m.input_size)
        for sigma, hist in voxels.items():
            hist.add(spread(u, dist, sigma * scale), wrong)
    voxel_auc = {sigma: hist.auroc() for sigma, hist in voxels.items()}
    sigma = max(SIGMAS, key=lambda v: (round(voxel_auc[v], 3) if not math.isnan(voxel_auc[v]) else 0.0, -v))
    est, d = 1.0 - np.array(scores).T, np.array(dice)  # T, cases
    mse = ((est - d[None]) ** 2).mean(axis=1)
    aucs = [auroc(1 - e, d < WRONG_BELOW) for e in est]
    # the best ranking (AUROCs within 0.001 are a tie), then the closest estimate; NaN (no case went wrong): closest
    key = [(-round(a, 3) if not math.isnan(a) else 0.0, e) for a, e in zip(aucs, mse)]
    best = min(range(len(TEMPERATURES)), key=key.__getitem__)
    table = {f"{t:g}": {"mean_squared_error": round(float(e), 5), "case_auroc": _round(a),
                        "estimated_dice": round(float(est[i].mean()), 4)}
             for i, (t, e, a) in enumerate(zip(TEMPERATURES, mse, aucs))}
    log(f"validation ({len(names)} cases, native resolution, {time.perf_counter() - t0:.0f} s): measured mean Dice "
        f"{d.mean():.4f}; per temperature: mean estimated Dice, mean squared difference, case AUROC for Dice < "
        f"{WRONG_BELOW}")
    for t, row in table.items():
        mark = "  <- chosen" if t == f"{TEMPERATURES[best]:g}" else ""
        log(f"  {t:>5}  {row['estimated_dice']:.4f}  {row['mean_squared_error']:.5f}  {_f(row['case_auroc'])}{mark}")
    log("  boundary spread (model-input pixels): voxel AUROC for wrong voxels")
    for v in SIGMAS:
        log(f"  {v:>5g}  {_f(voxel_auc[v])}" + ("  <- chosen" if v == sigma else ""))
    entry = {"temperature": TEMPERATURES[best], "boundary_sigma": sigma,
             "boundary_validation": {f"{v:g}": _round(voxel_auc[v]) for v in SIGMAS},
             "rule": f"the temperature whose case score ranks the validation cases with Dice < {WRONG_BELOW} highest "
                     "(AUROC; on a tie, the estimated Dice closest to the measured Dice)",
             "validation_cases_wrong": int((d < WRONG_BELOW).sum()), "validation_dice": round(float(d.mean()), 4),
             "selected_on": f"{len(names)} validation cases", "validation": table, "command": command,
             "date": time.strftime("%Y-%m-%d")}
    if write:
        def change(card: ModelCard):
            card.uncertainty = entry

        _update_card(model_dir, change)
        log(f"uncertainty temperature {TEMPERATURES[best]:g} and boundary spread {sigma:g} recorded in "
            f"{model_dir / CARD}")
    return entry


def _round(v: float):
    return None if math.isnan(v) else round(v, 4)

