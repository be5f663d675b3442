"""Intensity normalisation to [0, 1] as the model card prescribes, and conversion of slices to the foundation model's
RGB input. Modes:
  {"mode": "photo"}                                   8-bit photos / ultrasound: value / 255 (16-bit: / 65535)
  {"mode": "percentile", "low": 0.5, "high": 99.5}    MR: per-volume percentiles mapped to 0 and 1, clipped
  {"mode": "window", "center": 40, "width": 400}      CT: a fixed Hounsfield window, clipped
"""
from __future__ import annotations

import numpy as np

from . import GMSError

DEFAULT = {"mode": "photo"}


def intensity_range(array: np.ndarray, spec: dict) -> tuple[float, float]:
    """The (low, high) that map to 0 and 1 for this image or volume."""
    mode = spec.get("mode", "photo")
    if mode == "photo":
        # 8-bit unless clearly beyond it: resampled 8-bit images overshoot 255 by a hair (antialiased interpolation)
        high = 65535.0 if float(np.max(array)) > 256.0 else 255.0
        return 0.0, high
    if mode == "window":
        c, w = float(spec["center"]), float(spec["width"])
        return c - w / 2, c + w / 2
    if mode == "percentile":
        flat = array.reshape(-1)
        if flat.size > 4_000_000:  # a strided sample is plenty for percentiles and keeps memory flat
            flat = flat[:: flat.size // 2_000_000]
        lo, hi = np.percentile(flat, [float(spec.get("low", 0.5)), float(spec.get("high", 99.5))])
        if hi <= lo:
            lo, hi = float(np.min(array)), float(np.max(array))
        if hi <= lo:
            raise GMSError("the image is constant: nothing to segment")
        return float(lo), float(hi)
    raise GMSError(f"unknown intensity normalisation mode '{mode}' in the model card")


def apply_range(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = (array.astype(np.float32, copy=False) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)
