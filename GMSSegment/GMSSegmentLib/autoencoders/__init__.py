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
from .taef2 import TAEF2

#: names load_foundation understands
KNOWN_FOUNDATIONS = ("taef2", "diffusers-kl", "diffusers-tiny")
_ALIASES = {"autoencoderkl": "diffusers-kl", "autoencodertiny": "diffusers-tiny"}


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
    if name.startswith("diffusers-"):
        path = spec.get("path")
        if not path:
            raise GMSError(f"foundation model '{name}' needs a 'path': a Hugging Face Hub id or a local folder "
                           f"written by save_pretrained")
    return spec


def _diffusers_path(spec: dict, weights_dir: str | Path | None) -> str:
    """A relative path that does not exist as given is looked up under ``weights_dir``."""
    path = str(spec["path"])
    if weights_dir and not Path(path).expanduser().exists() and not Path(path).is_absolute():
        candidate = Path(weights_dir).expanduser() / path
        if candidate.exists():
            return str(candidate)
    return path


def load_foundation(spec: str | Mapping[str, Any], weights_dir: str | Path | None = None,
                    progress=None) -> FoundationAutoencoder:
    """Build the frozen foundation autoencoder a spec names; TAEF2 weights are resolved (and downloaded if needed)
    by :func:`GMSSegmentLib.weights.resolve_weights`, diffusers models by ``from_pretrained``."""
    spec = _normalise(spec)
    name = spec["name"]
    if name == "taef2":
        from ..weights import resolve_weights
        folder = resolve_weights("taef2", weights_dir, progress)
        try:
            return TAEF2.from_folder(folder)
        except FileNotFoundError as e:
            raise GMSError(str(e)) from None
        except (RuntimeError, OSError, ValueError) as e:  # unreadable/mismatched state dict
            raise GMSError(f"cannot load TAEF2 weights from {folder}: {str(e).splitlines()[0]}") from None
    from .diffusers_ae import DiffusersKL, DiffusersTiny
    cls = DiffusersKL if name == "diffusers-kl" else DiffusersTiny
    return cls.from_pretrained(_diffusers_path(spec, weights_dir), subfolder=spec.get("subfolder"),
                               revision=spec.get("revision"))


def foundation_fingerprint(spec: str | Mapping[str, Any], weights_dir: str | Path | None = None,
                           progress=None) -> dict[str, str]:
    """SHA-256 of each weight file (and, for diffusers, ``config.json``) of a foundation model, by file name, for
    model cards. TAEF2 files are resolved like :func:`load_foundation` does (which may download them)."""
    from ..weights import file_sha256, resolve_weights, sha256_file
    spec = _normalise(spec)
    if spec["name"] == "taef2":
        folder = resolve_weights("taef2", weights_dir, progress)  # verified: their digests are remembered
        return {f: file_sha256(folder / f) for f in TAEF2.files}
    from .diffusers_ae import model_files
    files = model_files(_diffusers_path(spec, weights_dir), spec.get("subfolder"), spec.get("revision"))
    return {p.name: sha256_file(p) for p in files}


__all__ = ["FoundationAutoencoder", "TAEF2", "load_foundation", "foundation_fingerprint", "KNOWN_FOUNDATIONS"]
