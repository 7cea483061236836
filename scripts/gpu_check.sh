#!/usr/bin/env bash
# Everything that needs a GPU, in one call (the lent H100 has torch 2.11 + triton 3.6 preinstalled):
# the `gpu`-marked tests, then the benchmarks. Full logs and JSON go to $OUT (default ./out).
#   bash scripts/gpu_check.sh [tests] [w4a16] [w4a16-sweep] [attention] [e2e] [awq]   (default: tests + all benchmarks)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests w4a16 attention e2e awq)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
for part in "${parts[@]}"; do
  echo "=== $part"
  case "$part" in
    tests) $PY -m pytest -q -m gpu -x -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || status=1 ;;
    w4a16) $PY benchmarks/bench_w4a16.py --out "$OUT/w4a16.json" 2>&1 | tee "$OUT/bench_w4a16.log" | tail -30 ;;
    w4a16-sweep) $PY benchmarks/bench_w4a16.py --sweep --out "$OUT/w4a16.json" 2>&1 | tee "$OUT/bench_w4a16.log" | tail -45 ;;
    attention) $PY benchmarks/bench_attention.py --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench_attention.log" | tail -30 ;;
    e2e) $PY benchmarks/bench_e2e.py --out "$OUT/e2e.json" 2>&1 | tee "$OUT/bench_e2e.log" | tail -30 ;;
    awq) $PY benchmarks/bench_awq.py --gpu --out "$OUT/awq_gpu.json" 2>&1 | tee "$OUT/bench_awq.log" | tail -15 ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
exit $status
