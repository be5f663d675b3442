"""Temporary folders that name the process that made them, and removing those a killed process left behind.

The Slicer logic keeps each job in a temporary folder ``<prefix><pid>-<random>`` (and stages exported training sets
and published models the same way) and removes it when the job ends. If Slicer itself is killed, nothing removes it:
:func:`remove_stale_temp_folders` (called when the logic starts and before it makes a new folder) removes the folders
of its own naming whose process is gone and that were last changed more than :data:`~.atomicfile.STALE_AFTER_S` ago.
A folder of a process that is still running (another Slicer) is never touched.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time

from .atomicfile import STALE_AFTER_S

__all__ = ["make_temp_folder", "remove_stale_temp_folders", "process_alive"]


def make_temp_folder(parent: str | os.PathLike, prefix: str) -> str:
    """A new empty folder ``<prefix><this process's id>-<random>`` in ``parent``."""
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def remove_stale_temp_folders(parent: str | os.PathLike, prefix: str, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the folders :func:`make_temp_folder` made in ``parent`` with ``prefix`` whose process has ended and that
    were last changed more than ``max_age_s`` seconds ago; returns their paths. Anything else (other names, files,
    links, folders of running processes) is left alone; never raises."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-.+", re.DOTALL)
    removed: list[str] = []
    now = time.time()
    with contextlib.suppress(OSError):
        with os.scandir(parent) as entries:
            for entry in entries:
                m = pattern.fullmatch(entry.name)
                if not m:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    if now - entry.stat(follow_symlinks=False).st_mtime <= max_age_s or process_alive(int(m.group(1))):
                        continue
                    shutil.rmtree(entry.path)
                    removed.append(entry.path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (True when that cannot be told: such a folder is kept)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would end the process on Windows
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _windows_process_alive(pid: int) -> bool:  # pragma: no cover - Windows only
    try:
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
        try:
            code = wintypes.DWORD()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    except Exception:
        return True
