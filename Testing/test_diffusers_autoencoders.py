"""diffusers AutoencoderKL / AutoencoderTiny behind the FoundationAutoencoder interface, on tiny random models."""
from __future__ import annotations

import sys

import pytest
import torch

from GMSSegmentLib import GMSError
from GMSSegmentLib.autoencoders import FoundationAutoencoder, foundation_fingerprint, load_foundation
from GMSSegmentLib.weights import sha256_file

try:  # a test dependency: fail loudly rather than skip
    import diffusers
except ImportError as e:  # pragma: no cover
    raise ImportError(f"these tests need diffusers (pip install diffusers): {e}") from e

# 3 resolution levels -> 4x downscale; 4 latent channels
KL_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
                 latent_channels=4, norm_num_groups=4, sample_size=32)
TINY_CONFIG = dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                   num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("kl")
    diffusers.AutoencoderKL(**KL_CONFIG).save_pretrained(folder)  # default scaling_factor 0.18215 (SD)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny")
    diffusers.AutoencoderTiny(**TINY_CONFIG).save_pretrained(folder)
    return folder


def images(n=2, size=32):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, size, size, generator=g)


def check_common(ae: FoundationAutoencoder, x: torch.Tensor):
    assert isinstance(ae, FoundationAutoencoder)
    assert ae.latent_channels == 4 and ae.downscale == 4
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    ae.train()
    assert not ae.training  # stays frozen
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (x.shape[0], 4, x.shape[2] // 4, x.shape[3] // 4)
        assert torch.equal(z, ae.encode(x))  # deterministic
        y = ae.decode(z)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        assert ae.decode_mean(z).shape == (x.shape[0], 1, x.shape[2], x.shape[3])
    # gradients flow to the latents through the frozen decoder (LMM training needs this)
    zg = z.clone().requires_grad_(True)
    ae.decode_mean(zg).sum().backward()
    assert zg.grad is not None and torch.isfinite(zg.grad).all()
    # describe() is a valid spec
    d = ae.describe()
    assert d["name"] == ae.name and d["latent_channels"] == 4 and d["downscale"] == 4
    return z, y


def test_kl_wrapper(kl_folder):
    x = images()
    ae = load_foundation({"name": "diffusers-kl", "path": str(kl_folder)})
    assert ae.scaling_factor == pytest.approx(0.18215) and ae.shift_factor == 0.0
    z, y = check_common(ae, x)

    raw = diffusers.AutoencoderKL.from_pretrained(kl_folder).eval()
    with torch.no_grad():
        post = raw.encode(x * 2 - 1).latent_dist
        assert torch.allclose(z, post.mean * 0.18215, atol=1e-6)  # mean (not a sample), scaled, [-1, 1] input
        mean, std = ae.encode_distribution(x)
        assert torch.allclose(mean, z) and torch.allclose(std, post.std * 0.18215, atol=1e-6)
        assert (std > 0).all()
        expected = ((raw.decode(z / 0.18215).sample + 1) / 2).clamp(0, 1)
        assert torch.allclose(y, expected, atol=1e-6)

    again = load_foundation(ae.describe())
    with torch.no_grad():
        assert torch.equal(again.encode(x), z)

    fp = foundation_fingerprint({"name": "diffusers-kl", "path": str(kl_folder)})
    assert set(fp) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert fp["config.json"] == sha256_file(kl_folder / "config.json")


def test_kl_shift_and_scale(tmp_path):
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**KL_CONFIG, scaling_factor=0.5, shift_factor=0.25).save_pretrained(tmp_path / "vae")
    # a pipeline-style folder (model in vae/) is found, and relative paths resolve against weights_dir
    ae = load_foundation({"name": "diffusers-kl", "path": tmp_path.name}, weights_dir=tmp_path.parent)
    assert ae.describe()["subfolder"] == "vae"
    x = images(1)
    raw = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.allclose(z, (raw.encode(x * 2 - 1).latent_dist.mean - 0.25) * 0.5, atol=1e-6)
        expected = ((raw.decode(z / 0.5 + 0.25).sample + 1) / 2).clamp(0, 1)
        assert torch.allclose(ae.decode(z), expected, atol=1e-6)


def test_tiny_wrapper(tiny_folder):
    x = images()
    ae = load_foundation({"name": "diffusers-tiny", "path": str(tiny_folder)})
    z, y = check_common(ae, x)
    raw = diffusers.AutoencoderTiny.from_pretrained(tiny_folder).eval()
    with torch.no_grad():
        # the wrapper's [0, 1] images reach the TAESD layers unchanged (diffusers maps [-1, 1] back internally)
        assert torch.allclose(z, raw.encoder.layers(x), atol=1e-6)
        assert torch.allclose(z, raw.encode(x * 2 - 1).latents, atol=1e-6)
        # decode = TAESD layers on soft-clamped latents, clamped to [0, 1]
        expected = raw.decoder.layers(torch.tanh(z / 3) * 3).clamp(0, 1)
        assert torch.allclose(y, expected, atol=1e-5)
        mean, std = ae.encode_distribution(x)
        assert torch.equal(mean, z) and torch.equal(std, torch.zeros_like(z))


def test_errors(kl_folder, tmp_path, monkeypatch):
    with pytest.raises(GMSError, match="needs a 'path'"):
        load_foundation("diffusers-kl")
    with pytest.raises(GMSError, match="not found"):
        load_foundation({"name": "diffusers-tiny", "path": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(GMSError) as err:
        load_foundation({"name": "diffusers-kl", "path": str(tmp_path / "empty")})
    assert "\n" not in str(err.value)
    with pytest.raises(GMSError, match="diffusers-kl"):
        load_foundation({"name": "sd-vae"})
    # without diffusers installed: a clear GMSError, not an ImportError
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(GMSError, match="pip install diffusers"):
        load_foundation({"name": "diffusers-kl", "path": str(kl_folder)})
