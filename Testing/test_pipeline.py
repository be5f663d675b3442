"""The slice loop: the fast decoder agrees with full decoding on real images; multi-class decoding; cancel."""
import numpy as np
import pytest
import torch
from PIL import Image

from GMSSegmentLib.imageio import read_image
from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.normalization import apply_range, intensity_range
from GMSSegmentLib.pipeline import (Cancelled, FastDecodeSettings, SliceSegmenter, ViewCache, classify, segment_array,
                                    to_model_input)
from GMSSegmentLib.postprocess import second_scale, tta_scale_sets, tta_scales


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model)


def test_fast_decoder_matches_full_decoding_on_real_latents(model, busi_dir, shared_dir):
    """Mask latents of real BUSI masks (what a good LMM predicts) decoded both ways give the same masks."""
    fnd = model.foundation
    names = ["benign_3", "benign_4", "malignant_3", "malignant_5", "benign_11", "normal_7"]
    masks = [np.asarray(Image.open(busi_dir / "masks" / f"{n}.png").convert("L").resize((224, 224))) > 127
             for n in names]
    x = torch.from_numpy(np.stack(masks)).float()[:, None].expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad():
        z = fnd.encode(x)
    fast = SliceSegmenter(model, "cpu", FastDecodeSettings(enabled=True))
    full = SliceSegmenter(model, "cpu", FastDecodeSettings(enabled=False))
    a = classify(fast.decode(z), model.codes, (224, 224))
    b = classify(full.decode(z), model.codes, (224, 224))
    inter = int((a.bool() & b.bool()).sum())
    dice = 2 * inter / int(a.sum() + b.sum())
    assert dice > 0.999, dice
    assert fast.stats.decoded_fraction < full.stats.decoded_fraction  # it did skip work
    assert int(a[-1].sum()) == 0  # the normal (empty) mask stays empty


def test_segment_array_2d_and_3d_shapes(model, busi_dir, hippo_dir):
    img = read_image(busi_dir / "images" / "benign_3.png")
    lab = segment_array(model, img.array)
    assert lab.shape == img.array.shape[:3] and lab.dtype == np.uint8
    vol = read_image(hippo_dir / "imagesTr" / "hippocampus_025.nii.gz").array[:5, :12, :]  # a real sub-volume
    for axis in (0, 1, 2):
        assert segment_array(model, vol, axis=axis, batch_size=16).shape == vol.shape


def test_cancel_stops_the_loop(model, hippo_dir):
    vol = read_image(hippo_dir / "imagesTr" / "hippocampus_025.nii.gz")
    calls = []
    with pytest.raises(Cancelled):
        segment_array(model, vol.array, batch_size=4, progress=lambda d, t: calls.append(d),
                      cancel=lambda: len(calls) > 2)
    assert calls[-1] < vol.array.shape[0]


def test_classify_nearest_code_colour():
    codes = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    dec = torch.zeros(1, 3, 4, 4)
    dec[0, :, 0, 0] = torch.tensor([0.9, 0.8, 0.1])  # near code 1
    dec[0, :, 1, 1] = torch.tensor([0.1, 0.9, 0.7])  # near code 2
    dec[0, :, 2, 2] = torch.tensor([0.3, 0.2, 0.1])  # near black
    lab = classify(dec, codes, (4, 4))
    assert lab[0, 0, 0] == 1 and lab[0, 1, 1] == 2 and lab[0, 2, 2] == 0
    binary = classify(torch.full((1, 3, 2, 2), 0.6), torch.tensor([[1.0, 1.0, 1.0]]), (4, 4))
    assert binary.shape == (1, 4, 4) and bool(binary.all())


class _ThresholdSegmenter(SliceSegmenter):
    """The real slice loop with a transparent stand-in for the network: label 1 where the normalised input > 0.6.
    It lets the test know exactly which slices contain foreground."""

    def decode_slices(self, slices):  # a white "decoded image" (label 1 for the binary model) where > 0.6
        self.stats.slices += slices.shape[0]
        self.seen.extend(slices.reshape(slices.shape[0], -1).max(axis=1).round(6).tolist())
        return torch.from_numpy((slices > 0.6).astype(np.float32))[:, None].expand(-1, 3, -1, -1)


def test_z_shortcut_skips_only_slices_between_empty_ones(model, hippo_dir):
    vol = read_image(hippo_dir / "imagesTr" / "hippocampus_025.nii.gz")
    arr = vol.array.copy()
    lo, hi = np.percentile(arr, [1, 99])
    arr = np.clip((arr - lo) / (hi - lo) * 255, 0, 255)
    arr[:10] = 0  # empty slices at both ends, as above and below an organ
    arr[-8:] = 0
    results = {}
    for gap in (0.0, 3.0):
        seg = _ThresholdSegmenter(model, "cpu", FastDecodeSettings(enabled=True, z_gap_mm=gap))
        seg.seen = []
        calls = []
        results[gap] = (segment_array(model, arr, axis=0, segmenter=seg, spacing_zyx=(1.0, 1.0, 1.0),
                                      progress=lambda d, t: calls.append((d, t))), seg)
        assert calls[-1] == (arr.shape[0], arr.shape[0])
    full, fast = results[0.0][0], results[3.0][0]
    assert np.array_equal(full, fast)
    assert full[10:-8].any() and not full[:10].any()
    skipped = results[3.0][1].stats.extra["z_skipped"]
    assert skipped >= 10 and results[3.0][1].stats.slices == arr.shape[0] - skipped


def test_device_selection_and_autocast_policy(monkeypatch):
    """The GPU path as far as it can be checked without a GPU: device choice and the autocast policy."""
    import contextlib

    from GMSSegmentLib import GMSError
    from GMSSegmentLib.pipeline import autocast_for, pick_device

    assert pick_device("cpu").type == "cpu"
    assert isinstance(autocast_for(torch.device("cpu")), contextlib.nullcontext)  # fp32 on the CPU
    ac = autocast_for(torch.device("cpu"), "bf16")
    assert isinstance(ac, torch.autocast) and ac.fast_dtype == torch.bfloat16
    with pytest.raises(GMSError, match="unknown precision"):
        autocast_for(torch.device("cpu"), "fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    with pytest.raises(GMSError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(GMSError, match="unknown device"):
        pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda" and pick_device("gpu").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    ac = autocast_for(torch.device("cuda"))
    assert isinstance(ac, torch.autocast) and ac.fast_dtype == torch.float16
    assert isinstance(autocast_for(torch.device("cuda"), "fp32"), contextlib.nullcontext)


def test_training_precision_policy(monkeypatch):
    """auto trains in bf16 only where the hardware multiplies bf16 (AMX / AVX512-BF16 CPUs, bf16 CUDA), else fp32;
    explicit choices win and a typo is a clear error."""
    import contextlib

    from GMSSegmentLib import GMSError, pipeline

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(pipeline, "cpu_has_fast_bf16", lambda: False)
    assert pipeline.training_precision(cpu, "auto") == "fp32"
    assert pipeline.training_precision(cpu, "bf16") == "bf16"
    monkeypatch.setattr(pipeline, "cpu_has_fast_bf16", lambda: True)
    assert pipeline.training_precision(cpu, "auto") == "bf16"
    assert pipeline.training_precision(cpu, "fp32") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert pipeline.training_precision(cuda, "auto") == "fp32"
    with pytest.raises(GMSError, match="unknown precision"):
        pipeline.training_precision(cpu, "fp8")
    assert isinstance(pipeline.train_autocast(cpu, "fp32"), contextlib.nullcontext)
    ac = pipeline.train_autocast(cpu, "bf16")
    assert isinstance(ac, torch.autocast) and ac.fast_dtype == torch.bfloat16
    with ac:  # the LMM's convolutions really run in bf16 under it
        y = torch.nn.Conv2d(4, 4, 3)(torch.randn(1, 4, 8, 8))
    assert y.dtype == torch.bfloat16


def test_cpu_bf16_detection_reads_cpuinfo():
    from GMSSegmentLib.pipeline import cpu_has_fast_bf16

    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    assert cpu_has_fast_bf16() == bool({"amx_bf16", "avx512_bf16"} & set(flags))


def test_flip_tta_is_flip_equivariant_and_follows_the_card(busi_dir):
    """With the 4 flip views the prediction of a flipped image is the flipped prediction (the view set is closed under
    flips); one view is the plain loop; the card's choice is what segment_array uses by default."""
    m = load_model(resolve_model_path("busi-lesion"))  # the bundled, fully trained model: real lesions, not an empty prediction
    img = read_image(busi_dir / "images" / "malignant_5.png").array
    flipped = img[:, :, ::-1].copy()
    views4 = SliceSegmenter(m, "cpu", True, tta=4)
    a = segment_array(m, img, segmenter=views4, postprocess={})
    b = segment_array(m, flipped, segmenter=views4, postprocess={})[:, :, ::-1]
    assert a.any()
    dice = 2 * int((a.astype(bool) & b.astype(bool)).sum()) / int(a.astype(bool).sum() + b.astype(bool).sum())
    assert dice > 0.999, dice
    one = segment_array(m, img, segmenter=SliceSegmenter(m, "cpu", True, tta=1), postprocess={})
    assert not np.array_equal(one, a)  # the views do change the mask at its border
    m.card["tta"] = {"views": 4}
    np.testing.assert_array_equal(segment_array(m, img, postprocess={}), a)
    m.card["tta"] = {"views": 1}
    np.testing.assert_array_equal(segment_array(m, img, postprocess={}), one)
    with pytest.raises(Exception, match="1, 2, 4 or 8 views"):
        SliceSegmenter(m, "cpu", True, tta=3)


def test_eight_view_tta_covers_the_rotations_of_the_square(busi_dir):
    """The 8 views are the 8 symmetries of the square (the flips, transposed and not): each is undone exactly, they
    are all different, and with them the prediction of an image rotated by 90 degrees is the rotated prediction."""
    from GMSSegmentLib.postprocess import TTA_FLIPS, apply_view, undo_view

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    seen = set()
    for v in TTA_FLIPS[8]:
        y = apply_view(x, v)
        assert torch.equal(undo_view(y, v), x), v
        seen.add(tuple(y.flatten().tolist()))
    assert len(seen) == 8
    assert torch.equal(apply_view(x, ("t", -2)), torch.rot90(x, 1, dims=(-2, -1)))  # a transpose + flip is a rotation
    m = load_model(resolve_model_path("busi-lesion"))
    img = read_image(busi_dir / "images" / "malignant_5.png").array
    img = img[:, : img.shape[0]]  # square, so that the rotation keeps the grid
    views8 = SliceSegmenter(m, "cpu", True, tta=8)
    a = segment_array(m, img, segmenter=views8, postprocess={})
    b = np.rot90(segment_array(m, np.rot90(img).copy(), segmenter=views8, postprocess={}), -1)
    assert a.any()
    dice = 2 * int((a.astype(bool) & b.astype(bool)).sum()) / int(a.astype(bool).sum() + b.astype(bool).sum())
    assert dice > 0.999, dice
    four = segment_array(m, np.rot90(img).copy(), segmenter=SliceSegmenter(m, "cpu", True, tta=4), postprocess={})
    assert not np.array_equal(np.rot90(four, -1), a)  # 4 flip views alone are not closed under rotation


def test_multiscale_tta_averages_the_decoded_images_of_two_input_sizes(busi_dir):
    """Multi-scale test-time augmentation: the decoded image at the second input size (256 for a 224 model) is resized
    to the model's size and averaged with the first before the mask is taken; the card's choice is the default,
    ``tta=1`` (gms segment --no-tta) turns it off, and sizes that the foundation model cannot take are refused."""
    assert second_scale(224) == 256 and second_scale(96) == 112 and second_scale(8) == 16
    assert tta_scale_sets(224) == [[224], [224, 256], [224, 256, 288]]  # the sets gms postprocess tries
    assert tta_scale_sets(96) == [[96], [96, 112], [96, 112, 128]]
    m = load_model(resolve_model_path("busi-lesion"))
    img = read_image(busi_dir / "images" / "malignant_5.png").array
    both = SliceSegmenter(m, "cpu", True, tta=1, scales=[224, 256])
    ms = segment_array(m, img, segmenter=both, postprocess={})
    one = segment_array(m, img, segmenter=SliceSegmenter(m, "cpu", True, tta=1), postprocess={})
    big = segment_array(m, img, segmenter=SliceSegmenter(m, "cpu", True, tta=1, scales=[256]), postprocess={})
    assert ms.any() and one.any() and big.any()
    assert not np.array_equal(one, big)  # the second size is a different view of the image
    # the same average computed by hand from the two full decodes
    ref = SliceSegmenter(m, "cpu", False, tta=1)
    lo, hi = intensity_range(img, m.card["normalization"])
    x = apply_range(img, lo, hi)
    with torch.inference_mode():
        d224 = ref.decode(ref.predict_latents(to_model_input(x, 224, "cpu")))
        d256 = ref.decode(ref.predict_latents(to_model_input(x, 256, "cpu")))
        avg = (d224 + torch.nn.functional.interpolate(d256, size=(224, 224), mode="bilinear", align_corners=False)) / 2
        by_hand = classify(avg, m.codes, img.shape[1:3]).numpy()[0].astype(bool)
    got = ms[0].astype(bool)
    assert 2 * (got & by_hand).sum() / (got.sum() + by_hand.sum()) > 0.999  # the fast decode crops, the hand one not
    # the card's choice is the default; tta=1 is the plain single view whatever the card says
    m.card["tta"] = {"views": 1, "scales": [224, 256]}
    assert tta_scales(m.card) == [224, 256]
    np.testing.assert_array_equal(segment_array(m, img, postprocess={}), ms)
    np.testing.assert_array_equal(segment_array(m, img, segmenter=SliceSegmenter(m, "cpu", True, tta=1),
                                                postprocess={}), one)
    del m.card["tta"]
    assert tta_scales(m.card) == [224]
    with pytest.raises(Exception, match="multiples of 8"):
        SliceSegmenter(m, "cpu", True, scales=[224, 250])


def test_options_share_decoded_views_through_a_view_cache(busi_dir):
    """gms postprocess runs every test-time option on each validation case; with a shared view cache each flip view at
    each input size is decoded once and the options average the views they have in common: the same decoded images
    as separate runs, from 8 encoded views (4 flips x 2 sizes) instead of 21."""
    m = load_model(resolve_model_path("busi-lesion"))
    names = ("malignant_5.png", "benign_12.png")
    x = [apply_range(a, *intensity_range(a, m.card["normalization"]))
         for a in (read_image(busi_dir / "images" / n).array for n in names)]
    options = [(1, [224]), (2, [224]), (4, [224]), (1, [224, 256]), (2, [224, 256]), (4, [224, 256])]
    cache = ViewCache()
    encoded = {"alone": 0, "shared": 0}

    def counting(seg, arm):
        inner = seg.predict_latents

        def predict(t):
            encoded[arm] += t.shape[0]
            return inner(t)
        seg.predict_latents = predict
        return seg

    for img in x:
        cache.clear()
        for views, scales in options:
            alone = counting(SliceSegmenter(m, "cpu", True, tta=views, scales=scales), "alone")
            shared = counting(SliceSegmenter(m, "cpu", True, tta=views, scales=scales), "shared")
            shared.view_cache = cache
            a, b = alone.decode_slices(img), shared.decode_slices(img)
            assert a.shape == b.shape == (1, 3, 224, 224)
            assert torch.allclose(a, b, atol=1e-5), (views, scales, (a - b).abs().max())
        assert len(cache) == 8 and cache.nbytes == 4 * 3 * 4 * (224 * 224 + 256 * 256)
    assert encoded == {"alone": 21 * len(x), "shared": 8 * len(x)}
    # a cache at its budget keeps nothing more: the options then decode those views themselves, with the same result
    small = ViewCache(max_bytes=4 * 3 * 224 * 224)  # room for one view of one slice at 224
    two = [counting(SliceSegmenter(m, "cpu", True, tta=2, scales=[224]), "shared") for _ in range(2)]
    outs = []
    for seg in two:
        seg.view_cache = small
        before = encoded["shared"]
        outs.append(seg.decode_slices(x[0]))
        outs.append(encoded["shared"] - before)
    assert outs[1] == 2 and outs[3] == 1  # the second run found the plain view, decoded the flipped one again
    assert len(small) == 1 and small.nbytes == small.max_bytes
    fresh = SliceSegmenter(m, "cpu", True, tta=2, scales=[224]).decode_slices(x[0])
    assert torch.allclose(outs[0], fresh, atol=1e-5) and torch.allclose(outs[2], fresh, atol=1e-5)


def test_bf16_inference_agrees_with_fp32_on_real_images(busi_dir):
    """bf16 autocast on the CPU (gms segment --precision bf16) gives the fp32 masks up to a few border pixels."""
    m = load_model(resolve_model_path("busi-lesion"))
    for name in ("benign_3", "malignant_5"):
        img = read_image(busi_dir / "images" / f"{name}.png").array
        a = segment_array(m, img, segmenter=SliceSegmenter(m, "cpu", True, tta=1, precision="fp32")).astype(bool)
        b = segment_array(m, img, segmenter=SliceSegmenter(m, "cpu", True, tta=1, precision="bf16")).astype(bool)
        assert a.any()
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99


def test_z_smoothing_averages_decoded_neighbours_and_variants_share_one_run(hippo_dir, shared_dir):
    """z smoothing (3D models): the labels are those of each slice's decoded image averaged with its neighbours'
    ([w, 1 - 2w, w], end slices repeated), computed here by hand from the segmenter's decoded slices of a real MRI;
    several post-processing variants come from one network run and each equals its own segment_array call."""
    from GMSSegmentLib.pipeline import segment_array_variants

    m = load_model(resolve_model_path("hippocampus"), weights_dir=shared_dir / "models")
    img = read_image(hippo_dir / "imagesTr" / "hippocampus_025.nii.gz").array  # stored RAS, as the card's
    seg = SliceSegmenter(m, "cpu", FastDecodeSettings(enabled=True, z_gap_mm=0), tta=1, scales=[96])
    lo, hi = intensity_range(img, m.card["normalization"])
    dec = seg.decode_slices(apply_range(img, lo, hi)).numpy()
    w = 1 / 3
    pad = np.concatenate([dec[:1], dec, dec[-1:]])
    by_hand = (1 - 2 * w) * dec + w * (pad[:-2] + pad[2:])
    lut = np.array([0, 1, 2], np.uint8)
    expect = lut[classify(torch.from_numpy(by_hand), m.codes, img.shape[1:]).numpy()]
    plain_expect = lut[classify(torch.from_numpy(dec), m.codes, img.shape[1:]).numpy()]

    calls = seg.stats.slices
    variants = [{}, {"z_smooth": w}, {"z_smooth": w, "largest_component": True}]
    # without the card's presence decision, which would clear a segment on the slices it finds it absent on
    plain, smooth, smooth_lcc = segment_array_variants(m, img, variants, segmenter=seg, presence=False)
    assert seg.stats.slices - calls == img.shape[0]  # one network run for the three
    np.testing.assert_array_equal(plain, plain_expect)
    np.testing.assert_array_equal(smooth, expect)
    assert (smooth != plain).sum() > 0  # it does change voxels
    for v, got in zip(variants, (plain, smooth, smooth_lcc)):
        np.testing.assert_array_equal(segment_array(m, img, segmenter=seg, postprocess=v, presence=False), got)
    with pytest.raises(Exception, match="z_smooth"):
        segment_array(m, img, segmenter=seg, postprocess={"z_smooth": 0.7})


def test_z_smoothing_is_ignored_by_2d_models(model, busi_dir):
    """A 2D model's stack is not a volume: the smoothing setting leaves its labels alone."""
    a = read_image(busi_dir / "images" / "benign_3.png").array
    stack = np.concatenate([a, a[:, ::-1], a[:, :, ::-1]])  # three different slices of one size
    seg = SliceSegmenter(model, "cpu", True, tta=1)
    np.testing.assert_array_equal(segment_array(model, stack, segmenter=seg, postprocess={"z_smooth": 1 / 3}),
                                  segment_array(model, stack, segmenter=seg, postprocess={}))
