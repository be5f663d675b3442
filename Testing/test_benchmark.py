"""``gms benchmark`` end to end on a small stack of real BUSI images: both loops run in child processes, the figures
and the per-stage seconds are printed, each stage's GFLOP/s against the peak measured on the same machine, and the
speed-up ceiling follows from them. fp32 on both sides (the exact shortcuts' agreement; on a CPU with bf16 hardware
``auto`` may choose bf16, which is judged by accuracy instead)."""
import re

from conftest import run_gms


def test_benchmark_prints_stages_agreement_and_ceiling(busi_dir):
    p = run_gms("--threads", "2", "benchmark", "--model", "busi-lesion", "--stack", busi_dir, "--size", "128", "128",
                "6", "--batch-size", "4", "--precision", "fp32", check=True)
    out = p.stdout
    loops = dict(re.findall(r"^\s+(ours|reference)\s+6 slices in ([\d.]+) s", out, re.M))
    assert set(loops) == {"ours", "reference"}, out
    # the middle third holds two test lesions: at least those slices have foreground, in both loops
    fg = [int(n) for n in re.findall(r"(\d+) slices with foreground", out)]
    assert len(fg) == 2 and all(2 <= n <= 6 for n in fg), out
    stages = re.findall(r"stages: encoder ([\d.]+) s, lmm ([\d.]+) s, decoder ([\d.]+) s; the rest (-?[\d.]+) s", out)
    assert len(stages) == 2, out
    for (enc, lmm, dec, rest), loop in zip(stages, ("reference", "ours")):
        assert float(enc) > 0 and float(dec) > 0 and float(rest) >= 0
        # four figures printed to 0.1 s, each off by up to 0.05 s (0.7 + 0.2 + 0.8 against 1.6 has happened)
        assert float(enc) + float(lmm) + float(dec) <= float(loops[loop]) + 0.2 + 1e-9
    agree = re.search(r"Dice agreement per label \{\"1\": ([\d.]+)\}", out)
    assert agree and float(agree.group(1)) > 0.99, out
    speed = float(re.search(r"speed-up ([\d.]+)x", out).group(1))
    ceiling = float(re.search(r"encoder seconds = ([\d.]+)x", out).group(1))
    assert ceiling >= speed  # ours takes at least its encoder's time

    # the distance to the roofline: FLOPs counted per stage, against a peak measured in the same run and precision
    peaks = re.findall(r"peak here \(fp32\): matrix product (\d+) GFLOP/s, 64-channel 3x3 convolution (\d+) GFLOP/s", out)
    assert len(peaks) == 2 and all(float(m) > 0 and float(c) > 0 for m, c in peaks), out
    rates = re.findall(r"^\s+(encoder|lmm|decoder): ([\d.]+) GFLOP in ([\d.]+) s = (\d+) GFLOP/s, (\d+)% of the "
                       r"convolution peak", out, re.M)
    assert [r[0] for r in rates] == ["encoder", "lmm", "decoder"] * 2, out
    # the same encoder work on both sides (every slice encoded once, one view); the fast decoder does less work
    enc = [float(r[1]) for r in rates if r[0] == "encoder"]
    dec = [float(r[1]) for r in rates if r[0] == "decoder"]
    assert enc[0] > 0 and abs(enc[0] - enc[1]) <= 0.01 * enc[0] + 0.1, out
    assert dec[0] > 0 and dec[1] <= dec[0], out
