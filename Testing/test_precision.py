"""What ``--precision auto`` runs: bf16 only on a CPU that multiplies bf16 in hardware and only for a model whose card
accepts it (bf16 measured as accurate as fp32 on its held-out list); fp32 stays one flag away. The CPU's bf16 hardware is
the one thing faked here (this machine may lack it); the segmentations are real."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from GMSSegmentLib import GMSError, pipeline
from GMSSegmentLib.card import parse_card
from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.pipeline import SliceSegmenter, inference_precision

CPU = torch.device("cpu")


def _card(accepted):
    card = json.loads((resolve_model_path("busi-lesion") / "card.json").read_text())
    card.pop("precision", None)
    if accepted is not None:
        card["precision"] = {"cpu_bf16": accepted}
    return parse_card(card)


@pytest.mark.parametrize("fast_cpu, accepted, expected", [
    (True, True, "bf16"), (True, False, "fp32"), (True, None, "fp32"), (False, True, "fp32"), (False, None, "fp32")])
def test_auto_needs_bf16_hardware_and_the_cards_verdict(monkeypatch, fast_cpu, accepted, expected):
    monkeypatch.delenv("GMS_PRECISION", raising=False)
    monkeypatch.setattr(pipeline, "cpu_has_fast_bf16", lambda: fast_cpu)
    card = _card(accepted)
    assert inference_precision(CPU, "auto", card) == expected
    assert inference_precision(CPU, "fp32", card) == "fp32" and inference_precision(CPU, "bf16", card) == "bf16"
    assert inference_precision(torch.device("cuda"), "auto", card) == "auto"  # CUDA: bf16/fp16 autocast as before
    monkeypatch.setenv("GMS_PRECISION", "fp32")
    assert inference_precision(CPU, "auto", card) == "fp32"
    monkeypatch.setenv("GMS_PRECISION", "fast")
    with pytest.raises(GMSError, match="unknown precision 'fast'"):
        inference_precision(CPU, "auto", card)


def test_card_precision_is_checked():
    card = json.loads((resolve_model_path("busi-lesion") / "card.json").read_text())
    card["precision"] = {"cpu_bf16": "yes"}
    with pytest.raises(GMSError, match="'precision.cpu_bf16' must be true or false"):
        parse_card(card)


def test_bundled_cards_record_their_verdict():
    """Each bundled card says whether bf16 passed the bar, with the figures it rests on."""
    for name in ("busi-lesion", "kvasir-polyp", "hippocampus"):
        prec = json.loads((resolve_model_path(name) / "card.json").read_text())["precision"]
        diffs = [s["difference"] for s in prec["segments"].values()]
        assert prec["cpu_bf16"] == all(d >= pipeline.BF16_BAR for d in diffs), name
        assert all(s["cases"] >= 40 for s in prec["segments"].values()), name


def test_auto_runs_bf16_where_accepted(monkeypatch, busi_dir, tmp_path, shared_dir):
    """On a CPU with bf16 hardware, a model whose card accepts bf16 runs in bf16 with auto (the same labels as an
    explicit bf16 run); one whose card does not runs fp32."""
    from GMSSegmentLib.imageio import read_image

    monkeypatch.delenv("GMS_PRECISION", raising=False)
    monkeypatch.setattr(pipeline, "cpu_has_fast_bf16", lambda: True)
    folder = tmp_path / "model"
    shutil.copytree(resolve_model_path("busi-lesion"), folder)
    image = read_image(busi_dir / "images" / "malignant_10.png").array
    runs = {}
    for accepted in (True, False):
        card = json.loads((folder / "card.json").read_text())
        card["precision"] = {"cpu_bf16": accepted}
        (folder / "card.json").write_text(json.dumps(card))
        model = load_model(folder, weights_dir=shared_dir / "models")
        auto = SliceSegmenter(model, CPU, tta=1)
        assert auto.precision == ("bf16" if accepted else "fp32")
        runs[accepted] = pipeline.segment_array(model, image, segmenter=auto)
    model = load_model(folder, weights_dir=shared_dir / "models")
    for precision in ("bf16", "fp32"):
        explicit = pipeline.segment_array(model, image, segmenter=SliceSegmenter(model, CPU, tta=1, precision=precision))
        assert np.array_equal(runs[precision == "bf16"], explicit), precision
    assert runs[True].any()
