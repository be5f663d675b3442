"""Writing an output file safely: a hidden temporary file in the destination folder, checked, then moved into place.

Every file the engine writes for a user (label maps, model folders and cards, CSV tables, training caches and
checkpoints) goes through :func:`atomic_output` (or :func:`atomic_write`). The temporary file is moved onto the
destination only after

* the writer finished without an error,
* ``fsync`` succeeded (its errors are reported, not ignored: a full disk or an I/O error can surface only there), and
* the writer's own check, if it gave one (``verify``: e.g. reading a label map back and comparing it voxel by voxel,
  which catches libraries that ignore a failed write, as ITK does for some formats on a full disk).

Otherwise :class:`GMSError` is raised with one line naming the destination, the temporary file is removed, and the
destination is untouched: an earlier file stays as it was, and nothing partial is left behind.

A process killed while writing cannot remove its temporary file; such files (named ``.~<8 hex digits>.<name>``, the
naming of this module only) are removed from a folder by the next process that writes into it, once they are older
than :data:`STALE_AFTER_S` (:func:`remove_stale_temp_files`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import time
from typing import Callable, Iterator

from . import GMSError
from .errortext import one_line

__all__ = ["atomic_output", "atomic_write", "write_failed", "new_temp_file", "remove_stale_temp_files", "is_temp_name",
           "STALE_AFTER_S"]

#: a temporary file untouched for this long is left over from a killed writer (a live write touches it constantly)
STALE_AFTER_S = 300.0

_TEMP_NAME = re.compile(r"\.~[0-9a-f]{8}\..+", re.DOTALL)
_cleaned: set[str] = set()  # folders this process has removed stale temporary files from
#: fsync errors that only say the file system cannot sync (nothing was lost)
_NO_SYNC = {errno.EINVAL, getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1)}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return one_line(exc, limit=None) or type(exc).__name__


def _exists_error(dest: str) -> GMSError:
    return GMSError(f"output file already exists: {dest} (refusing to overwrite; use --overwrite to replace it)")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a file name, no folder) is one of this module's temporary file names."""
    return bool(_TEMP_NAME.fullmatch(name))


def remove_stale_temp_files(folder: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove this module's temporary files (``.~<8 hex>.<name>``, regular files only) from ``folder`` that were last
    modified more than ``max_age_s`` seconds ago: left over from a writer that was killed. Returns the removed paths;
    never raises (a folder that cannot be listed, or a file another process removes first, is skipped)."""
    removed: list[str] = []
    now = time.time()
    with contextlib.suppress(OSError):
        with os.scandir(folder) as entries:
            for entry in entries:
                if not is_temp_name(entry.name):
                    continue
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if entry.is_file(follow_symlinks=False) and now - st.st_mtime > max_age_s:
                        os.remove(entry.path)
                        removed.append(entry.path)
    return removed


def new_temp_file(folder: str | os.PathLike, name: str) -> str:
    """Create an empty temporary file ``.~<8 hex>.<name>`` in ``folder`` (never an existing one; ordinary permissions)
    and return its path; :class:`GMSError` (one line) when the folder does not take a new file. Also a probe of
    whether ``folder`` is writable: remove the file when done (a killed process's one is removed once stale)."""
    folder = os.fspath(folder)
    for _ in range(100):
        candidate = os.path.join(folder, f".~{secrets.token_hex(4)}.{name}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise GMSError(f"cannot write to {folder}: {_reason(e)}") from None
        os.close(fd)
        return candidate
    raise GMSError(f"cannot create a temporary file in {folder}")  # pragma: no cover - 100 collisions of 32 bits


def _disk_full(folder: str) -> bool:
    """Whether the file system of ``folder`` has (next to) no space left (False where that cannot be told)."""
    with contextlib.suppress(OSError, AttributeError):
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize < 64 * 1024
    return False


def _sync(tmp: str, dest: str) -> None:
    """``fsync`` the finished temporary file; a failure (other than a file system that cannot sync) is an error."""
    try:
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows' fsync needs a writable descriptor
    except OSError as e:
        raise write_failed(dest, _reason(e)) from None
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_SYNC:
            raise write_failed(dest, _reason(e)) from None
    finally:
        try:
            os.close(fd)
        except OSError as e:  # NFS and others can report a failed write only here
            raise write_failed(dest, _reason(e)) from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False,
                  verify: Callable[[str], None] | None = None) -> Iterator[str]:
    """Context manager giving a temporary path to write ``path`` safely (see the module's description).

    The temporary file is a hidden file in the same folder whose name ends with the destination's file name (so it has
    the same extension, e.g. ``.seg.nrrd`` or ``.nii.gz``, for writers that choose the format by name). When the block
    finishes, the file is synced and checked (``verify(tmp)``, which raises :class:`GMSError` for a bad file), then
    moved onto ``path``. If anything fails, the temporary file is removed and ``path`` is untouched; an ``OSError``
    of the block (e.g. a full disk) becomes a one-line :class:`GMSError`, other exceptions pass unchanged. Without
    ``overwrite``, an existing ``path`` raises :class:`GMSError` (checked before the block and again, race-free where
    the file system supports hard links, when moving into place).

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
    if folder not in _cleaned:  # once per folder and process: a batch into a large folder lists it only once
        _cleaned.add(folder)
        remove_stale_temp_files(folder)
    if os.path.isdir(dest):
        raise GMSError(f"output path is a folder: {dest}")
    if not overwrite and os.path.lexists(dest):
        raise _exists_error(dest)
    tmp = new_temp_file(folder, name)
    try:
        try:
            yield tmp
        except OSError as e:
            raise write_failed(dest, _reason(e)) from None
        if not os.path.isfile(tmp):
            raise GMSError(f"writing {dest} failed: the temporary output disappeared")
        _sync(tmp, dest)
        if verify is not None:
            verify(tmp)
        try:
            if overwrite:
                os.replace(tmp, dest)
            else:
                _move_no_clobber(tmp, dest)
        except OSError as e:
            raise write_failed(dest, _reason(e)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[str], object], *, overwrite: bool = True,
                 verify: Callable[[str], None] | None = None) -> None:
    """Write ``path`` with ``writer(tmp_path)`` through :func:`atomic_output`. ``writer`` only writes the file (e.g.
    ``safetensors.torch.save_file``, ``torch.save``), so any error it raises is a failed write (libraries wrap a full
    disk in their own error types) and becomes a one-line :class:`GMSError` naming ``path``."""
    dest = os.path.abspath(os.fspath(path))
    with atomic_output(dest, overwrite=overwrite, verify=verify) as tmp:
        try:
            writer(tmp)
        except (OSError, GMSError):
            raise
        except Exception as e:
            raise write_failed(dest, one_line(e, limit=None)) from e


def write_failed(dest: str, reason: str) -> GMSError:
    """The one-line error for a failed write of ``dest``: ``reason``, or only that the disk is full where it is (a
    library's own words for that are long and name the temporary file)."""
    if _disk_full(os.path.dirname(os.path.abspath(dest))):
        reason = "no space left on the device"
    return GMSError(f"cannot write {dest}: {reason}")


def _move_no_clobber(tmp: str, dest: str) -> None:
    try:
        os.link(tmp, dest)  # fails if dest exists: no race with another writer
    except FileExistsError:
        raise _exists_error(dest) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                           errno.EACCES):
            raise
        # file system without hard links: best effort check, then atomic replace
        if os.path.lexists(dest):
            raise _exists_error(dest) from None
        os.replace(tmp, dest)
    else:
        os.remove(tmp)
