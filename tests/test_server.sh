#!/bin/bash
# blip2d end to end on the CPU with the tiny fixture: `mpirun -np 2 blip2d` answers blip2-client and
# an independent Python grpcio client (tests/server_client.py) with the same token ids as
# `blip2 generate` for every fixture case; streaming, cancellation, deadlines, bad requests, 32
# concurrent clients, Health, and a SIGTERM with requests in flight after which every rank exits 0.
# Only 127.0.0.1, ports chosen by the kernel (--listen 127.0.0.1:0 --port-file), every wait bounded,
# servers killed on exit.
#
#   test_server.sh BLIP2D BLIP2_CLIENT BLIP2 SHARED_DIR [MPIRUN] [SOURCE_DIR]
# MPIRUN empty, "none" or *-NOTFOUND (a build without MPI): the same checks on one process.
set -u
BLIP2D=$1
CLIENT=$2
BLIP2=$3
SHARED=$4
MPIRUN=${5-mpirun}
NP=2
case "$MPIRUN" in "" | none | *NOTFOUND) NP=0 ;; esac
SRC=${6:-$(cd "$(dirname "$0")/.." && pwd)}
PY=/usr/bin/python3 # Debian's python3-grpcio lives there, not in a pyenv python3 earlier in PATH
FIX=$SHARED/fixtures
MODEL=$FIX/tiny-f16
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY grpc_proxy # loopback only
pass=0
fail=0
tmp=$(mktemp -d)
servers=()
t_start=$(date +%s)

cleanup() {
  local p
  for p in "${servers[@]}"; do
    pkill -KILL -P "$p" 2>/dev/null
    kill -KILL "$p" 2>/dev/null
  done
  [ -n "${KEEP_TMP:-}" ] && echo "kept $tmp" >&2 || rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

ok() { pass=$((pass + 1)); }
bad() {
  fail=$((fail + 1))
  echo "FAIL: $*" >&2
}
check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then ok; else bad "$what"; fi
}

printf '%s\n' leak:libmpi.so leak:libopen-pal.so leak:libopen-rte.so leak:libpmix.so leak:mca_ leak:MPI_Init_thread \
  leak:MPI_Finalize leak:event_base_loop leak:libevent >"$tmp/lsan-mpi.supp"

# start_server NAME NP [blip2d flags...]: sets SRV_PID and PORT; the log is $tmp/NAME.log
# wait-active ADDR N SECONDS in the background (pid in WPID), returning once it polls: requests
# started after it cannot finish unseen (a 100-token request on the tiny model can end before a
# Python client has even started).
start_poller() { # addr n seconds ready-file
  "$PY" "$SRC/tests/server_client.py" --addr "$1" --proto-dir "$SRC/proto" wait-active "$2" "$3" "$4" &
  WPID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    [ -e "$4" ] && break
    sleep 0.05
  done
}

start_server() {
  local name=$1 np=$2
  shift 2
  rm -f "$tmp/$name.port"
  if [ "$np" -eq 0 ]; then
    "$BLIP2D" --model "$MODEL" --listen 127.0.0.1:0 --port-file "$tmp/$name.port" --kv-bytes 64M "$@" \
      >"$tmp/$name.log" 2>&1 </dev/null &
  else
    # Under ASan: Open MPI's own allocations at finalize are not ours. Keep its plugins loaded (so
    # the stacks resolve), unwind fully, and suppress what MPI's libraries and threads leak.
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}fast_unwind_on_malloc=0" \
      LSAN_OPTIONS="${LSAN_OPTIONS:+$LSAN_OPTIONS:}suppressions=$tmp/lsan-mpi.supp" \
      OMPI_MCA_mca_base_component_disable_dlclose=1 \
      "$MPIRUN" -np "$np" "$BLIP2D" --model "$MODEL" --listen 127.0.0.1:0 --port-file "$tmp/$name.port" --kv-bytes 64M \
      "$@" >"$tmp/$name.log" 2>&1 </dev/null &
  fi
  SRV_PID=$!
  servers+=("$SRV_PID")
  local i
  for ((i = 0; i < 3000; i++)); do
    [ -s "$tmp/$name.port" ] && break
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.02
  done
  PORT=$(cat "$tmp/$name.port" 2>/dev/null)
  if [ -z "$PORT" ]; then
    bad "$name: no port file; log: $(cat "$tmp/$name.log")"
    return 1
  fi
  # The port file is written before the model loads. When this first probe still finds it loading
  # (a race with the tiny model: not counted when it is already serving), Health must say
  # NOT_SERVING and Generate UNAVAILABLE.
  if [ "$(timeout 10 "$CLIENT" --server "127.0.0.1:$PORT" --health 2>&1)" = "NOT_SERVING" ]; then
    timeout 10 "$CLIENT" --server "127.0.0.1:$PORT" --image "$FIX/images/chelsea.png" --question hi >/dev/null 2>"$tmp/$name.probe"
    if grep -q "UNAVAILABLE: the model is still loading" "$tmp/$name.probe"; then ok
    elif [ -s "$tmp/$name.probe" ]; then bad "$name: Generate while loading: $(cat "$tmp/$name.probe")"
    fi
    echo "$name: probed while loading: NOT_SERVING, $(cat "$tmp/$name.probe")"
  fi
  if ! "$PY" "$SRC/tests/server_client.py" --addr "127.0.0.1:$PORT" --proto-dir "$SRC/proto" wait-serving 60; then
    bad "$name: not SERVING within 60 s; log: $(cat "$tmp/$name.log")"
    return 1
  fi
  return 0
}

# wait_exit PID SECONDS: sets RC to the exit code, or 124 after SECONDS (not in a subshell: only
# this shell can wait for its children)
wait_exit() {
  local pid=$1 i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    RC=124
    return
  fi
  wait "$pid"
  RC=$?
}

json_field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# ---- references: blip2 generate for every fixture case (and the case list for the loops below)
"$PY" - "$BLIP2" "$MODEL" "$FIX" "$tmp" <<'EOF' || bad "blip2 generate references"
import json, subprocess, sys
blip2, model, fix, tmp = sys.argv[1:5]
cases = json.load(open(fix + "/MANIFEST.json"))["fixtures"]["tiny-f16"]["cases"]
refs = {}
for c in cases:
    out = subprocess.run([blip2, "generate", "--model", model, "--image", fix + "/" + c["image"], "--prompt", c["prompt"],
                          "--max-new-tokens", "12", "--json"], capture_output=True, text=True, timeout=60)
    ids = json.loads(out.stdout)["output_ids"]
    if ids != c["greedy_ids_no_eos_stop"]:
        sys.exit("case %d: blip2 generate %s != golden %s" % (c["case"], ids, c["greedy_ids_no_eos_stop"]))
    refs[c["case"]] = ids
    open("%s/case%d.prompt" % (tmp, c["case"]), "w").write(c["prompt"])
    open("%s/case%d.image" % (tmp, c["case"]), "w").write(fix + "/" + c["image"])
json.dump(refs, open(tmp + "/refs.json", "w"))
EOF
ncases=$(ls "$tmp"/case*.prompt 2>/dev/null | wc -l)
check "5 fixture cases" [ "$ncases" -eq 5 ]

# ---- the main server: 2 ranks under mpirun (or one process without MPI)
if start_server np2 $NP --grace-ms 60000; then
  ok
  SRV=$SRV_PID
  ADDR=127.0.0.1:$PORT
  check "every rank reports its load" [ "$(grep -c "loaded in" "$tmp/np2.log")" -eq $((NP > 0 ? NP : 1)) ]
  check "listening line" grep -q "listening on 127.0.0.1:$PORT" "$tmp/np2.log"

  # blip2-client: every case, unary and streamed
  for ((n = 0; n < ncases; n++)); do
    img=$(cat "$tmp/case$n.image")
    prompt=$(cat "$tmp/case$n.prompt")
    want=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$tmp/refs.json" "$n")
    timeout 60 "$CLIENT" --server "$ADDR" --image "$img" --question "$prompt" --max-new-tokens 12 --json \
      >"$tmp/c$n.json" 2>"$tmp/c$n.err"
    got=$(json_field "$tmp/c$n.json" token_ids 2>/dev/null)
    check "blip2-client case $n: '$got' != '$want' $(cat "$tmp/c$n.err")" [ "$got" = "$want" ]
    timeout 60 "$CLIENT" --server "$ADDR" --image "$img" --question "$prompt" --max-new-tokens 12 --stream --json \
      >"$tmp/s$n.json" 2>"$tmp/s$n.err"
    got=$(json_field "$tmp/s$n.json" token_ids 2>/dev/null)
    check "blip2-client --stream case $n ids: '$got' != '$want' $(cat "$tmp/s$n.err")" [ "$got" = "$want" ]
    u=$(timeout 60 "$CLIENT" --server "$ADDR" --image "$img" --question "$prompt" --max-new-tokens 12 | sed 's/[[:space:]]*$//')
    s=$(timeout 60 "$CLIENT" --server "$ADDR" --image "$img" --question "$prompt" --max-new-tokens 12 --stream | sed 's/[[:space:]]*$//')
    t=$(json_field "$tmp/c$n.json" text 2>/dev/null)
    check "case $n: streamed text '$s' != unary '$u' (json '$t')" [ -n "$u" ] && [ "$s" = "$u" ] && [ "$t" = "$u" ]
  done

  # blip2-client errors: the status name on stderr, exit 1
  img0=$(cat "$tmp/case0.image")
  : >"$tmp/empty.png"
  timeout 30 "$CLIENT" --server "$ADDR" --image "$img0" --question "hi" --max-new-tokens 1000000000 >/dev/null 2>"$tmp/e1"
  rc=$?
  check "client max_new_tokens 1e9: rc=$rc $(cat "$tmp/e1")" [ $rc -eq 1 ] && grep -q "INVALID_ARGUMENT" "$tmp/e1"
  timeout 30 "$CLIENT" --server "$ADDR" --image "$tmp/empty.png" --question "hi" >/dev/null 2>"$tmp/e2"
  rc=$?
  check "client 0-byte image: rc=$rc $(cat "$tmp/e2")" [ $rc -eq 1 ] && grep -q "INVALID_ARGUMENT" "$tmp/e2"
  timeout 30 "$CLIENT" --server "$ADDR" --image "$img0" --question "hi" --max-new-tokens 1000 --timeout-ms 5 >/dev/null 2>"$tmp/e3"
  rc=$?
  check "client 5 ms deadline: rc=$rc $(cat "$tmp/e3")" [ $rc -eq 1 ] && grep -q "DEADLINE_EXCEEDED" "$tmp/e3"

  # the independent client's battery
  timeout 240 "$PY" "$SRC/tests/server_client.py" --addr "$ADDR" --proto-dir "$SRC/proto" --shared "$SHARED" \
    --refs "$tmp/refs.json" checks $((NP > 0 ? NP : 1))
  rc=$?
  check "python client checks (rc=$rc)" [ $rc -eq 0 ]
  check "the cancelled stream was stopped by the engine" grep -q "req cancel-me GenerateStream CANCELLED" "$tmp/np2.log"

  # A second server on the same port must fail (SO_REUSEPORT off), not share the port.
  timeout 30 "$BLIP2D" --model "$MODEL" --listen "$ADDR" --kv-bytes 16M >"$tmp/dup.log" 2>&1 </dev/null
  rc=$?
  check "second server on port $PORT: rc=$rc $(cat "$tmp/dup.log")" [ $rc -ne 0 ] && [ $rc -ne 124 ] &&
    grep -q "cannot listen" "$tmp/dup.log"

  # SIGTERM with requests in flight: they complete, then every rank exits 0 (signal the ranks, as
  # mpirun's own forwarding does; mpirun's exit code is then 0 only if every rank exited 0).
  start_poller "$ADDR" 3 60 "$tmp/poll.ready"
  for n in 0 1 2; do
    timeout 120 "$CLIENT" --server "$ADDR" --image "$(cat "$tmp/case$n.image")" --question "$(cat "$tmp/case$n.prompt")" \
      --max-new-tokens 200 --json >"$tmp/term$n.json" 2>"$tmp/term$n.err" &
    eval "cpid$n=\$!"
  done
  wait "$WPID" || bad "SIGTERM test: the 3 requests were never seen in flight"
  if [ "$NP" -gt 0 ]; then pkill -TERM -P "$SRV"; else kill -TERM "$SRV"; fi
  wait_exit "$SRV" 90
  rc=$RC
  check "server (np $NP) after SIGTERM: rc=$rc; log: $(tail -5 "$tmp/np2.log")" [ "$rc" -eq 0 ]
  for n in 0 1 2; do
    eval "p=\$cpid$n"
    wait "$p"
    crc=$?
    g=$(json_field "$tmp/term$n.json" usage 2>/dev/null)
    check "in-flight request $n across SIGTERM: rc=$crc usage=$g $(cat "$tmp/term$n.err")" [ $crc -eq 0 ] &&
      [[ "$g" == *"'generated_tokens': 200"* ]]
  done
  check "SIGTERM logged" grep -q "SIGTERM: no new requests" "$tmp/np2.log"
  check "stopped cleanly" grep -q "blip2d: stopped" "$tmp/np2.log"
fi

# ---- one process without mpirun (as the README runs it): SIGINT ends it with 0 after its request
if start_server single 0 --grace-ms 20000 --batch-invariant; then
  ok
  SRV=$SRV_PID
  start_poller "127.0.0.1:$PORT" 1 30 "$tmp/single.ready"
  timeout 60 "$CLIENT" --server "127.0.0.1:$PORT" --image "$FIX/images/chelsea.png" \
    --question "Question: how many cats are in the picture? Answer:" --max-new-tokens 100 >"$tmp/single.out" 2>&1 &
  cpid=$!
  wait "$WPID" || bad "single: the request never became active"
  check "single: --batch-invariant reported" grep -q "seeded sampling batch-invariant" "$tmp/single.log"
  kill -INT "$SRV"
  wait_exit "$SRV" 60
  rc=$RC
  check "single process after SIGINT: rc=$rc; log: $(tail -3 "$tmp/single.log")" [ "$rc" -eq 0 ]
  wait "$cpid"
  crc=$?
  check "single: in-flight request answered (rc=$crc): $(cat "$tmp/single.out")" [ $crc -eq 0 ] && [ -s "$tmp/single.out" ]
fi

# ---- a grace period shorter than the work: the request is cancelled (UNAVAILABLE), exit 0 all the same
if start_server short 0 --grace-ms 300; then
  ok
  SRV=$SRV_PID
  start_poller "127.0.0.1:$PORT" 1 30 "$tmp/short.ready"
  timeout 60 "$CLIENT" --server "127.0.0.1:$PORT" --image "$FIX/images/chelsea.png" --question "hi" \
    --max-new-tokens 1000 >"$tmp/short.out" 2>"$tmp/short.err" &
  cpid=$!
  wait "$WPID" || bad "short: the request never became active"
  kill -TERM "$SRV"
  wait_exit "$SRV" 30
  rc=$RC
  check "short grace: server rc=$rc; log: $(tail -3 "$tmp/short.log")" [ "$rc" -eq 0 ]
  wait "$cpid"
  crc=$?
  check "short grace: the request was cancelled: rc=$crc $(cat "$tmp/short.err")" [ $crc -eq 1 ] &&
    grep -q "UNAVAILABLE: the server shut down during the request" "$tmp/short.err"
fi

# ---- usage errors
"$BLIP2D" >/dev/null 2>"$tmp/u1"
rc=$?
check "blip2d without --model: rc=$rc" [ $rc -eq 2 ] && grep -q -- "--model" "$tmp/u1"
"$CLIENT" --server "not an address" --image "$FIX/images/chelsea.png" >/dev/null 2>&1
rc=$?
check "blip2-client with a bad --server: rc=$rc" [ $rc -ne 0 ]

echo "test_server: $(($(date +%s) - t_start)) s"
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
