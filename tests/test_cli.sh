#!/bin/bash
# Drives `blip2 generate` exactly as users and other checks do: the tensor form
# (--pixel-values/--input-ids) and the image form (--image/--prompt) must reproduce the fixture
# cases' input ids and greedy ids; bad arguments must fail with a clear message and exit 1.
set -u
BLIP2=$1
SHARED=$2
FIX=$SHARED/fixtures
. "$(dirname "$0")/lib.sh"

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

# Decoding options through the engine: beams reproduce generate_beam3_raw, a seed makes sampling
# repeatable, a stop string ends the answer.
out=$("$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/astronaut.png" \
  --prompt "Question: what is the man holding? Answer:" --num-beams 3 --max-new-tokens 12 --json 2>&1)
if [[ "$out" == *'"output_ids": [38148, 38148, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421]'* ]]; then ok; else
  bad "beam3 tiny-f16 case 1: $out"; fi
out=$("$BLIP2" generate --model "$FIX/tiny-f32-sharded" --image "$FIX/images/chelsea.png" \
  --prompt "Question: how many cats are in the picture? Answer:" --num-beams 3 --max-new-tokens 12 --json 2>&1)
if [[ "$out" == *'"output_ids": [41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841]'* ]]; then ok; else
  bad "beam3 tiny-f32-sharded case 0: $out"; fi
s1=$("$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/chelsea.png" --do-sample --seed 7 --temperature 1.5 --json 2>&1)
s2=$("$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/chelsea.png" --do-sample --seed 7 --temperature 1.5 --json 2>&1)
s3=$("$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/chelsea.png" --do-sample --seed 8 --temperature 1.5 --json 2>&1)
if [ "$s1" == "$s2" ] && [ "$s1" != "$s3" ] && [[ "$s1" == *output_ids* ]]; then ok; else bad "seeded sampling: $s1 / $s2 / $s3"; fi
out=$("$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/chelsea.png" --stop "Solar Solar" --max-new-tokens 10 --json 2>&1)
if [[ "$out" == *'"output_ids": [11400, 11400], "finish_reason": "stop", "text": "Solar Solar"'* ]]; then ok; else bad "stop string: $out"; fi

# A random snapshot of a config's shapes, with the tokenizer copied in, answers like any model dir.
if "$BLIP2" make-random-checkpoint --config "$FIX/tiny-f32-sharded/config.json" --dtype bf16 --out "$tmp/rand" --seed 3 \
  --tokenizer "$SHARED/tokenizer/opt" 2>"$tmp/err"; then ok; else bad "make-random-checkpoint: $(cat "$tmp/err")"; fi
out=$("$BLIP2" generate --model "$tmp/rand" --image "$FIX/images/coffee.png" --prompt "a photo of" --max-new-tokens 3 --json 2>&1)
if [[ "$out" == *'"input_ids": [50265, 50265, 50265, 50265, 50265, 50265, 50265, 50265, 2, 102, 1345, 9]'* && "$out" == *'"text": '* ]]; then ok; else
  bad "generate on the random snapshot: $out"; fi

# The engine benchmark runs on a checkpoint and on random weights of a config.
out=$("$BLIP2" bench --config "$FIX/tiny-f32-sharded/config.json" --random-weights --batch 1,4 --images 1 --steps 2 --json 2>&1)
if [[ "$out" == *'"images_per_s"'* && "$out" == *'"batch": 4, "prefill_ms"'* && "$out" == *'"decode_tokens_per_s"'* ]]; then ok; else
  bad "bench --random-weights: $out"; fi
out=$("$BLIP2" bench --model "$FIX/tiny-f16" --batch 2 --images 1 --steps 2 2>&1)
if [[ "$out" == *"opt batch   2: prefill"* ]]; then ok; else bad "bench --model: $out"; fi
# --engine: whole requests through the serving engine, every one exactly --steps tokens.
out=$("$BLIP2" bench --config "$FIX/tiny-f16/config.json" --random-weights --batch 1,3 --images 1 --steps 4 --engine --json 2>&1)
if [[ "$out" == *'"engine": [{"batch": 1, "wall_ms"'* && "$out" == *'"batch": 3, "wall_ms"'* && "$out" == *'"decode_ms_per_token"'* ]] &&
  echo "$out" | /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); e=d["engine"]; assert all(abs(x["tokens_per_s"]-4*x["requests_per_s"])<1e-2*x["tokens_per_s"] for x in e)'; then ok; else
  bad "bench --engine: $out"; fi
# --num-beams: beam searches of exactly --steps tokens (the best beam's) through the engine.
out=$("$BLIP2" bench --config "$FIX/tiny-f16/config.json" --random-weights --batch 1,3 --images 1 --steps 4 --engine --num-beams 3 --json 2>&1)
if echo "$out" | /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); e=d["engine"]; assert len(e) == 2 and all(x["num_beams"] == 3 and abs(x["tokens_per_s"]-4*x["requests_per_s"])<1e-2*x["tokens_per_s"] for x in e)'; then ok; else
  bad "bench --engine --num-beams 3: $out"; fi

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
if ! nvidia-smi -L >/dev/null 2>&1; then # no GPU (or no CUDA build): a clear error, not a crash
  expect_error "--device cuda" bench --model "$FIX/tiny-f16" --device cuda
  expect_error "--device cuda" generate --model "$FIX/tiny-f16" --image "$FIX/images/coffee.png" --device cuda
fi
expect_error "cpu or cuda" bench --model "$FIX/tiny-f16" --device tpu
expect_error "--dtype" generate --model "$FIX/tiny-f16" --image "$FIX/images/coffee.png" --dtype f8
expect_error "--random-weights" bench --config "$FIX/tiny-f16/config.json"
expect_error "--num-beams" generate --model "$FIX/tiny-f16" --image "$FIX/images/coffee.png" --num-beams 0
expect_error "num_return_sequences" generate --model "$FIX/tiny-f16" --image "$FIX/images/coffee.png" --num-beams 2 --num-return-sequences 3
expect_error "--top-p" generate --model "$FIX/tiny-f16" --image "$FIX/images/coffee.png" --do-sample --top-p 1.5
printf 'not an image' >"$tmp/bad.png"
expect_error "image" generate --model "$FIX/tiny-f16" --image "$tmp/bad.png" --prompt "hi"
expect_error "No such file" generate --model "$FIX/tiny-f16" --image "$tmp/absent.png"
printf 'Question: \xff\xfe Answer:' >"$tmp/prompt"
expect_error "UTF-8" generate --model "$FIX/tiny-f16" --image "$FIX/images/coffee.png" --prompt "$(cat "$tmp/prompt")"

summary
