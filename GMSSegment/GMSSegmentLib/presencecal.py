"""``gms presence``: choose a model's presence decision (presence.py) on its own validation cases and store it in its
card. Also run at the end of ``gms train``. The network runs once per validation case with the card's test-time
options and no presence decision; every candidate setting is then scored from the slices' scores and counts (2D at
the model's input size, 3D at native resolution, as ``gms postprocess`` chooses)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .evaluate import _predict_case, _update_card, open_validation
from .model import CARD
from .modelcard import ModelCard
from .options import InferenceOptions
from .pipeline import segmenter_for
from .presence import Calibration, CaseRecord, choose_rule

#: mean validation Dice the decision may cost a model's cases that hold the segment (half a point)
DEFAULT_MAX_DICE_COST = 0.005


def _slices(labels: np.ndarray, reo, axis: int) -> np.ndarray:
    """A prediction or ground truth on the input's grid -> slices along the axis the model segmented."""
    if labels.ndim == 2:
        return labels[None]
    return np.moveaxis(reo.apply(labels) if reo is not None else labels, axis, 0)


def case_records(m, seg, root: Path, layout: str, name: str, batch_size: int = 8) -> list[CaseRecord]:
    """One validation case -> one CaseRecord per segment (scores and counts slice by slice)."""
    record: dict = {}
    resolution = "model" if layout == "2d" else "native"
    (pred,), gt, _ = _predict_case(m, seg, root, layout, name, resolution, batch_size, (None,), presence=False,
                                   record=record)
    p_sl, g_sl = _slices(pred, record["reo"], record["axis"]), _slices(gt, record["reo"], record["axis"])
    out = []
    for k, s in enumerate(m.segments):
        p, g = (p_sl == s.label).reshape(len(p_sl), -1), (g_sl == s.label).reshape(len(g_sl), -1)
        out.append(CaseRecord(f"{name}:{s.name}", record["area"][:, k], record["confidence"][:, k],
                              (p & g).sum(1), p.sum(1), g.sum(1)))
    return out


def measured_note(summary: dict, max_dice_cost: float) -> str:
    """What the choice rests on, in words for the card: with validation cases without the segment, how many it
    empties; without any, plainly that this was not measured."""
    cost = f"at most {100 * max_dice_cost:g} points of mean Dice" if max_dice_cost else "no Dice at all"
    if summary["negatives"]:
        return (f"chosen to empty the most of {summary['negatives']} validation cases without the segment while "
                f"costing the {summary['positives']} with it {cost}; measured on validation only")
    return (f"the validation cases all hold the segment, so how often the decision empties a case without it was "
            f"NOT measured; chosen as the strictest setting that costs the cases with it {cost}, which guards "
            "against clearly absent findings only")


def calibrate_presence(model, data, max_dice_cost: float = DEFAULT_MAX_DICE_COST, weights_dir=None,
                       device="auto", batch_size: int = 8, write: bool = True, command: str | None = None,
                       log=print) -> Calibration:
    """Choose the presence decision of ``model`` on its validation cases in ``data`` (see presence.choose_rule) and,
    with ``write``, store it in the model's card."""
    root, layout, dev, model_dir, m, names = open_validation(model, data, weights_dir, device)
    seg = segmenter_for(m, InferenceOptions(batch_size=batch_size, presence=False), dev)
    t0 = time.perf_counter()
    records = [r for name in names for r in case_records(m, seg, root, layout, name, batch_size)]
    cal = choose_rule(records, max_dice_cost)
    s = cal.summary()
    log(f"presence decision on {len(names)} validation cases of {root} ({s['positives']} segment cases present, "
        f"{s['negatives']} absent), {time.perf_counter() - t0:.0f} s: min_area {cal.rule.min_area}, min_confidence "
        f"{cal.rule.min_confidence}; Dice where present {100 * s['dice_before']:.2f} -> {100 * s['dice_after']:.2f}, "
        f"absent and predicted empty {s['negatives_empty_before']} -> {s['negatives_empty_after']} of "
        f"{s['negatives']}, present and predicted empty {s['positives_lost']}")
    if write:
        entry = cal.rule.to_card(selected_on=f"{len(names)} validation cases", max_dice_cost=max_dice_cost,
                                 validation=s, measured=measured_note(s, max_dice_cost), command=command,
                                 date=time.strftime("%Y-%m-%d"))

        def change(card: ModelCard):
            card.presence = entry

        _update_card(model_dir, change)
        log(f"presence decision recorded in {model_dir / CARD}")
    return cal
