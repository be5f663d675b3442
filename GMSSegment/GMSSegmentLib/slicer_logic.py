"""The MRML side of GMSSegment: run the engine as a background worker on volume nodes and import its results.

This module never imports qt: it works in the 3D Slicer application and on the headless ``slicer-core`` MRML library
(tests). The GUI (``GMSSegment.py``) starts a :class:`SegmentationJob` with :meth:`SegmentationLogic.start` and calls
:meth:`SegmentationJob.poll` from a timer; nothing here blocks unless asked to (:meth:`SegmentationJob.wait`,
:meth:`SegmentationLogic.segment`).

How a job runs
--------------
1. Every input volume node (scalar ``vtkMRMLScalarVolumeNode`` or RGB ``vtkMRMLVectorVolumeNode``; one slice or many)
   is exported with its geometry to a NRRD file in a private temporary folder (IJK-to-RAS turned into the LPS origin,
   spacing and direction that files store).
2. The engine command line is started as a child process in its own process group / session::

       python -m GMSSegmentLib segment IN -o OUT.seg.nrrd --model DIR --device auto --progress json
       python -m GMSSegmentLib segment --jobs JOBS.json --model DIR --device auto --progress json   (several volumes)

   Its stdout (one JSON event a line) and stderr are read by two daemon threads into a queue, so :meth:`poll` never
   waits on a pipe.
3. When the worker has exited, :meth:`poll` imports every result into a *new* ``vtkMRMLSegmentationNode`` (or as new
   segments of a chosen node; names are made unique, e.g. ``lesion (2)``, so edited segments are never overwritten),
   with the model card's segment names and colours and the input volume as reference geometry.
4. Cancel ends the whole process tree from a thread (SIGTERM to the group, SIGKILL after a short grace; ``taskkill
   /T /F`` on Windows), so neither cancel nor shutdown waits in the caller's (GUI) thread; see ``workerprocess``. On
   cancel or failure the scene is left unchanged; the temporary folder is always removed.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import GMSError, modelpaths
from .dependencies import OPTIONAL_REQUIREMENTS, REQUIREMENTS, missingRequirements, requirementsForCard  # noqa: F401
from .labelwrite import write_image
from .ownedtemp import make_temp_folder, remove_stale_temp_folders
from .workerprocess import WorkerProcess, describeAbnormalExit

try:  # in Slicer and with slicer-core; the engine itself never needs these
    import slicer
    import vtk
except ImportError:  # pragma: no cover - only when the engine is installed without MRML
    slicer = None
    vtk = None

log = logging.getLogger(__name__)

__all__ = [
    "SegmentationLogic",
    "SegmentationJob",
    "TrainingJob",
    "VolumeTask",
    "JobState",
    "TaskState",
    "REQUIREMENTS",
    "OPTIONAL_REQUIREMENTS",
    "missingRequirements",
    "requirementsForModel",
    "moduleDirectory",
    "findPythonExecutable",
    "findModels",
    "readModelCard",
    "modelSummary",
    "headlineMetric",
    "exportVolumeNode",
    "exportTrainingSet",
    "TrainingSetExport",
    "trainingArguments",
    "addVolumeNodeFromFile",
    "uniqueSegmentName",
    "ijkToRasFromVolumeNode",
    "lpsGeometryFromIjkToRas",
    "ijkToRasFromLpsGeometry",
]

DEVICES = ("auto", "cpu", "cuda")
PIPE_DRAIN_S = 2.0  # after the worker exited, wait at most this long for its pipes to close
_BINARY_LABELMAP = "Binary labelmap"
_TEMP_PREFIX = "GMSSegment-"


# ------------------------------------------------------------------------------------------------------------ states


class JobState:
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every volume segmented and imported
    PARTIAL = "partial"  # batch: some volumes succeeded, some failed
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINISHED = (SUCCEEDED, PARTIAL, FAILED, CANCELLED)


class TaskState:
    PENDING = "pending"
    RUNNING = "running"
    SEGMENTED = "segmented"  # the worker reported a result; imported when the worker has exited
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# ------------------------------------------------------------------------------------------------ environment helpers


def moduleDirectory() -> str:
    """The folder that holds the ``GMSSegmentLib`` package (the Slicer module's folder); the worker's PYTHONPATH."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inSlicerApplication() -> bool:
    return slicer is not None and hasattr(slicer, "app")


def findPythonExecutable() -> str:
    """PythonSlicer inside the Slicer application (next to ``sys.executable`` or on PATH), else ``sys.executable``."""
    if _inSlicerApplication():
        exe = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        candidates = [os.path.join(os.path.dirname(sys.executable), exe), shutil.which("PythonSlicer")]
        for cand in candidates:
            if cand and os.path.isfile(cand):
                return cand
    return sys.executable


def workerEnvironment(weightsDir: str | None = None, base: dict | None = None) -> dict:
    """Environment of the worker: ``base`` (in Slicer its startup environment, to which the PythonSlicer launcher
    adds Slicer's own paths; else this process's), the module folder first on PYTHONPATH, unbuffered UTF-8 output,
    and the engine's settings of this process: every ``GMS_*`` variable of ``os.environ`` (e.g. ``GMS_MODELS_DIR``,
    which the module extends while Slicer runs, so Slicer's startup environment lacks it); ``weightsDir`` wins over
    ``GMS_WEIGHTS_DIR``."""
    if base is None:
        base = os.environ.copy()
        if _inSlicerApplication():
            with contextlib.suppress(Exception):
                base = slicer.util.startupEnvironment()
    env = dict(base)
    env.update({k: v for k, v in os.environ.items() if k.startswith("GMS_")})
    paths = [moduleDirectory()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if weightsDir:
        env["GMS_WEIGHTS_DIR"] = str(weightsDir)
    return env


# ---------------------------------------------------------------------------------------------------- requirements


def requirementsForModel(model: str | None = None) -> list[str]:
    """The worker's Python packages for a model (folder or name; see ``dependencies.requirementsForCard``)."""
    card = None
    if model:
        with contextlib.suppress(Exception):
            card = readModelCard(model)
    return requirementsForCard(card)


# ---------------------------------------------------------------------------------------------------------- models


def findModels(searchPaths: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``(name, folder)`` of every model folder (a folder with ``card.json``) in the search paths, first one wins."""
    return [(name, str(folder)) for name, folder in modelpaths.find_models(searchPaths)]


def resolveModel(model: str, searchPaths: Sequence[str] | None = None) -> str:
    """A model folder path (returned absolute) or the name of a model found by :func:`findModels`."""
    if not model or not str(model).strip():
        raise ValueError("no model selected: choose a model folder")
    try:
        return str(modelpaths.resolve_model_path(model, searchPaths))
    except GMSError as e:
        raise ValueError(str(e)) from None


def readModelCard(model: str) -> dict:
    """The model folder's ``card.json`` (a dict); ValueError with a clear message when missing or invalid."""
    folder = resolveModel(model)
    path = os.path.join(folder, "card.json")
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a GMS model folder (card.json is missing)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model card {path}: {e}") from None
    if not isinstance(card, dict):
        raise ValueError(f"the model card {path} is not a JSON object")
    return card


def headlineMetric(card: dict) -> dict | None:
    """The figure to show a user for a model: the mean Dice of its recorded evaluation on a test list at the model's
    input size (else at native size, else any recorded evaluation), else its validation Dice. Returns ``{"dice",
    "cases", "what"}`` or None when the card records nothing."""
    metrics = card.get("metrics") if isinstance(card.get("metrics"), dict) else {}
    evaluations = [(k, v) for k, v in metrics.items() if k != "validation" and isinstance(v, dict)
                   and isinstance(v.get("segments"), dict) and "no-tta" not in k]

    def rank(item):
        parts = item[0].split("/")
        return ("test" not in parts, "model" not in parts, "native" not in parts)
    for key, value in sorted(evaluations, key=rank):
        segments = value["segments"]
        dice = segments["mean"].get("dice_mean") if isinstance(segments.get("mean"), dict) else None
        if dice is None:
            dices = [v.get("dice_mean") for n, v in segments.items() if isinstance(v, dict) and n != "mean"]
            dices = [float(d) for d in dices if d is not None]
            dice = sum(dices) / len(dices) if dices else None
        if dice is None:
            continue
        data, listName, *rest = key.split("/") + ["", ""]
        where = {"model": "at the input size", "native": "at native size"}.get(rest[0], "")
        what = f"{data} {listName}".strip() + (f", {where}" if where else "")
        return {"dice": float(dice), "cases": _int(value.get("cases"), 0), "what": what}
    validation = metrics.get("validation")
    if isinstance(validation, dict) and validation.get("dice") is not None:
        return {"dice": float(validation["dice"]), "cases": _int(validation.get("cases"), 0),
                "what": "held-out validation cases"}
    return None


def modelSummary(card: dict, fallbackName: str = "model") -> str:
    """One paragraph for the model selector: what the model segments, in which images, how well (the recorded Dice,
    see :func:`headlineMetric`), what it was adapted from, and the licence of its training data."""
    name = card.get("name") or fallbackName
    segments = ", ".join(str(s.get("name")) for s in card.get("segments", []) if isinstance(s, dict)) or "?"
    dimension = card.get("dimension")
    kind = {2: "2D images (each slice of a volume on its own)", 3: "volumes, slice by slice"}.get(dimension, "images")
    description = str(card.get("description") or "").strip().rstrip(".")
    foundation = card.get("foundation", {})
    foundationName = foundation.get("name") if isinstance(foundation, dict) else foundation
    text = f"{name}: {description}. " if description else f"{name}. "
    text += f"Segments {segments} in {kind}; input {card.get('input_size', '?')} px, foundation {foundationName or '?'}."
    metric = headlineMetric(card)
    if metric is not None:
        cases = f", {metric['cases']} cases" if metric["cases"] else ""
        text += f" Dice {metric['dice']:.3f} ({metric['what']}{cases})."
    initFrom = (card.get("training") or {}).get("init_from") if isinstance(card.get("training"), dict) else None
    if isinstance(initFrom, dict) and initFrom.get("name"):
        text += f" Adapted from {initFrom['name']}."
    if card.get("licence"):
        text += f" Data licence: {card['licence']}."
    return text


# -------------------------------------------------------------------------------------------------------- geometry

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def ijkToRasFromVolumeNode(volumeNode) -> np.ndarray:
    """The volume node's IJK-to-RAS matrix (4x4 numpy array; local coordinates, parent transforms not applied)."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def lpsGeometryFromIjkToRas(ijkToRas: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """``(origin, spacing, direction)`` in ITK's LPS convention (direction row-major, columns = axis directions)."""
    ijkToRas = np.asarray(ijkToRas, dtype=float)
    lin = ijkToRas[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ValueError(f"invalid volume geometry: spacing {spacing.tolist()}")
    direction = _RAS_TO_LPS @ (lin / spacing)
    origin = _RAS_TO_LPS @ ijkToRas[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.flatten().tolist())


def ijkToRasFromLpsGeometry(origin, spacing, direction) -> np.ndarray:
    """Inverse of :func:`lpsGeometryFromIjkToRas` (2D geometries get z spacing 1, origin z 0)."""
    origin, spacing, direction = list(origin), list(spacing), list(direction)
    if len(origin) == 2:
        origin, spacing = origin + [0.0], spacing + [1.0]
        d = direction
        direction = [d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0]
    m = np.eye(4)
    m[:3, :3] = _RAS_TO_LPS @ np.array(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    m[:3, 3] = _RAS_TO_LPS @ np.array(origin, dtype=float)
    return m


def _vtkMatrix(m: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            out.SetElement(i, j, float(m[i][j]))
    return out


def _volumeShape(volumeNode) -> tuple:
    """(K, J, I) of a volume node that has voxels; ValueError naming it otherwise. Cheap: reads no voxels."""
    image = volumeNode.GetImageData() if volumeNode is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volumeNode.GetName() if volumeNode else None}' has no image data")
    dims = image.GetDimensions()
    if min(dims) < 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' is empty (dimensions {dims})")
    return tuple(reversed(dims))


def _volumeArray(volumeNode, copy: bool = True) -> np.ndarray:
    """A copy of the voxels: (K, J, I) scalar or (K, J, I, 3) RGB; RGBA drops alpha, other multi-component keeps one.
    ``copy=False`` may return a view of the node's own voxels instead (to check them, never to keep)."""
    shape = _volumeShape(volumeNode)
    import vtk.util.numpy_support as vtk_np

    image = volumeNode.GetImageData()
    ncomp = image.GetNumberOfScalarComponents()
    arr = vtk_np.vtk_to_numpy(image.GetPointData().GetScalars())
    arr = arr.reshape(shape + ((ncomp,) if ncomp > 1 else ()))
    if copy:
        arr = np.array(arr, copy=True)
    if ncomp == 4:
        arr = arr[..., :3]
    elif ncomp == 2 or ncomp > 4:
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def exportVolumeNode(volumeNode, path: str, compress: bool = False) -> dict:
    """Write a scalar or RGB vector volume node with its geometry (LPS, as files store it) to ``path`` via SimpleITK.

    Returns ``{"shape": (K, J, I), "components": n}``. The node's own IJK-to-RAS is used (a parent transform is not
    hardened); results are imported back into the same coordinate frame.
    """
    return _writeVolumeArray(_volumeArray(volumeNode), ijkToRasFromVolumeNode(volumeNode), path, compress)


def _checkedExecutable(path: str, what: str) -> str:
    """``path`` if it names a program that can be started (a path, or a name on PATH); RuntimeError otherwise. Jobs
    start their worker after their input is written, so this is checked first, while nothing has happened yet."""
    found = path if os.path.dirname(path) else shutil.which(path)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise RuntimeError(f"cannot start the {what} {path}: no such executable file")
    return path


def _checkStillInScene(nodes: Sequence, when: str) -> None:
    """ValueError if one of ``nodes`` left its scene (or a volume lost its voxels) since a job checked them; jobs read
    their input one poll at a time, and the user may close a study meanwhile."""
    for node in nodes:
        if node.GetScene() is None or (node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is None):
            raise ValueError(f"'{node.GetName()}' was removed or emptied {when}")


def _volumeInputStep(volumeNode, path: str):
    """Read a volume node's voxels and geometry now (the caller's thread); return a function that writes them to
    ``path`` (any thread). See ``_WorkerJob._prepare``."""
    _checkStillInScene([volumeNode], "before it was exported")
    arr, ijkToRas = _volumeArray(volumeNode), ijkToRasFromVolumeNode(volumeNode)
    return lambda: _writeVolumeArray(arr, ijkToRas, path)


def _writeVolumeArray(arr: np.ndarray, ijkToRas: np.ndarray, path: str, compress: bool = False) -> dict:
    """Write a (K, J, I) or (K, J, I, 3) array on the grid ``ijkToRas`` (RAS) as ``path``; touches no MRML node, so
    it may run in any thread."""
    import SimpleITK as sitk

    isVector = arr.ndim == 4
    if arr.dtype == np.int64 or arr.dtype == np.uint64:  # not every reader handles 64-bit integers
        arr = arr.astype(np.float64)
    img = sitk.GetImageFromArray(arr, isVector=isVector)
    origin, spacing, direction = lpsGeometryFromIjkToRas(ijkToRas)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    write_image(img, path, compress=compress, overwrite=True)  # checked: a full disk is an error, not a short file
    return {"shape": tuple(arr.shape[:3]), "components": arr.shape[3] if isVector else 1}


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


def addVolumeNodeFromFile(scene, path: str, name: str | None = None, vector: bool | None = None):
    """Load an image file (any format SimpleITK reads, e.g. PNG, which slicer-core's readers lack) as a volume node.

    RGB(A) images become ``vtkMRMLVectorVolumeNode`` (alpha dropped) unless ``vector=False``, which converts them to
    luminance; scalar images become ``vtkMRMLScalarVolumeNode``. A 2D image becomes a single-slice volume with the
    geometry Slicer gives it (the file's LPS geometry, z spacing 1).
    """
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if img.GetDimension() == 2:
        arr = arr[np.newaxis]
    if ncomp == 4:
        arr = arr[..., :3]
    elif ncomp == 2:
        arr = arr[..., 0]
    isVector = arr.ndim == 4
    if isVector and vector is False:
        lum = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        arr = np.round(lum).astype(arr.dtype) if arr.dtype.kind in "iu" else lum.astype(arr.dtype)
        isVector = False
    className = "vtkMRMLVectorVolumeNode" if isVector else "vtkMRMLScalarVolumeNode"
    if name is None:
        base = os.path.basename(str(path))
        for ext in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".png", ".jpg", ".jpeg", ".tif", ".tiff"):
            if base.lower().endswith(ext):
                base = base[: -len(ext)]
                break
        name = base
    node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(arr))
    node.SetIJKToRASMatrix(_vtkMatrix(ijkToRasFromLpsGeometry(img.GetOrigin(), img.GetSpacing(), img.GetDirection())))
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------------------------------------------- segmentation


def uniqueSegmentName(segmentation, name: str) -> str:
    """``name``, or ``name (2)``, ``name (3)``, ... if a segment of ``segmentation`` already has that name."""
    taken = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def _orientedImage(array: np.ndarray, ijkToRas: np.ndarray, extentStart=(0, 0, 0)):
    """vtkOrientedImageData (unsigned char) from a (K, J, I) array."""
    import vtk.util.numpy_support as vtk_np

    img = slicer.vtkOrientedImageData()
    k, j, i = array.shape
    i0, j0, k0 = extentStart
    img.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_np.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(array.shape)[:] = array
    img.SetImageToWorldMatrix(_vtkMatrix(ijkToRas))
    return img


def _imageToWorld(image) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _normalisedSegments(segments: Any) -> list[dict]:
    out = []
    for i, s in enumerate(segments or []):
        if not isinstance(s, dict) or "label" not in s:
            continue
        color = s.get("color")
        try:
            color = [min(1.0, max(0.0, float(c))) for c in color][:3] if color is not None else None
            if color is not None and len(color) != 3:
                color = None
        except (TypeError, ValueError):
            color = None
        out.append({"name": str(s.get("name") or f"Segment_{s['label']}"), "label": int(s["label"]), "color": color,
                    "terminology": s.get("terminology")})
    return out


@dataclass
class _LoadedSegment:
    name: str
    label: int
    color: list | None
    image: Any  # vtkOrientedImageData, 0/1 unsigned char
    terminology: str | None = None


def _readResultSegments(path: str, segments: list[dict]) -> list[_LoadedSegment]:
    """Binary labelmaps of the worker's result file, one per described segment (empty ones included).

    ``.seg.nrrd`` files are read with Slicer's own segmentation reader in a private scene; other label maps (or a
    ``.seg.nrrd`` that reader rejects) with SimpleITK. Segments are matched by label value.
    """
    loaded: list[_LoadedSegment] = []
    if path.lower().endswith(".seg.nrrd"):
        with contextlib.suppress(Exception):
            loaded = _readWithSegmentationStorageNode(path, segments)
    if not loaded:
        loaded = _readWithSimpleITK(path, segments)
    return loaded


def _readWithSegmentationStorageNode(path: str, segments: list[dict]) -> list[_LoadedSegment]:
    scratch = slicer.vtkMRMLScene()
    node = scratch.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scratch.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    if not storage.ReadData(node):
        raise RuntimeError(f"cannot read {path}")
    seg = node.GetSegmentation()
    byLabel, byName = {}, {}
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        s = seg.GetSegment(sid)
        byLabel.setdefault(int(s.GetLabelValue()), sid)
        byName.setdefault(s.GetName(), sid)
    if not segments:  # nothing described: take what the file has
        segments = []
        for i in range(seg.GetNumberOfSegments()):
            s = seg.GetNthSegment(i)
            segments.append({"name": s.GetName(), "label": int(s.GetLabelValue()), "color": list(s.GetColor()),
                             "terminology": None})
    reference = None
    for sid in byLabel.values():
        reference = seg.GetSegment(sid).GetRepresentation(_BINARY_LABELMAP)
        if reference is not None:
            break
    if reference is None:
        raise RuntimeError(f"{path} holds no binary labelmap")
    out = []
    for d in segments:
        sid = byLabel.get(d["label"]) or byName.get(d["name"])
        image = slicer.vtkOrientedImageData()
        if sid is not None:
            node.GetBinaryLabelmapRepresentation(sid, image)
        if sid is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
            # absent or empty segment: an empty labelmap on the file's grid
            ext = reference.GetExtent()
            shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
            image = _orientedImage(np.zeros(shape, np.uint8), _imageToWorld(reference), (ext[0], ext[2], ext[4]))
        out.append(_LoadedSegment(d["name"], d["label"], d.get("color"), image, d.get("terminology")))
    return out


def _readWithSimpleITK(path: str, segments: list[dict]) -> list[_LoadedSegment]:
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} is not a label map")
    arr = sitk.GetArrayFromImage(img)
    if img.GetDimension() == 2:
        arr = arr[np.newaxis]
    ijkToRas = ijkToRasFromLpsGeometry(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    if not segments:
        segments = [{"name": f"Segment_{v}", "label": int(v), "color": None, "terminology": None}
                    for v in np.unique(arr) if v != 0]
    return [_LoadedSegment(d["name"], d["label"], d.get("color"),
                           _orientedImage((arr == d["label"]).astype(np.uint8), ijkToRas), d.get("terminology"))
            for d in segments]


def _snapToVolumeGeometry(image, volumeNode, tolerance: float = 1e-4) -> None:
    """Give a labelmap that lies on the volume's grid (within rounding) exactly the volume's IJK-to-RAS matrix."""
    volumeMatrix = ijkToRasFromVolumeNode(volumeNode)
    imageMatrix = _imageToWorld(image)
    scale = max(1.0, float(np.abs(volumeMatrix).max()))
    if np.allclose(imageMatrix, volumeMatrix, atol=tolerance * scale, rtol=0):
        image.SetImageToWorldMatrix(_vtkMatrix(volumeMatrix))


# ------------------------------------------------------------------------------------------------------------- worker

# ---------------------------------------------------------------------------------------------------------------- job


@dataclass
class VolumeTask:
    """One input volume of a job and what became of it."""

    index: int
    volumeNodeID: str
    volumeName: str
    inputPath: str
    outputPath: str
    targetSegmentationNodeID: str | None = None
    state: str = TaskState.PENDING
    message: str = ""
    done: int = 0
    total: int = 0
    segments: list = field(default_factory=list)
    segmentationNodeID: str | None = None  # where the result went
    segmentIDs: list = field(default_factory=list)  # the segments added by this job
    createdSegmentationNode: bool = False

    @property
    def fraction(self) -> float:
        if self.state in (TaskState.SEGMENTED, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED):
            return 1.0
        return self.done / self.total if self.total else 0.0


class _WorkerJob:
    """What every background job shares: the worker process, its log, polling, waiting and cancelling, the events
    every worker sends (``done``, ``download``) and the finishing sequence. Subclasses handle their own events
    (:meth:`_onEvent`) and settle a job whose worker has exited without a cancel (:meth:`_complete`)."""

    workerName = "worker"
    cancelNote = "Cancelled"  # the log line of a cancelled job
    batch = False
    tasks: Sequence = ()

    def __init__(self, logic: "SegmentationLogic", scene, args: list[str], env: dict, tempDir: str,
                 inputSteps: Sequence = ()):
        self.logic = logic
        self.scene = scene
        self.args = args
        self.tempDir = tempDir
        self.state = JobState.RUNNING
        self.errorMessage = ""
        self.returnCode: int | None = None
        self.startTime = time.monotonic()
        self.endTime: float | None = None
        self._log: list[str] = []
        self._pendingLog: list[str] = []
        self._stderrTail: collections.deque = collections.deque(maxlen=40)
        self._cancelRequested = False
        self._doneEvent: dict | None = None
        self._downloading: tuple | None = None
        self._errorMessages: set = set()
        self._env = env
        self._worker: WorkerProcess | None = None
        self._inputSteps = list(inputSteps)
        self.inputsRead = 0
        self._writer: threading.Thread | None = None
        self._writeError: BaseException | None = None
        if self._prepare():
            self._startWorker()

    # -- public state ---------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The worker's process id (None while the job is still preparing its input)."""
        return self._worker.pid if self._worker is not None else None

    @property
    def finished(self) -> bool:
        return self.state in JobState.FINISHED

    @property
    def running(self) -> bool:
        return not self.finished

    @property
    def log(self) -> list[str]:
        """Every log line so far."""
        return list(self._log)

    @property
    def elapsed(self) -> float:
        return (self.endTime or time.monotonic()) - self.startTime

    @property
    def segmentationNodes(self) -> list:
        return []

    # -- driving --------------------------------------------------------------------------------------------------
    def poll(self) -> list[str]:
        """Process what the worker said since the last call; finish the job when it has exited. Returns new log
        lines. Never blocks for long (reading happens in threads); what changes the scene happens here, in the
        caller's thread, once the worker is gone, one step per call (a batch imports one volume per call)."""
        if self.finished:
            return self._takeLog()
        if self._worker is None:
            self._advancePreparation()
            return self._takeLog()
        if self.returnCode is None:
            self._drain()
            rc = self._worker.returncode()
            if rc is None:
                return self._takeLog()
            closed = self._worker.pipesClosed()
            if not closed and time.monotonic() - (self._worker.exitTime or 0) > PIPE_DRAIN_S:
                # something in the worker's group still holds its pipes: end it (from a thread) and go on
                self._worker.end(grace=0)
                closed = True
            if not closed:
                return self._takeLog()
            self._drain()
            self.returnCode = rc
        try:
            self._finish()
        except Exception as e:  # never leave a job that can not finish
            log.exception("GMSSegment: finishing the job failed")
            self.state = JobState.FAILED
            self.errorMessage = f"internal error while finishing: {e}"
            self._logLine(self.statusText)
        return self._takeLog()

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        """Poll until the job finished (for scripts and tests; the GUI uses a timer). Returns the final state.
        On timeout the job is cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
                self.errorMessage = f"timed out after {timeout} s"
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """End the worker's whole process tree (non-blocking: SIGTERM now, SIGKILL after a short grace). The next
        :meth:`poll` calls finish the job as cancelled: the scene and the disk are left as they were and the
        temporary files are removed."""
        if self.finished or self._cancelRequested:
            return
        self._cancelRequested = True
        if self._worker is None:
            self._logLine("Cancel requested: stopping the preparation")
            return
        if self.returnCode is not None:
            self._logLine("Cancel requested: removing what was imported")
            return
        self._logLine("Cancel requested: stopping the worker")
        self._worker.end()

    # -- internals ------------------------------------------------------------------------------------------------
    def _prepare(self) -> bool:
        """One step of writing the worker's input; True when the worker can start. Called from the constructor and
        then from :meth:`poll` until it returns True. Each of the job's ``inputSteps`` runs here, in the caller's
        thread (it reads MRML nodes, which are not thread-safe), and returns a function that writes the files; that
        runs in a thread while Slicer goes on, and the next step waits for it. Then :meth:`_inputWritten`. A
        ValueError/OSError from either fails the job with its message (see :meth:`_advancePreparation`)."""
        if self._writer is not None:
            if self._writer.is_alive():
                return False
            self._writer = None
            if self._writeError is not None:
                raise self._writeError
        if self.inputsRead < len(self._inputSteps):
            write = self._inputSteps[self.inputsRead]()
            self.inputsRead += 1

            def run():
                try:
                    write()
                except BaseException as e:  # reported by the next poll
                    self._writeError = e
            self._writer = threading.Thread(target=run, daemon=True, name="GMSSegment-input")
            self._writer.start()
            return False
        self._inputWritten()
        return True

    def _inputWritten(self) -> None:
        """Every input step has been written (subclasses complete their input folder here)."""

    def _preparing(self) -> bool:
        """Whether an input file is still being written in a thread (a cancel waits for it before cleaning up)."""
        return self._writer is not None and self._writer.is_alive()

    def _startWorker(self) -> None:
        self._worker = WorkerProcess(self.args, self._env, cwd=self.tempDir, name=self.workerName)
        self._logLine(f"Started worker (pid {self._worker.pid}): {' '.join(_quote(a) for a in self.args)}")

    def _advancePreparation(self) -> None:
        if self._cancelRequested:
            if not self._preparing():
                self._finish()
            return
        try:
            ready = self._prepare()
            if ready:
                self._startWorker()
        except Exception as e:
            if not isinstance(e, (ValueError, OSError, RuntimeError, GMSError)):
                log.exception("GMSSegment: preparing the job failed")
            self.state = JobState.FAILED
            self.errorMessage = str(e) or type(e).__name__
            self._logLine(f"Failed: {self.errorMessage}")
            self._end()

    def _takeLog(self) -> list[str]:
        lines, self._pendingLog = self._pendingLog, []
        return lines

    def _logLine(self, text: str) -> None:
        self._log.append(text)
        self._pendingLog.append(text)

    def _drain(self) -> None:
        while True:
            try:
                stream, line = self._worker.lines.get_nowait()
            except queue.Empty:
                return
            if stream == "stdout":
                self._handleStdout(line)
            else:
                if line.strip():
                    self._stderrTail.append(line)
                    if line.startswith("gms: error: ") and line[len("gms: error: "):] in self._errorMessages:
                        continue  # the same message already came as a JSON error event
                    self._logLine(line)

    def _handleStdout(self, line: str) -> None:
        """One stdout line: a JSON event (see ``reporting.Reporter``) or a plain line for the log."""
        text = line.strip()
        event = None
        if text.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(text)
        if not isinstance(event, dict) or "event" not in event:
            if text:
                self._logLine(line)
            return
        kind = event.get("event")
        if kind == "done":
            self._doneEvent = event
        elif kind == "download":
            self._download(event)
        elif not self._onEvent(kind, event):
            self._logLine(line)

    def _onEvent(self, kind: str, event: dict) -> bool:
        """Handle a job-specific event; False for an unknown one (it goes to the log as it came)."""
        raise NotImplementedError

    def _cancelled(self) -> None:
        self.state = JobState.CANCELLED
        if not self.errorMessage or self.errorMessage == "cancelled":  # the worker's own "cancelled" error event
            self.errorMessage = "cancelled by the user"
        self._logLine(self.cancelNote)

    def _errorEvent(self, event: dict) -> str:
        message = str(event.get("message", "unknown error"))
        self._errorMessages.add(message)  # stderr repeats it as "gms: error: ..."; logged once
        return message

    def _finish(self) -> None:
        """The worker has exited: settle the job, one step per call (:meth:`_cancelled`, or :meth:`_complete` until
        it returns True); then always remove the temporary folder and tell the logic."""
        done = True
        try:
            if self._cancelRequested:
                self._cancelled()
            else:
                done = self._complete()
        finally:
            if done:
                self._end()

    def _end(self) -> None:
        """Every finished job, however it ended: the end time, the temporary folder removed, the logic told."""
        self.endTime = time.monotonic()
        self._cleanup()
        self.logic._jobFinished(self)

    def _complete(self) -> bool:
        """One step of settling a job whose worker exited without a cancel; True when the job is finished."""
        raise NotImplementedError

    def _abandon(self) -> None:
        """Settle a cancelled job now although its worker or input writer still runs (nothing was imported yet, so
        the scene is as it was): a thread ends the worker's tree and removes the temporary folder once both ended."""
        writer = self._writer

        def cleanup():
            if writer is not None:
                writer.join(timeout=60)
            self._cleanup()
        self._cancelled()
        self.endTime = time.monotonic()
        self.logic._jobFinished(self)
        if self._worker is not None:
            self._worker.end(grace=0, then=cleanup)
        else:
            threading.Thread(target=cleanup, name="GMSSegment-cleanup").start()

    def _download(self, event: dict) -> None:
        what = str(event.get("what") or "weights")
        done, total = _int(event.get("done"), 0), event.get("total")
        total = _int(total, 0) if total is not None else 0
        first = self._downloading is None
        self._downloading = (what, done, total)
        if first:
            self._logLine(f"Downloading {what} (first use; cached afterwards)...")
        if total and done >= total:
            self._logLine(f"Downloaded {what} ({total / 1e6:.1f} MB)")
            self._downloading = None

    def _downloadText(self) -> str | None:
        if self._downloading is None:
            return None
        what, done, total = self._downloading
        amount = f"{done / 1e6:.0f} of {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
        return f"Downloading {what}: {amount}"

    def _workerFailureMessage(self) -> str:
        rc = self.returnCode
        abnormal = describeAbnormalExit(rc, self._stderrTail)
        if abnormal is not None:
            return f"the {self.workerName} was {abnormal}"
        tail = [l for l in self._stderrTail if l.strip()]
        detail = ""
        if tail:
            errors = [l for l in tail if re.match(r"^\w*(Error|Exception)\b", l.strip()) or "Error:" in l]
            detail = ": " + (errors[-1] if errors else tail[-1]).strip()
        return f"the {self.workerName} stopped with exit code {rc}{detail}"

    def _cleanup(self) -> None:
        shutil.rmtree(self.tempDir, ignore_errors=True)
        if os.path.exists(self.tempDir):  # Windows: a file may still be open for a moment
            time.sleep(0.2)
            shutil.rmtree(self.tempDir, ignore_errors=True)


class SegmentationJob(_WorkerJob):
    """A running worker over one or several volume nodes. Drive it with :meth:`poll` (never blocks)."""

    workerName = "segmentation worker"

    def __init__(self, logic: "SegmentationLogic", scene, tasks: list[VolumeTask], args: list[str], env: dict,
                 tempDir: str, batch: bool, inputSteps: Sequence = ()):
        self.tasks = tasks
        self.batch = batch
        self.modelDir = ""
        self.card: dict = {}
        self._imports: list | None = None  # results waiting to be imported, once the worker has exited
        self._importTotal = 0  # how many results were queued for import (a failed import still counts as handled)
        self._crashed = False
        super().__init__(logic, scene, args, env, tempDir, inputSteps=inputSteps)

    @property
    def progress(self) -> float:
        """0..1 over all volumes."""
        if not self.tasks:
            return 1.0
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return sum(t.fraction for t in self.tasks) / len(self.tasks)

    @property
    def statusText(self) -> str:
        if self.state == JobState.RUNNING:
            if self._cancelRequested:
                return "Cancelling..."
            if self._imports is not None:
                done = self._importTotal - len(self._imports)
                return f"Importing the results: {done}/{self._importTotal}" if self.batch else \
                    "Importing the result..."
            running = [t for t in self.tasks if t.state == TaskState.RUNNING]
            if self._downloading is not None:
                return self._downloadText()
            if running:
                t = running[0]
                where = f" ({t.index + 1}/{len(self.tasks)})" if self.batch else ""
                step = f": slice {t.done}/{t.total}" if t.total else ""
                return f"Segmenting {t.volumeName}{where}{step}"
            if self._worker is None:
                return f"Exporting the volumes: {self.inputsRead}/{len(self.tasks)}" if self.batch else \
                    "Exporting the volume..."
            return "Starting the worker (loading the model)..."
        if self.state == JobState.SUCCEEDED:
            n = len(self.tasks)
            return f"Done: {n} volume{'s' if n != 1 else ''} segmented in {self.elapsed:.1f} s"
        if self.state == JobState.PARTIAL:
            ok = sum(t.state == TaskState.SUCCEEDED for t in self.tasks)
            return f"Done with errors: {ok} of {len(self.tasks)} volumes segmented"
        if self.state == JobState.CANCELLED:
            return "Cancelled"
        return f"Failed: {self.errorMessage}"

    @property
    def segmentationNodes(self) -> list:
        """The segmentation nodes that received results (existing ones included), in task order."""
        out = []
        for t in self.tasks:
            if t.segmentationNodeID:
                node = self.scene.GetNodeByID(t.segmentationNodeID)
                if node is not None and node not in out:
                    out.append(node)
        return out

    def _task(self, event: dict) -> VolumeTask | None:
        item = event.get("item")
        if item is None:
            return self.tasks[0] if len(self.tasks) == 1 else None
        try:
            item = int(item)
        except (TypeError, ValueError):
            return None
        return self.tasks[item] if 0 <= item < len(self.tasks) else None

    def _onEvent(self, kind: str, event: dict) -> bool:
        task = self._task(event)
        prefix = f"[{task.volumeName}] " if (task is not None and self.batch) else ""
        if kind == "start":
            if task is not None:
                task.state = TaskState.RUNNING
                task.total = _int(event.get("total"), 0)
                task.done = 0
        elif kind == "progress":
            if task is not None:
                if task.state == TaskState.PENDING:
                    task.state = TaskState.RUNNING
                task.done = _int(event.get("done"), task.done)
                task.total = _int(event.get("total"), task.total)
        elif kind == "log":
            self._logLine(prefix + str(event.get("message", "")))
        elif kind == "result":
            if task is not None:
                task.state = TaskState.SEGMENTED
                task.segments = _normalisedSegments(event.get("segments")) or task.segments
                path = event.get("path")
                if path:
                    task.outputPath = str(path)
                self._logLine(prefix + "Segmented")
        elif kind == "error":
            message = self._errorEvent(event)
            if task is not None:
                task.state = TaskState.FAILED
                task.message = message
            else:
                self.errorMessage = message
            self._logLine(prefix + "Error: " + message)
        else:
            return False
        return True

    cancelNote = "Cancelled: the scene was not changed"

    def _cancelled(self) -> None:
        for t in reversed(self.tasks):  # a cancel while importing: take back what was already imported
            if t.state == TaskState.SUCCEEDED:
                self._removeImport(t)
        for t in self.tasks:
            t.state = TaskState.CANCELLED
            t.message = "cancelled"
        super()._cancelled()

    def _removeImport(self, task: VolumeTask) -> None:
        node = self.scene.GetNodeByID(task.segmentationNodeID) if task.segmentationNodeID else None
        if node is not None:
            _takeBack(self.scene, node, task.createdSegmentationNode, task.segmentIDs)
        task.segmentationNodeID, task.segmentIDs, task.createdSegmentationNode = None, [], False

    def _complete(self) -> bool:
        """The first call settles the volumes the worker left without a result and queues the others; each call
        then imports one result (reading a 512x512x300 result and adding it takes 0.2-0.4 s, so a batch of ten
        would otherwise hold Slicer for seconds in one call); the last one settles the job."""
        if self._imports is None:
            self._crashed = self.returnCode != 0 and not any(t.state == TaskState.FAILED for t in self.tasks) \
                and not self.errorMessage
            for t in self.tasks:
                if t.state in (TaskState.PENDING, TaskState.RUNNING):
                    t.state = TaskState.FAILED
                    if self.errorMessage:  # e.g. the model could not be loaded
                        t.message = self.errorMessage
                    elif self.returnCode != 0:
                        t.message = self._workerFailureMessage()
                    else:
                        t.message = "the worker finished without a result"
            self._imports = [t for t in self.tasks if t.state == TaskState.SEGMENTED]
            self._importTotal = len(self._imports)
        if self._imports:
            self._import(self._imports.pop(0))
            if self._imports:
                return False
        ok = [t for t in self.tasks if t.state == TaskState.SUCCEEDED]
        failed = [t for t in self.tasks if t.state == TaskState.FAILED]
        if not failed:
            self.state = JobState.SUCCEEDED
        elif ok:
            self.state = JobState.PARTIAL
        else:
            self.state = JobState.FAILED
        if failed and not self.errorMessage:
            if self._crashed and len(failed) == len(self.tasks):
                self.errorMessage = self._workerFailureMessage()
            elif len(self.tasks) == 1:
                self.errorMessage = failed[0].message
            else:
                self.errorMessage = "; ".join(f"{t.volumeName}: {t.message}" for t in failed)
        self._logLine(self.statusText)
        return True

    def _import(self, t: VolumeTask) -> None:
        if not os.path.isfile(t.outputPath):
            t.state = TaskState.FAILED
            t.message = "the worker reported a result but wrote no file"
            return
        try:
            self.logic._importTask(self.scene, t)
            t.state = TaskState.SUCCEEDED
            node = self.scene.GetNodeByID(t.segmentationNodeID)
            self._logLine(f"Imported {len(t.segmentIDs)} segment(s) of {t.volumeName} into "
                          f"'{node.GetName() if node else t.segmentationNodeID}'")
        except Exception as e:  # keep the scene unchanged for this volume; go on with the others
            log.exception("import of %s failed", t.outputPath)
            t.state = TaskState.FAILED
            t.message = f"import failed: {e}"
            self._logLine(f"Error importing {t.volumeName}: {e}")


class TrainingJob(_WorkerJob):
    """A running ``gms train`` worker that adapts (or trains) a model on cases exported from the scene. Drive it with
    :meth:`poll` (never blocks). The worker writes into the job's temporary folder; only a finished model is copied
    to :attr:`outputFolder` (atomically, under a new name if that folder appeared meanwhile), so a cancelled or
    failed job leaves nothing behind. When it succeeded, :attr:`modelDir` is the new model folder."""

    workerName = "training worker"
    cancelNote = "Cancelled: no model was written"

    def __init__(self, logic: "SegmentationLogic", scene, args: list[str], env: dict, tempDir: str,
                 workerOutput: str, outputFolder: str, export: TrainingSetExport):
        self.workerOutput = workerOutput
        self.outputFolder = outputFolder
        self.export: dict = {}  # what exportTrainingSet returns, once the cases are written
        self._export = export
        self.modelDir = ""
        self.card: dict = {}
        self.stage = "exporting"  # exporting, starting, cache, training, options
        self.cacheDone = 0
        self.cacheTotal = 0
        self.epoch = 0
        self.epochs: int | None = None
        self.maxMinutes: float | None = None
        self.trainSeconds = 0.0
        self.bestDice: float | None = None
        self.startDice: float | None = None  # validation Dice of the --init-from model (epoch 0)
        self.history: list[dict] = []
        self._result: dict | None = None
        # the pairs are read from the scene one per poll and written in a thread (see _WorkerJob._prepare)
        steps = [lambda i=i: export.read(i) for i in range(len(export))]
        super().__init__(logic, scene, args, env, tempDir, inputSteps=steps)

    @property
    def progress(self) -> float:
        """0..1: encoding the cases 0-0.1, training 0.1-0.9 (epochs, or the time budget if that ends it sooner),
        choosing the inference options 0.9-1."""
        if self.state == JobState.SUCCEEDED:
            return 1.0
        if self.stage == "cache":
            return 0.1 * (self.cacheDone / self.cacheTotal if self.cacheTotal else 0.0)
        if self.stage == "training":
            parts = [self.epoch / self.epochs] if self.epochs else []
            if self.maxMinutes:
                parts.append(self.trainSeconds / (60 * self.maxMinutes))
            return 0.1 + 0.8 * min(1.0, max(parts, default=0.0))
        if self.stage == "options":
            return 0.9
        return 0.0

    @property
    def statusText(self) -> str:
        if self.state == JobState.RUNNING:
            if self._cancelRequested:
                return "Cancelling..."
            if self._downloading is not None:
                return self._downloadText()
            if self.stage == "exporting":
                return f"Exporting the cases: {self.inputsRead}/{len(self._export)}"
            if self.stage == "cache":
                return f"Encoding the cases: {self.cacheDone}/{self.cacheTotal}"
            if self.stage == "training":
                if not self.history:
                    return "Training: first epoch..."
                best = f", best validation Dice {self.bestDice:.3f}" if self.bestDice is not None else ""
                budget = f" of {self.maxMinutes:g}" if self.maxMinutes else ""
                return f"Training: epoch {self.epoch} ({self.trainSeconds / 60:.1f}{budget} min){best}"
            if self.stage == "options":
                return "Choosing the inference options on the validation cases..."
            return "Starting the training worker..."
        if self.state == JobState.SUCCEEDED:
            best = f"validation Dice {self.bestDice:.3f}" if self.bestDice is not None else "trained"
            start = f" (from {self.startDice:.3f})" if self.startDice is not None else ""
            name = os.path.basename(self.modelDir)
            return f"Done: model '{name}' saved, {best}{start}, in {self.elapsed / 60:.1f} min"
        if self.state == JobState.CANCELLED:
            return self.cancelNote
        return f"Failed: {self.errorMessage}"

    def _inputWritten(self) -> None:
        self.export = self._export.finish()
        self._logLine(f"Exported {len(self.export['cases'])} cases ({', '.join(self.export['segments'])})")
        self.stage = "starting"

    def _onEvent(self, kind: str, event: dict) -> bool:
        if kind == "log":
            self._logLine(str(event.get("message", "")))
        elif kind == "stage":
            self.stage = str(event.get("stage") or self.stage)
        elif kind == "progress":
            self.stage = str(event.get("stage") or self.stage)
            self.cacheDone = _int(event.get("done"), self.cacheDone)
            self.cacheTotal = _int(event.get("total"), self.cacheTotal)
        elif kind == "epoch":
            self.stage = "training"
            record = {k: v for k, v in event.items() if k not in ("event", "epochs", "max_minutes", "best")}
            self.history.append(record)
            self.epoch = _int(event.get("epoch"), self.epoch)
            self.epochs = _int(event.get("epochs"), 0) or None
            self.maxMinutes = event.get("max_minutes") or None
            self.trainSeconds = float(event.get("elapsed_s") or self.trainSeconds)
            if event.get("best") is not None and "val_dice" in event:
                self.bestDice = float(event["best"])
            if self.epoch == 0 and "val_dice" in event:
                self.startDice = float(event["val_dice"])
        elif kind == "result":
            self._result = event
        elif kind == "error":
            self.errorMessage = self._errorEvent(event)
            self._logLine("Error: " + self.errorMessage)
        else:
            return False
        return True

    def _complete(self) -> bool:
        folder = str((self._result or {}).get("path") or self.workerOutput)
        if self.returnCode != 0 or self._result is None or not os.path.isfile(os.path.join(folder, "card.json")):
            self.state = JobState.FAILED
            if not self.errorMessage:
                self.errorMessage = (self._workerFailureMessage() if self.returnCode != 0
                                     else "the training worker finished without a model")
            self._logLine(self.statusText)
            return True
        self.modelDir = _publishFolder(folder, self.outputFolder)
        if self.modelDir != self.outputFolder:
            self._logLine(f"{self.outputFolder} appeared while training: the model went to {self.modelDir}")
        self.card = readModelCard(self.modelDir)
        if self._result.get("best") is not None:
            self.bestDice = float(self._result["best"])
        self.state = JobState.SUCCEEDED
        self._logLine(self.statusText)
        return True


def _publishFolder(source: str, target: str) -> str:
    """Copy a finished folder to ``target`` (or ``target-2``, ``-3``... if that exists) through a temporary sibling
    and a rename, so the target is either absent or complete. Returns the folder written."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temp_folders(parent, ".gms-model-")  # left by a killed Slicer
    tmp = make_temp_folder(parent, ".gms-model-")
    try:
        staged = os.path.join(tmp, "model")
        shutil.copytree(source, staged)
        final, k = target, 2
        while True:
            if os.path.isdir(final) and not os.listdir(final):
                os.rmdir(final)
            if not os.path.exists(final):
                try:
                    os.rename(staged, final)
                    return final
                except OSError:
                    if not os.path.exists(final):
                        raise
            final, k = f"{target}-{k}", k + 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _quote(arg: str) -> str:
    return f'"{arg}"' if (" " in arg or not arg) else arg


# -------------------------------------------------------------------------------------------------------------- logic


class SegmentationLogic:
    """Segment volume nodes with a GMS model in a background worker. No qt; usable in Slicer and on slicer-core.

    ``scene``: the MRML scene (default: ``slicer.mrmlScene`` in Slicer; otherwise the input node's scene).
    ``pythonExecutable``: the worker's Python (default :func:`findPythonExecutable`).
    ``tempRoot``: where job folders are created (default: Slicer's temporary folder, else the system's).
    """

    def __init__(self, scene=None, pythonExecutable: str | None = None, tempRoot: str | None = None):
        self.scene = scene
        self.pythonExecutable = pythonExecutable
        self.tempRoot = tempRoot
        self.extraWorkerArgs: list[str] = []
        self.job: SegmentationJob | TrainingJob | None = None
        self._jobs: list[_WorkerJob] = []
        with contextlib.suppress(OSError):  # job folders a killed Slicer left behind
            remove_stale_temp_folders(self._tempRoot(), _TEMP_PREFIX)

    # -- helpers --------------------------------------------------------------------------------------------------
    def _scene(self, nodes: Sequence = ()):
        if self.scene is not None:
            return self.scene
        for n in nodes:
            if n is not None and n.GetScene() is not None:
                return n.GetScene()
        if slicer is not None and getattr(slicer, "mrmlScene", None) is not None:
            return slicer.mrmlScene
        raise ValueError("no MRML scene: pass scene= to SegmentationLogic or use nodes that are in a scene")

    def _tempRoot(self) -> str:
        if self.tempRoot:
            os.makedirs(self.tempRoot, exist_ok=True)
            return self.tempRoot
        if _inSlicerApplication():
            with contextlib.suppress(Exception):
                path = slicer.app.temporaryPath
                if path:
                    os.makedirs(path, exist_ok=True)
                    return path
        return tempfile.gettempdir()

    def _newJobFolder(self) -> str:
        root = self._tempRoot()
        remove_stale_temp_folders(root, _TEMP_PREFIX)
        return make_temp_folder(root, _TEMP_PREFIX)

    @staticmethod
    def isSegmentableVolume(node) -> bool:
        """Scalar or vector volume node (not a labelmap) with image data."""
        if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            return False
        return node.GetImageData() is not None

    def loadedVolumes(self, scene=None) -> list:
        """Every scalar / RGB volume node of the scene (labelmaps excluded), in scene order."""
        scene = scene or self._scene()
        nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        out = []
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if self.isSegmentableVolume(node) and not node.GetHideFromEditors():
                out.append(node)
        return out

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    # -- starting -------------------------------------------------------------------------------------------------
    def start(self, volumeNodes, model: str, device: str = "auto", axis: int | None = None,
              weightsDir: str | None = None, outputSegmentationNode=None, tta: bool = True) -> SegmentationJob:
        """Start segmenting one volume node (or a list: one batch worker) and return the running job.

        ``model``: model folder or installed model name. ``device``: ``auto``, ``cpu`` or ``cuda``. ``axis``: slicing
        axis 0/1/2 in numpy (K, J, I) order, or None for the model's (a single-slice volume is always sliced across
        its thin axis). ``weightsDir``: local foundation weights folder (offline sites). ``outputSegmentationNode``:
        existing node to add the new segments to (single volume only); default a new node per volume. ``tta``: use
        the test-time augmentation in the model card (chosen on validation); False = one plain pass per slice.

        Raises ValueError (clear message, scene unchanged, nothing started) for invalid input.
        """
        if self.running:
            raise ValueError("a job is already running; cancel it or wait until it finished")
        single = not isinstance(volumeNodes, (list, tuple))
        nodes = [volumeNodes] if single else list(volumeNodes)
        if not nodes:
            raise ValueError("no volume to segment")
        for n in nodes:
            if n is None:
                raise ValueError("no input volume selected")
            if not n.IsA("vtkMRMLScalarVolumeNode") or n.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ValueError(f"'{n.GetName()}' is not a scalar or RGB volume")
        if len({n.GetID() for n in nodes}) != len(nodes):
            raise ValueError("the same volume is listed twice")
        if outputSegmentationNode is not None and len(nodes) > 1:
            raise ValueError("an output segmentation node can only be chosen for a single volume")
        device = (device or "auto").lower()
        if device == "gpu":
            device = "cuda"
        if device not in DEVICES:
            raise ValueError(f"unknown device '{device}' (use auto, cpu or cuda)")
        if axis is not None and int(axis) not in (0, 1, 2):
            raise ValueError(f"slicing axis must be 0, 1 or 2, got {axis}")
        modelDir = resolveModel(model)
        card = readModelCard(modelDir)
        cardSegments = _normalisedSegments(card.get("segments"))
        if weightsDir and not os.path.isdir(os.path.expanduser(str(weightsDir))):
            raise ValueError(f"foundation weights folder not found: {weightsDir}")
        scene = self._scene(nodes)

        tempDir = self._newJobFolder()
        try:
            tasks, steps = [], []
            autoAxes = set()
            for i, node in enumerate(nodes):
                inputPath = os.path.join(tempDir, f"input_{i}.nrrd")
                try:
                    shape = _volumeShape(node)
                except ValueError as e:
                    raise ValueError(f"cannot export '{node.GetName()}': {e}") from None
                steps.append(lambda node=node, path=inputPath: _volumeInputStep(node, path))
                thin = [a for a, s in enumerate(shape) if s == 1]
                autoAxes.add(thin[0] if len(thin) == 1 else None)
                tasks.append(VolumeTask(
                    index=i, volumeNodeID=node.GetID(), volumeName=node.GetName(), inputPath=inputPath,
                    outputPath=os.path.join(tempDir, f"output_{i}.seg.nrrd"), segments=list(cardSegments),
                    targetSegmentationNodeID=outputSegmentationNode.GetID() if outputSegmentationNode else None))
            if axis is None and len(autoAxes) == 1 and None not in autoAxes:
                axis = autoAxes.pop()  # single-slice images: slice across the thin axis
            python = _checkedExecutable(self.pythonExecutable or findPythonExecutable(), SegmentationJob.workerName)
            args = [python, "-m", "GMSSegmentLib", "segment"]
            if single:
                args += [tasks[0].inputPath, "-o", tasks[0].outputPath]
            else:
                jobsPath = os.path.join(tempDir, "jobs.json")
                with open(jobsPath, "w", encoding="utf-8") as f:
                    json.dump([{"input": t.inputPath, "output": t.outputPath} for t in tasks], f, indent=1)
                args += ["--jobs", jobsPath]
            args += ["--model", modelDir, "--device", device, "--progress", "json"]
            if axis is not None:
                args += ["--axis", str(int(axis))]
            if not tta:
                args += ["--no-tta"]
            if weightsDir:
                args += ["--weights-dir", os.path.abspath(os.path.expanduser(str(weightsDir)))]
            args += list(self.extraWorkerArgs)
            env = workerEnvironment(weightsDir)
            job = SegmentationJob(self, scene, tasks, args, env, tempDir, batch=not single, inputSteps=steps)
            job.modelDir, job.card = modelDir, card
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return self._started(job)

    def trainingPairs(self, scene=None, segmentNames: Sequence[str] = (), dimension: int = 3) -> list[tuple]:
        """(volume node, segmentation node) for every segmentation node of the scene whose reference geometry is a
        volume in the scene, in scene order; with ``segmentNames`` only those that have every named segment
        (case-insensitive). ``dimension`` is the model's (card ``dimension``): 3 takes scalar volumes only, 2 also RGB
        (vector) volumes such as endoscopy frames. The cases the GUI offers for adapting a model."""
        scene = scene or self._scene()
        nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
        wanted = {str(n).strip().lower() for n in segmentNames}
        out = []
        for i in range(nodes.GetNumberOfItems()):
            seg = nodes.GetItemAsObject(i)
            volume = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
            if volume is None or not self.isSegmentableVolume(volume):
                continue
            if volume.IsA("vtkMRMLVectorVolumeNode") and int(dimension) != 2:
                continue
            segmentation = seg.GetSegmentation()
            have = {segmentation.GetNthSegment(k).GetName().strip().lower()
                    for k in range(segmentation.GetNumberOfSegments())}
            if wanted <= have:
                out.append((volume, seg))
        return out

    def startTraining(self, pairs: Sequence, segmentNames: Sequence[str], outputFolder: str,
                      initFrom: str | None = None, maxMinutes: float | None = None, weightsDir: str | None = None,
                      extraArgs: Sequence[str] = ()) -> TrainingJob:
        """Start adapting the model ``initFrom`` (folder or installed name; None = train a new model from scratch) to
        the (volume node, segmentation node) ``pairs`` and return the running job. The pairs are exported first, into
        the job's temporary folder (:func:`exportTrainingSet` in steps: each :meth:`TrainingJob.poll` reads one pair
        from the scene and a thread writes its files, so Slicer stays responsive; everything is checked here, before
        the job starts; label k+1 = ``segmentNames[k]``) as 3D volumes or,
        for a 2D model (card ``dimension`` 2; without ``initFrom``: when every volume is a single slice), as 8-bit
        PNG images; the worker is ``python -m GMSSegmentLib train ... --progress json``, which carves its validation
        cases from the pairs and keeps the starting model unless training beats it on them. ``maxMinutes`` bounds
        the training time. The new model is written to ``outputFolder`` only when the job succeeded (put it in a
        folder of ``GMS_MODELS_DIR`` to find it by name).

        Raises ValueError (clear message, nothing written, nothing started) for invalid input."""
        if self.running:
            raise ValueError("a job is already running; cancel it or wait until it finished")
        if len(pairs) < 2:
            raise ValueError("adapting a model needs at least 2 segmented volumes (one is kept aside to validate on)")
        if not outputFolder or not str(outputFolder).strip():
            raise ValueError("choose a folder for the new model")
        outputFolder = os.path.abspath(os.path.expanduser(str(outputFolder)))
        if os.path.exists(outputFolder) and (not os.path.isdir(outputFolder) or os.listdir(outputFolder)):
            raise ValueError(f"{outputFolder} already exists; choose a new folder (models are never overwritten)")
        initDir = resolveModel(initFrom) if initFrom else None
        if initDir is not None and os.path.abspath(initDir) == outputFolder:
            raise ValueError("the new model's folder is the model being adapted; choose another folder")
        if maxMinutes is not None and not float(maxMinutes) > 0:
            raise ValueError(f"the time budget must be positive, got {maxMinutes} minutes")
        if weightsDir and not os.path.isdir(os.path.expanduser(str(weightsDir))):
            raise ValueError(f"foundation weights folder not found: {weightsDir}")
        if initDir is not None:
            dimension = int(readModelCard(initDir).get("dimension") or 3)
        else:
            single = all(v is not None and v.GetImageData() is not None and v.GetImageData().GetDimensions()[2] == 1
                         for v, _ in pairs)
            dimension = 2 if single else 3
        scene = self._scene([n for pair in pairs for n in pair])
        tempDir = self._newJobFolder()
        try:
            export = TrainingSetExport(pairs, os.path.join(tempDir, "data"), segmentNames, dimension=dimension)
            workerOutput = os.path.join(tempDir, "model")
            extra = ["--name", os.path.basename(outputFolder), "--work-dir", os.path.join(tempDir, "work")]
            if weightsDir:
                extra += ["--weights-dir", os.path.abspath(os.path.expanduser(str(weightsDir)))]
            python = _checkedExecutable(self.pythonExecutable or findPythonExecutable(), TrainingJob.workerName)
            args = [python, "-m", "GMSSegmentLib", *trainingArguments(
                export.folder, workerOutput, export.names, initFrom=initDir, maxMinutes=maxMinutes,
                extra=[*extra, *self.extraWorkerArgs, *extraArgs])]
            job = TrainingJob(self, scene, args, workerEnvironment(weightsDir), tempDir, workerOutput, outputFolder,
                              export)
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return self._started(job)

    def _started(self, job):
        self.job = job
        self._jobs.append(job)
        return job

    def segment(self, volumeNodes, model: str, timeout: float | None = None, **kwargs) -> SegmentationJob:
        """Blocking convenience for scripts: :meth:`start` then :meth:`SegmentationJob.wait`."""
        job = self.start(volumeNodes, model, **kwargs)
        job.wait(timeout)
        return job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def shutdown(self) -> None:
        """Cancel every running job (module cleanup, application exit) without waiting for anything: a job is
        settled at once (the scene as it was before it); a worker that still runs is ended, and the job's temporary
        folder removed, by a thread (:meth:`_WorkerJob._abandon`)."""
        for job in list(self._jobs):
            if job.running:
                job.cancel()
                job.poll()  # settles what needs no waiting (e.g. a cancel while importing)
                if job.running:
                    job._abandon()

    def _jobFinished(self, job: _WorkerJob) -> None:
        with contextlib.suppress(ValueError):
            self._jobs.remove(job)

    # -- importing ------------------------------------------------------------------------------------------------
    def _importTask(self, scene, task: VolumeTask) -> None:
        """Import one result into the scene (new node, or new uniquely named segments); all or nothing."""
        volumeNode = scene.GetNodeByID(task.volumeNodeID)
        if volumeNode is None:
            raise ValueError("the input volume was removed from the scene")
        loaded = _readResultSegments(task.outputPath, task.segments)
        for s in loaded:
            _snapToVolumeGeometry(s.image, volumeNode)

        target = scene.GetNodeByID(task.targetSegmentationNodeID) if task.targetSegmentationNodeID else None
        created = target is None
        addedIDs: list[str] = []
        try:
            if created:
                target = scene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", _unusedNodeName(scene, f"{volumeNode.GetName()} GMS segmentation"))
                target.CreateDefaultDisplayNodes()
                # the transform first: the reference geometry is computed relative to the node's own parent
                # transform, so set before it the volume's transform would be folded in and then applied again
                if volumeNode.GetTransformNodeID():
                    target.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
                target.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            else:
                seg = target.GetSegmentation()
                if not seg.GetConversionParameter("Reference image geometry"):
                    target.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentation = target.GetSegmentation()
            wasModifying = target.StartModify()
            try:
                for s in loaded:
                    segment = slicer.vtkSegment()
                    name = uniqueSegmentName(segmentation, s.name)
                    segment.SetName(name)
                    if hasattr(segment, "SetNameAutoGenerated"):
                        segment.SetNameAutoGenerated(False)
                    if s.color is not None:
                        segment.SetColor(*s.color)
                        if hasattr(segment, "SetColorAutoGenerated"):
                            segment.SetColorAutoGenerated(False)
                    if s.terminology:
                        if hasattr(segment, "SetTerminology"):
                            segment.SetTerminology(str(s.terminology))
                        else:
                            segment.SetTag("TerminologyEntry", str(s.terminology))
                    segment.AddRepresentation(_BINARY_LABELMAP, s.image)
                    segmentID = segmentation.GenerateUniqueSegmentID(re.sub(r"\W+", "_", s.name).strip("_") or "GMS")
                    if not segmentation.AddSegment(segment, segmentID):
                        raise RuntimeError(f"cannot add segment '{name}'")
                    addedIDs.append(segmentID)
            finally:
                target.EndModify(wasModifying)
        except BaseException:
            if target is not None:
                _takeBack(scene, target, created, addedIDs)
            raise
        task.segmentationNodeID = target.GetID()
        task.segmentIDs = addedIDs
        task.createdSegmentationNode = created


def _unusedNodeName(scene, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ... when a node of the scene has it (unlike GenerateUniqueName, names of
    removed nodes, e.g. of a cancelled job's results, count as free)."""
    candidate, k = name, 0
    while scene.GetFirstNodeByName(candidate) is not None:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _takeBack(scene, node, created: bool, segmentIDs: Sequence[str]) -> None:
    """Undo an import into segmentation ``node``: remove the node if the import created it, else the segments it
    added (a failed import, or a cancel while a batch was being imported)."""
    if created:
        _removeNode(scene, node)
        return
    for sid in segmentIDs:
        with contextlib.suppress(Exception):
            node.GetSegmentation().RemoveSegment(sid)


def _removeNode(scene, node) -> None:
    """Remove a node and the display/storage nodes it made."""
    with contextlib.suppress(Exception):
        displayIDs = [node.GetNthDisplayNodeID(i) for i in range(node.GetNumberOfDisplayNodes())]
        for did in displayIDs:
            d = scene.GetNodeByID(did)
            if d is not None:
                scene.RemoveNode(d)
    scene.RemoveNode(node)
