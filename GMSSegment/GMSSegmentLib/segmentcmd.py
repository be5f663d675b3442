"""``gms segment``: the jobs of a run (inputs, DICOM series, outputs named or given), every output checked before a
model loads, then the one slice loop per input and its outputs (label map or DICOM SEG, uncertainty map), with one
result or error event per item."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from . import GMSError
from .formats import default_output_extension, split_extension
from .itemwork import check_png_labels, compute, finish_item
from .reporting import Reporter


def _expanded_inputs(inputs: list[str], series: str | None) -> list[tuple[str, str | None, str | None]]:
    """(input, DICOM series UID or None, output stem or None) per input; a folder holding several DICOM series is one
    entry per series (dicomio.expand_dicom_inputs); files are looked at by name only."""
    if not any(os.path.isdir(i) for i in inputs) and series is None:
        return [(i, None, None) for i in inputs]
    from .dicomio import expand_dicom_inputs

    return expand_dicom_inputs(inputs, series)


def default_output(input_path: str, out_dir: Path | None, fmt: str | None, stem: str | None = None) -> Path:
    """``<stem>_gms<fmt>`` in ``out_dir`` (default: the input's folder); ``fmt`` None: the input's default output
    format (:func:`formats.default_output_extension`); ``stem``: instead of the input's (a DICOM series' name)."""
    p = Path(input_path)
    stem = stem or split_extension(p)[0]
    if fmt is None:
        fmt = default_output_extension(p)
    return (out_dir or p.parent) / f"{stem}_gms{fmt if fmt.startswith('.') else '.' + fmt}"


# -- segment ------------------------------------------------------------------------------------------------------------
def cmd_segment(args, rep: Reporter) -> int:
    from .outputplan import map_output, output_problems

    if args.jobs:
        try:
            jobs = json.loads(Path(args.jobs).read_text())
            jobs = [{"input": str(j["input"]), "output": str(j["output"]),
                     **({"uncertainty": str(j["uncertainty"])} if j.get("uncertainty") else {}),
                     **({"series": str(j["series"])} if j.get("series") else {})} for j in jobs]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise GMSError(f"cannot read the jobs file {args.jobs}: {e}") from None
    else:
        if not args.inputs:
            raise GMSError("no input given")
        inputs = _expanded_inputs(args.inputs, args.series)  # a folder of several DICOM series: one input per series
        if len(inputs) > 1 or (args.output and Path(args.output).is_dir()):
            out_dir = Path(args.output) if args.output else None
            if out_dir is not None and not out_dir.is_dir():
                raise GMSError(f"with several inputs (or DICOM series), -o must be an existing folder: {out_dir}")
            jobs = [{"input": i, "output": str(default_output(i, out_dir, args.format, stem)),
                     **({"series": uid} if uid else {})} for i, uid, stem in inputs]
        else:
            i, uid, stem = inputs[0]
            out = args.output or str(default_output(i, None, args.format, stem))
            jobs = [{"input": i, "output": out, **({"series": uid} if uid else {})}]
    batch = len(jobs) > 1 or bool(args.jobs)
    if args.uncertainty:
        if batch and not Path(args.uncertainty).is_dir():
            raise GMSError(f"with several inputs, --uncertainty must be an existing folder: {args.uncertainty}")
        for j in jobs:
            j["uncertainty"] = map_output(j["output"], args.uncertainty) if batch else args.uncertainty
    n_ok = n_failed = 0
    # every output is checked before any model is loaded: a single input's problem is the command's error; a batch
    # item's is that item's error, and the other items run. Uncertainty maps are checked as outputs of their item.
    maps = [i for i, j in enumerate(jobs) if j.get("uncertainty")]
    checked = output_problems(jobs + [{"input": jobs[i]["input"], "output": jobs[i]["uncertainty"]} for i in maps],
                              overwrite=args.overwrite)
    problems = checked[:len(jobs)]
    for k, i in enumerate(maps):
        if jobs[i]["uncertainty"].lower().endswith(".seg.nrrd"):
            checked[len(jobs) + k] = (f"cannot write the uncertainty map {jobs[i]['uncertainty']}: a .seg.nrrd holds "
                                      "labels; use .nrrd, .nii.gz or .png")
        problems[i] = problems[i] or checked[len(jobs) + k]
    for i, problem in enumerate(problems):
        if problem is not None:
            if not batch:
                raise GMSError(problem)
            n_failed += 1
            rep.error(problem, input=jobs[i]["input"], item=i)
    todo = [i for i, problem in enumerate(problems) if problem is None]

    dicom_out = [i for i in todo if jobs[i]["output"].lower().endswith(".dcm")]
    if dicom_out:
        from .dicomseg import highdicom_problem

        problem = highdicom_problem()
        if problem is not None:
            if not batch:
                raise GMSError(problem)
            for i in dicom_out:
                n_failed += 1
                rep.error(problem, input=jobs[i]["input"], item=i)
            todo = [i for i in todo if i not in dicom_out]
    if todo and getattr(args, "cluster", None):  # spread over Ray actors (clusterrun.py); the driver writes
        from .clusterrun import run_on_cluster

        ok, failed = run_on_cluster(jobs, todo, args, rep, batch)
        n_ok, n_failed = n_ok + ok, n_failed + failed
        todo = []
    if todo:  # PyTorch is imported only now
        from .imageio import read_image
        from .model import load_model, resolve_model_path
        from .options import InferenceOptions
        from .pipeline import pick_device, segmenter_for

        device = pick_device(args.device)
        model_dir = resolve_model_path(args.model)
        rep.log(f"model {model_dir} on {device}")
        load = getattr(args, "model_cache", None) or load_model  # a warm worker (serve.py) keeps models loaded
        model = load(model_dir, weights_dir=args.weights_dir, device=device,
                     progress=rep.download_progress("foundation weights"))
        options = InferenceOptions.from_args(args)
        segmenter = segmenter_for(model, options, device)
    for i in todo:
        job = jobs[i]
        extra = {"item": i} if batch else {}
        t0 = time.perf_counter()
        try:
            check_png_labels(job, model.card)
            img = read_image(job["input"], series_uid=job.get("series"))
            name = Path(job["input"]).name

            def progress(done, total):
                if done == 0:
                    rep.start(total, desc=name, input=job["input"], **extra)
                rep.progress(done, total, **extra)

            labels, unc = compute(model, options, segmenter, img.array, img.geometry.spacing_zyx,
                                  img.geometry.direction, bool(job.get("uncertainty")),
                                  log=lambda msg: rep.log(f"{name}: {msg}"), progress=progress)
            rep.close_bar()
            finish_item(job, img, labels, unc, model.card, model_dir, args.overwrite, rep, t0, extra)
            n_ok += 1
        except GMSError as e:
            n_failed += 1
            rep.error(str(e), input=job["input"], **extra)
            if not batch:
                return 2
        except Exception as e:  # an unexpected failure of one batch item must not stop the others
            if not batch:
                raise
            import traceback

            traceback.print_exc(file=sys.stderr)
            n_failed += 1
            rep.error(f"unexpected {type(e).__name__}: {e}", input=job["input"], **extra)
    if batch:
        rep.emit("done", ok=n_ok, failed=n_failed)
        if rep.mode != "json":
            print(f"{n_ok} segmented, {n_failed} failed", flush=True)
    return 0 if n_failed == 0 else 2
