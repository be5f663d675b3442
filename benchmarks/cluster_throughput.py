"""Items per second of ``gms segment --jobs`` on one machine against ``--cluster ray`` with 1 and 2 actors, on the same
items of real data (BUSI test images by default), each run a fresh process, so the cluster's start (Ray, the actors
loading the model) is counted as a user pays it. Also the figures without the start: the time from the first result to
the last. On a 2-core machine this shows the overhead of the cluster, not a speed-up (two actors of one thread each
against one process with two threads).

    python benchmarks/cluster_throughput.py [--items 16] [--model busi-lesion] [--data ../shared/data/busi]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from click_latency import cpu_kind  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run(jobs: Path, model: str, extra: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "GMSSegmentLib", *extra[:2], "segment", "--jobs", str(jobs), "--model", model,
           "--progress", "json", "--overwrite", *extra[2:]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    total = time.perf_counter() - t0
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    results = [e for e in events if e["event"] == "result"]
    return {"seconds": total, "items": len(results)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--model", default="busi-lesion")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "busi"))
    args = ap.parse_args(argv)
    split = json.loads((Path(args.data) / "split.json").read_text())
    images = [Path(args.data) / "images" / f"{n}.png" for n in sorted(split["test"])[:args.items]]
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "GMSSegment"), env.get("PYTHONPATH", "")])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = Path(tmp) / "jobs.json"
        jobs.write_text(json.dumps([{"input": str(p), "output": str(Path(tmp) / f"o{k}.png")}
                                    for k, p in enumerate(images)]))
        cores = os.cpu_count() or 1
        for label, extra in ((f"one machine ({cores} threads)", ["--threads", str(cores)]),
                             ("Ray, 1 actor (1 thread)", ["--threads", "1", "--cluster", "ray", "--actors", "1"]),
                             (f"Ray, {cores} actors (1 thread each)",
                              ["--threads", "1", "--cluster", "ray", "--actors", str(cores)])):
            r = run(jobs, args.model, extra, env)
            rows.append((label, r))
            print(f"{label}: {r['items']} items in {r['seconds']:.1f} s = {r['items'] / r['seconds']:.2f} items/s",
                  flush=True)
    print(f"CPU: {cpu_kind()}; model {args.model}; {len(images)} images of {Path(args.data).name}")
    base = rows[0][1]["items"] / rows[0][1]["seconds"]
    print("| run | seconds | items/s | vs one machine |\n|---|---|---|---|")
    for label, r in rows:
        rate = r["items"] / r["seconds"]
        print(f"| {label} | {r['seconds']:.1f} | {rate:.2f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
