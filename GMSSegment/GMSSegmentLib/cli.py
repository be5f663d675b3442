"""The ``gms`` command line (also ``python -m GMSSegmentLib``): segment, train, evaluate, postprocess, average,
benchmark, info, sample, and serve (the warm worker, serve.py).

Exit codes: 0 success; 2 bad input, model or options (a one-line message); 1 an unexpected failure; 130 cancelled.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from . import GMSError, __version__
from .allocator import keep_freed_memory
from .reporting import Reporter
from .segmentcmd import cmd_segment


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):  # turn SIGTERM into an exception so that temporary outputs are removed
    raise _Terminated()


def _threads(n: int | None):
    if n:  # torch is imported only when needed: a refused input or output is answered without loading it
        import torch

        torch.set_num_threads(n)


# -- train --------------------------------------------------------------------------------------------------------------
def cmd_train(args, rep: Reporter) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_args(args)
    events = None
    if rep.mode == "json":  # the worker protocol: JSON lines instead of the plain log lines
        def events(kind, **fields):
            if kind == "log":
                rep.log(fields["message"])
            elif kind == "progress":
                rep.progress(fields.pop("done"), fields.pop("total"), **fields)
            else:
                rep.emit(kind, **fields)
    train(cfg, events=events)
    rep.emit("done")
    return 0


def cmd_evaluate(args, rep: Reporter) -> int:
    from .evaluate import evaluate

    from .options import InferenceOptions

    evaluate(args.model, args.data, InferenceOptions.from_args(args), list_name=args.list, cases=args.cases,
             csv_path=args.csv, resolution=args.resolution, weights_dir=args.weights_dir, device=args.device,
             limit=args.limit, reporter=rep, record=args.record,
             command="gms " + " ".join(sys.argv[1:]) if args.record else None)
    return 0


def cmd_uncertainty(args, rep: Reporter) -> int:
    from .uncertaintycal import calibrate_uncertainty

    calibrate_uncertainty(args.model, args.data, weights_dir=args.weights_dir, device=args.device,
                          batch_size=args.batch_size, command="gms " + " ".join(sys.argv[1:]))
    return 0


def cmd_postprocess(args, rep: Reporter) -> int:
    from .evaluate import select_postprocess

    select_postprocess(args.model, args.data, weights_dir=args.weights_dir, device=args.device,
                       batch_size=args.batch_size, rule=args.rule, views=tuple(sorted(set(args.views))),
                       command="gms " + " ".join(sys.argv[1:]))
    return 0


def cmd_presence(args, rep: Reporter) -> int:
    from .presencecal import calibrate_presence

    if not 0 <= args.max_dice_cost <= 1:
        raise GMSError(f"--max-dice-cost must be from 0 to 1, got {args.max_dice_cost}")
    calibrate_presence(args.model, args.data, args.max_dice_cost, weights_dir=args.weights_dir, device=args.device,
                       batch_size=args.batch_size, command="gms " + " ".join(sys.argv[1:]))
    return 0


def cmd_average(args, rep: Reporter) -> int:
    from .average import average_models

    out = average_models(args.sources, args.output, weights=args.weights, name=args.name)
    print(f"averaged {len(args.sources)} models into {out}; choose its inference options on the validation cases "
          f"with: gms postprocess DATA --model {out}", flush=True)
    return 0


def cmd_benchmark(args, rep: Reporter) -> int:
    from .benchmark import run_benchmark

    run_benchmark(args)
    return 0


def cmd_info(args, rep: Reporter) -> int:
    from .model import GMSModel, bundled_models, resolve_model_path

    if not args.model:
        print("bundled models:", ", ".join(bundled_models()) or "none")
        return 0
    m = GMSModel.load(resolve_model_path(args.model))
    print(json.dumps({k: v for k, v in m.card.to_dict().items() if k != "training" or args.full}, indent=2))
    return 0


def cmd_sample(args, rep: Reporter) -> int:
    from .samples import fetch_sample, SAMPLES

    if not args.name:
        for k, v in SAMPLES.items():
            print(f"{k}: {v['description']}")
        return 0
    print(fetch_sample(args.name, progress=rep.download_progress(args.name)))
    return 0


def cmd_serve(args, rep: Reporter) -> int:
    from .serve import serve

    if not args.idle_minutes > 0:
        raise GMSError(f"--idle-minutes must be positive, got {args.idle_minutes}")
    return serve(main, args.idle_minutes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gms", description="Generative Medical Segmentation (GMS): segment, train, "
                                "evaluate and benchmark on the CPU or a GPU.")
    p.add_argument("--version", action="version", version=f"gms {__version__}")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model=True, precision=True):
        if model:
            sp.add_argument("--model", default=None, help="model folder or bundled model name (default busi-lesion)")
        sp.add_argument("--weights-dir", default=None,
                        help="folder holding the foundation model weights (else $GMS_WEIGHTS_DIR, the cache, or a "
                             "verified download)")
        sp.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
        if precision:  # inference precision (gms train has its own --precision)
            sp.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                            help="inference arithmetic: auto = bf16/fp16 autocast on CUDA, fp32 on the CPU; bf16 = "
                                 "bf16 autocast also on the CPU (fast on AMX / AVX512-BF16 CPUs)")
        sp.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                        help="progress display; json = one JSON object per stdout line (the Slicer worker protocol)")

    s = sub.add_parser("segment", help="segment images or volumes")
    s.add_argument("inputs", nargs="*", help="PNG/JPEG images, NRRD/NIfTI/MHA volumes, DICOM series folders or .dcm "
                   "files")
    s.add_argument("-o", "--output", help="output file (.seg.nrrd, .nrrd, .nii.gz, .png) or, for several inputs, "
                                          "a folder")
    s.add_argument("--jobs", help="JSON file [{input, output}, ...]: a batch in which a failing item does not stop "
                                  "the others")
    s.add_argument("--format", default=None, help="output extension for outputs named automatically (.dcm: a DICOM "
                   "SEG referencing the source series, for DICOM inputs)")
    s.add_argument("--series", metavar="UID", default=None,
                   help="of a folder holding several DICOM series, segment only the series with this Series Instance "
                        "UID (default: each series, one output per series)")
    s.add_argument("--axis", type=int, default=None, choices=(0, 1, 2),
                   help="slicing axis in numpy (z, y, x) order, after any reorientation to the model card's "
                        "orientation (default: the card's axis)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--no-fast", action="store_true", help="decode every slice fully (the reference loop)")
    s.add_argument("--no-presence", action="store_true",
                   help="keep every segment the model draws, even where the model card's presence decision "
                        "(chosen on validation) says there is nothing")
    s.add_argument("--no-postprocess", action="store_true",
                   help="skip the model card's post-processing (largest component and, for 3D models, smoothing along the "
                        "slicing axis, where chosen on validation)")
    s.add_argument("--no-tta", action="store_true",
                   help="skip the model card's test-time augmentation (flip views and larger input sizes, if "
                        "chosen on validation; 2 to 16 times the model's work per slice)")
    s.add_argument("--uncertainty", metavar="UNC",
                   help="also write each result's uncertainty map (0 = sure, 1 = on the decision boundary): a float32 "
                        ".nrrd/.nii.gz/.nii/.mha on the input's grid, or an 8-bit .png for a 2D image (255 = most "
                        "uncertain); with several inputs a folder, each map named as its mask")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files")
    s.add_argument("--cluster", metavar="RAY", default=None,
                   help="spread the items over Ray actors: 'ray' starts a local Ray instance, 'ray://HOST:PORT' uses a "
                        "running cluster (needs pip install 'gmssegment[ray]'; see docs/CLUSTER.md)")
    s.add_argument("--actors", type=int, default=None,
                   help="with --cluster: how many actors, each holding one loaded model (default: as many as the "
                        "cluster's GPUs with --device cuda, else its CPUs / --threads)")
    common(s)
    s.set_defaults(func=cmd_segment)

    t = sub.add_parser("train", help="train a latent mapping model")
    t.add_argument("data", help="data set folder (images/ masks/ split.json, or imagesTr/ labelsTr/ split.json)")
    t.add_argument("-o", "--output", required=True, help="model folder to write")
    t.add_argument("--name")
    t.add_argument("--segments", nargs="+", default=None,
                   help="segment names, one per label value (default: the --init-from model's segments, with their "
                        "colours and label values, else lesion)")
    t.add_argument("--init-from", metavar="MODEL",
                   help="adapt a model (installed name or folder) instead of training from scratch: its LMM weights, "
                   "latent statistics, input size and normalisation are the starting point, which is validated "
                   "first and kept unless training beats it on the validation cases (a smaller --lr, e.g. 5e-4, "
                   "suits short adaptations to the same task; from another task's model keep the default, "
                   "see Resources/Models/EXPERIMENTS.md)")
    t.add_argument("--label-values", nargs="+", type=int, default=None,
                   help="mask values of the segments (default: the --init-from model's, else 2D 255 for one "
                        "segment and 1..n for several, 3D 1..n); the masks must hold every value, and a value no "
                        "segment has is an error unless --label-values is given")
    t.add_argument("--input-size", type=int, default=None,
                   help="model input size in pixels (default: the --init-from model's, else 224)")
    t.add_argument("--axis", type=int, default=None, choices=(0, 1, 2),
                   help="slicing axis for 3D data (numpy order; default: the --init-from model's, else 0)")
    t.add_argument("--normalization", help='JSON, e.g. {"mode": "percentile", "low": 0.5, "high": 99.5}')
    t.add_argument("--foundation", default="taef2", help="taef2, or JSON such as "
                                                          '{"name": "diffusers-kl", "path": "stabilityai/sd-vae-ft-mse"}')
    t.add_argument("--train-list", default="train")
    t.add_argument("--val-list", default=None, help="list in split.json for model selection (default: carve "
                                                     "--val-fraction of the training list)")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--negatives", dest="negative_list", default=None, metavar="LIST",
                   help="list in split.json of cases without any segment (empty masks, e.g. normal images): trained "
                        "on so that the model learns to answer 'nothing here'; --val-fraction of it is kept for "
                        "validation and for choosing the presence decision")
    t.add_argument("--cv-folds", type=int, default=None,
                   help="adapting (--init-from): folds of the cross-validation over all the cases that decides "
                        "whether the adapted model is better than the starting one (default: 5 when adapting with "
                        "at most 60 cases and neither --val-list nor --max-val, else 0 = off: validation carved from the cases)")
    t.add_argument("--max-train", type=int, default=None, help="use only the first N training cases")
    t.add_argument("--max-val", type=int, default=None)
    t.add_argument("--augment-copies", type=int, default=4, help="augmented copies per sample in the latent cache")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr", type=float, default=0.0,
                   help="the fraction of --lr at which the cosine schedule ends (0 = down to 0, as the paper; e.g. "
                        "0.25 keeps the learning rate up at the end of a short schedule)")
    t.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW's decoupled weight decay (the GMS paper's 0.01 over 1000 epochs; a schedule ten times "
                        "shorter shrinks the weights ten times less with the same value)")
    t.add_argument("--warmup-epochs", type=int, default=5)
    t.add_argument("--dice-samples", type=int, default=2,
                   help="samples per batch whose decoded Dice loss is back-propagated through the decoder (0 = off)")
    t.add_argument("--dice-heads", type=int, default=1,
                   help="heads whose output gets the decoded Dice term, counted from the final one: 1 = the final "
                        "head only, 2, or 3 = the three supervised heads as the paper (3x the decoder cost per step)")
    t.add_argument("--latent-noise", type=float, default=0.0)
    t.add_argument("--ema", type=float, default=0.0,
                   help="validate, select and save an exponential moving average of the weights with this decay "
                        "(e.g. 0.999; 0 = off, the last step's weights)")
    t.add_argument("--no-postprocess-select", action="store_true",
                   help="do not choose the post-processing on the validation cases at the end")
    t.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="training arithmetic: auto = bf16 where the hardware has it (AMX/AVX512-BF16 CPUs, CUDA), "
                        "else fp32 (the LMM step, the decoded-Dice term and the encoding of the training latents); "
                        "the validation latents and validation stay fp32")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the LMM's training step (about 1.5x faster per step here after a compilation "
                        "of 1-2 minutes; needs a C++ compiler, falls back to eager if compilation fails)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the augmented copies, the shuffling and the initial weights (and of the validation "
                        "carve unless --split-seed is given)")
    t.add_argument("--split-seed", type=int, default=None,
                   help="seed of the validation part carved from the training list (default: --seed; adapting a "
                        "model with --init-from on its own data set: the part that model was selected on)")
    t.add_argument("--val-every", type=int, default=1)
    t.add_argument("--keep-every", type=int, default=0,
                   help="also keep the weights every N epochs in the work folder (epoch-NNNN.pt; the moving average "
                        "with --ema), to average them later with gms average")
    t.add_argument("--cache-dir", default=None)
    t.add_argument("--work-dir", default=None, help="checkpoints, log and latent cache (default <output>.work)")
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--licence")
    t.add_argument("--citation")
    t.add_argument("--description")
    common(t, model=False, precision=False)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="DSC, IoU and HD95 per case and label; table + CSV")
    e.add_argument("data", help="data set folder with split.json")
    e.add_argument("--list", default=None, help="list in split.json (default: test, else val)")
    e.add_argument("--cases", nargs="+", default=None, help="explicit case names instead of a list")
    e.add_argument("--csv", default=None, help="per-case CSV to write")
    e.add_argument("--resolution", choices=("native", "model"), default="native",
                   help="native: at the image's own size; model: at the model's input size (the GMS paper's way)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--no-fast", action="store_true")
    e.add_argument("--no-presence", action="store_true", help="skip the card's presence decision")
    e.add_argument("--limit", type=int, default=None, help="only the first N cases")
    e.add_argument("--no-tta", action="store_true",
                   help="one plain pass at the model's input size instead of the card's test-time augmentation")
    e.add_argument("--no-postprocess", action="store_true", help="skip the card's post-processing")
    e.add_argument("--record", action="store_true", help="write the summary into the model card's metrics")
    common(e)
    e.set_defaults(func=cmd_evaluate)

    un = sub.add_parser("uncertainty", help="choose the temperature of a model's uncertainty (the score printed "
                        "with each result and the --uncertainty map) on the model's validation cases and store it "
                        "in its card")
    un.add_argument("data", help="the data set the model was trained on")
    un.add_argument("--batch-size", type=int, default=8)
    common(un, precision=False)
    un.set_defaults(func=cmd_uncertainty)

    pp = sub.add_parser("postprocess", help="choose the inference options (test-time augmentation with 1, 2 or 4 "
                        "flip views (8 with --views: the flips and 90-degree rotations) at the model's input size alone or with a second, larger size; post-processing "
                        "none / largest component, and for 3D models smoothing along the slicing axis) on the model's "
                        "validation cases and store them in its card "
                        "(gms train does this at its end)")
    pp.add_argument("data", help="the data set the model was trained on")
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--views", type=int, nargs="+", choices=(1, 2, 4, 8), default=(1, 2, 4),
                    help="the test-time view counts to try (default: 1 2 4; 8 adds the 90-degree rotations, which "
                    "did not help kvasir-polyp on its validation cases and doubles the cost of the choice)")
    pp.add_argument("--rule", choices=("one-se", "best"), default="one-se",
                    help="one-se (default): the cheapest option within one paired standard error of the best mean "
                    "Dice (a smaller gain is noise on the validation cases); best: the best mean")
    common(pp, precision=False)
    pp.set_defaults(func=cmd_postprocess)

    pr = sub.add_parser("presence", help="choose the presence decision (a segment the model draws on a slice is "
                        "cleared when its area or the model's confidence in it is too small) on the model's "
                        "validation cases and store it in its card (gms train does this at its end)")
    pr.add_argument("data", help="the data set the model was trained on")
    pr.add_argument("--max-dice-cost", type=float, default=0.005,
                    help="mean validation Dice the decision may cost the cases that hold the segment (default "
                         "0.005, half a point; 0: none)")
    pr.add_argument("--batch-size", type=int, default=8)
    common(pr, precision=False)
    pr.set_defaults(func=cmd_presence)

    av = sub.add_parser("average", help="average the LMM weights of models of one training lineage (model folders, "
                        "installed model names, training checkpoints <work>/last.pt or the snapshots "
                        "<work>/epoch-NNNN.pt of gms train --keep-every) into a new model folder")
    av.add_argument("sources", nargs="+", help="model folders, installed model names, or training checkpoints (a "
                    "checkpoint's card and latent statistics are those of its run's model folder)")
    av.add_argument("-o", "--output", required=True, help="new model folder (must not exist)")
    av.add_argument("--weights", type=float, nargs="+", help="one weight per source (default: equal)")
    av.add_argument("--name", help="model name in the new card (default: the first source's)")
    av.set_defaults(func=cmd_average)

    b = sub.add_parser("benchmark", help="slices/s and peak RSS of our loop vs a reference-style loop")
    from .benchmark import add_arguments

    add_arguments(b)
    common(b)
    b.set_defaults(func=cmd_benchmark)

    i = sub.add_parser("info", help="show a model card, or list bundled models")
    i.add_argument("model", nargs="?")
    i.add_argument("--full", action="store_true", help="include the training section")
    i.set_defaults(func=cmd_info)

    sm = sub.add_parser("sample", help="print the path of a sample image (from ../shared, or a verified download)")
    sm.add_argument("name", nargs="?")
    sm.set_defaults(func=cmd_sample)

    from .serve import add_parser as add_serve

    add_serve(sub, cmd_serve)
    return p


def main(argv=None, models=None) -> int:
    """Run one command; ``models``: the warm worker's model cache (serve.py), which ``segment`` loads models from."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if models is not None:
        args.model_cache = models
    rep = Reporter(getattr(args, "progress", "bar"))
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        if args.threads is not None and args.threads < 1:
            raise GMSError(f"--threads must be at least 1, got {args.threads}")
        if getattr(args, "batch_size", 1) < 1:
            raise GMSError(f"--batch-size must be at least 1, got {args.batch_size}")
        keep_freed_memory()
        _threads(args.threads)
        return args.func(args, rep)
    except GMSError as e:
        rep.error(str(e))
        return 2
    except (KeyboardInterrupt, _Terminated):
        rep.error("cancelled")
        return 130
    except BrokenPipeError:  # stdout closed by the reader (``gms info busi-lesion | head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 141
    except Exception as e:  # an unexpected failure: one line for the user, the traceback for developers
        import traceback

        traceback.print_exc(file=sys.stderr)
        rep.error(f"unexpected {type(e).__name__}: {e}")
        return 1
