"""``gms segment`` checks every output before any model is loaded or any inference starts (outputplan.py): an
output that is an input (also through links), an existing output, a duplicate output, a missing or read-only output
folder, PNG output for a 3D input. A single input's problem is one error line and exit code 2; a batch item's problem
is that item's error, and the other items run. Real files made here, the bundled busi-lesion model."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_gms
from smalldisk import small_tmpfs
from GMSSegmentLib.outputplan import output_problems, png_label_problem

MODEL = ("--model", "busi-lesion", "--no-tta", "--device", "cpu", "--progress", "json")


def _image(path, shape=(48, 48), seed=0):
    arr = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


def _events(p):
    return [json.loads(line) for line in p.stdout.splitlines()]


def _error_lines(p):
    return [line for line in p.stderr.splitlines() if line.startswith("gms: error:")]


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder in which no file can be created: a read-only tmpfs mounted on it (root ignores permission bits),
    else (not root) chmod 555."""
    d = tmp_path / "read-only"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        with small_tmpfs(d, size="64k", options="ro"):
            yield d
        return
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


def test_output_that_is_the_input_is_refused_also_through_links(tmp_path):
    src = _image(tmp_path / "scan.png")
    original = src.read_bytes()
    os.symlink("scan.png", tmp_path / "symlink.png")
    os.link(src, tmp_path / "hardlink.png")
    (tmp_path / "folder-link").symlink_to(tmp_path, target_is_directory=True)
    cases = [(src, src), (tmp_path / "symlink.png", src), (src, tmp_path / "symlink.png"),
             (src, tmp_path / "hardlink.png"), (tmp_path / "hardlink.png", src),
             (tmp_path / "folder-link" / "scan.png", src)]
    for inp, out in cases:
        assert output_problems([{"input": str(inp), "output": str(out)}], overwrite=True) == [
            f"output {out} is the input image itself (the same file); choose another output file"], (inp, out)
    # the command line: one line, exit 2, the input untouched, no model loaded
    before = _files(tmp_path)
    for inp, out in (cases[0], cases[3]):
        p = run_gms("segment", inp, "-o", out, "--overwrite", *MODEL)
        assert p.returncode == 2, p.stderr
        assert _error_lines(p) == [f"gms: error: output {out} is the input image itself (the same file); choose "
                                   "another output file"], p.stderr
        assert [e["event"] for e in _events(p)] == ["error"]  # nothing loaded, nothing segmented
        assert src.read_bytes() == original and _files(tmp_path) == before


def test_batch_item_with_an_existing_output_is_reported_and_the_others_run(tmp_path):
    a, b, c = (_image(tmp_path / f"{n}.png", seed=i) for i, n in enumerate("abc"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"precious")
    jobs = [{"input": str(a), "output": str(out / "a.png")},
            {"input": str(b), "output": str(out / "b.png")},  # exists
            {"input": str(c), "output": str(out / "c.nii.gz")},
            {"input": str(c), "output": str(out / "a.png")},  # the output of item 0 again
            {"input": str(c), "output": str(a)}]  # the input of item 0
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    expected = {1: f"output {out / 'b.png'} exists; use --overwrite to replace it",
                3: f"output {out / 'a.png'} is also the output of item 0 ({a})",
                4: f"output {a} is the input image of item 0 ({a})"}
    # --overwrite lets item 1 replace its output, never item 3 the output of item 0 or item 4 an input
    assert output_problems(jobs, overwrite=True) == [None, None, None, expected[3], expected[4]]
    originals = {p: p.read_bytes() for p in (a, b, c, out / "b.png")}
    p = run_gms("segment", "--jobs", tmp_path / "jobs.json", *MODEL)
    assert p.returncode == 2, p.stderr
    events = _events(p)
    errors = {e["item"]: e["message"] for e in events if e["event"] == "error"}
    assert errors == expected, p.stderr
    assert sorted(_error_lines(p)) == sorted(f"gms: error: {m}" for m in expected.values())
    assert [e["item"] for e in events if e["event"] == "result"] == [0, 2]
    assert events[-1] == {"event": "done", "ok": 2, "failed": 3}
    assert (out / "a.png").is_file() and (out / "c.nii.gz").is_file()
    for path, data in originals.items():  # the inputs and the existing output untouched
        assert path.read_bytes() == data, path
    assert _files(out) == ["a.png", "b.png", "c.nii.gz"]


def test_several_inputs_named_alike_do_not_write_one_output_twice(tmp_path):
    """``gms segment d1/scan.png d2/scan.png -o out --overwrite``: both outputs would be out/scan_gms.png; the first
    is written, the second refused (before, it silently replaced the first)."""
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
    first, second = _image(tmp_path / "d1" / "scan.png", seed=0), _image(tmp_path / "d2" / "scan.png", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    p = run_gms("segment", first, second, "-o", out, "--overwrite", *MODEL)
    assert p.returncode == 2, p.stderr
    events = _events(p)
    assert [(e["event"], e["item"]) for e in events if e["event"] in ("error", "result")] == [("error", 1),
                                                                                            ("result", 0)]
    assert _error_lines(p) == [f"gms: error: output {out / 'scan_gms.png'} is also the output of item 0 ({first})"]
    assert _files(out) == ["scan_gms.png"]


def test_unwritable_or_invalid_output_is_refused_before_any_model_is_loaded(tmp_path, read_only_folder):
    img = _image(tmp_path / "scan.png")
    vol = tmp_path / "vol.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray((np.random.default_rng(1).random((3, 32, 32)) * 255).astype(np.uint8)),
                    str(vol))
    nii = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(vol)), str(nii))
    (tmp_path / "a-folder.png").mkdir()
    missing = tmp_path / "missing"
    cases = [(img, missing / "x.png", f"output folder does not exist: {missing}"),
             (img, read_only_folder / "x.png", f"cannot write to {read_only_folder}: "),
             (vol, tmp_path / "x.png", f"cannot write {tmp_path / 'x.png'}: PNG output needs a 2D image and {vol} "
                                       "is a 3D volume"),
             (vol, read_only_folder / "x.seg.nrrd", f"cannot write to {read_only_folder}: "),
             (nii, tmp_path / "x.png", "PNG output needs a 2D image")]
    before = _files(tmp_path)
    for inp, out, message in cases[:3]:  # the command line; the others in the batch below
        p = run_gms("segment", inp, "-o", out, *MODEL)
        assert p.returncode == 2, (out, p.stderr)
        lines = _error_lines(p)
        assert len(lines) == 1 and message in lines[0], (out, p.stderr)
        assert [e["event"] for e in _events(p)] == ["error"], (out, p.stdout)  # no model loaded, no inference
        assert _files(tmp_path) == before and _files(read_only_folder) == []

    # a batch: each such item is reported as that item's error, and the valid one runs
    cases.append((img, tmp_path / "a-folder.png", f"output path is a folder: {tmp_path / 'a-folder.png'}"))
    jobs = [{"input": str(inp), "output": str(out)} for inp, out, _ in cases]
    jobs.insert(2, {"input": str(vol), "output": str(tmp_path / "ok.seg.nrrd")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    p = run_gms("segment", "--jobs", tmp_path / "jobs.json", *MODEL)
    assert p.returncode == 2, p.stderr
    events = _events(p)
    errors = [e for e in events if e["event"] == "error"]
    assert [e["item"] for e in errors] == [0, 1, 3, 4, 5, 6]
    assert all(m in e["message"] for e, (_, _, m) in zip(errors, cases)), errors
    assert events.index(errors[-1]) < min(i for i, e in enumerate(events) if e["event"] == "log")  # before the model
    assert [e["item"] for e in events if e["event"] == "result"] == [2]
    assert events[-1] == {"event": "done", "ok": 1, "failed": 6}
    assert sitk.ReadImage(str(tmp_path / "ok.seg.nrrd")).GetSize() == (32, 32, 3)


def test_planning_leaves_no_probe_files_and_knows_an_8_bit_png(tmp_path):
    src = _image(tmp_path / "scan.png")
    jobs = [{"input": str(src), "output": str(tmp_path / f"o{i}.png")} for i in range(3)]
    assert output_problems(jobs) == [None, None, None]
    assert _files(tmp_path) == ["scan.png"]
    assert png_label_problem("x.png", 255) is None and png_label_problem("x.nrrd", 300) is None
    assert png_label_problem("x.PNG", 300) == "cannot write x.PNG: label value 300 does not fit an 8-bit PNG; use .nrrd"
