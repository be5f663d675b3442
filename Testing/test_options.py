"""Options as objects (options.py): the command line builds them in one step and they mean what the separate
arguments meant (the same segmenter, the same labels)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from GMSSegmentLib.cli import build_parser
from GMSSegmentLib.options import InferenceOptions, TrainConfig
from GMSSegmentLib.train import TrainConfig as TrainConfigFromTrain


@pytest.fixture(scope="module")
def model(tiny_model):
    from GMSSegmentLib.model import load_model

    return load_model(tiny_model)


def test_train_config_from_the_command_line_defaults_is_the_dataclass_default():
    args = build_parser().parse_args(["train", "DATA", "-o", "OUT"])
    assert TrainConfig.from_args(args) == TrainConfig(data="DATA", output="OUT")
    assert TrainConfigFromTrain is TrainConfig  # train.py re-exports it


def test_train_config_takes_every_field_from_the_command_line():
    """Every field has an option (of its own name, or one of the few spelled differently), and each option's value
    arrives: a non-default value for every field comes through."""
    argv = ["train", "D", "-o", "O", "--name", "n", "--segments", "a", "b", "--label-values", "3", "7",
            "--input-size", "256", "--axis", "2", "--normalization", '{"mode": "percentile", "low": 1, "high": 99}',
            "--foundation", '{"name": "diffusers-kl", "path": "p"}', "--weights-dir", "W", "--train-list", "tr",
            "--val-list", "va", "--val-fraction", "0.2", "--negatives", "ne", "--max-train", "5", "--max-val", "3",
            "--augment-copies", "2",
            "--epochs", "7", "--max-minutes", "1.5", "--batch-size", "4", "--lr", "0.001", "--min-lr", "0.25",
            "--weight-decay", "0.02", "--warmup-epochs", "1", "--dice-samples", "0", "--dice-heads", "3",
            "--latent-noise", "0.1", "--no-postprocess-select", "--precision", "fp32", "--ema", "0.99", "--compile",
            "--seed", "3", "--split-seed", "4", "--val-every", "2", "--keep-every", "5", "--cache-dir", "C",
            "--work-dir", "WD", "--no-resume", "--licence", "L", "--citation", "Ci", "--description", "De",
            "--init-from", "busi-lesion", "--cv-folds", "3"]
    cfg = TrainConfig.from_args(build_parser().parse_args(argv))
    default = TrainConfig(data="x", output="y")
    same = [f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) == getattr(default, f.name)]
    assert same == [], f"fields not set from the command line: {same}"
    assert cfg.normalization == {"mode": "percentile", "low": 1, "high": 99}
    assert cfg.foundation == {"name": "diffusers-kl", "path": "p"}
    assert cfg.resume is False and cfg.select_postprocess is False
    assert cfg.segments == ["a", "b"] and cfg.label_values == [3, 7]
    named = build_parser().parse_args(["train", "D", "-o", "O", "--foundation", "taef2"])
    assert TrainConfig.from_args(named).foundation == {"name": "taef2"}


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_inference_options_from_the_command_line(command):
    first = ["segment", "in.png"] if command == "segment" else ["evaluate", "DATA"]
    p = build_parser()
    assert InferenceOptions.from_args(p.parse_args(first)) == InferenceOptions()
    o = InferenceOptions.from_args(p.parse_args(first + ["--batch-size", "3", "--no-tta", "--no-postprocess",
                                                         "--no-fast", "--precision", "fp32"]))
    assert (o.batch_size, o.tta, o.postprocess, o.fast, o.precision) == (3, 1, {}, False, "fp32")
    assert o == InferenceOptions.plain(batch_size=3, fast=False, precision="fp32")
    if command == "segment":
        assert InferenceOptions.from_args(p.parse_args(first + ["--axis", "2"])).axis == 2


def test_options_change_single_fields_and_refuse_unknown_ones(model):
    from GMSSegmentLib.pipeline import segment_array

    img = np.zeros((1, 40, 48), np.float32)
    img[0, 10:30, 12:36] = 200.0
    with pytest.raises(TypeError):
        segment_array(model, img, postprocessing={})  # a misspelt option is an error, not ignored
    with pytest.raises(TypeError):
        InferenceOptions(views=2)


def test_segment_array_options_mean_what_the_keywords_meant(model, busi_dir):
    """segment_array with an options object equals the same options given as keywords, and the segmenter made for
    the options equals the one made from separate arguments."""
    from GMSSegmentLib.data import find_image
    from GMSSegmentLib.imageio import read_image
    from GMSSegmentLib.pipeline import FastDecodeSettings, SliceSegmenter, segment_array, segmenter_for

    img = read_image(find_image(busi_dir, "benign_3")).array
    opts = InferenceOptions(tta=2, postprocess={}, batch_size=2, scales=(model.input_size,))
    a = segment_array(model, img, opts)
    b = segment_array(model, img, tta=2, postprocess={}, batch_size=2, scales=(model.input_size,))
    c = segment_array(model, img, segmenter=SliceSegmenter(model, "cpu", True, tta=2), postprocess={})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    seg = segmenter_for(model, InferenceOptions(tta=4, precision="fp32", fast=FastDecodeSettings(tau=0.5)))
    assert (seg.tta, seg.precision, seg.fast.tau, seg.scales) == (4, "fp32", 0.5, [model.input_size])
    plain = segmenter_for(model, InferenceOptions.plain(fast=False))
    assert (plain.tta, plain.fast.enabled, plain.scales) == (1, False, [model.input_size])


def test_evaluate_names_its_options_as_before():
    from GMSSegmentLib.evaluate import _options_name

    assert _options_name(InferenceOptions()) == ""
    assert _options_name(InferenceOptions(tta=1)) == "/no-tta"
    assert _options_name(InferenceOptions(postprocess={})) == "/no-postprocess"
    assert _options_name(InferenceOptions.plain()) == "/no-tta/no-postprocess"
    assert _options_name(InferenceOptions(tta=4, scales=(224, 256))) == "/4_views_224_256"
    assert _options_name(InferenceOptions(postprocess={"largest_component": True})) == (
        "/postprocess=" + json.dumps({"largest_component": True}, separators=(",", ":")))
