"""The logic the module's GUI drives: checks what the user chose, prepares a job and starts it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Sequence

from ..ownedtemp import make_temp_folder, remove_stale_temp_folders
from .environment import _inSlicerApplication, findPythonExecutable, workerEnvironment
from .geometry import _volumeInputStep, _volumeShape
from .jobs import SegmentationJob, TrainingJob
from .modelinfo import OpenedModel, openModel
from .mrml import slicer
from .resultimport import _normalisedSegments
from .states import VolumeTask
from .trainingset import TrainingSetExport, trainingArguments
from .warmworker import WarmWorkers
from .workerjob import _WorkerJob


DEVICES = ("auto", "cpu", "cuda")
_TEMP_PREFIX = "GMSSegment-"


def _checkedExecutable(path: str, what: str) -> str:
    """``path`` if it names a program that can be started (a path, or a name on PATH); RuntimeError otherwise. Jobs
    start their worker after their input is written, so this is checked first, while nothing has happened yet."""
    found = path if os.path.dirname(path) else shutil.which(path)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise RuntimeError(f"cannot start the {what} {path}: no such executable file")
    return path


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
        #: segmentation jobs run in a worker kept between jobs (warmworker.py: the model stays loaded, so a click on a
        #: 2D image answers in about a second); False: a new worker for every job
        self.keepWorkerWarm = True
        self.warmWorkers = WarmWorkers()
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
    def start(self, volumeNodes, model: str | OpenedModel, device: str = "auto", axis: int | None = None,
              weightsDir: str | None = None, outputSegmentationNode=None, tta: bool = True,
              uncertaintyMap: bool = True) -> SegmentationJob:
        """Start segmenting one volume node (or a list: one batch worker) and return the running job.

        ``model``: model folder or installed model name, or an :class:`OpenedModel` (its card is not read again);
        the worker gets the resolved folder. ``device``: ``auto``, ``cpu`` or ``cuda``. ``axis``: slicing
        axis 0/1/2 in numpy (K, J, I) order, or None for the model's (a single-slice volume is always sliced across
        its thin axis). ``weightsDir``: local foundation weights folder (offline sites). ``outputSegmentationNode``:
        existing node to add the new segments to (single volume only); default a new node per volume. ``tta``: use
        the test-time augmentation in the model card (chosen on validation); False = one plain pass per slice.
        ``uncertaintyMap``: also import each result's uncertainty map as a scalar volume (review.py); the scores
        (case, slices) come with every result either way.

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
        opened = openModel(model)  # resolved and its card read once for the whole job
        modelDir, card = opened.folder, opened.card
        cardSegments = _normalisedSegments(card.segments)
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
                    uncertaintyPath=os.path.join(tempDir, f"uncertainty_{i}.nrrd") if uncertaintyMap else "",
                    targetSegmentationNodeID=outputSegmentationNode.GetID() if outputSegmentationNode else None))
            if axis is None and len(autoAxes) == 1 and None not in autoAxes:
                axis = autoAxes.pop()  # single-slice images: slice across the thin axis
            python = _checkedExecutable(self.pythonExecutable or findPythonExecutable(), SegmentationJob.workerName)
            args = [python, "-m", "GMSSegmentLib", "segment"]
            if single:
                args += [tasks[0].inputPath, "-o", tasks[0].outputPath]
                if uncertaintyMap:
                    args += ["--uncertainty", tasks[0].uncertaintyPath]
            else:
                jobsPath = os.path.join(tempDir, "jobs.json")
                with open(jobsPath, "w", encoding="utf-8") as f:
                    json.dump([{"input": t.inputPath, "output": t.outputPath,
                                **({"uncertainty": t.uncertaintyPath} if t.uncertaintyPath else {})} for t in tasks],
                              f, indent=1)
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
            job = SegmentationJob(self._jobFinished, scene, tasks, args, env, tempDir, batch=not single,
                                  inputSteps=steps, warmWorkers=self.warmWorkers if self.keepWorkerWarm else None)
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
                      initFrom: str | OpenedModel | None = None, maxMinutes: float | None = None,
                      weightsDir: str | None = None, extraArgs: Sequence[str] = ()) -> TrainingJob:
        """Start adapting the model ``initFrom`` (folder or installed name, or an :class:`OpenedModel`; None = train a
        new model from scratch) to the (volume node, segmentation node) ``pairs`` and return the running job. The pairs
        are exported first, into the job's temporary folder (:func:`exportTrainingSet` in steps: each
        :meth:`TrainingJob.poll` reads one pair from the scene and a thread writes its files, so Slicer stays
        responsive; everything is checked here, before the job starts; label k+1 = ``segmentNames[k]``) as 3D volumes
        or, for a 2D model (card ``dimension`` 2; without ``initFrom``: when every volume is a single slice), as 8-bit
        PNG images; the worker is ``python -m GMSSegmentLib train ... --progress json``. Adapting with up to 60 pairs,
        it cross-validates (every pair scored by a model adapted on the others, against the starting model, with the
        starting model's inference options) and writes a model only when adapting reliably helps
        (``TrainingJob.estimate``; ``TrainingJob.refused`` when it did not). ``maxMinutes`` bounds the whole run. The
        new model is written to ``outputFolder`` only when the job succeeded with one (put it in a folder of
        ``GMS_MODELS_DIR`` to find it by name).

        Raises ValueError (clear message, nothing written, nothing started) for invalid input."""
        if self.running:
            raise ValueError("a job is already running; cancel it or wait until it finished")
        if len(pairs) < 2:
            raise ValueError("adapting a model needs at least 2 segmented volumes (each is scored by a model adapted "
                             "on the others)")
        if not outputFolder or not str(outputFolder).strip():
            raise ValueError("choose a folder for the new model")
        outputFolder = os.path.abspath(os.path.expanduser(str(outputFolder)))
        if os.path.exists(outputFolder) and (not os.path.isdir(outputFolder) or os.listdir(outputFolder)):
            raise ValueError(f"{outputFolder} already exists; choose a new folder (models are never overwritten)")
        initModel = openModel(initFrom) if initFrom else None  # resolved and its card read once
        initDir = initModel.folder if initModel is not None else None
        if initDir is not None and os.path.abspath(initDir) == outputFolder:
            raise ValueError("the new model's folder is the model being adapted; choose another folder")
        if maxMinutes is not None and not float(maxMinutes) > 0:
            raise ValueError(f"the time budget must be positive, got {maxMinutes} minutes")
        if weightsDir and not os.path.isdir(os.path.expanduser(str(weightsDir))):
            raise ValueError(f"foundation weights folder not found: {weightsDir}")
        if initDir is not None:
            dimension = int(initModel.card.dimension or 3)
        else:
            single = all(v is not None and v.GetImageData() is not None and v.GetImageData().GetDimensions()[2] == 1
                         for v, _ in pairs)
            dimension = 2 if single else 3
        scene = self._scene([n for pair in pairs for n in pair])
        self.warmWorkers.close()  # training needs the memory an idle warm worker holds; the next click starts one
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
            job = TrainingJob(self._jobFinished, scene, args, workerEnvironment(weightsDir), tempDir, workerOutput,
                              outputFolder, export)
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
        folder removed, by a thread (:meth:`_WorkerJob._abandon`). The warm worker is ended too."""
        for job in list(self._jobs):
            if job.running:
                job.cancel()
                job.poll()  # settles what needs no waiting (e.g. a cancel while importing)
                if job.running:
                    job._abandon()
        self.warmWorkers.close()

    def _jobFinished(self, job: _WorkerJob) -> None:
        with contextlib.suppress(ValueError):
            self._jobs.remove(job)
