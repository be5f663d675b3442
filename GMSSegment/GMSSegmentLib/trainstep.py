"""One training step of the LMM on cached latents: the learning-rate schedule, the loss (latent MSE on the supervised
heads plus the decoded-Dice term through the frozen decoder), one epoch of steps with an optional moving average of
the weights, and validation by decoded Dice. ``gms train`` and the cross-validated adaptation (adapt.py) share it."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .model import GMSModel
from .pipeline import classify


def learning_rate(step: int, elapsed: float, lr: float, warm: int, total_steps: int, budget_s: float | None = None,
                  floor: float = 0.0) -> float:
    """Linear warm-up over ``warm`` steps, then cosine from ``lr`` down to ``floor * lr`` over the remaining steps
    or, with a time budget (seconds), over whichever ends first."""
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, total_steps - warm)
    if budget_s:
        frac = max(frac, elapsed / budget_s)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """prob, target: (B, K, H, W) -> mean soft Dice loss over samples and classes."""
    inter = (prob * target).sum(dim=(2, 3))
    den = prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3))
    return (1 - (2 * inter + eps) / (den + eps)).mean()


def soft_probs(decoded: torch.Tensor, codes: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Decoded images (B, 3, S, S) -> foreground probabilities (B, K, S, S): binary = channel mean (the GMS rule),
    several segments = softmax over negative squared distances to the code colours (background black)."""
    if codes.shape[0] == 1:
        return decoded.mean(dim=1, keepdim=True)
    allc = torch.cat([torch.zeros(1, 3), codes]).to(decoded)
    d = ((decoded.unsqueeze(1) - allc.view(1, -1, 3, 1, 1)) ** 2).sum(dim=2)
    return torch.softmax(-d / temperature, dim=1)[:, 1:]


def decoded_dice_loss(model: GMSModel, heads: list[torch.Tensor], labels: torch.Tensor,
                      codes: torch.Tensor) -> torch.Tensor:
    """Decoded-Dice term of some heads' predicted (standardised) mask latents for the same samples, (B, C, h, w)
    each, against label indices (B, H, W): decoded in one batch through the frozen foundation decoder, one soft Dice
    loss per head, summed (the paper sums the loss over its supervised heads)."""
    z = model.denorm_mask(torch.cat([h.float() for h in heads])).contiguous(memory_format=torch.channels_last)
    prob = soft_probs(model.foundation.decode(z).float(), codes)
    target = torch.stack([labels == k for k in range(1, codes.shape[0] + 1)], dim=1).float()
    return sum(dice_loss(p, target) for p in prob.split(len(labels)))


def step_loss(model: GMSModel, outs: list[torch.Tensor], zm: torch.Tensor, labels: torch.Tensor, codes: torch.Tensor,
              dice_samples: int, dice_heads: int = 1) -> torch.Tensor:
    """The training loss of one batch: MSE of every supervised head's latent (heads 2-4; the first is not supervised)
    against the standardised mask latents ``zm``, plus the decoded-Dice term of the last ``dice_heads`` heads on the
    first ``dice_samples`` samples (0: none) against their label indices ``labels`` (B, H, W)."""
    loss = sum(F.mse_loss(o.float(), zm) for o in outs[1:])
    if dice_samples > 0:
        d = min(dice_samples, len(zm))
        loss = loss + decoded_dice_loss(model, [o[:d] for o in outs[-dice_heads:]], labels[:d], codes)
    return loss


def per_image_dice(pred: torch.Tensor, gt: torch.Tensor, n_seg: int) -> np.ndarray:
    """pred, gt: (B, H, W) label indices -> (B,) Dice averaged over segments (both empty counts 1)."""
    out = []
    for b in range(pred.shape[0]):
        ds = []
        for k in range(1, n_seg + 1):
            p, g = pred[b] == k, gt[b] == k
            s = int(p.sum()) + int(g.sum())
            ds.append(1.0 if s == 0 else 2.0 * int((p & g).sum()) / s)
        out.append(np.mean(ds))
    return np.array(out)


@torch.inference_mode()
def validate(model: GMSModel, img_lat: torch.Tensor, labels: torch.Tensor, codes: torch.Tensor, n_seg: int,
             batch: int = 16) -> float:
    model.lmm.eval()
    scores = []
    for i in range(0, len(img_lat), batch):
        z = model.denorm_mask(model.lmm(model.norm_image(img_lat[i:i + batch]), final_only=True))
        dec = model.foundation.decode(z.contiguous(memory_format=torch.channels_last))
        pred = classify(dec, codes, tuple(labels.shape[-2:]))
        scores.append(per_image_dice(pred, labels[i:i + batch], n_seg))
    model.lmm.train()
    return float(np.concatenate(scores).mean())


class EpochRunner:
    """Runs epochs of training steps of ``lmm`` (an AdamW ``opt`` over its parameters) on cached latents.

    Each epoch visits every training case once, in an order drawn from ``seed`` and the epoch, each time in one of
    its ``copies`` augmented copies (entry ``case * copies + copy`` of the cache tensors). ``ema_lmm``: a copy that
    follows the weights as an exponential moving average with ``ema`` decay (bias-corrected start). ``compile``: the
    full batches go through ``torch.compile`` (static shapes, one compilation); if compiling fails before a compiled
    step ever ran, training goes on eagerly and ``compiled`` turns False. ``anchor``: a weight pulling the parameters
    toward where they started (L2-SP: the squared distance, summed over parameters, times ``anchor``)."""

    def __init__(self, model: GMSModel, lmm, opt, codes: torch.Tensor, *, batch_size: int, dice_samples: int,
                 dice_heads: int = 1, latent_noise: float = 0.0, precision: str = "fp32", ema_lmm=None,
                 ema: float = 0.0, compile: bool = False, anchor: float = 0.0, log=print):
        from .pipeline import train_autocast

        self.model, self.lmm, self.opt, self.codes = model, lmm, opt, codes
        self.batch_size, self.dice_samples, self.dice_heads = batch_size, dice_samples, dice_heads
        self.latent_noise, self.precision, self.ema_lmm, self.ema = latent_noise, precision, ema_lmm, ema
        self.autocast = lambda: train_autocast(torch.device("cpu"), precision)
        self.step_net = torch.compile(lmm, dynamic=False) if compile else lmm
        self.compiled, self._compiled_ok, self.log = bool(compile), False, log
        self.anchor = anchor
        self._start = [p.detach().clone() for p in lmm.parameters()] if anchor > 0 else None

    def _forward(self, zi: torch.Tensor):
        if self.step_net is self.lmm or len(zi) != self.batch_size:
            return self.lmm(zi)
        try:
            outs = self.step_net(zi)
        except Exception as e:  # no C++ compiler, unsupported platform: train eagerly instead
            if self._compiled_ok:
                raise
            self.log(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly")
            self.step_net, self.compiled = self.lmm, False
            return self.lmm(zi)
        self._compiled_ok = True
        return outs

    def epoch(self, img: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, copies: int, *, seed: int,
              epoch: int, step: int, lr_at) -> tuple[list[float], int]:
        """One epoch over the cache tensors (``img``/``mask`` float latents, ``labels`` long label indices);
        ``lr_at(step)`` gives each step's learning rate. Returns the batch losses and the step count after it."""
        model, lmm = self.model, self.lmm
        lmm.train()
        n_train = len(img) // copies
        rng = np.random.default_rng(seed * 1000 + epoch)
        order = rng.permutation(n_train)
        copy = rng.integers(0, copies, size=n_train)
        idx_all = torch.from_numpy(order * copies + copy[order])
        losses = []
        for b0 in range(0, n_train, self.batch_size):
            idx = idx_all[b0:b0 + self.batch_size]
            for g in self.opt.param_groups:
                g["lr"] = lr_at(step)
            zi = model.norm_image(img[idx])
            zm = model.norm_mask(mask[idx])
            if self.latent_noise > 0:
                keep = (torch.rand(len(idx), 1, 1, 1) < 0.5).float()
                zi = zi + keep * self.latent_noise * torch.randn_like(zi)
            with self.autocast():
                outs = self._forward(zi.contiguous(memory_format=torch.channels_last))
                loss = step_loss(model, outs, zm, labels[idx[:self.dice_samples]], self.codes, self.dice_samples,
                                 self.dice_heads)
            if self._start is not None:
                loss = loss + self.anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(lmm.parameters(), self._start))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.ema_lmm is not None:  # bias-corrected start: the average follows the weights closely at first
                decay = min(self.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(list(self.ema_lmm.parameters()), list(lmm.parameters()), 1 - decay)
            losses.append(loss.item())
            step += 1
        return losses, step
