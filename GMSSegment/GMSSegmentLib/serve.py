"""``gms serve``: the warm worker. One process answers many ``gms segment`` jobs, keeping PyTorch imported and the
models loaded, so that a click in Slicer on a 2D image pays for the work alone, not for starting Python, importing
torch and reading weights again (about 3 s each time; ``python benchmarks/click_latency.py`` measures both).

Protocol (one JSON object per line):

- stdin, one line per job: ``{"args": ["segment", ..., "--progress", "json"], "cwd": "/job/folder"}``. Only
  ``segment`` is served; anything else is answered with exit code 2 and one error line.
- stdout: the job's own JSON events (exactly those of ``gms segment --progress json``), then
  ``{"event": "served", "code": N}``, N being the exit code the same command would have had as its own process.
- stderr: the job's own lines, then the line :data:`END_LINE`, so that a reader of both pipes knows it has every line of
  the job once it has seen both ends.

The process ends itself when stdin closes (Slicer exited or dropped it), after ``--idle-minutes`` without a job, and on
SIGTERM (a cancel ends the whole process tree, exactly as with a one-job worker: the next job starts a new worker).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import sys
import threading
from collections import OrderedDict
from pathlib import Path

END_LINE = "\x1egms-serve: end of job"
SERVED = ("segment",)


class ModelCache:
    """The models a warm worker keeps loaded: at most ``size``, the least recently used dropped first. A model is
    loaded again when any file of its folder changed (size or time), or for another weights folder or device."""

    def __init__(self, size: int = 2):
        self.size = size
        self._models: OrderedDict = OrderedDict()
        self.loads = 0  # how many times a model was read from disk (tests and the benchmark read it)

    @staticmethod
    def _key(folder, weights_dir, device) -> tuple:
        folder = Path(folder).resolve()
        files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
        return (str(folder), files, str(weights_dir or ""), os.environ.get("GMS_WEIGHTS_DIR", ""), str(device))

    def __call__(self, folder, weights_dir=None, device="cpu", progress=None):
        from .model import load_model

        key = self._key(folder, weights_dir, device)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = load_model(folder, weights_dir=weights_dir, device=device, progress=progress)
        self.loads += 1
        self._models[key] = model
        while len(self._models) > self.size:
            self._models.popitem(last=False)
        return model


def _read_lines(stream, out: queue.Queue) -> None:
    try:
        for line in iter(stream.readline, ""):
            out.put(line)
    except (OSError, ValueError):
        pass
    out.put(None)  # end of input


def _request(line: str) -> tuple[list[str] | None, str | None, str]:
    """(args, cwd, problem) of one request line; ``problem`` is '' for a valid request."""
    try:
        req = json.loads(line)
        args = [str(a) for a in req["args"]]
        cwd = req.get("cwd")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, None, f"the warm worker got an unreadable request: {e}"
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in SERVED:
        return None, None, f"the warm worker serves {', '.join(SERVED)} only, not {command}"
    if cwd is not None and not os.path.isdir(str(cwd)):
        return None, None, f"the job folder {cwd} does not exist"
    return args, (str(cwd) if cwd is not None else None), ""


def _finish_job(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.write(END_LINE + "\n")
    sys.stderr.flush()
    sys.stdout.write(json.dumps({"event": "served", "code": int(code)}) + "\n")
    sys.stdout.flush()


def serve(run, idle_minutes: float = 10.0, stdin=None) -> int:
    """Answer jobs from ``stdin`` until it closes or stays silent for ``idle_minutes``; returns the exit code.
    ``run(argv, models=cache)`` runs one command and returns its exit code (``cli.main``)."""
    from .allocator import release_free_memory
    from .reporting import Reporter

    home = os.getcwd()
    models = ModelCache()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(stdin or sys.stdin, lines), daemon=True, name="gms-serve-stdin").start()
    while True:
        try:
            line = lines.get(timeout=max(1.0, 60.0 * idle_minutes))
        except queue.Empty:
            return 0  # idle for too long: the next job starts a new worker
        if line is None:
            return 0
        if not line.strip():
            continue
        args, cwd, problem = _request(line)
        if problem:
            Reporter("json").error(problem)
            _finish_job(2)
            continue
        try:
            if cwd is not None:
                os.chdir(cwd)
            code = run(args, models=models)
        except SystemExit as e:  # argparse refused the arguments (it printed why)
            code = e.code if isinstance(e.code, int) else 2
        finally:
            with contextlib.suppress(OSError):
                os.chdir(home)
        _finish_job(code)
        if code == 130:  # cancelled (SIGTERM): the process is being ended
            return code
        gc.collect()
        release_free_memory()


def add_parser(sub, func) -> None:
    """``gms serve``; ``func(args, rep)`` runs it (cli.cmd_serve)."""
    sv = sub.add_parser("serve", help="the warm worker of the Slicer module: answer gms segment jobs read as JSON "
                        "lines from stdin, keeping the models loaded (see serve.py)")
    sv.add_argument("--idle-minutes", type=float, default=10.0,
                    help="end after this many minutes without a job (default 10)")
    sv.set_defaults(func=func)
