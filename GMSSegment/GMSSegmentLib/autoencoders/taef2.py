"""TAEF2: the tiny distilled autoencoder of the FLUX.2 latent space (MIT, by Ollin Boer Bohan), written here from the
description of its state dicts. 32 latent channels, 8x downscale, RGB in [0, 1] in and out.

Both halves are ``nn.Sequential`` so that the upstream state-dict keys (``"<index>.conv.<k>.weight"``) load strictly.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import GMSError
from ..torchload import load_weights_only
from .base import FoundationAutoencoder

WIDTH = 64
LATENT_CHANNELS = 32


def _conv(cin: int, cout: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class _Pool(nn.Sequential):
    """The squeeze-expand branch of the lowest-resolution blocks: 1x1 up to 4x width, GroupNorm(4), ReLU, 1x1 back."""

    def __init__(self, ch: int):
        super().__init__(nn.Conv2d(ch, 4 * ch, 1, bias=False), nn.GroupNorm(4, 4 * ch), nn.ReLU(),
                         nn.Conv2d(4 * ch, ch, 1, bias=False))


class TAEBlock(nn.Module):
    def __init__(self, ch: int = WIDTH, pool: bool = False):
        super().__init__()
        if pool:
            self.pool = _Pool(ch)
        self.conv = nn.Sequential(_conv(ch, ch), nn.ReLU(), _conv(ch, ch), nn.ReLU(), _conv(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pool"):
            x = x + self.pool(x)
        return F.relu(self.conv(x) + x)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def build_encoder() -> nn.Sequential:
    w = WIDTH
    return nn.Sequential(
        _conv(3, w), TAEBlock(w),
        _conv(w, w, 2, False), TAEBlock(w), TAEBlock(w), TAEBlock(w),
        _conv(w, w, 2, False), TAEBlock(w), TAEBlock(w), TAEBlock(w),
        _conv(w, w, 2, False), TAEBlock(w, True), TAEBlock(w, True), TAEBlock(w, True),
        _conv(w, LATENT_CHANNELS),
    )


def build_decoder() -> nn.Sequential:
    w = WIDTH
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
    return nn.Sequential(
        _Clamp(), _conv(LATENT_CHANNELS, w), nn.ReLU(),
        TAEBlock(w, True), TAEBlock(w, True), TAEBlock(w, True),
        up(), _conv(w, w, bias=False), TAEBlock(w), TAEBlock(w), TAEBlock(w),
        up(), _conv(w, w, bias=False), TAEBlock(w), TAEBlock(w), TAEBlock(w),
        up(), _conv(w, w, bias=False), TAEBlock(w),
        _conv(w, 3),
    )


#: decoder modules [0, DECODER_GLOBAL_END) hold GroupNorm (global statistics) and run at latent resolution;
#: everything after is local (3x3 convs, ReLU, nearest upsampling), so it can run on crops with a halo.
DECODER_GLOBAL_END = 6
#: receptive-field radius of the local part of the decoder, in latent cells (10 convs at 1/4, 10 at 1/2, 5 at 1/1)
DECODER_LOCAL_RADIUS_LATENT = 10 / 2 + 10 / 4 + 5 / 8


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file, read with ``weights_only=True`` (a pickle that would run code, or anything else
    than a dict of tensors, is refused); any failure is a one-line :class:`GMSError` naming the file."""
    state = load_weights_only(path, "TAEF2 weights")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise GMSError(f"cannot load TAEF2 weights {path}: not a state dict of tensors")
    return {k: v.float() for k, v in state.items()}


class TAEF2(FoundationAutoencoder):
    name = "taef2"
    latent_channels = LATENT_CHANNELS
    downscale = 8
    pinned_weights = "taef2"
    supports_split_decode = True
    files = ("taef2_encoder.pth", "taef2_decoder.pth")

    def __init__(self):
        super().__init__()
        self.encoder = build_encoder()
        self.decoder = build_decoder()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TAEF2":
        folder = Path(folder)
        model = cls()
        for part, fname in zip((model.encoder, model.decoder), cls.files):
            path = folder / fname
            if not path.is_file():
                raise FileNotFoundError(f"TAEF2 weights not found: {path}")
            part.load_state_dict(_state_dict(path), strict=True)
        return model.freeze()

    @classmethod
    def from_spec(cls, spec: dict, weights_dir=None, progress=None) -> "TAEF2":
        """The pinned weights, resolved (and downloaded if needed) by :func:`..weights.resolve_weights`."""
        from ..weights import resolve_weights
        folder = resolve_weights(cls.pinned_weights, weights_dir, progress)
        try:
            return cls.from_folder(folder)
        except FileNotFoundError as e:
            raise GMSError(str(e)) from None
        except (RuntimeError, OSError, ValueError) as e:  # unreadable/mismatched state dict
            raise GMSError(f"cannot load TAEF2 weights from {folder}: {str(e).splitlines()[0]}") from None

    @classmethod
    def fingerprint(cls, spec: dict, weights_dir=None, progress=None) -> dict[str, str]:
        from ..weights import file_sha256, resolve_weights
        folder = resolve_weights(cls.pinned_weights, weights_dir, progress)  # verified: their digests are remembered
        return {f: file_sha256(folder / f) for f in cls.files}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).clamp(0.0, 1.0)

    # -- inference helpers (exact reformulations, used by the fast pipeline) --------------------------------------
    def decode_global(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent-resolution part of the decoder (contains GroupNorm, must see the whole latent)."""
        return self.decoder[:DECODER_GLOBAL_END](latents)

    def decode_local(self, features: torch.Tensor) -> torch.Tensor:
        """The local (crop-safe) part of the decoder: features from ``decode_global`` -> RGB in [0, 1]."""
        return self.decoder[DECODER_GLOBAL_END:](features).clamp(0.0, 1.0)
