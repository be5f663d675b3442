"""The background worker process of the Slicer module (no qt, no MRML): started in its own process group, its output
read line by line by threads, its whole process tree ended without making the caller wait, and how it ended told in
words, also when it was started through Slicer's ``PythonSlicer`` launcher.

In the Slicer application the worker's program is ``PythonSlicer``, a CTK AppLauncher that sets up the environment and
runs the real Python (``python-real``) as its child through ``QProcess``. When that child is ended by a signal (the
kernel's out-of-memory killer sends SIGKILL), the launcher does not die of the signal itself: ``applicationFinished``
in ``Base/ctkAppLauncher.cpp`` (AppLauncher v0.1.31 of Slicer 5.8, v0.1.33 of 5.10, v0.1.34 of 5.12 and main) reports
``QProcess::CrashExit`` as the stderr line ``error: [<program>] exit abnormally - Report the problem.`` and exits with
``EXIT_FAILURE`` (1). So a negative exit code only tells of a worker started directly; through the launcher, that
line does (:func:`describeAbnormalExit`).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
import weakref
from typing import Any, Callable, Iterable

CANCEL_GRACE_S = 0.75  # SIGTERM, then SIGKILL after this many seconds
EXIT_WAIT_S = 5.0  # after SIGKILL (or taskkill), wait at most this long for the worker to be gone
#: the line CTK's AppLauncher (PythonSlicer) writes to stderr when the program it runs ended by a signal
LAUNCHER_CRASH_LINE = re.compile(r"^error: \[.*\] exit abnormally - Report the problem\.\s*$")

_liveWorkers: "weakref.WeakSet[WorkerProcess]" = weakref.WeakSet()


@atexit.register
def _killLiveWorkers() -> None:
    """Workers run in their own session: end them when this Python (e.g. the Slicer application) exits."""
    for worker in list(_liveWorkers):
        with contextlib.suppress(Exception):
            if worker.proc.poll() is None:
                worker.signalTree(kill=True)


class WorkerProcess:
    """A child process in its own process group, its stdout/stderr read line by line into :attr:`lines` (a queue of
    ``(stream, line)``) by two threads, so that nothing the caller does waits on a pipe."""

    def __init__(self, args: list[str], env: dict, cwd: str | None = None, name: str = "worker",
                 keepStdin: bool = False):
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200) | getattr(
                subprocess, "CREATE_NO_WINDOW", 0x08000000)
        else:
            kwargs["start_new_session"] = True  # own session and process group: cancel reaches the whole tree
        self.args = list(args)
        try:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.PIPE if keepStdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
                **kwargs)
        except OSError as e:
            raise RuntimeError(f"cannot start the {name} {self.args[0]}: {e}") from None
        self.pid = self.proc.pid
        _liveWorkers.add(self)
        self.lines: queue.Queue = queue.Queue()
        self.exitTime: float | None = None
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, "stdout"), daemon=True,
                             name=f"GMSSegment-stdout-{self.pid}"),
            threading.Thread(target=self._read, args=(self.proc.stderr, "stderr"), daemon=True,
                             name=f"GMSSegment-stderr-{self.pid}"),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                self.lines.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    def send(self, line: str) -> None:
        """Write one line to the worker's stdin (a worker started with ``keepStdin``); OSError if it is gone."""
        try:
            self.proc.stdin.write(line.rstrip("\n") + "\n")
            self.proc.stdin.flush()
        except (AttributeError, ValueError) as e:  # no stdin pipe, or closed
            raise OSError(f"cannot write to the worker: {e}") from None

    def closeStdin(self) -> None:
        """Close the worker's stdin (a served worker then ends by itself)."""
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()

    def returncode(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.exitTime is None:
            self.exitTime = time.monotonic()
        return rc

    def pipesClosed(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def signalTree(self, kill: bool) -> None:
        """SIGTERM (``kill=False``) or SIGKILL to the worker's process group; on Windows ``taskkill /T /F`` the tree
        (which may take seconds: call it from :meth:`end`'s thread or at exit, never from the GUI)."""
        if os.name == "nt":  # no gentle tree-wide signal for a windowless process group: end the tree
            with contextlib.suppress(Exception):
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=5,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000))
            with contextlib.suppress(Exception):
                self.proc.kill()
            return
        sig = signal.SIGKILL if kill else signal.SIGTERM
        try:
            os.killpg(self.pid, sig)  # pgid == pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            if self.proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.proc.send_signal(sig)

    def end(self, grace: float = CANCEL_GRACE_S, then: Callable[[], None] | None = None) -> threading.Thread:
        """End the whole tree from a new thread and return at once: SIGTERM to the group, SIGKILL after ``grace``
        seconds (at once on Windows, where ``taskkill`` ends the tree); then, once the worker has exited (waiting at
        most ``EXIT_WAIT_S``), ``then()`` in that thread. The thread is not a daemon, so an exiting application lets
        it finish (it is bounded: ``grace`` plus a few seconds)."""
        def run():
            if grace > 0 and os.name != "nt":
                self.signalTree(kill=False)
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and self.proc.poll() is None:
                    time.sleep(0.02)
            self.signalTree(kill=True)  # also reaches grandchildren that outlived the leader
            if then is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=EXIT_WAIT_S)
                then()

        thread = threading.Thread(target=run, name=f"GMSSegment-end-{self.pid}")
        thread.start()
        return thread


def describeAbnormalExit(returnCode: int | None, stderrLines: Iterable[str]) -> str | None:
    """How a worker that was ended from outside ended, in words, or None when it exited on its own: ``killed by
    SIGKILL (out of memory, or ended by another program)`` when it was a direct child (negative exit code), and when
    Slicer's launcher ran it and reported its child's crash exit (see the module docstring), which does not say which
    signal: ``ended abnormally, killed by the system (out of memory?), by another program, or crashed``."""
    if returnCode is None or returnCode == 0:
        return None
    if returnCode < 0:
        try:
            name = signal.Signals(-returnCode).name
        except (ValueError, AttributeError):
            name = f"signal {-returnCode}"
        hint = " (out of memory, or ended by another program)" if -returnCode == getattr(signal, "SIGKILL", 9) else ""
        return f"killed by {name}{hint}"
    if any(LAUNCHER_CRASH_LINE.match(line) for line in stderrLines):
        return "ended abnormally: killed by the system (out of memory?), by another program, or it crashed"
    return None
