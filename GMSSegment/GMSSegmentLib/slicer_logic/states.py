"""The states of a job and of each of its volumes."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    notFound: list = field(default_factory=list)  # segments of the model found nowhere in this volume
    uncertaintyPath: str = ""  # where the worker writes the uncertainty map ("" = none asked for)
    uncertainty: float | None = None  # the case score the worker reported (uncertainty.py)
    sliceUncertainty: list = field(default_factory=list)  # one score per slice along sliceAxis (volumes)
    sliceAxis: int | None = None  # numpy axis of the volume (0 = K, 1 = J, 2 = I) the slice scores run along
    uncertaintyNodeID: str | None = None  # the imported map

    @property
    def foundText(self) -> str:
        """"no lesion found" (or "no left or right found") when the model found some of its segments nowhere."""
        return f"no {' or '.join(self.notFound)} found" if self.notFound else ""

    @property
    def fraction(self) -> float:
        if self.state in (TaskState.SEGMENTED, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED):
            return 1.0
        return self.done / self.total if self.total else 0.0


def _int(value, default: int) -> int:
    """An integer field of a worker event or a model card; ``default`` when it is missing or not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
