"""The warm worker on Slicer's side: one ``gms serve`` process (serve.py) kept between segmentation jobs, so that a
second click pays for the work alone, not for starting Python, importing PyTorch and loading the model again.

A job that runs in it sees a :class:`WarmSession`, which behaves like the :class:`WorkerProcess` of a one-job worker
(``pid``, ``lines``, ``returncode()``, ``pipesClosed()``, ``end()``), so that polling, logging, errors and cancelling
are those of every job. The differences are only these:

- the job has ended when the worker has sent both of its end lines (``served`` on stdout, ``END_LINE`` on stderr),
  and its exit code is the one the ``served`` line gives; the worker then waits for the next job;
- a cancel ends the worker's whole process tree, exactly as before, and the next job starts a new worker;
- a worker that died during a job (out of memory, killed) ends that job as a one-job worker would, with its own exit
  code;
- the worker ends itself after ``idleMinutes`` without a job, when its stdin closes (Slicer exited), and when the
  logic shuts down (:meth:`WarmWorkers.close`); a worker started for another program or environment (e.g. another
  weights folder) replaces the idle one.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Callable

from ..serve import END_LINE
from ..workerprocess import WorkerProcess

IDLE_MINUTES = 10.0  # the served worker ends itself after this long without a job
_SERVED_PREFIX = '{"event": "served"'


class WarmWorker:
    """One ``gms serve`` process and whether a job is using it."""

    def __init__(self, program: list[str], env: dict, cwd: str, idleMinutes: float, name: str):
        self.key = _key(program, env)
        self.process = WorkerProcess([*program, "serve", "--idle-minutes", f"{idleMinutes:g}"], env, cwd=cwd,
                                     name=name, keepStdin=True)
        self.busy = False
        self.jobs = 0  # jobs sent so far

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.returncode() is None

    def close(self) -> None:
        """Let it end (stdin closed) and make sure it does (its tree ended after a grace, from a thread)."""
        self.process.closeStdin()
        self.process.end()


def _key(program: list[str], env: dict) -> tuple:
    return tuple(program), tuple(sorted(env.items()))


class WarmSession:
    """One job in a warm worker, seen through the interface of :class:`WorkerProcess` (see the module docstring)."""

    def __init__(self, pool: "WarmWorkers", worker: WarmWorker, commandArgs: list[str], cwd: str):
        self._pool = pool
        self.worker = worker
        self.pid = worker.pid
        self.lines = self  # the job reads (stream, line) pairs with lines.get_nowait()
        self.exitTime: float | None = None
        self._code: int | None = None
        self._servedCode: int | None = None
        self._stderrEnded = False
        self._died = False
        worker.busy = True
        worker.jobs += 1
        self.first = worker.jobs == 1
        worker.process.send(json.dumps({"args": list(commandArgs), "cwd": cwd}))

    def get_nowait(self) -> tuple[str, str]:
        """The next line of this job (the end lines are taken here, never passed on); ``queue.Empty`` if none."""
        while True:
            stream, line = self.worker.process.lines.get_nowait()
            if stream == "stderr" and line == END_LINE:
                self._stderrEnded = True
            elif stream == "stdout" and line.startswith(_SERVED_PREFIX) and self._servedCode is None:
                try:
                    self._servedCode = int(json.loads(line).get("code", 1))
                except (ValueError, TypeError, AttributeError):
                    self._servedCode = 1
            else:
                return stream, line
            if self._stderrEnded and self._servedCode is not None and self._code is None:
                self._settle(self._servedCode)

    def _settle(self, code: int) -> None:
        self._code = code
        self.exitTime = time.monotonic()
        self._pool._release(self.worker, reusable=not self._died and code != 130)

    def returncode(self) -> int | None:
        if self._code is not None:
            return self._code
        rc = self.worker.process.returncode()
        if rc is not None:  # the worker died during the job: the job ends as with a one-job worker
            self._died = True
            self._settle(rc if rc != 0 else 1)
            self.exitTime = self.worker.process.exitTime or self.exitTime
        return self._code

    def pipesClosed(self) -> bool:
        return True if not self._died else self.worker.process.pipesClosed()

    def end(self, grace: float | None = None, then: Callable[[], None] | None = None):
        """Cancel: the worker's whole tree is ended (as a one-job worker's); the next job starts a new one."""
        self._pool._drop(self.worker, close=False)
        self.worker.process.closeStdin()
        kwargs = {"then": then} if grace is None else {"grace": grace, "then": then}
        return self.worker.process.end(**kwargs)


class WarmWorkers:
    """The logic's warm worker (at most one idle at a time). ``idleMinutes``: how long an idle worker waits."""

    def __init__(self, idleMinutes: float = IDLE_MINUTES):
        self.idleMinutes = idleMinutes
        self._workers: list[WarmWorker] = []
        self.started = 0  # workers started so far

    def session(self, program: list[str], commandArgs: list[str], env: dict, cwd: str, root: str,
                name: str = "worker") -> WarmSession:
        """Send a job (``program + commandArgs``, run in ``cwd``) to an idle worker for the same program and
        environment, or to a new one started in ``root`` (a folder that outlives the job's own)."""
        key = _key(program, env)
        worker = None
        for w in list(self._workers):
            if not w.busy and (not w.alive() or w.key != key):
                self._drop(w)
            elif not w.busy and worker is None:
                worker = w
        if worker is not None:
            try:
                return WarmSession(self, worker, commandArgs, cwd)
            except OSError:  # it ended meanwhile (idle time out): start a new one
                self._drop(worker)
        worker = WarmWorker(program, env, root, self.idleMinutes, name)
        self._workers.append(worker)
        self.started += 1
        return WarmSession(self, worker, commandArgs, cwd)

    @property
    def idle(self) -> list[WarmWorker]:
        return [w for w in self._workers if not w.busy and w.alive()]

    def _release(self, worker: WarmWorker, reusable: bool) -> None:
        worker.busy = False
        if not reusable or not worker.alive():
            self._drop(worker)
            return
        for other in [w for w in self._workers if w is not worker and not w.busy]:
            self._drop(other)  # one idle worker is enough

    def _drop(self, worker: WarmWorker, close: bool = True) -> None:
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        if close and worker.alive():
            worker.close()

    def close(self) -> None:
        """End every idle worker (a busy one is ended by its job's cancel)."""
        for w in list(self._workers):
            if not w.busy:
                self._drop(w)
