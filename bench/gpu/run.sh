#!/bin/bash
# GPU benchmark of issue 8, one unattended run (at most ~5 minutes on an H100 after the build of
# tests/gpu/run.sh): ours vs HF transformers fp16 vs the cuBLAS GEMM-only floor, same card, same
# run. From the repository root on the GPU machine, after tests/gpu/prepare.sh here:
#   bash bench/gpu/run.sh      # JSON + logs under $OUT (default .gpu/out)
# Ours: `blip2 bench --device cuda --dtype f16` on random weights of the real blip2-opt-2.7b config
# (../shared/hub), prompt 45, 32 decode steps, batches 1..256, vision+Q-Former at 1 and 64, one
# request with 16 new tokens, and (--engine) B whole requests per batch through the serving engine
# (image, prompt, 32 forced tokens: HF generate's workload, scheduling and sampling included), the
# same with 5 beams at B = 1, 8, 32; the op perf table (GEMV bandwidth at T=1); HF via hf_baseline.py;
# the floor via ../shared/tools/gemm_floor.py. The op perf table also has the paged attention's GB/s
# at decode batch 256 (f16 cache, 61 positions).
set -u
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-$PWD/.gpu/shared}
OUT=${OUT:-$PWD/.gpu/out}
BUILD=${BUILD:-build-gpu}
mkdir -p "$OUT"
export OUT
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
timeout 300 "$BUILD/blip2" bench --device cuda --dtype f16 --config "$CFG" --random-weights \
  --batch 1,8,32,64,256 --images 1,64 --prompt-len 45 --steps 32 --engine --json >"$OUT/ours.json" 2>"$OUT/ours.log"
echo "ours: rc $? $(head -c 600 "$OUT/ours.json")"
# Beam search (5 beams, as BLIP-2 captioning runs): B requests of 32 tokens each, B·5 sequences
# a step, beam candidates from the device (HF: hf_baseline.py's generate_beams).
timeout 120 "$BUILD/blip2" bench --device cuda --dtype f16 --config "$CFG" --random-weights \
  --batch 1,8,32 --images 1 --prompt-len 45 --steps 32 --engine --num-beams 5 --json >"$OUT/ours_beams.json" 2>"$OUT/ours_beams.log"
echo "ours, 5 beams: rc $? $(head -c 400 "$OUT/ours_beams.json")"
# The same decode without CUDA graphs (what the graphs buy, side by side).
BLIP2_GRAPHS=0 timeout 120 "$BUILD/blip2" bench --device cuda --dtype f16 --config "$CFG" --random-weights \
  --batch 1,64 --images 1 --prompt-len 45 --steps 32 --json >"$OUT/ours_nographs.json" 2>"$OUT/ours_nographs.log"
echo "ours without graphs: rc $? $(head -c 400 "$OUT/ours_nographs.json")"
timeout 120 "$BUILD/tests/test_ops" --perf --op matmul_h >"$OUT/ops_perf.log" 2>&1
timeout 60 "$BUILD/tests/test_ops" --perf --op attention_paged >>"$OUT/ops_perf.log" 2>&1
# The encoders' attention: fused on the tensor cores for f16 models (the f16 cases), TF32 products
# and an fp32 score matrix otherwise (the bf16 case at 20 images); then the f16 cases unfused, to
# compare the two side by side.
timeout 60 "$BUILD/tests/test_ops" --perf --op attention >>"$OUT/ops_perf.log" 2>&1
BLIP2_FUSED_ATTN=0 timeout 60 "$BUILD/tests/test_ops" --perf --op attention >>"$OUT/ops_perf.log" 2>&1
echo "ops perf: rc $? $(grep -c . "$OUT/ops_perf.log") lines"
# Vision + Q-Former at batch 1 and 64 without the fused attention (ours.json has it with).
BLIP2_FUSED_ATTN=0 timeout 120 "$BUILD/blip2" bench --device cuda --dtype f16 --config "$CFG" --random-weights \
  --batch 1 --images 1,64 --prompt-len 45 --steps 2 --json >"$OUT/ours_unfused.json" 2>"$OUT/ours_unfused.log"
echo "ours without the fused attention: rc $? $(head -c 300 "$OUT/ours_unfused.json")"
timeout 120 python3 "$SHARED/tools/gemm_floor.py" >"$OUT/gemm_floor.log" 2>&1
echo "gemm floor: rc $? $(tail -2 "$OUT/gemm_floor.log")"
timeout 300 python3 bench/gpu/hf_baseline.py >"$OUT/hf.log" 2>&1
echo "hf: rc $? $(tail -c 600 "$OUT/hf.log")"
