#!/bin/bash
# Drives `blip2 generate` exactly as users and other checks do: the tensor form
# (--pixel-values/--input-ids) and the image form (--image/--prompt) must reproduce the fixture
# cases' input ids and greedy ids; bad arguments must fail with a clear message and exit 1.
set -u
BLIP2=$1
SHARED=$2
FIX=$SHARED/fixtures
pass=0
fail=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*" >&2; }

image_ids() { # n_queries → "50265,...,50265,2"
  local s="" i
  for ((i = 0; i < $1; i++)); do s+="50265,"; done
  echo "${s}2"
}

# model nq pixel-key image prompt prompt-ids greedy-ids
check_case() {
  local model=$1 nq=$2 key=$3 image=$4 prompt=$5 pids=$6 want=$7
  local ids
  ids=$(image_ids "$nq")
  [ -n "$pids" ] && ids="$ids,$pids"
  local want_in="[${ids//,/, }]"
  local out
  out=$("$BLIP2" generate --model "$FIX/$model" --pixel-values "$FIX/pixel_values.safetensors:$key" \
    --input-ids "$ids" --max-new-tokens 12 --json 2>"$tmp/err")
  if [[ "$out" == *"\"output_ids\": [$want]"* && "$out" == *"\"input_ids\": $want_in"* ]]; then ok; else
    bad "$model $key tensor form: $out $(cat "$tmp/err")"; fi
  out=$("$BLIP2" generate --model "$FIX/$model" --image "$FIX/images/$image" --prompt "$prompt" \
    --max-new-tokens 12 --json --dump "$tmp/dump" 2>"$tmp/err")
  if [[ "$out" == *"\"output_ids\": [$want]"* && "$out" == *"\"input_ids\": $want_in"* && "$out" == *'"text": '* ]]; then ok; else
    bad "$model $image image form: $out $(cat "$tmp/err")"; fi
  if [ -s "$tmp/dump/tensors.safetensors" ]; then ok; else bad "$model: --dump wrote nothing"; fi
}

G16="3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421"
check_case tiny-f16 32 chelsea chelsea.png "Question: how many cats are in the picture? Answer:" \
  "45641,35,141,171,10017,32,11,5,2170,116,31652,35" "$G16"
check_case tiny-f16 32 astronaut astronaut.png "Question: what is the man holding? Answer:" \
  "45641,35,99,16,5,313,1826,116,31652,35" "38148, 38148, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421"
check_case tiny-f16 32 coffee coffee.png "" "" \
  "11400, 11400, 11400, 11400, 11400, 11400, 11400, 11400, 11400, 11400, 11400, 11400"
check_case tiny-f16 32 noise_97x61 noise_97x61.png "a photo of" "102,1345,9" \
  "18349, 18349, 18349, 18349, 18349, 18349, 18349, 18349, 18349, 18349, 18349, 18349"
check_case tiny-f16 32 gradient_gray_320x200 gradient_gray_320x200.png "Question: Qu'est-ce que c'est? Answer: café 🚀" \
  "45641,35,3232,108,990,12,1755,1192,740,108,990,116,31652,35,26059,8103,15113,7471" "$G16"
check_case tiny-f32-sharded 8 chelsea chelsea.png "Question: how many cats are in the picture? Answer:" \
  "45641,35,141,171,10017,32,11,5,2170,116,31652,35" \
  "16881, 29682, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841"
check_case tiny-f32-sharded 8 coffee coffee.png "" "" \
  "16881, 16881, 16881, 16881, 16881, 16881, 41841, 41841, 41841, 41841, 41841, 41841"
check_case tiny-f32-sharded 8 gradient_gray_320x200 gradient_gray_320x200.png "Question: Qu'est-ce que c'est? Answer: café 🚀" \
  "45641,35,3232,108,990,12,1755,1192,740,108,990,116,31652,35,26059,8103,15113,7471" \
  "41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841"

# Bad input: exit 1 (2 for usage) and a message that says what is wrong.
expect_error() { # want-substring args...
  local want=$1
  shift
  "$BLIP2" "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -qF -- "$want" "$tmp/err"; then ok; else
    bad "blip2 $*: rc=$rc, stderr: $(cat "$tmp/err") (wanted '$want')"; fi
}
PV="$FIX/pixel_values.safetensors:chelsea"
expect_error "image tokens" generate --model "$FIX/tiny-f32-sharded" --pixel-values "$PV" --input-ids "$(image_ids 7)"
expect_error "image tokens" generate --model "$FIX/tiny-f16" --pixel-values "$PV" --input-ids "$(image_ids 8)"
expect_error "outside the vocabulary" generate --model "$FIX/tiny-f32-sharded" --pixel-values "$PV" --input-ids "$(image_ids 8),99999"
expect_error "comma-separated" generate --model "$FIX/tiny-f32-sharded" --pixel-values "$PV" --input-ids "1,x"
expect_error "no tensor 'nope'" generate --model "$FIX/tiny-f32-sharded" --pixel-values "$FIX/pixel_values.safetensors:nope" --input-ids "$(image_ids 8)"
expect_error "--model DIR is required" generate --input-ids 1
expect_error "config.json: missing" generate --model "$tmp/nowhere" --pixel-values "$PV" --input-ids "$(image_ids 8)"
expect_error "--max-new-tokens" generate --model "$FIX/tiny-f16" --image "$FIX/images/coffee.png" --max-new-tokens 0
expect_error "unknown command" frobnicate
printf 'not an image' >"$tmp/bad.png"
expect_error "image" generate --model "$FIX/tiny-f16" --image "$tmp/bad.png" --prompt "hi"
expect_error "No such file" generate --model "$FIX/tiny-f16" --image "$tmp/absent.png"
printf 'Question: \xff\xfe Answer:' >"$tmp/prompt"
expect_error "UTF-8" generate --model "$FIX/tiny-f16" --image "$FIX/images/coffee.png" --prompt "$(cat "$tmp/prompt")"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
