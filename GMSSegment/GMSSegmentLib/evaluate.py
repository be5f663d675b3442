"""``gms evaluate``: per-case and mean DSC, IoU and HD95 per segment (3D for volumes), printed as a table and written
as CSV, on a list of the data set's split.json (default: "test", else "val") or on given cases."""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import GMSError
from .data import SPLIT_SETTINGS, detect_layout, find_image, load_mask, read_split, split_names, volume_path
from .atomicfile import atomic_output, atomic_write
from .imageio import read_image
from .metrics import label_metrics
from .model import CARD, load_model, resolve_model_path
from .modelcard import ModelCard, TTAOptions
from .options import InferenceOptions
from .pipeline import FastDecodeSettings, SliceSegmenter, ViewCache, pick_device, segment_array_variants, segmenter_for
from .uncertainty import settings_of
from .uncertaintycheck import UncertaintyCheck


def _resize_image(arr: np.ndarray, size: int) -> np.ndarray:
    """(1, Y, X[, 3]) raw image -> (1, size, size[, 3]), antialiased bilinear (what the model input resize does)."""
    t = torch.from_numpy(np.ascontiguousarray(arr[0], np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    r = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    r = r[0] if arr.ndim == 3 else r.permute(1, 2, 0)
    # antialiased interpolation overshoots; keep the input's value range (an 8-bit photo must stay within 0..255)
    return np.clip(r.numpy(), float(arr.min()), float(arr.max()))[None]


def evaluate(model, data, options: InferenceOptions | None = None, *, list_name=None, cases=None, csv_path=None,
             resolution="native", weights_dir=None, device="auto", limit=None, reporter=None, record=False,
             command=None) -> dict:
    """Metrics of ``model`` on a list of ``data``, segmented with ``options``. The default, the card's test-time
    augmentation and post-processing, is what ``gms segment`` and Slicer run; ``InferenceOptions.plain()``: one
    plain pass at the model's input size and no post-processing."""
    options = options or InferenceOptions()
    root = Path(data)
    layout = detect_layout(root)
    dev = pick_device(device)
    model_dir = resolve_model_path(model)
    m = load_model(model_dir, weights_dir=weights_dir, device=dev)
    seg = segmenter_for(m, options, dev)
    variants = (options.postprocess,)
    if cases:
        names, list_name = list(cases), "given"
    else:
        split = read_split(root)
        list_name = list_name or ("test" if "test" in split else "val")
        if list_name not in split:
            raise GMSError(f"split.json of {root} has no list '{list_name}' (has {sorted(split)})")
        names = sorted(split[list_name])
    if limit:
        names = names[:limit]
    train_cases = set(read_split(root).get("train", [])) if (root / "split.json").is_file() else set()
    if list_name != "train" and set(names) & train_cases and (m.card.training or {}).get("data") == root.name:
        print(f"warning: {len(set(names) & train_cases)} evaluated cases are in the training list")
    seg_labels = m.card.label_values
    seg_names = {s.label: s.name for s in m.segments}
    rows = []
    unc = UncertaintyCheck(*settings_of(m.card), seg_labels)
    t0 = time.perf_counter()
    for k, name in enumerate(names):
        soft: dict = {}
        (pred,), gt, spacing = _predict_case(m, seg, root, layout, name, resolution, options.batch_size, variants,
                                             axis=options.axis, presence=options.presence, soft=soft)
        met = label_metrics(pred, gt, seg_labels, spacing)
        score = unc.add(pred, gt, soft, float(np.mean([v["dice"] for v in met.values()])))
        for lab_v, v in met.items():
            rows.append({"case": name, "segment": seg_names[lab_v], "label": lab_v, **v,
                         "gt_empty": int(not (gt == lab_v).any()), "pred_empty": int(not (pred == lab_v).any()),
                         "uncertainty": round(score, 5)})
        if reporter is not None:
            reporter.progress(k + 1, len(names))
    secs = time.perf_counter() - t0
    summary = summarise(rows, seg_names)
    run_name = resolution + _options_name(options)
    print_table(rows, summary, model_dir, root, list_name, run_name, len(names), secs)
    uncertainty = unc.print()
    if csv_path:
        with atomic_output(csv_path, overwrite=True) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                w.writeheader()
                w.writerows(rows)
        print(f"per-case metrics written to {csv_path}")
    if record:
        _record(model_dir, root, list_name, run_name, len(names), summary, command, uncertainty)
    return summary


def _options_name(options: InferenceOptions) -> str:
    """How ``options`` differ from the card's choices, in evaluate's table and the card's metrics: '' (none),
    '/no-tta', '/no-postprocess', '/no-tta/no-postprocess'; other explicit choices are spelled out."""
    name = ""
    if (options.tta, options.scales) == (1, None):
        name += "/no-tta"
    elif (options.tta, options.scales) != (None, None):
        name += f"/{options.tta or 'card'}_views" + "".join(f"_{s}" for s in options.scales or ())
    if options.postprocess is not None:
        pp = options.postprocess
        name += "/no-postprocess" if not pp else "/postprocess=" + json.dumps(pp, sort_keys=True, separators=(",", ":"))
    return name


def _predict_case(m, seg, root: Path, layout: str, name: str, resolution: str, batch_size: int,
                  variants=(None,), axis: int | None = None, presence=True, record: dict | None = None,
                  soft: dict | None = None):
    """One case -> (predictions, ground truth, spacing or None), all in the card's label values: one prediction per
    post-processing setting in ``variants`` (None: the card's), from one run of the network (slicing a volume along
    ``axis``, None: the card's; ``presence``, ``record`` and ``soft`` as in segment_array_variants)."""
    if layout == "2d":
        label_values = m.card.trained_label_values or m.card.label_values
        seg_labels = m.card.label_values
        img = read_image(find_image(root, name))
        gt = load_mask(root, name, label_values)
        arr = img.array
        if resolution == "model":
            arr = _resize_image(arr, m.input_size)
            gt = np.asarray(Image.fromarray(gt).resize((m.input_size,) * 2, Image.NEAREST))
        preds = segment_array_variants(m, arr, list(variants), batch_size=batch_size, segmenter=seg,
                                       presence=presence, record=record, soft=soft)
        # ground truth holds segment indices 1..n; the prediction the card's label values
        return [p[0] for p in preds], np.array([0] + seg_labels, np.uint8)[gt], None
    img = read_image(volume_path(root, "imagesTr", name))
    gt = read_image(volume_path(root, "labelsTr", name)).array.astype(np.int32)
    preds = segment_array_variants(m, img.array, list(variants), batch_size=batch_size, axis=axis, segmenter=seg,
                                   spacing_zyx=img.geometry.spacing_zyx, direction=img.geometry.direction,
                                   presence=presence, record=record, soft=soft)
    return preds, gt, img.geometry.spacing_zyx


def open_validation(model, data, weights_dir=None, device="auto"):
    """What a choice made on a model's validation cases needs: (data folder, its layout, device, model folder, the
    loaded model, the validation case names)."""
    root = Path(data)
    dev = pick_device(device)
    model_dir = resolve_model_path(model)
    m = load_model(model_dir, weights_dir=weights_dir, device=dev)
    return root, detect_layout(root), dev, model_dir, m, validation_cases(m.card, root)


def validation_cases(card: ModelCard | dict, root: Path) -> list[str]:
    """The validation cases the model was selected on (a split list, or the part carved from its training list)."""
    card = ModelCard.coerce(card)
    tr = card.training or {}
    if tr.get("data") != root.name:
        raise GMSError(f"model '{card.name}' was trained on '{tr.get('data')}', not on {root}: its validation "
                       "cases are not known")
    return split_names(root, **{k: tr["config"][k] for k in SPLIT_SETTINGS if k in tr["config"]})[1]


def _pp_name(z_smooth: float, largest_component: bool) -> str:
    """'none', 'largest_component', 'z_smooth_0.25', 'z_smooth_0.333+largest_component'."""
    parts = ([f"z_smooth_{z_smooth:.3g}"] if z_smooth else []) + (["largest_component"] if largest_component else [])
    return "+".join(parts) or "none"


def _option_key(views: int, scales, size: int, pp: str) -> str:
    """Name of an inference option in the card's validation table: '1_views/none', '2_views_224+256/largest_component'."""
    sc = "" if list(scales) == [size] else "_" + "+".join(str(s) for s in scales)
    return f"{views}_views{sc}/{pp}"


def select_postprocess(model, data, weights_dir=None, device="auto", batch_size=8, command=None,
                       views=(1, 2, 4), multiscale=True, rule: str = "one-se") -> dict:
    """Choose the inference options on the model's own validation cases, by mean Dice (2D at the model's input size,
    3D at native resolution), and store the choice in its card: test-time augmentation (1, 2 or 4 flip views, or 8
    views with the 90-degree rotations; the model's input size alone or with one or two larger sizes,
    ``tta_scale_sets``) and post-processing (none or largest component per segment;
    for 3D models also smoothing along the slicing axis, ``Z_SMOOTH_CHOICES``). The network runs once per case, flip
    view and input size (the options share the views they have in common); the post-processing settings are all
    derived from those runs. The options are ordered by cost
    (fewer network passes, then no smoothing, then no post-processing) and ``choose_option`` takes the cheapest one
    within one paired standard error of the best mean (``rule="one-se"``), or the best mean (``rule="best"``)."""
    from .postprocess import Z_SMOOTH_CHOICES, tta_scale_sets

    if rule not in SELECTION_RULES:  # before any work
        raise GMSError(f"unknown selection rule '{rule}' (use {' or '.join(SELECTION_RULES)})")
    root, layout, dev, model_dir, m, names = open_validation(model, data, weights_dir, device)
    size = m.input_size
    scale_sets = tta_scale_sets(size, m.foundation.downscale) if multiscale else [[size]]
    # cheapest first: the cost of a pass grows with the flip views and the pixels of every input size
    passes = sorted(((v, sc) for v in views for sc in scale_sets),
                    key=lambda o: o[0] * sum(s * s for s in o[1]))
    segs = {(v, tuple(sc)): SliceSegmenter(m, dev, FastDecodeSettings(enabled=True), tta=v, scales=sc)
            for v, sc in passes}
    views = ViewCache()  # each flip view at each input size is decoded once per case and shared by the options
    for seg in segs.values():
        seg.view_cache = views
    seg_labels = m.card.label_values
    resolution = "model" if layout == "2d" else "native"
    smooth = Z_SMOOTH_CHOICES if m.card.is_3d else (0.0,)
    pps = [(z, lc) for z in smooth for lc in (False, True)]  # cheapest first
    variants = [{"z_smooth": z, "largest_component": lc} for z, lc in pps]
    options = [(v, tuple(sc), pp) for v, sc in passes for pp in pps]
    scores = {o: [] for o in options}
    for name in names:
        views.clear()
        for (v, sc), seg in segs.items():
            # a 2D case is one (Y, X) image, so its components are the image's in either dimension
            preds, gt, spacing = _predict_case(m, seg, root, layout, name, resolution, batch_size, variants)
            for pp, p in zip(pps, preds):
                met = label_metrics(p, gt, seg_labels, spacing)
                scores[(v, sc, pp)].append(float(np.mean([v_["dice"] for v_ in met.values()])))
    mean = {o: round(float(np.mean(s)), 4) for o, s in scores.items()}
    best, top, se = choose_option(options, scores)
    if rule == "best":
        best = top
    keys = {o: _option_key(*o[:2], size, _pp_name(*o[2])) for o in options}
    table = {keys[o]: mean[o] for o in options}
    print(f"validation ({len(names)} cases, {resolution} resolution) mean Dice (and the paired standard error of "
          "its difference to the best):")
    for o in options:
        mark = "  <- chosen" if o == best else ("  <- best mean" if o == top else "")
        print(f"  {keys[o]:<48} {mean[o]:.4f}  ({se[o]:.4f}){mark}")
    common = {"selected_on": f"{len(names)} validation cases", "rule": SELECTION_RULES[rule], "validation_dice": table,
              "validation_se": {keys[o]: round(se[o], 4) for o in options}, "command": command,
              "date": time.strftime("%Y-%m-%d")}
    z_smooth, lc = best[2]
    pp = {"largest_component": lc, **({"z_smooth": z_smooth} if len(smooth) > 1 else {}), **common}
    tta = {"views": best[0], "scales": list(best[1]), **common}

    def change(card: ModelCard):
        card.postprocess = pp
        card.tta = TTAOptions.from_dict(tta)

    _update_card(model_dir, change)
    print(f"test-time augmentation ({best[0]} flip view(s), input sizes {list(best[1])}) and post-processing "
          f"({_pp_name(*best[2])}) recorded in {model_dir / CARD}")
    return {"postprocess": pp, "tta": tta}


SELECTION_RULES = {"one-se": "the cheapest option whose mean Dice is within one paired standard error of the best mean",
                   "best": "the best mean Dice (the cheaper option on a tie)"}


def choose_option(options: list, scores: dict) -> tuple:
    """The one-standard-error rule over test-time options. ``options`` are listed cheapest first and ``scores[o]``
    holds option ``o``'s per-case Dice (the same cases, in the same order, for every option). Returns (chosen, best,
    se): ``best`` has the highest mean (the cheaper one on a tie), ``se[o]`` is the standard error of the mean of the
    per-case differences between ``best`` and ``o``, and ``chosen`` is the first (cheapest) option whose mean is at
    most ``se[o]`` below the best's: a gain smaller than its own noise on the validation cases does not buy a more
    expensive option. With one case there is no error estimate and the best mean is chosen."""
    arr = {o: np.asarray(scores[o], dtype=np.float64) for o in options}
    mean = {o: float(arr[o].mean()) for o in options}
    best = options[0]
    for o in options[1:]:
        if mean[o] > mean[best] + 1e-12:
            best = o
    se = {}
    for o in options:
        d = arr[best] - arr[o]
        se[o] = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    chosen = next(o for o in options if mean[best] - mean[o] <= se[o] + 1e-12)
    return chosen, best, se


def _update_card(model_dir: Path, change) -> None:
    """Read the model's card, apply ``change(card)`` to its :class:`ModelCard` and write it back atomically."""
    card_path = model_dir / CARD
    card = ModelCard.from_dict(json.loads(card_path.read_text()))  # checked when the model was loaded
    change(card)
    atomic_write(card_path, lambda p: Path(p).write_text(json.dumps(card.to_dict(), indent=2) + "\n"))


def _record(model_dir: Path, root: Path, list_name: str, resolution: str, n: int, summary: dict, command,
            uncertainty: dict | None = None):
    """Write the measured metrics into the model card (and the command that reproduces them)."""
    key = f"{root.name}/{list_name}/{resolution}"
    entry = {
        "cases": n,
        "segments": {k: {m: _rounded(v) for m, v in s.items()} for k, s in summary.items()},
        "command": command, "date": time.strftime("%Y-%m-%d"),
    }
    if uncertainty is not None:
        entry["uncertainty"] = {k: _rounded(v) for k, v in uncertainty.items() if not k.endswith("reliability")}
    def change(card: ModelCard):
        card.metrics = card.metrics if card.metrics is not None else {}
        card.metrics[key] = entry

    _update_card(model_dir, change)
    print(f"metrics recorded in {model_dir / CARD} under '{key}'")


def _rounded(v):
    return (round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v


def image_level(rows) -> dict:
    """Case level, for one segment: of the cases that hold it, how many got a prediction (sensitivity); of those
    that do not, how many were predicted empty (specificity; None without such cases)."""
    with_seg = [x for x in rows if not x["gt_empty"]]
    without = [x for x in rows if x["gt_empty"]]
    found = sum(1 for x in with_seg if not x["pred_empty"])
    empty = sum(1 for x in without if x["pred_empty"])
    return {"cases_with": len(with_seg), "found": found,
            "sensitivity": found / len(with_seg) if with_seg else None,
            "cases_without": len(without), "predicted_empty": empty,
            "specificity": empty / len(without) if without else None}


def summarise(rows, seg_names) -> dict:
    out = {}
    for lab, name in seg_names.items():
        r = [x for x in rows if x["label"] == lab]
        d = np.array([x["dice"] for x in r])
        j = np.array([x["iou"] for x in r])
        h = np.array([x["hd95"] for x in r], dtype=float)
        finite = h[np.isfinite(h)]
        out[name] = {"cases": len(r), "dice_mean": float(d.mean()), "dice_std": float(d.std()),
                     "iou_mean": float(j.mean()), "iou_std": float(j.std()),
                     "hd95_mean": float(finite.mean()) if finite.size else math.nan,
                     "hd95_undefined": int((~np.isfinite(h)).sum()),
                     "pred_empty": int(sum(x["pred_empty"] for x in r)),
                     "gt_empty": int(sum(x["gt_empty"] for x in r)), **image_level(r)}
    if len(seg_names) > 1:
        out["mean"] = {"dice_mean": float(np.mean([v["dice_mean"] for v in out.values()])),
                       "iou_mean": float(np.mean([v["iou_mean"] for k, v in out.items() if k != "mean"]))}
    return out


def print_table(rows, summary, model_dir, root, list_name, resolution, n, secs):
    print(f"\nmodel {model_dir} on {root} [{list_name}, {n} cases, resolution {resolution}] in {secs:.0f} s")
    if n <= 20:
        print(f"{'case':<28}{'segment':<14}{'DSC':>8}{'IoU':>8}{'HD95':>9}")
        for r in rows:
            print(f"{r['case']:<28}{r['segment']:<14}{100 * r['dice']:8.2f}{100 * r['iou']:8.2f}{r['hd95']:9.2f}")
    print(f"{'segment':<16}{'cases':>6}{'DSC % (mean±sd)':>20}{'IoU % (mean±sd)':>20}{'HD95':>9}"
          f"{'pred empty':>12}{'gt empty':>10}")
    for name, s in summary.items():
        if name == "mean":
            print(f"{'mean':<16}{'':>6}{100 * s['dice_mean']:20.2f}{100 * s['iou_mean']:20.2f}")
            continue
        dsc = f"{100 * s['dice_mean']:.2f} ± {100 * s['dice_std']:.2f}"
        iou = f"{100 * s['iou_mean']:.2f} ± {100 * s['iou_std']:.2f}"
        print(f"{name:<16}{s['cases']:>6}{dsc:>20}{iou:>20}{s['hd95_mean']:9.2f}{s['pred_empty']:>12}"
              f"{s['gt_empty']:>10}")
    print(f"image level: {'segment':<16}{'with it':>9}{'found':>7}{'sensitivity':>13}{'without':>9}{'empty':>7}"
          f"{'specificity':>13}")
    for name, s in summary.items():
        if name == "mean":
            continue
        sens = "-" if s["sensitivity"] is None else f"{100 * s['sensitivity']:.1f} %"
        spec = "-" if s["specificity"] is None else f"{100 * s['specificity']:.1f} %"
        print(f"{'':13}{name:<16}{s['cases_with']:>9}{s['found']:>7}{sens:>13}{s['cases_without']:>9}"
              f"{s['predicted_empty']:>7}{spec:>13}")
