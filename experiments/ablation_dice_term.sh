#!/usr/bin/env bash
# Ablation of a training-cost choice: the decoded-Dice term (back-propagated through the frozen decoder on 2 of 8
# samples per batch) against latent MSE only, on BUSI, with the same 20-minute budget, the same latent cache and one
# thread each (run it beside other work on a 2-core machine, or alone: both arms get the same conditions).
# Prints the validation history of each arm and the test DSC / IoU at 224x224 (the paper's protocol).
#   bash experiments/ablation_dice_term.sh [OUT_DIR] [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ablation}
MIN=${2:-20}
CACHE=${CACHE:-$OUT/cache}  # the latent cache (about 30 min to build once; keyed by data and settings, so shareable)
GMS=${GMS:-.venv/bin/gms}
export GMS_WEIGHTS_DIR=${GMS_WEIGHTS_DIR:-../shared/models} OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT"
for d in 2 0; do
  "$GMS" --threads 1 train ../shared/data/busi -o "$OUT/dice$d" --progress none --segments lesion --augment-copies 4 \
    --epochs 300 --warmup-epochs 2 --dice-samples "$d" --val-every 2 --max-minutes "$MIN" \
    --cache-dir "$CACHE" > "$OUT/dice$d.log" 2>&1
done
for d in 2 0; do
  echo "== dice-samples $d: $(python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['training']; \
print('epochs', len(t['history']), 'train s', t['total_seconds'], 'best val', max(h.get('val_dice', 0) for h in t['history']))" "$OUT/dice$d/card.json")"
  "$GMS" --threads 1 evaluate ../shared/data/busi --progress none --model "$OUT/dice$d" --list test --resolution model \
    --csv "$OUT/dice$d-test.csv"
done
