"""Weight averaging ("model soup"): one model whose LMM weights are the (weighted) mean of several models' weights.

Averaging only makes sense for models that share everything but their LMM weights: the same foundation model, input
size, normalisation, segments, LMM shape and -- because the LMM maps standardised latents -- the same latent
statistics. In practice these are checkpoints of one training lineage: a run's selected model, the moving average in
its last checkpoint (``<output>.work/last.pt``), and runs continued from it with ``--init-from`` (which keep the
statistics of the model they start from). Anything else is refused with the reason.

The averaged model's inference options (test-time augmentation, post-processing) and metrics belong to no one of its
ingredients, so they are dropped from its card: choose them again on the validation cases with ``gms postprocess``.
So are the first ingredient's run figures (selected epoch, history, times); its data, split and configuration stay.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import GMSError
from .model import STATS, WEIGHTS, GMSModel
from .modelcard import ModelCard
from .modelpaths import resolve_model_path
from .torchload import load_weights_only
from .weights import sha256_file

# card entries that must agree between ingredients (the statistics and the LMM's tensors are checked separately)
SHARED_KEYS = ("input_size", "normalization", "segments", "lmm", "axis", "dimension", "orientation")
# a run's card entries about its own course and selected weights (gms train writes them), left out of an average's card
RUN_OUTCOME_KEYS = ("selected_epoch", "selected_seconds", "epochs_run", "train_seconds", "total_seconds",
                    "stopped_early", "history")


def load_ingredient(source) -> tuple[GMSModel, dict]:
    """A model folder (or installed model name), or a training checkpoint: ``<work>/last.pt`` (or the ``<work>``
    folder), or a snapshot ``<work>/epoch-NNNN.pt`` kept by ``gms train --keep-every``. A checkpoint holds weights
    only; its card and latent statistics are those of the run's model folder (recorded in the checkpoint, else
    ``<output>`` beside ``<output>.work``), and its moving average of the weights is used when the run kept one (the
    weights that run validated), else the trained weights."""
    p = Path(str(source)).expanduser()
    if p.is_dir() and p.name.endswith(".work") and (p / "last.pt").is_file():
        p = p / "last.pt"
    if p.is_file():
        if p.suffix != ".pt":
            raise GMSError(f"{p}: not a model folder or a training checkpoint (last.pt, epoch-NNNN.pt)")
        state = load_weights_only(p, "training checkpoint")  # a refused, truncated or foreign file: one line
        if not isinstance(state, dict):
            raise GMSError(f"{p} is not a GMS training checkpoint")
        # the run's model folder: recorded in the checkpoint, else the default <output> beside <output>.work
        run_dir = Path(state["output"]) if isinstance(state.get("output"), str) else (
            p.parent.with_name(p.parent.name[:-len(".work")]) if p.parent.name.endswith(".work") else None)
        if run_dir is None or not run_dir.is_dir():
            raise GMSError(f"checkpoint {p}: its run's model folder ({run_dir or 'unknown'}) is missing; it holds the "
                           "card and latent statistics the weights belong to")
        model = GMSModel.load(run_dir)
        weights = state.get("ema", state.get("lmm"))
        if not isinstance(weights, dict):
            raise GMSError(f"{p} is not a GMS training checkpoint (no 'lmm' weights)")
        try:
            model.lmm.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        except RuntimeError as e:
            raise GMSError(f"checkpoint {p} does not match the LMM of {run_dir}: {str(e).splitlines()[0]}") from None
        ref = {"source": str(p), "kind": "checkpoint", "epoch": int(state.get("epoch", 0)),
               "weights": "moving average" if "ema" in state else "trained", "sha256": sha256_file(p)}
        return model, ref
    folder = resolve_model_path(source)
    model = GMSModel.load(folder)
    tr = model.card.training or {}
    ref = {"source": str(source), "kind": "model", "name": model.card.name,
           "version": model.card.version, "selected_epoch": tr.get("selected_epoch"),
           "sha256": sha256_file(folder / WEIGHTS)}
    return model, ref


def _check_compatible(models: list[GMSModel], refs: list[dict]) -> None:
    first, src0 = models[0], refs[0]["source"]
    for m, ref in zip(models[1:], refs[1:]):
        src = ref["source"]
        if m.card.foundation.name != first.card.foundation.name:
            raise GMSError(f"cannot average {src0} and {src}: foundation models differ "
                           f"('{first.card.foundation.name}' vs '{m.card.foundation.name}')")
        theirs, ours = m.card.foundation.files, first.card.foundation.files
        if theirs and ours and theirs != ours:
            raise GMSError(f"cannot average {src0} and {src}: they were trained on different foundation model weights "
                           "(the SHA-256 in their cards differ), so their latents differ")
        ours_d, theirs_d = first.card.to_dict(), m.card.to_dict()  # compared as written
        for key in SHARED_KEYS:
            if theirs_d.get(key) != ours_d.get(key):
                raise GMSError(f"cannot average {src0} and {src}: the cards' '{key}' differ "
                               f"({ours_d.get(key)!r} vs {theirs_d.get(key)!r})")
        for key in STATS:
            if not torch.equal(getattr(m, key), getattr(first, key)):
                raise GMSError(f"cannot average {src0} and {src}: their latent statistics ({key}) differ, so their "
                               "weights map differently standardised latents (average checkpoints of one training "
                               "lineage: a run, its last.pt, runs continued from it with --init-from)")


def average_models(sources: list, output, weights: list[float] | None = None, name: str | None = None) -> Path:
    """Write a model folder whose LMM weights are the weighted mean of the sources' (equal weights by default).
    The output folder must not exist (or be empty); nothing is written unless every source loads and agrees."""
    if len(sources) < 2:
        raise GMSError("averaging needs at least two models or checkpoints")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GMSError(f"output {out} exists; choose a new folder (existing models are never overwritten)")
    if weights is None:
        weights = [1.0] * len(sources)
    if len(weights) != len(sources):
        raise GMSError(f"{len(weights)} weights for {len(sources)} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise GMSError("weights must be >= 0 with a positive sum")
    w = [float(x) / sum(weights) for x in weights]
    loaded = [load_ingredient(s) for s in sources]
    models, refs = [m for m, _ in loaded], [r for _, r in loaded]
    _check_compatible(models, refs)
    states = [m.lmm.state_dict() for m in models]
    avg = {}
    for k, v in states[0].items():
        if not v.is_floating_point():  # integer buffers (none in the LMM today): must agree
            if any(not torch.equal(s[k], v) for s in states[1:]):
                raise GMSError(f"cannot average: buffer '{k}' differs between the models")
            avg[k] = v
        else:
            avg[k] = sum(wi * s[k].double() for wi, s in zip(w, states)).to(v.dtype)
    result = models[0]
    result.lmm.load_state_dict(avg)
    card = ModelCard.from_dict(result.card.to_dict())  # a copy
    for key in ("tta", "postprocess"):
        card.drop(key)
    card.metrics = {}
    if name:
        card.name = name
    # data, split and training configuration stay (the validation cases are found from them); what describes the
    # first ingredient's own run and selected weights does not describe the average: each ingredient keeps its own
    training = {k: v for k, v in (card.training or {}).items() if k not in RUN_OUTCOME_KEYS}
    training["averaged_from"] = [{**r, "weight": round(wi, 6)} for r, wi in zip(refs, w)]
    card.training = training
    result.card = card
    created = not out.exists()
    try:
        result.save(out)
    except BaseException:
        if created and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out
