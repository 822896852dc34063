#!/bin/bash
# Tensor parallelism under mpirun: the same CLI with N ranks must give the goldens' greedy ids
# and prefill logits (rel L2 <= 2e-6), for N = 1, 2, 4 on tiny-f16 (4 heads) and N = 1, 3 on
# tiny-f32-sharded (3 heads); a degree that does not divide the heads is a clear startup error.
set -u
BLIP2=$1
CHECK_DUMP=$2
SHARED=$3
MPIRUN=${4:-mpirun}
FIX=$SHARED/fixtures
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
. "$(dirname "$0")/lib.sh"

# np model nq case pixel-key prompt-ids greedy
run_case() {
  local np=$1 model=$2 nq=$3 case=$4 key=$5 pids=$6 want=$7
  local ids
  ids=$(image_ids "$nq")
  [ -n "$pids" ] && ids="$ids,$pids"
  rm -rf "$tmp/dump"
  local out
  out=$(timeout 120 "$MPIRUN" -np "$np" "$BLIP2" generate --model "$FIX/$model" \
    --pixel-values "$FIX/pixel_values.safetensors:$key" --input-ids "$ids" --max-new-tokens 12 --json \
    --dump "$tmp/dump" 2>"$tmp/err")
  if [[ "$out" == *"\"output_ids\": [$want]"* ]]; then ok; else bad "np $np $model case $case: $out $(cat "$tmp/err")"; fi
  if "$CHECK_DUMP" "$tmp/dump/tensors.safetensors" "$FIX/$model/golden.safetensors" "$case" >"$tmp/cmp" 2>&1; then ok; else
    bad "np $np $model case $case dump: $(cat "$tmp/cmp")"; fi
  local shards
  shards=$(grep -c "OPT shard" "$tmp/err")
  if [ "$np" -eq 1 ] || [ "$shards" -eq "$np" ]; then ok; else bad "np $np: $shards rank reports"; fi
}

G0="3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421"
G1="38148, 38148, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421"
for np in 1 2 4; do
  run_case "$np" tiny-f16 32 0 chelsea "45641,35,141,171,10017,32,11,5,2170,116,31652,35" "$G0"
  run_case "$np" tiny-f16 32 1 astronaut "45641,35,99,16,5,313,1826,116,31652,35" "$G1"
done
S0="16881, 29682, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841, 41841"
S2="16881, 16881, 16881, 16881, 16881, 16881, 41841, 41841, 41841, 41841, 41841, 41841"
for np in 1 3; do
  run_case "$np" tiny-f32-sharded 8 0 chelsea "45641,35,141,171,10017,32,11,5,2170,116,31652,35" "$S0"
  run_case "$np" tiny-f32-sharded 8 2 coffee "" "$S2"
done

# Beams and seeded sampling gather the full distribution from the vocab slices: same answers.
B1="38148, 38148, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421"
for np in 2 4; do
  out=$(timeout 120 "$MPIRUN" -np "$np" "$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/astronaut.png" \
    --prompt "Question: what is the man holding? Answer:" --num-beams 3 --max-new-tokens 12 --json 2>"$tmp/err")
  if [[ "$out" == *"\"output_ids\": [$B1]"* ]]; then ok; else bad "beam3 np $np: $out $(cat "$tmp/err")"; fi
done
s1=$(timeout 120 "$MPIRUN" -np 1 "$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/chelsea.png" --do-sample --seed 5 --json 2>/dev/null)
s2=$(timeout 120 "$MPIRUN" -np 2 "$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/chelsea.png" --do-sample --seed 5 --json 2>/dev/null)
if [ -n "$s1" ] && [ "$s1" == "$s2" ]; then ok; else bad "seeded sampling np 1 vs 2: $s1 / $s2"; fi

# A repetition penalty is applied by each rank to its vocab slice (the step carries every row's
# distinct history ids): transformers' greedy_reppen answer (tests/goldens/decoding.json) at
# every degree, and a penalised seeded sample equal at 1 and 2 ranks.
R1="38148, 3421, 3421, 3421, 3421, 1799, 10652, 47655, 11400, 20648, 12476, 6602"
for np in 1 2 4; do
  out=$(timeout 120 "$MPIRUN" -np "$np" "$BLIP2" generate --model "$FIX/tiny-f16" \
    --pixel-values "$FIX/pixel_values.safetensors:astronaut" \
    --input-ids "$(image_ids 32),45641,35,99,16,5,313,1826,116,31652,35" --repetition-penalty 1.5 --max-new-tokens 12 \
    --json 2>"$tmp/err")
  if [[ "$out" == *"\"output_ids\": [$R1]"* ]]; then ok; else bad "repetition penalty np $np: $out $(cat "$tmp/err")"; fi
done
# Beams: log-probabilities from each slice's (max, sum) pairs, the penalty applied to them
# (beam3_reppen_noeos; without the penalty the answer is B1's).
RB="3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421, 3421"
for np in 2 4; do
  out=$(timeout 120 "$MPIRUN" -np "$np" "$BLIP2" generate --model "$FIX/tiny-f16" \
    --pixel-values "$FIX/pixel_values.safetensors:astronaut" --input-ids "$(image_ids 32),45641,35,99,16,5,313,1826,116,31652,35" \
    --num-beams 3 --repetition-penalty 1.3 --max-new-tokens 12 --json 2>"$tmp/err")
  if [[ "$out" == *"\"output_ids\": [$RB]"* ]]; then ok; else bad "beam3 + repetition penalty np $np: $out $(cat "$tmp/err")"; fi
done
p1=$(timeout 120 "$MPIRUN" -np 1 "$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/chelsea.png" --do-sample --seed 5 \
  --repetition-penalty 1.3 --json 2>/dev/null)
p2=$(timeout 120 "$MPIRUN" -np 2 "$BLIP2" generate --model "$FIX/tiny-f16" --image "$FIX/images/chelsea.png" --do-sample --seed 5 \
  --repetition-penalty 1.3 --json 2>/dev/null)
if [ -n "$p1" ] && [ "$p1" == "$p2" ] && [ "$p1" != "$s1" ]; then ok; else bad "penalised sampling np 1 vs 2: $p1 / $p2 (unpenalised $s1)"; fi

# 2 ranks do not divide 3 heads: a clear error, exit 1, no hang.
timeout 60 "$MPIRUN" -np 2 "$BLIP2" generate --model "$FIX/tiny-f32-sharded" \
  --pixel-values "$FIX/pixel_values.safetensors:coffee" --input-ids "$(image_ids 8)" >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "does not divide the OPT head count 3" "$tmp/err"; then ok; else
  bad "np 2 on 3 heads: rc=$rc $(cat "$tmp/err")"; fi

# A bad request seen by rank 0 only (a missing pixel tensor) stops every rank with its message.
timeout 60 "$MPIRUN" -np 2 "$BLIP2" generate --model "$FIX/tiny-f16" \
  --pixel-values "$FIX/pixel_values.safetensors:nope" --input-ids "$(image_ids 32)" >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "rank 0: .*no tensor 'nope'" "$tmp/err"; then ok; else
  bad "rank-0 input error: rc=$rc $(cat "$tmp/err")"; fi

summary
