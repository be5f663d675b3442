"""``gms benchmark``: slices/s and peak RSS of our inference loop and of a reference-style loop (batch 1, fp32, every
slice fully decoded, no shortcuts) on the same model and volume, measured side by side in one run: each loop runs in its
own child process (so each peak RSS is its own), one after the other, and the parent prints the figures, the speed-up
and the Dice agreement of the two label maps.

The default volume is CT-sized (512 x 512 x 300) and made from real data: a hippocampus MRI case resampled with linear
interpolation. Any volume can be given with --volume.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def add_arguments(b):
    b.add_argument("--volume", default=None, help="volume to segment (default: a CT-sized volume made from a sample)")
    b.add_argument("--sample", default="hippocampus-025", help="sample used to build the default volume")
    b.add_argument("--stack", default=None, metavar="BUSI_DIR",
                   help="instead of a resampled sample, stack real BUSI images into the volume: normal-class images "
                        "(no lesion) in the first and last third, test-split lesion images in the middle third, like "
                        "a CT whose target spans a third of the slices")
    b.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"),
                   help="size of the default volume (x y z)")
    b.add_argument("--axis", type=int, default=None, help="slicing axis (default: the model card's)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--skip-reference", action="store_true", help="run only our loop")
    b.add_argument("--child", choices=("ours", "reference"), help=argparse_hidden())
    b.add_argument("--labels-out", help=argparse_hidden())


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def make_volume(sample: str, size, dest: Path) -> Path:
    import SimpleITK as sitk

    from .samples import fetch_sample

    img = sitk.ReadImage(str(fetch_sample(sample)), sitk.sitkFloat32)
    old_size, old_sp = img.GetSize(), img.GetSpacing()
    new_sp = [o * s / n for o, s, n in zip(old_size, old_sp, size)]
    res = sitk.Resample(img, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), new_sp,
                        img.GetDirection(), 0.0, sitk.sitkFloat32)
    sitk.WriteImage(res, str(dest))
    return dest


def stack_slice(path: Path, x: int, y: int) -> np.ndarray:
    """One BUSI image as ``make_stack`` puts it into the benchmark stack: grey, resized bilinearly to x by y (uint8)."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("L").resize((x, y), Image.BILINEAR))


def make_stack(busi_dir: str, size, dest: Path) -> Path:
    import SimpleITK as sitk

    root = Path(busi_dir)
    split = json.loads((root / "split.json").read_text())
    x, y, z = (int(v) for v in size)
    third = z // 3
    normal = sorted(split["normal"])  # 133 images: the last third reuses them in reverse order
    names = normal[:third] + sorted(split["test"])[: z - 2 * third] + normal[::-1][:third]
    if len(names) < z:
        raise SystemExit(f"not enough BUSI images for {z} slices")
    vol = np.zeros((z, y, x), np.uint8)
    for k, n in enumerate(names[:z]):
        vol[k] = stack_slice(root / "images" / f"{n}.png", x, y)
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(dest))
    return dest


def _child(args) -> int:
    """Runs one loop and prints a JSON line with its figures."""
    import torch

    from .imageio import read_image
    from .model import load_model, resolve_model_path
    from .pipeline import FastDecodeSettings, SliceSegmenter, pick_device, segment_array

    device = pick_device(args.device)
    t_load = time.perf_counter()
    model = load_model(resolve_model_path(args.model), weights_dir=args.weights_dir, device=device)
    img = read_image(args.volume)
    ref = args.child == "reference"
    # flip test-time augmentation off on both sides: the target compares the same prediction, loop against loop
    # the reference loop is fp32 whatever --precision says
    seg = SliceSegmenter(model, device, FastDecodeSettings(enabled=not ref), channels_last=not ref, tta=1,
                         precision="fp32" if ref else args.precision)
    seg.stats.count_flops = device.type == "cpu"  # the stage times are measured on the CPU only
    load_s = time.perf_counter() - t_load
    t0 = time.perf_counter()
    axis = model.card.slicing_axis if args.axis is None else args.axis
    labels = segment_array(model, img.array, axis=axis, segmenter=seg,
                           spacing_zyx=img.geometry.spacing_zyx,
                           batch_size=1 if ref else args.batch_size)
    secs = time.perf_counter() - t0
    np.save(args.labels_out, labels)
    import resource

    from .peak import measure_peak

    precision = seg.precision  # "auto" resolved for this CPU and model (the reference: fp32)
    peak = measure_peak(precision, device.type) if device.type == "cpu" and precision in ("fp32", "bf16") else {}

    n = seg.stats.slices + seg.stats.extra.get("z_skipped", 0)  # every slice along the axis, run or skipped
    print(json.dumps({"loop": args.child, "slices": n, "model_slices": seg.stats.slices, "seconds": secs,
                      "load_seconds": load_s, "slices_per_s": n / secs, "decoded_slices": seg.stats.decoded_slices,
                      "decoded_area_fraction": seg.stats.decoded_fraction / max(1, seg.stats.slices),
                      "z_skipped": seg.stats.extra.get("z_skipped", 0),
                      "stage_seconds": seg.stats.stage_seconds, "stage_flops": seg.stats.stage_flops,
                      "precision": precision, "peak_gflops": peak,
                      "slices_with_foreground": int(np.moveaxis(labels, axis, 0).reshape(n, -1).any(axis=1).sum()),
                      "threads": torch.get_num_threads(),
                      "peak_rss_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def _run_child(kind: str, args, volume: Path, labels_out: Path) -> dict:
    threads = ["--threads", str(args.threads)] if getattr(args, "threads", None) else []
    cmd = [sys.executable, "-m", "GMSSegmentLib", *threads, "benchmark", "--child", kind, "--volume", str(volume),
           "--labels-out", str(labels_out), "--batch-size", str(args.batch_size), "--device", args.device,
           "--precision", args.precision]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.weights_dir:
        cmd += ["--weights-dir", str(args.weights_dir)]
    if args.axis is not None:
        cmd += ["--axis", str(args.axis)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child '{kind}' failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def roofline_lines(r: dict) -> list[str]:
    """Per stage: achieved GFLOP/s against the peak this machine measured in the same precision."""
    peak, flops, secs = r.get("peak_gflops") or {}, r.get("stage_flops") or {}, r.get("stage_seconds") or {}
    if not peak or not flops:
        return []
    lines = [f"peak here ({r['precision']}): matrix product {peak['matmul']:.0f} GFLOP/s, 64-channel 3x3 "
             f"convolution {peak['conv']:.0f} GFLOP/s"]
    for stage, f in flops.items():
        if secs.get(stage):
            rate = f / secs[stage] / 1e9
            lines.append(f"{stage}: {f / 1e9:.1f} GFLOP in {secs[stage]:.1f} s = {rate:.0f} GFLOP/s, "
                         f"{100 * rate / peak['conv']:.0f}% of the convolution peak, "
                         f"{100 * rate / peak['matmul']:.0f}% of the matrix product's")
    return lines


def run_benchmark(args):
    from .imageio import read_image
    from .metrics import dice

    if args.child:
        raise SystemExit(_child(args))
    with tempfile.TemporaryDirectory(prefix="gms-bench-") as td:
        td = Path(td)
        if args.volume:
            volume = Path(args.volume)
            what = str(volume)
        elif args.stack:
            volume = make_stack(args.stack, args.size, td / "volume.nrrd")
            what = (f"{args.size[0]}x{args.size[1]}x{args.size[2]} stack of real BUSI images (normal | test lesions | "
                    f"normal)")
        else:
            volume = make_volume(args.sample, args.size, td / "volume.nrrd")
            what = f"{args.sample} resampled to {args.size[0]}x{args.size[1]}x{args.size[2]} (linear)"
        img = read_image(volume)
        print(f"volume: {what}, array {img.array.shape}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}")
        results = {}
        kinds = ["ours"] if args.skip_reference else ["reference", "ours"]
        for kind in kinds:
            r = _run_child(kind, args, volume, td / f"{kind}.npy")
            results[kind] = r
            print(f"  {kind:<10} {r['slices']} slices in {r['seconds']:.1f} s = {r['slices_per_s']:.2f} slices/s; "
                  f"peak RSS {r['peak_rss_mib_self']:.0f} MiB; decoded {r['decoded_slices']} slices "
                  f"({100 * r['decoded_area_fraction']:.0f}% of the area); {r['z_skipped']} slices skipped by the z shortcut; "
                  f"{r['slices_with_foreground']} slices with foreground", flush=True)
            if r["stage_seconds"]:
                print(" " * 13 + "stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items())
                      + f"; the rest {r['seconds'] - sum(r['stage_seconds'].values()):.1f} s", flush=True)
            for line in roofline_lines(r):
                print(" " * 13 + line, flush=True)
        if "reference" in results:
            a, b = np.load(td / "ours.npy"), np.load(td / "reference.npy")
            labels = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
            agree = {int(l): dice(a == l, b == l) for l in labels}
            speed = results["ours"]["slices_per_s"] / results["reference"]["slices_per_s"]
            print(f"speed-up {speed:.2f}x; Dice agreement per label {json.dumps({k: round(v, 5) for k, v in agree.items()})}; "
                  f"identical voxels {100 * float((a == b).mean()):.4f}%")
            enc = results["ours"]["stage_seconds"].get("encoder")
            if enc and not results["ours"]["z_skipped"]:
                # ours takes at least its encoder's seconds, so no saving in the decoder, the LMM or the loop can
                # take the ratio past this while every slice is encoded with the same arithmetic
                print(f"ceiling of the speed-up while ours encodes every slice as now: reference seconds / ours' "
                      f"encoder seconds = {results['reference']['seconds'] / enc:.2f}x")
        return results
