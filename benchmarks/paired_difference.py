"""Paired difference between two ``gms evaluate --csv`` files of the same cases (e.g. new weights vs the shipped ones):
per segment and metric, the mean of the per-case differences (second minus first, in %), its standard error, and how
many cases got better / worse.

    python benchmarks/paired_difference.py old_test.csv new_test.csv
"""
from __future__ import annotations

import argparse
import csv
import math

import numpy as np


def read(path: str) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(r["case"], r["segment"]): r for r in csv.DictReader(f)}


def differences(first: dict, second: dict, segment: str, metric: str) -> np.ndarray:
    """Per-case differences of one segment's metric, second minus first, in % (cases in sorted order)."""
    keys = sorted(k for k in first if k[1] == segment)
    return 100 * np.array([float(second[k][metric]) - float(first[k][metric]) for k in keys])


def describe(d: np.ndarray) -> str:
    """Mean of paired differences with its standard error, and how many cases got better / worse."""
    se = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else 0.0
    return (f"{d.size} cases, mean difference {d.mean():+.2f} ± {se:.2f} (standard error), "
            f"{int((d > 0).sum())} better, {int((d < 0).sum())} worse")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", help="per-case CSV of the reference (gms evaluate --csv)")
    ap.add_argument("second", help="per-case CSV to compare with it")
    ap.add_argument("--metrics", nargs="+", default=["dice", "iou"])
    a = ap.parse_args()
    first, second = read(a.first), read(a.second)
    if set(first) != set(second):
        raise SystemExit(f"the two files hold different cases ({len(set(first) ^ set(second))} differ)")
    for seg in sorted({s for _, s in first}):
        for m in a.metrics:
            print(f"{seg} {m}: {describe(differences(first, second, seg, m))}")


if __name__ == "__main__":
    main()
