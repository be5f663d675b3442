"""The presence decision: "nothing here" for a segment on a slice, from what the model itself decoded.

A GMS model always decodes *some* mask; a lesion model trained only on lesion images marks a "lesion" on a normal
image. The decision here looks at each segment on each slice (a 2D image is one slice) of the decoded soft mask at the
model's input size and calls the segment absent when

* its region (the pixels the GMS rule gives it) covers less than ``min_area`` of the slice, or
* the decoded values inside that region are, on average, less sure than ``min_confidence`` (1.0: exactly the
  segment's code colour; 0.5: half way to black, the GMS threshold).

An absent segment is cleared from that slice before anything is written. The two settings are chosen on a model's
validation cases only (:func:`choose_rule`) and stored in the card as ``"presence"``; without them (or with
``--no-presence``) nothing changes. No torch at import time: the card check and the Slicer side read this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

#: the settings tried by :func:`choose_rule` (0 = no check)
AREA_GRID = (0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05)
CONFIDENCE_GRID = (0.0, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97)


@dataclass(frozen=True)
class PresenceRule:
    """A segment on a slice is absent when its area fraction < ``min_area`` or its mean confidence <
    ``min_confidence``."""
    min_area: float = 0.0
    min_confidence: float = 0.0

    @property
    def active(self) -> bool:
        return self.min_area > 0 or self.min_confidence > 0

    def absent(self, area: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        """Boolean array (same shape): the segment is absent on that slice."""
        area = np.asarray(area, dtype=np.float64)
        confidence = np.asarray(confidence, dtype=np.float64)
        return (area <= 0) | (area < self.min_area) | (confidence < self.min_confidence)

    @classmethod
    def from_card(cls, p: dict | None) -> "PresenceRule | None":
        """A card's ``presence`` entry as a rule, or None when the card has none."""
        if not p:
            return None
        return cls(float(p.get("min_area", 0.0)), float(p.get("min_confidence", 0.0)))

    def to_card(self, **extra) -> dict:
        return {"min_area": self.min_area, "min_confidence": self.min_confidence, **extra}


def slice_scores(decoded, codes) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images (B, 3, S, S) in [0, 1] and segment codes (K, 3) -> (area, confidence), each (B, K):
    the fraction of the slice the GMS rule gives each segment and the mean of its soft value there.
    One code (binary): the soft value is the channel mean, the region where it is > 0.5. Several codes: each pixel goes
    to the nearest code colour (black = background) and its soft value for segment k is the decoded colour projected
    on code k (1 at the code, 0 at black)."""
    import torch

    dec = decoded.float()
    codes = codes.to(dec)
    b, k = dec.shape[0], codes.shape[0]
    if k == 1:
        soft = dec.mean(dim=1, keepdim=True)  # B, 1, S, S
        regions = soft > 0.5
    else:
        allc = torch.cat([torch.zeros(1, 3, dtype=codes.dtype, device=codes.device), codes])
        d = ((dec.unsqueeze(1) - allc.view(1, -1, 3, 1, 1)) ** 2).sum(dim=2)  # B, K+1, S, S
        nearest = d.argmin(dim=1)
        regions = torch.stack([nearest == i + 1 for i in range(k)], dim=1)
        norm = (codes ** 2).sum(dim=1).clamp_min(1e-6).view(1, k, 1, 1)
        soft = (dec.unsqueeze(1) * codes.view(1, k, 3, 1, 1)).sum(dim=2) / norm
    n = regions.shape[-2] * regions.shape[-1]
    count = regions.flatten(2).sum(dim=2).float()  # B, K
    inside = (soft.clamp(0, 1) * regions).flatten(2).sum(dim=2)
    area = (count / n).cpu().numpy().reshape(b, k)
    confidence = (inside / count.clamp_min(1)).cpu().numpy().reshape(b, k)
    return area, confidence


# ------------------------------------------------------------------------------------------------- calibration

@dataclass
class CaseRecord:
    """What calibration needs of one validation case and one segment, slice by slice: the scores and the counts
    |P ∩ G|, |P|, |G| of the prediction without the decision (at the resolution the evaluation uses)."""
    case: str
    area: np.ndarray        # (slices,)
    confidence: np.ndarray  # (slices,)
    inter: np.ndarray       # (slices,)
    pred: np.ndarray        # (slices,)
    gt: np.ndarray          # (slices,)

    def dice(self, absent: np.ndarray) -> float:
        keep = ~absent
        p, g = float(self.pred[keep].sum()), float(self.gt.sum())
        if p + g == 0:
            return 1.0
        return 2.0 * float(self.inter[keep].sum()) / (p + g)

    @property
    def positive(self) -> bool:
        return bool(self.gt.sum() > 0)


@dataclass
class Calibration:
    rule: PresenceRule
    dice_before: float               # mean Dice over the positive cases without the decision
    dice_after: float                # ... with it
    negatives: int                   # validation cases without the segment
    negatives_empty_before: int
    negatives_empty_after: int
    positives: int
    positives_lost: int              # positive cases predicted empty with the decision
    table: list = field(default_factory=list)

    def summary(self) -> dict:
        return {"positives": self.positives, "negatives": self.negatives,
                "dice_before": round(self.dice_before, 4), "dice_after": round(self.dice_after, 4),
                "negatives_empty_before": self.negatives_empty_before,
                "negatives_empty_after": self.negatives_empty_after, "positives_lost": self.positives_lost}


def _evaluate_rule(rule: PresenceRule, records: Sequence[CaseRecord]):
    pos_d, neg_empty, lost = [], 0, 0
    for r in records:
        absent = rule.absent(r.area, r.confidence) if rule.active else np.zeros(r.area.shape, bool)
        empty = bool((r.pred[~absent] == 0).all())
        if r.positive:
            pos_d.append(r.dice(absent))
            lost += empty
        else:
            neg_empty += empty
    return (float(np.mean(pos_d)) if pos_d else 1.0), neg_empty, lost


def choose_rule(records: Sequence[CaseRecord], max_dice_cost: float,
                area_grid: Sequence[float] = AREA_GRID, confidence_grid: Sequence[float] = CONFIDENCE_GRID
                ) -> Calibration:
    """The setting chosen on validation among those that cost the positive cases at most ``max_dice_cost`` mean
    Dice (0.005 = half a point; 0 = no loss at all). With negative cases (the segment absent): the one that empties
    the most of them, then the best Dice, then the least strict. Without negatives there is nothing to count, so the
    strictest setting within the cost is taken (it guards best against images unlike the validation ones)."""
    records = list(records)
    if not records:
        raise ValueError("presence calibration needs validation cases")
    base_dice, base_neg, _ = _evaluate_rule(PresenceRule(), records)
    has_negatives = any(not r.positive for r in records)
    best, best_key, table = None, None, []
    for i, a in enumerate(area_grid):
        for j, c in enumerate(confidence_grid):
            rule = PresenceRule(float(a), float(c))
            d, neg_empty, lost = _evaluate_rule(rule, records)
            table.append({"min_area": a, "min_confidence": c, "dice": round(d, 4), "negatives_empty": neg_empty,
                          "positives_lost": lost})
            if base_dice - d > max_dice_cost + 1e-9:
                continue
            key = (neg_empty, round(d, 6), -(i + j)) if has_negatives else (i + j, round(d, 6))
            if best_key is None or key > best_key:
                best, best_key = (rule, d, neg_empty, lost), key
    rule, d, neg_empty, lost = best
    n_pos = sum(r.positive for r in records)
    return Calibration(rule, base_dice, d, len(records) - n_pos, base_neg, neg_empty, n_pos, lost, table)
