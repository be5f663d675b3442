"""Adapting a model to a site with a few labelled cases, judged by cross-validation.

With a handful of cases, a validation part carved from them says almost nothing (two frames can move from 0.67 to 0.85
while the site's other frames get worse), and choosing the inference options on it throws away what the starting
model chose on hundreds of cases. So with ``--init-from`` and at most ``FEW_SHOT_MAX`` cases (or ``--cv-folds``):

1. all k cases are encoded once (with augmented copies) and split into folds of consecutive cases (sorted by name:
   neighbouring video frames or slices of one study stay in one fold, so a case is never scored by a model that
   trained on its near-duplicate);
2. for each fold the starting model is adapted on the other folds and scores the fold's cases; the starting model
   scores every case too, both with the starting model's own inference options (test-time views and input sizes,
   post-processing), at the cases' native resolution, as ``gms evaluate`` does;
3. the paired per-case differences decide (:func:`decide`): adapting is adopted only with at least ``MIN_CASES``
   cases and when their mean, less ``Z`` standard errors, is above zero. Then the model is adapted once more on all k cases with the same recipe
   and saved with the starting model's inference options and presence decision, its card recording the estimate;
   otherwise nothing is written and the user is told plainly that the starting model stays the better one.
"""
from __future__ import annotations

import math
import re
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import GMSError
from .model import STATS

#: adapting from a model with at most this many cases is judged by cross-validation (``--cv-folds`` overrides)
FEW_SHOT_MAX = 60
#: folds of the cross-validation (fewer when there are fewer cases)
FOLDS = 5
#: standard errors the mean paired gain must clear (one-sided, about 95 %)
Z = 1.645
#: fewer cases than this are never adopted, whatever their estimate: 5 frames of one CVC-ClinicDB video showed a
#: cross-validated gain of +27.5 +- 8.3 Dice while the site's other videos lost 19.9 points (Models README)
MIN_CASES = 10


def natural_key(name: str):
    """'7' < '13' < '115'; 'case2' < 'case10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def contiguous_folds(names: list[str], folds: int) -> list[list[str]]:
    """``names`` in natural order, cut into ``folds`` runs of consecutive names of near-equal size."""
    ordered = sorted(names, key=natural_key)
    folds = max(1, min(folds, len(ordered)))
    return [list(part) for part in np.array_split(np.array(ordered, dtype=object), folds)]


def cv_folds(requested: int | None, n_cases: int, adapting: bool, explicit_validation: bool) -> int:
    """How many folds judge this training: ``requested`` (--cv-folds; 0 = none) or, by default, ``FOLDS`` when a
    model is adapted (--init-from) with at most ``FEW_SHOT_MAX`` cases and no validation of its own asked for
    (``explicit_validation``: --val-list or --max-val)."""
    if requested is not None:
        if requested == 1 or requested < 0:
            raise GMSError(f"--cv-folds must be 0 (off) or at least 2, got {requested}")
        if requested > n_cases:
            raise GMSError(f"--cv-folds {requested} is more than the {n_cases} cases to adapt on")
        return requested
    if adapting and not explicit_validation and 2 <= n_cases <= FEW_SHOT_MAX:
        return min(FOLDS, n_cases)
    return 0


@dataclass
class Estimate:
    """Per-case Dice of the starting model (``before``) and of the fold models that did not train on the case
    (``after``), and the decision on them."""
    before: dict[str, float]
    after: dict[str, float]
    z: float = Z
    min_cases: int = MIN_CASES
    folds: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def gains(self) -> np.ndarray:
        return np.array([self.after[c] - self.before[c] for c in sorted(self.before)])

    @property
    def gain(self) -> float:
        return float(self.gains.mean())

    @property
    def se(self) -> float:
        g = self.gains
        return float(g.std(ddof=1) / math.sqrt(g.size)) if g.size > 1 else float("inf")

    @property
    def enough_cases(self) -> bool:
        return len(self.before) >= self.min_cases

    @property
    def adopted(self) -> bool:
        return self.enough_cases and self.gain - self.z * self.se > 0

    def summary(self) -> dict:
        """What the user is shown and the card records (Dice in [0, 1])."""
        g = self.gains
        return {"cases": len(self.before), "folds": self.folds,
                "before": round(float(np.mean(list(self.before.values()))), 4),
                "after": round(float(np.mean(list(self.after.values()))), 4),
                "gain": round(self.gain, 4), "se": round(self.se, 4) if math.isfinite(self.se) else None,
                "better": int((g > 0).sum()), "worse": int((g < 0).sum()), "adopted": self.adopted,
                "rule": f"adopted when there are at least {self.min_cases} cases and the mean paired gain less "
                        f"{self.z:g} standard errors is above 0",
                "seconds": round(self.seconds, 1), **self.extra}

    def sentence(self) -> str:
        s = self.summary()
        se = f" ± {100 * s['se']:.1f}" if s["se"] is not None else ""
        head = (f"cross-validated on {s['cases']} cases ({s['folds']} folds): Dice {100 * s['before']:.1f} -> "
                f"{100 * s['after']:.1f} (gain {100 * s['gain']:+.1f}{se}, {s['better']} better, {s['worse']} worse)")
        if self.adopted:
            return head + ": adapting helps; the adapted model is saved"
        if not self.enough_cases and self.gain - self.z * self.se > 0:
            return (head + f": too few cases to tell whether adapting helps on the site's other cases (at least "
                    f"{self.min_cases} are needed: a few similar cases can look better in cross-validation while the "
                    "site's other cases get worse), so no model is written; keep using the starting model")
        return (head + ": adapting does not reliably help on these cases, so no model is written; keep using the "
                "starting model (more or more varied cases may change this)")


def decide(before: dict[str, float], after: dict[str, float], z: float = Z, **kw) -> Estimate:
    if set(before) != set(after):
        raise ValueError("before and after must score the same cases")
    return Estimate(dict(before), dict(after), z=z, **kw)


# ------------------------------------------------------------------------------------------------------------ run

@dataclass
class Recipe:
    """How each fold and the final model are adapted (from the training configuration and k)."""
    epochs: int
    lr: float
    warmup_epochs: int
    anchor: float


def recipe_for(cfg, k: int) -> Recipe:
    """The adaptation recipe for ``k`` cases: the configuration's epochs (the caller cuts them by time), learning rate
    and warm-up (at most a tenth of the epochs); no pull toward the starting weights (experiments/ tries one)."""
    return Recipe(epochs=cfg.epochs, lr=cfg.lr, warmup_epochs=min(cfg.warmup_epochs, max(1, cfg.epochs // 10)),
                  anchor=0.0)


def latent_stats(model) -> dict:
    """A model's latent statistics, as GMSModel takes them."""
    return {k: getattr(model, k).flatten() for k in STATS}


def fit_fold(base, cache, entries: torch.Tensor, copies: int, codes: torch.Tensor, cfg, recipe: Recipe,
             precision: str, budget_s: float | None, log=print):
    """A copy of ``base``'s LMM adapted on the cache entries ``entries`` (case-major, ``copies`` per case); returns
    the weights to use (the moving average with ``cfg.ema``)."""
    from .model import GMSModel
    from .trainstep import EpochRunner, learning_rate

    lmm = deepcopy(base.lmm).train().requires_grad_(True).to(memory_format=torch.channels_last)
    ema_lmm = deepcopy(lmm).requires_grad_(False) if cfg.ema > 0 else None
    model = GMSModel(base.card, ema_lmm if ema_lmm is not None else lmm, latent_stats(base))
    model.attach_foundation(base.foundation)
    opt = torch.optim.AdamW(lmm.parameters(), lr=recipe.lr, weight_decay=cfg.weight_decay)
    runner = EpochRunner(model, lmm, opt, codes, batch_size=cfg.batch_size, dice_samples=cfg.dice_samples,
                         dice_heads=cfg.dice_heads, latent_noise=cfg.latent_noise, precision=precision,
                         ema_lmm=ema_lmm, ema=cfg.ema, compile=False, anchor=recipe.anchor, log=log)
    img, mask, lab = cache.img[entries].float(), cache.mask[entries].float(), cache.labels[entries].long()
    n = len(entries) // copies
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total, warm = steps_per_epoch * recipe.epochs, steps_per_epoch * recipe.warmup_epochs
    t0, step = time.time(), 0
    for epoch in range(recipe.epochs):
        _, step = runner.epoch(img, mask, lab, copies, seed=cfg.seed, epoch=epoch, step=step,
                               lr_at=lambda s: learning_rate(s, time.time() - t0, recipe.lr, warm, total, budget_s,
                                                             cfg.min_lr))
        if budget_s is not None and time.time() - t0 > budget_s:
            break
    return (ema_lmm if ema_lmm is not None else lmm).eval()


def score_cases(model, lmm, root: Path, layout: str, names: list[str]) -> dict[str, float]:
    """Mean Dice over segments of each case, segmented with the model's own inference options at native resolution
    (as gms evaluate), with ``lmm`` in place of the model's LMM."""
    from .evaluate import _predict_case
    from .metrics import label_metrics
    from .options import InferenceOptions
    from .pipeline import segmenter_for

    saved = model.lmm
    model.lmm = lmm
    try:
        seg = segmenter_for(model, InferenceOptions(), "cpu")
        out = {}
        for name in names:
            (pred,), gt, spacing = _predict_case(model, seg, root, layout, name, "native", 8)
            met = label_metrics(pred, gt, model.card.label_values, spacing)
            out[name] = float(np.mean([v["dice"] for v in met.values()]))
        return out
    finally:
        model.lmm = saved


def run(cfg, base, base_ref: dict, root: Path, layout: str, names: list[str], cache, codes: np.ndarray,
        precision: str, n_folds: int, t_begin: float, card_training: dict, log=print,
        report=None) -> tuple[Path | None, dict]:
    """Cross-validate adapting ``base`` on ``names`` (their latents in ``cache``, ``cfg.augment_copies`` per case),
    decide, and when adopted adapt on all of them and save the model to ``cfg.output``. Returns its folder (None
    when adapting was refused: nothing written) and the estimate's summary. ``t_begin``: when the whole command began (``--max-minutes``
    counts from there). ``card_training``: the ``training`` entry of the new card (this adds what it measured)."""
    from .model import GMSModel

    report = report or (lambda kind, **fields: None)
    copies = cfg.augment_copies
    codes_t = torch.from_numpy(codes)
    position = {n: i for i, n in enumerate(cache.names)}
    folds = contiguous_folds(names, n_folds)
    recipe = recipe_for(cfg, len(names))
    t_cv = time.time()
    report("stage", stage="cross-validation")
    log(f"cross-validation: {len(names)} cases in {len(folds)} folds of consecutive cases "
        f"({', '.join(f[0] + '..' + f[-1] if len(f) > 1 else f[0] for f in folds)}); the starting model first")
    t0 = time.time()
    before = score_cases(base, base.lmm, root, layout, names)
    score_s = time.time() - t0
    log(f"starting model: Dice {100 * np.mean(list(before.values())):.1f} on the {len(names)} cases "
        f"({score_s:.0f} s)")

    def budget_per_fit(fits_left: int) -> float | None:
        if not cfg.max_minutes:
            return None
        left = cfg.max_minutes * 60 - (time.time() - t_begin) - score_s * (fits_left - 1) / max(1, len(folds))
        return max(5.0, left / fits_left)

    def entries(cases):
        return torch.tensor([position[c] * copies + j for c in cases for j in range(copies)])

    after = {}
    for i, fold in enumerate(folds):
        rest = [c for c in names if c not in set(fold)]
        lmm = fit_fold(base, cache, entries(rest), copies, codes_t, cfg, recipe, precision,
                       budget_per_fit(len(folds) - i + 1), log)
        after.update(score_cases(base, lmm, root, layout, fold))
        done = np.mean([after[c] - before[c] for c in after])
        log(f"fold {i + 1}/{len(folds)}: trained on {len(rest)} cases, scored {len(fold)}; mean gain so far "
            f"{100 * done:+.1f}")
        report("progress", stage="cross-validation", done=i + 1, total=len(folds))
    est = decide(before, after, folds=len(folds), seconds=time.time() - t_cv)
    summary = est.summary()
    log(est.sentence())
    report("estimate", **summary)
    if not est.adopted:
        return None, summary
    report("stage", stage="training")
    lmm = fit_fold(base, cache, entries(names), copies, codes_t, cfg, recipe, precision, budget_per_fit(1), log)
    card = base.card.to_dict()
    card.update(name=cfg.name or Path(cfg.output).name,
                description=cfg.description or f"{card.get('description') or card['name']}, adapted on "
                                               f"{len(names)} cases of {root.name}",
                training={**card_training, "adaptation": summary,
                          "train_seconds": round(time.time() - t_begin, 1)},
                metrics={"adaptation": {"dice_before": summary["before"], "dice_after": summary["after"],
                                        "cases": len(names), "note": "cross-validated: each case scored by a model "
                                        "adapted without it, with the starting model's inference options"}})
    for k in ("licence", "citation"):
        if getattr(cfg, k, None):
            card[k] = getattr(cfg, k)
    out = Path(cfg.output)
    GMSModel(card, lmm, latent_stats(base)).save(out, overwrite=True)
    log(f"adapted model saved to {out} (the starting model's inference options and presence decision kept)")
    return out, summary
