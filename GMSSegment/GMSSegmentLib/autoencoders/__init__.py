"""Frozen foundation autoencoders behind one interface, and loading them from a spec.

A spec is a plain name (``"taef2"``) or a dict such as ``{"name": "taef2"}``,
``{"name": "diffusers-kl", "path": "stabilityai/sd-vae-ft-mse"}`` or
``{"name": "diffusers-tiny", "path": "/models/taesd"}`` (optional keys for diffusers: ``subfolder``, ``revision``).
Other keys (e.g. ``latent_channels`` written by ``describe()`` into model cards) are ignored, so a model card's
``describe()`` output loads back as a spec.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .. import GMSError
from .base import FoundationAutoencoder
from .diffusers_ae import DiffusersKL, DiffusersTiny
from .taef2 import TAEF2

#: every foundation autoencoder by name: adding one is its file (a FoundationAutoencoder subclass that declares its
#: pinned weights or its need of a path, and its split-decode support) plus one line here
FOUNDATIONS: dict[str, type[FoundationAutoencoder]] = {
    "taef2": TAEF2,
    "diffusers-kl": DiffusersKL,
    "diffusers-tiny": DiffusersTiny,
}
#: names load_foundation understands
KNOWN_FOUNDATIONS = tuple(FOUNDATIONS)
_ALIASES = {alias: name for name, cls in FOUNDATIONS.items() for alias in cls.aliases}


def _normalise(spec: str | Mapping[str, Any]) -> dict:
    if isinstance(spec, str):
        spec = {"name": spec}
    elif not isinstance(spec, Mapping):
        raise GMSError(f"a foundation model spec is a name or a dict with 'name', not {type(spec).__name__}")
    spec = dict(spec)
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise GMSError(f"foundation model spec without a name: {spec}; known: {', '.join(KNOWN_FOUNDATIONS)}")
    name = name.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in KNOWN_FOUNDATIONS:
        raise GMSError(f"unknown foundation model '{spec['name']}'; known: {', '.join(KNOWN_FOUNDATIONS)}")
    spec["name"] = name
    if FOUNDATIONS[name].needs_path:
        path = spec.get("path")
        if not path:
            raise GMSError(f"foundation model '{name}' needs a 'path': a Hugging Face Hub id or a local folder "
                           f"written by save_pretrained")
    return spec


def load_foundation(spec: str | Mapping[str, Any], weights_dir: str | Path | None = None,
                    progress=None) -> FoundationAutoencoder:
    """Build the frozen foundation autoencoder a spec names; pinned weights (TAEF2) are resolved (and downloaded if
    needed) by :func:`GMSSegmentLib.weights.resolve_weights`, diffusers models by ``from_pretrained``."""
    spec = _normalise(spec)
    return FOUNDATIONS[spec["name"]].from_spec(spec, weights_dir, progress)


def foundation_fingerprint(spec: str | Mapping[str, Any], weights_dir: str | Path | None = None,
                           progress=None) -> dict[str, str]:
    """SHA-256 of each weight file (and, for diffusers, ``config.json``) of a foundation model, by file name, for
    model cards. Pinned files are resolved like :func:`load_foundation` does (which may download them)."""
    spec = _normalise(spec)
    return FOUNDATIONS[spec["name"]].fingerprint(spec, weights_dir, progress)


__all__ = ["FoundationAutoencoder", "TAEF2", "FOUNDATIONS", "load_foundation", "foundation_fingerprint",
           "KNOWN_FOUNDATIONS"]
