"""``gms train``: fit a latent mapping model on a 2D or 3D data set with a frozen foundation autoencoder.

Cost design for 2 CPU cores (the paper's recipe spends most of its time in the frozen autoencoder):
* image and mask latents are encoded once, for ``augment_copies`` augmented copies of every training sample (copy 0 is
  the plain image), and cached on disk; training then runs on latents only;
* the latent MSE loss (deep supervision on heads 2-4, as the reference) is computed for the whole batch, the decoded
  Dice term, which back-propagates through the frozen decoder, only for ``dice_samples`` samples of each batch on the
  last ``dice_heads`` heads (1: the final head only; 3: heads 2-4, as the reference);
* model selection on a validation part carved from the training list (never the test list), by decoded Dice;
  with ``ema`` the validated and saved weights are an exponential moving average of the trained ones (smoother than
  the last step's weights in a short, noisy schedule).
"""
from __future__ import annotations

import hashlib
import json
import math
import shlex
import time
from collections import Counter
from copy import deepcopy
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import GMSError, __version__
from .atomicfile import atomic_write
from .data import SPLIT_SETTINGS, detect_layout, load_2d, load_3d, read_split, split_names, volume_orientation
from .lmm import LatentMappingModel, LMMConfig
from .model import STATS, WEIGHTS, GMSModel
from .modelcard import ModelCard
from .modelpaths import resolve_model_path
from .options import TrainConfig
from .latentcache import LatentCache, _resize_labels, code_image  # noqa: F401 (also imported from here)
from .pipeline import training_precision
from .trainsegments import check_against_masks, check_negatives, training_segments
from .trainstep import (EpochRunner, decoded_dice_loss, dice_loss, learning_rate, per_image_dice,  # noqa: F401
                        soft_probs, step_loss, validate)
from .torchload import load_weights_only
from .weights import sha256_file


def _log(msg: str, log_file: Path | None = None, echo: bool = True):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    if echo:
        print(line, flush=True)
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(line + "\n")



def train(cfg: TrainConfig, events=None) -> Path | None:
    """Train (or with ``cfg.init_from`` adapt) a model; returns its folder. ``events(kind, **fields)``, if given,
    receives what the worker protocol reports (``gms train --progress json``) instead of the log lines on stdout:
    ``log`` (message), ``stage`` (cache / training / options), ``progress`` (stage cache: done, total entries),
    ``epoch`` (the epoch's record plus epochs, max_minutes and the best validation Dice so far), ``download`` (what,
    done, total: the foundation weights fetched on first use) and at the end ``result`` (path, best). The log file in
    the work folder gets every log line either way."""
    from .autoencoders import foundation_fingerprint, load_foundation

    t_begin = time.time()

    if not 0 <= cfg.ema < 1:  # checked before any data is read or encoded
        raise GMSError(f"--ema must be 0 (off) or a decay in (0, 1), got {cfg.ema}")
    if cfg.weight_decay < 0:
        raise GMSError(f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    if not 0 <= cfg.min_lr <= 1:
        raise GMSError(f"--min-lr must be a fraction of --lr in [0, 1], got {cfg.min_lr}")
    if cfg.dice_heads not in (1, 2, 3):
        raise GMSError(f"--dice-heads must be 1 (the final head), 2 or 3 (heads 2-4, as the paper), "
                       f"got {cfg.dice_heads}")
    if cfg.keep_every < 0:
        raise GMSError(f"--keep-every must be 0 (off) or a number of epochs, got {cfg.keep_every}")
    base, base_ref = _init_model(cfg) if cfg.init_from else (None, None)
    if base is not None:  # the base model's input size, normalisation and slicing axis unless given
        cfg = replace(cfg, input_size=cfg.input_size or base.input_size,
                      normalization=cfg.normalization or base.card.normalization,
                      axis=cfg.axis if cfg.axis is not None else base.card.slicing_axis)
    else:
        cfg = replace(cfg, input_size=cfg.input_size or 224, axis=cfg.axis or 0)
    root = Path(cfg.data)
    adapt_note = None
    layout = detect_layout(root)
    folds = _few_shot_folds(cfg, root) if base is not None else 0
    if folds:  # every case trains and is scored by cross-validation (adapt.py): no validation part is carved
        train_names, val_names = _all_cases(cfg, root), []
    else:
        if base is not None:
            cfg, adapt_note = _keep_base_validation(cfg, base.card, root)
        train_names, val_names = split_names(root, **{k: getattr(cfg, k) for k in SPLIT_SETTINGS})
    # the segments (adapting: the model's unless given) and their check against the masks, before anything is written
    chosen = training_segments(cfg.segments, cfg.label_values, layout, base.card if base is not None else None)
    check_against_masks(chosen, root, layout, train_names + val_names)
    if cfg.negative_list:
        check_negatives(root, layout, cfg.negative_list, read_split(root)[cfg.negative_list])
    cfg = replace(cfg, segments=chosen.names)
    segments, label_values = chosen.segments, chosen.label_values
    out = Path(cfg.output)
    work = Path(cfg.work_dir) if cfg.work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "train.log"
    report = events or (lambda kind, **fields: None)

    def log(m):
        _log(m, log_file, echo=events is None)
        report("log", message=m)
    torch.manual_seed(cfg.seed)

    n_seg = len(segments)
    orientation = None
    if layout == "2d":
        norm = cfg.normalization or {"mode": "photo"}
        samples_fn = lambda n: [load_2d(root, n, label_values, norm)]  # noqa: E731
    else:
        norm = cfg.normalization or {"mode": "percentile", "low": 0.5, "high": 99.5}
        # the training volumes' orientation (the most common one; the others are permuted/flipped into it) is
        # recorded in the card, and inference brings every input volume into it
        # (adapting a model: its own orientation, which its slices were learned in)
        found = Counter(volume_orientation(root, n) for n in train_names)
        named = sorted(((c, k) for k, c in found.items() if k), key=lambda t: (-t[0], t[1]))
        orientation = (base.card.orientation if base is not None else None) or (named[0][1] if named else None)
        if len(found) > 1:
            log(f"training volumes in several orientations {dict(found)}: all brought into {orientation}")
        elif set(found) - {orientation}:
            log(f"training volumes in {dict(found)}: brought into the --init-from model's {orientation}")
        samples_fn = lambda n: load_3d(root, n, norm, cfg.axis, label_values, orientation)  # noqa: E731
    codes = np.array([s["code"] for s in segments], np.float32)
    log(f"data {root} ({layout}): {len(train_names)} train, {len(val_names)} validation cases; segments {cfg.segments} "
        f"(mask values {label_values}, from {chosen.origin})")
    if adapt_note:
        log(adapt_note)

    # a first use downloads the weights: reported as events (the worker protocol never imports tqdm), else a tqdm bar
    download = (lambda done, total: report("download", what="foundation weights", done=done, total=total)) \
        if events is not None else None
    foundation = load_foundation(cfg.foundation, weights_dir=cfg.weights_dir, progress=download)
    foundation = foundation.to(memory_format=torch.channels_last)
    fingerprint = foundation_fingerprint(cfg.foundation, cfg.weights_dir, progress=download)
    if base is not None:
        theirs = base.card.foundation.files
        if theirs and theirs != fingerprint:  # before the expensive encoding
            raise GMSError(f"--init-from model '{base.card.name}' was trained on other {cfg.foundation['name']} "
                           "weights (their SHA-256 differ from the ones loaded here); its latents would not match")
        base.attach_foundation(foundation)  # the model's own check of latent channels and name, also before encoding
    key_src = json.dumps([str(root.resolve()), train_names, val_names, cfg.augment_copies, cfg.seed, cfg.input_size,
                          cfg.foundation, norm, label_values, cfg.axis, layout,
                          "2d images read by read_image"]  # caches from the earlier PIL reader are not reused
                         + ([orientation] if orientation else []), sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else work / "cache"
    cpu = torch.device("cpu")
    precision = training_precision(cpu, cfg.precision)
    # the training latents are encoded in the training precision (bf16: 2.5x faster here, and they are stored as fp16
    # anyway); the validation latents in fp32, as inference encodes, so that selection sees what users will get
    t_cache = time.time()
    train_cache = cache_dir / f"train-{key}{'-bf16' if precision == 'bf16' else ''}.safetensors"
    cache_existed = train_cache.is_file()
    log(f"training precision {precision} (requested {cfg.precision})")
    report("stage", stage="cache")
    # progress over both caches, in samples (3D: volumes) encoded
    n_tr = len(train_names) * cfg.augment_copies
    n_all = n_tr + len(val_names)
    tr = LatentCache.build(samples_fn, train_names, cfg.augment_copies, foundation, cfg.input_size, codes, cfg.seed,
                           train_cache, log, precision=precision,
                           progress=lambda d, _: report("progress", stage="cache", done=d, total=n_all))
    if folds:
        from . import adapt

        card_training = {"data": str(root.name), "layout": layout, "train_cases": len(train_names),
                         "validation_cases": 0, "label_values": label_values,
                         "latent_cache": {"entries": int(tr.img.shape[0]), "seconds": round(time.time() - t_cache, 1),
                                          "reused": cache_existed, "precision": precision},
                         "init_from": base_ref, "precision": precision,
                         "config": {k: v for k, v in asdict(cfg).items() if k not in ("data", "output", "weights_dir",
                                                                                        "cache_dir", "work_dir")}}
        done, estimate = adapt.run(cfg, base, base_ref, root, layout, train_names, tr, codes, precision, folds,
                                   t_begin, card_training, log=log, report=report)
        report("result", path=str(done.resolve()) if done is not None else None, adopted=done is not None,
               estimate=estimate)
        return done
    va = LatentCache.build(samples_fn, val_names, 1, foundation, cfg.input_size, codes, cfg.seed,
                           cache_dir / f"val-{key}.safetensors", log,
                           progress=lambda d, _: report("progress", stage="cache", done=n_tr + d, total=n_all))

    cache_s = time.time() - t_cache

    # latent statistics for standardisation (per channel, over the training cache)
    def stats(t):
        t = t.float()
        return t.mean(dim=(0, 2, 3)), t.std(dim=(0, 2, 3)).clamp_min(1e-3)

    if base is None:
        im_mean, im_std = stats(tr.img)
        mk_mean, mk_std = stats(tr.mask)
        lmm = LatentMappingModel(LMMConfig(latent_channels=foundation.latent_channels))
    else:  # the starting weights were trained on latents standardised with the base model's statistics: keep them
        im_mean, im_std, mk_mean, mk_std = (getattr(base, k).flatten() for k in STATS)
        lmm = LatentMappingModel(LMMConfig.from_dict(base.card.lmm))
        lmm.load_state_dict(base.lmm.state_dict())
    lmm = lmm.to(memory_format=torch.channels_last)
    card = {
        "name": cfg.name or out.name,
        "version": "1.0",
        "description": cfg.description or f"GMS model for {', '.join(cfg.segments)}",
        "engine_version": __version__,
        "foundation": {**({"name": cfg.foundation} if isinstance(cfg.foundation, str) else cfg.foundation),
                       "files": fingerprint},
        "input_size": cfg.input_size,
        "normalization": norm,
        "axis": cfg.axis,
        **({"orientation": orientation} if orientation else {}),
        "dimension": 2 if layout == "2d" else 3,
        "segments": segments,
        "training": {"data": str(root.name), "layout": layout, "train_cases": len(train_names),
                     "validation_cases": len(val_names), "label_values": label_values,
                     "latent_cache": {"entries": int(tr.img.shape[0]) + int(va.img.shape[0]),
                                      "seconds": round(cache_s, 1), "reused": cache_existed,
                                      "precision": precision},
                     **({"init_from": base_ref} if base is not None else {}),
                     "config": {k: v for k, v in asdict(cfg).items() if k not in ("data", "output", "weights_dir",
                                                                                    "cache_dir", "work_dir")}},
        "licence": cfg.licence,
        "citation": cfg.citation,
        "metrics": {},
    }
    # with EMA the model that is validated and saved holds the averaged copy; the optimiser trains ``lmm``
    ema_lmm = deepcopy(lmm).requires_grad_(False) if cfg.ema > 0 else None
    model = GMSModel(card, ema_lmm if ema_lmm is not None else lmm,
                     {"image_mean": im_mean, "image_std": im_std, "mask_mean": mk_mean, "mask_std": mk_std})
    model.attach_foundation(foundation)

    model.card.training["precision"] = precision
    opt = torch.optim.AdamW(lmm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    runner = EpochRunner(model, lmm, opt, torch.from_numpy(codes), batch_size=cfg.batch_size,
                         dice_samples=cfg.dice_samples, dice_heads=cfg.dice_heads, latent_noise=cfg.latent_noise,
                         precision=precision, ema_lmm=ema_lmm, ema=cfg.ema, compile=cfg.compile, log=log)
    if cfg.compile:
        # full batches go through the compiled graph; a last partial batch and validation use the eager module,
        # which shares the parameters
        log("LMM training step compiled with torch.compile (the first step includes the compilation)")
    n_train = len(tr.img) // cfg.augment_copies
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    warm = steps_per_epoch * cfg.warmup_epochs

    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None

    ckpt = work / "last.pt"
    start_epoch, best, history = 0, -1.0, []
    if cfg.resume and ckpt.is_file():
        try:
            state = load_weights_only(ckpt, "the training checkpoint")  # a code-running pickle is refused
            lmm.load_state_dict(state["lmm"])
            opt.load_state_dict(state["opt"])
            start_epoch, best = int(state["epoch"]), float(state["best"])
        except GMSError as e:
            raise GMSError(f"{e}; remove it or pass --no-resume") from None
        except Exception as e:  # another run's checkpoint (other LMM shape, missing keys)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise GMSError(f"cannot resume from {ckpt} ({type(e).__name__}: {first}); remove it or pass "
                           "--no-resume") from None
        history = json.loads(state["history"]) if "history" in state else []
        if ema_lmm is not None:
            ema_lmm.load_state_dict(state["ema"] if "ema" in state else state["lmm"])
        log(f"resumed from {ckpt} at epoch {start_epoch} (best validation Dice {best:.4f})")
    t_start = time.time() - (history[-1]["elapsed_s"] if history else 0.0)

    codes_t = torch.from_numpy(codes)
    tr_img, tr_mask = tr.img.float(), tr.mask.float()
    tr_lab = tr.labels.long()
    va_img = va.img.float()
    report("stage", stage="training")
    if base is not None and start_epoch == 0:
        # the starting point is validated first and kept unless training beats it on the validation cases
        best = validate(model, va_img, va.labels, codes_t, n_seg)
        model.card.metrics = {"validation": {"dice": round(best, 4), "cases": len(val_names), "epoch": 0,
                                             "note": "decoded at input size, per slice (the --init-from model)"}}
        model.card.training["selected_epoch"] = 0
        model.card.training["selected_seconds"] = 0.0
        model.save(out, overwrite=True)
        history.append({"epoch": 0, "val_dice": best, "elapsed_s": 0.0, "saved": True})
        log(json.dumps(history[-1]) + f"  (the starting point, {cfg.init_from})")
        report("epoch", **history[-1], epochs=cfg.epochs, max_minutes=cfg.max_minutes, best=best)
    step = start_epoch * steps_per_epoch
    epoch = start_epoch
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        t_ep = time.time()
        losses, step = runner.epoch(tr_img, tr_mask, tr_lab, cfg.augment_copies, seed=cfg.seed, epoch=epoch,
                                    step=step, lr_at=lambda k: learning_rate(k, time.time() - t_start, cfg.lr, warm,
                                                                             total_steps, budget_s, cfg.min_lr))
        model.card.training["compiled"] = runner.compiled
        elapsed = time.time() - t_start
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "epoch_s": time.time() - t_ep, "elapsed_s": elapsed}
        last_epoch = epoch + 1 == cfg.epochs
        over_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
        if (epoch + 1) % cfg.val_every == 0 or last_epoch or over_time:
            vd = validate(model, va_img, va.labels, codes_t, n_seg)
            rec["val_dice"] = vd
            if vd > best:
                best = vd
                model.card.metrics = {"validation": {"dice": round(vd, 4), "cases": len(val_names),
                                                     "epoch": epoch + 1, "note": "decoded at input size, per slice"}}
                model.card.training["selected_epoch"] = epoch + 1
                model.card.training["selected_seconds"] = round(elapsed, 1)
                model.save(out, overwrite=True)
                rec["saved"] = True
        history.append(rec)
        log(json.dumps(rec))
        report("epoch", **rec, epochs=cfg.epochs, max_minutes=cfg.max_minutes, best=best)
        # "output" lets gms average find the card and latent statistics these weights belong to
        state = {"lmm": lmm.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "best": best,
                 "history": json.dumps(history), "output": str(out.resolve())}
        if ema_lmm is not None:
            state["ema"] = ema_lmm.state_dict()
        atomic_write(ckpt, lambda p: torch.save(state, p))
        if cfg.keep_every and (epoch + 1) % cfg.keep_every == 0:  # the weights validation sees, for averaging
            kept = "ema" if ema_lmm is not None else "lmm"
            atomic_write(work / f"epoch-{epoch + 1:04d}.pt",
                         lambda p: torch.save({kept: state[kept], "epoch": state["epoch"], "output": state["output"]}, p))
        if over_time:
            log(f"time budget of {cfg.max_minutes} min reached after epoch {epoch + 1}")
            stopped_early = True
            break
    # record the whole run in the card of the selected model: epochs run and training time to the end (the selected
    # epoch and the time it was reached are selected_epoch / selected_seconds)
    final = GMSModel.load(out)
    final.card.training.update(epochs_run=history[-1]["epoch"] if history else 0,
                               train_seconds=round(history[-1]["elapsed_s"], 1) if history else 0.0,
                               total_seconds=round(time.time() - t_start, 1), stopped_early=stopped_early,
                               history=history)
    final.save(out, overwrite=True)
    if cfg.select_postprocess:
        from .evaluate import select_postprocess

        report("stage", stage="options")
        # the equivalent stand-alone command, so that the card says how to redo the choice of its options
        redo = ["gms", "postprocess", str(root), "--model", str(out)]
        redo += ["--weights-dir", str(cfg.weights_dir)] if cfg.weights_dir else []
        select_postprocess(out, root, weights_dir=cfg.weights_dir, device="cpu", command=shlex.join(redo))
        if cfg.negative_list:  # the presence decision needs lesion-free validation cases to be chosen on
            from .presencecal import calibrate_presence

            report("stage", stage="presence")
            redo = ["gms", "presence", str(root), "--model", str(out)]
            redo += ["--weights-dir", str(cfg.weights_dir)] if cfg.weights_dir else []
            calibrate_presence(out, root, weights_dir=cfg.weights_dir, device="cpu", command=shlex.join(redo),
                               log=log)
        else:
            log("no presence decision: the validation cases hold no case without the segments (train with "
                "--negatives LIST to learn and choose one, or run gms presence)")
    log(f"done: best validation Dice {best:.4f}; model folder {out}")
    report("result", path=str(out.resolve()), best=best)
    return out


def _all_cases(cfg: TrainConfig, root: Path) -> list[str]:
    """Every case an adaptation judged by cross-validation trains on: the training list (its first --max-train) and
    the --negatives list."""
    split = read_split(root)
    if cfg.train_list not in split:
        raise GMSError(f"split.json of {root} has no list '{cfg.train_list}' (has {sorted(split)})")
    names = sorted(split[cfg.train_list])[:cfg.max_train or None]
    if cfg.negative_list:
        if cfg.negative_list not in split:
            raise GMSError(f"split.json of {root} has no list '{cfg.negative_list}' (has {sorted(split)})")
        names = sorted(set(names) | set(split[cfg.negative_list]))
    return names


def _few_shot_folds(cfg: TrainConfig, root: Path) -> int:
    """Folds of the cross-validation that judges this adaptation (adapt.cv_folds; 0: the usual carved validation)."""
    from .adapt import cv_folds

    return cv_folds(cfg.cv_folds, len(_all_cases(cfg, root)), True, bool(cfg.val_list or cfg.max_val))


def _keep_base_validation(cfg: TrainConfig, base_card: ModelCard | dict, root: Path) -> tuple[TrainConfig, str | None]:
    """Adapting a model on the data set it was trained on, with its validation part carved from the training list:
    carve the same part (its seed and fraction), whatever --seed says, so that none of the cases the model was trained
    on are counted as validation (its starting point would look better than it is) and none of the cases it was selected
    on are trained on. A --split-seed, --val-fraction or list given explicitly is kept."""
    base_card = ModelCard.coerce(base_card)
    tr = base_card.training or {}
    conf = tr.get("config")
    if cfg.val_list or tr.get("data") != root.name or not isinstance(conf, dict) or conf.get("val_list"):
        return cfg, None
    base_seed = conf.get("split_seed")
    base_seed = conf.get("seed", 0) if base_seed is None else base_seed
    keep = {k: conf[k] for k in ("train_list", "val_fraction") if k in conf}
    if cfg.split_seed is not None or any(getattr(cfg, k) != v for k, v in keep.items()):
        return cfg, None  # the user chose another split on purpose
    if base_seed == cfg.seed:
        return cfg, None
    return replace(cfg, split_seed=int(base_seed)), (
        f"validation: the part of '{cfg.train_list}' that '{base_card.name}' was selected on (split seed "
        f"{base_seed}; --seed {cfg.seed} drives the augmentation and shuffling only)")


def _init_model(cfg: TrainConfig) -> tuple[GMSModel, dict]:
    """The --init-from model, loaded (without its foundation) and checked against the training configuration before
    any data is read, and the reference to it that the new card records."""
    folder = resolve_model_path(cfg.init_from)
    if Path(cfg.output).resolve() == folder:
        raise GMSError(f"the output folder {cfg.output} is the --init-from model itself; write the adapted model to "
                       "another folder (the original is never overwritten)")
    base = GMSModel.load(folder)
    theirs = base.card.foundation.name
    ours = cfg.foundation["name"] if isinstance(cfg.foundation, dict) else str(cfg.foundation)
    if theirs != ours:
        raise GMSError(f"--init-from model '{base.card.name}' was trained on the foundation model '{theirs}', "
                       f"not '{ours}' (pass --foundation to match it)")
    ref = {"name": base.card.name, "version": base.card.version,
           "weights_sha256": sha256_file(folder / WEIGHTS)}
    return base, ref
