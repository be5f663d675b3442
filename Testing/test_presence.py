"""The presence decision ("nothing here"): scores from the decoded mask, the rule applied in the one slice loop, its
choice on validation cases, training with lesion-free cases, and what the command line and evaluation report."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_gms
from GMSSegmentLib import GMSError
from GMSSegmentLib.card import parse_card
from GMSSegmentLib.data import load_2d, read_split, split_names
from GMSSegmentLib.evaluate import evaluate
from GMSSegmentLib.model import load_model, resolve_model_path
from GMSSegmentLib.options import InferenceOptions
from GMSSegmentLib.pipeline import SliceSegmenter, classify, segment_array
from GMSSegmentLib.presence import CaseRecord, PresenceRule, choose_rule, slice_scores
from GMSSegmentLib.trainsegments import check_negatives


@pytest.fixture(scope="module")
def busi_model():
    return load_model(resolve_model_path("busi-lesion"))


def test_scores_describe_the_region_the_gms_rule_draws(busi_model, busi_dir):
    """Area = the fraction of the slice the 0.5 rule gives the lesion at the model's size; confidence = the mean soft
    value there (between 0.5 and 1); an image with no region scores 0/0."""
    seg = SliceSegmenter(busi_model, tta=1)
    img = load_2d(busi_dir, "malignant_3").image
    with torch.inference_mode():
        dec = seg.decode_slices(np.stack([img, np.zeros_like(img)]))
    area, conf = slice_scores(dec, seg.codes)
    size = busi_model.input_size
    region = classify(dec, seg.codes, (size, size)).numpy()
    assert area.shape == conf.shape == (2, 1)
    assert area[0, 0] == pytest.approx((region[0] == 1).mean(), abs=1e-6) and area[0, 0] > 0.01
    assert 0.5 < conf[0, 0] <= 1.0
    if not region[1].any():
        assert area[1, 0] == 0 and conf[1, 0] == 0


def test_rule_clears_only_what_it_decides_absent_in_the_slice_loop(busi_model, busi_dir):
    """The rule runs inside segment_array: a setting no lesion passes clears the mask, the card's setting (none here)
    and --no-presence leave it as it was."""
    from GMSSegmentLib.imageio import read_image
    from GMSSegmentLib.data import find_image

    arr = read_image(find_image(busi_dir, "malignant_3")).array
    plain = InferenceOptions.plain()
    base = segment_array(busi_model, arr, plain)
    assert base.any()
    assert not segment_array(busi_model, arr, plain, presence=PresenceRule(min_area=0.99)).any()
    assert np.array_equal(segment_array(busi_model, arr, plain, presence=PresenceRule(min_area=1e-4)), base)
    assert np.array_equal(segment_array(busi_model, arr, plain, presence=False), base)


def _record(name, area, conf, inter, pred, gt):
    a = lambda v: np.asarray(v, dtype=float)  # noqa: E731
    return CaseRecord(name, a(area), a(conf), a(inter), a(pred), a(gt))


def test_choice_empties_negatives_within_the_dice_cost():
    """With lesion-free cases the setting that empties most of them within the Dice cost wins; a setting that
    would cost the lesion cases more is never taken, and cost 0 keeps every lesion case's prediction."""
    positives = [_record(f"p{i}", [0.05], [0.95], [80], [100], [100]) for i in range(9)]
    positives.append(_record("small", [0.004], [0.93], [30], [40], [40]))  # a small, real lesion
    # lesion-free images where the model draws a large region (area cannot tell them apart), mostly less sure of it
    negatives = [_record(f"n{i}", [0.06], [c], [0], [60], [0]) for i, c in enumerate((0.70, 0.80, 0.85, 0.9, 0.96))]
    free = choose_rule(positives + negatives, max_dice_cost=0.2)
    strict = choose_rule(positives + negatives, max_dice_cost=0.0)
    assert free.negatives == 5 and free.negatives_empty_before == 0
    assert free.negatives_empty_after == 4 and free.rule.min_confidence > 0.9  # all but the surest negative
    assert strict.dice_after >= strict.dice_before - 1e-12 and strict.positives_lost == 0
    assert strict.rule.min_confidence <= 0.93 and strict.rule.min_area <= 0.004
    assert strict.negatives_empty_after == 4
    for cal in (free, strict):
        assert cal.dice_before - cal.dice_after <= (0.2 if cal is free else 0.0) + 1e-9


def test_choice_without_negatives_is_the_strictest_within_the_cost():
    positives = [_record(f"p{i}", [0.05 + 0.01 * i], [0.9 + 0.005 * i], [80], [100], [100]) for i in range(10)]
    cal = choose_rule(positives, max_dice_cost=0.005)
    assert cal.negatives == 0 and cal.positives_lost == 0 and cal.dice_after == cal.dice_before
    assert cal.rule.min_area == pytest.approx(0.05) and cal.rule.min_confidence == pytest.approx(0.9)


def test_negatives_join_training_and_validation_without_moving_the_lesion_split(busi_dir):
    split = read_split(busi_dir)
    train, val = split_names(busi_dir)
    train_n, val_n = split_names(busi_dir, negative_list="normal_train")
    negatives = set(split["normal_train"])
    assert [n for n in train_n if n not in negatives] == train and [n for n in val_n if n not in negatives] == val
    assert set(train_n) | set(val_n) >= negatives and not set(train_n) & set(val_n)
    assert len(negatives & set(val_n)) == round(0.1 * len(negatives))
    assert not negatives & set(split["normal_test"])


def test_a_negative_list_holding_a_lesion_is_refused(busi_dir):
    check_negatives(busi_dir, "2d", "normal_train", read_split(busi_dir)["normal_train"][:5])
    with pytest.raises(GMSError, match="'benign_1' of the list 'mixed'.*mask values \\[255\\]"):
        check_negatives(busi_dir, "2d", "mixed", ["normal_1", "benign_1"])


def test_card_presence_is_checked_on_load(busi_model):
    card = busi_model.card.to_dict()
    card["presence"] = {"min_area": 2, "min_confidence": 0.9}
    with pytest.raises(GMSError, match="'presence.min_area' must be a number from 0 to 1, got 2"):
        parse_card(card)


def test_command_line_says_no_lesion_found_and_writes_an_empty_mask(tmp_path, busi_dir):
    """A model whose presence decision clears the lesion: the result line says so and the mask is empty; with
    --no-presence the lesion is drawn."""
    model = tmp_path / "strict"
    shutil.copytree(resolve_model_path("busi-lesion"), model)
    card = json.loads((model / "card.json").read_text())
    card["presence"] = {"min_area": 0.9, "min_confidence": 0.0}
    (model / "card.json").write_text(json.dumps(card))
    image = next((busi_dir / "images").glob("malignant_3.*"))
    p = run_gms("segment", image, "-o", tmp_path / "a.png", "--model", model, "--no-tta", "--progress", "none")
    assert p.returncode == 0, p.stderr
    assert "no lesion found" in p.stdout
    from PIL import Image
    assert not np.asarray(Image.open(tmp_path / "a.png")).any()
    p = run_gms("segment", image, "-o", tmp_path / "b.png", "--model", model, "--no-tta", "--no-presence",
                "--progress", "none")
    assert p.returncode == 0, p.stderr
    assert "no lesion found" not in p.stdout and "lesion" in p.stdout
    assert np.asarray(Image.open(tmp_path / "b.png")).any()


def test_evaluation_reports_sensitivity_and_specificity(busi_dir):
    summary = evaluate("busi-lesion", busi_dir, InferenceOptions.plain(), cases=["normal_94", "malignant_3"],
                       resolution="model")
    s = summary["lesion"]
    assert (s["cases_with"], s["cases_without"]) == (1, 1)
    assert s["found"] == 1 and s["sensitivity"] == 1.0
    assert s["predicted_empty"] == s["pred_empty"] and s["specificity"] == float(s["pred_empty"])


def test_bundled_presence_decisions_say_what_was_measured():
    """Every bundled model's presence decision was chosen on its validation cases within its Dice cost, and its card
    says in words what that rests on: without lesion-free validation cases, plainly that how often it empties such a
    case was not measured."""
    from GMSSegmentLib.card import load_card
    from GMSSegmentLib.presencecal import measured_note

    found = 0
    for name in ("busi-lesion", "kvasir-polyp", "hippocampus"):
        card = load_card(resolve_model_path(name) / "card.json")
        p = card.presence
        if not p:
            continue
        found += 1
        v = p["validation"]
        assert v["dice_before"] - v["dice_after"] <= p["max_dice_cost"] + 1e-4, name
        assert p["measured"] == measured_note(v, p["max_dice_cost"]), name
        assert ("NOT measured" in p["measured"]) == (v["negatives"] == 0), name
        assert PresenceRule.from_card(p).active and p["command"].startswith("gms ") and name in p["command"]
    assert found >= 2
