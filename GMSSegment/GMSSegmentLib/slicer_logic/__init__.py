"""The MRML side of GMSSegment: run the engine as a background worker on volume nodes and import its results.

This package never imports qt: it works in the 3D Slicer application and on the headless ``slicer-core`` MRML library
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

from ..dependencies import OPTIONAL_REQUIREMENTS, REQUIREMENTS, missingRequirements, requirementsForCard  # noqa: F401
from .environment import (_inSlicerApplication, findPythonExecutable, moduleDirectory,  # noqa: F401
                          requirementsForModel, workerEnvironment)
from .geometry import (_checkStillInScene, _imageToWorld, _volumeArray, _volumeInputStep, _volumeShape,  # noqa: F401
                       _vtkMatrix, _writeVolumeArray, exportVolumeNode, ijkToRasFromLpsGeometry, ijkToRasFromVolumeNode,
                       lpsGeometryFromIjkToRas)
from .jobs import SegmentationJob, TrainingJob, _publishFolder  # noqa: F401
from .logic import DEVICES, SegmentationLogic, _checkedExecutable  # noqa: F401
from .modelinfo import (OpenedModel, findModels, headlineMetric, modelSummary, openModel,  # noqa: F401
                        readModelCard, resolveModel)
from .mrml import _removeNode  # noqa: F401
from .resultimport import (_BINARY_LABELMAP, _LoadedSegment, _normalisedSegments, _orientedImage,  # noqa: F401
                           _readResultSegments, _snapToVolumeGeometry, _takeBack, _unusedNodeName,
                           addVolumeNodeFromFile, importResult, uniqueSegmentName)
from .review import (importUncertainty, jumpToSlice, nextUncertainSlice, removeUncertainty,  # noqa: F401
                     reviewOrder, sliceCenterRas, takeScores, uncertainSlices)
from .states import JobState, TaskState, VolumeTask, _int  # noqa: F401
from .trainingset import TrainingSetExport, exportTrainingSet, trainingArguments  # noqa: F401
from .workerjob import PIPE_DRAIN_S, _quote, _WorkerJob  # noqa: F401

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
    "openModel",
    "OpenedModel",
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
    "reviewOrder",
    "uncertainSlices",
    "nextUncertainSlice",
    "sliceCenterRas",
    "jumpToSlice",
]
