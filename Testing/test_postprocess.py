"""Post-processing (largest connected component per segment) on real label maps, and its selection on validation."""
import json

import numpy as np

from GMSSegmentLib.data import load_mask
from GMSSegmentLib.imageio import read_image
from GMSSegmentLib.postprocess import apply_postprocess, keep_largest_component


def test_largest_component_removes_a_stray_blob_and_keeps_the_lesion(busi_dir):
    name = json.loads((busi_dir / "split.json").read_text())["test"][0]
    gt = load_mask(busi_dir, name, (255,))  # 0/1, one lesion
    noisy = gt.copy()
    ys, xs = np.nonzero(gt == 0)
    far = np.argmax(np.abs(ys - np.nonzero(gt)[0].mean()) + np.abs(xs - np.nonzero(gt)[1].mean()))
    y, x = ys[far], xs[far]
    noisy[max(0, y - 2):y + 3, max(0, x - 2):x + 3] = 1  # a small blob far from the lesion
    assert (noisy != gt).sum() > 0
    cleaned = keep_largest_component(noisy, [1])
    np.testing.assert_array_equal(cleaned, gt)
    card2d = {"dimension": 2, "segments": [{"label": 1}], "postprocess": {"largest_component": True}}
    np.testing.assert_array_equal(apply_postprocess(noisy[None], card2d)[0], gt)
    np.testing.assert_array_equal(apply_postprocess(noisy[None], card2d, {})[0], noisy)  # explicitly off
    np.testing.assert_array_equal(apply_postprocess(noisy[None], {**card2d, "postprocess": None})[0], noisy)


def test_2d_model_treats_a_stack_slice_by_slice_3d_model_as_a_volume(hippo_dir):
    lab = read_image(hippo_dir / "labelsTr" / "hippocampus_025.nii.gz").array.astype(np.uint8)
    segs = [{"label": 1}, {"label": 2}]
    # the real 3D labels are unchanged in 3D when each label is one connected structure
    card3d = {"dimension": 3, "segments": segs, "postprocess": {"largest_component": True}}
    out3d = apply_postprocess(lab, card3d)
    for v in (1, 2):
        from scipy import ndimage
        n = ndimage.label(lab == v)[1]
        assert (n == 1) == np.array_equal(out3d == v, lab == v)
        assert (out3d == v).sum() <= (lab == v).sum() and (out3d == v).any()
    # a 2D model keeps one component per slice, so every slice that had a label keeps it
    card2d = {**card3d, "dimension": 2}
    out2d = apply_postprocess(lab, card2d)
    for v in (1, 2):
        had = (lab == v).reshape(len(lab), -1).any(1)
        has = (out2d == v).reshape(len(lab), -1).any(1)
        np.testing.assert_array_equal(had, has)
