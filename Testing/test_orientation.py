"""Volume orientation: a 3D model's card records its training volumes' orientation and inference brings every input
volume into it (exact axis permutation/flip, labels mapped back onto the input's grid). Checked against SimpleITK's own
geometry for all 48 axis orders and flips, end to end with the bundled hippocampus model on a real MRI volume, and
through ``gms train``."""
import itertools
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import MODULE_DIR, run_gms
from GMSSegmentLib import GMSError
from GMSSegmentLib.metrics import dice
from GMSSegmentLib.orientation import check_code, orientation_code, reorientation, to_model_orientation

CASE = "hippocampus_025"  # a case of the evaluation (val) list, never trained on
TRANSFORMS = [(order, flips) for order in itertools.permutations(range(3))
              for flips in itertools.product([False, True], repeat=3)]


def _transformed(img: sitk.Image, order, flips) -> sitk.Image:
    """The same physical image stored with another axis order and direction (SimpleITK adjusts the geometry)."""
    return sitk.Flip(sitk.PermuteAxes(img, list(order)), list(flips))


def test_codes_and_reorientation_agree_with_simpleitk_geometry(hippo_dir):
    img = sitk.ReadImage(str(hippo_dir / "imagesTr" / f"{CASE}.nii.gz"))
    ref = sitk.GetArrayFromImage(img)
    assert orientation_code((1, 0, 0, 0, 1, 0, 0, 0, 1)) == "LPS"  # the identity direction
    stored = orientation_code(img.GetDirection())
    assert stored == "RAS"  # MSD's NIfTI files: i toward the right, j anterior, k superior
    codes = set()
    for order, flips in TRANSFORMS:
        moved = _transformed(img, order, flips)
        arr = sitk.GetArrayFromImage(moved)
        code = orientation_code(moved.GetDirection())
        codes.add(code)
        r = reorientation(code, stored)
        np.testing.assert_array_equal(r.apply(arr), ref)  # back to the stored orientation, voxel for voxel
        np.testing.assert_array_equal(r.undo(ref), arr)  # and labels map back onto the moved grid
        assert r.spacing(tuple(reversed(moved.GetSpacing()))) == tuple(reversed(img.GetSpacing()))
        assert r.identity == (order == (0, 1, 2) and not any(flips))
    assert len(codes) == 48  # every axis order and direction has its own code


def test_rgb_volumes_keep_their_channel_axis():
    arr = np.arange(2 * 3 * 4 * 3).reshape(2, 3, 4, 3)
    r = reorientation("SAR", "LPS")
    assert r.apply(arr).shape == (4, 3, 2, 3)  # target i <- source k, j <- j, k <- i (numpy order: k, j, i)
    np.testing.assert_array_equal(r.undo(r.apply(arr)), arr)


def test_bad_and_oblique_orientations():
    for bad in ("LPX", "LLS", "LP", "lpsr"):
        with pytest.raises(GMSError, match="orientation code"):
            check_code(bad)
    assert check_code("lps") == "LPS"
    # a rotation whose j and k axes both lie closest to the patient's z axis
    oblique = (-0.461, 0.572, -0.679, -0.847, -0.513, 0.143, -0.267, 0.641, 0.72)
    assert orientation_code(oblique) is None
    card = {"orientation": "LPS"}
    assert to_model_orientation(card, oblique, (30, 40, 50)) is None  # used as stored
    flipped = (-1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert to_model_orientation(card, flipped, (30, 40, 50)).flips == (False, False, True)
    assert to_model_orientation(card, flipped, (1, 40, 50)) is None  # a single slice is sliced as stored
    assert to_model_orientation({}, flipped, (30, 40, 50)) is None  # 2D models record none


def test_bundled_hippocampus_segments_any_stored_orientation_alike(hippo_dir, tmp_path):
    """The same MRI stored transposed and flipped gets the same labels (on its own grid) as the original; without the
    card's orientation the model sees sideways slices and fails."""
    model = MODULE_DIR / "Resources" / "Models" / "hippocampus"
    assert json.loads((model / "card.json").read_text())["orientation"] == "RAS"  # as its training volumes
    img = sitk.ReadImage(str(hippo_dir / "imagesTr" / f"{CASE}.nii.gz"))
    gt = sitk.ReadImage(str(hippo_dir / "labelsTr" / f"{CASE}.nii.gz"))
    order, flips = (2, 0, 1), (True, False, True)
    moved = tmp_path / "moved.nii.gz"
    sitk.WriteImage(_transformed(img, order, flips), str(moved))
    blind = tmp_path / "blind"
    shutil.copytree(model, blind)
    card = json.loads((blind / "card.json").read_text())
    del card["orientation"]
    (blind / "card.json").write_text(json.dumps(card))

    outs, said = {}, {}
    for name, src, m in (("orig", hippo_dir / "imagesTr" / f"{CASE}.nii.gz", model), ("moved", moved, model),
                         ("blind", moved, blind)):
        outs[name] = tmp_path / f"seg_{name}.nii.gz"
        p = run_gms("segment", src, "-o", outs[name], "--model", m, "--no-tta", "--progress", "json")
        assert p.returncode == 0, p.stderr
        said[name] = " ".join(json.loads(l).get("message", "") for l in p.stdout.splitlines())
    code = orientation_code(sitk.ReadImage(str(moved)).GetDirection())
    assert code != "RAS" and f"stored in {code} orientation" in said["moved"]
    assert "orientation" not in said["orig"] and "orientation" not in said["blind"]

    orig = sitk.ReadImage(str(outs["orig"]))
    moved_out = sitk.ReadImage(str(outs["moved"]))
    moved_in = sitk.ReadImage(str(moved))
    assert (moved_out.GetSize(), moved_out.GetDirection(), moved_out.GetOrigin()) == \
        (moved_in.GetSize(), moved_in.GetDirection(), moved_in.GetOrigin())  # the input's own grid
    expect = sitk.GetArrayFromImage(_transformed(orig, order, flips))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moved_out), expect)

    gt_moved = sitk.GetArrayFromImage(_transformed(gt, order, flips))
    blind_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(outs["blind"])))
    for label in (1, 2):
        ok = dice(expect == label, gt_moved == label)
        assert ok > 0.75, (label, ok)
        assert dice(blind_arr == label, gt_moved == label) < ok - 0.25


def test_train_records_the_orientation_and_brings_volumes_into_it(hippo_dir, tmp_path):
    """A data set whose cases are stored in different orientations: training brings them all into the most common
    one and records it."""
    data = tmp_path / "hippo_mixed"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    cases = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
    for i, c in enumerate(cases):
        for sub in ("imagesTr", "labelsTr"):
            im = sitk.ReadImage(str(hippo_dir / sub / f"{c}.nii.gz"))
            if i == 3:  # one case stored transposed and flipped
                im = _transformed(im, (1, 0, 2), (True, False, False))
            sitk.WriteImage(im, str(data / sub / f"{c}.nii.gz"))
    (data / "split.json").write_text(json.dumps({"train": cases}))
    out = tmp_path / "m"
    p = run_gms("--threads", "2", "train", data, "-o", out, "--segments", "anterior", "posterior", "--input-size", "64",
                "--augment-copies", "1", "--epochs", "1", "--warmup-epochs", "1", "--val-fraction", "0.25",
                "--no-postprocess-select", "--weights-dir", hippo_dir.parents[1] / "models")
    assert p.returncode == 0, p.stderr
    assert "several orientations" in p.stdout
    card = json.loads((out / "card.json").read_text())
    assert card["orientation"] == "RAS"  # three of the four cases

    from GMSSegmentLib.data import load_3d
    norm = {"mode": "percentile", "low": 0.5, "high": 99.5}
    as_stored = load_3d(hippo_dir, cases[3], norm, 0, (1, 2))
    moved = load_3d(data, cases[3], norm, 0, (1, 2), orientation="RAS")
    assert len(moved) == len(as_stored)
    for a, b in zip(as_stored, moved):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.labels, b.labels)

    # choosing the inference options of a 3D model also tries smoothing along the slicing axis (one network run per
    # test-time option, every post-processing variant derived from it), on the carved validation case; --views 1 8:
    # no augmentation, or the 8 symmetries of the square (flips and 90-degree rotations)
    p = run_gms("--threads", "2", "postprocess", data, "--model", out, "--weights-dir", hippo_dir.parents[1] / "models",
                "--views", "8", "1")
    assert p.returncode == 0, p.stderr
    card = json.loads((out / "card.json").read_text())
    pp, tta = card["postprocess"], card["tta"]
    table = pp["validation_dice"]
    assert pp["selected_on"] == "1 validation cases" and len(table) == 2 * 3 * 6  # views x size sets x post-processing
    assert {k.split("_views")[0] for k in table} == {"1", "8"}
    assert "--views 8 1" in pp["command"]
    assert {k.split("/")[1] for k in table} == {"none", "largest_component", "z_smooth_0.25",
                                               "z_smooth_0.25+largest_component", "z_smooth_0.333",
                                               "z_smooth_0.333+largest_component"}
    from GMSSegmentLib.evaluate import _option_key, _pp_name
    chosen = _option_key(tta["views"], tta["scales"], 64, _pp_name(pp["z_smooth"], pp["largest_component"]))
    assert table[chosen] == max(table.values())
