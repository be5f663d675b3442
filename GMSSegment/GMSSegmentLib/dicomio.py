"""DICOM input: a series folder (or one DICOM file) read as a volume with its geometry, exactly as SimpleITK's series
reader (GDCM) gives it, and the files behind each slice kept for the DICOM SEG that references them (dicomseg.py).

- A folder with one series is that series; a folder with several is one input per series (``gms segment`` makes one
  output per series, or ``--series UID`` picks one). :func:`expand_dicom_inputs` does that before any model loads.
- One ``.dcm`` file (a 2D ultrasound or endoscopy frame, or one slice) is read as a one-slice volume.
- GDCM sorts a series' files along the slice normal (Image Position/Orientation Patient); the volume's slice k is
  ``files[k]``. A series whose slices do not share one orientation, spacing or size is refused, as are non-image
  objects (SR, an existing SEG), with the usual one-line error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from . import GMSError
from .errortext import sitk_reason

DICOM_EXTENSION = ".dcm"


@dataclass(frozen=True)
class DicomSeries:
    """One series: its Series Instance UID, its files in slice order, and a short name for output files."""

    uid: str
    files: tuple[str, ...]
    name: str


def is_dicom_input(path: str | os.PathLike) -> bool:
    """A folder (DICOM series are looked for in it) or a ``.dcm`` file."""
    p = os.fspath(path)
    return os.path.isdir(p) or p.lower().endswith(DICOM_EXTENSION)


def series_in(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM image series directly in ``folder`` (sorted by Series Number, then UID); [] when there are none."""
    folder = os.fspath(folder)
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ()
    except RuntimeError as e:
        raise GMSError(f"cannot read the DICOM folder {folder}: {sitk_reason(e)}") from e
    out = []
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid) or ())
        if files:
            number = _tags(files[0], ("0020|0011",))[0]
            out.append((int(number) if number.isdigit() else 1 << 30, uid, files))
    out.sort()
    base = Path(folder).name or "series"
    named = []
    for number, uid, files in out:
        suffix = f"_series{number}" if number != 1 << 30 else f"_{uid.rsplit('.', 1)[-1]}"
        named.append(DicomSeries(uid, files, base + (suffix if len(out) > 1 else "")))
    return named


def _tags(path: str, keys) -> tuple[str, ...]:
    """The values of DICOM tags (``"gggg|eeee"``) of one file, read from its header once ('' where absent)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return tuple("" for _ in keys)
    return tuple(reader.GetMetaData(k).strip() if reader.HasMetaDataKey(k) else "" for k in keys)


def pick_series(folder: str | os.PathLike, uid: str | None = None) -> DicomSeries:
    """The one series of ``folder`` (or the one with Series Instance UID ``uid``); GMSError otherwise."""
    found = series_in(folder)
    if not found:
        raise GMSError(f"{os.fspath(folder)}: no DICOM image series in this folder (GMSSegment reads a folder of one "
                       "series' files, a .dcm file, or image files)")
    if uid is not None:
        match = [s for s in found if s.uid == uid]
        if not match:
            raise GMSError(f"{os.fspath(folder)}: no series with UID {uid} (found {', '.join(s.uid for s in found)})")
        return match[0]
    if len(found) > 1:
        raise GMSError(f"{os.fspath(folder)} holds {len(found)} DICOM series: choose one with --series UID, or give "
                       f"an output folder for one result per series ({', '.join(s.uid for s in found)})")
    return found[0]


def series_in_tree(folder: str | os.PathLike) -> list[tuple[str, DicomSeries]]:
    """Every DICOM image series in the folders below ``folder`` (a study archive: patient/study/series folders), as
    (its folder, the series) in sorted folder order; each named by its folder's path below ``folder``."""
    top = Path(folder)
    out = []
    for root, dirs, _ in os.walk(top):
        dirs.sort()
        if Path(root) == top:
            continue
        rel = "_".join(Path(root).relative_to(top).parts)
        for s in series_in(root):
            out.append((root, DicomSeries(s.uid, s.files, rel + s.name[len(Path(root).name):])))
    return out


def expand_dicom_inputs(inputs: list[str], series_uid: str | None) -> list[tuple[str, str | None, str]]:
    """Each input as (path, series UID or None, output stem): a folder with several series becomes one entry per
    series (all of them, or the ``series_uid`` one); a folder without series of its own, one entry per series in the
    folders below it (a study archive); a file or a one-series folder stays one entry."""
    out = []
    for path in inputs:
        if os.path.isdir(path):
            found = series_in(path)
            if not found:
                tree = [(root, s) for root, s in series_in_tree(path) if series_uid in (None, s.uid)]
                if tree:
                    out.extend((root, s.uid, s.name) for root, s in tree)
                    continue
            if series_uid is not None:
                found = [s for s in found if s.uid == series_uid] or found[:0]
                if not found:
                    raise GMSError(f"{path}: no series with UID {series_uid}")
            if len(found) > 1:
                out.extend((path, s.uid, s.name) for s in found)
                continue
            out.append((path, found[0].uid if found else series_uid, found[0].name if found else Path(path).name))
        else:
            out.append((path, series_uid, None))
    return out


def read_dicom(path: str | os.PathLike, series_uid: str | None = None) -> tuple[sitk.Image, tuple[str, ...]]:
    """A DICOM series folder or a ``.dcm`` file as a SimpleITK image (3D; one slice for a single file) and its files in
    slice order. GMSError (one line) for a folder without image series, several series and no choice, unreadable or
    mixed-geometry slices, and non-image objects."""
    p = os.fspath(path)
    if os.path.isdir(p):
        series = pick_series(p, series_uid)
        files = series.files
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(files))
        try:
            img = reader.Execute()
        except RuntimeError as e:
            raise GMSError(f"cannot read the DICOM series {series.uid} in {p}: {sitk_reason(e)}") from e
        _check_one_geometry(p, files)
    else:
        files = (p,)
        try:
            img = sitk.ReadImage(p)
        except RuntimeError as e:
            raise GMSError(f"cannot read the DICOM file {p}: {sitk_reason(e)}") from e
    if img.GetDimension() == 2:
        img = sitk.JoinSeries([img])
    return img, tuple(files)


def _check_one_geometry(where: str, files) -> None:
    """Every slice of a series has the same orientation, size and pixel spacing (GDCM would otherwise stack slices of
    different grids into one volume)."""
    seen = set()
    for f in files:
        seen.add(_tags(f, ("0020|0037", "0028|0010", "0028|0011", "0028|0030")))
        if len(seen) > 1:
            raise GMSError(f"{where}: the series mixes slice geometries (orientation, size or pixel spacing differ "
                           f"between its files); GMSSegment reads series of one grid")
