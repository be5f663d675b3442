"""Weight averaging of one training lineage, scored on the model's validation cases (never the test list): each
ingredient alone, the uniform average of all, and a greedy average (ingredients taken best first, each kept only if
the average's validation Dice does not fall), all by one plain pass at the model's input size, as ``gms evaluate
--no-tta --no-postprocess --resolution model`` scores it. Writes the uniform and the greedy average as model folders.

    python experiments/greedy_soup.py ../shared/data/kvasir-seg -o runs/soup --weights-dir ../shared/models \\
        --ingredients kvasir-polyp runs/kv16/kvasir-ft.work/last.pt runs/kv18/kvasir-swa.work/epoch-0008.pt ...

Ingredients are whatever ``gms average`` takes (model folders, installed names, last.pt, epoch-NNNN.pt).
"""
from __future__ import annotations

import argparse
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from GMSSegmentLib.average import average_models, load_ingredient
from GMSSegmentLib.evaluate import evaluate, validation_cases
from GMSSegmentLib.options import InferenceOptions


def score(folder: Path, root: Path, weights_dir, cases) -> float:
    with redirect_stdout(io.StringIO()):  # evaluate prints its table; only the mean is wanted here
        s = evaluate(folder, root, InferenceOptions.plain(), cases=cases, resolution="model", weights_dir=weights_dir,
                     device="cpu")
    return s["mean"]["dice_mean"] if "mean" in s else next(iter(s.values()))["dice_mean"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="the data set the ingredients were trained on")
    ap.add_argument("--ingredients", nargs="+", required=True)
    ap.add_argument("-o", "--output", required=True, help="new folder for the single ingredients and the averages")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    root, out = Path(a.data), Path(a.output)
    out.mkdir(parents=True, exist_ok=False)
    singles = []
    for i, src in enumerate(a.ingredients):
        model, ref = load_ingredient(src)
        folder = model.save(out / f"single-{i:02d}")
        singles.append((src, folder))
    cases = validation_cases(json.loads((singles[0][1] / "card.json").read_text()), root)
    print(f"{len(cases)} validation cases of {root}; one plain pass at the model's input size")
    alone = {}
    for src, folder in singles:
        alone[src] = score(folder, root, a.weights_dir, cases)
        print(f"  alone    {alone[src]:.4f}  {src}", flush=True)
    uniform = average_models(list(a.ingredients), out / "uniform")
    print(f"uniform average of all {len(a.ingredients)}: {score(uniform, root, a.weights_dir, cases):.4f}", flush=True)
    order = sorted(a.ingredients, key=lambda s: -alone[s])
    chosen, best = [order[0]], alone[order[0]]
    for k, src in enumerate(order[1:]):
        trial = average_models(chosen + [src], out / f"greedy-trial-{k:02d}")
        d = score(trial, root, a.weights_dir, cases)
        keep = d >= best
        print(f"  + {src}: {d:.4f} ({'kept' if keep else 'dropped'})", flush=True)
        if keep:
            chosen, best = chosen + [src], d
    greedy = average_models(chosen, out / "greedy") if len(chosen) > 1 else singles[a.ingredients.index(chosen[0])][1]
    print(f"greedy average of {len(chosen)}: {best:.4f} -> {greedy}")
    for c in chosen:
        print(f"  {c}")


if __name__ == "__main__":
    main()
