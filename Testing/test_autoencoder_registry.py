"""The foundation autoencoder registry and interface: every registered autoencoder declares where its weights come
from (pinned files or a path) and whether its decoder splits, and the pipeline takes the fast split decode exactly
when the autoencoder declares it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from GMSSegmentLib import GMSError, weights
from GMSSegmentLib.autoencoders import FOUNDATIONS, KNOWN_FOUNDATIONS, FoundationAutoencoder, _normalise
from GMSSegmentLib.pipeline import FastDecodeSettings, SegmentStats, SliceSegmenter


def test_every_registered_autoencoder_declares_its_weights_and_split_decode():
    assert KNOWN_FOUNDATIONS == tuple(FOUNDATIONS) == ("taef2", "diffusers-kl", "diffusers-tiny")
    for name, cls in FOUNDATIONS.items():
        assert issubclass(cls, FoundationAutoencoder) and cls.name == name
        assert isinstance(cls.supports_split_decode, bool)
        # pinned weight files, or a path in the spec: exactly one of them
        assert (cls.pinned_weights is not None) != cls.needs_path, name
        if cls.pinned_weights is not None:
            assert tuple(cls.files) == weights.weights_info(cls.pinned_weights).file_names
        if cls.supports_split_decode:  # it overrides both halves
            assert cls.decode_global is not FoundationAutoencoder.decode_global
            assert cls.decode_local is not FoundationAutoencoder.decode_local
    assert FOUNDATIONS["taef2"].supports_split_decode
    assert not FOUNDATIONS["diffusers-kl"].supports_split_decode
    assert not FOUNDATIONS["diffusers-tiny"].supports_split_decode


def test_aliases_and_paths_come_from_the_classes():
    assert _normalise({"name": "autoencoderkl", "path": "x"})["name"] == "diffusers-kl"
    assert _normalise({"name": "AutoencoderTiny", "path": "x"})["name"] == "diffusers-tiny"
    with pytest.raises(GMSError, match="needs a 'path'"):
        _normalise("diffusers-tiny")
    with pytest.raises(GMSError, match="unknown foundation model 'nope'; known: taef2, diffusers-kl, diffusers-tiny"):
        _normalise("nope")


def test_the_base_class_does_not_split_its_decoder():
    fnd = FoundationAutoencoder()
    assert fnd.supports_split_decode is False
    with pytest.raises(NotImplementedError, match="does not split its decoder"):
        fnd.decode_global(torch.zeros(1, 4, 2, 2))
    with pytest.raises(NotImplementedError, match="does not split its decoder"):
        fnd.decode_local(torch.zeros(1, 4, 2, 2))


class _Fake(FoundationAutoencoder):
    """Decodes to grey; counts which decoder entry points the pipeline calls."""

    name = "fake"
    latent_channels = 4

    def __init__(self, split: bool):
        super().__init__()
        self.supports_split_decode = split
        self.calls = []

    def encode(self, images):
        return torch.zeros(images.shape[0], 4, images.shape[-2] // 8, images.shape[-1] // 8)

    def decode(self, latents):
        self.calls.append("decode")
        return torch.full((latents.shape[0], 3, latents.shape[-2] * 8, latents.shape[-1] * 8), 0.5)

    def decode_global(self, latents):
        self.calls.append("decode_global")
        return latents.clone()

    def decode_local(self, features):
        self.calls.append("decode_local")
        return torch.full((features.shape[0], 3, features.shape[-2] * 8, features.shape[-1] * 8), 0.5)


def _segmenter(fnd, enabled=True) -> SliceSegmenter:
    seg = SliceSegmenter.__new__(SliceSegmenter)  # only what decode() reads
    seg.model = SimpleNamespace(foundation=fnd)
    seg.device, seg.precision = torch.device("cpu"), "fp32"
    seg.fast, seg.stats, seg._bg_feature = FastDecodeSettings(enabled=enabled), SegmentStats(), {}
    return seg


@pytest.mark.parametrize("split", [False, True])
def test_pipeline_takes_the_split_decode_exactly_when_declared(split):
    fnd = _Fake(split)
    z = torch.ones(2, 4, 4, 4)
    out = _segmenter(fnd).decode(z)
    assert out.shape == (2, 3, 32, 32)
    assert ("decode_global" in fnd.calls) == split and ("decode" in fnd.calls) != split
    fnd.calls.clear()
    _segmenter(fnd, enabled=False).decode(z)  # fast decoding off: always the whole decoder
    assert fnd.calls == ["decode"]
