"""Every output write is checked before it replaces anything (GMSSegmentLib.atomicfile, labelwrite).

A full disk, made real with a small tmpfs mounted by the test (Testing/smalldisk.py; skipped, saying why, where it
cannot be mounted): each label-map format, a model folder, and ``gms segment --overwrite`` fail with one line, keep
the earlier file and leave no temporary file. Temporary files of a killed writer are removed by the next write into
the folder once they are stale.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_gms
from smalldisk import fill, small_tmpfs
from GMSSegmentLib import GMSError
from GMSSegmentLib.atomicfile import STALE_AFTER_S, atomic_output
from GMSSegmentLib.imageio import Geometry, write_labels
from GMSSegmentLib.model import GMSModel

REPO = Path(__file__).resolve().parent.parent
FORMATS = (".png", ".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha")
GEOMETRY_2D = Geometry(2, (320, 240), (0.0, 0.0), (0.5, 0.5), (1.0, 0.0, 0.0, 1.0))
GEOMETRY_3D = Geometry(3, (64, 48, 40), (1.0, 2.0, 3.0), (0.8, 0.8, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _masks(ext: str, large: bool) -> tuple[Geometry, np.ndarray, np.ndarray]:
    """The geometry, a good earlier mask, and a new one: small (a few hundred bytes written, which a library buffers
    and writes out only when closing the file, where ITK ignores the error) or too large (random, so it compresses
    badly) for 8 KiB."""
    g = GEOMETRY_2D if ext == ".png" else GEOMETRY_3D
    old = np.zeros(g.shape_zyx, np.uint8)
    old[..., 10:20, 10:30] = 1
    if large:
        new = np.random.default_rng(0).integers(0, 2, g.shape_zyx).astype(np.uint8)
    else:
        new = np.roll(old, 5, axis=-1)
    return g, old, new


@pytest.mark.parametrize("leave, large", [(0, False), (8192, True)], ids=["full", "nearly-full"])
@pytest.mark.parametrize("ext", FORMATS)
def test_write_on_a_full_disk_fails_and_keeps_the_earlier_file(tmp_path, ext, leave, large):
    with small_tmpfs(tmp_path / "disk") as disk:
        g, old, new = _masks(ext, large)
        out = disk / f"mask{ext}"
        write_labels(out, old, g, [{"name": "lesion", "label": 1, "color": [1, 0, 0]}])
        before = out.read_bytes()
        fill(disk, leave)
        with pytest.raises(GMSError, match=r"^cannot write .*mask") as e:
            write_labels(out, new, g, [{"name": "lesion", "label": 1, "color": [1, 0, 0]}], overwrite=True)
        assert "\n" not in str(e.value)
        assert out.read_bytes() == before  # the earlier mask is untouched
        assert sorted(p.name for p in disk.iterdir()) == ["filler", out.name]  # no temporary file left
        (disk / "filler").unlink()  # with room again, the same write succeeds
        write_labels(out, new, g, overwrite=True)
        back = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        np.testing.assert_array_equal(back.reshape(new.shape) > 0, new > 0)


def test_model_folder_on_a_full_disk_fails_cleanly(tmp_path):
    model = GMSModel.load(REPO / "GMSSegment" / "Resources" / "Models" / "busi-lesion")
    with small_tmpfs(tmp_path / "disk", size="8m") as disk:
        fill(disk, 64 * 1024)
        with pytest.raises(GMSError, match=r"^cannot write .*model\.safetensors"):
            model.save(disk / "model")
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "model"]
        assert list((disk / "model").iterdir()) == []


def test_gms_segment_on_a_full_disk_exits_2_and_keeps_the_earlier_mask(tmp_path):
    image = tmp_path / "scan.png"
    rng = np.random.default_rng(1)
    sitk.WriteImage(sitk.GetImageFromArray((rng.random((96, 128)) * 255).astype(np.uint8)), str(image))
    with small_tmpfs(tmp_path / "disk") as disk:
        out = disk / "scan.seg.nrrd"
        g = Geometry(2, (128, 96), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0, 0.0, 1.0))
        write_labels(out, np.ones(g.shape_zyx, np.uint8), g)
        before = out.read_bytes()
        fill(disk)
        p = run_gms("segment", image, "-o", out, "--overwrite", "--model", "busi-lesion", "--device", "cpu",
                    "--no-tta", timeout=300)
        assert p.returncode == 2, (p.stdout, p.stderr)
        errors = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("gms:")]
        assert len(errors) == 1 and errors[0].startswith("gms: error: cannot write ") and str(out) in errors[0], \
            p.stderr
        assert "->" not in p.stdout  # no success line
        assert out.read_bytes() == before
        assert sorted(x.name for x in disk.iterdir()) == ["filler", out.name]


# ------------------------------------------------------------------------------------------ stale temporary files


KILLED_WRITER = """
import sys, time
from GMSSegmentLib.atomicfile import atomic_output
with atomic_output(sys.argv[1]) as tmp:
    open(tmp, "wb").write(b"half a mask")
    print(tmp, flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write_once_stale(tmp_path):
    out = tmp_path / "mask.nrrd"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "GMSSegment"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                            env=env)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    assert left.is_file() and left.parent == tmp_path and not out.exists()

    # files that are not ours, or are too fresh to be left over, stay
    others = [tmp_path / ".~notours.mask.nrrd", tmp_path / ".~0123abcd", tmp_path / "~0123abcd.mask.nrrd"]
    for p in others:
        p.write_text("user file")
    fresh = tmp_path / ".~89abcdef.other.nrrd"  # another writer at work
    fresh.write_text("being written")
    folder_like = tmp_path / ".~fedcba98.folder"
    folder_like.mkdir()
    old = time.time() - STALE_AFTER_S - 60
    for p in [left, *others, folder_like]:
        os.utime(p, (old, old))

    g = Geometry(2, (4, 3), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0, 0.0, 1.0))
    write_labels(tmp_path / "next.nrrd", np.zeros(g.shape_zyx, np.uint8), g)
    assert not left.exists()
    assert all(p.exists() for p in [*others, fresh, folder_like])

    # a fresh left-over is kept until it is stale
    with atomic_output(tmp_path / "x.csv") as tmp:
        Path(tmp).write_text("a\n")
    assert fresh.exists()


def test_fsync_and_check_run_before_the_rename(tmp_path):
    """A writer's check that fails leaves the earlier file and no temporary file (the mechanism every writer uses)."""
    out = tmp_path / "card.json"
    out.write_text(json.dumps({"good": True}))

    def refuse(tmp: str) -> None:
        assert Path(tmp).read_text() == "{}"  # the finished temporary file, before the rename
        raise GMSError(f"cannot write {out}: refused by the check")

    with pytest.raises(GMSError, match="refused by the check"):
        with atomic_output(out, overwrite=True, verify=refuse) as tmp:
            Path(tmp).write_text("{}")
    assert json.loads(out.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]
