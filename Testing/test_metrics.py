"""Dice, IoU and HD95 (GMSSegmentLib.metrics) on hand-computable arrays, properties, and a brute-force reference."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from GMSSegmentLib.metrics import dice, hd95, iou, label_metrics, surface_distances

REPO = Path(__file__).resolve().parents[1]


def test_dice_iou_by_hand():
    pred = np.zeros((4, 5), bool)
    gt = np.zeros((4, 5), bool)
    pred[0, 0:4] = True  # 4 pixels
    gt[0, 1:4] = True  # 3 in common
    gt[1, 1:4] = True  # 6 pixels
    assert dice(pred, gt) == pytest.approx(2 * 3 / (4 + 6))
    assert iou(pred, gt) == pytest.approx(3 / 7)
    assert dice(pred, ~pred) == 0.0 and iou(pred, ~pred) == 0.0
    # 0/1 integer arrays are accepted
    assert dice(pred.astype(np.uint8), gt.astype(np.int32)) == pytest.approx(0.6)


def test_hd95_by_hand():
    a = np.zeros((5, 6), bool)
    b = np.zeros((5, 6), bool)
    a[0, 0] = True
    b[3, 4] = True
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(math.hypot(3 * 2.0, 4 * 1.0))  # spacing in array order
    assert hd95(a, b, spacing=0.5) == pytest.approx(2.5)
    # two points vs one: distances pred->gt {0, 4}, gt->pred {0}: pooled [0, 0, 4] -> 95th percentile 3.6
    c = a.copy()
    c[0, 4] = True
    d = np.zeros_like(a)
    d[0, 0] = True
    assert hd95(c, d) == pytest.approx(np.percentile([0.0, 0.0, 4.0], 95))


def test_empty_conventions():
    empty = np.zeros((3, 4, 5), bool)
    full = empty.copy()
    full[1, 1:3, 1:4] = True
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    for p, g in ((empty, full), (full, empty)):
        assert dice(p, g) == 0.0 and iou(p, g) == 0.0 and math.isnan(hd95(p, g, (1.0, 2.0, 3.0)))
    assert surface_distances(empty, full) is None


def test_shape_and_spacing_checks():
    with pytest.raises(ValueError):
        dice(np.zeros((3, 4), bool), np.zeros((4, 3), bool))
    with pytest.raises(ValueError):
        hd95(np.ones((3, 4), bool), np.ones((3, 4), bool), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        hd95(np.ones((3, 4), bool), np.ones((3, 4), bool), spacing=(1.0, 0.0))


def _random_blob(shape, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=2.0)
    return noise > np.percentile(noise, 70)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_with_itself(seed):
    m = _random_blob((12, 20, 18), seed)
    assert dice(m, m) == 1.0 and iou(m, m) == 1.0 and hd95(m, m, (2.0, 0.5, 0.7)) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_hd95_of_shifted_sheet_is_shift_times_spacing(axis, k):
    # a one-voxel-thick sheet spanning the other axes: every surface voxel moves by exactly k * spacing
    spacing = (2.5, 0.8, 1.3)
    shape = (10, 12, 14)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    idx_a = [slice(None)] * 3
    idx_b = [slice(None)] * 3
    idx_a[axis], idx_b[axis] = 2, 2 + k
    a[tuple(idx_a)] = True
    b[tuple(idx_b)] = True
    assert hd95(a, b, spacing) == pytest.approx(k * spacing[axis])
    assert hd95(b, a, spacing) == pytest.approx(k * spacing[axis])


def test_hd95_shifted_blob_bounded_and_symmetric():
    m = _random_blob((16, 24, 24), 5)
    shifted = np.roll(m, 3, axis=2)
    shifted[:, :, :3] = False
    sp = (2.0, 1.0, 0.75)
    h = hd95(m, shifted, sp)
    assert 0.0 < h <= 3 * 0.75 + 1e-9 + 2 * 1.0  # roughly bounded by the shift (plus clipping at the border)
    assert h == pytest.approx(hd95(shifted, m, sp))


def _brute_force_hd95(p, g, spacing):
    def surface(m):
        return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(m.ndim, 1), border_value=0)

    sp = np.asarray(spacing)
    ps = np.argwhere(surface(p)) * sp
    gs = np.argwhere(surface(g)) * sp
    dist = cdist(ps, gs)
    return float(np.percentile(np.concatenate([dist.min(axis=1), dist.min(axis=0)]), 95))


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (8, 14, 13)
    p = _random_blob(shape, 100 + seed)
    g = _random_blob(shape, 200 + seed)
    spacing = tuple(rng.uniform(0.3, 3.0, 3))
    assert hd95(p, g, spacing) == pytest.approx(_brute_force_hd95(p, g, spacing), rel=1e-9)
    # a blob touching the array border: the border counts as surface, and cropping must not change that
    q = np.zeros(shape, bool)
    q[:, :4, :] = True
    assert hd95(q, g, spacing) == pytest.approx(_brute_force_hd95(q, g, spacing), rel=1e-9)


def test_singleton_axis_is_measured_in_2d():
    p = _random_blob((20, 24), 7)
    g = _random_blob((20, 24), 8)
    h2 = hd95(p, g, (0.5, 0.8))
    assert h2 == pytest.approx(_brute_force_hd95(p, g, (0.5, 0.8)))
    assert hd95(p[None], g[None], (1.0, 0.5, 0.8)) == pytest.approx(h2)


def test_label_metrics():
    gt = np.zeros((1, 6, 6), np.uint8)
    pred = np.zeros_like(gt)
    gt[0, 0:2, 0:2] = 1
    pred[0, 0:2, 0:2] = 1
    gt[0, 4:6, 4:6] = 2
    pred[0, 4:6, 3:5] = 2  # half overlap
    pred[0, 3, 0] = 3  # label 3 only in pred
    out = label_metrics(pred, gt, [1, 2, 3, 4], spacing=(1.0, 1.0, 2.0))
    assert set(out) == {1, 2, 3, 4}
    assert out[1] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}
    assert out[2]["dice"] == pytest.approx(0.5) and out[2]["iou"] == pytest.approx(2 / 6)
    assert out[2]["hd95"] == pytest.approx(2.0)  # one column apart, x spacing 2
    assert out[3]["dice"] == 0.0 and math.isnan(out[3]["hd95"])
    assert out[4] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}


def test_on_hippocampus_labels():
    data = Path(os.environ.get("GMS_SHARED", REPO.parent / "shared")) / "data" / "hippocampus" / "labelsTr"
    files = sorted(data.glob("*.nii.gz"))[:2]
    if len(files) < 2:
        pytest.fail(f"shared hippocampus labels not found in {data} (set GMS_SHARED)")
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0])))
    b = np.roll(a, 2, axis=1)
    out = label_metrics(b, a, [1, 2], spacing=(1.0, 1.0, 1.0))
    for lab in (1, 2):
        m = out[lab]
        assert 0.0 < m["dice"] < 1.0 and 0.0 < m["iou"] < m["dice"]
        assert 0.0 < m["hd95"] <= 2.0 + 1e-9
        assert m["iou"] == pytest.approx(m["dice"] / (2 - m["dice"]))  # IoU = D / (2 - D)
