#!/bin/bash
# One device call for all of the GPU work: tests/gpu/run.sh, then bench/gpu/run.sh, within a budget
# of BUDGET_S seconds (default 300; the tests get until BLIP2_GPU_TEST_SHARE % of it, default 50;
# steps that would start too late are skipped), everything packed into $OUT/gpu.tgz (the device
# tool brings back only a few files per call) and the two summaries printed. After tests/gpu/prepare.sh here, with ".gpu" carried:
#   bash tests/gpu/session.sh [BUDGET_S]
# BLIP2_GPU_SKIP="step ..." leaves steps out; BLIP2_GPU_ONLY="step ..." runs only those (and the
# build); BLIP2_GPU_OPS=op1,op2 limits the ops step's op table (tests/gpu/deps.sh, run.sh);
# BLIP2_GPU_PICK=1 decides the off-by-default switches first and benches with the winners
# (bench/gpu/run.sh, pick.py).
set -u
cd "$(dirname "$0")/../.." || exit 1
budget=${1:-300}
final=${OUT:-$PWD/.gpu/out}
OUT=$(mktemp -d /tmp/blip2-gpu.XXXXXX)
export OUT
t0=$(date +%s)
BLIP2_GPU_DEADLINE=$((t0 + budget * ${BLIP2_GPU_TEST_SHARE:-50} / 100)) bash tests/gpu/run.sh >"$OUT/tests.txt" 2>&1
BLIP2_GPU_DEADLINE=$((t0 + budget)) bash bench/gpu/run.sh >"$OUT/bench.txt" 2>&1
mkdir -p "$final"
tar czf "$final/gpu.tgz" -C "$OUT" .
cut -c1-300 "$OUT/gpu_summary.txt"
echo "==== bench ($(($(date +%s) - t0)) s in all)"
cut -c1-400 "$OUT/bench.txt"
if [ -s "$OUT/picks.txt" ]; then
  echo "==== switches picked (bench/gpu/pick.py)"
  cat "$OUT/picks.txt"
  echo "==== the comparisons against ours_ab"
  cat "$OUT/compare_ab.txt" 2>/dev/null
fi
echo "==== side by side (bench/gpu/compare.py)"
cat "$OUT/compare.txt" 2>/dev/null
