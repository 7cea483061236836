#!/usr/bin/env bash
# One device call, several steps, each under its own time limit, so a slow step cannot eat the
# call's 10 minutes and leave the others unrun:
#   bash scripts/device_call.sh "150:tests:python -m pytest -q -m gpu tests/test_w4a16.py" "120:bench:python ..."
# Logs go to $OUT/<name>.log; each step's exit code and time, then the tail of each log (TAIL lines),
# are printed last. A gemlite source tree carried as .gl/ is put on the path (bench_w4a16's peer).
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.gl${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for step in "$@"; do
  secs=${step%%:*}; rest=${step#*:}; name=${rest%%:*}; cmd=${rest#*:}
  start=$(date +%s)
  timeout "$secs" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? $(( $(date +%s) - start ))s"
done
for step in "$@"; do
  rest=${step#*:}; name=${rest%%:*}
  echo "##### $name"; tail -n "${TAIL:-25}" "$OUT/$name.log"
done
