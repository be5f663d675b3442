"""``gms segment`` end to end, exactly as the Slicer worker runs it (``python -m GMSSegmentLib``), on real data."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_gms
from GMSSegmentLib.lmm import LatentMappingModel, LMMConfig
from GMSSegmentLib.model import GMSModel, make_segments


def _geom(img):
    return img.GetSize(), img.GetOrigin(), img.GetSpacing(), img.GetDirection()


def _one_error_line(p):
    lines = [l for l in p.stderr.splitlines() if l.startswith("gms: error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_segment_busi_image_png_and_segnrrd(tiny_model, busi_dir, tmp_path):
    src = busi_dir / "images" / "malignant_3.png"
    for out in (tmp_path / "m3.png", tmp_path / "m3.seg.nrrd", tmp_path / "m3.nii.gz"):
        p = run_gms("segment", src, "-o", out, "--model", tiny_model, "--progress", "none")
        assert p.returncode == 0, p.stderr
        a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
        if out.suffix == ".png" or out.name.endswith(".nii.gz"):
            assert _geom(a) == _geom(b)
        else:  # .seg.nrrd is 3D by format: one slice with the image's in-plane geometry
            assert b.GetSize() == a.GetSize() + (1,)
            assert b.GetSpacing()[:2] == a.GetSpacing() and b.GetOrigin()[:2] == a.GetOrigin()
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m3.png")))
    nii = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m3.nii.gz")))
    assert set(np.unique(png)) <= {0, 255} and np.array_equal(png > 0, nii > 0)


def test_segment_rgb_image(tiny_model, busi_dir, tmp_path):
    src = busi_dir / "images" / "benign_6.png"  # one of the RGB images of BUSI
    assert sitk.ReadImage(str(src)).GetNumberOfComponentsPerPixel() == 3
    p = run_gms("segment", src, "-o", tmp_path / "b6.nrrd", "--model", tiny_model, "--progress", "none")
    assert p.returncode == 0, p.stderr
    assert _geom(sitk.ReadImage(str(src))) == _geom(sitk.ReadImage(str(tmp_path / "b6.nrrd")))


def test_segment_volume_geometry_and_json_protocol(tiny_model, hippo_dir, tmp_path):
    src = hippo_dir / "imagesTr" / "hippocampus_025.nii.gz"
    out = tmp_path / "h.nii.gz"
    p = run_gms("segment", src, "-o", out, "--model", tiny_model, "--progress", "json")
    assert p.returncode == 0, p.stderr
    events = [json.loads(l) for l in p.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "log" and "start" in kinds and kinds[-1] == "result"
    prog = [e for e in events if e["event"] == "progress"]
    assert prog[-1]["done"] == prog[-1]["total"] == sitk.ReadImage(str(src)).GetSize()[2]
    assert events[-1]["path"] == str(out) and events[-1]["segments"][0]["name"] == "lesion"
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert _geom(a) == _geom(b)


def test_batch_jobs_one_broken(tiny_model, busi_dir, tmp_path):
    bad = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 16, 16), np.nan, np.float32)), str(bad))
    jobs = [{"input": str(busi_dir / "images" / "benign_3.png"), "output": str(tmp_path / "o1.png")},
            {"input": str(bad), "output": str(tmp_path / "o2.nrrd")},
            {"input": str(busi_dir / "images" / "benign_4.png"), "output": str(tmp_path / "o3.png")}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    p = run_gms("segment", "--jobs", tmp_path / "jobs.json", "--model", tiny_model, "--progress", "json")
    assert p.returncode == 2
    events = [json.loads(l) for l in p.stdout.splitlines()]
    assert [e["item"] for e in events if e["event"] == "result"] == [0, 2]
    errs = [e for e in events if e["event"] == "error"]
    assert len(errs) == 1 and errs[0]["item"] == 1 and "NaN" in errs[0]["message"]
    assert events[-1] == {"event": "done", "ok": 2, "failed": 1}
    assert (tmp_path / "o1.png").is_file() and (tmp_path / "o3.png").is_file() and not (tmp_path / "o2.nrrd").exists()


def _bad_inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "garbage.png").write_bytes(b"\x89PNG this is not an image")
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(2, 3, 8, 8).astype(np.float32), isVector=False),
                    str(d / "four_d.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 8, 8), np.nan, np.float32)), str(d / "nan.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 8, 8), 7.0, np.float32)), str(d / "constant.nrrd"))
    (d / "empty.nrrd").write_bytes(b"")
    return {"garbage.png": "cannot|not", "four_d.nii.gz": "4D|dimension", "nan.nrrd": "NaN",
            "constant.nrrd": "constant", "empty.nrrd": "empty|zero|0 bytes", "missing.nii.gz": "not found"}, d


def test_bad_inputs_give_one_line_error_and_no_output(tiny_model, tmp_path):
    cases, d = _bad_inputs(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, pattern in cases.items():
        p = run_gms("segment", d / name, "-o", out_dir / "x.nrrd", "--model", tiny_model, "--progress", "none")
        assert p.returncode == 2, (name, p.stderr)
        line = _one_error_line(p)
        assert any(w.lower() in line.lower() for w in pattern.split("|")), (name, line)
        assert "Traceback" not in p.stderr
        assert list(out_dir.iterdir()) == [], name


def test_bad_models_give_one_line_error_and_no_output(tiny_model, busi_dir, tmp_path, shared_dir):
    src = busi_dir / "images" / "benign_3.png"
    out = tmp_path / "out"
    out.mkdir()
    four = tmp_path / "four"
    stats = {k: torch.ones(4) for k in ("image_mean", "image_std", "mask_mean", "mask_std")}
    card = {"name": "four", "foundation": {"name": "taef2"}, "input_size": 224, "normalization": {"mode": "photo"},
            "axis": 0, "segments": make_segments(["x"])}
    GMSModel(card, LatentMappingModel(LMMConfig(latent_channels=4)), stats).save(four)
    (tmp_path / "notamodel").mkdir()
    for model, pattern in ((tmp_path / "missing", "not found"), (tmp_path / "notamodel", "not a GMS model folder"),
                           (four, "latent channels")):
        p = run_gms("segment", src, "-o", out / "x.png", "--model", model, "--progress", "none")
        assert p.returncode == 2 and pattern in _one_error_line(p), p.stderr
        assert list(out.iterdir()) == []
    # wrong foundation weights folder
    p = run_gms("segment", src, "-o", out / "x.png", "--model", tiny_model, "--weights-dir", tmp_path)
    assert p.returncode == 2 and "taef2" in _one_error_line(p)
    assert list(out.iterdir()) == []


def test_existing_output_is_never_overwritten(tiny_model, busi_dir, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    p = run_gms("segment", busi_dir / "images" / "benign_3.png", "-o", out, "--model", tiny_model)
    assert p.returncode == 2 and "exists" in _one_error_line(p)
    assert out.read_bytes() == b"precious"
