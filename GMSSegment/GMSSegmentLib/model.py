"""A GMS model folder: ``model.safetensors`` (LMM weights in fp16 + latent statistics in fp32) and ``card.json``.

The card says everything a user or the Slicer module needs to run and trust the model: the foundation autoencoder (and
its weight files' SHA-256), input size, intensity normalisation, slicing axis, segments (name, label value, colour,
code colour in the decoded image), training data, licence, citation, and measured metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import GMSError
from .atomicfile import atomic_write
from .card import FORMAT_VERSION, load_card
from .modelcard import ModelCard, Segment
from .lmm import LatentMappingModel, LMMConfig
# model folders by path or name (no torch needed; shared with the Slicer side)
from .modelpaths import CARD, DEFAULT_MODEL, find_models, resolve_model_path  # noqa: F401
from .tensorfile import save_safetensors

WEIGHTS = "model.safetensors"
#: the per-channel latent statistics stored beside the LMM weights (standardisation of image and mask latents)
STATS = ("image_mean", "image_std", "mask_mean", "mask_std")

#: code colours of segments in the decoded image. Binary models use white (the GMS paper's rule: channel mean > 0.5).
#: For up to three segments these corners of the RGB cube are all sqrt(2) apart and sqrt(2) from black.
MULTI_CODES = [(1.0, 1.0, 0.0), (0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
               (1.0, 1.0, 1.0)]
DEFAULT_COLOURS = [(0.95, 0.35, 0.25), (0.3, 0.6, 0.95), (0.35, 0.85, 0.4), (0.95, 0.85, 0.3), (0.75, 0.4, 0.9)]


def code_colours(n_segments: int) -> list[tuple[float, float, float]]:
    if n_segments < 1:
        raise GMSError("a model needs at least one segment")
    if n_segments == 1:
        return [(1.0, 1.0, 1.0)]
    if n_segments > len(MULTI_CODES):
        raise GMSError(f"at most {len(MULTI_CODES)} segments per model are supported, got {n_segments}")
    return MULTI_CODES[:n_segments]


def make_segments(names: list[str], labels: list[int] | None = None, colours=None) -> list[dict]:
    labels = labels or list(range(1, len(names) + 1))
    codes = code_colours(len(names))
    out = []
    for i, (name, lab) in enumerate(zip(names, labels)):
        col = colours[i] if colours else DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)]
        out.append({"name": name, "label": int(lab), "color": [float(c) for c in col], "code": list(codes[i])})
    return out


class GMSModel(torch.nn.Module):
    """LMM + latent statistics + card. The foundation autoencoder is attached separately (``attach_foundation``)
    because it is shared, frozen and resolved from a weights folder, cache or download."""

    def __init__(self, card: ModelCard | dict, lmm: LatentMappingModel, stats: dict[str, torch.Tensor]):
        super().__init__()
        self.card = ModelCard.coerce(card)
        self.lmm = lmm
        for k in STATS:
            self.register_buffer(k, stats[k].float().reshape(1, -1, 1, 1))
        self.foundation = None

    # -- properties from the card ---------------------------------------------------------------------------------
    @property
    def segments(self) -> list[Segment]:
        return self.card.segments

    @property
    def input_size(self) -> int:
        return int(self.card.input_size)

    @property
    def codes(self) -> torch.Tensor:
        return torch.tensor([s.code for s in self.segments], dtype=torch.float32)

    def attach_foundation(self, foundation) -> "GMSModel":
        want = self.card.foundation
        if foundation.latent_channels != self.lmm.config.latent_channels:
            raise GMSError(f"model '{self.card.name}' expects {self.lmm.config.latent_channels} latent channels "
                           f"but foundation model '{foundation.name}' has {foundation.latent_channels}")
        if want.name and want.name != foundation.name:
            raise GMSError(f"model '{self.card.name}' was trained on foundation model '{want.name}', "
                           f"not '{foundation.name}'")
        self.foundation = foundation
        return self

    # -- latent standardisation --------------------------------------------------------------------------------------
    def norm_image(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.image_mean) / self.image_std

    def norm_mask(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mask_mean) / self.mask_std

    def denorm_mask(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.mask_std + self.mask_mean

    # -- save / load ---------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise GMSError(f"model folder {folder} exists and is not empty")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"lmm.{k}": v.detach().to(torch.float16).contiguous() for k, v in self.lmm.state_dict().items()}
        for k in STATS:
            tensors[f"stats.{k}"] = getattr(self, k).detach().flatten().float().contiguous()
        card = self.card.to_dict()
        card["format_version"] = FORMAT_VERSION
        card["lmm"] = self.lmm.config.to_dict()
        card["trainable_parameters"] = self.lmm.num_parameters(trainable_only=False)
        save_safetensors(tensors, folder / WEIGHTS, metadata={"format": "pt"})
        atomic_write(folder / CARD, lambda p: Path(p).write_text(json.dumps(card, indent=2) + "\n"))
        return folder

    @classmethod
    def load(cls, folder: str | Path, card: ModelCard | None = None) -> "GMSModel":
        """Load a model folder; ``card``: its card when the caller has already read it (read here otherwise)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise GMSError(f"model folder not found: {folder}")
        card_path, weights_path = folder / CARD, folder / WEIGHTS
        if not card_path.is_file() or not weights_path.is_file():
            raise GMSError(f"{folder} is not a GMS model folder (needs {CARD} and {WEIGHTS})")
        if card is None:
            card = load_card(card_path)  # every field the engine reads, checked once here
        try:
            tensors = load_file(str(weights_path))
        except Exception as e:  # safetensors raises its own error types
            raise GMSError(f"cannot read model weights {weights_path}: {e}") from None
        lmm = LatentMappingModel(LMMConfig.from_dict(card.lmm))
        state = {k[4:]: v.float() for k, v in tensors.items() if k.startswith("lmm.")}
        try:
            lmm.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise GMSError(f"model weights {weights_path} do not match the card's LMM: {str(e).splitlines()[0]}") from None
        stats = {k[6:]: v for k, v in tensors.items() if k.startswith("stats.")}
        missing = set(STATS) - set(stats)
        if missing:
            raise GMSError(f"model weights {weights_path} lack latent statistics {sorted(missing)}")
        model = cls(card, lmm, stats)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model


def load_model(folder: str | Path, weights_dir=None, device: str | torch.device = "cpu", progress=None,
               card: ModelCard | None = None) -> GMSModel:
    """Load a model folder and attach its foundation autoencoder (resolved from ``weights_dir``, env, cache or URL).
    ``card``: the folder's card when the caller has already read it."""
    from .autoencoders import load_foundation

    model = GMSModel.load(folder, card)
    model.attach_foundation(load_foundation(model.card.foundation.to_dict(), weights_dir=weights_dir,
                                            progress=progress))
    return model.to(device)



def bundled_models() -> list[str]:
    return [name for name, _ in find_models()]
