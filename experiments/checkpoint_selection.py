"""How much choosing the checkpoint on the test list is worth: every snapshot a run kept (``gms train --keep-every``)
scored on a list (default: the test list) by one plain pass at the model's input size, as ``gms evaluate --list test
--resolution model --no-tta --no-postprocess`` scores it (the GMS paper's protocol: per-image DSC / IoU at 224x224),
beside the validation Dice the run selected on. Prints the test figure of the snapshot that validation selected,
the best test figure over all snapshots (what the paper's selection on the test set reports), their paired difference
per segment with its standard error (as ``benchmarks/paired_difference.py`` prints it), and writes the per-epoch table as CSV.

This measures the optimism of a selection protocol; nothing here chooses or ships weights.

    python -m experiments.checkpoint_selection ../shared/data/busi --run runs/busi-s3 --weights-dir ../shared/models \\
        --threads 2 --csv busi-s3-selection.csv [--every 2] [--from-epoch 10]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

from GMSSegmentLib.allocator import keep_freed_memory
from GMSSegmentLib.average import load_ingredient
from GMSSegmentLib.evaluate import evaluate
from GMSSegmentLib.options import InferenceOptions
from benchmarks.paired_difference import describe, differences, read


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


def score(folder: Path, root: Path, list_name: str, weights_dir, csv_path: Path, limit=None) -> dict:
    """Mean DSC and IoU of one plain pass at the model's input size (the evaluate protocol; mean over segments), the
    per-case figures written to ``csv_path``."""
    with redirect_stdout(io.StringIO()):  # evaluate prints its table; the means are wanted here
        s = evaluate(folder, root, InferenceOptions.plain(), list_name=list_name, resolution="model",
                     weights_dir=weights_dir, device="cpu", csv_path=str(csv_path), limit=limit)
    if "mean" not in s:  # one segment
        s = {"mean": next(iter(s.values()))}
    return {"dsc": s["mean"]["dice_mean"], "iou": s["mean"]["iou_mean"]}


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
    table = {}
    with tempfile.TemporaryDirectory(prefix="gms-selection-") as td:
        cases = lambda e: Path(td) / f"epoch-{e:04d}.csv"  # noqa: E731  per-case figures of each snapshot
        for epoch, path in snaps:
            model, _ = load_ingredient(path)
            folder = model.save(Path(td) / f"epoch-{epoch:04d}")
            val = history.get(epoch)
            table[epoch] = {"epoch": epoch, "val_dice": val,
                            **score(folder, root, a.list, a.weights_dir, cases(epoch), a.limit)}
            r = table[epoch]
            print(f"{epoch:>6}{'' if val is None else f'{val:.4f}':>10}{100 * r['dsc']:9.2f}{100 * r['iou']:9.2f}",
                  flush=True)
        if a.csv:
            with open(a.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["epoch", "val_dice", "dsc", "iou"])
                w.writeheader()
                w.writerows(table.values())
            print(f"per-epoch table written to {a.csv}")
        best = max(table.values(), key=lambda r: r["dsc"])
        print(f"best on the '{a.list}' list (the paper's selection): epoch {best['epoch']}, DSC "
              f"{100 * best['dsc']:.2f} / IoU {100 * best['iou']:.2f} (its validation Dice {best['val_dice']})")
        if selected not in table:
            print(f"the selected epoch {selected} has no kept snapshot among those scored (--every, --from-epoch)")
            return
        sel = table[selected]
        print(f"selected on validation: epoch {selected}, DSC {100 * sel['dsc']:.2f} / IoU {100 * sel['iou']:.2f}")
        first, second = read(str(cases(selected))), read(str(cases(best["epoch"])))
        for seg in sorted({s for _, s in first}):
            for m in ("dice", "iou"):
                print(f"optimism of selecting on '{a.list}', {seg} {m}: "
                      f"{describe(differences(first, second, seg, m))}")


if __name__ == "__main__":
    main()
