#!/usr/bin/env bash
# The GPU check, one command, from a checkout (no install, no network, no model hub): an environment
# report, the test files that take a `device` fixture run on cuda, correctness of the engine on the GPU
# (greedy vs transformers, CUDA graphs / compiled vs eager, bf16 vs fp32), and decode speed on random
# weights of real shapes per mode (eager, CUDA graphs, compiled, FP8 weights, FP8 KV) with achieved GB/s
# against the card's bandwidth. Budget: <= 8 minutes on one H100. Writes OUT_DIR/gpu-check.json (+ .jsonl
# as it goes, a time-out keeps what was done), OUT_DIR/summary.md, OUT_DIR/device-tests.txt.
#
#   scripts/gpu_check.sh [--out-dir DIR] [--dry-run]     # --dry-run: on the CPU, tiny sizes, end to end
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=gpu-check
device=cuda
dry=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) device=cpu; dry=(--dry-run) ;;
    --out-dir) out_dir="$2"; shift ;;
    *) echo "usage: $0 [--out-dir DIR] [--dry-run]" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python}
command -v "$python" >/dev/null || python=python3
# No speed mode starts past 6.5 minutes (--budget-s); 8 minutes is the hard stop.
exec env PYTHONPATH=src timeout 480 "$python" -m tinyserve_lab.cuda_check --device "$device" --out-dir "$out_dir" --budget-s 390 ${dry[@]+"${dry[@]}"}
