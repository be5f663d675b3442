"""Inference options chosen per model on its validation cases (never on the test list) and stored in its card:

* ``"postprocess": {"largest_component": true|false, ...}``, applied to label maps (below);
* ``"tta": {"views": 1|2|4, "scales": [224, 256], ...}``, test-time augmentation (SliceSegmenter):
  - flips: the slice is also segmented flipped left-right (2 views) and up-down and both (4 views), and the decoded
    images are flipped back and averaged before the mask is taken. The augmented training copies
    (``augment_copies`` > 1) include the same flips; a model trained without them can fail on flipped views, which its
    validation score then shows (hippocampus: 0.83 -> 0.27);
  - scales: the slice is also segmented at larger input sizes (``second_scale``: about 8/7 of the model's, 224 ->
    256, 4 more latent cells a side, and one more such step, 288; the LMM is convolutional with global attention, so
    it runs at any latent size), each decoded image is resized to the model's size and averaged with the others
    (busi-lesion weights of bc36ff8, 2026-11-22, on its validation part: 0.7841 at 224 alone, 0.7944 at 256 alone,
    0.8057 for both; kvasir-polyp, one view: 0.8900 at 224, 0.9010 at 288, 0.8879 at 320, 0.8915 for 224 + 256,
    0.9053 for 224 + 256 + 288, 0.9049 with 320 as well; experiments/tta_scales_trial.py). ``tta_scale_sets`` lists the sets
    ``gms postprocess`` tries. Absent = the model's input size only.

``z_smooth`` (3D models only): weight ``w`` of each neighbouring slice when the decoded images are averaged along the
slicing axis before the labels are taken, ``[w, 1 - 2w, w]`` (0: off; 0.25: the binomial kernel; 1/3: a three-slice
box; the volume's end slices repeat). A slice-wise model sees each slice alone; its neighbours carry the 3D
continuity it cannot see (hippocampus, 16 validation volumes: 0.8422 -> 0.8463 at 1/3, the table in its card from
``gms postprocess``). 2D models and stacks of 2D images ignore it.

``largest_component``: for every segment keep only its largest connected component (face-connected, in 3D for
volumes). One lesion per breast-ultrasound image, one hippocampus head and tail per side: stray blobs are errors.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import GMSError
from .modelcard import ModelCard


def keep_largest_component(labels: np.ndarray, values) -> np.ndarray:
    """labels (Z, Y, X) or (Y, X) -> a copy where each value in ``values`` keeps only its largest connected component."""
    out = labels.copy()
    for v in values:
        mask = labels == v
        if not mask.any():
            continue
        comp, n = ndimage.label(mask)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[mask & (comp != int(sizes.argmax()))] = 0
    return out


# the views of each test-time augmentation: tensor dims flipped per view; "t" first = the (square) slice is
# transposed before the flips, so the 8 views are the 8 symmetries of the square (the flips with the 90-degree
# rotations, which the training copies also include)
_FLIPS4 = [(), (-1,), (-2,), (-2, -1)]
TTA_FLIPS = {1: [()], 2: [(), (-1,)], 4: _FLIPS4, 8: _FLIPS4 + [("t",) + d for d in _FLIPS4]}


def apply_view(x, view: tuple):
    """(..., S, S) tensor -> the view ``view`` of it (transposed if it starts with "t", then the dims flipped)."""
    dims = tuple(d for d in view if d != "t")
    if view and view[0] == "t":
        x = x.transpose(-2, -1)
    return x.flip(dims) if dims else x


def undo_view(x, view: tuple):
    """The inverse of apply_view: a decoded view mapped back onto the slice."""
    dims = tuple(d for d in view if d != "t")
    if dims:
        x = x.flip(dims)
    return x.transpose(-2, -1) if view and view[0] == "t" else x


def tta_views(card: ModelCard | dict) -> int:
    """Number of flip views the card's validation choice asks for (1 = no test-time augmentation)."""
    tta = ModelCard.coerce(card).tta
    views = int(tta.views if tta is not None and tta.views is not None else 1)
    return views if views in TTA_FLIPS else 1


def second_scale(size: int, multiple: int = 8) -> int:
    """The extra input size tried by multi-scale test-time augmentation: about 8/7 of ``size``, a multiple of the
    foundation model's downscale (224 -> 256, 96 -> 112)."""
    return max(size + multiple, int(round(size * 8 / 7 / multiple)) * multiple)


def tta_scale_sets(size: int, multiple: int = 8) -> list[list[int]]:
    """The input-size sets ``gms postprocess`` chooses from: the model's size alone, with ``second_scale``, and with
    one more step of the same size up (224: [224], [224, 256], [224, 256, 288]; 96: [96], [96, 112], [96, 112, 128])."""
    second = second_scale(size, multiple)
    return [[size], [size, second], [size, second, 2 * second - size]]


def tta_scales(card: ModelCard | dict) -> list[int]:
    """Input sizes the card's validation choice asks for (default: the model's input size only)."""
    card = ModelCard.coerce(card)
    size = int(card.input_size if card.input_size is not None else 224)
    return [int(s) for s in ((card.tta.scales if card.tta is not None else None) or [size])]


Z_SMOOTH_CHOICES = (0.0, 0.25, 1 / 3)  # the neighbour weights select_postprocess tries on 3D models


def postprocess_settings(card: ModelCard | dict) -> dict:
    pp = ModelCard.coerce(card).postprocess or {}
    return {"largest_component": bool(pp.get("largest_component", False)),
            "z_smooth": float(pp.get("z_smooth", 0.0))}


def z_smooth_weight(settings: dict, card: ModelCard | dict) -> float:
    """The neighbour weight ``settings`` ask for (0 for 2D models); a weight outside [0, 1/2] is refused."""
    w = float(settings.get("z_smooth", 0.0) or 0.0)
    if not 0.0 <= w <= 0.5:
        raise GMSError(f"z_smooth is the weight of each neighbouring slice, in [0, 0.5]; got {w}")
    return w if ModelCard.coerce(card).is_3d else 0.0


def z_smoothed(decoded, w: float, start: int, stop: int):
    """Slices ``start:stop`` of a (Z, C, H, W) tensor of decoded images averaged with their neighbours along Z with
    weights ``[w, 1 - 2w, w]``; the end slices stand in for their missing neighbours."""
    z = decoded.shape[0]
    mid = decoded[start:stop]
    if w == 0.0 or z == 1:
        return mid
    prev = decoded[[max(k - 1, 0) for k in range(start, stop)]]
    nxt = decoded[[min(k + 1, z - 1) for k in range(start, stop)]]
    return (1.0 - 2.0 * w) * mid + w * (prev + nxt)


def apply_postprocess(labels: np.ndarray, card: ModelCard | dict, settings: dict | None = None) -> np.ndarray:
    """Apply the card's post-processing (or ``settings``, e.g. ``{}`` for none) to a (Z, Y, X) label map of the card's
    values, slices along axis 0. A 2D model's components are taken slice by slice (a stack of 2D images is not a
    volume); a 3D model's in 3D."""
    card = ModelCard.coerce(card)
    s = postprocess_settings(card) if settings is None else settings
    if s.get("largest_component"):
        values = card.label_values
        if not card.is_3d and labels.ndim == 3:
            labels = np.stack([keep_largest_component(sl, values) for sl in labels])
        else:
            labels = keep_largest_component(labels, values)
    return labels
