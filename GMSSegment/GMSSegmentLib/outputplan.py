"""Checking every output of ``gms segment`` before any model is loaded or any inference starts.

:func:`output_problems` gives, per job ``{"input", "output"}``, None or the one-line reason the job cannot run:

* an empty input name (the command that should have named it failed), or a name with a NUL character;
* an unsupported output extension;
* an output that is an input of the run (the same file, also through a symbolic or hard link): refused even with
  ``overwrite``, so an input image is never replaced by a mask;
* an output that an earlier job of the run also writes (the later job is refused: nothing is written twice);
* an output that is a folder, or that exists (without ``overwrite``);
* an output folder that is missing or in which no file can be created (read-only folder or file system): probed once
  per folder by creating and removing the empty temporary file the write itself starts with (atomicfile.py);
* PNG output for an input whose header declares a 3D volume (only the header is read, and only for PNG outputs).

A problem the input file itself has (unreadable, NaN, ...) is left to ``read_image``. The caller reports each
problem as that job's error: the whole command's for a single input, one item's for a batch (the other items run).
"""
from __future__ import annotations

import os

from . import GMSError
from .formats import is_dicom

__all__ = ["output_problems", "png_label_problem", "map_output"]


def output_problems(jobs: list[dict], overwrite: bool = False) -> list[str | None]:
    """One entry per job: None if its output can be written, else the reason (see the module's docstring)."""
    from .imageio import output_format

    inputs = [_identity(j["input"]) if j["input"].strip() and "\0" not in j["input"] else set() for j in jobs]
    planned: list[tuple[set, int]] = []  # identities of the outputs of the jobs accepted so far, with their index
    folders: dict[str, str | None] = {}
    problems: list[str | None] = []
    for i, job in enumerate(jobs):
        src, out = job["input"], job["output"]
        problem = None
        if not src.strip():
            problem = "the input file name is empty"
        elif "\0" in src or "\0" in out:
            bad = src if "\0" in src else out
            problem = f"invalid file name (a NUL character): {bad!r}"
        else:
            try:
                ext = output_format(out)
            except GMSError as e:
                problem = str(e)
        if problem is None:
            ident = _identity(out)
            same_input = i if inputs[i] & ident else next((k for k, ids in enumerate(inputs) if ids & ident), None)
            same_output = next((k for ids, k in planned if ids & ident), None)
            if same_input == i:
                problem = f"output {out} is the input image itself (the same file); choose another output file"
            elif same_input is not None:
                problem = f"output {out} is the input image of item {same_input} ({jobs[same_input]['input']})"
            elif same_output is not None:
                problem = f"output {out} is also the output of item {same_output} ({jobs[same_output]['input']})"
            else:
                problem = _destination_problem(out, overwrite, folders)
            if problem is None and ext == ".dcm" and not is_dicom(src):
                problem = (f"cannot write {out}: a DICOM SEG references its source series, and {src} is not DICOM (a "
                           "series folder or a .dcm file); use .seg.nrrd, .nrrd or .nii.gz")
            if problem is None and ext == ".png" and (is_dicom(src) or _dimension(src) == 3):
                problem = (f"cannot write {out}: PNG output needs a 2D image and {src} is a 3D volume; use .nrrd, "
                           ".nii.gz or .seg.nrrd")
            if problem is None:
                planned.append((ident, i))
        problems.append(problem)
    return problems


def map_output(mask_output: str, folder: str) -> str:
    """Where a batch item's uncertainty map goes: ``folder`` / the mask's file name (``.seg.nrrd``, which holds labels,
    becomes ``.nrrd``)."""
    name = os.path.basename(mask_output)
    if name.lower().endswith(".seg.nrrd"):
        name = name[: -len(".seg.nrrd")] + ".nrrd"
    return os.path.join(folder, name)


def png_label_problem(output: str, max_label: int) -> str | None:
    """The reason a model's label values cannot be written to ``output`` (an 8-bit PNG holds 0..255), or None."""
    if output.lower().endswith(".png") and max_label > 255:
        return f"cannot write {output}: label value {max_label} does not fit an 8-bit PNG; use .nrrd"
    return None


def _identity(path: str) -> set:
    """Keys that name the file ``path`` is or would be: its resolved path and, where it exists, its device and inode
    (so a hard link, or a symbolic link, to the same file shares a key)."""
    keys: set = {("path", os.path.normcase(os.path.realpath(path)))}
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return keys
    if st.st_ino:
        keys.add(("file", st.st_dev, st.st_ino))
    return keys


def _destination_problem(output: str, overwrite: bool, folders: dict) -> str | None:
    dest = os.path.abspath(output)
    if os.path.isdir(dest):
        return f"output path is a folder: {output}"
    if os.path.lexists(dest) and not overwrite:
        return f"output {output} exists; use --overwrite to replace it"
    folder = os.path.dirname(dest)
    if folder not in folders:
        folders[folder] = _folder_problem(folder, os.path.basename(dest))
    return folders[folder]


def _folder_problem(folder: str, name: str) -> str | None:
    """None if a file can be created in ``folder`` (tried with atomic_output's own temporary file, removed at once),
    else why not."""
    from .atomicfile import new_temp_file

    if not os.path.isdir(folder):
        return f"output folder does not exist: {folder}"
    try:
        os.remove(new_temp_file(folder, name))
    except GMSError as e:
        return str(e)
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror or e}"
    return None


def _dimension(path: str) -> int | None:
    """The dimension an image file's header declares (the header only), or None where it cannot be read (the error
    is then ``read_image``'s)."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(os.fspath(path))
        reader.ReadImageInformation()
        return int(reader.GetDimension())
    except (RuntimeError, OSError):
        return None
