"""The two jobs: segmenting volume nodes (and importing the results) and training a model on scene cases."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Callable, Sequence

from ..ownedtemp import make_temp_folder, remove_stale_temp_folders
from ..modelcard import ModelCard
from .modelinfo import _cardJson
from .resultimport import _normalisedSegments, _takeBack, importResult
from .review import importUncertainty, removeUncertainty, takeScores
from .states import JobState, TaskState, VolumeTask, _int
from .trainingset import TrainingSetExport
from .workerjob import _WorkerJob

log = logging.getLogger(__name__)


class SegmentationJob(_WorkerJob):
    """A running worker over one or several volume nodes. Drive it with :meth:`poll` (never blocks)."""

    workerName = "segmentation worker"

    def __init__(self, onFinished: Callable, scene, tasks: list[VolumeTask], args: list[str], env: dict,
                 tempDir: str, batch: bool, inputSteps: Sequence = (), warmWorkers=None):
        self.tasks = tasks
        self.batch = batch
        self.modelDir = ""
        self.card = ModelCard()  # the model's card, read once when the job was started
        self._imports: list | None = None  # results waiting to be imported, once the worker has exited
        self._importTotal = 0  # how many results were queued for import (a failed import still counts as handled)
        self._crashed = False
        super().__init__(onFinished, scene, args, env, tempDir, inputSteps=inputSteps, warmWorkers=warmWorkers)

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
            text = f"Done: {n} volume{'s' if n != 1 else ''} segmented in {self.elapsed:.1f} s"
            empty = [t for t in self.tasks if t.notFound]
            if empty and not self.batch:
                text += f" ({empty[0].foundText})"
            elif empty:
                text += f"; {empty[0].foundText if len({t.foundText for t in empty}) == 1 else 'not everything found'}" \
                        f" in {len(empty)} of them"
            return text
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
                takeScores(task, event)
                self._logLine(prefix + "Segmented" + (f" (uncertainty {task.uncertainty:.2f})"
                                                      if task.uncertainty is not None else ""))
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
        removeUncertainty(self.scene, task)
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
            importResult(self.scene, t)
            if t.uncertaintyPath and os.path.isfile(t.uncertaintyPath):
                try:
                    importUncertainty(self.scene, t)
                except BaseException:
                    self._removeImport(t)
                    raise
            t.state = TaskState.SUCCEEDED
            if t.segmentationNodeID is None:  # every segment found nowhere: nothing added
                self._logLine(f"Imported nothing of {t.volumeName}: {t.foundText}")
                return
            node = self.scene.GetNodeByID(t.segmentationNodeID)
            self._logLine(f"Imported {len(t.segmentIDs)} segment(s) of {t.volumeName} into "
                          f"'{node.GetName() if node else t.segmentationNodeID}'"
                          + (f" ({t.foundText})" if t.notFound else ""))
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

    def __init__(self, onFinished: Callable, scene, args: list[str], env: dict, tempDir: str,
                 workerOutput: str, outputFolder: str, export: TrainingSetExport):
        self.workerOutput = workerOutput
        self.outputFolder = outputFolder
        self.export: dict = {}  # what exportTrainingSet returns, once the cases are written
        self._export = export
        self.modelDir = ""
        self.card: dict = {}  # the new model's card as the worker wrote it, once the job succeeded
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
        self.foldsDone = 0
        self.foldsTotal = 0
        #: the cross-validated estimate of a few-case adaptation (adapt.Estimate.summary: before, after, gain, se,
        #: better, worse, adopted...), once the worker has reported it
        self.estimate: dict | None = None
        #: True when the adaptation was refused (it did not reliably help): the job succeeded without a model
        self.refused = False
        self._result: dict | None = None
        # the pairs are read from the scene one per poll and written in a thread (see _WorkerJob._prepare)
        steps = [lambda i=i: export.read(i) for i in range(len(export))]
        super().__init__(onFinished, scene, args, env, tempDir, inputSteps=steps)

    @property
    def progress(self) -> float:
        """0..1: encoding the cases 0-0.1, training 0.1-0.9 (epochs, or the time budget if that ends it sooner),
        choosing the inference options 0.9-1."""
        if self.state == JobState.SUCCEEDED:
            return 1.0
        if self.stage == "cache":
            return 0.1 * (self.cacheDone / self.cacheTotal if self.cacheTotal else 0.0)
        if self.stage == "cross-validation":
            return 0.1 + 0.75 * (self.foldsDone / self.foldsTotal if self.foldsTotal else 0.0)
        if self.stage == "training":
            parts = [self.epoch / self.epochs] if self.epochs else []
            if self.maxMinutes:
                parts.append(self.trainSeconds / (60 * self.maxMinutes))
            return 0.1 + 0.8 * min(1.0, max(parts, default=0.0))
        if self.stage == "options":
            return 0.9
        if self.stage == "presence":
            return 0.95
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
            if self.stage == "cross-validation":
                return (f"Cross-validating the adaptation: fold {min(self.foldsDone + 1, self.foldsTotal)} of "
                        f"{self.foldsTotal}" if self.foldsTotal else "Cross-validating the adaptation: scoring "
                        "the starting model...")
            if self.stage == "training" and self.estimate is not None:
                return "Adapting on all the cases..."
            if self.stage == "options":
                return "Choosing the inference options on the validation cases..."
            if self.stage == "presence":
                return "Choosing the presence decision on the validation cases..."
            return "Starting the training worker..."
        if self.state == JobState.SUCCEEDED and self.refused:
            return (f"No model saved: {self.estimateText}. Adapting did not reliably help on these cases: keep "
                    "using the starting model")
        if self.state == JobState.SUCCEEDED and self.estimate is not None:
            return (f"Done: model '{os.path.basename(self.modelDir)}' saved; {self.estimateText}; "
                    f"in {self.elapsed / 60:.1f} min")
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
        elif kind == "progress" and event.get("stage") == "cross-validation":
            self.stage = "cross-validation"
            self.foldsDone = _int(event.get("done"), self.foldsDone)
            self.foldsTotal = _int(event.get("total"), self.foldsTotal)
        elif kind == "estimate":
            self.estimate = {k: v for k, v in event.items() if k != "event"}
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

    @property
    def estimateText(self) -> str:
        """'cross-validated Dice 83.0 -> 88.1 (gain +5.1 ± 1.3 over 20 cases, 17 better, 3 worse)', or ''."""
        e = self.estimate
        if not e:
            return ""
        try:
            se = f" ± {100 * float(e['se']):.1f}" if e.get("se") is not None else ""
            return (f"cross-validated Dice {100 * float(e['before']):.1f} -> {100 * float(e['after']):.1f} "
                    f"(gain {100 * float(e['gain']):+.1f}{se} over {int(e['cases'])} cases, {int(e['better'])} "
                    f"better, {int(e['worse'])} worse)")
        except (KeyError, TypeError, ValueError):
            return "cross-validated estimate unreadable"

    def _complete(self) -> bool:
        if self.returnCode == 0 and self._result is not None and self._result.get("adopted") is False:
            if self.estimate is None and isinstance(self._result.get("estimate"), dict):
                self.estimate = self._result["estimate"]
            self.refused = True
            self.state = JobState.SUCCEEDED
            self._logLine(self.statusText)
            return True
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
        self.card = _cardJson(self.modelDir)
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
