"""The adaptation curve: a model adapted to a new site with k of its labelled cases, measured on the site's test list.

For each k, the site's first k cases of its adaptation list taken every ``--step``-th (1, 7, 13, ... for step 6: the
frames are consecutive video frames, so neighbours are near-duplicates) are put in a folder of their own, as a user's
corrected cases would be, and adapted with exactly the command a user runs:
``gms train SITE --init-from MODEL --max-minutes M -o OUT`` (plus ``--train-args``, for trials). Both the starting
model and the adapted one are then measured with ``gms evaluate DATA --list TEST`` (the adapted model only when
adaptation adopted one). Prints a table: k, minutes, the estimate the user was shown, DSC before/after on the test
list with the paired difference and its standard error.

    python benchmarks/adaptation_curve.py ../shared/data/cvc-clinicdb-dev --model kvasir-polyp --k 5 10 20

Writes under ``--out`` (default runs/adaptation-curve): the site folders, the models, the per-case CSVs and
``curve.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def gms(*args, log: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "GMSSegmentLib", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        log.write_text(shlex.join(cmd) + "\n" + r.stdout + r.stderr)
    return r


def site_folder(data: Path, cases: list[str], folder: Path) -> Path:
    """A data folder holding only ``cases`` (links to the images and masks) with split.json {"train": cases}."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    for c in cases:
        for sub in ("images", "masks"):
            src = next((data / sub).glob(f"{c}.*"))
            dst = folder / sub / src.name
            if not dst.exists():
                dst.symlink_to(src.resolve())
    (folder / "split.json").write_text(json.dumps({"train": cases}))
    return folder


def dice_by_case(csv_path: Path) -> dict[str, float]:
    with open(csv_path, newline="") as f:
        return {r["case"]: float(r["dice"]) for r in csv.DictReader(f)}


def evaluate(model: str, data: Path, test_list: str, csv_path: Path) -> dict[str, float]:
    if not csv_path.is_file():
        r = gms("--threads", str(torch_threads()), "evaluate", data, "--model", model, "--list", test_list,
                "--csv", csv_path, "--progress", "none", log=csv_path.with_suffix(".log"))
        if r.returncode != 0:
            raise SystemExit(f"gms evaluate failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return dice_by_case(csv_path)


def torch_threads() -> int:
    return int(os.environ.get("GMS_THREADS", "2"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="the site's data set (split.json with the adaptation and test lists)")
    ap.add_argument("--model", default="kvasir-polyp")
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--step", type=int, default=6, help="take every step-th case of the adaptation list")
    ap.add_argument("--adapt-list", default="adapt")
    ap.add_argument("--test-list", default="test")
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--train-args", default="", help="extra gms train options (trials), as one string")
    ap.add_argument("--out", type=Path, default=Path("runs/adaptation-curve"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    split = json.loads((a.data / "split.json").read_text())
    pool = sorted(split[a.adapt_list], key=lambda s: (len(s), s))
    before = evaluate(a.model, a.data, a.test_list, a.out / "before.csv")
    keys = sorted(before)
    rows = []
    for k in a.k:
        cases = pool[::a.step][:k]
        site = site_folder(a.data, cases, a.out / f"site-k{k}")
        out = a.out / f"adapted-k{k}"
        t0 = time.time()
        r = gms("--threads", str(torch_threads()), "train", site, "--init-from", a.model, "--max-minutes",
                a.max_minutes, "-o", out, "--no-resume", "--progress", "json", *shlex.split(a.train_args),
                log=a.out / f"train-k{k}.log")
        minutes = (time.time() - t0) / 60
        if r.returncode != 0:
            raise SystemExit(f"gms train failed for k={k}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        result = {}
        for line in r.stdout.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == "result":
                result = ev
        adopted = (out / "card.json").is_file() and result.get("adopted", True)
        after = evaluate(str(out), a.data, a.test_list, a.out / f"after-k{k}.csv") if adopted else before
        d = 100 * np.array([after[c] - before[c] for c in keys])
        se = d.std(ddof=1) / math.sqrt(d.size)
        rows.append({"k": k, "cases": cases, "minutes": round(minutes, 1), "adopted": bool(adopted),
                     "shown": result.get("estimate"), "test_before": round(100 * np.mean(list(before.values())), 2),
                     "test_after": round(100 * np.mean([after[c] for c in keys]), 2),
                     "paired_diff": round(float(d.mean()), 2), "paired_se": round(float(se), 2)})
        print(json.dumps(rows[-1]), flush=True)
    (a.out / "curve.json").write_text(json.dumps({"data": str(a.data), "model": a.model, "train_args": a.train_args,
                                                  "rows": rows}, indent=1))
    print(f"\n{'k':>3} {'min':>5} {'adopted':>8} {'shown (CV)':>24} {'test before':>11} {'after':>6} {'diff ± SE':>13}")
    for r in rows:
        shown = r["shown"]
        shown_s = (f"{100 * shown['before']:.1f} -> {100 * shown['after']:.1f}" if isinstance(shown, dict)
                   and "before" in shown else "-")
        print(f"{r['k']:>3} {r['minutes']:>5} {str(r['adopted']):>8} {shown_s:>24} {r['test_before']:>11} "
              f"{r['test_after']:>6} {r['paired_diff']:>+7.2f} ± {r['paired_se']:.2f}")


if __name__ == "__main__":
    main()
