#!/bin/bash
# GPU benchmark of issue 8, one unattended run (about 3 minutes on an H100 after the build of
# tests/gpu/run.sh): ours vs HF transformers fp16 vs the cuBLAS GEMM-only floor, same card, same
# run. From the repository root on the GPU machine, after tests/gpu/prepare.sh here:
#   bash bench/gpu/run.sh      # JSON + logs under $OUT (default .gpu/out); tests/gpu/session.sh runs both
# Ours: `blip2 bench --device cuda --dtype f16` on random weights of the real blip2-opt-2.7b config
# (../shared/hub), prompt 45, 32 decode steps, batches 1..256, vision+Q-Former at 1 and 64, one
# request with 16 new tokens, and (--engine) B whole requests per batch through the serving engine
# (image, prompt, 32 forced tokens: HF generate's workload, scheduling and sampling included), the
# same with 5 beams at B = 1, 8, 32; HF via hf_baseline.py; the floor via
# ../shared/tools/gemm_floor.py; ncu's per-kernel times of a decode step at batch 64 and of vision
# at 64 images (ncu_summary.py); the op perf tables (GEMV bandwidth at T=1, the paged attention at
# decode batch 256, the encoders' attention both ways). Side by side with their switches off: the
# mma encoder attention (ours_products), the block-per-row paged attention (ours_paged_v,
# ops_perf_paged_v), programmatic dependent launch (ours_nopdl), the 16-bit matmul outputs
# (ours_out16off), the fused KV write (ours_kvwrite) and the norm inside the one-row GEMV
# (ours_fusedln_off, ours_lnrows1/2); and, off by default, the encoders' attention by cp.async and
# ldmatrix (ours_fa, ops_perf_attention_fa) and the one-row GEMV as warps over rows (ours_gemvwarp,
# ops_perf_gemv_warp). RESULTS.md lists what each of them has to show. BLIP2_GPU_PICK=1 runs the
# comparisons of the switches that are off by default first and times the rest with the winners
# (bench/gpu/pick.py), so that one call both decides them and publishes the table.
set -u
cd "$(dirname "$0")/../.." || exit 1
SHARED=${SHARED:-$PWD/.gpu/shared}
OUT=${OUT:-$PWD/.gpu/out}
BUILD=${BUILD:-build-gpu}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
. tests/gpu/deps.sh
blip2_gpu_deps
[ -x "$BUILD/blip2" ] || {
  # shellcheck disable=SC2086 # BLIP2_DEPS_CMAKE: empty, or one -D option
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBLIP2_GRPC=OFF -DBLIP2_CUDASIM=OFF -DBLIP2_SHARED_DIR="$SHARED" \
    $BLIP2_DEPS_CMAKE >"$OUT/bench_build.log" 2>&1
  cmake --build "$BUILD" -j"$(nproc)" --target blip2 test_ops >>"$OUT/bench_build.log" 2>&1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
CFG=$SHARED/hub/blip2-opt-2.7b/config.json
BENCH=("$BUILD/blip2" bench --device cuda --dtype f16 --config "$CFG" --random-weights --prompt-len 45)
# bench_step name cap_s command...: stdout to $OUT/name.out, stderr to $OUT/name.err;
# BLIP2_GPU_DEADLINE caps the steps (tests/gpu/deps.sh), most wanted first.
# With BLIP2_GPU_PICK=1 the switch comparisons run first, bench/gpu/pick.py chooses the winners
# (written to picked.env, its reasons to picks.txt), and every later step runs with them set (PICK):
# the published table then times the picked switches, in the same call. A step runs once.
PICK=()
DONE=" "
bench_step() {
  local name=$1 t t0=$SECONDS
  case "$DONE" in *" $name "*) return ;; esac
  DONE="$DONE$name "
  t=$(blip2_gpu_cap "$2")
  shift 2
  blip2_gpu_skipped "$name" && { echo "$name: skipped (BLIP2_GPU_SKIP)"; return; }
  [ -z "$t" ] && { echo "$name: skipped, no time left"; return; }
  timeout "$t" env ${PICK[@]+"${PICK[@]}"} "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  echo "$name: rc $? in $((SECONDS - t0)) s${PICK[*]:+ (with ${PICK[*]})}: $(head -c 500 "$OUT/$name.out")"
}
# The switch comparisons whose winners bench/gpu/pick.py may choose (its GROUPS), each against ours_ab.
switch_steps() {
  # The same without the engine and the small batches: the base of a call that only compares
  # switches (BLIP2_GPU_ONLY="ours_ab ours_fa ..."; compare.py takes it when there is no ours).
  bench_step ours_ab 60 "${BENCH[@]}" --batch 1,32,64 --images 1,64 --steps 32 --json
  # Decode at batch 1 with each LayerNorm its own kernel before the GEMV (BLIP2_FUSED_LN=0) instead
  # of the norm inside the GEMV (k_gemv_ln), and the fused GEMV with 1 and 2 weight rows a block
  # (BLIP2_GEMV_LN_ROWS; default 4).
  bench_step ours_fusedln_off 40 env BLIP2_FUSED_LN=0 "${BENCH[@]}" --batch 1 --images none --steps 32 --json
  bench_step ours_lnrows1 40 env BLIP2_GEMV_LN_ROWS=1 "${BENCH[@]}" --batch 1 --images none --steps 32 --json
  bench_step ours_lnrows2 40 env BLIP2_GEMV_LN_ROWS=2 "${BENCH[@]}" --batch 1 --images none --steps 32 --json
  # The one-row GEMVs as warps over weight rows (k_gemv_w: the row staged once a block, no barrier
  # after it, a few hundred blocks instead of 2560 to 10240), the LayerNorm in its staging.
  bench_step ours_gemvwarp 40 env BLIP2_GEMV_WARP=1 "${BENCH[@]}" --batch 1 --images none --steps 32 --json
  # Vision with 16-bit q, k, v into the mma attention (BLIP2_QKV16=1; run 8: its kernel 0.67 against
  # 0.39 ms a layer on fp32 ones, so the default keeps them fp32).
  bench_step ours_qkv16 45 env BLIP2_QKV16=1 "${BENCH[@]}" --batch 1 --images 1,64 --steps 2 --json
  # The same 16-bit q, k, v into attention_fa.cu's kernel (cp.async, ldmatrix, 64-key tiles), next
  # to ours' (the mma kernel on fp32 q, k, v) and ours_qkv16's (the mma kernel on 16-bit ones).
  bench_step ours_fa 45 env BLIP2_QKV16=1 BLIP2_ATTN_FA=1 "${BENCH[@]}" --batch 1 --images 1,64 --steps 2 --json
  # The warp-per-head paged attention from 512 (head, sequence) pairs instead of 4096 (batch 16 up on
  # OPT-2.7b's 32 heads): batches 32 and 64 take the block-per-row kernel by default, and the
  # crossover was measured only at 8 and 256 (run 6). Batch 64's ncu had that kernel at 32.4 µs a
  # layer (24.5 % of the step) against ~17 µs of KV bytes.
  bench_step ours_online512 45 env BLIP2_PAGED_ONLINE_MIN=512 "${BENCH[@]}" --batch 32,64 --images none --steps 32 --json
}
if [ "${BLIP2_GPU_PICK:-0}" = 1 ]; then
  switch_steps
  python3 bench/gpu/pick.py "$OUT" >"$OUT/pick.txt" 2>&1
  mapfile -t PICK < <(grep -E '^BLIP2_[A-Z0-9_]+=[^ ]*$' "$OUT/picked.env" 2>/dev/null)
  echo "bench/gpu/pick.py: ${PICK[*]:-the defaults} (picks.txt)"
fi
bench_step ours 150 "${BENCH[@]}" --batch 1,8,32,64 --images 1,64 --steps 32 --engine --json
switch_steps
bench_step gemm_floor 90 python3 "$SHARED/tools/gemm_floor.py"
bench_step hf 180 python3 bench/gpu/hf_baseline.py
# Batch 256 on its own: a failure there (memory) keeps the smaller batches' numbers.
bench_step ours_256 90 "${BENCH[@]}" --batch 256 --images 1 --steps 32 --engine --json
# The same with the steps waiting for the image encoder while more requests wait for images than
# sequences are ready (--hold-for-images: a burst encoded with the GPU to itself, then decoded in
# one batch, as HF's generate), and at 32 and 64. The JSON's steps / steps_while_encoding /
# decode_step_ms / prefill_step_ms say where the engine's time went.
bench_step ours_256_hold 90 "${BENCH[@]}" --batch 256 --images none --steps 32 --engine --hold-for-images 200 --json
bench_step ours_hold 60 "${BENCH[@]}" --batch 32,64 --images none --steps 32 --engine --hold-for-images 200 --json
# The hold until the whole burst is encoded (--hold-share 0: steps wait while any request waits for
# its image, at most 1 s at a time): HF generate's order, every image, then every decode step. CPU,
# tiny model (2026-11-28): 256 requests in 62 steps, against 102 with the default share and 212
# without a hold.
bench_step ours_256_holdall 90 "${BENCH[@]}" --batch 256 --images none --steps 32 --engine --hold-for-images 1000 \
  --hold-share 0 --json
bench_step ours_holdall 60 "${BENCH[@]}" --batch 32,64 --images none --steps 32 --engine --hold-for-images 1000 \
  --hold-share 0 --json
# The hold with prefill in steps of 2048 tokens instead of 512 (256 prompts of 45: 6 steps, not 23).
bench_step ours_256_hold2k 90 "${BENCH[@]}" --batch 256 --images none --steps 32 --engine --hold-for-images 200 \
  --max-step-tokens 2048 --json
# The same with every image of the 256 encoded in one batch (as HF's generate) instead of batches
# of 64 between decode steps (run 5: 17.7 ms per token where a step alone takes 7.4).
bench_step ours_256_img256 90 "${BENCH[@]}" --batch 256 --images 256 --steps 32 --engine --image-batch 256 --json
# Where the time goes, kernel by kernel (ncu, without graphs so that each kernel is its own launch):
# a decode step at batch 64 and at batch 1 (after the weight fills, the warm-up and the prefill)
# and the first layers of vision at 64 images. ncu_summary.py groups the kernels.
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
if [ -x "$NCU" ]; then
  NCU_ARGS=(--metrics gpu__time_duration.sum --csv --page raw)
  bench_step ncu_decode 60 env BLIP2_GRAPHS=0 "$NCU" "${NCU_ARGS[@]}" --launch-skip 2000 --launch-count 1500 \
    "${BENCH[@]}" --batch 64 --images none --steps 4
  python3 bench/gpu/ncu_summary.py "$OUT/ncu_decode.out" >"$OUT/ncu_decode.txt" 2>&1
  bench_step ncu_decode1 60 env BLIP2_GRAPHS=0 "$NCU" "${NCU_ARGS[@]}" --launch-skip 2000 --launch-count 1500 \
    "${BENCH[@]}" --batch 1 --images none --steps 8
  python3 bench/gpu/ncu_summary.py "$OUT/ncu_decode1.out" >"$OUT/ncu_decode1.txt" 2>&1
  bench_step ncu_vision 60 env BLIP2_GRAPHS=0 "$NCU" "${NCU_ARGS[@]}" --launch-skip 1247 --launch-count 800 \
    "${BENCH[@]}" --batch 1 --images 64 --steps 1
  python3 bench/gpu/ncu_summary.py "$OUT/ncu_vision.out" >"$OUT/ncu_vision.txt" 2>&1
  # Vision + Q-Former + projection of one image, whole (the < 2.5 ms target; run 8: 4.64 ms where
  # the GEMM-only floor is 1.96): which of its ~500 kernels hold the rest.
  # ~500 kernels a run: 1100 take the first whole (the segment between two k_im2col).
  bench_step ncu_vision1 90 env BLIP2_GRAPHS=0 "$NCU" "${NCU_ARGS[@]}" --launch-skip 1247 --launch-count 1100 \
    "${BENCH[@]}" --batch 1 --images 1 --steps 1
  python3 bench/gpu/ncu_summary.py "$OUT/ncu_vision1.out" --start-at k_im2col >"$OUT/ncu_vision1.txt" 2>&1
else
  echo "ncu: not on this machine"
fi
# The comparisons of earlier runs' switches.
# The matmuls whose readers take 16 bits (vision qkv and fc1, OPT fc1) writing fp32 as before
# (BLIP2_OUT16=0: attention, GELU and fc2 read fp32 and narrow it), next to ours' 16-bit outputs.
bench_step ours_out16off 60 env BLIP2_OUT16=0 "${BENCH[@]}" --batch 1,64 --images 1,64 --steps 32 --json
# Decode with the new keys and values written by k_kv_write before the attention (BLIP2_FUSED_KV=0)
# instead of by the attention kernel itself.
bench_step ours_kvwrite 45 env BLIP2_FUSED_KV=0 "${BENCH[@]}" --batch 1,64,256 --images none --steps 32 --json
# Vision + Q-Former with the encoders' attention on the TF32 products next to ours.json's (the mma kernel).
bench_step ours_products 60 env BLIP2_MMA_ATTN=0 "${BENCH[@]}" --batch 1 --images 1,64 --steps 2 --json
# Decode steps with the block-per-row paged attention (run 5's) next to ours' warp-per-head one.
bench_step ours_paged_v 60 env BLIP2_PAGED_ONLINE=0 "${BENCH[@]}" --batch 64,256 --images none --steps 32 --json
# Programmatic dependent launch off (kernels/cuda/internal.cuh): what overlapping each kernel's
# start with the previous one's tail gives, at batch 1 (latency) and 64.
bench_step ours_nopdl 60 env BLIP2_PDL=0 "${BENCH[@]}" --batch 1,64 --images 1 --steps 32 --json
# The GEMV against cuBLASLt row count by row count (kernels/cuda/gemv.cu gemv_max_t: the default
# sends T <= 4 to the GEMV): every small batch through the GEMV, then none.
bench_step ours_gemv8 45 env BLIP2_GEMV_MAX_T=8 "${BENCH[@]}" --batch 1,2,4,6,8 --images none --steps 32 --json
bench_step ours_nogemv 45 env BLIP2_GEMV=0 "${BENCH[@]}" --batch 1,2,4,6,8 --images none --steps 32 --json
# GEMV bandwidth at T=1 and the paged attention's GB/s at decode batch 256 (f16 cache, 61
# positions); the encoders' attention with the 16-bit cases on the mma kernel, then on the TF32
# products (BLIP2_MMA_ATTN=0).
bench_step ops_perf_matmul 45 "$BUILD/tests/test_ops" --perf --backend cuda --op matmul_h
# The one-row GEMV with the LayerNorm inside (OPT qkv and fc1 shapes at T = 1), then the norm
# kernel and the GEMV one after the other (BLIP2_FUSED_LN=0): GB/s of the weights either way.
bench_step ops_perf_matmul_ln 30 "$BUILD/tests/test_ops" --perf --backend cuda --op matmul_ln_a
bench_step ops_perf_matmul_ln_off 30 env BLIP2_FUSED_LN=0 "$BUILD/tests/test_ops" --perf --backend cuda --op matmul_ln_a
bench_step ops_perf_gemv_warp 45 env BLIP2_GEMV_WARP=1 "$BUILD/tests/test_ops" --perf --backend cuda --op matmul_h,matmul_ln_a
bench_step ops_perf_paged 30 "$BUILD/tests/test_ops" --perf --backend cuda --op attention_paged
# The sampling path's top-k over rows of logits (k rounds of the argmax scan; c4b3017).
bench_step ops_perf_topk 20 "$BUILD/tests/test_ops" --perf --backend cuda --op topk_rows
bench_step ops_perf_paged_v 30 env BLIP2_PAGED_ONLINE=0 "$BUILD/tests/test_ops" --perf --backend cuda --op attention_paged
bench_step ops_perf_attention 30 "$BUILD/tests/test_ops" --perf --backend cuda --op attention
bench_step ops_perf_attention_fa 30 env BLIP2_ATTN_FA=1 "$BUILD/tests/test_ops" --perf --backend cuda --op attention
bench_step ops_perf_attention_products 30 env BLIP2_MMA_ATTN=0 "$BUILD/tests/test_ops" --perf --backend cuda --op attention
# Beam search (5 beams, as BLIP-2 captioning runs): B requests of 32 tokens, B·5 sequences a step.
bench_step ours_beams 90 "${BENCH[@]}" --batch 1,8,32 --images 1 --steps 32 --engine --num-beams 5 --json
# What the decode graphs buy.
bench_step ours_nographs 60 env BLIP2_GRAPHS=0 "${BENCH[@]}" --batch 1,64 --images 1 --steps 32 --json
# Every bench JSON above side by side, with each step's ratio to ours (session.sh prints it), and
# to ours_ab: the base of the switch comparisons, which with BLIP2_GPU_PICK=1 ours is not.
python3 bench/gpu/compare.py "$OUT" >"$OUT/compare.txt" 2>&1
[ -s "$OUT/ours_ab.out" ] && python3 bench/gpu/compare.py "$OUT" ours_ab >"$OUT/compare_ab.txt" 2>&1
