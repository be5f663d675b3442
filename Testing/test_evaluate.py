"""``gms evaluate`` on real cases: a table on stdout and a per-case CSV."""
import csv
import json

from conftest import run_gms


def test_evaluate_2d_writes_table_and_csv(tiny_model, busi_dir, tmp_path):
    out = tmp_path / "m.csv"
    p = run_gms("evaluate", busi_dir, "--model", tiny_model, "--cases", "benign_3", "malignant_3", "normal_7",
                "--csv", out, "--resolution", "model", check=True)
    assert "DSC" in p.stdout and "lesion" in p.stdout
    rows = list(csv.DictReader(open(out)))
    assert [r["case"] for r in rows] == ["benign_3", "malignant_3", "normal_7"]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["iou"]) <= float(r["dice"]) + 1e-9
    assert rows[2]["gt_empty"] == "1"  # normal images have empty masks


def test_evaluate_3d_per_label(tiny_model, hippo_dir, tmp_path):
    out = tmp_path / "h.csv"
    run_gms("evaluate", hippo_dir, "--model", tiny_model, "--cases", "hippocampus_025", "--csv", out, check=True)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 1 and rows[0]["label"] == "1"


def test_model_resolution_resize_keeps_an_8bit_photo_8bit(shared_dir):
    """Antialiased resizing overshoots 255 by a hair; the photo normalisation must not then read the image as 16-bit
    (which once darkened RGB inputs 257-fold at --resolution model)."""
    from GMSSegmentLib.data import find_image
    from GMSSegmentLib.evaluate import _resize_image
    from GMSSegmentLib.imageio import read_image
    from GMSSegmentLib.normalization import intensity_range

    root = shared_dir / "data" / "kvasir-seg"
    name = json.loads((root / "split.json").read_text())["val"][0]
    a = read_image(find_image(root, name)).array
    r = _resize_image(a, 224)
    assert r.shape == (1, 224, 224, 3) and r.min() >= a.min() and r.max() <= a.max()
    assert abs(float(r.mean()) - float(a.mean())) < 1.0
    assert intensity_range(r, {"mode": "photo"}) == (0.0, 255.0)
    assert intensity_range(r + 0.5, {"mode": "photo"}) == (0.0, 255.0)  # a resampling overshoot stays 8-bit
    assert intensity_range(r * 4, {"mode": "photo"}) == (0.0, 65535.0)  # a real 16-bit range does not


def test_evaluate_no_tta_no_postprocess_is_one_plain_pass(busi_dir, shared_dir, tmp_path):
    """``--no-tta --no-postprocess`` scores one plain pass (what ``gms segment --no-tta --no-postprocess`` writes), not
    the card's test-time augmentation; ``--record`` files it under its own key and leaves the card's figure alone."""
    import shutil

    import numpy as np
    from GMSSegmentLib.data import find_image, load_mask
    from GMSSegmentLib.imageio import read_image
    from GMSSegmentLib.model import load_model, resolve_model_path
    from GMSSegmentLib.pipeline import segment_array

    model = tmp_path / "busi-lesion"
    shutil.copytree(resolve_model_path("busi-lesion"), model)
    card = json.loads((model / "card.json").read_text())
    assert card["tta"]["scales"] != [card["input_size"]]  # the card's choice is not a plain pass
    cases = ["benign_3", "malignant_3", "benign_10"]
    scores = {}
    for flags in ((), ("--no-tta", "--no-postprocess")):
        out = tmp_path / f"e{len(flags)}.csv"
        run_gms("evaluate", busi_dir, "--model", model, "--cases", *cases, "--csv", out, "--record", *flags,
                check=True)
        scores[flags] = {r["case"]: float(r["dice"]) for r in csv.DictReader(open(out))}
    metrics = json.loads((model / "card.json").read_text())["metrics"]
    assert {"busi/given/native", "busi/given/native/no-tta/no-postprocess"} <= set(metrics)
    assert scores[()] != scores[("--no-tta", "--no-postprocess")]
    m = load_model(model, weights_dir=shared_dir / "models")
    for name in cases:
        pred = segment_array(m, read_image(find_image(busi_dir, name)).array, tta=1, postprocess={})[0] > 0
        gt = load_mask(busi_dir, name) > 0
        dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
        assert abs(dice - scores[("--no-tta", "--no-postprocess")][name]) < 1e-6, name


def test_option_choice_pays_for_a_costlier_option_only_when_its_gain_beats_the_noise():
    """The one-standard-error rule of ``gms postprocess``: options come cheapest first; a costlier option is chosen
    only when its mean gain over the cheaper one exceeds the paired standard error of the per-case differences."""
    import numpy as np
    import pytest

    from GMSSegmentLib import GMSError
    from GMSSegmentLib.evaluate import choose_option, select_postprocess

    cheap = [0.80, 0.70, 0.90, 0.60]
    noisy = [a + d for a, d in zip(cheap, [0.03, -0.02, 0.04, -0.03])]  # +0.005 on average, paired SE 0.017
    chosen, best, se = choose_option(["1 view", "4 views"], {"1 view": cheap, "4 views": noisy})
    assert best == "4 views" and chosen == "1 view"
    d = np.subtract(noisy, cheap)
    assert se["1 view"] == pytest.approx(d.std(ddof=1) / 2) and se["4 views"] == 0.0

    steady = [a + d for a, d in zip(cheap, [0.020, 0.021, 0.019, 0.020])]  # +0.02 on every case
    assert choose_option(["1 view", "4 views"], {"1 view": cheap, "4 views": steady})[0] == "4 views"
    # a tie goes to the cheaper option; with one case there is no error estimate and the best mean wins
    assert choose_option(["a", "b"], {"a": cheap, "b": list(cheap)})[:2] == ("a", "a")
    assert choose_option(["a", "b"], {"a": [0.5], "b": [0.5001]})[0] == "b"
    with pytest.raises(GMSError, match="unknown selection rule"):
        select_postprocess("busi-lesion", "/nonexistent", rule="max")
