"""Damaged input files are refused before anything is segmented: truncated or corrupt data in every format the
engine reads, a small file declaring a huge volume, NaN/Inf voxels where the reader would hide them (NIfTI).

Every file is written here with SimpleITK and then damaged byte by byte (or its header patched with struct)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_gms
from GMSSegmentLib import GMSError
from GMSSegmentLib.data import load_3d
from GMSSegmentLib.imageio import read_image
from GMSSegmentLib.inputcheck import available_memory

RNG = np.random.default_rng(7)
VOLUME = (RNG.random((12, 24, 20)) * 1000).astype(np.int16)
FLOATS = (RNG.random((12, 24, 20)) * 100).astype(np.float32)


def _write(path: Path, array: np.ndarray, compress: bool = False, vector: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path), compress)
    return path


def _cut(path: Path, keep: float | int) -> Path:
    """Truncates ``path`` to ``keep`` bytes (an int) or that fraction of its size."""
    data = path.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path.write_bytes(data[:n])
    return path


def _patch_nifti_dims(path: Path, dims: tuple[int, ...], datatype: int | None = None, bitpix: int | None = None):
    """Rewrites a NIfTI-1 header's dim[] (and data type) in place, keeping the file (gzip'd or not) as it is."""
    gz = path.read_bytes()[:2] == b"\x1f\x8b"
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    data[40:56] = struct.pack("<8h", len(dims), *dims, *[1] * (7 - len(dims)))
    if datatype is not None:
        data[70:74] = struct.pack("<hh", datatype, bitpix)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))


def _nifti_with(path: Path, values: np.ndarray) -> Path:
    """A NIfTI file (.nii or .nii.gz) whose stored float32 voxels are exactly ``values`` (NaN/Inf included):
    written with finite values by SimpleITK, then the voxel bytes replaced."""
    _write(path, np.zeros_like(values))
    gz = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    offset = int(struct.unpack("<f", data[108:112])[0])
    raw = values.astype("<f4").tobytes()
    data[offset : offset + len(raw)] = raw
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


def _stderr_line(p) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gms: error: "), p.stderr
    return lines[0]


# ------------------------------------------------------------------------------------- the command line, end to end


def _cli_cases(d: Path) -> dict[str, tuple[Path, str]]:
    d.mkdir()
    cases = {}
    cases["half .nii.gz"] = (_cut(_write(d / "half.nii.gz", VOLUME), 0.5), "truncated or damaged")
    # 65 KB of gzip'd voxels under a header declaring 1000 x 1000 x 500
    small = _write(d / "huge.nii.gz", RNG.integers(0, 255, (16, 64, 64), dtype=np.uint8))
    _patch_nifti_dims(small, (1000, 1000, 500))
    assert 60_000 < small.stat().st_size < 70_000
    cases["65 KB declaring 1000x1000x500"] = (small, "cannot hold the image|memory")
    nan = FLOATS.copy()
    nan[3, 4, 5] = np.nan
    nan[0, 0, :2] = (np.inf, -np.inf)
    cases["NaN and Inf in .nii"] = (_nifti_with(d / "nan.nii", nan), "3 NaN or Inf")
    return cases  # (each case in every form and format: the read_image tests below; a CLI run costs ~5 s)


def test_damaged_nifti_exits_2_with_one_line_and_no_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, (path, pattern) in _cli_cases(tmp_path / "in").items():
        p = run_gms("segment", path, "-o", out / "mask.nrrd", "--model", "hippocampus", "--device", "cpu",
                    "--progress", "none", timeout=300)
        assert p.returncode == 2, (name, p.returncode, p.stderr)
        line = _stderr_line(p)
        assert str(path) in line and any(w in line for w in pattern.split("|")), (name, line)
        assert list(out.iterdir()) == [], name


# ----------------------------------------------------------------------------------------- every format, read_image


# (file name, writer's compression flag, array, vector): every format SimpleITK writes that read_image reads
FORMATS = [
    ("v.nii", False, VOLUME, False), ("v.nii.gz", False, VOLUME, False), ("v.hdr", False, VOLUME, False),
    ("v.nrrd", False, VOLUME, False), ("v.nrrd", True, VOLUME, False), ("v.nhdr", False, VOLUME, False),
    ("v.mha", False, VOLUME, False), ("v.mha", True, VOLUME, False), ("v.mhd", False, VOLUME, False),
    ("v.gipl", False, VOLUME, False), ("v.gipl.gz", False, VOLUME, False), ("v.vtk", False, FLOATS, False),
    ("v.tif", False, VOLUME, False), ("i.png", False, VOLUME[0].astype(np.uint16), False),
    ("i.jpg", False, (VOLUME[0] % 256).astype(np.uint8), False),
    ("i.bmp", False, (RNG.random((24, 21, 3)) * 255).astype(np.uint8), True),
]


def _data_file(folder: Path) -> Path:
    """The file holding the voxels: the largest one written (.img beside .hdr, .raw beside .mhd/.nhdr)."""
    return max(folder.iterdir(), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("name,compress,array,vector", FORMATS, ids=[f"{f[0]}{'-z' if f[1] else ''}" for f in FORMATS])
def test_every_format_refuses_truncated_data_and_reads_intact(tmp_path, name, compress, array, vector):
    path = _write(tmp_path / name, array, compress, vector)
    intact = read_image(path).array
    if not name.endswith(".jpg"):  # (lossy)
        np.testing.assert_array_equal(intact.reshape(array.shape), array.astype(np.float32))
    data_file = _data_file(tmp_path)
    good = data_file.read_bytes()
    _cut(data_file, 0.5)
    with pytest.raises(GMSError) as info:
        read_image(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    # one byte short: refused, or read exactly as written where the byte held no image data (a gzip trailer that
    # NRRD's reader ignores, a PNG's end chunk): never a different image
    _cut(data_file, len(good) - 1)
    try:
        np.testing.assert_array_equal(read_image(path).array, intact)
    except GMSError as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)


def test_damaged_gzip_stream_is_refused(tmp_path):
    path = _write(tmp_path / "v.nii.gz", VOLUME)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # the CRC-32 in the trailer: the stream decodes, but is not what was written
    path.write_bytes(bytes(data))
    with pytest.raises(GMSError, match="truncated or damaged"):
        read_image(path)


def test_nan_is_refused_in_every_nifti_form(tmp_path):
    nan = FLOATS.copy()
    nan[1, 1, 1] = np.nan
    nan[2, 2, 2] = np.inf
    for name in ("n.nii", "n.nii.gz"):
        with pytest.raises(GMSError, match="2 NaN or Inf"):
            read_image(_nifti_with(tmp_path / name, nan))
    pair = _write(tmp_path / "p.hdr", nan.astype(np.float64))  # Analyze-style pair, float64 voxels
    with pytest.raises(GMSError, match="2 NaN or Inf"):
        read_image(pair)
    for name in ("n.nrrd", "n.mha"):  # the rule is the same for every format
        with pytest.raises(GMSError, match="2 NaN or Inf"):
            read_image(_write(tmp_path / name, nan))


def test_small_file_declaring_a_large_volume_is_refused(tmp_path):
    gz = _write(tmp_path / "small.nii.gz", VOLUME)  # ~7 KB of gzip: it cannot hold 48 MB at deflate's ratio
    _patch_nifti_dims(gz, (400, 400, 300), datatype=2, bitpix=8)
    with pytest.raises(GMSError, match=r"cannot hold the image its header declares: 48,000,000 bytes"):
        read_image(gz)
    plain = _write(tmp_path / "small.nii", VOLUME)
    _patch_nifti_dims(plain, (400, 400, 300), datatype=2, bitpix=8)
    with pytest.raises(GMSError, match=r"truncated: its header declares 48,000,000 bytes of voxel data, the file "
                                       r"holds 11,520"):
        read_image(plain)
    stream = _write(tmp_path / "stream.nii.gz", np.zeros((12, 24, 20), np.uint8))  # compresses ~1000:1, so the
    _patch_nifti_dims(stream, (24, 24, 20), datatype=2, bitpix=8)  # stream is read through and found short
    with pytest.raises(GMSError, match=r"truncated: its header declares 11,520 bytes of voxel data, the file "
                                       r"holds 5,760"):
        read_image(stream)


def test_declared_volume_beyond_memory_is_refused_before_reading(tmp_path):
    path = _write(tmp_path / "big.nii", VOLUME)
    _patch_nifti_dims(path, (32767, 32767, 32767), datatype=64, bitpix=64)  # 2.8e14 bytes of float64
    avail = available_memory()
    assert avail is None or avail < 32767**3 * 12
    with pytest.raises(GMSError, match=r"needs [\d,.]+ GB of memory, more than the [\d,.]+ GB available"
                       if avail else "truncated"):
        read_image(path)


def test_training_volumes_get_the_same_checks(tmp_path):
    root = tmp_path / "task"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    _write(root / "labelsTr" / "case1.nii.gz", (VOLUME > 500).astype(np.uint8))
    _cut(_write(root / "imagesTr" / "case1.nii.gz", VOLUME), 0.5)
    with pytest.raises(GMSError, match="truncated or damaged"):
        load_3d(root, "case1", {"mode": "photo"})
    nan = FLOATS.copy()
    nan[0, 0, 0] = np.nan
    _nifti_with(root / "imagesTr" / "case1.nii.gz", nan)
    with pytest.raises(GMSError, match="NaN"):
        load_3d(root, "case1", {"mode": "photo"})
