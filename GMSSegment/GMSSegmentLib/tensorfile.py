"""Writing a safetensors file (model weights, training caches) through :mod:`.atomicfile`, checked by reading its
header back: safetensors refuses a file shorter than its header declares."""
from __future__ import annotations

import os

from safetensors import safe_open
from safetensors.torch import save_file

from .atomicfile import atomic_write, write_failed

__all__ = ["save_safetensors"]


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)``, atomically and checked (:class:`GMSError` on failure,
    an earlier file untouched)."""
    def verify(tmp: str) -> None:
        try:
            with safe_open(tmp, framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own error types
            raise write_failed(os.fspath(path), f"the written file does not read back ({' '.join(str(e).split())})")

    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata), verify=verify)
