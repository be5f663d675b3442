"""Where the worker runs: the module's folder, the Python executable, the environment and the packages it needs."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys

from ..dependencies import requirementsForCard
from .modelinfo import OpenedModel, openModel
from .mrml import slicer


def moduleDirectory() -> str:
    """The folder that holds the ``GMSSegmentLib`` package (the Slicer module's folder); the worker's PYTHONPATH."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def requirementsForModel(model: str | OpenedModel | None = None) -> list[str]:
    """The worker's Python packages for a model (folder or name, or an :class:`OpenedModel`, whose card is not read
    again; see ``dependencies.requirementsForCard``)."""
    card = None
    if model:
        with contextlib.suppress(Exception):
            card = openModel(model).card
    return requirementsForCard(card)
