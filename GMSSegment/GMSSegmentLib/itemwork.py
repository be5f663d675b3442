"""One input's work in ``gms segment``, shared by the loop of one machine (segmentcmd.py) and the Ray actors
(clusterrun.py): the check of a PNG output against the model's labels, the computation where the model is (labels
and uncertainty), and the outputs and report where the files are (the driver)."""
from __future__ import annotations

import time
from pathlib import Path

from . import GMSError
from .reporting import Reporter


def found_text(segments: list[str], present: list[str]) -> str:
    """The result line's account of what was found: "lesion", "no lesion found", "left, no right found"."""
    missing = [n for n in segments if n not in present]
    parts = list(present) + ([f"no {' or '.join(missing)} found"] if missing else [])
    return ", ".join(parts)


def check_png_labels(job: dict, card) -> None:
    """A PNG output must hold the model's label values (known once the model is resolved)."""
    from .outputplan import png_label_problem

    problem = png_label_problem(job["output"], max(card.label_values, default=0))
    if problem is not None:
        raise GMSError(problem)


def compute(model, options, segmenter, array, spacing_zyx, direction, with_map: bool, log=None, progress=None):
    """The work of one input, where the model is (this process, or a Ray actor): its labels and its uncertainty."""
    from .pipeline import segment_array
    from .uncertainty import result_uncertainty, settings_of

    soft: dict = {}
    labels = segment_array(model, array, options, segmenter=segmenter, spacing_zyx=spacing_zyx, direction=direction,
                           log=log, progress=progress, soft=soft)
    return labels, result_uncertainty(soft, *settings_of(model.card), with_map=with_map)


def finish_item(job: dict, img, labels, unc, card, model_dir, overwrite: bool, rep: Reporter, t0: float,
                extra: dict) -> None:
    """Write one input's outputs (the map first, removed again if the labels fail; a DICOM SEG or a label map) and
    report the result (the JSON event and, for people, the result line)."""
    from .imageio import write_labels
    from .labelwrite import write_map
    from .terminology import has_codes, slicer_terminology

    segments = card.segments or []
    present = [s for s in segments if (labels == s.label).any()]
    map_path = None
    if job.get("uncertainty"):
        map_path = write_map(job["uncertainty"], unc.map, img.geometry, overwrite=overwrite)
    try:
        if job["output"].lower().endswith(".dcm"):
            from .dicomseg import write_seg

            path = write_seg(job["output"], labels, img.dicom_files, segments, card, model_dir, overwrite=overwrite)
        else:
            path = write_labels(job["output"], labels, img.geometry, [s.to_dict() for s in segments],
                                overwrite=overwrite)
    except GMSError:
        if map_path is not None:  # no map without its mask
            Path(map_path).unlink(missing_ok=True)
        raise
    secs = time.perf_counter() - t0
    slices = {"slice_uncertainty": {"axis": unc.axis, "scores": [round(float(v), 4) for v in unc.slices]}
              } if unc.slices.size > 1 else {}
    rep.emit("result", path=path, input=job["input"], seconds=round(secs, 3),
             segments=[{"name": s.name, "label": s.label, "color": s.color,
                        "terminology": slicer_terminology(s) if has_codes(s) else None} for s in segments],
             present=[s.name for s in present], uncertainty=round(unc.score, 4),
             **({"uncertainty_path": map_path} if map_path else {}), **slices, **extra)
    if rep.mode != "json":
        names = found_text([s.name for s in segments], [s.name for s in present])
        print(f"{job['input']} -> {path} ({secs:.1f} s; {names}; uncertainty {unc.score:.2f})", flush=True)
