"""Options that travel together, as objects: how a model is run on an image (:class:`InferenceOptions`, for
``pipeline.segment_array``, ``evaluate`` and ``gms segment`` / ``gms evaluate``) and how one is trained
(:class:`TrainConfig`, for ``train.train`` and ``gms train``). Plain data: no imports of the engine or of PyTorch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import FastDecodeSettings
    from .presence import PresenceRule


@dataclass(frozen=True)
class InferenceOptions:
    """The choices of one inference run. None means the model card's choice."""

    #: slicing axis in numpy (z, y, x) order, after any reorientation to the card's orientation (None: the card's)
    axis: int | None = None
    #: slices per network batch
    batch_size: int = 8
    #: test-time views (None: the card's views and input sizes; 1, 2, 4 or 8: that many at the model's input size)
    tta: int | None = None
    #: input sizes to average over (overrides ``tta``'s; None: as ``tta`` says)
    scales: tuple[int, ...] | None = None
    #: post-processing settings (None: the card's; ``{}``: none; see postprocess.py)
    postprocess: dict | None = None
    #: arithmetic: auto, bf16 or fp32 (see ``pipeline.autocast_for``)
    precision: str = "auto"
    #: the results-preserving decoder shortcut: on/off, or ``pipeline.FastDecodeSettings``
    fast: bool | FastDecodeSettings = True
    #: the presence decision (presence.py): True = the card's setting (none if the card has none), False = off
    #: (``--no-presence``), or a ``presence.PresenceRule`` to apply
    presence: bool | PresenceRule = True

    @classmethod
    def plain(cls, **changes) -> "InferenceOptions":
        """One pass at the model's input size and no post-processing (the GMS paper's protocol)."""
        return cls(**{"tta": 1, "postprocess": {}, **changes})

    @classmethod
    def from_args(cls, args) -> "InferenceOptions":
        """The options of a parsed ``gms segment`` or ``gms evaluate`` command line (``--axis``, ``--batch-size``,
        ``--no-tta``, ``--no-postprocess``, ``--precision``, ``--no-fast``, ``--no-presence``; one a command lacks keeps its default)."""
        return cls(axis=getattr(args, "axis", None), batch_size=args.batch_size,
                   tta=1 if args.no_tta else None, postprocess={} if args.no_postprocess else None,
                   precision=getattr(args, "precision", "auto"), fast=not args.no_fast,
                   presence=not getattr(args, "no_presence", False))


@dataclass
class TrainConfig:
    """The settings of one training run (``gms train``'s options; kept in the model card's ``training.config``)."""

    data: str
    output: str
    name: str | None = None
    segments: list[str] | None = None  # None: the --init-from model's, else ["lesion"] (see trainsegments.py)
    label_values: list[int] | None = None  # values in the mask files, one per segment (None: the --init-from model's,
    #                                        else 2D 255 for one segment, 1..n for several, 3D 1..n)
    input_size: int | None = None  # None: the --init-from model's input size, else 224
    axis: int | None = None  # slicing axis of 3D data; None: the --init-from model's, else 0
    normalization: dict | None = None
    foundation: dict = field(default_factory=lambda: {"name": "taef2"})
    weights_dir: str | None = None
    train_list: str = "train"
    val_list: str | None = None  # a list in split.json used for selection; default: carve val_fraction from train
    val_fraction: float = 0.1
    negative_list: str | None = None  # a list in split.json of cases without any segment (empty masks): trained on,
    #                                   val_fraction of it carved for validation (data.split_names)
    max_train: int | None = None
    max_val: int | None = None
    augment_copies: int = 4
    epochs: int = 100
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 2e-3
    min_lr: float = 0.0  # the cosine ends at this fraction of lr (0: at 0, as the paper)
    weight_decay: float = 0.01
    warmup_epochs: int = 5
    dice_samples: int = 2
    dice_heads: int = 1  # the decoded-Dice term on the last N heads: 1 = the final head, 3 = heads 2-4 (the paper)
    latent_noise: float = 0.0
    select_postprocess: bool = True  # choose none / largest component on the validation cases at the end
    precision: str = "auto"  # auto | bf16 | fp32 (autocast of the LMM, the decoded-Dice term and the encoding of the
    #                          training cache; the validation cache and validation itself stay fp32)
    ema: float = 0.0  # > 0: validate, select and save an exponential moving average of the weights with this decay
    compile: bool = False  # torch.compile the LMM's training step (needs a C++ compiler; 1.5x per step here, 1-2 min compile)
    seed: int = 0  # augmentation, shuffling and initialisation; also the validation carve unless split_seed is given
    split_seed: int | None = None  # seed of the validation part carved from the training list (None: seed; adapting
    #                                a model on its own data set: the carve the model was selected on)
    val_every: int = 1
    keep_every: int = 0  # also keep the (averaged) weights every N epochs as <work>/epoch-NNNN.pt, for gms average
    cache_dir: str | None = None
    work_dir: str | None = None
    resume: bool = True
    licence: str | None = None
    citation: str | None = None
    description: str | None = None
    init_from: str | None = None  # a model (folder or installed name) whose LMM weights and latent statistics start
    #                               the training: adapting it to new data instead of training from scratch
    cv_folds: int | None = None  # adapting: folds of the cross-validation that decides whether adapting helps (None:
    #                              5 with --init-from and at most adapt.FEW_SHOT_MAX cases, else 0 = off; adapt.py)

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """The configuration of a parsed ``gms train`` command line: each field from the option of the same name,
        except those given as JSON text (``--normalization``, ``--foundation``: a name or a JSON object) and those
        the command line turns around (``--no-resume``, ``--no-postprocess-select``)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in _TRAIN_ARGS_MAPPED}
        foundation = args.foundation
        return cls(**values, **{
            "normalization": json.loads(args.normalization) if args.normalization else None,
            "foundation": json.loads(foundation) if foundation.strip().startswith("{") else {"name": foundation},
            "resume": not args.no_resume,
            "select_postprocess": not args.no_postprocess_select,
        })


#: the TrainConfig fields that ``TrainConfig.from_args`` does not copy from the option of the same name
_TRAIN_ARGS_MAPPED = ("normalization", "foundation", "resume", "select_postprocess")
