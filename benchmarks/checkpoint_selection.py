"""How much choosing the checkpoint on the test list is worth: every snapshot a run kept (``gms train --keep-every``)
scored on a list (default: the test list) by one plain pass at the model's input size, as ``gms evaluate --list test
--resolution model --no-tta --no-postprocess`` scores it (the GMS paper's protocol: per-image DSC / IoU at 224x224),
beside the validation Dice the run selected on. Prints the test figure of the snapshot that validation selected,
the best test figure over all snapshots (what the paper's selection on the test set reports), their paired difference
with its standard error, and writes the per-epoch table as CSV.

This measures the optimism of a selection protocol; nothing here chooses or ships weights.

    python benchmarks/checkpoint_selection.py ../shared/data/busi --run runs/busi-s3 --weights-dir ../shared/models \\
        --threads 2 --csv busi-s3-selection.csv [--every 2] [--from-epoch 10]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GMSSegment"))

from GMSSegmentLib.allocator import keep_freed_memory  # noqa: E402
from GMSSegmentLib.average import load_ingredient  # noqa: E402
from GMSSegmentLib.evaluate import evaluate  # noqa: E402


def snapshots(run: Path, every: int, from_epoch: int, selected: int | None) -> list[tuple[int, Path]]:
    """The run's kept snapshots <run>.work/epoch-NNNN.pt from ``from_epoch``, every ``every``-th, (epoch, path) in
    epoch order; the snapshot of the ``selected`` epoch is always among them when it was kept."""
    work = run.with_name(run.name + ".work")
    found = sorted((int(m.group(1)), p) for p in work.glob("epoch-*.pt")
                   if (m := re.fullmatch(r"epoch-(\d+)\.pt", p.name)))
    found = [(e, p) for e, p in found if e >= from_epoch]
    if not found:
        raise SystemExit(f"no snapshots epoch-NNNN.pt from epoch {from_epoch} in {work} (train with --keep-every)")
    chosen = found[::every]
    chosen += [(e, p) for e, p in found if e == selected and (e, p) not in chosen]
    return sorted(chosen)


def per_case(folder: Path, root: Path, list_name: str, weights_dir, limit=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-case DSC and IoU of one plain pass at the model's input size (the evaluate protocol)."""
    with tempfile.TemporaryDirectory() as td, redirect_stdout(io.StringIO()):
        csv_path = Path(td) / "cases.csv"
        evaluate(folder, root, list_name=list_name, resolution="model", weights_dir=weights_dir, device="cpu",
                     tta=False, postprocess=False, csv_path=str(csv_path), limit=limit)
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    # one row per case and segment: average over segments per case (binary models: one row per case)
    cases = sorted({r["case"] for r in rows})
    dsc = np.array([np.mean([float(r["dice"]) for r in rows if r["case"] == c]) for c in cases])
    iou = np.array([np.mean([float(r["iou"]) for r in rows if r["case"] == c]) for c in cases])
    return dsc, iou


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="the data set the run was trained on")
    ap.add_argument("--run", required=True, help="the run's model folder (its snapshots are in <run>.work)")
    ap.add_argument("--list", default="test", help="the list to score every snapshot on (default: test)")
    ap.add_argument("--every", type=int, default=1, help="score every Nth kept snapshot")
    ap.add_argument("--from-epoch", type=int, default=0, help="skip snapshots before this epoch")
    ap.add_argument("--limit", type=int, default=None, help="score only the list's first N cases (a quick look)")
    ap.add_argument("--csv", default=None, help="write the per-epoch table here")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    keep_freed_memory()  # the allocator tuning every gms command applies at start-up
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    root, run = Path(a.data), Path(a.run)
    card = json.loads((run / "card.json").read_text())
    tr = card.get("training") or {}
    history = {h["epoch"]: h.get("val_dice") for h in tr.get("history", [])}
    selected = tr.get("selected_epoch")
    snaps = snapshots(run, a.every, a.from_epoch, selected)
    print(f"{len(snaps)} snapshots of {run} scored on the '{a.list}' list of {root}: one plain pass at "
          f"{card['input_size']} px; the run selected epoch {selected} on validation")
    print(f"{'epoch':>6}{'val Dice':>10}{'DSC %':>9}{'IoU %':>9}", flush=True)
    table, per = [], {}
    with tempfile.TemporaryDirectory(prefix="gms-selection-") as td:
        for epoch, path in snaps:
            model, _ = load_ingredient(path)
            folder = model.save(Path(td) / f"epoch-{epoch:04d}")
            dsc, iou = per_case(folder, root, a.list, a.weights_dir, a.limit)
            per[epoch] = (dsc, iou)
            val = history.get(epoch)
            table.append({"epoch": epoch, "val_dice": val, "dsc": float(dsc.mean()), "iou": float(iou.mean())})
            print(f"{epoch:>6}{'' if val is None else f'{val:.4f}':>10}{100 * dsc.mean():9.2f}{100 * iou.mean():9.2f}",
                  flush=True)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
        print(f"per-epoch table written to {a.csv}")
    best = max(table, key=lambda r: r["dsc"])
    print(f"best on the '{a.list}' list (the paper's selection): epoch {best['epoch']}, DSC {100 * best['dsc']:.2f} / "
          f"IoU {100 * best['iou']:.2f} (its validation Dice {best['val_dice']})")
    if selected in per:
        d_sel, j_sel = per[selected]
        d_best, j_best = per[best["epoch"]]
        diff = d_best - d_sel
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        print(f"selected on validation: epoch {selected}, DSC {100 * d_sel.mean():.2f} / IoU {100 * j_sel.mean():.2f}")
        print(f"optimism of selecting on '{a.list}': DSC {100 * diff.mean():+.2f} +- {100 * se:.2f} (paired standard "
              f"error), IoU {100 * (j_best - j_sel).mean():+.2f}")
    else:
        print(f"the selected epoch {selected} has no kept snapshot among those scored (--every, --from-epoch)")


if __name__ == "__main__":
    main()
