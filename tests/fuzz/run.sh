#!/bin/bash
# Smoke-fuzz every target for SECONDS each, seeded from the fixtures. Any crash, leak or
# sanitizer report fails the run (libFuzzer exits non-zero and leaves the input as crash-*).
set -euo pipefail
BIN=$(cd "$1" && pwd)
SHARED=$2
SECONDS_EACH=${3:-45}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

seed() { # target files...
  local dir=$work/$1
  shift
  mkdir -p "$dir"
  cp "$@" "$dir"/ 2>/dev/null || true
}
FIX=$SHARED/fixtures
seed fuzz_image "$FIX"/images/noise_97x61.png "$FIX"/images/gradient_gray_320x200.png "$FIX"/inputs/images/*.jpg
seed fuzz_tokenizer
printf 'Question: what is this? Answer:' >"$work/fuzz_tokenizer/q"
printf "Qu'est-ce que c'est? caf\xc3\xa9 \xf0\x9f\x9a\x80 \xe3\x80\x80a" >"$work/fuzz_tokenizer/u"
seed fuzz_safetensors "$FIX"/tiny-f32-sharded/model-00002-of-00002.safetensors
seed fuzz_config "$FIX"/tiny-f16/config.json "$FIX"/tiny-f32-sharded/config.json "$SHARED"/hub/blip2-opt-2.7b/config.json

for t in fuzz_image fuzz_tokenizer fuzz_safetensors fuzz_config; do
  echo "-- $t (${SECONDS_EACH}s)"
  (cd "$work" && BLIP2_SHARED_DIR="$SHARED" "$BIN/$t" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 \
    -max_len=1048576 -timeout=20 -print_final_stats=1 "$work/$t" 2>&1 | tail -n 8)
done
echo "fuzz smoke: all targets ran clean"
