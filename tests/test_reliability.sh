#!/bin/bash
# Issue 10's fault cases and a soak, on the CPU with the tiny fixture (loopback only, every wait
# bounded, servers killed on exit):
#  - a model directory that is missing or corrupt at start: a clear error and exit 1, no hang;
#  - a rank killed mid-generation: mpirun stops the whole group within seconds, with a log line,
#    and the streaming client gets UNAVAILABLE;
#  - a client killed mid-stream: its work stops and its KV blocks return;
#  - a soak of SOAK_REQUESTS (default 2000; 10000 for the recorded run) at concurrency 64 mixed
#    with cancellations, short deadlines and malformed requests (tests/soak.py); SOAK_SERVER_ARGS
#    adds blip2d flags to that server (e.g. "--hold-for-images 200 --hold-share 0"), SOAK_ONLY=1
#    skips the fault cases.
#   test_reliability.sh BLIP2D BLIP2 SHARED_DIR MPIRUN [SOURCE_DIR]
set -u
BLIP2D=$1
BLIP2=$2
SHARED=$(cd "$3" && pwd) # absolute: the corrupt-model case links to its files from a temporary folder
MPIRUN=$4
SRC=${5:-$(cd "$(dirname "$0")/.." && pwd)}
PY=/usr/bin/python3
FIX=$SHARED/fixtures
MODEL=$FIX/tiny-f16
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY grpc_proxy
. "$SRC/tests/lib.sh"
servers=()
trap 'for p in "${servers[@]}"; do pkill -KILL -P "$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT

# wait_exit PID SECONDS → RC (124: still running)
wait_exit() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$1" 2>/dev/null; then RC=124; return; fi
  wait "$1"
  RC=$?
}

# Under ASan (BLIP2_SANITIZED=1, set by CMake): Open MPI's own allocations at finalize are not ours
# (suppressed as in test_server.sh), and resident memory says nothing (the allocator quarantines
# what is freed), so the soak skips its memory check there.
printf '%s\n' leak:libmpi.so leak:libopen-pal.so leak:libopen-rte.so leak:libpmix.so leak:mca_ leak:MPI_Init_thread \
  leak:MPI_Finalize leak:event_base_loop leak:libevent >"$tmp/lsan-mpi.supp"
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}fast_unwind_on_malloc=0"
export LSAN_OPTIONS="${LSAN_OPTIONS:+$LSAN_OPTIONS:}suppressions=$tmp/lsan-mpi.supp"
export OMPI_MCA_mca_base_component_disable_dlclose=1

# start NAME [flags]: mpirun -np 2 blip2d on a kernel-chosen port → SRV, PORT; SERVING within 60 s
start() {
  local name=$1 i
  shift
  "$MPIRUN" -np 2 "$BLIP2D" --model "$MODEL" --listen 127.0.0.1:0 --port-file "$tmp/$name.port" "$@" \
    >"$tmp/$name.log" 2>&1 </dev/null &
  SRV=$!
  servers+=("$SRV")
  for ((i = 0; i < 600; i++)); do [ -s "$tmp/$name.port" ] && break; sleep 0.1; done
  PORT=$(cat "$tmp/$name.port" 2>/dev/null)
  [ -n "$PORT" ] && "$PY" "$SRC/tests/server_client.py" --addr "127.0.0.1:$PORT" --proto-dir "$SRC/proto" wait-serving 60
}

rank_pid() { # mpirun-pid rank → pid of that rank
  local p
  for p in $(pgrep -P "$1"); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2" && echo "$p" && return
  done
}

# SOAK_ONLY=1: the soak alone (ctest runs it so again under the hold flags, test_reliability_hold).
if [ -z "${SOAK_ONLY:-}" ]; then
# ---- the model directory missing or corrupt at start
for np in 1 2; do
  timeout 60 "$MPIRUN" -np $np "$BLIP2D" --model "$tmp/vanished" --listen 127.0.0.1:0 >"$tmp/o" 2>&1 </dev/null
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "vanished/config.json: missing" "$tmp/o"; then ok; else
    bad "missing model dir, np $np: rc=$rc $(tail -3 "$tmp/o")"; fi
done
mkdir -p "$tmp/corrupt"
for f in "$MODEL"/*; do ln -s "$f" "$tmp/corrupt/"; done
rm "$tmp/corrupt/model.safetensors"
head -c 100000 "$MODEL/model.safetensors" >"$tmp/corrupt/model.safetensors"
timeout 60 "$MPIRUN" -np 2 "$BLIP2D" --model "$tmp/corrupt" --listen 127.0.0.1:0 >"$tmp/o" 2>&1 </dev/null
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "corrupt/model.safetensors" "$tmp/o" && grep -q "truncated" "$tmp/o"; then ok; else
  bad "corrupt checkpoint: rc=$rc $(tail -3 "$tmp/o")"; fi

# ---- a rank killed mid-generation
if start kill; then
  "$PY" - "$SRC" "127.0.0.1:$PORT" "$MODEL/../images/chelsea.png" >"$tmp/stream.out" 2>&1 <<'PYEOF' &
import sys, time
sys.path.insert(0, sys.argv[1] + "/tests")
import server_client as sc, grpc
sc.load_stubs(sys.argv[1] + "/proto")
api = sc.Api(sc.channel(sys.argv[2]))
img = open(sys.argv[3], "rb").read()
n = 0
try:
    for _ in range(200):  # long answers one after another: the kill lands inside one
        for m in api.stream(sc.P["b"].GenerateRequest(image=img, prompt="a", max_new_tokens=1000), timeout=60):
            n += 1
    print("ENDED without error after", n)
except grpc.RpcError as e:
    print("STATUS", e.code().name, n, e.details())
PYEOF
  client=$!
  sleep 1.5
  victim=$(rank_pid "$SRV" 1)
  t0=$(date +%s%N)
  [ -n "$victim" ] && kill -KILL "$victim"
  wait_exit "$SRV" 30
  t1=$(date +%s%N)
  wait_exit "$client" 30
  ms=$(((t1 - t0) / 1000000))
  echo "rank 1 killed: mpirun exited $RC after $ms ms; client: $(cat "$tmp/stream.out")"
  if [ -n "$victim" ] && [ "$ms" -lt 10000 ] && [ "$RC" -ne 124 ]; then ok; else bad "group did not stop within 10 s ($ms ms)"; fi
  if grep -q "STATUS UNAVAILABLE" "$tmp/stream.out"; then ok; else bad "client after the kill: $(cat "$tmp/stream.out")"; fi
  if grep -qiE "signal 9|killed" "$tmp/kill.log"; then ok; else bad "no log line naming the dead rank: $(tail -5 "$tmp/kill.log")"; fi
else
  bad "the kill server did not start: $(tail -5 "$tmp/kill.log" 2>/dev/null)"
fi

# ---- a client killed mid-stream: its work stops, its blocks return
if start client; then
  "$PY" - "$SRC" "127.0.0.1:$PORT" "$MODEL/../images/chelsea.png" <<'PYEOF' &
import sys
sys.path.insert(0, sys.argv[1] + "/tests")
import server_client as sc
sc.load_stubs(sys.argv[1] + "/proto")
api = sc.Api(sc.channel(sys.argv[2]))
img = open(sys.argv[3], "rb").read()
for _ in range(100):
    for m in api.stream(sc.P["b"].GenerateRequest(image=img, prompt="a", max_new_tokens=1000), timeout=60):
        pass
PYEOF
  client=$!
  "$PY" "$SRC/tests/server_client.py" --addr "127.0.0.1:$PORT" --proto-dir "$SRC/proto" wait-active 1 20
  kill -KILL "$client"
  wait "$client" 2>/dev/null
  out=$("$PY" - "$SRC" "127.0.0.1:$PORT" <<'PYEOF'
import sys
sys.path.insert(0, sys.argv[1] + "/tests")
import server_client as sc
sc.load_stubs(sys.argv[1] + "/proto")
info = sc.wait_idle(sc.Api(sc.channel(sys.argv[2])), 20)
print("idle" if info is not None and info.kv_blocks_in_use == 0 else "busy %s" % info)
PYEOF
)
  if [ "$out" = idle ]; then ok; else bad "after the client died: $out"; fi
  kill -TERM $(pgrep -P "$SRV") 2>/dev/null
  wait_exit "$SRV" 30
else
  bad "the client server did not start: $(tail -5 "$tmp/client.log" 2>/dev/null)"
fi

# ---- safe defaults: loopback unless told otherwise; TLS with a self-signed certificate
"$BLIP2D" --model "$MODEL" --port-file "$tmp/default.port" >"$tmp/default.log" 2>&1 </dev/null &
dflt=$!
servers+=("$dflt")
for ((i = 0; i < 100; i++)); do [ -s "$tmp/default.port" ] && break; sleep 0.1; done
if grep -q "listening on 127.0.0.1:50051" "$tmp/default.log" && ! grep -qE "^ *[0-9]+: 00000000:C383" /proc/net/tcp; then ok; else
  grep -q "cannot listen" "$tmp/default.log" && echo "port 50051 busy: default-listen check skipped" || bad "default listen: $(cat "$tmp/default.log")"
fi
kill -TERM "$dflt" 2>/dev/null
wait_exit "$dflt" 30
if openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -days 2 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >/dev/null 2>&1 && start tls --tls-cert "$tmp/cert.pem" --tls-key "$tmp/key.pem" 2>/dev/null; then
  bad "a plaintext health probe reached the TLS server"
elif [ -s "$tmp/tls.port" ]; then
  PORT=$(cat "$tmp/tls.port")
  out=$("$PY" - "$SRC" "127.0.0.1:$PORT" "$tmp/cert.pem" "$FIX/images/chelsea.png" <<'PYEOF'
import sys, time
sys.path.insert(0, sys.argv[1] + "/tests")
import server_client as sc, grpc
sc.load_stubs(sys.argv[1] + "/proto")
creds = grpc.ssl_channel_credentials(root_certificates=open(sys.argv[3], "rb").read())
api = sc.Api(grpc.secure_channel(sys.argv[2], creds, options=[("grpc.ssl_target_name_override", "localhost")]))
if not sc.wait_serving(api, 60):
    sys.exit("not serving over TLS")
r = api.generate(sc.P["b"].GenerateRequest(image=open(sys.argv[4], "rb").read(), prompt="a photo of", max_new_tokens=4), timeout=60)
plain = sc.Api(sc.channel(sys.argv[2]))
code, _, _ = sc.code_of(lambda: plain.info(sc.P["b"].ModelInfoRequest(), timeout=5))
print("tls ids", list(r.token_ids), "plaintext", code.name)
PYEOF
)
  if [[ "$out" == "tls ids ["*"] plaintext UNAVAILABLE" ]]; then ok; else bad "TLS: $out"; fi
  kill -TERM $(pgrep -P "$SRV") 2>/dev/null
  wait_exit "$SRV" 30
else
  bad "TLS server did not start: $(cat "$tmp/tls.log")"
fi
fi # SOAK_ONLY

# ---- soak
# shellcheck disable=SC2086 # SOAK_SERVER_ARGS: flags, split on spaces
if start soak --max-queue 4096 ${SOAK_SERVER_ARGS:-}; then
  "$BLIP2" generate --model "$MODEL" --image "$FIX/images/chelsea.png" --max-new-tokens 1 --json >/dev/null # warm page cache
  "$PY" - "$BLIP2" "$MODEL" "$FIX" "$tmp" <<'PYEOF' || bad "references"
import json, subprocess, sys
blip2, model, fix, tmp = sys.argv[1:5]
refs = {}
for c in json.load(open(fix + "/MANIFEST.json"))["fixtures"]["tiny-f16"]["cases"]:
    out = subprocess.run([blip2, "generate", "--model", model, "--image", fix + "/" + c["image"], "--prompt", c["prompt"],
                          "--max-new-tokens", "12", "--json"], capture_output=True, text=True, timeout=60)
    refs[c["case"]] = json.loads(out.stdout)["output_ids"]
json.dump(refs, open(tmp + "/refs.json", "w"))
PYEOF
  pids=$(pgrep -P "$SRV" | paste -sd,)
  if timeout 900 "$PY" "$SRC/tests/soak.py" --addr "127.0.0.1:$PORT" --proto-dir "$SRC/proto" --shared "$SHARED" \
    --refs "$tmp/refs.json" --pids "$pids" --requests "${SOAK_REQUESTS:-2000}" --concurrency 64 \
    ${BLIP2_SANITIZED:+--no-memory-check} \
    ${SOAK_JSON:+--json-out "$SOAK_JSON"} >"$tmp/soak.out" 2>&1; then ok; else bad "soak: $(tail -30 "$tmp/soak.out")"; fi
  grep -E "passed|requests_per_s|rss|fds|wrong|unexpected" "$tmp/soak.out"
  kill -TERM $(pgrep -P "$SRV") 2>/dev/null
  wait_exit "$SRV" 60
  if [ "$RC" -eq 0 ]; then ok; else bad "soak server exit $RC: $(tail -5 "$tmp/soak.log")"; fi
else
  bad "the soak server did not start: $(tail -5 "$tmp/soak.log" 2>/dev/null)"
fi
summary
