"""Writing an output file atomically: a hidden temporary file in the destination folder, moved into place when complete.

Every file the engine writes for a user (label maps, model folders, cards, CSV tables) goes through
:func:`atomic_output`, so a failed write never leaves a partial file and an existing file is never replaced unless
asked to.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from typing import Iterator

from . import GMSError

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Context manager giving a temporary path to write ``path`` atomically.

    The temporary file is a hidden file in the same folder whose name ends with the destination's file name (so it has
    the same extension, e.g. ``.seg.nrrd`` or ``.nii.gz``, for writers that choose the format by name). When the block
    finishes, it is moved onto ``path`` (``os.replace``); if the block raises, the temporary file is removed and
    nothing is written. Without ``overwrite``, an existing ``path`` raises :class:`GMSError` (checked before the block
    and again, race-free where the file system supports hard links, when moving into place).

    Example::

        with atomic_output("scores.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                ...
    """
    dest = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(dest)
    if not name:
        raise GMSError(f"invalid output file name: {os.fspath(path)}")
    if not os.path.isdir(folder):
        raise GMSError(f"output folder does not exist: {folder}")
    if os.path.isdir(dest):
        raise GMSError(f"output path is a folder: {dest}")
    if not overwrite and os.path.lexists(dest):
        raise GMSError(f"output file already exists: {dest} (refusing to overwrite; use --overwrite to replace it)")

    tmp = ""
    for _ in range(100):
        candidate = os.path.join(folder, f".~{secrets.token_hex(4)}.{name}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise GMSError(f"cannot write to {folder}: {' '.join(str(e.strerror or e).split())}") from e
        os.close(fd)
        tmp = candidate
        break
    if not tmp:  # pragma: no cover - 100 collisions of 32 random bits
        raise GMSError(f"cannot create a temporary file in {folder}")

    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise GMSError(f"writing {dest} failed: the temporary output disappeared")
        with contextlib.suppress(OSError):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, dest)
        else:
            _move_no_clobber(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _move_no_clobber(tmp: str, dest: str) -> None:
    try:
        os.link(tmp, dest)  # fails if dest exists: no race with another writer
    except FileExistsError:
        raise GMSError(
            f"output file already exists: {dest} (refusing to overwrite; use --overwrite to replace it)"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                           errno.EACCES):
            raise
        # file system without hard links: best effort check, then atomic replace
        if os.path.lexists(dest):
            raise GMSError(
                f"output file already exists: {dest} (refusing to overwrite; use --overwrite to replace it)"
            ) from None
        os.replace(tmp, dest)
    else:
        os.remove(tmp)
