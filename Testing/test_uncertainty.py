"""Where to look (uncertainty.py): the voxel map, the case and slice scores, their check against ground truth, the
temperature chosen on validation cases, and what the command line writes and reports."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from conftest import run_gms
from GMSSegmentLib import GMSError
from GMSSegmentLib.card import parse_card
from GMSSegmentLib.evaluate import evaluate
from GMSSegmentLib.model import resolve_model_path
from GMSSegmentLib.options import InferenceOptions
from GMSSegmentLib.uncertainty import (TEMPERATURES, PixelHistogram, SoftMasks, auroc, result_uncertainty,
                                       scores_from_sums)

BUSI_IMAGE = "malignant_3"
HIPPO_CASE = "hippocampus_025"


def _decoded(p: np.ndarray) -> torch.Tensor:
    """A decoded grey image (B, 3, H, W) whose channel mean is ``p`` (B, H, W)."""
    return torch.from_numpy(p.astype(np.float32))[:, None].expand(-1, 3, -1, -1)


def test_binary_map_and_scores_follow_the_decoded_soft_mask():
    """Exactly black/white decoded: nothing uncertain, score 0. A grey band at 0.5: uncertainty 1 there, and the
    estimated Dice is the soft Dice of the memberships against the labels."""
    codes = torch.ones(1, 3)
    p = np.zeros((2, 8, 8))
    p[0, 2:6, 2:6] = 1.0
    masks = SoftMasks(2, (8, 8), 1)
    masks.add([0, 1], _decoded(p), codes)
    labels = (p > 0.5).astype(np.uint8)
    res = result_uncertainty({"masks": masks, "labels": labels, "axis": 0, "reo": None}, 1.0)
    assert res.map.shape == (2, 8, 8) and res.map.max() == 0.0
    assert res.score == 0.0 and list(res.slices) == [0.0, 0.0]  # slice 1: nothing there, nothing hesitated over

    p[0, 2:6, 6] = 0.5  # a band the model hesitated over, not in the result
    masks.add([0, 1], _decoded(p), codes)
    res = result_uncertainty({"masks": masks, "labels": labels, "axis": 0, "reo": None}, 1.0)
    band = res.map[0, 2:6, 6]
    assert np.allclose(band, 1.0, atol=0.01) and res.map[0, 0, 0] == 0.0
    m = masks.q[0, 0].astype(float) / 255
    expected = 1 - 2 * (m * labels[0]).sum() / (m.sum() + labels[0].sum())
    assert res.score == pytest.approx(expected, abs=1e-6) and res.score > 0.05
    assert res.slices[0] == pytest.approx(res.score) and res.slices[1] == 0.0


def test_temperature_sharpens_the_score_not_the_map():
    """The map is the decoded image's own distance to the decision; a temperature below 1 sharpens the memberships
    the estimated Dice is taken from, so the faint fringe around a result stops counting against it."""
    codes = torch.ones(1, 3)
    p = np.zeros((1, 16, 16))
    p[0, 4:12, 4:12] = 0.95
    p[0, 2:14, 2:14] += 0.04  # a faint fringe
    masks = SoftMasks(1, (16, 16), 1)
    masks.add([0], _decoded(p), codes)
    soft = {"masks": masks, "labels": (p > 0.5).astype(np.uint8), "axis": 0, "reo": None}
    warm, cold = result_uncertainty(soft, 1.0), result_uncertainty(soft, 0.2)
    assert np.array_equal(warm.map, cold.map)
    assert cold.score < warm.score / 3


def test_several_segments_use_the_distance_to_each_code_colour():
    """Two codes: a pixel exactly on a code is sure, one half way between two codes is on the boundary."""
    codes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    dec = torch.zeros(1, 3, 4, 4)
    dec[0, 0, 0, 0] = 1.0  # code 1
    dec[0, :, 1, 1] = torch.tensor([0.5, 0.5, 0.0])  # between codes 1 and 2
    masks = SoftMasks(1, (4, 4), 2)
    masks.add([0], dec, codes)
    u = masks.uncertainty_map()[0]
    assert u[0, 0] < 0.01 and u[3, 3] < 0.01 and u[1, 1] > 0.95


def test_auroc_matches_the_pairwise_definition_and_the_histogram():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(300), 2)  # ties
    pos = rng.random(300) < s
    pairs = [(a > b) + 0.5 * (a == b) for a in s[pos] for b in s[~pos]]
    assert auroc(s, pos) == pytest.approx(np.mean(pairs), abs=1e-12)
    h = PixelHistogram(bins=100)
    h.add(s, pos)
    binned = np.minimum((s.astype(np.float32) * 100).astype(int), 99)  # the bins the histogram counts in
    assert h.auroc() == pytest.approx(auroc(binned, pos), abs=1e-12)
    assert np.isnan(auroc(s, np.zeros(300, bool)))
    assert scores_from_sums(np.zeros((3, 1, 3))).tolist() == [0.0, 0.0, 0.0]


def test_evaluation_ranks_wrong_voxels_and_writes_the_case_score(busi_dir, tmp_path, capsys):
    """On real BUSI images the uncertainty ranks the wrong voxels well above the right ones, and every CSV row has the
    case's score."""
    out = tmp_path / "cases.csv"
    cases = ["malignant_3", "benign_102", "malignant_81", "benign_210"]
    evaluate("busi-lesion", busi_dir, InferenceOptions.plain(), cases=cases, csv_path=out)
    text = capsys.readouterr().out
    assert "voxel AUROC for wrong voxels" in text and "case reliability" in text
    auc = float(text.split("voxel AUROC for wrong voxels ")[1].split(";")[0])
    assert auc > 0.85
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 and all(0.0 <= float(r["uncertainty"]) <= 1.0 for r in rows)


def test_card_temperature_is_checked_on_load():
    card = json.loads((resolve_model_path("busi-lesion") / "card.json").read_text())
    card["uncertainty"] = {"temperature": 0}
    with pytest.raises(GMSError, match="'uncertainty.temperature' must be a number from 0.01 to 10, got 0"):
        parse_card(card)


def test_temperature_is_chosen_on_validation_cases(tiny_model, busi_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    p = run_gms("uncertainty", busi_dir, "--model", model, "--progress", "none")
    assert p.returncode == 0, p.stderr
    unc = json.loads((model / "card.json").read_text())["uncertainty"]
    assert unc["temperature"] in TEMPERATURES and unc["selected_on"] == "6 validation cases"
    rows = {float(t): row for t, row in unc["validation"].items()}
    assert len(rows) == len(TEMPERATURES)
    chosen = rows[unc["temperature"]]
    if chosen["case_auroc"] is not None:  # the best ranking of the validation cases that went wrong
        assert chosen["case_auroc"] >= max(r["case_auroc"] for r in rows.values()) - 0.001
    else:  # none went wrong: the closest estimate
        assert chosen["mean_squared_error"] == min(r["mean_squared_error"] for r in rows.values())


def test_segment_writes_a_png_map_and_reports_the_score(busi_dir, tmp_path):
    image = next((busi_dir / "images").glob(f"{BUSI_IMAGE}.*"))
    p = run_gms("segment", image, "-o", tmp_path / "m.png", "--uncertainty", tmp_path / "u.png", "--no-tta",
                "--progress", "json")
    assert p.returncode == 0, p.stderr
    result = [json.loads(x) for x in p.stdout.splitlines() if '"result"' in x][0]
    assert 0.0 <= result["uncertainty"] <= 1.0 and result["uncertainty_path"] == str(tmp_path / "u.png")
    umap = np.asarray(Image.open(tmp_path / "u.png"))
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert umap.dtype == np.uint8 and umap.shape == mask.shape
    # the boundary of the lesion is where the model hesitates: more uncertain than the image's far background
    edge = (mask > 0) ^ np.roll(mask > 0, 3, axis=0)
    assert umap[edge].mean() > 5 * max(umap[:20, :20].mean(), 1.0)


def test_segment_volume_map_has_the_input_geometry_and_slice_scores(hippo_dir, tmp_path):
    src = hippo_dir / "imagesTr" / f"{HIPPO_CASE}.nii.gz"
    p = run_gms("segment", src, "-o", tmp_path / "m.nii.gz", "--uncertainty", tmp_path / "u.nrrd", "--model",
                "hippocampus", "--progress", "json")
    assert p.returncode == 0, p.stderr
    result = [json.loads(x) for x in p.stdout.splitlines() if '"result"' in x][0]
    img, umap = sitk.ReadImage(str(src)), sitk.ReadImage(str(tmp_path / "u.nrrd"))
    assert umap.GetSize() == img.GetSize() and umap.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(umap.GetOrigin(), img.GetOrigin()) and np.allclose(umap.GetSpacing(), img.GetSpacing())
    arr = sitk.GetArrayFromImage(umap)
    assert 0.0 <= arr.min() and arr.max() <= 1.0 and arr.max() > 0.5
    per = result["slice_uncertainty"]
    assert len(per["scores"]) == img.GetSize()[2 - per["axis"]]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.nii.gz")))
    # slices without any label and without hesitation score 0; the most uncertain slice holds some uncertainty
    worst = int(np.argmax(per["scores"]))
    assert np.take(arr, worst, axis=per["axis"]).max() > 0.3
    assert labels.any()


def test_several_inputs_write_maps_named_as_their_masks_and_bad_map_outputs_fail_cleanly(busi_dir, tmp_path):
    images = [next((busi_dir / "images").glob(f"{n}.*")) for n in ("malignant_3", "benign_102")]
    out, unc = tmp_path / "out", tmp_path / "unc"
    out.mkdir()
    unc.mkdir()
    p = run_gms("segment", *images, "-o", out, "--uncertainty", unc, "--no-tta", "--progress", "none")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in unc.iterdir()) == sorted(f.name for f in out.iterdir())
    assert p.stdout.count("uncertainty ") == 2
    # a map that exists is not replaced, and its mask is not written either
    before = (unc / "malignant_3_gms.png").read_bytes()
    p = run_gms("segment", images[0], "-o", tmp_path / "x.png", "--uncertainty", unc / "malignant_3_gms.png",
                "--no-tta", "--progress", "none")
    assert p.returncode == 2 and p.stderr.count("gms: error:") == 1 and "exists" in p.stderr
    assert not (tmp_path / "x.png").exists() and (unc / "malignant_3_gms.png").read_bytes() == before
    # a Slicer segmentation holds labels, not a map; a folder of maps is needed for several inputs
    p = run_gms("segment", images[0], "-o", tmp_path / "y.png", "--uncertainty", tmp_path / "u.seg.nrrd",
                "--progress", "none")
    assert p.returncode == 2 and ".seg.nrrd holds labels" in p.stderr and not (tmp_path / "y.png").exists()
    p = run_gms("segment", *images, "-o", out, "--uncertainty", tmp_path / "nofolder", "--overwrite",
                "--progress", "none")
    assert p.returncode == 2 and "--uncertainty must be an existing folder" in p.stderr
