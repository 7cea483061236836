#!/usr/bin/env bash
# Everything that needs a GPU, in one call (the lent H100/H200 machines have torch 2.11 + triton 3.6 preinstalled):
# the `gpu`-marked tests, then the benchmarks, each against its baseline in the same run.
#   bash scripts/gpu_check.sh [tests] [w4a16] [w4a16-sweep] [w8a8] [attention] [e2e] [warm-start] [vlm] [awq]
#                             [profile] [heads] [prefill] [paired] [tower] [w8a8-tower]
#   (default: all but the sweep, the decode profile, the output-head sweep, the prefill plans, the
#   paired-input comparison, the tower profile and the tower's int8 GEMM sweep)
# Results: $OUT (default ./out): <part>.json per benchmark, gpu_check.log with every log; each
# part's summary table is printed again at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests w4a16 w8a8 attention e2e warm-start vlm awq)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$LOG"
status=0
summary=()
run() {  # run NAME TAIL_LINES CMD...: log everything, keep the last lines for the summary
  local name=$1 lines=$2; shift 2
  echo "=== $name" | tee -a "$LOG"
  "$@" > "$OUT/.part.log" 2>&1
  local rc=$?
  cat "$OUT/.part.log" >> "$LOG"
  summary+=("=== $name (exit $rc)" "$(tail -n "$lines" "$OUT/.part.log")")
  rm -f "$OUT/.part.log"
  return $rc
}
for part in "${parts[@]}"; do
  case "$part" in
    tests) run tests 4 $PY -m pytest -q -m gpu -p no:cacheprovider tests || status=1 ;;
    w4a16) run w4a16 8 $PY benchmarks/bench_w4a16.py --out "$OUT/w4a16.json" || status=1 ;;
    w4a16-sweep) run w4a16-sweep 16 $PY benchmarks/bench_w4a16.py --sweep --out "$OUT/w4a16.json" || status=1 ;;
    attention) run attention 12 $PY benchmarks/bench_attention.py --out "$OUT/attention.json" || status=1 ;;
    e2e) run e2e 30 $PY benchmarks/bench_e2e.py --out "$OUT/e2e.json" || status=1 ;;
    awq) run awq 8 $PY benchmarks/bench_awq.py --gpu --out "$OUT/awq_gpu.json" || status=1 ;;
    warm-start)  # two processes in a row: the second reuses Triton's disk cache
      run warm-start-1 2 $PY benchmarks/bench_warm_start.py --out "$OUT/warm_start_1.json" || status=1
      run warm-start-2 2 $PY benchmarks/bench_warm_start.py --out "$OUT/warm_start_2.json" || status=1 ;;
    w8a8) run w8a8 16 $PY benchmarks/bench_w8a8.py --out "$OUT/w8a8.json" || status=1 ;;
    vlm) run vlm 12 $PY benchmarks/bench_vlm.py --out "$OUT/vlm.json" || status=1 ;;
    profile) run profile 40 $PY scripts/profile_decode.py --models smollm2,llama3-8b --precision w4a16 --steps 50 \
      || status=1 ;;
    paired)  # decode with the GEMV inputs natural and paired (PAIRED_DECODE), same process
      run paired-tests 4 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_w4a16.py tests/test_fused_decode.py \
        tests/test_decode_attention.py -k "gemv or fused or paired or decode" || status=1
      run paired 8 $PY scripts/profile_decode.py --models llama3-8b,smollm2 --precision w4a16 --steps 50 \
        --paired off,on --out "$OUT/paired.json" || status=1 ;;
    tower)  # the row kernels and the W8A8 tower on the GPU, then the tower's kernel table
      run tower-tests 4 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_int8_quant.py \
        tests/test_vision_w8a8.py || status=1
      run tower 60 $PY scripts/profile_tower.py --out "$OUT/tower_profile.json" || status=1 ;;
    w8a8-tower)  # the int8 GEMM configs swept on the SigLIP tower's linears at 17 tiles
      run w8a8-tower 16 $PY benchmarks/bench_w8a8.py --shapes siglip-so400m --ms 17408 --sweep \
        --sweep-buckets none --out "$OUT/w8a8_tower.json" || status=1 ;;
    heads) run heads 12 $PY benchmarks/bench_dense_gemv.py --sweep-heads --out "$OUT/heads.json" || status=1 ;;
    prefill) run prefill 12 $PY scripts/profile_prefill.py --lengths 1074,2048,3122,4096 \
      --plans 2048:256,4096:256:auto --out "$OUT/prefill.json" || status=1 ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
done
printf '%s\n' "${summary[@]}"
exit $status
