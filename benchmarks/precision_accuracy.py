"""Is bf16 as accurate as fp32 for a model? Runs ``gms evaluate`` on the model's held-out list twice, in fp32 and in
bf16 (each with the model's own inference options), and prints the paired difference of per-case DSC (bf16 minus
fp32, in DSC points) with its standard error, per segment. bf16 passes when every segment's mean difference is at
least the bar (``pipeline.BF16_BAR``, -0.3). With ``--record`` the verdict goes into the model card's ``precision``
(``cpu_bf16``: whether ``--precision auto`` may run the model in bf16 on CPUs that multiply bf16 natively).

    python benchmarks/precision_accuracy.py ../shared/data/busi --model busi-lesion --list test [--record]
    python benchmarks/precision_accuracy.py DATA --model M --list L --fp32-csv a.csv --bf16-csv b.csv  (runs done)

On a CPU without bf16 hardware bf16 is emulated (about 4.5 times slower): the accuracy is the same, only the time is.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from click_latency import cpu_kind  # noqa: E402
from paired_difference import differences, read  # noqa: E402


def evaluate(data: str, model: str, list_name: str, precision: str, csv_path: str, threads: int | None) -> None:
    cmd = [sys.executable, "-m", "GMSSegmentLib", *(["--threads", str(threads)] if threads else []), "evaluate", data,
           "--model", model, "--list", list_name, "--precision", precision, "--csv", csv_path, "--progress", "none"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--model", required=True)
    ap.add_argument("--list", required=True, help="the model's held-out list (test, or val where the card says so)")
    ap.add_argument("--fp32-csv", help="an earlier `gms evaluate --precision fp32 --csv` of the same list")
    ap.add_argument("--bf16-csv", help="an earlier `gms evaluate --precision bf16 --csv` of the same list")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--record", action="store_true", help="write the verdict into the model card's 'precision'")
    args = ap.parse_args(argv)

    from GMSSegmentLib.evaluate import _update_card
    from GMSSegmentLib.model import resolve_model_path
    from GMSSegmentLib.pipeline import BF16_BAR

    with tempfile.TemporaryDirectory() as tmp:
        csvs = {}
        for precision in ("fp32", "bf16"):
            given = getattr(args, f"{precision}_csv")
            csvs[precision] = given or os.path.join(tmp, f"{precision}.csv")
            if not given:
                evaluate(args.data, args.model, args.list, precision, csvs[precision], args.threads)
        fp32, bf16 = read(csvs["fp32"]), read(csvs["bf16"])
    if set(fp32) != set(bf16):
        raise SystemExit("the two evaluations hold different cases")
    rows, ok = {}, True
    for segment in sorted({s for _, s in fp32}):
        d = differences(fp32, bf16, segment, "dice")
        se = float(d.std(ddof=1) / d.size ** 0.5) if d.size > 1 else 0.0
        keys = [k for k in fp32 if k[1] == segment]
        mean32 = 100 * sum(float(fp32[k]["dice"]) for k in keys) / len(keys)
        rows[segment] = {"cases": int(d.size), "fp32_dice": round(mean32, 2), "bf16_dice": round(mean32 + d.mean(), 2),
                         "difference": round(float(d.mean()), 3), "se": round(se, 3),
                         "better": int((d > 0).sum()), "worse": int((d < 0).sum())}
        ok = ok and float(d.mean()) >= BF16_BAR
        r = rows[segment]
        print(f"{segment}: {r['cases']} cases, DSC fp32 {r['fp32_dice']:.2f}, bf16 {r['bf16_dice']:.2f}, paired "
              f"difference {r['difference']:+.2f} ± {r['se']:.2f} ({r['better']} better, {r['worse']} worse)")
    print(f"bf16 {'passes' if ok else 'fails'} the bar (every mean difference >= {BF16_BAR}); CPU: {cpu_kind()}")
    if args.record:
        folder = Path(resolve_model_path(args.model))

        def change(card):
            card.precision = {
                "cpu_bf16": ok, "bar": BF16_BAR, "data": Path(args.data).name, "list": args.list, "segments": rows,
                "measured_on": cpu_kind(), "date": datetime.date.today().isoformat(),
                "command": f"python benchmarks/precision_accuracy.py {args.data} --model {args.model} "
                           f"--list {args.list}"}
        _update_card(folder, change)
        print(f"recorded in {folder / 'card.json'}: cpu_bf16 = {str(ok).lower()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
