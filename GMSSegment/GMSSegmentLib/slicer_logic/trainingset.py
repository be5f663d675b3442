"""Exporting (volume, segmentation) pairs of the scene as a data set that ``gms train`` reads, and the training
worker's command line."""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Sequence

import numpy as np

from ..ownedtemp import make_temp_folder, remove_stale_temp_folders
from .geometry import _checkStillInScene, _volumeArray, _volumeShape, _writeVolumeArray, ijkToRasFromVolumeNode
from .mrml import _removeNode, slicer, vtk


def _caseName(name: str, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", name or "case").strip("_") or "case"
    case, k = base, 2
    while case.lower() in taken:
        case, k = f"{base}_{k}", k + 1
    taken.add(case.lower())
    return case


def _eightBit(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as uint8 if its values are whole numbers in 0..255 (8-bit photos, ultrasound, endoscopy), else a
    ValueError naming ``what``: 2D models read 8-bit images, and rescaling other values would train on intensities
    that inference never sees."""
    if array.dtype == np.uint8:
        return array
    if array.size and (array.dtype.kind == "f" and not np.isfinite(array).all()):
        raise ValueError(f"{what} has non-finite values; 2D models train on 8-bit images")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if lo < 0 or hi > 255 or (array.dtype.kind == "f" and not np.array_equal(array, np.round(array))):
        raise ValueError(f"{what} is not an 8-bit image (values {lo:g}..{hi:g}, {array.dtype}); 2D models train on "
                         "8-bit images (0..255), as photos, ultrasound and endoscopy frames are stored")
    return array.astype(np.uint8)


def exportTrainingSet(pairs: Sequence, folder: str, segmentNames: Sequence[str], dimension: int = 3) -> dict:
    """Write (volume node, segmentation node) pairs as a data set that ``gms train`` reads.

    ``dimension`` 3 (3D models): ``imagesTr/<case>.nrrd`` and ``labelsTr/<case>.nrrd`` (label k+1 = the segment named
    ``segmentNames[k]``, on the volume's own grid), scalar volumes only; uncompressed, as the folder is read once.
    ``dimension`` 2 (2D models, e.g. ultrasound or endoscopy frames): ``images/<case>.png`` (8-bit gray or RGB, the
    volume's slice as stored: rows J, columns I) and ``masks/<case>.png`` (one segment: 255; several: k+1). A
    single-slice volume is one case; of a multi-slice volume (a cine clip) every slice with a labelled pixel is one
    case (``<case>_<k>``), as annotators label some frames of a clip, not all.

    Both write ``split.json`` with every case in its ``train`` list (training carves its validation part from it) and
    ``dataset.json`` naming the label values. Everything is checked before anything is written (scalar volumes for
    3D, 8-bit values for 2D, every named segment present in every segmentation); the files are written to a
    temporary folder beside ``folder`` and renamed at the end, so a failure leaves nothing behind, and an existing
    non-empty ``folder`` is never written into. Returns ``{"folder", "cases", "segments", "voxels", "dimension"}``
    (foreground voxels per segment name). A :class:`TrainingJob` runs the same export in steps, writing the files in
    a thread so that Slicer stays responsive."""
    export = TrainingSetExport(pairs, folder, segmentNames, dimension)
    try:
        for i in range(len(export)):
            export.read(i)()
        return export.finish()
    except BaseException:
        export.abort()
        raise


class TrainingSetExport:
    """:func:`exportTrainingSet` in steps. The constructor checks everything and writes nothing; :meth:`read` reads
    pair ``i`` from the scene (in the caller's thread: MRML is not thread-safe; the labelmap export and two array
    copies) and returns a function without arguments that writes it (any thread); :meth:`finish` writes the lists
    and renames the temporary folder to ``folder``; :meth:`abort` removes it. Reads go in pair order."""

    def __init__(self, pairs: Sequence, folder: str, segmentNames: Sequence[str], dimension: int = 3):
        names = [str(n).strip() for n in segmentNames]
        if not names or any(not n for n in names) or len({n.lower() for n in names}) != len(names):
            raise ValueError(f"segment names must be non-empty and distinct, got {list(segmentNames)}")
        if dimension not in (2, 3):
            raise ValueError(f"dimension must be 2 or 3, got {dimension!r}")
        if dimension == 2 and len(names) > 254:
            raise ValueError("a 2D training set holds at most 254 segments (8-bit masks)")
        if not pairs:
            raise ValueError("no (volume, segmentation) pairs to export")
        if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
            raise ValueError(f"{folder} already exists and is not an empty folder; choose a new one")
        plan = []
        for volumeNode, segmentationNode in pairs:
            if volumeNode is None or segmentationNode is None:
                raise ValueError("each pair needs a volume node and a segmentation node")
            image = volumeNode.GetImageData()
            if image is None:
                raise ValueError(f"volume '{volumeNode.GetName()}' has no image data")
            if dimension == 3 and image.GetNumberOfScalarComponents() != 1:
                raise ValueError(f"volume '{volumeNode.GetName()}' is not a scalar volume (3D models train on scalar "
                                 "volumes only)")
            if dimension == 2:
                if image.GetNumberOfScalarComponents() not in (1, 3, 4):
                    raise ValueError(f"volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} "
                                     "components per voxel; 2D models train on gray or RGB images")
                _eightBit(_volumeArray(volumeNode, copy=False), f"volume '{volumeNode.GetName()}'")
            seg = segmentationNode.GetSegmentation()
            byName = {}
            for i in range(seg.GetNumberOfSegments()):
                sid = seg.GetNthSegmentID(i)
                byName.setdefault(seg.GetSegment(sid).GetName().strip().lower(), sid)
            missing = [n for n in names if n.lower() not in byName]
            if missing:
                raise ValueError(f"segmentation '{segmentationNode.GetName()}' of volume '{volumeNode.GetName()}' "
                                 f"has no segment named {', '.join(repr(m) for m in missing)}")
            plan.append((volumeNode, segmentationNode, [byName[n.lower()] for n in names]))
        self.folder, self.names, self.dimension, self._plan = folder, names, dimension, plan
        self.cases: list[str] = []
        self.voxels = {n: 0 for n in names}
        self._taken: set = set()
        self._tmp: str | None = None

    def __len__(self) -> int:
        return len(self._plan)

    def _begin(self) -> str:
        if self._tmp is None:
            parent = os.path.dirname(os.path.abspath(self.folder))
            os.makedirs(parent, exist_ok=True)
            remove_stale_temp_folders(parent, ".gms-export-")  # left by a killed Slicer
            self._tmp = make_temp_folder(parent, ".gms-export-")
            for sub in (("imagesTr", "labelsTr") if self.dimension == 3 else ("images", "masks")):
                os.makedirs(os.path.join(self._tmp, sub))
        return self._tmp

    def read(self, i: int):
        tmp = self._begin()
        volumeNode, segmentationNode, ids = self._plan[i]
        _checkStillInScene((volumeNode, segmentationNode), "while the cases were exported")
        case = _caseName(volumeNode.GetName(), self._taken)
        labels = _segmentsOnVolumeGrid(segmentationNode, ids, volumeNode)
        for k, n in enumerate(self.names):
            self.voxels[n] += int((labels == k + 1).sum())
        image = _volumeArray(volumeNode)
        if self.dimension == 3:
            ijkToRas = ijkToRasFromVolumeNode(volumeNode)
            self.cases.append(case)

            def write():
                _writeVolumeArray(image, ijkToRas, os.path.join(tmp, "imagesTr", f"{case}.nrrd"))
                _writeVolumeArray(labels, ijkToRas, os.path.join(tmp, "labelsTr", f"{case}.nrrd"))
            return write
        image = _eightBit(image, f"volume '{volumeNode.GetName()}'")
        if image.shape[0] == 1:
            frames = [(case, 0)]
        else:
            frames = [(_caseName(f"{case}_{k}", self._taken), k) for k in range(image.shape[0]) if labels[k].any()]
            if not frames:
                raise ValueError(f"segmentation '{segmentationNode.GetName()}' labels no slice of its "
                                 f"{image.shape[0]}-slice volume; label the frames to train on")
        self.cases += [name for name, _ in frames]
        return lambda: _writeFrames(tmp, frames, image, labels, len(self.names))

    def finish(self) -> dict:
        tmp = self._begin()
        with open(os.path.join(tmp, "split.json"), "w") as f:
            json.dump({"train": self.cases}, f, indent=1)
        labelValues = {n: (255 if self.dimension == 2 and len(self.names) == 1 else k + 1)
                       for k, n in enumerate(self.names)}
        with open(os.path.join(tmp, "dataset.json"), "w") as f:  # for people: which label value is which segment
            json.dump({"labels": labelValues, "cases": len(self.cases), "dimension": self.dimension}, f, indent=1)
        if os.path.isdir(self.folder):
            os.rmdir(self.folder)  # empty, checked in the constructor
        os.replace(tmp, self.folder)
        self._tmp = None
        return {"folder": self.folder, "cases": list(self.cases), "segments": self.names, "voxels": dict(self.voxels),
                "dimension": self.dimension}

    def abort(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _segmentsOnVolumeGrid(segmentationNode, segmentIds: Sequence[str], volumeNode) -> np.ndarray:
    """The segments as one (K, J, I) label array on the volume's grid (label k+1 = ``segmentIds[k]``), through a
    temporary labelmap node."""
    scene = volumeNode.GetScene()
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        idArray = vtk.vtkStringArray()
        for sid in segmentIds:
            idArray.InsertNextValue(sid)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, idArray, labelNode, volumeNode):
            raise ValueError(f"cannot export the segments of '{segmentationNode.GetName()}' onto "
                             f"'{volumeNode.GetName()}'")
        labels = _volumeArray(labelNode)
        if labels.shape != _volumeShape(volumeNode):
            raise ValueError(f"the labels of '{volumeNode.GetName()}' came out on another grid")
        return labels
    finally:
        _removeNode(scene, labelNode)


def _writeFrames(folder: str, frames: Sequence[tuple[str, int]], image: np.ndarray, labels: np.ndarray,
                 nSegments: int) -> None:
    """Write slices ``k`` of one 2D case as ``images/<name>.png`` and ``masks/<name>.png`` for each (name, k)."""
    from PIL import Image

    for name, k in frames:
        Image.fromarray(np.ascontiguousarray(image[k])).save(os.path.join(folder, "images", f"{name}.png"))
        mask = labels[k].astype(np.uint8)
        if nSegments == 1:
            mask = np.where(mask == 1, 255, 0).astype(np.uint8)
        Image.fromarray(mask).save(os.path.join(folder, "masks", f"{name}.png"))


def trainingArguments(dataFolder: str, outputFolder: str, segmentNames: Sequence[str], initFrom: str | None = None,
                      maxMinutes: float | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The worker's command line (after ``python -m GMSSegmentLib``) that trains, or with ``initFrom`` adapts, a
    model on a folder written by ``exportTrainingSet``, reporting progress as JSON lines."""
    args = ["train", str(dataFolder), "-o", str(outputFolder), "--segments", *[str(n) for n in segmentNames],
            "--progress", "json"]
    if initFrom:
        args += ["--init-from", str(initFrom)]
    if maxMinutes:
        args += ["--max-minutes", f"{float(maxMinutes):g}"]
    return args + [str(e) for e in extra]
