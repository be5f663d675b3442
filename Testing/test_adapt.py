"""Adapting with a few cases is judged by cross-validation (adapt.py): the folds, the decision rule, and real
adaptations of kvasir-polyp to frames of another site (cvc-clinicdb-dev) that are adopted or refused."""
import json
import math

import pytest

from GMSSegmentLib import GMSError
from GMSSegmentLib.adapt import FEW_SHOT_MAX, FOLDS, Z, contiguous_folds, cv_folds, decide


def test_folds_are_runs_of_consecutive_cases():
    """Neighbouring video frames (near-duplicates) stay in one fold: cases in natural order, cut into runs."""
    ids = [str(1 + 6 * i) for i in range(20)]  # 1, 7, ..., 115
    folds = contiguous_folds(list(reversed(ids)), 5)
    assert folds == [ids[0:4], ids[4:8], ids[8:12], ids[12:16], ids[16:20]]
    assert contiguous_folds(["case10", "case2", "case1"], 2) == [["case1", "case2"], ["case10"]]
    assert contiguous_folds(["a", "b"], 5) == [["a"], ["b"]]  # never more folds than cases


def test_cross_validation_is_the_default_for_few_case_adaptation():
    assert cv_folds(None, 20, adapting=True, explicit_validation=False) == FOLDS
    assert cv_folds(None, 3, adapting=True, explicit_validation=False) == 3
    assert cv_folds(None, FEW_SHOT_MAX + 1, adapting=True, explicit_validation=False) == 0
    assert cv_folds(None, 20, adapting=True, explicit_validation=True) == 0  # --val-list / --max-val: carved
    assert cv_folds(None, 20, adapting=False, explicit_validation=False) == 0  # training from scratch
    assert cv_folds(0, 20, adapting=True, explicit_validation=False) == 0
    assert cv_folds(4, 100, adapting=True, explicit_validation=False) == 4
    for bad, message in ((1, "at least 2"), (-1, "at least 2"), (30, "more than the 20 cases")):
        with pytest.raises(GMSError, match=message):
            cv_folds(bad, 20, adapting=True, explicit_validation=False)


def test_decision_needs_a_gain_beyond_its_noise():
    before = {str(i): 0.80 for i in range(10)}
    clear = decide(before, {c: v + 0.05 + 0.01 * (int(c) % 3) for c, v in before.items()})
    assert clear.adopted and clear.gain == pytest.approx(0.059, abs=1e-9)  # 0.05 + 0.01 * mean(i % 3)
    nothing = decide(before, dict(before))
    assert not nothing.adopted and nothing.gain == 0 and nothing.se == 0
    worse = decide(before, {c: v - 0.02 for c, v in before.items()})
    assert not worse.adopted
    # a positive mean carried by two cases while the others get worse: within its noise, refused
    noisy = decide(before, {c: v + (0.30 if c in "01" else -0.04) for c, v in before.items()})
    assert noisy.gain > 0 and noisy.gain - Z * noisy.se < 0 and not noisy.adopted
    s = noisy.summary()
    assert (s["cases"], s["better"], s["worse"], s["adopted"]) == (10, 2, 8, False)
    assert s["before"] == 0.8 and s["after"] == pytest.approx(0.8 + noisy.gain, abs=1e-4)
    assert "does not reliably help" in noisy.sentence() and "no model is written" in noisy.sentence()
    assert "adapting helps" in clear.sentence()
    few = {str(i): 0.55 for i in range(5)}  # five cases, a large clear gain: too few to trust (one video's frames)
    five = decide(few, {c: v + 0.25 + 0.01 * int(c) for c, v in few.items()})
    assert five.gain - Z * five.se > 0 and not five.adopted and not five.summary()["adopted"]
    assert "too few cases" in five.sentence() and "at least 10" in five.sentence()
    one = decide({"a": 0.5}, {"a": 0.9})  # one case: no spread to judge by
    assert math.isinf(one.se) and not one.adopted and one.summary()["se"] is None
    with pytest.raises(ValueError):
        decide({"a": 0.5}, {"b": 0.5})


def _site(shared_dir, tmp_path, ids):
    """A site's corrected cases as a user's folder: cvc-clinicdb-dev frames ``ids`` only."""
    src = shared_dir / "data" / "cvc-clinicdb-dev"
    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()
    for i in ids:
        (site / "images" / f"{i}.jpg").write_bytes((src / "images" / f"{i}.jpg").read_bytes())
        (site / "masks" / f"{i}.png").write_bytes((src / "masks" / f"{i}.png").read_bytes())
    (site / "split.json").write_text(json.dumps({"train": [str(i) for i in ids]}))
    return site


def _events(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_adaptation_that_does_not_help_is_refused_and_writes_nothing(shared_dir, tmp_path):
    """Adapting that changes nothing (learning rate 0: every fold model is the starting model) gains exactly 0:
    refused, the user is told so, no model folder, exit 0 (nothing failed)."""
    from conftest import run_gms

    site = _site(shared_dir, tmp_path, [1, 7, 13, 19])
    out = tmp_path / "adapted"
    p = run_gms("--threads", "2", "train", site, "--init-from", "kvasir-polyp", "-o", out, "--lr", "0",
                "--epochs", "1", "--augment-copies", "1", "--cv-folds", "2", "--progress", "json", check=True)
    events = _events(p.stdout)
    estimate = next(e for e in events if e["event"] == "estimate")
    assert estimate["cases"] == 4 and estimate["folds"] == 2 and estimate["gain"] == 0 and not estimate["adopted"]
    assert estimate["before"] == estimate["after"] > 0.3  # the starting model, scored with its own options
    result = next(e for e in events if e["event"] == "result")
    assert result["adopted"] is False and result["path"] is None
    assert result["estimate"] == {k: v for k, v in estimate.items() if k != "event"}
    assert any("does not reliably help" in e.get("message", "") for e in events if e["event"] == "log")
    assert not out.exists()


def test_adaptation_that_helps_is_adopted_with_the_starting_models_options(shared_dir, tmp_path):
    """Ten frames of a video of another site on which the starting model is poor: every frame is scored by a model
    adapted on the other folds; the gain clears its noise, so the model adapted on all ten is saved with the starting
    model's segments, test-time options, post-processing and presence decision, and its card records the estimate."""
    from conftest import run_gms
    from GMSSegmentLib.modelpaths import resolve_model_path

    base = json.loads((resolve_model_path("kvasir-polyp") / "card.json").read_text())
    site = _site(shared_dir, tmp_path, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19])
    out = tmp_path / "adapted"
    p = run_gms("--threads", "2", "train", site, "--init-from", "kvasir-polyp", "-o", out, "--epochs", "3",
                "--augment-copies", "1", check=True)
    assert "cross-validated on 10 cases (5 folds)" in p.stdout and "adapting helps" in p.stdout, p.stdout
    card = json.loads((out / "card.json").read_text())
    est = card["training"]["adaptation"]
    assert est["adopted"] and est["after"] > est["before"] and est["gain"] - Z * est["se"] > 0
    assert card["metrics"]["adaptation"]["dice_before"] == est["before"]
    for key in ("segments", "tta", "postprocess", "input_size", "normalization"):
        assert card.get(key) == base.get(key), key
    assert card["training"]["init_from"]["name"] == "kvasir-polyp" and card["training"]["train_cases"] == 10
    assert card["name"] == "adapted"
