"""Reading images with geometry and writing label maps atomically (GMSSegmentLib.imageio)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from GMSSegmentLib import GMSError
from GMSSegmentLib import imageio as io
from GMSSegmentLib.imageio import Geometry, atomic_output, read_image, write_labels

REPO = Path(__file__).resolve().parents[1]

HIPPO_IMAGE = "hippocampus/imagesTr/hippocampus_001.nii.gz"
HIPPO_LABEL = "hippocampus/labelsTr/hippocampus_001.nii.gz"
BUSI_GRAY = "busi/images/benign_1.png"
BUSI_GRAY_MASK = "busi/masks/benign_1.png"
BUSI_RGB = "busi/images/benign_102.png"
KVASIR_DIR = "kvasir-seg/images"

# an oblique, anisotropic 3D grid (LPS), to check that nothing is lost beyond the trivial identity case
OBLIQUE = Geometry(
    dimension=3,
    size=(7, 6, 5),
    origin=(-12.25, 33.5, 7.125),
    spacing=(0.7, 0.45, 2.5),
    direction=tuple(
        sitk.VersorTransform((0.3, 0.2, 0.9), 0.4).GetMatrix()
    ),
)


def data_dir() -> Path:
    path = Path(os.environ.get("GMS_SHARED", REPO.parent / "shared")) / "data"
    for rel in (HIPPO_IMAGE, HIPPO_LABEL, BUSI_GRAY, BUSI_GRAY_MASK, BUSI_RGB):
        if not (path / rel).is_file():
            pytest.fail(f"shared data not found: {path / rel} (set GMS_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="module")
def data() -> Path:
    return data_dir()


@pytest.fixture(scope="module")
def hippo(data):
    img = read_image(data / HIPPO_IMAGE)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data / HIPPO_LABEL)))
    return img, labels


def oblique_labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=OBLIQUE.shape_zyx).astype(np.uint8)
    labels[0] = 0  # some empty space so the Slicer extents are not trivial
    return labels


def single_line(msg: str) -> bool:
    return "\n" not in msg and "\r" not in msg and msg.strip() == msg


# ------------------------------------------------------------------------------------------------------- geometry


def test_geometry_dict_round_trip_and_comparisons():
    d = OBLIQUE.to_dict()
    assert Geometry.from_dict(json.loads(json.dumps(d))) == OBLIQUE
    assert OBLIQUE.shape_zyx == (5, 6, 7)
    assert OBLIQUE.spacing_zyx == (2.5, 0.45, 0.7)
    nudged = Geometry.from_dict({**d, "origin": [o + 1e-9 for o in d["origin"]]})
    assert nudged != OBLIQUE and nudged.isclose(OBLIQUE)
    moved = Geometry.from_dict({**d, "spacing": [0.7, 0.5, 2.5]})
    assert not moved.isclose(OBLIQUE) and any("spacing" in s for s in moved.differences(OBLIQUE))
    g2 = Geometry(2, (4, 3), (1.0, 2.0), (0.5, 0.25), (1.0, 0.0, 0.0, 1.0))
    assert g2.shape_zyx == (1, 3, 4) and g2.spacing_zyx == (1.0, 0.25, 0.5)
    assert g2.to_3d().size == (4, 3, 1)
    img = sitk.Image(4, 3, sitk.sitkUInt8)
    g2.apply(img)
    assert Geometry.from_sitk(img) == g2 and g2.same_grid(img)
    with pytest.raises(ValueError):
        g2.apply(sitk.Image(3, 4, sitk.sitkUInt8))
    with pytest.raises(GMSError):
        Geometry.from_dict({"dimension": 3, "size": [1, 2]})


# -------------------------------------------------------------------------------------------------------- reading


def test_read_rgb_png(data):
    img = read_image(data / BUSI_RGB)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / BUSI_RGB)))
    assert img.is_rgb and img.is_2d and img.num_slices == 1
    assert img.array.dtype == np.float32 and img.array.shape == (1,) + ref.shape and ref.shape[-1] == 3
    np.testing.assert_array_equal(img.array[0], ref.astype(np.float32))
    assert img.geometry.dimension == 2 and img.geometry.size == (ref.shape[1], ref.shape[0])
    assert img.pixel_type == "uint8" and img.path == str(data / BUSI_RGB)


def test_read_gray_png(data):
    img = read_image(data / BUSI_GRAY)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / BUSI_GRAY)))
    assert not img.is_rgb and img.array.shape == (1,) + ref.shape and img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array[0], ref)
    assert img.geometry == Geometry(2, (ref.shape[1], ref.shape[0]), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0, 0.0, 1.0))


def test_read_jpeg(data):
    jpg = sorted((data / KVASIR_DIR).glob("*.jpg"))[0]
    img = read_image(jpg)
    assert img.is_rgb and img.array.shape[0] == 1 and img.array.shape[-1] == 3


def test_read_nifti_volume(hippo, data):
    img, _ = hippo
    ref = sitk.ReadImage(str(data / HIPPO_IMAGE))
    assert not img.is_rgb and not img.is_2d
    assert img.array.shape == sitk.GetArrayViewFromImage(ref).shape and img.array.dtype == np.float32
    assert img.geometry == Geometry.from_sitk(ref)
    np.testing.assert_array_equal(img.array, sitk.GetArrayFromImage(ref))


def test_read_rgba_drops_alpha_and_16bit(tmp_path):
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0] = np.arange(6)
    rgba[..., 1] = 7
    rgba[..., 3] = 200
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "rgba.png"))
    img = read_image(tmp_path / "rgba.png")
    assert img.is_rgb and img.array.shape == (1, 5, 6, 3)
    np.testing.assert_array_equal(img.array[0], rgba[..., :3])

    deep = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(deep), str(tmp_path / "deep.png"))
    img = read_image(tmp_path / "deep.png")
    assert img.pixel_type == "uint16" and img.array.max() == 58000.0


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".seg.nrrd", ".mha", ".nii"])
def test_round_trip_hippocampus(hippo, tmp_path, ext):
    img, labels = hippo
    out = tmp_path / f"pred{ext}"
    written = write_labels(out, labels, img.geometry)
    assert written == str(out.resolve()) and out.is_file()
    back = sitk.ReadImage(str(out))
    assert Geometry.from_sitk(back) == img.geometry  # exact: size, origin, spacing, direction
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left behind


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".seg.nrrd", ".nii.gz"])
def test_round_trip_oblique_geometry(tmp_path, ext):
    labels = oblique_labels()
    out = tmp_path / f"o{ext}"
    write_labels(out, labels, OBLIQUE)
    back = sitk.ReadImage(str(out))
    got = Geometry.from_sitk(back)
    if ext == ".nii.gz":  # NIfTI stores the geometry in single precision
        assert got.isclose(OBLIQUE, tol=1e-5), got.differences(OBLIQUE, tol=1e-5)
    elif ext == ".mha":
        assert got == OBLIQUE
    else:  # NRRD stores direction x spacing: an oblique grid comes back to the last bit or two
        assert got.isclose(OBLIQUE, tol=1e-14), got.differences(OBLIQUE, tol=1e-14)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)


def test_round_trip_busi_png(data, tmp_path):
    img = read_image(data / BUSI_GRAY)
    mask = read_image(data / BUSI_GRAY_MASK)
    binary = (mask.array > 0).astype(np.uint8)
    out = tmp_path / "pred.png"
    write_labels(out, binary, img.geometry)
    back = sitk.ReadImage(str(out))
    assert Geometry.from_sitk(back) == img.geometry
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), binary[0] * 255)  # binary -> 0/255
    np.testing.assert_array_equal(read_image(out).array, mask.array)  # same as the BUSI mask file

    multi = binary.copy()
    multi[0, :10, :10] = 2
    write_labels(tmp_path / "multi.png", multi[0], img.geometry)  # (Y, X) is accepted for 2D
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "multi.png"))), multi[0])


def test_2d_geometry_to_nrrd_stays_2d(data, tmp_path):
    img = read_image(data / BUSI_RGB)
    labels = np.zeros(img.geometry.shape_zyx, np.uint8)
    labels[0, 10:20, 30:50] = 1
    write_labels(tmp_path / "p.nrrd", labels, img.geometry)
    back = sitk.ReadImage(str(tmp_path / "p.nrrd"))
    assert Geometry.from_sitk(back) == img.geometry and back.GetDimension() == 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels[0])


def test_large_labels_use_wider_type(tmp_path):
    g = Geometry(3, (4, 3, 2), (0, 0, 0), (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros(g.shape_zyx, np.int64)
    labels[1, 2, 3] = 300
    write_labels(tmp_path / "w.nrrd", labels, g)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nrrd")))
    assert back.dtype == np.uint16 and back[1, 2, 3] == 300
    with pytest.raises(GMSError, match="8-bit PNG"):
        write_labels(tmp_path / "w.png", labels[1:2], Geometry(2, (4, 3), (0, 0), (1, 1), (1, 0, 0, 1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.nrrd"]


# --------------------------------------------------------------------------------------------------- 3D Slicer


def _load_in_slicer(path: Path):
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    segments = []
    for i in range(segmentation.GetNumberOfSegments()):
        seg = segmentation.GetNthSegment(i)
        segments.append((segmentation.GetNthSegmentID(i), seg.GetName(), tuple(seg.GetColor()), seg.GetLabelValue()))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert logic.ExportAllSegmentsToLabelmapNode(node, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    import vtk

    m = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
    # map exported labelmap values (segment index + 1) back to the segments' label values
    values = {i + 1: s[3] for i, s in enumerate(segments)}
    mapped = np.zeros_like(array, dtype=np.int64)
    for v, lab in values.items():
        mapped[array == v] = lab
    return node, segments, mapped, ijk_to_ras


def _expected_ijk_to_ras(g: Geometry) -> np.ndarray:
    g = g.to_3d()
    d = np.array(g.direction).reshape(3, 3) * np.array(g.spacing)[None, :]
    m = np.eye(4)
    m[:3, :3] = d
    m[:3, 3] = g.origin
    m[:2] *= -1  # LPS -> RAS
    m[3] = (0, 0, 0, 1)
    return m


def test_seg_nrrd_loads_in_slicer(hippo, tmp_path):
    img, labels = hippo
    segs = [
        {"name": "Anterior", "label": 1, "color": [1.0, 0.0, 0.0]},
        {"name": "Posterior", "label": 2, "color": [0.25, 0.5, 1.0]},
    ]
    out = tmp_path / "hippo.seg.nrrd"
    write_labels(out, labels, img.geometry, segs)
    _, segments, array, ijk_to_ras = _load_in_slicer(out)
    assert [(s[1], s[2], s[3]) for s in segments] == [("Anterior", (1.0, 0.0, 0.0), 1), ("Posterior", (0.25, 0.5, 1.0), 2)]
    np.testing.assert_array_equal(array, labels)
    np.testing.assert_allclose(ijk_to_ras, _expected_ijk_to_ras(img.geometry), atol=1e-9)


def test_seg_nrrd_oblique_terminology_and_unlisted_labels(tmp_path):
    slicer = pytest.importorskip("slicer")
    import vtk

    labels = oblique_labels()
    labels[labels == 2] = 5
    entry = (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue"
        "~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    out = tmp_path / "o.seg.nrrd"
    segs = [{"name": "Tumour", "label": 1, "color": [0.5, 0.25, 0.125], "terminology": entry},
            {"name": "Absent", "label": 3, "color": [0, 1, 0]}]
    write_labels(out, labels, OBLIQUE, segs)
    node, segments, array, ijk_to_ras = _load_in_slicer(out)
    assert [(s[1], s[3]) for s in segments] == [("Tumour", 1), ("Absent", 3), ("Segment_5", 5)]
    np.testing.assert_array_equal(array, labels)
    np.testing.assert_allclose(ijk_to_ras, _expected_ijk_to_ras(OBLIQUE), atol=1e-9)
    tag = vtk.reference("")
    assert node.GetSegmentation().GetNthSegment(0).GetTag("TerminologyEntry", tag) and str(tag) == entry
    del slicer


def test_seg_nrrd_2d(data, tmp_path):
    img = read_image(data / BUSI_GRAY)
    mask = (read_image(data / BUSI_GRAY_MASK).array > 0).astype(np.uint8)
    out = tmp_path / "busi.seg.nrrd"
    write_labels(out, mask, img.geometry, [{"name": "Lesion", "label": 1, "color": [1, 1, 0]}])
    back = sitk.ReadImage(str(out))
    assert back.GetDimension() == 3 and Geometry.from_sitk(back) == img.geometry.to_3d()
    _, segments, array, _ = _load_in_slicer(out)
    assert [s[1] for s in segments] == ["Lesion"]
    np.testing.assert_array_equal(array, mask)


# --------------------------------------------------------------------------------------------------------- errors


def _make_bad_inputs(src: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a fragment expected in the message)."""
    src.mkdir()
    bad: dict[str, tuple[Path, str]] = {}

    frames = [sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5) * t) for t in (1, 2)]
    four_d = sitk.JoinSeries(frames)
    assert four_d.GetDimension() == 4
    sitk.WriteImage(four_d, str(src / "four_d.nii.gz"))
    bad["4d"] = (src / "four_d.nii.gz", "4D")

    vol = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    nan = vol.copy()
    nan[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(src / "nan.nrrd"))
    bad["nan"] = (src / "nan.nrrd", "NaN")
    inf = vol.copy()
    inf[0, 0, 0] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(inf), str(src / "inf.nrrd"))  # (ITK's NIfTI reader zeroes Inf)
    bad["inf"] = (src / "inf.nrrd", "Inf")

    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), 7, np.int16)), str(src / "constant.nii.gz"))
    bad["constant"] = (src / "constant.nii.gz", "nothing to segment")
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[...] = (10, 20, 30)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(src / "constant_rgb.png"))
    bad["constant_rgb"] = (src / "constant_rgb.png", "nothing to segment")

    two = np.random.default_rng(2).random((3, 4, 5, 2)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(two, isVector=True), str(src / "two_comp.nrrd"))
    bad["3d_2_components"] = (src / "two_comp.nrrd", "2 components")

    (src / "empty.png").write_bytes(b"")
    bad["zero_byte"] = (src / "empty.png", "empty")
    (src / "garbage.nii.gz").write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    bad["garbage"] = (src / "garbage.nii.gz", "cannot read")
    (src / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    bad["truncated_png"] = (src / "garbage.png", "cannot read")
    (src / "empty_size.nrrd").write_bytes(
        b"NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: 0 4 4\nencoding: raw\n\n"
    )
    bad["empty_size_nrrd"] = (src / "empty_size.nrrd", "cannot read")
    (src / "no_slices.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 0\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    bad["zero_slices"] = (src / "no_slices.mha", "empty (size (4, 4, 0))")
    bad["missing"] = (src / "missing.nii.gz", "not found")
    (src / "folder.nrrd").mkdir()
    bad["folder"] = (src / "folder.nrrd", "folder")
    return bad


def test_read_errors_are_gms_errors_and_write_nothing(tmp_path):
    bad = _make_bad_inputs(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, (path, fragment) in bad.items():
        with pytest.raises(GMSError) as info:
            img = read_image(path)
            write_labels(out_dir / f"{name}.nrrd", np.zeros(img.geometry.shape_zyx, np.uint8), img.geometry)
        msg = str(info.value)
        assert single_line(msg), (name, msg)
        assert str(path) in msg, (name, msg)
        assert fragment in msg, (name, msg)
    assert list(out_dir.iterdir()) == []


def test_write_errors_leave_nothing(hippo, tmp_path, monkeypatch):
    img, labels = hippo
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    with pytest.raises(GMSError, match=r"\.seg\.nrrd.*\.png"):  # lists the supported extensions
        write_labels(out_dir / "pred.jpg", labels, img.geometry)
    with pytest.raises(GMSError, match="2D"):
        write_labels(out_dir / "pred.png", labels, img.geometry)
    with pytest.raises(GMSError, match="does not exist"):
        write_labels(tmp_path / "no_such_dir" / "pred.nrrd", labels, img.geometry)
    with pytest.raises(ValueError):
        write_labels(out_dir / "pred.nrrd", labels[:, :, :-1], img.geometry)
    with pytest.raises(ValueError):
        write_labels(out_dir / "pred.nrrd", labels.astype(np.float32), img.geometry)

    # the writer fails halfway: the partial temporary file is removed, no output appears
    real_write = sitk.WriteImage

    def failing_write(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("Exception thrown in SimpleITK WriteImage:\n  sitk::ERROR: disk full\n")

    monkeypatch.setattr(io.sitk, "WriteImage", failing_write)
    for ext in (".nrrd", ".seg.nrrd", ".nii.gz"):
        with pytest.raises(GMSError, match="disk full") as info:
            write_labels(out_dir / f"pred{ext}", labels, img.geometry)
        assert single_line(str(info.value))
    monkeypatch.setattr(io.sitk, "WriteImage", real_write)
    assert list(out_dir.iterdir()) == []


def test_overwrite_refused_unless_asked(hippo, tmp_path):
    img, labels = hippo
    out = tmp_path / "pred.nii.gz"
    out.write_bytes(b"precious")
    with pytest.raises(GMSError, match="already exists"):
        write_labels(out, labels, img.geometry)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz"]
    write_labels(out, labels, img.geometry, overwrite=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz"]


def test_atomic_output_generic(tmp_path):
    out = tmp_path / "scores.csv"
    with atomic_output(out) as tmp:
        assert Path(tmp).parent == tmp_path and tmp.endswith("scores.csv") and Path(tmp).name != "scores.csv"
        Path(tmp).write_text("a,b\n1,2\n")
        assert not out.exists()
    assert out.read_text() == "a,b\n1,2\n"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not a private temp file's 0600

    with pytest.raises(KeyError):
        with atomic_output(tmp_path / "other.csv") as tmp:
            Path(tmp).write_text("half")
            raise KeyError("boom")
    with pytest.raises(GMSError, match="already exists"):
        with atomic_output(out) as tmp:
            pass
    # another writer creates the file while we write: still refused, theirs kept
    with pytest.raises(GMSError, match="already exists"):
        with atomic_output(tmp_path / "race.csv") as tmp:
            Path(tmp).write_text("ours")
            (tmp_path / "race.csv").write_text("theirs")
    assert (tmp_path / "race.csv").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.csv", "scores.csv"]


def test_read_image_owns_its_pixels_for_float32_volumes(tmp_path):
    """A float32 volume must be copied out of SimpleITK's buffer (a view would point at freed memory)."""
    import gc

    ref = np.random.default_rng(0).normal(100.0, 20.0, size=(7, 9, 11)).astype(np.float32)
    path = tmp_path / "f32.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(path))
    loaded = read_image(path)
    gc.collect()
    _ = [np.ones((7, 9, 11), np.float32) * 7 for _ in range(50)]  # reuse freed memory, if any was freed
    assert np.array_equal(loaded.array, ref)
