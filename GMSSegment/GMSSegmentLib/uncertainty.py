"""Where to look: how sure a result is, per voxel, per slice and per case, from the decoded soft mask the result was
taken from (no extra network pass).

Every class (background and each segment) gets a soft *membership* per output pixel from the decoded image (averaged
over the test-time views, smoothed along the slices where the card says so), resized to the output grid:

* one segment (binary): the GMS rule thresholds the channel mean ``p`` at 0.5; memberships ``(1 - p, p)``;
* several segments: the rule takes the nearest code colour; memberships proportional to ``1 / d_k`` (``d_k``: squared
  distance to class k's colour, black for the background).

From them:

* **voxel uncertainty** ``u = 1 - (m_first - m_second)`` in [0, 1]: 0 where the decoded image is exactly one class's
  colour, 1 on the decision boundary (binary: ``1 - |2p - 1|``, the distance to the GMS threshold). Errors gather
  along a result's edges, where the decoder is often sure of the wrong side, so the map is spread from the result's
  boundary: ``max(u, exp(-d / s))``, ``d`` the in-slice distance to the nearest label edge in output pixels and
  ``s`` = the card's ``uncertainty.boundary_sigma`` (in model-input pixels, chosen on validation cases; 0 = none)
  times the output/input size ratio.
* **estimated Dice** of each segment, ``2 sum(m'_k y_k) / (sum(m'_k) + sum(y_k))``, with the memberships sharpened by
  a temperature ``T`` (the card's ``uncertainty.temperature``, chosen on validation cases by ``gms uncertainty``):
  ``m'_k = m_k ** (1 / T)``, normalised to sum 1; ``y_k`` the result's final labels
  (after post-processing and the presence decision): the Dice the result would have if the memberships were the
  truth. A segment with less than one voxel of label and membership together is left out.
* **score** (per case, and per slice for volumes) ``= 1 - mean estimated Dice`` of the segments left in; 0 when none
  is (nothing there, and nothing the model hesitated over). Higher = more likely wrong; an empty result with soft
  mass still scores high (the model saw something and the result shows nothing).

Memberships are kept as 8-bit fractions (one byte per voxel for binary models, one per class otherwise: 75 MB for a
512x512x300 volume) until the final labels are known. No torch at import time except in :class:`SoftMasks`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: temperatures tried by ``gms uncertainty`` (calibrate.py)
TEMPERATURES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_TEMPERATURE = 1.0
_CHUNK = 16  # slices per block when turning memberships into maps and sums (bounds the float32 temporaries)


#: boundary spreads tried by ``gms uncertainty`` (model-input pixels; 0 = none)
SIGMAS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)


def settings_of(card) -> tuple[float, float]:
    """The card's ``uncertainty`` (temperature, boundary_sigma); (1.0, 0.0) when the card has none."""
    unc = getattr(card, "uncertainty", None) if not isinstance(card, dict) else card.get("uncertainty")
    unc = unc or {}
    return float(unc.get("temperature", DEFAULT_TEMPERATURE)), float(unc.get("boundary_sigma", 0.0))


def _edge_mask(lab: np.ndarray) -> np.ndarray:
    """A slice's label edges: the pixels with a 4-neighbour of another label."""
    step0, step1 = lab[:-1] != lab[1:], lab[:, :-1] != lab[:, 1:]
    edge = np.zeros(lab.shape, bool)
    edge[:-1] |= step0
    edge[1:] |= step0
    edge[:, :-1] |= step1
    edge[:, 1:] |= step1
    return edge


def boundary_distance(labels: np.ndarray) -> np.ndarray:
    """Per slice (first axis): each pixel's distance (pixels) to the nearest pixel on a label edge; inf on a slice
    without one."""
    from scipy import ndimage

    out = np.full(labels.shape, np.inf, np.float32)
    for k in range(labels.shape[0]):
        edge = _edge_mask(labels[k])
        if edge.any():
            out[k] = ndimage.distance_transform_edt(~edge)
    return out


def spread_from_edges(u: np.ndarray, labels: np.ndarray, sigma: float) -> np.ndarray:
    """``spread(u, boundary_distance(labels), sigma)`` where it matters: each slice's distance is computed only in the
    box around its label edges grown by 6 sigma (beyond it exp(-d / sigma) < 0.0025 and ``u`` is kept)."""
    from scipy import ndimage

    if sigma <= 0:
        return u
    out = u.copy()
    margin = int(np.ceil(6 * sigma))
    for k in range(labels.shape[0]):
        edge = _edge_mask(labels[k])
        rows, cols = np.flatnonzero(edge.any(axis=1)), np.flatnonzero(edge.any(axis=0))
        if rows.size == 0:
            continue
        y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, edge.shape[0])
        x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, edge.shape[1])
        d = ndimage.distance_transform_edt(~edge[y0:y1, x0:x1])
        with np.errstate(under="ignore"):
            out[k, y0:y1, x0:x1] = np.maximum(out[k, y0:y1, x0:x1], np.exp(-d / sigma).astype(np.float32))
    return out


def spread(u: np.ndarray, distance: np.ndarray, sigma: float) -> np.ndarray:
    """``max(u, exp(-distance / sigma))`` (``u`` unchanged for sigma 0)."""
    if sigma <= 0:
        return u
    with np.errstate(over="ignore", under="ignore"):
        return np.maximum(u, np.exp(-distance / np.float32(sigma)))


class SoftMasks:
    """The memberships of every slice of one array, at the output size, as uint8 fractions of 255."""

    def __init__(self, n: int, out_hw: tuple[int, int], n_segments: int):
        self.binary = n_segments == 1
        self.n_segments = n_segments
        ch = 1 if self.binary else n_segments + 1
        self.q = np.zeros((n, ch) + tuple(out_hw), np.uint8)
        if not self.binary:
            self.q[:, 0] = 255  # slices never decoded (z shortcut) are background for sure

    def add(self, idx, decoded, codes) -> None:
        """Decoded images (B, 3, S, S) in [0, 1] of slices ``idx`` -> their memberships at the output size."""
        import torch
        import torch.nn.functional as F

        out_hw = self.q.shape[-2:]
        with torch.inference_mode():
            if self.binary:
                m = decoded.float().mean(dim=1, keepdim=True)
                if m.shape[-2:] != out_hw:
                    m = F.interpolate(m, size=out_hw, mode="bilinear", align_corners=False)
            else:
                d = decoded.float()
                if d.shape[-2:] != out_hw:
                    d = F.interpolate(d, size=out_hw, mode="bilinear", align_corners=False)
                allc = torch.cat([torch.zeros(1, 3, dtype=codes.dtype), codes.cpu()]).to(d)
                dist = ((d.unsqueeze(1) - allc.view(1, -1, 3, 1, 1)) ** 2).sum(dim=2)  # B, K+1, H, W
                inv = 1.0 / (dist + 1e-4)
                m = inv / inv.sum(dim=1, keepdim=True)
            self.q[idx] = (m.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()

    def memberships(self, lo: int, hi: int, temperature: float) -> np.ndarray:
        """(hi - lo, K + 1, H, W) float32 memberships of slices lo..hi-1 at ``temperature``."""
        q = self.q[lo:hi].astype(np.float32) / 255.0
        m = np.concatenate([1.0 - q, q], axis=1) if self.binary else q
        if temperature != 1.0:
            with np.errstate(divide="ignore", under="ignore", over="ignore"):
                m = np.power(m, 1.0 / temperature)
            total = m.sum(axis=1, keepdims=True)
            m = np.divide(m, total, out=np.zeros_like(m), where=total > 0)
        return m

    def uncertainty_map(self) -> np.ndarray:
        """(n, H, W) float32 voxel uncertainty in [0, 1] (of the memberships as decoded: no temperature)."""
        if self.binary:  # a function of the stored byte alone: a 256-entry table
            table = (1.0 - np.abs(2.0 * np.arange(256) / 255.0 - 1.0)).astype(np.float32)
            return table[self.q[:, 0]]
        out = np.empty((self.q.shape[0],) + self.q.shape[2:], np.float32)
        for lo in range(0, self.q.shape[0], _CHUNK):
            m = self.memberships(lo, lo + _CHUNK, 1.0)
            top2 = -np.partition(-m, 1, axis=1)[:, :2]
            out[lo:lo + _CHUNK] = 1.0 - (top2[:, 0] - top2[:, 1])
        return out

    def sums(self, labels: np.ndarray, temperatures) -> np.ndarray:
        """Per temperature, slice and segment: (sum m_k, sum y_k, sum m_k y_k), shape (len(T), n, K, 3).
        ``labels``: (n, H, W) segment indices 0..K of the final result. A binary model's membership (and any model's
        at temperature 1) is a function of its stored byte, so a slice's sums come from two 256-bin histograms of the
        bytes (all pixels; the segment's pixels) and a 256-entry table per temperature."""
        n, k = self.q.shape[0], self.n_segments
        out = np.zeros((len(temperatures), n, k, 3))
        direct = [t for t, temp in enumerate(temperatures) if self.binary or temp == 1.0]
        tables = {t: _membership_table(temperatures[t]) if self.binary else np.arange(256) / 255.0 for t in direct}
        for i in range(n):
            lab = labels[i].ravel()
            for s in range(k):
                q = self.q[i, 0 if self.binary else s + 1].ravel()
                y = lab == s + 1
                every, inside = np.bincount(q, minlength=256), np.bincount(q[y], minlength=256)
                out[:, i, s, 1] = inside.sum()
                for t in direct:
                    out[t, i, s, 0], out[t, i, s, 2] = every @ tables[t], inside @ tables[t]
        rest = [t for t in range(len(temperatures)) if t not in direct]
        for lo in range(0, n, _CHUNK) if rest else ():
            lab = labels[lo:lo + _CHUNK]
            y = np.stack([lab == s + 1 for s in range(k)], axis=1)  # b, K, H, W
            for t in rest:
                m = self.memberships(lo, lo + _CHUNK, temperatures[t])[:, 1:]
                out[t, lo:lo + _CHUNK, :, 0] = m.sum(axis=(2, 3))
                out[t, lo:lo + _CHUNK, :, 2] = (m * y).sum(axis=(2, 3))
        return out


def _membership_table(temperature: float) -> np.ndarray:
    """A binary model's segment membership at ``temperature`` for each stored byte 0..255."""
    q = np.arange(256) / 255.0
    a = 1.0 / temperature
    with np.errstate(divide="ignore", under="ignore", over="ignore"):
        num = np.power(q, a)
        return num / (num + np.power(1.0 - q, a))


def scores_from_sums(sums: np.ndarray) -> np.ndarray:
    """(..., K, 3) sums -> (...) scores, 1 - mean estimated Dice over the segments with at least one voxel of label
    and membership together (0 where none has)."""
    s_m, s_y, s_my = sums[..., 0], sums[..., 1], sums[..., 2]
    total = s_m + s_y
    keep = total >= 1.0
    est = np.divide(2.0 * s_my, total, out=np.zeros_like(total), where=keep)
    count = keep.sum(axis=-1)
    mean = np.divide((est * keep).sum(axis=-1), count, out=np.ones(count.shape), where=count > 0)
    return 1.0 - mean


@dataclass
class ResultUncertainty:
    """What a result's uncertainty is reported as: the voxel map on the input's grid, the per-slice scores along the
    input's numpy axis ``axis`` (in its index order; one entry for a 2D image) and the case score."""
    map: np.ndarray
    slices: np.ndarray
    axis: int
    score: float


def result_uncertainty(soft: dict, temperature: float, sigma: float = 0.0, with_map: bool = True
                       ) -> ResultUncertainty:
    """The uncertainty of one result from what ``segment_array_variants`` put in its ``soft`` dict: ``masks``
    (SoftMasks), ``labels`` (final segment indices, slicing axis first), ``axis``, ``reo`` (orientation.py) and
    ``input_size`` (the model's); ``sigma``: the boundary spread in model-input pixels."""
    masks, labels, axis, reo = soft["masks"], soft["labels"], soft["axis"], soft["reo"]
    sums = masks.sums(labels, [temperature])[0]  # n, K, 3
    slices = scores_from_sums(sums)
    score = float(scores_from_sums(sums.sum(axis=0)))
    in_axis = axis
    if reo is not None:
        in_axis = reo.perm[axis]
        if reo.flips[axis]:
            slices = slices[::-1]
    umap = None
    if with_map:
        umap = masks.uncertainty_map()
        if sigma > 0:
            scale = labels.shape[-1] / float(soft.get("input_size") or labels.shape[-1])
            umap = spread_from_edges(umap, labels, sigma * scale)
        umap = np.moveaxis(umap, 0, axis)
        umap = reo.undo(umap) if reo is not None else umap
    return ResultUncertainty(umap, np.ascontiguousarray(slices), in_axis, score)


# -- validation: how well the scores rank errors ------------------------------------------------------------------------
def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (ties count one half); NaN without both
    classes."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class PixelHistogram:
    """Counts of voxels by uncertainty (``bins`` equal bins over [0, 1]) and by right/wrong, accumulated over cases:
    the voxel-level AUROC and the reliability table come from it without keeping any voxel."""

    def __init__(self, bins: int = 200):
        self.bins = bins
        self.wrong = np.zeros(bins, np.int64)
        self.right = np.zeros(bins, np.int64)

    def add(self, umap: np.ndarray, wrong: np.ndarray) -> None:
        b = np.minimum((np.asarray(umap, np.float32) * self.bins).astype(np.int64), self.bins - 1).ravel()
        w = np.asarray(wrong, bool).ravel()
        self.wrong += np.bincount(b[w], minlength=self.bins)
        self.right += np.bincount(b[~w], minlength=self.bins)

    def auroc(self) -> float:
        """AUROC of the binned uncertainty for wrong voxels (voxels in one bin are ties)."""
        n_w, n_r = self.wrong.sum(), self.right.sum()
        if n_w == 0 or n_r == 0:
            return float("nan")
        below_right = np.concatenate([[0], np.cumsum(self.right)[:-1]])
        return float((self.wrong * (below_right + 0.5 * self.right)).sum() / (n_w * n_r))

    def reliability(self, edges=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> list[dict]:
        """Per uncertainty range: voxels and the fraction of them that were wrong."""
        rows = []
        for lo, hi in zip(edges, edges[1:]):
            a, b = int(round(lo * self.bins)), int(round(hi * self.bins))
            w, r = int(self.wrong[a:b].sum()), int(self.right[a:b].sum())
            rows.append({"from": lo, "to": hi, "voxels": w + r, "wrong": w / (w + r) if w + r else None})
        return rows


def case_reliability(scores, dice, edges=(0.0, 0.1, 0.2, 0.3, 0.5, 1.0)) -> list[dict]:
    """Per score range: cases, mean estimated Dice (1 - score) and mean measured Dice."""
    s, d = np.asarray(scores, float), np.asarray(dice, float)
    rows = []
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        sel = (s >= lo) & ((s < hi) | (i == len(edges) - 2))
        rows.append({"from": lo, "to": hi, "cases": int(sel.sum()),
                     "estimated_dice": float(1 - s[sel].mean()) if sel.any() else None,
                     "measured_dice": float(d[sel].mean()) if sel.any() else None})
    return rows
