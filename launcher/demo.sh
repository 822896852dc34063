#!/bin/bash
# The main job on the tiny fixture model: start blip2d (2 tensor-parallel ranks when mpirun is
# there), wait until it is SERVING, ask one VQA question with blip2-client, stop the server.
# Run from the repository root after building: bash launcher/demo.sh [MODEL_DIR]
set -euo pipefail
MODEL=${1:-../shared/fixtures/tiny-f16}
ADDR=127.0.0.1:50051
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if command -v mpirun >/dev/null; then
  mpirun -np 2 build/blip2d --model "$MODEL" --listen "$ADDR" &
else
  build/blip2d --model "$MODEL" --listen "$ADDR" &
fi
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
build/blip2-client --server "$ADDR" --wait-ready 60000 --image ../shared/fixtures/images/chelsea.png \
  --question "Question: how many cats are in the picture? Answer:" --max-new-tokens 12 --json
