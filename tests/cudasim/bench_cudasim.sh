#!/bin/bash
# bench/gpu/run.sh's `blip2 bench --engine` on the emulated device, on the tiny fixture config
# (random weights filled on the device): it must finish and report every section. Timings here
# mean nothing.
#   bench_cudasim.sh BLIP2_CUDASIM SHARED_DIR
set -u
BIN=$1
CFG=$2/fixtures/tiny-f16/config.json
err=$(mktemp)
out=$("$BIN" bench --device cuda --dtype f16 --config "$CFG" --random-weights --batch 1,9 --images 1,2 \
  --prompt-len 45 --steps 4 --engine --json 2>"$err")
rc=$?
fail=0
for key in '"device": "cuda"' '"images": \[{"batch": 1' '"decode_ms_per_step"' '"request_16_tokens_ms"' \
  '"engine": \[{"batch": 1' '"batch": 9, "wall_ms"'; do
  grep -q "$key" <<<"$out" || { echo "FAIL: no $key in the output"; fail=1; }
done
[ $rc -eq 0 ] || { echo "FAIL: rc $rc"; cat "$err"; fail=1; }
# bench/gpu/compare.py reads this JSON (as bench/gpu/run.sh's ours.out).
dir=$(mktemp -d)
echo "$out" >"$dir/ours.out"
cmp=$(python3 "$(dirname "$0")/../../bench/gpu/compare.py" "$dir" 2>&1)
grep -q "decode@9 ms" <<<"$cmp" || { echo "FAIL: bench/gpu/compare.py: $cmp"; fail=1; }
rm -rf "$dir"
echo "$(head -c 300 <<<"$out")"
rm -f "$err"
exit $fail
