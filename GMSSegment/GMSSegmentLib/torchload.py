"""Reading a PyTorch file (foundation weights, training checkpoints) with ``weights_only=True``: tensors and plain
containers only, so a pickle that would run code is refused, never executed. Any failure is one :class:`GMSError`
line naming the file (PyTorch's own message for a refused pickle spans lines and suggests ``weights_only=False``)."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from . import GMSError

__all__ = ["load_weights_only"]


def load_weights_only(path: str | Path, what: str):
    """``torch.load(path, map_location="cpu", weights_only=True)``; ``what`` names the file in errors."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the file is judged below, in one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise GMSError(f"refused to load {what} {path}: the file holds objects other than tensors (a pickle that "
                       "could run code)") from None
    except Exception as e:  # RuntimeError / EOFError / OSError for damaged, truncated or unreadable files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise GMSError(f"cannot load {what} {path}: {type(e).__name__}: {first}") from None
