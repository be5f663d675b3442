"""The interface every foundation autoencoder implements.

Images enter as float tensors N x 3 x H x W in [0, 1] (H, W multiples of ``downscale``) and leave ``decode`` in [0, 1].
Latents are the autoencoder's *raw* latents (any scaling the model family prescribes, e.g. 0.18215 for the SD VAE, is
applied inside ``encode``/``decode``). Per-channel standardisation for the LMM is the GMS model's business, not this.
Autoencoders are always frozen: parameters have requires_grad False and the module stays in eval mode.

A class also declares how it is loaded from a model card's foundation spec (``from_spec``, ``fingerprint``), the
pinned weight files it needs (``pinned_weights``: its entry in ``weights.REGISTRY``) or that it needs a ``path``, and
whether its decoder splits into a global and a local part (``supports_split_decode``, used by the fast pipeline).
"""
from __future__ import annotations

import torch
from torch import nn


class FoundationAutoencoder(nn.Module):
    #: short identifier written into model cards, e.g. "taef2"
    name: str = "abstract"
    #: other names a spec may use
    aliases: tuple[str, ...] = ()
    latent_channels: int = 0
    downscale: int = 8
    #: the name of its pinned weight files in ``weights.REGISTRY``; None: loaded from the spec's ``path``
    pinned_weights: str | None = None
    #: the spec must give a ``path`` (a Hugging Face Hub id or a local folder)
    needs_path: bool = False
    #: ``decode_global`` and ``decode_local`` split ``decode`` exactly (the fast pipeline decodes crops)
    supports_split_decode: bool = False

    @classmethod
    def from_spec(cls, spec: dict, weights_dir=None, progress=None) -> "FoundationAutoencoder":
        """Build it from a checked spec (a dict with 'name'); problems are one-line GMSErrors."""
        raise NotImplementedError  # pragma: no cover - interface

    @classmethod
    def fingerprint(cls, spec: dict, weights_dir=None, progress=None) -> dict[str, str]:
        """SHA-256 of each of its weight files, by file name, for model cards."""
        raise NotImplementedError  # pragma: no cover - interface

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the latent posterior. Deterministic encoders return std = 0."""
        mean = self.encode(images)
        return mean, torch.zeros_like(mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode_global(self, latents: torch.Tensor) -> torch.Tensor:
        """The part of the decoder that must see the whole latent (only where ``supports_split_decode``)."""
        raise NotImplementedError(f"foundation model '{self.name}' does not split its decoder")

    def decode_local(self, features: torch.Tensor) -> torch.Tensor:
        """The crop-safe rest of the decoder: ``decode_global`` features -> RGB in [0, 1]."""
        raise NotImplementedError(f"foundation model '{self.name}' does not split its decoder")

    def decode_mean(self, latents: torch.Tensor) -> torch.Tensor:
        """Channel mean of the decoded image, N x 1 x H x W, clamped to [0, 1]: the GMS mask probability."""
        return self.decode(latents).mean(dim=1, keepdim=True).clamp(0.0, 1.0)

    def freeze(self) -> "FoundationAutoencoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):  # frozen: never switch to training mode
        return super().train(False)

    def describe(self) -> dict:
        """What a model card records about this foundation model."""
        return {"name": self.name, "latent_channels": self.latent_channels, "downscale": self.downscale}
