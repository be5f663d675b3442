"""What every background job shares: the worker process, its log and events, polling, waiting and cancelling."""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from typing import Callable, Sequence

from .. import GMSError
from ..workerprocess import WorkerProcess, describeAbnormalExit
from .states import JobState, _int

log = logging.getLogger(__name__)

PIPE_DRAIN_S = 2.0  # after the worker exited, wait at most this long for its pipes to close


class _WorkerJob:
    """What every background job shares: the worker process, its log, polling, waiting and cancelling, the events
    every worker sends (``done``, ``download``) and the finishing sequence. Subclasses handle their own events
    (:meth:`_onEvent`) and settle a job whose worker has exited without a cancel (:meth:`_complete`). ``onFinished``
    is called with the job once it has finished, however it ended (the logic forgets it then)."""

    workerName = "worker"
    cancelNote = "Cancelled"  # the log line of a cancelled job
    batch = False
    tasks: Sequence = ()

    def __init__(self, onFinished: Callable, scene, args: list[str], env: dict, tempDir: str,
                 inputSteps: Sequence = (), warmWorkers=None):
        self._onFinished = onFinished
        #: a :class:`~.warmworker.WarmWorkers` to run in (a worker kept between jobs), or None: a worker of its own
        self.warmWorkers = warmWorkers
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
        if self.warmWorkers is not None and self.args[1:3] == ["-m", "GMSSegmentLib"]:
            self._worker = self.warmWorkers.session(self.args[:3], self.args[3:], self._env, cwd=self.tempDir,
                                                    root=os.path.dirname(self.tempDir), name=self.workerName)
            how = "Started the warm worker" if self._worker.first else "Sent to the warm worker"
            self._logLine(f"{how} (pid {self._worker.pid}): {' '.join(_quote(a) for a in self.args)}")
            return
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
        it returns True); then always remove the temporary folder and call ``onFinished``."""
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
        """Every finished job, however it ended: the end time, the temporary folder removed, ``onFinished`` called."""
        self.endTime = time.monotonic()
        self._cleanup()
        self._onFinished(self)

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
        self._onFinished(self)
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


def _quote(arg: str) -> str:
    return f'"{arg}"' if (" " in arg or not arg) else arg
