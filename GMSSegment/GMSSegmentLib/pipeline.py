"""The one slice loop: used by ``gms segment``, the Slicer worker, batch jobs, evaluation and the benchmark.

array (slices along the model's axis) -> per-volume intensity normalisation -> resize to the model's input size,
1 -> 3 channels -> encode -> standardise -> LMM -> un-standardise -> decode -> probability (binary: channel mean;
multi-class: distance to each segment's code colour) -> resize back (interpolate, then decide) -> labels.

Results-preserving shortcut (``fast=True``): the decoder's latent-resolution stage (the only part with GroupNorm) runs on
the whole latent; its output is compared with the feature of an empty mask, and the expensive full-resolution stages
run only on the bounding box of cells that differ from it, grown by a halo. A slice whose cells all match the empty mask
skips them altogether. The benchmark measures the agreement with the plain loop (``fast=False``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from . import GMSError
from .normalization import apply_range, intensity_range
from .options import InferenceOptions
from .orientation import to_model_orientation
from .presence import PresenceRule, slice_scores
from .uncertainty import SoftMasks
from .postprocess import (TTA_FLIPS, apply_postprocess, apply_view, undo_view, postprocess_settings, tta_scales, tta_views, z_smooth_weight,
                          z_smoothed)


class Cancelled(Exception):
    pass


@dataclass
class FastDecodeSettings:
    enabled: bool = True
    #: a latent cell is "active" when its decoder feature is farther than ``tau`` (relative to the mean feature norm)
    #: from the feature an empty mask has at the same position. Measured on BUSI masks: foreground cells >= 0.46,
    #: background cells more than 4 cells from foreground <= 0.18.
    tau: float = 0.3
    #: halo around active cells, in latent cells
    halo: int = 3
    #: z shortcut: coarse slices at most this far apart (mm); 0 disables it
    z_gap_mm: float = 2.0


@dataclass
class SegmentStats:
    slices: int = 0
    decoded_slices: int = 0
    decoded_fraction: float = 0.0  # decoded area / full area over all slices
    seconds: float = 0.0
    #: wall seconds per stage of the loop ("encoder", "lmm", "decoder"); measured on the CPU only (CUDA runs
    #: asynchronously, so a stage's wall time there is not its cost)
    stage_seconds: dict = field(default_factory=dict)
    #: with ``count_flops`` (gms benchmark): floating-point operations per stage (convolutions, matrix products and
    #: attention, as ``torch.utils.flop_counter`` counts them: 2 per multiply-add)
    stage_flops: dict = field(default_factory=dict)
    count_flops: bool = False
    extra: dict = field(default_factory=dict)


def pick_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise GMSError("a GPU was requested but CUDA is not available to PyTorch")
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    raise GMSError(f"unknown device '{name}' (use auto, cpu or cuda)")


def _precision_name(precision: str | None) -> str:
    """'auto', 'bf16' or 'fp32' (case-insensitive; None = auto); anything else is a clear error."""
    precision = (precision or "auto").lower()
    if precision not in ("auto", "bf16", "fp32"):
        raise GMSError(f"unknown precision '{precision}' (use auto, bf16 or fp32)")
    return precision


def autocast_for(device: torch.device, precision: str = "auto"):
    """Inference autocast. auto: bf16 (else fp16) on CUDA; fp32 on the CPU. ``bf16`` on the CPU: bf16 autocast, fast
    only on CPUs with AMX / AVX512-BF16 (``gms benchmark --precision bf16`` measures speed and agreement); ``fp32``:
    none anywhere."""
    precision = _precision_name(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if precision == "bf16" or torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16), read from /proc/cpuinfo (Linux only)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def bf16_accepted(card) -> bool:
    """Whether the model card accepts bf16 inference: its ``precision.cpu_bf16`` is true, which ``python
    benchmarks/precision_accuracy.py --record`` writes when bf16's paired mean DSC difference to fp32 on the model's
    held-out list is at least ``BF16_BAR`` (a card without the measurement: no)."""
    measured = getattr(card, "precision", None) if not isinstance(card, dict) else card.get("precision")
    return bool((measured or {}).get("cpu_bf16") is True)


#: the paired mean DSC difference (bf16 minus fp32, in DSC points) a model must reach for bf16 to be its default on CPUs
BF16_BAR = -0.3


def inference_precision(device: torch.device, precision: str = "auto", card=None) -> str:
    """The precision the slice loop runs in. ``bf16`` and ``fp32`` are kept; ``auto`` is: on CUDA ``auto`` (bf16, else
    fp16 autocast); on the CPU ``bf16`` where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16; an AVX2-only CPU
    emulates it slowly) and the model card accepts bf16 (:func:`bf16_accepted`: it was measured as accurate as fp32 on
    the model's held-out cases), else ``fp32``. ``GMS_PRECISION`` (auto, bf16, fp32) replaces ``auto``."""
    precision = _precision_name(precision)
    if precision == "auto":
        precision = _precision_name(os.environ.get("GMS_PRECISION") or "auto")
    if precision != "auto" or device.type == "cuda":
        return precision
    return "bf16" if cpu_has_fast_bf16() and bf16_accepted(card) else "fp32"


def training_precision(device: torch.device, precision: str = "auto") -> str:
    """'bf16' or 'fp32' for training. auto: bf16 on CUDA with bf16 support and on CPUs with bf16 hardware (AMX or
    AVX512-BF16: a default training step 1.7x faster here), fp32 elsewhere (AVX2 CPUs emulate bf16 slowly)."""
    precision = _precision_name(precision)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def train_autocast(device: torch.device, precision: str):
    """Autocast context for a resolved training precision ('bf16' or 'fp32')."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_model_input(slices: np.ndarray, size: int, device) -> torch.Tensor:
    """(B, H, W) or (B, H, W, 3) floats in [0, 1] -> (B, 3, size, size) tensor (antialiased bilinear resize)."""
    t = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(device)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.clamp(0.0, 1.0).contiguous(memory_format=torch.channels_last)


def classify(decoded: torch.Tensor, codes: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Decoded images (B, 3, S, S) in [0, 1] -> labels (B, H, W) uint8 at the output size.
    Binary (one white code): channel mean, resized, > 0.5 (the GMS rule). Several codes: nearest code colour (black is
    background), on the image resized to the output size."""
    if codes.shape[0] == 1:
        prob = decoded.mean(dim=1, keepdim=True)
        if prob.shape[-2:] != out_hw:
            prob = F.interpolate(prob, size=out_hw, mode="bilinear", align_corners=False)
        return (prob[:, 0] > 0.5).to(torch.uint8)
    if decoded.shape[-2:] != out_hw:
        decoded = F.interpolate(decoded, size=out_hw, mode="bilinear", align_corners=False)
    allc = torch.cat([torch.zeros(1, 3, dtype=codes.dtype), codes]).to(decoded)
    d = ((decoded.unsqueeze(1) - allc.view(1, -1, 3, 1, 1)) ** 2).sum(dim=2)
    return d.argmin(dim=1).to(torch.uint8)


class ViewCache(dict):
    """Decoded flip views shared by segmenters that see the same slices: {(slice digest, input size, flipped dims):
    (3, S, S) image}. Holds at most ``max_bytes`` (1 GiB by default: one 300-slice volume at 224 + 256 px with 4 flip
    views would need 1.7 GB); what does not fit is simply not kept, and the options that need it decode it again."""

    def __init__(self, max_bytes: int = 1 << 30):
        super().__init__()
        self.max_bytes = int(max_bytes)
        self.nbytes = 0

    def put_batch(self, keys: list, images: torch.Tensor) -> None:
        """Keep a batch of views (all of it or, when over the budget, none of it)."""
        size = images.numel() * images.element_size()
        if self.nbytes + size > self.max_bytes:
            return
        self.nbytes += size
        if images.untyped_storage().nbytes() > size:  # a slice of a larger batch: keep only what is counted
            images = images.clone()
        for key, image in zip(keys, images):
            self[key] = image

    def clear(self) -> None:
        super().clear()
        self.nbytes = 0


class SliceSegmenter:
    """Holds a loaded GMS model on a device and segments batches of normalised slices."""

    def __init__(self, model, device: torch.device | str = "cpu", fast: FastDecodeSettings | bool = True,
                 channels_last: bool = True, tta: int | None = None, precision: str = "auto",
                 scales: list[int] | None = None):
        """``tta``: None = the model card's test-time augmentation (flip views and input sizes, see postprocess.py);
        1, 2, 4 or 8 = that many views at the model's input size only (1: no test-time augmentation; 2 and 4: flips;
        8: the flips and the 90-degree rotations).
        ``scales``: input sizes to average over (overrides the above). ``precision``: see autocast_for."""
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.channels_last = channels_last
        self.model = self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.fast = fast if isinstance(fast, FastDecodeSettings) else FastDecodeSettings(enabled=bool(fast))
        self.codes = model.codes
        # an unknown precision fails here, before any work; auto is resolved for this CPU and model here
        self.precision = inference_precision(self.device, precision, model.card)
        self.tta = tta_views(model.card) if tta is None else int(tta)
        if self.tta not in TTA_FLIPS:
            raise GMSError(f"test-time augmentation takes 1, 2, 4 or 8 views, not {tta}")
        if scales is None:
            scales = tta_scales(model.card) if tta is None else [model.input_size]
        mult = model.foundation.downscale
        self.scales = [int(s) for s in scales]
        if not self.scales or any(s <= 0 or s % mult for s in self.scales):
            raise GMSError(f"test-time input sizes must be positive multiples of {mult}, got {list(scales)}")
        self._bg_feature = {}
        self.stats = SegmentStats()
        #: a ViewCache shared by segmenters that see the same slices (``select_postprocess`` runs every test-time
        #: option on each validation case); None: nothing is kept. The owner clears it between cases.
        self.view_cache: ViewCache | None = None

    # -- the empty-mask feature used by the fast decoder --------------------------------------------------------------
    def _background(self, s: int) -> tuple[torch.Tensor, float]:
        """Decoder features of an empty mask at input size ``s`` (C, h, w), position by position, and their mean
        norm."""
        if s not in self._bg_feature:
            fnd = self.model.foundation
            z0 = fnd.encode(torch.zeros(1, 3, s, s, device=self.device))
            f0 = fnd.decode_global(z0)[0].float()
            self._bg_feature[s] = (f0, float(f0.norm(dim=0).mean()) + 1e-6)
        return self._bg_feature[s]

    @torch.inference_mode()
    def predict_latents(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        with self._autocast("encoder"), self._timed("encoder"):
            z = m.foundation.encode(x)
        with self._autocast("lmm"), self._timed("lmm"):
            out = m.lmm(m.norm_image(z.float()), final_only=True)
        return m.denorm_mask(out.float())

    @contextlib.contextmanager
    def _timed(self, stage: str):
        """Adds the wall seconds of the block to ``stats.stage_seconds[stage]`` (CPU only)."""
        if self.device.type != "cpu":
            yield
            return
        counter = contextlib.nullcontext()
        if self.stats.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
        t0 = time.perf_counter()
        try:
            with counter:
                yield
        finally:
            st = self.stats.stage_seconds
            st[stage] = st.get(stage, 0.0) + time.perf_counter() - t0
            if self.stats.count_flops:
                self.stats.stage_flops[stage] = self.stats.stage_flops.get(stage, 0) + counter.get_total_flops()

    def _autocast(self, stage: str):
        """The autocast context of one stage of the loop ("encoder", "lmm" or "decoder"): the same for all three
        here; benchmarks/bf16_stage_agreement.py overrides it to run single stages in bf16."""
        return autocast_for(self.device, self.precision)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Predicted mask latents -> decoded images (B, 3, S, S) in [0, 1]."""
        fnd = self.model.foundation
        with self._autocast("decoder"), self._timed("decoder"):
            if not (self.fast.enabled and fnd.supports_split_decode):
                self.stats.decoded_slices += z.shape[0]
                self.stats.decoded_fraction += z.shape[0]
                return fnd.decode(z).float()
            feats = fnd.decode_global(z)
            k = fnd.downscale
            s = feats.shape[-1] * k  # the input size these latents came from
            f0, scale = self._background(s)
            dist = (feats.float() - f0).norm(dim=1) / scale  # B, h, w
            active = dist > self.fast.tau
            out = torch.zeros(z.shape[0], 3, s, s, device=z.device)
            h, w = feats.shape[-2:]
            for b in range(z.shape[0]):
                ys, xs = torch.nonzero(active[b], as_tuple=True)
                if ys.numel() == 0:
                    continue
                y0 = max(int(ys.min()) - self.fast.halo, 0)
                y1 = min(int(ys.max()) + 1 + self.fast.halo, h)
                x0 = max(int(xs.min()) - self.fast.halo, 0)
                x1 = min(int(xs.max()) + 1 + self.fast.halo, w)
                crop = fnd.decode_local(feats[b:b + 1, :, y0:y1, x0:x1]).float()
                out[b, :, y0 * k:y1 * k, x0 * k:x1 * k] = crop[0]
                self.stats.decoded_slices += 1
                self.stats.decoded_fraction += (y1 - y0) * (x1 - x0) / (h * w)
            return out

    def decode_slices(self, slices: np.ndarray) -> torch.Tensor:
        """(B, H, W[, 3]) floats in [0, 1] -> decoded images (B, 3, S, S) at the model's input size, averaged over the
        test-time views and input sizes (``classify`` turns them into labels). With a ``view_cache``, views of these
        slices that another segmenter already decoded are taken from it and only the missing ones are run."""
        size = self.model.input_size
        flips = TTA_FLIPS[self.tta]
        n = slices.shape[0]
        cache = self.view_cache
        digests = None
        if cache is not None:
            digests = [hashlib.blake2b(np.ascontiguousarray(slices[b], dtype=np.float32).tobytes(),
                                       digest_size=16).digest() for b in range(n)]
        total = None
        for s in self.scales:  # each input size: its missing flip views in one batch, flipped back and averaged
            views = {}
            if cache is not None:
                for d in flips:
                    got = [cache.get((g, s, d)) for g in digests]
                    if all(v is not None for v in got):
                        views[d] = torch.stack(got)
            missing = [d for d in flips if d not in views]
            if missing:
                x = to_model_input(slices, s, self.device)
                if not self.channels_last:
                    x = x.contiguous()
                parts = [apply_view(x, d) for d in missing]
                x = parts[0] if len(parts) == 1 else torch.cat(parts)
                dec = self.decode(self.predict_latents(x))
                for i, d in enumerate(missing):
                    part = dec[i * n:(i + 1) * n]
                    views[d] = undo_view(part, d)
                    if cache is not None:
                        cache.put_batch([(g, s, d) for g in digests], views[d])
            dec = views[flips[0]] if len(flips) == 1 else sum(views[d] for d in flips) / len(flips)
            if s != size:
                dec = F.interpolate(dec, size=(size, size), mode="bilinear", align_corners=False)
            total = dec if total is None else total + dec
        self.stats.slices += n
        return total / len(self.scales)


def slice_order(n: int, stride: int) -> list[int]:
    """Coarse slices for the z shortcut: every ``stride``-th slice and the last one."""
    coarse = list(range(0, n, stride))
    if coarse[-1] != n - 1:
        coarse.append(n - 1)
    return coarse


def segmenter_for(model, options: InferenceOptions, device="cpu") -> SliceSegmenter:
    """A SliceSegmenter for ``options``' test-time views and input sizes, precision and fast decoding."""
    scales = list(options.scales) if options.scales is not None else None
    return SliceSegmenter(model, device, options.fast, tta=options.tta, precision=options.precision, scales=scales)


def segment_array(model, array: np.ndarray, options: InferenceOptions | None = None, *,
                  segmenter: SliceSegmenter | None = None, device="cpu", spacing_zyx=None, direction=None,
                  progress=None, cancel=None, log=None, soft: dict | None = None, **changes) -> np.ndarray:
    """Segment a (Z, Y, X) scalar or (Z, Y, X, 3) RGB array of raw intensities, slice-wise along ``options.axis``
    (numpy order; default: the model card's axis). Returns (Z, Y, X) uint8 label values from the card.

    ``options``: an :class:`~.options.InferenceOptions` (None: the card's choices); keyword arguments named as its
    fields change single options (``segment_array(model, array, postprocess={})``). ``segmenter``: a SliceSegmenter
    to run (its test-time views, precision and fast settings then replace the options'); without one, one is made
    for ``options`` on ``device``.

    With the fast settings' ``z_gap_mm`` and a known ``spacing_zyx``, slices are first segmented at a stride of at
    most ``z_gap_mm``; the slices between two coarse slices that are both empty are left empty without running the
    model (a structure must be thinner than ``z_gap_mm`` along the slicing axis to be missed).

    ``progress(done, total)`` is called after each batch; ``cancel()`` returning True stops with ``Cancelled``.
    ``options.postprocess``: None applies the card's post-processing (see postprocess.py: largest component, and for
    3D models smoothing along the slicing axis), ``{}`` none, or explicit settings.
    ``direction``: the volume's row-major 3x3 ITK direction matrix. When the card records the training volumes'
    orientation (see orientation.py), the array is first permuted and flipped into it (``axis`` then counts in that
    orientation) and the labels are mapped back onto the input's grid; ``log(message)``, if given, is told so.
    ``soft``: see segment_array_variants (what the result's uncertainty is computed from).
    """
    options = replace(options or InferenceOptions(), **changes)
    return segment_array_variants(model, array, [options.postprocess], options, segmenter=segmenter, device=device,
                                  spacing_zyx=spacing_zyx, direction=direction, progress=progress, cancel=cancel,
                                  log=log, soft=soft)[0]


def segment_array_variants(model, array: np.ndarray, variants: list, options: InferenceOptions | None = None, *,
                           segmenter: SliceSegmenter | None = None, device="cpu", spacing_zyx=None, direction=None,
                           progress=None, cancel=None, log=None, record: dict | None = None,
                           soft: dict | None = None, **changes) -> list[np.ndarray]:
    """``segment_array`` for several post-processing settings at the cost of one: the network runs once and each
    entry of ``variants`` (as ``options.postprocess`` there, which is not used here) gives one label map. Used to
    choose the settings on validation cases. ``record``, a dict, receives the presence scores of every slice
    (``area``, ``confidence``: (slices, segments), NaN where a slice was not decoded), the slicing ``axis`` and the
    reorientation ``reo`` (None or orientation's mapping), to calibrate the presence decision (presence.py).
    ``soft``, a dict, receives what the uncertainty of the first variant's result is computed from (uncertainty.py):
    ``masks`` (the soft memberships), ``labels`` (its final segment indices, slicing axis first), ``axis``, ``reo``."""
    options = replace(options or InferenceOptions(), **changes)
    axis, batch_size = options.axis, options.batch_size
    if array.ndim not in (3, 4):
        raise GMSError(f"expected a (Z, Y, X[, C]) array, got shape {array.shape}")
    if array.ndim == 4 and array.shape[-1] != 3:
        raise GMSError(f"only scalar or RGB images are supported, got {array.shape[-1]} components")
    if axis is None:
        axis = model.card.slicing_axis
    if array.shape[0] == 1:
        axis = 0  # a 2D image is one slice whatever the card says
    if axis not in (0, 1, 2):
        raise GMSError(f"slicing axis must be 0, 1 or 2, got {axis}")
    settings = [postprocess_settings(model.card) if v is None else v for v in variants]
    weights = [z_smooth_weight(v, model.card) for v in settings]  # a bad weight fails here, before any work
    seg = segmenter or segmenter_for(model, options, device)
    rule = presence_rule(model, options.presence)
    reo = to_model_orientation(model.card, direction, array.shape)
    if reo is not None:
        if log is not None:
            log(f"stored in {reo.source} orientation, segmented in the model's {reo.target} (axes permuted/flipped, "
                "no resampling); the output keeps the input's grid")
        array = reo.apply(array)
        spacing_zyx = reo.spacing(spacing_zyx) if spacing_zyx is not None else None
    lo, hi = intensity_range(array, model.card.normalization_or_default)
    view = np.moveaxis(array, axis, 0)
    n = view.shape[0]
    out_hw = tuple(view.shape[1:3])
    lut = np.array([0] + model.card.label_values, dtype=np.uint8)
    n_seg = int(seg.codes.shape[0])
    scoring = rule is not None or record is not None
    area = np.full((n, n_seg), np.nan) if scoring else None
    confidence = np.full((n, n_seg), np.nan) if scoring else None
    absent = np.zeros((n, n_seg), bool)  # segments the presence decision cleared, slice by slice
    # smoothing along the slices needs every slice's decoded image; otherwise each batch is classified at once
    keep = any(w > 0 for w in weights) and n > 1
    decoded = None
    masks = SoftMasks(n, out_hw, n_seg) if soft is not None else None
    soft_later = keep and weights[0] > 0  # the first variant's memberships come from the smoothed images
    out = np.zeros(view.shape[:3], np.uint8)  # labels of the plain decoding (the z shortcut reads them)
    t0 = time.perf_counter()
    done = 0
    if progress:
        progress(0, n)

    def run(indices: list[int]):
        nonlocal done, decoded
        for b in range(0, len(indices), batch_size):
            if cancel is not None and cancel():
                raise Cancelled()
            idx = indices[b:b + batch_size]
            dec = seg.decode_slices(apply_range(view[idx], lo, hi))  # view[idx] copies only this batch
            if keep:
                if decoded is None:  # slices never decoded stay black: empty, as the z shortcut decided
                    decoded = torch.zeros((n,) + tuple(dec.shape[1:]), dtype=dec.dtype)
                decoded[idx] = dec.cpu()
            with torch.inference_mode():
                found = classify(dec, seg.codes, out_hw).cpu().numpy()
                if scoring:
                    area[idx], confidence[idx] = slice_scores(dec, seg.codes)
                if rule is not None:
                    absent[idx] = rule.absent(area[idx], confidence[idx])
                    clear_absent(found, absent[idx])
                out[idx] = lut[found]
                if masks is not None and not soft_later:
                    masks.add(idx, dec, seg.codes)
            done += len(idx)
            if progress:
                progress(done, n)

    stride = 1
    if seg.fast.enabled and seg.fast.z_gap_mm > 0 and spacing_zyx is not None and n > 2:
        stride = max(1, int(seg.fast.z_gap_mm // float(spacing_zyx[axis])))
    if stride <= 1:
        run(list(range(n)))
    else:
        coarse = slice_order(n, stride)
        run(coarse)
        has_fg = out[coarse].reshape(len(coarse), -1).any(axis=1)
        rest = [k for (a, b), fa, fb in zip(zip(coarse, coarse[1:]), has_fg, has_fg[1:]) if fa or fb
                for k in range(a + 1, b)]
        run(rest)
        skipped = n - len(coarse) - len(rest)
        seg.stats.extra["z_skipped"] = seg.stats.extra.get("z_skipped", 0) + skipped
        done += skipped
        if progress:
            progress(done, n)
    results = []
    for i, (v, w) in enumerate(zip(settings, weights)):
        labels = out
        if w > 0 and decoded is not None:
            labels = np.empty_like(out)
            with torch.inference_mode():
                for b in range(0, n, batch_size):
                    dec = z_smoothed(decoded, w, b, min(b + batch_size, n))
                    found = classify(dec, seg.codes, out_hw).numpy()
                    clear_absent(found, absent[b:b + batch_size])
                    labels[b:b + batch_size] = lut[found]
                    if masks is not None and i == 0:
                        masks.add(list(range(b, min(b + batch_size, n))), dec, seg.codes)
        labels = apply_postprocess(labels, model.card, v)
        if masks is not None and i == 0:
            index = np.zeros(256, np.uint8)
            index[lut] = np.arange(lut.size, dtype=np.uint8)  # label value -> segment index
            soft.update(masks=masks, labels=index[labels], axis=axis, reo=reo, input_size=model.input_size)
        labels = np.moveaxis(labels, 0, axis)
        results.append(reo.undo(labels) if reo is not None else labels)
    seg.stats.seconds += time.perf_counter() - t0
    seg.stats.extra["presence_cleared"] = seg.stats.extra.get("presence_cleared", 0) + int(absent.sum())
    if record is not None:
        record.update(area=area, confidence=confidence, axis=axis, reo=reo)
    return results


def presence_rule(model, choice) -> PresenceRule | None:
    """The presence decision to apply: ``choice`` True = the card's (None when it has none), False = none, or a
    PresenceRule."""
    if choice is False or choice is None:
        return None
    if isinstance(choice, PresenceRule):
        return choice if choice.active else None
    rule = PresenceRule.from_card(model.card.presence)
    return rule if rule is not None and rule.active else None


def clear_absent(found: np.ndarray, absent: np.ndarray) -> None:
    """Segment indices (B, H, W) in place: segment k+1 cleared on the slices where ``absent[:, k]``."""
    for b, k in zip(*np.nonzero(absent)):
        found[b][found[b] == k + 1] = 0
