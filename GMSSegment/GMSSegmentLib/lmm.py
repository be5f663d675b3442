"""The latent mapping model (LMM) of GMS: a residual-attention U-Net that works at latent resolution throughout and
regresses the mask latent from the image latent, with four deep-supervision heads.

Shape (see docs): stem conv3x3 latent->32; encoder blocks 32->32, 32->64, 64->128, 128->128; decoder blocks with skip
concatenation 256->128, 192->64, 96->32, 64->32; every block = 2 x (GroupNorm(16) -> PReLU -> conv3x3) + skip, then
single-head spatial self-attention; heads GroupNorm -> SiLU -> conv3x3 (no bias) -> latent channels.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LMMConfig:
    latent_channels: int = 32
    stem_channels: int = 32
    encoder_channels: tuple = (32, 64, 128, 128)
    groups: int = 16
    attention: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_channels"] = list(self.encoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LMMConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "encoder_channels" in known:
            known["encoder_channels"] = tuple(known["encoder_channels"])
        return cls(**known)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        # (n, 1 head, hw, c), contiguous in c: only this form takes PyTorch's fused (flash) kernel on CPU; the 3-D or
        # strided forms fall back to the unfused math path, which cost about 40% of a bf16 training step
        # (.contiguous() is free for channels_last activations, as in training and the slice loop)
        q = self.q(y).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        k = self.k(y).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        v = self.v(y).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        out = out.squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return x + self.proj(out)


class ResAttnBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, attention: bool = True):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.act1 = nn.PReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.act2 = nn.PReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)
        self.attn = SpatialSelfAttention(cout, groups) if attention else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.act1(self.norm1(x)))
        y = self.conv2(self.act2(self.norm2(y)))
        return self.attn(y + self.skip(x))


class Head(nn.Sequential):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1, bias=False))


class LatentMappingModel(nn.Module):
    """forward(latent) -> list of 4 predicted mask latents [head1 (coarsest, unsupervised in the paper), ..., head4 =
    the final output]. In eval mode with ``final_only=True`` only the final head is computed."""

    def __init__(self, config: LMMConfig | None = None):
        super().__init__()
        self.config = cfg = config or LMMConfig()
        g, a = cfg.groups, cfg.attention
        e = list(cfg.encoder_channels)
        self.stem = nn.Conv2d(cfg.latent_channels, cfg.stem_channels, 3, padding=1)
        enc_in = [cfg.stem_channels] + e[:-1]
        self.encoder = nn.ModuleList(ResAttnBlock(i, o, g, a) for i, o in zip(enc_in, e))
        # decoder: concat(previous, skip) where skips are stem, enc1, enc2, enc3 (deepest first)
        skips = [cfg.stem_channels] + e[:-1]  # channels of stem, enc1, enc2, enc3
        dec_out = list(reversed(skips))  # 128, 64, 32, 32
        dec_in, prev = [], e[-1]
        for s, o in zip(reversed(skips), dec_out):
            dec_in.append(prev + s)
            prev = o
        self.decoder = nn.ModuleList(ResAttnBlock(i, o, g, a) for i, o in zip(dec_in, dec_out))
        self.heads = nn.ModuleList(Head(o, cfg.latent_channels, g) for o in dec_out)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor, final_only: bool = False):
        x = self.stem(z)
        skips = [x]
        for blk in self.encoder:
            x = blk(x)
            skips.append(x)
        skips.pop()  # the deepest output is the decoder's input, not a skip
        outs = []
        for i, blk in enumerate(self.decoder):
            x = blk(torch.cat([x, skips.pop()], dim=1))
            if not final_only or i == len(self.decoder) - 1:
                outs.append(self.heads[i](x))
        return outs[-1] if final_only else outs

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
