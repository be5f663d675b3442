"""Patient orientation of volume arrays, so that a 3D model sees its slices as it saw them in training.

A slice-wise model learns what its slicing axis and in-plane directions look like (the hippocampus model tells the
anterior from the posterior part partly by position: averaging in flipped views drops its validation Dice from 0.84
to 0.29). A volume stored with another axis order or direction (a different scanner export, a volume resliced in
Slicer) would be segmented as garbage without an error. ``gms train`` therefore records the training volumes'
orientation in the card, and inference permutes and flips each input volume's array into that orientation (exactly:
no resampling), segments it and maps the labels back onto the input's own grid.

Orientation code: three letters, one per index axis i, j, k (ITK order x, y, z), naming the patient direction toward
which that index increases, in ITK's LPS physical frame (+x Left, +y Posterior, +z Superior). The identity direction
matrix is therefore "LPS". (SimpleITK's ``DICOMOrient`` names the same grid "RAS": it uses the opposite, "from",
convention. The card states the convention next to the code.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import GMSError
from .modelcard import ModelCard

CONVENTION = "index axes i, j, k point toward these patient directions (LPS frame); identity direction = LPS"
_PAIRS = (("L", "R"), ("P", "A"), ("S", "I"))  # physical +x / -x, +y / -y, +z / -z


def orientation_code(direction: Sequence[float]) -> str | None:
    """Row-major 3x3 ITK direction matrix (column j = physical direction of index axis j) -> code such as "LPS", or
    None when two index axes lie closest to the same patient axis (too oblique to name)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    letters, used = [], set()
    for j in range(3):
        col = d[:, j]
        a = int(np.argmax(np.abs(col)))
        if a in used:
            return None
        used.add(a)
        letters.append(_PAIRS[a][0] if col[a] > 0 else _PAIRS[a][1])
    return "".join(letters)


def check_code(code: str) -> str:
    """A valid code (one letter of each of L/R, P/A, S/I) or GMSError."""
    c = str(code).upper()
    pairs = sorted(next((k for k, p in enumerate(_PAIRS) if ch in p), -1) for ch in c)
    if len(c) != 3 or pairs != [0, 1, 2]:
        raise GMSError(f"invalid orientation code {code!r}: expected one letter of each of L/R, P/A, S/I, e.g. 'LPS'")
    return c


@dataclass(frozen=True)
class Reorientation:
    """Axis permutation and flips that take a (Z, Y, X[, C]) array from one orientation to another (numpy order)."""

    source: str
    target: str
    perm: tuple[int, int, int]      # target numpy axis n is source numpy axis perm[n]
    flips: tuple[bool, bool, bool]  # and is reversed (after the permutation)

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flips)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Source-oriented array -> target-oriented view (no copy)."""
        out = np.transpose(array, self.perm + tuple(range(3, array.ndim)))
        for n, f in enumerate(self.flips):
            if f:
                out = np.flip(out, axis=n)
        return out

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Target-oriented array (e.g. labels) -> a contiguous array on the source's grid."""
        for n, f in enumerate(self.flips):
            if f:
                array = np.flip(array, axis=n)
        inv = tuple(int(i) for i in np.argsort(self.perm))
        return np.ascontiguousarray(np.transpose(array, inv + tuple(range(3, array.ndim))))

    def spacing(self, spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(spacing_zyx[p]) for p in self.perm)


def reorientation(source: str, target: str) -> Reorientation:
    source, target = check_code(source), check_code(target)
    perm_ijk, flip_ijk = [], []
    for t in target:
        pair = next(p for p in _PAIRS if t in p)
        s = next(k for k, ch in enumerate(source) if ch in pair)
        perm_ijk.append(s)
        flip_ijk.append(source[s] != t)
    # numpy axis n is index axis 2 - n
    perm = tuple(2 - perm_ijk[2 - n] for n in range(3))
    flips = tuple(flip_ijk[2 - n] for n in range(3))
    return Reorientation(source, target, perm, flips)


def to_model_orientation(card: ModelCard | dict, direction: Sequence[float] | None,
                         shape: Sequence[int]) -> Reorientation | None:
    """The reorientation an input volume of (Z, Y, X[, C]) ``shape`` with ``direction`` needs for this model, or None:
    none needed, the model records no orientation, the volume has a single-slice axis (it is sliced across that axis
    as stored), or the direction is too oblique to name (the array is used as stored)."""
    target = ModelCard.coerce(card).orientation
    if not target or direction is None or len(direction) != 9 or len(shape) < 3 or min(shape[:3]) <= 1:
        return None
    source = orientation_code(direction)
    if source is None:
        return None
    r = reorientation(source, target)
    return None if r.identity else r
