#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU and a CUDA build of PyTorch (under 8 minutes on one H100):
# the CUDA tests (Testing/test_cuda.py: accuracy against the CPU, the command line and the warm worker on the GPU,
# training steps) and `gms benchmark --device cuda` on the CT-sized volume, CUDA autocast and fp32.
#
#   bash benchmarks/gpu_check.sh                 on a machine that has the project's packages and ../shared
#
# The device machines lent to developers have PyTorch but not SimpleITK, and ../shared does not travel there. Stage
# what they lack first, here, into two folders git ignores (each under the 64 MiB a call carries), then run twice:
#
#   bash benchmarks/gpu_check.sh --stage         here: .gpu-whl/ (the SimpleITK wheel) and .gpu/ (weights, data)
#   device run, carry [".gpu-whl"]:  bash benchmarks/gpu_check.sh --install
#   device run, carry [".gpu"]:      bash benchmarks/gpu_check.sh        (on the same warm machine)
#
# Figures go to $OUT (gpu_check.log) when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/gms-site
case "${1:-}" in
--stage)
  set -e
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  grep -qx '/.gpu-whl/' .git/info/exclude 2>/dev/null || echo '/.gpu-whl/' >> .git/info/exclude
  S=${GMS_SHARED:-../shared}
  rm -rf .gpu .gpu-whl && mkdir -p .gpu/shared/models .gpu/shared/data/busi/images .gpu/shared/data/busi/masks \
    .gpu/shared/data/hippocampus/imagesTr .gpu/shared/data/hippocampus/labelsTr .gpu-whl
  cp -r "$S/models/taef2" .gpu/shared/models/
  python3 - "$S" <<'EOF'
import json, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]) / "data", Path(".gpu/shared/data")
split = json.loads((src / "busi" / "split.json").read_text())
keep = {"train": sorted(split["train"])[:20], "test": sorted(split["test"])[:20]}
(dst / "busi" / "split.json").write_text(json.dumps(keep))
for name in keep["train"] + keep["test"]:
    for sub in ("images", "masks"):
        shutil.copy(src / "busi" / sub / f"{name}.png", dst / "busi" / sub)
hip = src / "hippocampus"
for f in sorted((hip / "imagesTr").glob("*.nii.gz"))[:1] + [hip / "imagesTr" / "hippocampus_025.nii.gz"]:
    shutil.copy(f, dst / "hippocampus" / "imagesTr")
    shutil.copy(hip / "labelsTr" / f.name, dst / "hippocampus" / "labelsTr")
for f in hip.glob("*.json"):
    shutil.copy(f, dst / "hippocampus")
EOF
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-whl "SimpleITK==2.5.7"
  du -sh .gpu .gpu-whl
  exit 0 ;;
--install)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu-whl/*.whl
  exit $? ;;
esac

LOG=${OUT:-/tmp}/gpu_check.log
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD/GMSSegment${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .gpu/shared ] && export GMS_SHARED="$PWD/.gpu/shared"
export GMS_SHARED=${GMS_SHARED:-$(realpath ../shared)}
export GMS_WEIGHTS_DIR="$GMS_SHARED/models"
PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=.venv/bin/python
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  timeout 300 $PY -m pytest -q -p no:cacheprovider -s Testing/test_cuda.py
  for precision in auto fp32; do
    timeout 120 $PY -m GMSSegmentLib benchmark --model hippocampus --device cuda --precision "$precision"
  done
} 2>&1 | tee "$LOG"
