"""A small disk for full-disk tests: a tmpfs mounted by the test (needs root on Linux; the tests skip, saying why,
where it cannot be mounted) and a filler file that takes all or nearly all of its space."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "2m", options: str = ""):
    """Mount a tmpfs of ``size`` on ``folder`` (created) for the block, with more mount ``options`` if given (e.g.
    ``"ro"``); unmounted afterwards."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount a small tmpfs for this test")
    folder.mkdir(parents=True, exist_ok=True)
    opts = ",".join(filter(None, [f"size={size}", "mode=0777", options]))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for this test here ({' '.join((r.stderr or r.stdout).split())})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
        if os.path.ismount(folder):  # a process still holds a file there: detach it now, freed when it lets go
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill ``folder``'s file system with ``folder/filler``, then give back ``leave`` bytes (rounded up to pages)."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as f:
        block = b"\xa5" * (64 * 1024)
        while True:
            try:
                f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    page = os.statvfs(folder).f_frsize
    os.truncate(filler, max(os.path.getsize(filler) - -(-leave // page) * page, 0))
    assert free_bytes(folder) >= leave
    return filler
