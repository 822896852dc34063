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

# GenerateRequest seeds: packed by Debian's python3-protobuf from stubs protoc makes here.
seed fuzz_request
if [ -x "$BIN/fuzz_request" ] && protoc -I"$(dirname "$0")/../../proto" --python_out="$work" blip2.proto 2>/dev/null; then
  /usr/bin/python3 - "$work" "$FIX" <<'PYEOF' || true
import sys
sys.path.insert(0, sys.argv[1])
import blip2_pb2 as b
img = open(sys.argv[2] + "/images/noise_97x61.png", "rb").read()
reqs = [b.GenerateRequest(image=img, prompt="Question: what is this? Answer:", max_new_tokens=12),
        b.GenerateRequest(image=img, prompts=["a photo of", ""], decoding=b.DecodingParams(num_beams=3, stop=["\n"])),
        b.GenerateRequest(image=img[:100], prompt="caf\u00e9", decoding=b.DecodingParams(do_sample=True, top_p=0.9, seed=3))]
for i, r in enumerate(reqs):
    open("%s/fuzz_request/seed%d" % (sys.argv[1], i), "wb").write(r.SerializeToString())
PYEOF
fi

for t in fuzz_image fuzz_tokenizer fuzz_safetensors fuzz_config fuzz_request; do
  [ -x "$BIN/$t" ] || { echo "-- $t: not built (needs BLIP2_GRPC for the protobuf code)"; continue; }
  echo "-- $t (${SECONDS_EACH}s)"
  (cd "$work" && BLIP2_SHARED_DIR="$SHARED" "$BIN/$t" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 \
    -max_len=1048576 -timeout=20 -print_final_stats=1 "$work/$t" 2>&1 | tail -n 8)
done
echo "fuzz smoke: all targets ran clean"
