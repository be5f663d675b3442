"""The LMM's shape, the TAEF2 module on real weights, and the model folder format."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from GMSSegmentLib import GMSError
from GMSSegmentLib.autoencoders import load_foundation
from GMSSegmentLib.autoencoders.taef2 import TAEF2
from GMSSegmentLib.lmm import LatentMappingModel, LMMConfig
from GMSSegmentLib.model import GMSModel, load_model, make_segments


def test_lmm_parameter_count_matches_paper():
    assert LatentMappingModel(LMMConfig(latent_channels=4)).num_parameters() == 1_564_976


def test_lmm_shapes_and_attention_layers():
    m = LatentMappingModel(LMMConfig(latent_channels=32))
    outs = m(torch.randn(2, 32, 28, 28))
    assert len(outs) == 4 and all(o.shape == (2, 32, 28, 28) for o in outs)
    assert torch.equal(m.eval()(torch.ones(1, 32, 8, 8), final_only=True), m(torch.ones(1, 32, 8, 8))[-1])
    n_attn = sum(type(x).__name__ == "SpatialSelfAttention" for x in m.modules())
    assert n_attn == 8


@pytest.fixture(scope="module")
def taef2(shared_dir):
    return TAEF2.from_folder(shared_dir / "models" / "taef2")


def _mask224(path):
    m = Image.open(path).convert("L").resize((224, 224), Image.NEAREST)
    return torch.from_numpy(np.asarray(m) > 127)


def test_taef2_strict_load_and_mask_round_trip(taef2, busi_dir):
    assert all(not p.requires_grad for p in taef2.parameters())
    dices = []
    for name in ("benign_12", "malignant_3", "benign_234"):
        g = _mask224(busi_dir / "masks" / f"{name}.png")
        x = g.float()[None, None].expand(1, 3, -1, -1)
        with torch.no_grad():
            z = taef2.encode(x)
            p = taef2.decode_mean(z)[0, 0] > 0.5
        assert z.shape == (1, 32, 28, 28)
        dices.append(2 * (p & g).sum().item() / (p.sum() + g.sum()).item())
    assert min(dices) > 0.98, dices


def test_taef2_split_decoder_is_exact(taef2):
    z = torch.randn(2, 32, 14, 14)
    with torch.no_grad():
        full = taef2.decode(z)
        split = taef2.decode_local(taef2.decode_global(z))
    assert torch.equal(full, split)


def test_taef2_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        TAEF2.from_folder(tmp_path)


def test_model_folder_round_trip(tmp_path, shared_dir):
    lmm = LatentMappingModel(LMMConfig(latent_channels=32))
    stats = {k: torch.rand(32) + 0.5 for k in ("image_mean", "image_std", "mask_mean", "mask_std")}
    card = {"name": "t", "foundation": {"name": "taef2"}, "input_size": 224, "normalization": {"mode": "photo"},
            "axis": 0, "segments": make_segments(["a", "b"])}
    GMSModel(card, lmm, stats).save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "card.json").read_text())
    assert saved["trainable_parameters"] == lmm.num_parameters()
    assert [s["code"] for s in saved["segments"]] == [[1, 1, 0], [0, 1, 1]]
    m2 = load_model(tmp_path / "m", weights_dir=shared_dir / "models")
    for k, v in lmm.state_dict().items():  # fp16 on disk
        assert torch.allclose(m2.lmm.state_dict()[k], v.half().float())
    assert torch.allclose(m2.image_std.flatten(), stats["image_std"])
    with pytest.raises(GMSError, match="exists and is not empty"):
        GMSModel(card, lmm, stats).save(tmp_path / "m")


def test_model_folder_errors(tmp_path, shared_dir, tiny_model):
    with pytest.raises(GMSError, match="not found"):
        GMSModel.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GMSError, match="not a GMS model folder"):
        GMSModel.load(tmp_path / "empty")
    # a card whose LMM expects 4 latent channels cannot run on TAEF2's 32
    bad = tmp_path / "four"
    lmm = LatentMappingModel(LMMConfig(latent_channels=4))
    stats = {k: torch.ones(4) for k in ("image_mean", "image_std", "mask_mean", "mask_std")}
    card = {"name": "four", "foundation": {"name": "taef2"}, "input_size": 224, "normalization": {"mode": "photo"},
            "axis": 0, "segments": make_segments(["x"])}
    GMSModel(card, lmm, stats).save(bad)
    with pytest.raises(GMSError, match="expects 4 latent channels"):
        load_model(bad, weights_dir=shared_dir / "models")
    # weights that do not match the card
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "card.json").write_text((tiny_model / "card.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(GMSError, match="cannot read model weights"):
        GMSModel.load(broken)


def test_attention_takes_the_fused_kernel_and_equals_softmax_attention():
    """The LMM's self-attention is softmax(q k^T / sqrt(c)) v over all positions, computed by PyTorch's fused CPU
    kernel (the unfused math path cost ~40% of a bf16 training step)."""
    from torch.profiler import profile

    from GMSSegmentLib.lmm import SpatialSelfAttention

    torch.manual_seed(0)
    att = SpatialSelfAttention(32, 16).eval()
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad(), profile() as prof:
        out = att(x)
    names = {e.key for e in prof.key_averages()}
    assert any("flash_attention" in n for n in names), sorted(n for n in names if "attention" in n)
    with torch.no_grad():
        y = att.norm(x)
        q, k, v = (f(y).flatten(2) for f in (att.q, att.k, att.v))  # n, c, hw
        w = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, dim=-1)  # n, hw, hw
        ref = x + att.proj((v @ w.transpose(1, 2)).reshape(2, 32, 7, 9))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
