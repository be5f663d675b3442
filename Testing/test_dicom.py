"""DICOM in, DICOM SEG out, on real DICOM files written in the test (dicom_helpers.py) from a hippocampus MRI volume
and a BUSI ultrasound image: a series folder is read with its geometry as SimpleITK's series reader gives it (the
result equals that of the same volume as NIfTI, every voxel), the SEG read back with highdicom holds the same labels,
references its source and carries the card's codes; several series in a folder, the refusals, and the codes on the
.seg.nrrd output that Slicer's own DICOM export writes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_gms
from dicom_helpers import write_mr_series, write_us_image

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from GMSSegmentLib.model import resolve_model_path  # noqa: E402


@pytest.fixture(scope="module")
def volume(hippo_dir):
    return sorted((hippo_dir / "imagesTr").glob("*.nii.gz"))[0]


@pytest.fixture(scope="module")
def series(volume, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "mr"
    return folder, write_mr_series(volume, folder)


def _seg_labels(seg_path, source_files) -> np.ndarray:
    """The SEG's segment numbers per voxel, on the source files' frames (in the given order)."""
    seg = hd.seg.segread(str(seg_path))
    uids = [pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in source_files]
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                              skip_overlap_checks=True)


def _gdcm_order(folder):
    return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))


def test_series_in_seg_out_equals_nifti(series, volume, tmp_path):
    folder, uids = series
    jobs = tmp_path / "jobs.json"  # one process for the three results
    jobs.write_text(json.dumps([{"input": str(folder), "output": str(tmp_path / "from-dicom.nii.gz")},
                                {"input": str(volume), "output": str(tmp_path / "from-nifti.nii.gz")},
                                {"input": str(folder), "output": str(tmp_path / "seg.dcm")}]))
    p = run_gms("segment", "--jobs", jobs, "--model", "hippocampus", "--no-tta", "--progress", "none", check=True)
    assert "seg.dcm (" in p.stdout and "anterior" in p.stdout
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from-nifti.nii.gz")))
    from_dicom = sitk.ReadImage(str(tmp_path / "from-dicom.nii.gz"))
    reference = sitk.ReadImage(str(volume))
    assert np.allclose(from_dicom.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    assert np.allclose(from_dicom.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(from_dicom), nifti)  # the DICOM series is the same volume
    assert set(np.unique(nifti).tolist()) == {0, 1, 2}

    labels = _seg_labels(tmp_path / "seg.dcm", _gdcm_order(folder))
    assert np.array_equal(labels, nifti)  # every voxel: segment numbers 1, 2 are the card's labels 1, 2

    seg = pydicom.dcmread(str(tmp_path / "seg.dcm"), stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == uids["study"] and seg.FrameOfReferenceUID == uids["frame"]
    assert seg.SeriesInstanceUID != uids["series"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == uids["slices"]
    assert seg.PatientID == "GMS-TEST-1" and str(seg.PatientName) == "Test^Hippocampus"
    card = json.loads((resolve_model_path("hippocampus") / "card.json").read_text())
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [s["name"] for s in card["segments"]]
    for item, s in zip(seg.SegmentSequence, card["segments"]):
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert [code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning] == s["terminology"]["type"]
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == s["terminology"]["category"][1]
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == "GMS hippocampus"
        params = item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        import hashlib

        weights = resolve_model_path("hippocampus") / "model.safetensors"
        assert hashlib.sha256(weights.read_bytes()).hexdigest() in params


def test_ultrasound_frame_in_seg_out(busi_dir, tmp_path):
    png = busi_dir / "images" / "malignant_10.png"
    uids = write_us_image(png, tmp_path / "us" / "frame.dcm")
    jobs = tmp_path / "jobs.json"  # one process for both
    jobs.write_text(json.dumps([{"input": str(png), "output": str(tmp_path / "from-png.png")},
                                {"input": str(tmp_path / "us" / "frame.dcm"), "output": str(tmp_path / "us.dcm")}]))
    run_gms("segment", "--jobs", jobs, "--model", "busi-lesion", check=True)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from-png.png"))) > 0
    assert expected.any()
    labels = _seg_labels(tmp_path / "us.dcm", [tmp_path / "us" / "frame.dcm"])
    assert labels.shape[0] == 1 and np.array_equal(labels[0] == 1, expected)
    seg = pydicom.dcmread(str(tmp_path / "us.dcm"), stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == uids["sop"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Mass"


def test_folder_of_two_series(series, volume, tmp_path):
    folder, first = series
    both = tmp_path / "study"
    shutil.copytree(folder, both)
    second = write_mr_series(volume, both / "b", series_number=4, study=first["study"])
    for f in (both / "b").iterdir():
        f.rename(both / f"s4-{f.name}")
    (both / "b").rmdir()
    out = tmp_path / "out"
    out.mkdir()
    # one output file for two series: refused, nothing written
    p = run_gms("segment", both, "-o", tmp_path / "one.dcm", "--model", "hippocampus")
    assert p.returncode == 2 and "-o must be an existing folder" in p.stderr and not (tmp_path / "one.dcm").exists()
    p = run_gms("segment", both, "-o", out, "--model", "hippocampus", "--no-tta", "--progress", "none", check=True)
    assert sorted(f.name for f in out.iterdir()) == ["study_series3_gms.dcm", "study_series4_gms.dcm"]
    for name, uids in (("study_series3_gms.dcm", first), ("study_series4_gms.dcm", second)):
        seg = pydicom.dcmread(str(out / name), stop_before_pixels=True)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    p = run_gms("segment", both, "-o", tmp_path / "picked.nii.gz", "--series", second["series"], "--model",
                "hippocampus", "--no-tta", check=True)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(out.parent / "picked.nii.gz")))
    assert np.array_equal(_seg_labels(out / "study_series4_gms.dcm",
                                      _gdcm_order_of(both, second["series"])), reference)


def test_a_study_archive_tree(series, volume, tmp_path):
    """A folder without series of its own: every series in the folders below it, each output named by its path."""
    folder, first = series
    archive = tmp_path / "archive"
    shutil.copytree(folder, archive / "patient1" / "mr")
    second = write_mr_series(volume, archive / "patient2" / "mr", series_number=5)
    out = tmp_path / "out"
    out.mkdir()
    run_gms("segment", archive, "-o", out, "--model", "hippocampus", "--no-tta", "--progress", "none", check=True)
    assert sorted(f.name for f in out.iterdir()) == ["patient1_mr_gms.dcm", "patient2_mr_gms.dcm"]
    for name, uids in (("patient1_mr_gms.dcm", first), ("patient2_mr_gms.dcm", second)):
        seg = pydicom.dcmread(str(out / name), stop_before_pixels=True)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]


def _gdcm_order_of(folder, uid):
    return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)


def test_refusals(series, busi_dir, tmp_path):
    folder, _ = series
    png = busi_dir / "images" / "malignant_10.png"
    cases = [
        (["segment", png, "-o", tmp_path / "x.dcm"], "a DICOM SEG references its source series"),
        (["segment", tmp_path, "-o", tmp_path / "y.nii.gz"], "no DICOM image series in this folder"),
        (["segment", folder, "-o", tmp_path / "z.png"], "PNG output needs a 2D image"),
        (["segment", folder, "-o", tmp_path / "w.dcm", "--series", "1.2.3"], "no series with UID 1.2.3"),
    ]
    for args, message in cases:
        p = run_gms(*args, "--model", "hippocampus")
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)
        assert len([line for line in p.stderr.splitlines() if line.startswith("gms: error")]) == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == []  # nothing written

    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    victim = sorted(mixed.iterdir())[3]
    ds = pydicom.dcmread(str(victim))
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(str(victim))
    p = run_gms("segment", mixed, "-o", tmp_path / "m.dcm", "--model", "hippocampus")
    assert p.returncode == 2 and "mixes slice geometries" in p.stderr and not (tmp_path / "m.dcm").exists()

    (tmp_path / "exists.dcm").write_bytes(b"keep")
    p = run_gms("segment", folder, "-o", tmp_path / "exists.dcm", "--model", "hippocampus")
    assert p.returncode == 2 and "exists" in p.stderr and (tmp_path / "exists.dcm").read_bytes() == b"keep"


def test_seg_nrrd_carries_slicer_terminology(volume, tmp_path):
    """The .seg.nrrd (what Slicer's worker writes) tags each segment with the card's codes as Slicer's terminology
    entry, which Slicer's DICOM export of the Segmentation node writes into its SEG."""
    run_gms("segment", volume, "-o", tmp_path / "r.seg.nrrd", "--model", "hippocampus", "--no-tta", check=True)
    img = sitk.ReadImage(str(tmp_path / "r.seg.nrrd"))
    tags = [img.GetMetaData(f"Segment{k}_Tags") for k in range(2)]
    for tag in tags:
        entry = tag.split("TerminologyEntry:", 1)[1].split("|", 1)[0]
        parts = entry.split("~")
        assert len(parts) == 7 and parts[1] == "SCT^123037004^Anatomical Structure"
        assert parts[2] == "SCT^5366008^Hippocampus"


def test_card_terminology_is_checked():
    from GMSSegmentLib import GMSError
    from GMSSegmentLib.card import parse_card

    card = json.loads((resolve_model_path("busi-lesion") / "card.json").read_text())
    card["segments"][0]["terminology"] = {"category": ["SCT", "49755003"], "type": ["SCT", "4147007", "Mass"]}
    with pytest.raises(GMSError, match=r"segments\[0\]\.terminology"):
        parse_card(card)


def test_nothing_found_is_a_valid_seg_with_empty_frames(series, tmp_path):
    """A result without any segment (as ``gms segment`` gives where nothing is found) is written as a valid SEG whose
    frames are empty (highdicom keeps them when every frame would be left out), read back as all background."""
    from GMSSegmentLib.dicomseg import write_seg
    from GMSSegmentLib.model import GMSModel

    folder, uids = series
    files = _gdcm_order(folder)
    model = GMSModel.load(resolve_model_path("hippocampus"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    labels = np.zeros((uids["slices"], first.Rows, first.Columns), np.uint8)
    path = write_seg(tmp_path / "empty.dcm", labels, files, model.segments, model.card, resolve_model_path("hippocampus"))
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == 2
    assert not _seg_labels(path, files).any()
    with pytest.raises(Exception, match="result slices"):
        write_seg(tmp_path / "wrong.dcm", labels[:3], files, model.segments, model.card)
    assert not (tmp_path / "wrong.dcm").exists()
