"""The format registry (formats.py) is what its users do: the data sets find exactly its image and volume extensions,
read_image reads every input format it names, write_labels writes every output format it names and refuses the rest
with its list, and the command line names outputs by it."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from GMSSegmentLib import GMSError, formats
from GMSSegmentLib.cli import main
from GMSSegmentLib.segmentcmd import default_output
from GMSSegmentLib.data import find_image, volume_path
from GMSSegmentLib.imageio import Geometry, read_image, write_labels
from GMSSegmentLib.labelwrite import output_format


def _image_2d() -> sitk.Image:
    a = np.zeros((32, 40), np.uint8)
    a[8:20, 10:30] = 200
    return sitk.GetImageFromArray(a)


def _volume() -> sitk.Image:
    a = np.zeros((4, 16, 20), np.int16)
    a[1:3, 4:10, 5:15] = 300
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.5, 0.7, 2.0))
    return img


def test_split_extension_and_default_output_extension():
    assert formats.split_extension("/a/b/case.nii.gz") == ("case", ".nii.gz")
    assert formats.split_extension("CASE.Seg.NRRD") == ("CASE", ".seg.nrrd")
    assert formats.split_extension("x.nrrd") == ("x", ".nrrd")
    assert formats.split_extension("a.b.gif") == ("a.b", ".gif")  # unknown: the last suffix, as spelled
    assert formats.split_extension("noext") == ("noext", "")
    assert formats.is_2d_image("a.JPG") and not formats.is_2d_image("a.nii.gz") and not formats.is_2d_image("a.gif")
    for ext in formats.IMAGE_2D_EXTENSIONS:
        assert formats.default_output_extension(f"a{ext}") == ".png"
    for ext in formats.VOLUME_EXTENSIONS + (formats.SEGMENTATION_EXTENSION, ".gif", ""):
        assert formats.default_output_extension(f"a{ext}") == ".seg.nrrd"
    assert formats.default_output_extension("a.DCM") == ".dcm"  # DICOM in: a DICOM SEG out
    assert set(formats.INPUT_EXTENSIONS) == set(formats.IMAGE_2D_EXTENSIONS) | set(formats.VOLUME_EXTENSIONS) | {
        ".seg.nrrd", ".dcm"}


def test_the_command_line_names_outputs_by_the_registry(tmp_path):
    for ext in formats.INPUT_EXTENSIONS:
        expected = ".png" if ext in formats.IMAGE_2D_EXTENSIONS else ".dcm" if ext == ".dcm" else ".seg.nrrd"
        assert str(default_output(f"/d/case{ext.upper()}", None, None)) == f"/d/case_gms{expected}"
    assert str(default_output("/d/a.b.gif", tmp_path, None)) == str(tmp_path / "a.b_gms.seg.nrrd")
    assert str(default_output("/d/a.png", None, "nii.gz")) == "/d/a_gms.nii.gz"


def test_data_sets_find_exactly_the_registry_image_extensions(tmp_path):
    (tmp_path / "images").mkdir()
    for i, ext in enumerate(formats.IMAGE_2D_EXTENSIONS):
        (tmp_path / "images" / f"case{i}{ext}").write_bytes(b"x")
        assert find_image(tmp_path, f"case{i}") == tmp_path / "images" / f"case{i}{ext}"
    (tmp_path / "images" / "other.gif").write_bytes(b"x")
    with pytest.raises(GMSError, match="no image for case 'other'"):
        find_image(tmp_path, "other")
    # several files of one case: the registry's order decides
    for ext in reversed(formats.IMAGE_2D_EXTENSIONS):
        (tmp_path / "images" / f"many{ext}").write_bytes(b"x")
    assert find_image(tmp_path, "many").name == f"many{formats.IMAGE_2D_EXTENSIONS[0]}"


def test_data_sets_find_exactly_the_registry_volume_extensions(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    for i, ext in enumerate(formats.VOLUME_EXTENSIONS):
        (tmp_path / "imagesTr" / f"case{i}{ext}").write_bytes(b"x")
        assert volume_path(tmp_path, "imagesTr", f"case{i}") == tmp_path / "imagesTr" / f"case{i}{ext}"
    for ext in (".mhd", ".seg.nrrd", ".png"):
        (tmp_path / "imagesTr" / f"other{ext}").write_bytes(b"x")
    with pytest.raises(GMSError, match="no volume for case 'other'"):
        volume_path(tmp_path, "imagesTr", "other")
    for ext in reversed(formats.VOLUME_EXTENSIONS):
        (tmp_path / "imagesTr" / f"many{ext}").write_bytes(b"x")
    assert volume_path(tmp_path, "imagesTr", "many").name == f"many{formats.VOLUME_EXTENSIONS[0]}"


# DICOM (a series folder or a .dcm file, read and written with its source files): test_dicom.py
@pytest.mark.parametrize("ext", [e for e in formats.INPUT_EXTENSIONS if e != formats.DICOM_EXTENSION])
def test_read_image_reads_every_input_format(tmp_path, ext):
    two_d = ext in formats.IMAGE_2D_EXTENSIONS
    path = tmp_path / f"in{ext}"
    sitk.WriteImage(_image_2d() if two_d else _volume(), str(path))
    img = read_image(path)
    assert img.is_2d == two_d
    assert img.array.shape[:3] == ((1, 32, 40) if two_d else (4, 16, 20))  # ITK writes BMP as RGB


@pytest.mark.parametrize("ext", [e for e in formats.OUTPUT_EXTENSIONS if e != formats.DICOM_EXTENSION])
def test_write_labels_writes_every_output_format(tmp_path, ext):
    geometry = Geometry(2, (40, 32), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0, 0.0, 1.0))
    labels = np.zeros((1, 32, 40), np.uint8)
    labels[0, 5:9, 6:12] = 1
    assert output_format(f"out{ext.upper()}") == ext
    path = write_labels(tmp_path / f"out{ext}", labels, geometry, [{"name": "lesion", "label": 1}])
    back = sitk.GetArrayFromImage(sitk.ReadImage(path))
    assert int(back.astype(bool).sum()) == 24
    compressed = ext in formats.COMPRESSED_OUTPUT_EXTENSIONS
    raw = (tmp_path / f"out{ext}").read_bytes()
    if ext in (".nrrd", ".seg.nrrd"):
        assert (b"encoding: gzip" in raw) == compressed


def test_a_dicom_seg_needs_its_source_series(tmp_path):
    geometry = Geometry(2, (40, 32), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0, 0.0, 1.0))
    with pytest.raises(GMSError, match="DICOM SEG references its source series"):
        write_labels(tmp_path / "out.dcm", np.zeros((1, 32, 40), np.uint8), geometry, [])
    assert list(tmp_path.iterdir()) == []


def test_other_outputs_are_refused_with_the_registry_list(tmp_path, capsys):
    supported = ", ".join(formats.OUTPUT_EXTENSIONS)
    for name in ("out.jpg", "out.gif", ".png", "out.mhd"):
        with pytest.raises(GMSError, match="unsupported output file type") as e:
            output_format(tmp_path / name)
        assert str(e.value).endswith(f"(supported: {supported})")
    src = tmp_path / "in.png"
    sitk.WriteImage(_image_2d(), str(src))
    assert main(["segment", str(src), "-o", str(tmp_path / "out.jpg"), "--progress", "none"]) == 2
    assert f"(supported: {supported})" in capsys.readouterr().err
